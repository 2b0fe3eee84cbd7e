"""Faults (issue 9): a corrupted data file or checkpoint is detected by its SHA-256 before anything uses it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medplib.config import RunContext, load_config
from medplib.data.ingest import DataIntegrityError, ingest, verify_data


@pytest.fixture
def ingested(home, project):
    ingest("synth", project, home, load_config("tiny", {"data": {"synth_n": 12}}))
    return home, project, project / "data"


def _flip_one_byte(path: Path, at: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_intact_data_verifies_every_listed_file(ingested):
    _, _, data = ingested
    listed = json.loads((data / "manifest.json").read_text())["files"]
    assert "records.jsonl" in listed and any(k.startswith("images/") for k in listed)
    assert verify_data(data) == len(listed)


@pytest.mark.parametrize("target", ["image", "records.jsonl"])
def test_a_corrupted_data_file_stops_training_before_it_starts(ingested, target):
    from medplib.train.runner import train_stage

    home, project, data = ingested
    path = sorted((data / "images").glob("*.png"))[0] if target == "image" else data / "records.jsonl"
    _flip_one_byte(path)
    with pytest.raises(DataIntegrityError, match=rf"{path.name} is corrupted: its SHA-256 is .* recorded"):
        train_stage(1, RunContext.resolve("tiny", home=home, project=project), workers=1, max_steps=1, track=False)


def test_a_missing_data_file_and_a_missing_manifest_are_named(ingested):
    _, _, data = ingested
    mask = sorted((data / "masks").glob("*.png"))[0]
    mask.unlink()
    with pytest.raises(DataIntegrityError, match=rf"{mask.name} is listed in .*manifest.json but missing"):
        verify_data(data)
    (data / "manifest.json").unlink()
    with pytest.raises(DataIntegrityError, match="manifest.json does not exist"):
        verify_data(data)


def test_a_corrupted_checkpoint_is_refused_before_loading(tmp_path: Path):
    from medplib.config.model import ModelConfig
    from medplib.model import MedPLIB
    from medplib.model.loaders import build_model
    from medplib.model.tokenizer import MedTokenizer

    cfg = ModelConfig.tiny()
    tok = MedTokenizer.train(["Segment the liver.", "It is the liver."] * 20, cfg.llm.vocab_size,
                             cfg.vision.num_patches)
    folder = build_model(cfg, tok).save_pretrained(tmp_path / "stage")
    assert set(json.loads((folder / "checksums.json").read_text())) == {"config.json", "model.safetensors"}
    MedPLIB.from_pretrained(folder)  # intact: loads
    _flip_one_byte(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors is corrupted: its SHA-256 is .* recorded"):
        MedPLIB.from_pretrained(folder)
