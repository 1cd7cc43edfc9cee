"""The demo runs a fixed recipe: its step count never follows the clock unless a time budget is asked for."""

from __future__ import annotations

import json

from train_support import tiny_model_dir

from qlora_kernels.train import demo, trainer

TINY_RANK = ["r=8", "alpha=16"]  # the tiny stand-in's narrowest layer is 16 wide; the demo's r=32 needs 32


class SlowClock:
    """A clock on which every reading is 1000 s after the previous one (a very slow machine)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1000.0
        return self.now


def test_the_demo_trains_its_fixed_step_count_on_a_slow_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "time", SlowClock())
    overrides = [f"model={tiny_model_dir()}", "max_steps=4", "batch_size=2", "max_length=256", *TINY_RANK]
    metrics = demo.run_demo(tmp_path / "demo", overrides, n_eval=2, n_shots=1)
    assert metrics["steps"] == 4
    assert demo.DEMO_CONFIG.get("time_budget_s", 0) == 0
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text(encoding="utf-8"))
    assert saved["steps"] == 4 and saved["precision"].startswith("dtype ")
    assert set(saved["phase_seconds"]) == {"load", "eval_zero_shot", "eval_few_shot", "train", "eval_fine_tuned"}
    report = (tmp_path / "demo" / "report.md").read_text(encoding="utf-8")
    assert "a fixed recipe: the step count never follows the clock" in report


def test_a_time_budget_still_shortens_the_run_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "time", SlowClock())
    overrides = [f"model={tiny_model_dir()}", "max_steps=9", "batch_size=2", "max_length=256", "time_budget_s=5000"]
    overrides += TINY_RANK
    metrics = demo.run_demo(tmp_path / "demo", overrides, n_eval=2, n_shots=1)
    assert metrics["steps"] < 9
    report = (tmp_path / "demo" / "report.md").read_text(encoding="utf-8")
    assert "time budget 5000 s as asked" in report


def test_score_variant_lists_extend_the_demo_held_out_lists() -> None:
    """examples/expenses/score_variant.py scores 100 lists whose first 40 are the demo's, none seen in training."""
    import importlib.util
    from pathlib import Path

    from qlora_kernels.train import expenses

    path = Path(__file__).resolve().parents[1] / "examples" / "expenses" / "score_variant.py"
    spec = importlib.util.spec_from_file_location("score_variant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lists = module.held_out_lists()
    train_lists, demo_eval = expenses.make_splits(demo.N_TRAIN, demo.N_EVAL, seed=0)
    assert [e.key for e in lists[: demo.N_EVAL]] == [e.key for e in demo_eval]
    assert len(lists) >= 90 and not {e.key for e in lists} & {e.key for e in train_lists}
    assert module.main([]) == 2  # no output folder: usage and exit code 2
