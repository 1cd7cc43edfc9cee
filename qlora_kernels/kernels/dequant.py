"""Triton dequantization of a whole `QuantizedTensor` into a dense buffer.

Used directly by ``qt.dequantize(backend="triton")`` and by the large-M matmul path, which
decodes into a reused bf16 buffer and then calls cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import FORMAT_IDS, QuantizedTensor, dynamic_table
from ._runtime import check_launchable, device_key
from .weight_tile import load_weight_tile

# Tile of the dequant kernel: at least 64 rows x up to 128 columns (a 64-byte packed run per
# row), and enough rows that each of its 128 threads loads 16 packed bytes (a 128-bit load):
# a group-32 tile (16 bytes per row) takes 128 rows.
DEQUANT_BLOCK_N = 64
DEQUANT_MAX_BLOCK_K = 128
DEQUANT_WARPS = 4
DEQUANT_BYTES_PER_THREAD = 16


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


#: The 256-level dynamic code that decodes NF4's double-quantized scales, one copy per device:
#: built on the CPU and copied to the device once, not on every launch.
_NESTED_TABLES: dict[torch.device, torch.Tensor] = {}


def nested_table(device: torch.device) -> torch.Tensor:
    """The dynamic code table on `device` (cached per device)."""
    key = device_key(device)
    table = _NESTED_TABLES.get(key)
    if table is None:
        table = dynamic_table(key)
        _NESTED_TABLES[key] = table
    return table


def weight_kernel_args(qt: QuantizedTensor) -> tuple:
    """The pointer arguments every kernel takes for `qt`, with placeholders for absent fields."""
    placeholder = qt.scales
    return (
        qt.data,
        qt.scales,
        qt.mins if qt.mins is not None else placeholder,
        qt.absmax_scales if qt.absmax_scales is not None else placeholder,
        qt.absmax_offset if qt.absmax_offset is not None else placeholder,
        nested_table(qt.device),
    )


def weight_meta(qt: QuantizedTensor) -> dict:
    """The constexpr meta-parameters describing `qt`'s format."""
    return {
        "FORMAT": FORMAT_IDS[qt.format],
        "GROUP": qt.group_size if qt.format != "int8" else 1,
        "SYMMETRIC": qt.symmetric,
        "DOUBLE_QUANT": qt.double_quant,
    }


def dequant_tile(fmt: str, group_size: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the dequant kernel for a format and group size (int8: any group)."""
    block_k = DEQUANT_MAX_BLOCK_K if fmt == "int8" else min(DEQUANT_MAX_BLOCK_K, group_size)
    row_bytes = block_k if fmt == "int8" else block_k // 2
    rows_needed = DEQUANT_BYTES_PER_THREAD * 32 * DEQUANT_WARPS // row_bytes
    return max(DEQUANT_BLOCK_N, rows_needed), block_k


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
    block_n, block_k = dequant_tile(qt.format, qt.group_size)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        *weight_kernel_args(qt),
        out,
        n,
        k,
        qt.data.stride(0),
        scales_row_stride(qt),
        out.stride(0),
        **weight_meta(qt),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=DEQUANT_WARPS,
        # No fused multiply-adds: NF4's double-quantized absmax (code * scale + offset) must round
        # twice, as the PyTorch reference does, for the decoded tile to equal it bit for bit
        # (ptxas's FMA differed in the last fp32 bit on an H200).
        enable_fp_fusion=False,
    )
    return out
