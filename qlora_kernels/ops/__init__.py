"""Autograd functions and backend dispatch (triton | torch reference | native)."""

from . import dequant as _dequant  # noqa: F401  (registers the dequantization backends)
from .qlora_linear import QLoRALinearFunction, qlora_linear, qlora_linear_ref, register_qlora_backend

__all__ = ["QLoRALinearFunction", "qlora_linear", "qlora_linear_ref", "register_qlora_backend"]
