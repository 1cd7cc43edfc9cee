"""Dequantization backends beyond the reference: Triton (CUDA or interpreter) and native C++.

Each says where ``backend="auto"`` should prefer it; the policy itself is
`qlora_kernels.formats.backends.auto_backend`.
"""

from __future__ import annotations

import torch

from ..formats import QuantizedTensor, register_dequant_backend
from . import native


def _dequantize_triton(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    from ..kernels.dequant import dequantize_triton

    return dequantize_triton(qt, dtype)


def _triton_auto_on(device: torch.device) -> bool:
    return device.type == "cuda"


def _native_auto_on(device: torch.device) -> bool:
    return device.type == "cpu" and native.native_available()


register_dequant_backend("triton", _dequantize_triton, auto_on=_triton_auto_on)
register_dequant_backend("native", native.dequantize_native, auto_on=_native_auto_on)
