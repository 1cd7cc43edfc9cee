"""Dequantization backends beyond the reference: Triton (CUDA or interpreter) and native C++."""

from __future__ import annotations

import torch

from ..formats import QuantizedTensor, register_dequant_backend, set_auto_policy
from .native import dequantize_native, native_available


def _dequantize_triton(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    from ..kernels.dequant import dequantize_triton

    return dequantize_triton(qt, dtype)


def _auto_backend(qt: QuantizedTensor) -> str:
    """Triton on CUDA; on the CPU the C++ extension when it is built, else the reference."""
    if qt.device.type == "cuda":
        return "triton"
    if qt.device.type == "cpu" and native_available():
        return "native"
    return "torch"


register_dequant_backend("triton", _dequantize_triton)
register_dequant_backend("native", dequantize_native)
set_auto_policy(_auto_backend)
