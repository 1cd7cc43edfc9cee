"""The config: every key documented (docs/config.md in sync), typed, range-checked; one rule for relative paths."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from train_support import tiny_model_dir, write_expense_data

from qlora_kernels.train import ConfigError, TrainConfig, plan_run
from qlora_kernels.train.config import FIELD_DOCS, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_every_key_is_documented_and_docs_config_md_is_in_sync():
    assert set(FIELD_DOCS) == {f.name for f in dataclasses.fields(TrainConfig)}
    reference = reference_markdown()
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` |" in reference
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == reference, (
        "docs/config.md is stale: regenerate it with `qlora-kernels train --help-config > docs/config.md`"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("r", "8"), ("r", 2.5), ("r", True), ("lr", "fast"), ("progress", "yes"), ("betas", ["a", "b"]), ("model", 3)],
)
def test_types_are_checked_also_when_the_dataclass_is_built_directly(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}' expects"):
        TrainConfig(**{key: value})


def test_numbers_are_coerced_where_yaml_reads_them_as_strings():
    cfg = TrainConfig.from_file(None, ["lr=3e-4", "betas=[0, 0.99]", "alpha=16"])
    assert cfg.lr == 3e-4 and cfg.betas == [0.0, 0.99] and cfg.alpha == 16.0


@pytest.mark.parametrize(
    "settings",
    [
        {"alpha": math.inf},
        {"lr": math.inf},
        {"min_lr_ratio": math.nan},
        {"betas": [0.9, math.nan]},
        {"dropout": -0.0001},
    ],
)
def test_non_finite_and_out_of_range_floats_are_refused(settings):
    with pytest.raises(ConfigError, match=f"config key '{next(iter(settings))}' must be"):
        TrainConfig(**settings)


def test_relative_paths_are_relative_to_the_working_directory_in_files_and_in_set(tmp_path, monkeypatch):
    """One rule: wherever a relative path is written (config file or --set), it starts at the working directory."""
    work = tmp_path / "work"
    train_file, eval_file = write_expense_data(work / "data", n_train=4, n_eval=2)
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "data").mkdir()  # a same-named folder next to the config must not be used
    config = config_dir / "c.yaml"
    settings = {"model": str(tiny_model_dir()), "method": "lora", "r": 2, "train_file": "data/train.jsonl"}
    config.write_text(yaml.safe_dump({**settings, "output_dir": "runs/a"}))
    monkeypatch.chdir(work)
    cfg = TrainConfig.from_file(config, ["eval_file=data/eval.jsonl"])
    assert (cfg.train_file, cfg.eval_file, cfg.output_dir) == ("data/train.jsonl", "data/eval.jsonl", "runs/a")
    plan = plan_run(cfg)
    assert plan.cfg.train_file == str(train_file) and plan.cfg.eval_file == str(eval_file)
    assert plan.output_dir.resolve() == work / "runs" / "a"
    assert cfg.train_file == "data/train.jsonl", "planning does not modify the caller's config"
    monkeypatch.chdir(config_dir)
    with pytest.raises(FileNotFoundError, match="data file .*/configs/data/train.jsonl does not exist"):
        plan_run(TrainConfig.from_file(config))


def test_the_example_config_loads_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = TrainConfig.from_file("examples/expenses/config.yaml")
    assert cfg.train_file == "examples/expenses/data/train.jsonl" and cfg.method == "qlora"


def test_group_size_is_checked_up_front_and_reaches_the_quantized_layers(tmp_path):
    import pytest
    from train_support import tiny_model_dir, write_expense_data

    import qlora_kernels as qk
    from qlora_kernels.train import ConfigError, TrainConfig, train

    with pytest.raises(ConfigError, match="group_size"):
        TrainConfig(group_size=48)
    train_file, _ = write_expense_data(tmp_path)
    cfg = TrainConfig(
        model=str(tiny_model_dir()),
        quant="int4",
        group_size=32,
        max_steps=1,
        batch_size=2,
        train_file=str(train_file),
        output_dir=str(tmp_path / "run"),
        progress=False,
    )
    model, tokenizer = qk.load_model(cfg.model)
    train(cfg, model=model, tokenizer=tokenizer)
    groups = {m.group_size for m in model.modules() if isinstance(m, qk.QuantLinear)}
    assert groups == {32}
