"""Dequantization backends beyond the reference: Triton (CUDA or interpreter) and native C++."""

from __future__ import annotations

import torch

from ..formats import QuantizedTensor, register_dequant_backend, set_auto_policy


def _dequantize_triton(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    from ..kernels.dequant import dequantize_triton

    return dequantize_triton(qt, dtype)


def _auto_backend(qt: QuantizedTensor) -> str:
    return "triton" if qt.device.type == "cuda" else "torch"


register_dequant_backend("triton", _dequantize_triton)
set_auto_policy(_auto_backend)
