"""Fixed code tables of the 4-bit NormalFloat format and of the 8-bit dynamic format.

NF4 (QLoRA, Dettmers et al. 2023) maps a 4-bit code to one of 16 quantiles of N(0, 1),
normalised to [-1, 1]; the values are the ones bitsandbytes ships, so that our codes and
theirs are interchangeable. The 8-bit dynamic code (Dettmers 2015) quantizes NF4's
block absmax values in double quantization.
"""

from __future__ import annotations

import functools

import torch

# The 16 NF4 levels, ascending; code i decodes to NF4_LEVELS[i].
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@functools.cache
def _nf4_table_cpu() -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)


def nf4_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels as an fp32 tensor on `device`."""
    return _nf4_table_cpu().to(device)


@functools.cache
def _dynamic_table_cpu() -> torch.Tensor:
    # Signed dynamic tree code with 7 exponent bits: for exponent step i (0..6) the
    # fraction splits [0.1, 1] into 2**i equal bins; each bin's midpoint, scaled by
    # 10**(i - 6), becomes a positive and a negative level. With 0 and 1 this gives
    # 2 * (2**7 - 1) + 2 = 256 levels, sorted ascending.
    levels: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        magnitude = 10 ** (i - 6)
        # The products are rounded in fp32, as the reference table is.
        levels.extend((magnitude * midpoints).tolist())
        levels.extend((-magnitude * midpoints).tolist())
    levels.extend([0.0, 1.0])
    levels.sort()
    return torch.tensor(levels, dtype=torch.float32)


def dynamic_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 levels of the signed 8-bit dynamic code as an fp32 tensor on `device`."""
    return _dynamic_table_cpu().to(device)


def nearest_code(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of the ascending `table` for each value of `scaled`.

    Ties go to the lower level, which is what a search over the midpoints gives.
    """
    midpoints = (table[:-1] + table[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8)
