"""Decoding one (BLOCK_N, BLOCK_K) tile of a packed weight in registers, shared by every kernel.

All arithmetic is fp32 (the same operations, in the same order, as the PyTorch reference in
`qlora_kernels.formats.reference`, so a stored tile is bit-identical to the reference).
Invariant: for int4 and NF4, BLOCK_K divides the group size, so a tile row has one scale.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Format ids, used as tl.constexpr FORMAT values.
INT8: tl.constexpr = tl.constexpr(0)
INT4: tl.constexpr = tl.constexpr(1)
NF4: tl.constexpr = tl.constexpr(2)
NESTED_BLOCK: tl.constexpr = tl.constexpr(256)


@triton.jit
def _unpack_nibbles(packed, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K/2) bytes -> (BLOCK_N, BLOCK_K) int32 codes, high nibble first."""
    high = (packed >> 4).to(tl.int32)
    low = (packed & 0xF).to(tl.int32)
    return tl.reshape(tl.join(high, low), (BLOCK_N, BLOCK_K))


@triton.jit
def load_weight_tile(
    data_ptr,
    scales_ptr,
    mins_ptr,
    absmax_scales_ptr,
    absmax_offset_ptr,
    level_table_ptr,
    nested_table_ptr,
    offs_n,
    k0,
    N,
    K,
    stride_data_n,
    stride_scales_n,
    FORMAT: tl.constexpr,
    GROUP: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 W[offs_n, k0:k0+BLOCK_K]; rows >= N and columns >= K decode to 0."""
    mask_n = offs_n < N
    row_data = offs_n.to(tl.int64) * stride_data_n
    if FORMAT == 0:  # int8: one fp32 scale per row
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        q = tl.load(data_ptr + row_data[:, None] + offs_k[None, :], mask=mask, other=0)
        scale = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0)
        w = q.to(tl.float32) * scale[:, None]
    else:
        offs_byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        # K is a multiple of GROUP for 4-bit formats; saying so lets the compiler prove that
        # a row's packed bytes come in GROUP/2-byte runs and emit 128-bit loads.
        k_bytes = (K // GROUP) * (GROUP // 2)
        mask = mask_n[:, None] & (offs_byte < k_bytes)[None, :]
        packed = tl.load(data_ptr + row_data[:, None] + offs_byte[None, :], mask=mask, other=0)
        q = _unpack_nibbles(packed, BLOCK_N, BLOCK_K)
        group = k0 // GROUP
        if FORMAT == 1:  # int4: fp16 scale (and min) per (row, group)
            scale_offs = offs_n.to(tl.int64) * stride_scales_n + group
            scale = tl.load(scales_ptr + scale_offs, mask=mask_n, other=0.0).to(tl.float32)
            if SYMMETRIC:
                w = (q.to(tl.float32) - 8.0) * scale[:, None]
            else:
                low = tl.load(mins_ptr + scale_offs, mask=mask_n, other=0.0).to(tl.float32)
                w = q.to(tl.float32) * scale[:, None] + low[:, None]
        else:  # NF4: absmax per block of the flattened weight, optionally double-quantized
            block = offs_n.to(tl.int64) * (K // GROUP) + group
            if DOUBLE_QUANT:
                code = tl.load(scales_ptr + block, mask=mask_n, other=0).to(tl.int32)
                nested = tl.load(nested_table_ptr + code)
                block_scale = tl.load(absmax_scales_ptr + block // NESTED_BLOCK, mask=mask_n, other=0.0)
                absmax = nested * block_scale + tl.load(absmax_offset_ptr)
            else:
                absmax = tl.load(scales_ptr + block, mask=mask_n, other=0.0)
            level = tl.load(level_table_ptr + q)
            w = level * absmax[:, None]
    return w
