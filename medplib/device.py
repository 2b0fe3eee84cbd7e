"""Where a model runs: `--device auto|cpu|cuda[:N]` resolved to a torch device and the dtype it computes in, and
batches moved there in the dtypes of the modules that read them.

On a GPU a model runs in bf16 (as MedPLIB trains and infers); on a CPU in fp32. Inputs follow the modules: after a
model is cast to bf16 (DeepSpeed's bf16 does it to the whole model), fp32 pixels would not pass SAM's encoder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the command line checks --device's spelling (`device_name`) while it
# parses, and a command that never loads a model does not pay for importing torch.
DEVICE_HELP = ("where the model runs: auto (a CUDA GPU when one is visible, else the CPU), cpu (fp32), cuda or "
               "cuda:N (bf16) (default: auto)")
_CUDA = re.compile(r"cuda(?::(\d+))?")


@dataclass(frozen=True)
class Placement:
    """A device and the floating dtype a model's weights take there."""

    device: torch.device
    dtype: torch.dtype

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` moved to the device and cast to the dtype (in place, as `Module.to`); returned for chaining."""
        return model.to(device=self.device, dtype=self.dtype)

    def __str__(self) -> str:
        return f"{self.device} ({str(self.dtype).removeprefix('torch.')})"


def device_name(value: str) -> str:
    """`--device`'s argparse type: the spelling is checked when the command line is read, the GPU when it runs."""
    name = value.strip().lower()
    if name not in ("auto", "cpu") and not _CUDA.fullmatch(name):
        raise ValueError(f"device {value!r}: use auto, cpu, cuda or cuda:N")
    return name


def resolve_device(name: str = "auto") -> Placement:
    """`auto`: the first CUDA GPU when one is visible, else the CPU; a GPU computes in bf16, the CPU in fp32."""
    import torch

    name = device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return Placement(torch.device("cpu"), torch.float32)
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to this process (torch.cuda.is_available() is "
                         "False); use --device cpu, or auto")
    index = int(_CUDA.fullmatch(name).group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this process sees {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    return Placement(torch.device("cuda", index), torch.bfloat16)


def model_device(model: Any) -> torch.device:
    """The device a DeepSpeed engine (`engine.device`) or a plain module (its parameters') computes on."""
    import torch

    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def to_device(batch: Any, device: torch.device | str, dtype_for: Mapping[str, torch.dtype] | None = None,
              key: str | None = None) -> Any:
    """A batch (dicts, lists and tuples of tensors, nested) with every tensor on `device`. A floating tensor under a
    key of `dtype_for` is cast to that dtype (the dtype of the module that reads it); the others keep theirs (ids,
    masks and targets). What is not a tensor (records) is returned as is."""
    import torch

    if torch.is_tensor(batch):
        dtype = (dtype_for or {}).get(key) if batch.is_floating_point() else None
        return batch.to(device=device, dtype=dtype)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, dtype_for, k) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(torch.is_tensor(v) for v in batch):
        return type(batch)(to_device(v, device, dtype_for, key) for v in batch)
    return batch
