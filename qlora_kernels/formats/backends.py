"""Which implementation decodes a `QuantizedTensor`: a small registry, filled from above.

The formats layer knows only its own pure-PyTorch reference; the kernel and native layers
register themselves here (see `qlora_kernels.ops.dequant`), so data still flows one way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .reference import dequantize_reference
from .tensor import QuantizedTensor

Dequantizer = Callable[[QuantizedTensor, torch.dtype], torch.Tensor]
_BACKENDS: dict[str, Dequantizer] = {"torch": dequantize_reference}
_AUTO: list[Callable[[QuantizedTensor], str]] = []
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def register_dequant_backend(name: str, fn: Dequantizer) -> None:
    """Make `fn` available as ``qt.dequantize(..., backend=name)``."""
    _BACKENDS[name] = fn


def set_auto_policy(policy: Callable[[QuantizedTensor], str]) -> None:
    """Install the function that names the backend ``backend="auto"`` uses for a tensor."""
    _AUTO[:] = [policy]


def available_dequant_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def dequantize_with(qt: QuantizedTensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dequantize: dtype must be one of {OUTPUT_DTYPES}, got {dtype}")
    if backend == "auto":
        backend = _AUTO[0](qt) if _AUTO else "torch"
    if backend not in _BACKENDS:
        known = ", ".join(("auto", *_BACKENDS))
        raise ValueError(f"dequantize: unknown or unavailable backend {backend!r}; choose one of: {known}")
    return _BACKENDS[backend](qt, dtype)
