"""What each format stores: ids, group rules and the shape and dtype of every stored tensor.

The single source of the format metadata: `tensor`, `reference`, `quantize`, the kernels and the
state-dict ``meta`` entry all read it from here. Layouts of a weight W of shape (N, K) (N output
features, K input features), with G the group size:

* ``int8``: ``data`` int8 (N, K); ``scales`` fp32 (N,). W[n, k] = data[n, k] * scales[n].
* ``int4``: ``data`` uint8 (N, K/2), two codes a byte (see `packing`); ``scales`` fp16
  (N, K/G); affine: ``mins`` fp16 (N, K/G), W = q * s + m; symmetric: no ``mins``,
  W = (q - 8) * s.
* ``nf4``: ``data`` uint8 (N, K/2); blocks of G over the row-major flattened W, and
  since G divides K a block never spans two rows. W = NF4_LEVELS[q] * absmax[block].
  ``scales`` holds absmax: fp32 (N*K/G,), or with double quantization uint8 codes of
  the dynamic table, decoded as dynamic[code] * absmax_scales[block // NESTED_BLOCK] + absmax_offset,
  with ``absmax_scales`` fp32 (ceil(N*K/G / NESTED_BLOCK),) and ``absmax_offset`` fp32 (1,).

All layouts keep a K-tile of one row contiguous, so a kernel loads it in one wide load.
"""

from __future__ import annotations

import math

import torch

#: The formats, in the order of their ids (the id is the index: stored in files, passed to kernels).
FORMATS: tuple[str, ...] = ("int8", "int4", "nf4")
FORMAT_IDS: dict[str, int] = {name: i for i, name in enumerate(FORMATS)}
#: Group sizes of int4 / NF4 blocks along K (powers of two, so a group is a whole number of K-tiles).
GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)
#: NF4 absmax values that share one fp32 scale under double quantization.
NESTED_BLOCK = 256

#: (shape, dtype) of one stored tensor.
TensorSpec = tuple[tuple[int, ...], torch.dtype]


def check_group_size(fmt: str, group_size: int, in_features: int) -> None:
    """ValueError unless `group_size` is valid for `fmt` and divides K = `in_features` (int8: G = K)."""
    if fmt == "int8":
        if group_size != in_features:
            raise ValueError(f"int8 has one scale per row, so its group size is K={in_features}, got {group_size}")
        return
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} for {fmt}, got {group_size}")
    if in_features % group_size:
        fitting = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"use group_size in {fitting}" if fitting else "pad K to a multiple of 32 or use int8"
        raise ValueError(f"group_size={group_size} does not divide in_features K={in_features} for {fmt}: {hint}")


def layout(
    fmt: str, shape: tuple[int, int], group_size: int, *, symmetric: bool, double_quant: bool
) -> dict[str, TensorSpec]:
    """The tensors a weight of this format and these options stores, by field name.

    Fields not listed must be absent (None).
    """
    n, k = shape
    g = group_size
    if fmt == "int8":
        return {"data": ((n, k), torch.int8), "scales": ((n,), torch.float32)}
    packed = ((n, k // 2), torch.uint8)
    if fmt == "int4":
        fields = {"data": packed, "scales": ((n, k // g), torch.float16)}
        if not symmetric:
            fields["mins"] = ((n, k // g), torch.float16)
        return fields
    if fmt != "nf4":
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    blocks = n * k // g
    if not double_quant:
        return {"data": packed, "scales": ((blocks,), torch.float32)}
    return {
        "data": packed,
        "scales": ((blocks,), torch.uint8),
        "absmax_scales": ((math.ceil(blocks / NESTED_BLOCK),), torch.float32),
        "absmax_offset": ((1,), torch.float32),
    }
