"""Two 4-bit codes per byte, along the last dimension.

Element 2j goes into the high nibble and element 2j+1 into the low nibble of byte j, the
order bitsandbytes uses, so a row of K codes becomes K/2 contiguous bytes: a kernel's
K-tile of packed weight is one contiguous, vector-width load.
"""

from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 15] of shape (..., K), K even, into (..., K/2) bytes."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (..., K/2) bytes to (..., K) uint8 codes."""
    high = packed >> 4
    low = packed & 0xF
    return torch.stack((high, low), dim=-1).flatten(-2)
