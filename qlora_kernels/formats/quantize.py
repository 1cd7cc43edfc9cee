"""`quantize()`: the one entry point from a dense weight to a `QuantizedTensor`."""

from __future__ import annotations

import torch

from .reference import quantize_int4, quantize_int8, quantize_nf4
from .tensor import FORMATS, QuantizedTensor

#: Group sizes the kernels are tuned for (powers of two, so a group is a whole number of K-tiles).
GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = {"int4": 64, "nf4": 64}
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weight(weight: torch.Tensor) -> None:
    """Raise a clear TypeError/ValueError unless `weight` is a finite, non-empty 2-D float matrix."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in WEIGHT_DTYPES:
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
    """The group size to use for `fmt`, checked against K (= in_features)."""
    if fmt == "int8":
        if group_size not in (None, in_features):
            raise ValueError(
                f"int8 uses one scale per output row; group_size={group_size} does not apply (pass group_size=None)"
            )
        return in_features
    if group_size is None:
        # Default: the format's usual group, or the largest smaller one that divides K.
        fitting = [g for g in GROUP_SIZES if g <= DEFAULT_GROUP_SIZE[fmt] and in_features % g == 0]
        group = fitting[-1] if fitting else DEFAULT_GROUP_SIZE[fmt]
    else:
        group = group_size
    if group not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} for {fmt}, got {group_size}")
    if in_features % group:
        fitting = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"use group_size in {fitting}" if fitting else "pad K to a multiple of 32 or use int8"
        raise ValueError(f"group_size={group} does not divide in_features K={in_features} for {fmt}: {hint}")
    return group


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
    when 64 does not divide K);
    ignored for int8 (one scale per row). symmetric: int4 without zero point.
    double_quant: NF4 absmax values stored as 8-bit codes (QLoRA's double quantization).
    """
    if format not in FORMATS:
        raise ValueError(f"unsupported format {format!r}; choose one of {FORMATS}")
    check_weight(weight)
    group = resolve_group_size(format, group_size, weight.shape[1])
    with torch.no_grad():
        if format == "int8":
            return quantize_int8(weight)
        if format == "int4":
            return quantize_int4(weight, group, symmetric=symmetric)
        if symmetric:
            raise ValueError("symmetric=True applies to int4 only; NF4 is symmetric by construction")
        return quantize_nf4(weight, group, double_quant=double_quant)
