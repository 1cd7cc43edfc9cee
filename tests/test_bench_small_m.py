"""Fast checks of benchmarks/small_m.py (no timing asserts): target rows, weight rotation, a tiny crossover run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import small_m, suite  # noqa: E402
from qlora_kernels.ops import native  # noqa: E402

BANDWIDTH = {"copy_gb_s": 10.0, "read_gb_s": 8.0, "pct_read_bw": 75.0}
LAYERS = [
    {"threads": 1, "shape": "64x64", "provider": "ours", "ms": 1.0, "gb_s": 6.0, **BANDWIDTH},
    {"threads": 1, "shape": "64x64", "provider": "bf16+lora", "ms": 2.5, "gb_s": 12.0, **BANDWIDTH},
    {"threads": 1, "shape": "64x64", "provider": "bnb+peft", "ms": 2.0, "gb_s": 3.0, **BANDWIDTH},
]
DECODING = [
    {"threads": 1, "model": "qlora nf4", "tokens_s": 30.0, "new_tokens": 8, "prompt_tokens": 20},
    {"threads": 1, "model": "dense bf16", "tokens_s": 20.0, "new_tokens": 8, "prompt_tokens": 20},
]


def test_target_rows_are_summary_rows_with_the_issue_thresholds() -> None:
    rows = small_m.target_rows(LAYERS, DECODING)
    assert len(rows) == 4
    for row in rows:
        assert set(suite.SUMMARY_KEYS) <= set(row)
    dense, bnb, bandwidth, decode = rows
    assert dense["ratio"] == pytest.approx(2.5) and dense["met"] is True  # >= 2.0x
    assert bnb["ratio"] == pytest.approx(2.0) and bnb["met"] is False  # < 3x
    assert bandwidth["ratio"] == pytest.approx(0.6) and bandwidth["met"] is True  # >= 60% of the copy
    assert "75% of a read-only stream (8.0 GB/s)" in bandwidth["note"]
    assert decode["ratio"] == pytest.approx(1.5) and decode["met"] is True  # >= 1.5x


def test_bnb_missing_gives_an_unmeasured_row() -> None:
    rows = small_m.target_rows(LAYERS[:2], [])
    assert rows[1]["met"] is None and rows[1]["note"] == "bitsandbytes or peft not installed"


def test_weights_rotate_past_the_cache() -> None:
    assert small_m.copies_for(8 * 2**20, 32 * 2**20) == 16
    assert small_m.copies_for(2**30, 32 * 2**20) == 1
    calls = []
    run = small_m.rotating([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(4):
        run()
    assert calls == [1, 2, 0, 1]
    assert small_m.last_level_cache_bytes() > 0


@pytest.mark.skipif(not native.native_available(), reason=native.native_status().error or "")
def test_a_tiny_crossover_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(small_m, "CROSSOVER_M", (1, 3))
    threads = torch.get_num_threads()
    try:
        rows = small_m.crossover_rows(threads=1, rounds=1, n=48, k=64)
    finally:
        torch.set_num_threads(threads)
    assert [r["m"] for r in rows] == [1, 3]
    assert all(r["fused_ms"] > 0 and r["decode_matmul_ms"] > 0 for r in rows)
