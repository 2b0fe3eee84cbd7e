"""LoRA through peft, injected in place (module paths stay as they are), merged back before a stage saves."""
from __future__ import annotations

import fnmatch

import torch.nn as nn

from medplib.config.stages import LoraSpec


def apply_lora(llm: nn.Module, spec: LoraSpec) -> nn.Module:
    """Add LoRA adapters to the LLM's linear layers named in `spec.targets` (q_proj, …, down_proj)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.targets), bias="none")
    return inject_adapter_in_model(config, llm)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the plain layer back; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in targets:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return len(targets)


def set_trainable(model: nn.Module, patterns: tuple[str, ...]) -> dict[str, int]:
    """Train LoRA adapters and the parameters whose names match `patterns`; freeze the rest."""
    trainable = frozen = 0
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    if trainable == 0:
        raise ValueError(f"No parameter matches {list(patterns)} and there is no LoRA adapter: nothing would train")
    return {"trainable": trainable, "frozen": frozen}
