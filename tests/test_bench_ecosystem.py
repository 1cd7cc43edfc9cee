"""Fast checks of `benchmarks.ecosystem`'s driver code (no model, no timing): medians per run and the report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import ecosystem  # noqa: E402

LOAD = [
    {"run": "qk-nf4", "round": 0, "peak_load_rss_mb": 90.0, "peak_anon_mb": 80.0, "peak_file_mb": 10.0,
     "model_mb": 106.0, "largest_shard_mb": 61.0, "bound_mb": 217.1, "load_seconds": 10.0},
    {"run": "qk-nf4", "round": 1, "peak_load_rss_mb": 70.0, "peak_anon_mb": 60.0, "peak_file_mb": 10.0,
     "model_mb": 106.0, "largest_shard_mb": 61.0, "bound_mb": 217.1, "load_seconds": 12.0},
    {"run": "bnb-nf4", "round": 0, "peak_load_rss_mb": 600.0, "peak_anon_mb": 400.0, "peak_file_mb": 200.0,
     "model_mb": 105.0, "largest_shard_mb": 61.0, "bound_mb": 215.8, "load_seconds": 7.0},
    {"run": "bnb-nf4", "round": 1, "error": "boom"},
]  # fmt: skip
TRAIN = [
    {"run": "qk-nf4", "round": 0, "tokens_per_s": 300.0, "step_seconds": 2.0, "train_peak_rss_mb": 900.0,
     "peak_rss_mb": 1000.0, "trainable_params": 4_884_480},
    {"run": "bnb-nf4", "round": 0, "tokens_per_s": 200.0, "step_seconds": 3.0, "train_peak_rss_mb": 1800.0,
     "peak_rss_mb": 2000.0, "trainable_params": 4_884_480},
]  # fmt: skip


def test_summaries_are_medians_over_rounds_without_errors():
    load = ecosystem.summarize(LOAD, ["peak_load_rss_mb", "load_seconds"])
    assert load[0] == {"run": "qk-nf4", "rounds": 2, "peak_load_rss_mb": 80.0, "load_seconds": 11.0}
    assert load[1]["rounds"] == 1 and load[1]["peak_load_rss_mb"] == 600.0
    failed = ecosystem.summarize([{"run": "x", "error": "boom"}], ["tokens_per_s"])
    assert failed == [{"run": "x", "rounds": 0, "error": "boom"}]


def test_report_marks_the_bound_and_the_ratio():
    keys = ["peak_load_rss_mb", "peak_anon_mb", "peak_file_mb", "model_mb", "largest_shard_mb", "bound_mb"]
    load = ecosystem.summarize(LOAD, [*keys, "load_seconds"])
    train = ecosystem.summarize(
        TRAIN, ["tokens_per_s", "step_seconds", "train_peak_rss_mb", "peak_rss_mb", "trainable_params"]
    )
    meta = {"load_average": [1.0, 1.0, 1.0], "rounds": 2, "git_commit": "abc", "train": ecosystem.TRAIN}
    text = ecosystem.markdown(load, train, meta)
    assert "| qk-nf4 | 80 | 70 | 10 | 106 | 61 | 217 | yes | 11.0 |" in text
    assert "| bnb-nf4 | 600 |" in text and "| no |" in text
    assert "1.50x tokens/s, 0.50x training peak RSS" in text
    assert "Provisional" in text


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        ecosystem.main(["--rounds", "0"])
