"""Autograd functions and backend dispatch (triton | torch reference | native)."""

from . import dequant as _dequant  # noqa: F401  (registers the dequantization backends)
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .qlora_linear import QLoRALinearFunction, qlora_linear, qlora_linear_ref, register_qlora_backend

__all__ = [
    "QLoRALinearFunction",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "qlora_linear",
    "qlora_linear_ref",
    "register_qlora_backend",
]
