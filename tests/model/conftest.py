"""Shared tiny model pieces: a tokenizer trained on a few MeCoVQA-like texts and a tiny model factory."""
from __future__ import annotations

import pytest
import torch

from medplib.config.model import ModelConfig
from medplib.model import MedPLIB, MedTokenizer

TEXTS = [
    "<image>\nSegment the liver.", "It is the liver. <SEG>", "<image>\nWhat is in <region></region>?",
    "It is the kidney.", "<image>\nIs this a CT image?", "yes", "no", "A CT image showing liver and kidney.",
    "What modality is this image?", "This is a MRI image.", "How many structures are visible?", "two.",
] * 4


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture(scope="session")
def tokenizer(tiny_config: ModelConfig) -> MedTokenizer:
    return MedTokenizer.train(TEXTS, tiny_config.llm.vocab_size, tiny_config.vision.num_patches)


@pytest.fixture
def tiny_model(tiny_config: ModelConfig, tokenizer: MedTokenizer) -> MedPLIB:
    torch.manual_seed(0)
    return MedPLIB(tiny_config, tokenizer).eval()


def conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
