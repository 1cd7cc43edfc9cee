"""CLI: every subcommand has --help, `info` runs, bad usage and bad configs exit 2, train/eval on a tiny model."""

from __future__ import annotations

import json

import pytest
import yaml
from train_support import tiny_model_dir, write_expense_data

from qlora_kernels.cli import EXIT_USAGE, main


@pytest.mark.parametrize("command", [[], ["info"], ["train"], ["eval"], ["merge"], ["demo"], ["generate"], ["chat"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: qlora-kernels" in capsys.readouterr().out


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "nf4" in out
    assert "CPU compute dtype: fp32 (env: QK_CPU_DTYPE=fp32)" in out  # the tests pin the policy


def test_no_command_and_bad_arguments_are_usage_errors(tmp_path, capsys):
    assert main([]) == EXIT_USAGE
    assert main(["train"]) == EXIT_USAGE  # --config is required
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == EXIT_USAGE
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: fast\n")
    assert main(["train", "--config", str(bad)]) == EXIT_USAGE
    assert "'lr' expects" in capsys.readouterr().err


def test_train_then_eval_and_merge_an_adapter_on_a_tiny_model(tmp_path, capsys):
    train_file, eval_file = write_expense_data(tmp_path / "data", n_train=8, n_eval=4)
    config = tmp_path / "c.yaml"
    settings = {
        "model": str(tiny_model_dir()),
        "method": "lora",
        "r": 2,
        "train_file": str(train_file),
        "max_steps": 2,
        "batch_size": 4,
        "output_dir": str(tmp_path / "run"),
        "progress": False,
    }
    config.write_text(yaml.safe_dump(settings))
    assert main(["train", "--config", str(config), "--set", "lr=1e-3"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and (tmp_path / "run" / "adapter").is_dir()
    capsys.readouterr()
    code = main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(eval_file), "--n", "4"])
    assert code == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["n_eval"] == 4 and 0 <= scores["format"] <= 1 and 0 <= scores["exact"] <= 1
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()


def _help(command: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines by the terminal width


def test_help_texts_explain_themselves(capsys):
    names = ("", "info", "train", "eval", "merge", "demo", "generate", "chat")
    texts = {name: _help([name] if name else [], capsys) for name in names}
    assert not [name for name, text in texts.items() if "``" in text], "raw reST in --help"
    assert "bits per parameter" in texts["info"]  # info has a description, not just a usage line
    assert "(default: expenses)" in texts["eval"] and "(default: 40)" in texts["eval"]
    assert "(default: bf16)" in texts["merge"] and "(default: out/demo)" in texts["demo"]
    for name in ("eval", "demo"):
        section = texts[name].split("--label-style", 2)[-1]
        assert "running sum" in section, f"{name} --label-style has no help"
    assert "language of the expense task" in texts["eval"]
    assert "examples/" not in texts["train"] and "--help-config" in texts["train"]
    assert "130 / 143" in texts[""] and "benchmarks.suite" in texts[""]
    for name in ("generate", "chat"):  # defaults of 0 are shown too (0 == False must not hide them)
        text = texts[name]
        assert "(default: 0.0)" in text.split("--temperature", 2)[-1].split("--top-p")[0], f"{name} --temperature"
        assert "(default: 0)" in text.split("--seed", 2)[-1], f"{name} --seed"
        assert "(default: auto)" in text and "(default: 256)" in text
    assert "/reset" in texts["chat"] and "/exit" in texts["chat"]


def test_help_config_prints_the_config_reference(capsys):
    from qlora_kernels.train.config import reference_markdown

    assert main(["train", "--help-config"]) == 0
    assert capsys.readouterr().out == reference_markdown()


def test_info_lists_int8_as_per_row(capsys):
    assert main(["info"]) == 0
    int8 = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("int8"))
    assert int8.split()[1] == "row" and float(int8.split()[2]) == pytest.approx(8 + 32 / 512, abs=1e-3)
