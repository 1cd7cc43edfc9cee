"""Triton dequantization of a whole `QuantizedTensor` into a dense buffer.

Used directly by ``qt.dequantize(backend="triton")`` and by the large-M matmul path, which
decodes into a reused bf16 buffer and then calls cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import QuantizedTensor, dynamic_table
from ._runtime import TORCH_TO_FORMAT_ID, check_launchable
from .weight_tile import load_weight_tile

# Tile of the dequant kernel: 64 rows x up to 128 columns (one 64-byte packed run per row).
DEQUANT_BLOCK_N = 64
DEQUANT_MAX_BLOCK_K = 128


@triton.jit
def _dequant_kernel(
    # pointers
    data_ptr,
    scales_ptr,
    mins_ptr,
    absmax_scales_ptr,
    absmax_offset_ptr,
    nested_table_ptr,
    out_ptr,
    # sizes and strides
    N,
    K,
    stride_data_n,
    stride_scales_n,
    stride_out_n,
    # meta-parameters
    FORMAT: tl.constexpr,
    GROUP: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = load_weight_tile(
        data_ptr,
        scales_ptr,
        mins_ptr,
        absmax_scales_ptr,
        absmax_offset_ptr,
        nested_table_ptr,
        offs_n,
        k0,
        N,
        K,
        stride_data_n,
        stride_scales_n,
        FORMAT,
        GROUP,
        SYMMETRIC,
        DOUBLE_QUANT,
        BLOCK_N,
        BLOCK_K,
    )
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    out_offs = offs_n.to(tl.int64)[:, None] * stride_out_n + offs_k[None, :]
    tl.store(out_ptr + out_offs, w.to(out_ptr.dtype.element_ty), mask=mask)


def weight_kernel_args(qt: QuantizedTensor) -> tuple:
    """The pointer arguments every kernel takes for `qt`, with placeholders for absent fields."""
    placeholder = qt.scales
    nested_table = dynamic_table(qt.device)
    return (
        qt.data,
        qt.scales,
        qt.mins if qt.mins is not None else placeholder,
        qt.absmax_scales if qt.absmax_scales is not None else placeholder,
        qt.absmax_offset if qt.absmax_offset is not None else placeholder,
        nested_table,
    )


def weight_meta(qt: QuantizedTensor) -> dict:
    """The constexpr meta-parameters describing `qt`'s format."""
    return {
        "FORMAT": TORCH_TO_FORMAT_ID[qt.format],
        "GROUP": qt.group_size if qt.format != "int8" else 1,
        "SYMMETRIC": qt.symmetric,
        "DOUBLE_QUANT": qt.double_quant,
    }


def max_block_k(qt: QuantizedTensor, limit: int) -> int:
    """Largest K-tile that keeps one scale per tile row (the `load_weight_tile` invariant)."""
    return limit if qt.format == "int8" else min(limit, qt.group_size)


def scales_row_stride(qt: QuantizedTensor) -> int:
    return qt.scales.stride(0) if qt.format == "int4" else 0


def dequantize_triton(
    qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode `qt` into `out` (allocated if None; shape (N, K), row-major) with one kernel launch."""
    check_launchable(qt.data, op="dequantize_triton")
    n, k = qt.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=qt.device)
    elif out.shape != (n, k) or out.stride(1) != 1 or out.device != qt.device:
        raise ValueError(f"dequantize_triton: out must be a row-major ({n}, {k}) tensor on {qt.device}")
    block_k = max_block_k(qt, DEQUANT_MAX_BLOCK_K)
    grid = (triton.cdiv(n, DEQUANT_BLOCK_N), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        *weight_kernel_args(qt),
        out,
        n,
        k,
        qt.data.stride(0),
        scales_row_stride(qt),
        out.stride(0),
        **weight_meta(qt),
        BLOCK_N=DEQUANT_BLOCK_N,
        BLOCK_K=block_k,
    )
    return out
