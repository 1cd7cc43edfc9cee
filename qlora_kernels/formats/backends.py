"""Which implementation decodes a `QuantizedTensor`, and the one "auto" policy.

The formats layer ships only its pure-PyTorch reference ("torch"). Layers above add faster
decoders with `register_dequant_backend` (`qlora_kernels.ops.dequant` adds "triton" and
"native"), each saying on which devices ``"auto"`` should prefer it. `auto_backend` is the one
policy that both ``qt.dequantize(backend="auto")`` and ``qlora_linear(backend="auto")`` follow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..common import FLOAT_DTYPES
from .reference import dequantize_reference

if TYPE_CHECKING:
    from .tensor import QuantizedTensor

Dequantizer = Callable[["QuantizedTensor", torch.dtype], torch.Tensor]

#: The backends ``"auto"`` may pick, most preferred first; "torch" runs everywhere and is the fallback.
AUTO_PREFERENCE: tuple[str, ...] = ("triton", "native", "torch")


@dataclass(frozen=True)
class DequantBackend:
    """A decoder and the devices on which ``"auto"`` should pick it."""

    decode: Dequantizer
    auto_on: Callable[[torch.device], bool]


_BACKENDS: dict[str, DequantBackend] = {"torch": DequantBackend(dequantize_reference, lambda device: True)}


def register_dequant_backend(name: str, fn: Dequantizer, auto_on: Callable[[torch.device], bool] | None = None) -> None:
    """Make `fn` available as ``qt.dequantize(..., backend=name)``.

    auto_on(device): whether ``backend="auto"`` should use it for weights on `device` (only for
    the names in AUTO_PREFERENCE; a backend without it is used only when named).
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a dequantize backend needs a non-empty name other than 'auto', got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_dequant_backend: fn must be callable (qt, dtype) -> tensor, got {fn!r}")
    _BACKENDS[name] = DequantBackend(fn, auto_on or (lambda device: False))


def available_dequant_backends() -> tuple[str, ...]:
    """The registered names (``"auto"`` is always accepted too)."""
    return tuple(_BACKENDS)


def auto_backend(device: torch.device) -> str:
    """The backend ``"auto"`` means for tensors on `device`: the first of AUTO_PREFERENCE that
    is registered and wants the device (Triton on CUDA, the C++ extension on the CPU when it is
    built, else the reference)."""
    for name in AUTO_PREFERENCE:
        backend = _BACKENDS.get(name)
        if backend is not None and backend.auto_on(device):
            return name
    return "torch"


def dequantize_with(qt: QuantizedTensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """Decode `qt` to a dense tensor of `dtype` with the named backend (or the ``"auto"`` choice)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    name = auto_backend(qt.device) if backend == "auto" else backend
    if not isinstance(name, str) or name not in _BACKENDS:
        known = ", ".join(("auto", *_BACKENDS))
        raise ValueError(f"dequantize: unknown or unavailable backend {backend!r}; choose one of: {known}")
    return _BACKENDS[name].decode(qt, dtype)
