"""Pure-PyTorch quantization and dequantization: the CPU path and the oracle of the tests.

Every computation is in fp32; the result is cast to the requested dtype at the end, so a
kernel that does the same fp32 arithmetic produces bit-identical output. The encoders return
the stored tensors by field name (`quantize` wraps them in a `QuantizedTensor`); the decoders
read a `QuantizedTensor`'s fields. Neither imports the class, so this module sits below it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .codebooks import dynamic_table, nearest_code, nf4_table
from .layout import NESTED_BLOCK
from .packing import pack_nibbles, unpack_nibbles

if TYPE_CHECKING:
    from .tensor import QuantizedTensor

Fields = dict[str, torch.Tensor]

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest fp16 subnormal: keeps a group's scale above zero


def _to_fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=_FP16_TINY).to(torch.float16)


# ----------------------------------------------------------------------------- int8
def encode_int8(weight: torch.Tensor) -> Fields:
    """Symmetric int8, one fp32 scale per output row: q = round(w / s), s = absmax / 127."""
    w = weight.float()
    absmax = w.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return {"data": codes, "scales": scales}


def dequantize_int8(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    return (qt.data.float() * qt.scales[:, None]).to(dtype)


# ----------------------------------------------------------------------------- int4
def encode_int4(weight: torch.Tensor, group_size: int, symmetric: bool = False) -> Fields:
    """Group-wise int4 along K.

    Affine: s = (max - min) / 15 and m = min per group (both fp16), q = round((w - m) / s),
    so the group's minimum and maximum decode exactly to codes 0 and 15.
    Symmetric: s = absmax / 7, q = round(w / s) + 8 in [0, 15], decoded as (q - 8) * s.
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    if w.abs().max() > _FP16_MAX:
        raise ValueError("int4 stores fp16 scales: weights beyond +-65504 cannot be represented; use int8")
    if symmetric:
        scales = _to_fp16_scale(w.abs().amax(dim=2) / 7.0)
        s = scales.float()[..., None]
        codes = (torch.round(w / s).clamp(-8, 7) + 8).to(torch.uint8)
        return {"data": pack_nibbles(codes.reshape(n, k)), "scales": scales}
    lo = w.amin(dim=2)
    hi = w.amax(dim=2)
    mins = lo.to(torch.float16)
    scales = _to_fp16_scale((hi - mins.float()) / 15.0)
    codes = torch.round((w - mins.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    return {"data": pack_nibbles(codes.reshape(n, k)), "scales": scales, "mins": mins}


def dequantize_int4(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = qt.shape
    g = qt.group_size
    q = unpack_nibbles(qt.data).float().reshape(n, k // g, g)
    s = qt.scales.float()[..., None]
    if qt.symmetric:
        w = (q - 8.0) * s
    else:
        w = q * s + qt.mins.float()[..., None]
    return w.reshape(n, k).to(dtype)


# ------------------------------------------------------------------------------ nf4
def blockwise_absmax_codes(values: torch.Tensor, block: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of a flat fp32 tensor against an ascending code table.

    Returns (codes uint8, absmax fp32 per block); the last block may be partial.
    """
    n = values.numel()
    n_blocks = math.ceil(n / block)
    padded = torch.nn.functional.pad(values, (0, n_blocks * block - n)).reshape(n_blocks, block)
    absmax = padded.abs().amax(dim=1)
    # Multiply by the reciprocal (not divide): the rounding bitsandbytes uses, so codes match.
    inverse = 1.0 / absmax.clamp(min=1e-38)
    scaled = (padded * inverse[:, None]).clamp(-1, 1).reshape(-1)[:n]
    return nearest_code(scaled, table), absmax


def _mean_without_overflow(values: torch.Tensor) -> torch.Tensor:
    """The fp32 mean of non-negative fp32 `values`, as bitsandbytes computes it, unless the fp32
    sum overflows (values near the fp32 limit): then the mean is taken in fp64."""
    mean = values.mean()
    if not torch.isfinite(mean):
        mean = values.double().mean().float()
    return mean


def encode_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> Fields:
    """QLoRA NF4: absmax per block of `block_size` of the flattened weight, nearest NF4 level.

    With double quantization, the absmax values minus their mean are quantized to the 8-bit
    dynamic code in blocks of NESTED_BLOCK, each with an fp32 scale.
    """
    n, k = weight.shape
    flat = weight.float().reshape(-1)
    codes, absmax = blockwise_absmax_codes(flat, block_size, nf4_table(flat.device))
    data = pack_nibbles(codes.reshape(n, k))
    if not double_quant:
        return {"data": data, "scales": absmax}
    offset = _mean_without_overflow(absmax)
    absmax_codes, absmax_scales = blockwise_absmax_codes(absmax - offset, NESTED_BLOCK, dynamic_table(flat.device))
    fields = {"data": data, "scales": absmax_codes, "absmax_scales": absmax_scales, "absmax_offset": offset.reshape(1)}
    if not torch.isfinite(decode_nested_absmax(absmax_codes, absmax_scales, offset)).all():
        raise ValueError(
            f"NF4 double quantization overflows fp32 for this weight (max |w| = {absmax.max().item():.3g}): "
            "pass double_quant=False"
        )
    return fields


def decode_nested_absmax(codes: torch.Tensor, absmax_scales: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The fp32 absmax of every NF4 block from its double-quantized form."""
    nested = dynamic_table(codes.device)[codes.long()]
    block_scale = absmax_scales.repeat_interleave(NESTED_BLOCK)[: nested.numel()]
    return nested * block_scale + offset


def nf4_absmax(qt: QuantizedTensor) -> torch.Tensor:
    """The fp32 absmax of every NF4 block, decoding the double quantization if present."""
    if not qt.double_quant:
        return qt.scales
    return decode_nested_absmax(qt.scales, qt.absmax_scales, qt.absmax_offset)


def dequantize_nf4(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = qt.shape
    levels = nf4_table(qt.device)[unpack_nibbles(qt.data).long()]
    w = levels.reshape(-1, qt.group_size) * nf4_absmax(qt)[:, None]
    return w.reshape(n, k).to(dtype)


# --------------------------------------------------------------------------- any format
DECODERS = {"int8": dequantize_int8, "int4": dequantize_int4, "nf4": dequantize_nf4}


def codes(qt: QuantizedTensor) -> torch.Tensor:
    """The integer codes of any format, unpacked to (N, K) (int8 codes stay int8)."""
    return qt.data if qt.format == "int8" else unpack_nibbles(qt.data)


def dequantize_reference(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode any format with the pure-PyTorch reference."""
    return DECODERS[qt.format](qt, dtype)
