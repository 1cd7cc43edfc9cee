"""Fixes for two bf16 bugs of Triton 3.9's CPU interpreter, installed by the test harness only.

1. ``tl.dot`` on bf16 operands hands numpy the raw uint16 storage, so the product is garbage
   (triton #11584). We convert bf16 operands to fp32 before the matmul.
2. Casting fp32 -> bf16 truncates instead of rounding to nearest even as the GPU does, so a
   kernel's bf16 output differs from PyTorch's ``.to(torch.bfloat16)`` in the last bit.

The GPU kernels are never changed for these: only the interpreter is patched.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

_original_create_dot = interpreter.InterpreterBuilder.create_dot
_original_cast_impl = interpreter.InterpreterBuilder.cast_impl


def _bf16_to_fp32(data: np.ndarray) -> np.ndarray:
    return interpreter._convert_float(data, tl.bfloat16, tl.float32, None).view(np.float32)


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
        a_data = _bf16_to_fp32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data
        b_data = _bf16_to_fp32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data
        out = np.matmul(a_data.astype(np.float32), b_data.astype(np.float32)).astype(d.data.dtype) + d.data
        return interpreter.TensorHandle(out, d.dtype.scalar)
    return _original_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


def _fp32_to_bf16_bits(data: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16, as uint16 storage (NaN stays NaN)."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(data), np.uint16(0x7FC0), rounded).astype(np.uint16)


def _cast_impl(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        return interpreter.TensorHandle(_fp32_to_bf16_bits(src.data), dst_type.scalar)
    return _original_cast_impl(self, src, dst_type)


def install() -> None:
    """Patch the interpreter (idempotent)."""
    interpreter.InterpreterBuilder.create_dot = _create_dot
    interpreter.InterpreterBuilder.cast_impl = _cast_impl


def uninstall() -> None:
    """Restore the interpreter's own behaviour (used by the test proving the fix is needed)."""
    interpreter.InterpreterBuilder.create_dot = _original_create_dot
    interpreter.InterpreterBuilder.cast_impl = _original_cast_impl
