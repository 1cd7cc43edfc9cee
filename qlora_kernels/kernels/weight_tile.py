"""Decoding one (BLOCK_N, BLOCK_K) tile of a packed weight in registers, shared by every kernel.

All arithmetic is fp32 (the same operations, in the same order, as the PyTorch reference in
`qlora_kernels.formats.reference`, so a stored tile is bit-identical to the reference).
Invariant: for int4 and NF4, BLOCK_K divides the group size, so a tile row has one scale.

NF4 codes decode in registers (`_nf4_level`: a select tree on the 4 code bits over the 16
levels as fp32 immediates), not by a gather from a level table in global memory. The gather
cost one 64-bit address and one load per decoded element; with it the fused forward spilled
at 32 elements per thread (255 registers) and so NF4 could not use 128-bit packed loads
(kernel_report, triton 3.9: nf4/g64 forward ld:64, 238 regs on sm_80 / 215 on sm_90 at 16
elements per thread). With the select tree: ld:128 on every NF4 forward config, 128-174
registers (237 for M16-O128-R32-w4 on sm_90), no spills up to 64 elements per thread; the
dequant kernel's NF4 tile went from 77 to 40 (sm_80) / 48 (sm_90) registers. It gives the
same fp32 values bit for bit (each level is an exact fp32 constant), so stored tiles still
equal the reference (tests/test_kernels_dequant.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..formats import FORMAT_IDS, NF4_LEVELS
from ..formats import NESTED_BLOCK as _NESTED_BLOCK

# Format ids (formats.FORMAT_IDS), used as tl.constexpr FORMAT values.
INT8: tl.constexpr = tl.constexpr(FORMAT_IDS["int8"])
INT4: tl.constexpr = tl.constexpr(FORMAT_IDS["int4"])
NF4: tl.constexpr = tl.constexpr(FORMAT_IDS["nf4"])
NESTED_BLOCK: tl.constexpr = tl.constexpr(_NESTED_BLOCK)

# The NF4 levels as fp32 constexprs (NF4_LEVELS holds exact fp32 values, so nothing rounds).
_NF4_0: tl.constexpr = tl.constexpr(NF4_LEVELS[0])
_NF4_1: tl.constexpr = tl.constexpr(NF4_LEVELS[1])
_NF4_2: tl.constexpr = tl.constexpr(NF4_LEVELS[2])
_NF4_3: tl.constexpr = tl.constexpr(NF4_LEVELS[3])
_NF4_4: tl.constexpr = tl.constexpr(NF4_LEVELS[4])
_NF4_5: tl.constexpr = tl.constexpr(NF4_LEVELS[5])
_NF4_6: tl.constexpr = tl.constexpr(NF4_LEVELS[6])
_NF4_7: tl.constexpr = tl.constexpr(NF4_LEVELS[7])
_NF4_8: tl.constexpr = tl.constexpr(NF4_LEVELS[8])
_NF4_9: tl.constexpr = tl.constexpr(NF4_LEVELS[9])
_NF4_10: tl.constexpr = tl.constexpr(NF4_LEVELS[10])
_NF4_11: tl.constexpr = tl.constexpr(NF4_LEVELS[11])
_NF4_12: tl.constexpr = tl.constexpr(NF4_LEVELS[12])
_NF4_13: tl.constexpr = tl.constexpr(NF4_LEVELS[13])
_NF4_14: tl.constexpr = tl.constexpr(NF4_LEVELS[14])
_NF4_15: tl.constexpr = tl.constexpr(NF4_LEVELS[15])


@triton.jit
def _nf4_level(q):
    """NF4_LEVELS[q] (fp32) for int32 codes 0..15: a 15-select tree on the code bits, low bit first.

    Each level of the tree halves the candidates; ptxas turns it into predicated selects on
    immediates, no memory access and no per-element address registers.
    """
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    l01 = tl.where(b0, _NF4_1, _NF4_0)
    l23 = tl.where(b0, _NF4_3, _NF4_2)
    l45 = tl.where(b0, _NF4_5, _NF4_4)
    l67 = tl.where(b0, _NF4_7, _NF4_6)
    l89 = tl.where(b0, _NF4_9, _NF4_8)
    lab = tl.where(b0, _NF4_11, _NF4_10)
    lcd = tl.where(b0, _NF4_13, _NF4_12)
    lef = tl.where(b0, _NF4_15, _NF4_14)
    l03 = tl.where(b1, l23, l01)
    l47 = tl.where(b1, l67, l45)
    l8b = tl.where(b1, lab, l89)
    lcf = tl.where(b1, lef, lcd)
    l07 = tl.where(b2, l47, l03)
    l8f = tl.where(b2, lcf, l8b)
    return tl.where(b3, l8f, l07).to(tl.float32)


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
            w = _nf4_level(q) * absmax[:, None]
    return w
