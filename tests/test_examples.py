"""The expense task: deterministic, disjoint held-out split, both label styles, parser; the example files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_kernels.train import TrainConfig, expenses

ROOT = Path(__file__).resolve().parents[1]


def test_the_lecture_example_in_both_label_styles():
    e = expenses.Expenses((("Хлеб", 55), ("Молоко", 80), ("Фрукты", 230)))
    assert expenses.prompt(e) == (
        "Проанализируй список расходов и вычисли общую сумму:\n\nХлеб: 55\nМолоко: 80\nФрукты: 230\n\n"
        'Ответ верни в виде: "Итого: X рублей".'
    )
    assert expenses.completion(e, "answer") == "Итого: 365 рублей."
    assert expenses.completion(e, "worked") == "55 + 80 = 135; 135 + 230 = 365. Итого: 365 рублей."
    assert expenses.completion(e, "answer", "en") == "Total: 365 rubles."
    with pytest.raises(ValueError, match="label style"):
        expenses.completion(e, "verbose")


def test_splits_are_deterministic_and_disjoint():
    train, held_out = expenses.make_splits(500, 40, seed=0)
    assert (train, held_out) == expenses.make_splits(500, 40, seed=0)
    assert len(train) == 500 and len({e.key for e in held_out}) == 40
    assert not {e.key for e in train} & {e.key for e in held_out}
    assert expenses.make_splits(10, 5, seed=1) != expenses.make_splits(10, 5, seed=0)
    for e in train[:50]:
        assert expenses.MIN_ITEMS <= len(e.items) <= expenses.MAX_ITEMS
        worked = expenses.completion(e, "worked")
        assert expenses.parse_total(worked) == e.total == int(worked.split(" = ")[-1].split(".")[0])


@pytest.mark.parametrize(
    ("text", "total"),
    [
        ("Итого: 365 рублей.", 365),
        ("55 + 80 = 135; 135 + 230 = 365. Итого: 365 рублей.", 365),
        ("  Итого: 7 рублей  ", 7),
        ("Итого: 365 руб.", None),
        ("Итого: 365 рублей. Спасибо!", None),
        ("Сумма 365", None),
    ],
)
def test_parse_total_accepts_only_outputs_ending_with_the_answer_line(text, total):
    assert expenses.parse_total(text) == total


def test_generate_script_and_config(tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, str(ROOT / "examples/expenses/generate.py"), "--out", str(out), "--n-train", "20"]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20 and rows[0]["completion"].endswith("рублей.") and " + " in rows[0]["completion"]
    assert len((out / "eval.jsonl").read_text(encoding="utf-8").splitlines()) == 40
    cfg = TrainConfig.from_file(ROOT / "examples/expenses/config.yaml")
    assert (cfg.method, cfg.quant, cfg.model) == ("qlora", "nf4", "smollm2-135m-instruct")
    assert cfg.train_file == "examples/expenses/data/train.jsonl"  # relative to the working directory (repo root)


def test_the_example_config_is_the_demos_recipe():
    """The README says examples/expenses/config.yaml trains what the demo trains; the run's own files may differ."""
    from qlora_kernels.train.demo import DEMO_CONFIG

    bookkeeping = {"save_every", "log_every"}
    example = TrainConfig.from_file(ROOT / "examples/expenses/config.yaml").to_dict()
    demo = TrainConfig.from_dict({**DEMO_CONFIG, "train_file": "x.jsonl"}).to_dict()
    differ = {k: (example[k], demo[k]) for k in DEMO_CONFIG if k not in bookkeeping and example[k] != demo[k]}
    assert not differ, f"examples/expenses/config.yaml differs from DEMO_CONFIG in (example, demo): {differ}"
