"""Assertions shared by the tests."""

from __future__ import annotations

import torch

#: Relative error (by norm) allowed for a kernel vs the fp32 reference, by the output dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close_by_norm(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> float:
    """||actual - expected|| / ||expected|| <= rel, finite wherever expected is; returns the error."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.double()
    e = expected.double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(e)), f"{what}: NaN/inf pattern differs"
    err = ((a - e).norm() / e.norm().clamp(min=1e-30)).item()
    if err > rel:
        worst = (a - e).abs().flatten().argmax().item()
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {rel:.1e}; worst at {idx}: {a[idx].item()} vs {e[idx].item()}"
        )
    return err


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A buffer full of NaN, so any element a kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
