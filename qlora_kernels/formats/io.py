"""safetensors files for quantized weights, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .tensor import QuantizedTensor


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` to `path` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_quantized(qt: QuantizedTensor, path: str | Path) -> None:
    atomic_save_safetensors(qt.state_dict(), path, metadata={"format": qt.format, "library": "qlora-kernels"})


def load_quantized(path: str | Path, device: torch.device | str = "cpu") -> QuantizedTensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized weight file at {path}")
    return QuantizedTensor.from_state_dict(load_file(str(path), device=str(device)))
