"""pytest-benchmark view of the layer suite: `pytest benchmarks/test_bench_layers.py --benchmark-only`.

Groups by case, so pytest-benchmark's table compares providers measured in the same run.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.layers import PROVIDERS, LayerCase

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [LayerCase(576, 1536, m, "nf4", mode) for m in (1, 16, 256) for mode in ("fwd", "fwd+bwd")]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "_"))
def test_layer(benchmark, case, provider):
    built = PROVIDERS[provider](case, DEVICE)
    if built is None:
        pytest.skip(f"{provider} is not installed (peers extra)")
    fn, _ = built
    benchmark.group = case.name
    benchmark(fn)
