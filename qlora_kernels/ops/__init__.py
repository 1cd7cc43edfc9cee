"""Autograd functions and backend dispatch (triton | torch reference | native)."""

from . import dequant as _dequant  # noqa: F401  (registers the dequantization backends)
