"""`quantize()`: the one entry point from a dense weight to a `QuantizedTensor`."""

from __future__ import annotations

import torch

from ..common import FLOAT_DTYPES, check_bool, check_int
from .layout import FORMATS, GROUP_SIZES, check_group_size
from .reference import encode_int4, encode_int8, encode_nf4
from .tensor import QuantizedTensor

#: The group used when none is given (or the largest smaller one of GROUP_SIZES that divides K).
DEFAULT_GROUP_SIZE = {"int4": 64, "nf4": 64}


def check_weight(weight: torch.Tensor) -> None:
    """Raise a clear TypeError/ValueError unless `weight` is a finite, non-empty 2-D float matrix."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"weight must be float32, float16 or bfloat16, got {weight.dtype}; convert it first, e.g. weight.float()"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}; "
            "reshape it, e.g. weight.reshape(weight.shape[0], -1)"
        )
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)}): nothing to quantize")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf values: fix the weight before quantizing it")


def resolve_group_size(fmt: str, group_size: int | None, in_features: int) -> int:
    """The group size to use for `fmt` (None: the default), checked against K (= in_features)."""
    if group_size is not None:
        group_size = check_int(group_size, "group_size")
    if fmt == "int8":
        if group_size not in (None, in_features):
            raise ValueError(
                f"int8 uses one scale per output row; group_size={group_size} does not apply (pass group_size=None)"
            )
        return in_features
    if group_size is None:
        fitting = [g for g in GROUP_SIZES if g <= DEFAULT_GROUP_SIZE[fmt] and in_features % g == 0]
        group_size = fitting[-1] if fitting else DEFAULT_GROUP_SIZE[fmt]
    check_group_size(fmt, group_size, in_features)
    return group_size


def quantize(
    weight: torch.Tensor,
    format: str = "nf4",
    group_size: int | None = None,
    *,
    symmetric: bool = False,
    double_quant: bool = True,
) -> QuantizedTensor:
    """Quantize a dense (N, K) weight to ``"int8"``, ``"int4"`` or ``"nf4"``.

    group_size: int4 group / NF4 block along K (32, 64, 128 or 256, dividing K; default 64, or 32
    when 64 does not divide K); ignored for int8 (one scale per row). symmetric: int4 without
    zero point. double_quant: NF4 absmax values stored as 8-bit codes (QLoRA's double quantization).
    """
    if format not in FORMATS:
        raise ValueError(f"unsupported format {format!r}; choose one of {FORMATS}")
    check_bool(symmetric, "symmetric")
    check_bool(double_quant, "double_quant")
    check_weight(weight)
    group = resolve_group_size(format, group_size, weight.shape[1])
    if symmetric and format != "int4":
        raise ValueError(f"symmetric=True applies to int4 only; {format} is symmetric by construction")
    shape = tuple(weight.shape)
    with torch.no_grad():
        if format == "int8":
            return QuantizedTensor("int8", shape, group, **encode_int8(weight))
        if format == "int4":
            return QuantizedTensor("int4", shape, group, symmetric=symmetric, **encode_int4(weight, group, symmetric))
        return QuantizedTensor("nf4", shape, group, **encode_nf4(weight, group, double_quant))
