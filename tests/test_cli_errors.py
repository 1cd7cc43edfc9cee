"""Every CLI error is one line with the right exit code: 2 before any model loads, 1 at run time, no traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from train_support import tiny_model_dir, write_expense_data

import qlora_kernels as qk
import qlora_kernels.models as models_module
from qlora_kernels.cli import EXIT_FAILURE, EXIT_USAGE, main


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_expense_data(tmp_path_factory.mktemp("data"), n_train=8, n_eval=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A finished tiny run: its folder holds adapter/, train_config.json (with eval_file) and checkpoints."""
    folder = tmp_path_factory.mktemp("trained")
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump(_settings(folder, data)))
    assert main(["train", "--config", str(config)]) == 0
    return folder / "run"


def _settings(folder: Path, data: tuple[Path, Path], **overrides) -> dict:
    return {
        "model": str(tiny_model_dir()),
        "method": "lora",
        "r": 2,
        "train_file": str(data[0]),
        "eval_file": str(data[1]),
        "max_steps": 2,
        "batch_size": 4,
        "save_every": 1,
        "output_dir": str(folder / "run"),
        "progress": False,
        **overrides,
    }


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model loads: a usage error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the usage error")

    monkeypatch.setattr(qk, "load_model", refuse)
    monkeypatch.setattr(models_module, "load_model", refuse)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _usage_error(argv: list[str], capsys, *names: str) -> str:
    code, err = _run(argv, capsys)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == EXIT_USAGE, err
    assert len(lines) == 1, err
    for name in names:
        assert name.lower() in lines[0].lower(), (name, lines[0])
    return lines[0]


def _config(tmp_path: Path, data, **overrides) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_settings(tmp_path, data, **overrides)))
    return str(path)


# ------------------------------------------------------------------------ train config
BAD_SETTINGS = [
    ("log_every=0", "log_every"),
    ("eval_every=-1", "eval_every"),
    ("eval_batches=0", "eval_batches"),
    ("dropout=1.5", "dropout"),
    ("dropout=1.0", "dropout"),
    ("r=100000", "'r'"),
    ("target_modules=[nonexistent]", "nonexistent"),
    ("target_modules=[]", "target_modules"),
    ("betas=[0.9, 2.0]", "betas"),
    ("betas=[0.9]", "betas"),
    ("weight_decay=-1", "weight_decay"),
    ("dtype=fp16", "fp16"),
    ("threads=-1", "threads"),
    ("alpha=.nan", "alpha"),
    ("lr=.nan", "lr"),
    ("grad_clip=-1", "grad_clip"),
    ("seed=-1", "seed"),
    ("save_every=-1", "save_every"),
    ("k=100", "'k'"),
    ("train_file=''", "train_file"),
    ("output_dir=''", "output_dir"),
    ("lr=fast", "lr"),
    ("bogus=1", "bogus"),
]


@pytest.mark.parametrize(("setting", "name"), BAD_SETTINGS)
def test_a_bad_config_value_exits_2_before_the_model_loads(setting, name, tmp_path, data, capsys, no_model_load):
    extra = ["--set", "method=partial"] if setting.startswith("k=") else []
    _usage_error(["train", "--config", _config(tmp_path, data), "--set", setting, *extra], capsys, name)
    assert not (tmp_path / "run").exists(), "a refused run writes nothing"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on CUDA")
def test_fp16_on_the_cpu_is_refused_through_the_api_too(tmp_path, data):
    from qlora_kernels.train import ConfigError, TrainConfig, train

    cfg = TrainConfig.from_dict(_settings(tmp_path, data, dtype="fp16"))
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        train(cfg)


def test_eval_every_without_eval_file_is_refused(tmp_path, data, capsys, no_model_load):
    argv = ["train", "--config", _config(tmp_path, data, eval_file="", eval_every=1)]
    _usage_error(argv, capsys, "eval_file")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.yaml", b"", "empty"),
        ("blank.yaml", b"# nothing but a comment\n", "empty"),
        ("list.yaml", b"- a\n", "mapping"),
        ("broken.yaml", b"lr: [1, 2\n", "broken.yaml"),
        ("broken.json", b"{lr: 1", "broken.json"),
        ("latin1.yaml", b"lr: \xff\n", "latin1.yaml"),
    ],
)
def test_bad_config_files(name, content, expected, tmp_path, capsys, no_model_load):
    path = tmp_path / name
    path.write_bytes(content)
    _usage_error(["train", "--config", str(path)], capsys, expected)


def test_config_paths_that_are_not_files(tmp_path, capsys, no_model_load):
    _usage_error(["train", "--config", str(tmp_path)], capsys, "directory")
    _usage_error(["train", "--config", str(tmp_path / "missing.yaml")], capsys, "missing.yaml")
    _usage_error(["train"], capsys, "--config")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "c.yaml", "--resume", "--fresh"])
    assert exit_info.value.code == EXIT_USAGE


def _jsonl(tmp_path: Path, name: str, content: bytes | None) -> Path:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


GOOD = json.dumps({"prompt": "a", "completion": "b"}).encode() + b"\n"
BAD_DATA = [
    ("dir.jsonl", None, "is a directory"),
    ("latin1.jsonl", GOOD + b"\xff\xfe\n", "latin1.jsonl:2: not UTF-8"),
    ("broken.jsonl", b"{oops\n", "broken.jsonl:1"),
    ("prompt-only.jsonl", b'{"prompt": "a"}\n', "prompt-only.jsonl:1"),
    ("empty.jsonl", b"\n", "no records"),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_DATA)
@pytest.mark.parametrize("key", ["train_file", "eval_file"])
def test_bad_data_files_exit_2_naming_file_and_line(
    key, name, content, expected, tmp_path, data, capsys, no_model_load
):
    path = _jsonl(tmp_path, name, content)
    _usage_error(["train", "--config", _config(tmp_path, data, **{key: str(path)})], capsys, expected)


def test_a_missing_train_file(tmp_path, data, capsys, no_model_load):
    _usage_error(
        ["train", "--config", _config(tmp_path, data, train_file=str(tmp_path / "no.jsonl"))], capsys, "no.jsonl"
    )


def test_bad_models_exit_2_before_loading(tmp_path, data, capsys, no_model_load, monkeypatch):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"definitely not a gguf")
    _usage_error(["train", "--config", _config(tmp_path, data, model=str(fake))], capsys, "fake.gguf", "not a GGUF")
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03")
    _usage_error(["train", "--config", _config(tmp_path, data, model=str(short))], capsys, "short.gguf")
    folder = tmp_path / "no-config"
    folder.mkdir()
    _usage_error(["train", "--config", _config(tmp_path, data, model=str(folder))], capsys, "config.json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = "no-such-org/no-such-model"
    _usage_error(["train", "--config", _config(tmp_path, data, model=hub)], capsys, hub, "HF_HUB_OFFLINE=1")


def test_output_dir_that_is_a_file_or_read_only(tmp_path, data, capsys, no_model_load, monkeypatch):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    _usage_error(["train", "--config", _config(tmp_path, data, output_dir=str(a_file))], capsys, "is a file")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real_access(p, mode, **kw))
    config = _config(tmp_path, data, output_dir=str(read_only / "run"))
    _usage_error(["train", "--config", config], capsys, "not writable")


def test_checkpoints_of_an_earlier_run_need_resume_or_fresh(trained, tmp_path, data, capsys, no_model_load):
    config = _config(tmp_path, data, output_dir=str(trained))
    _usage_error(["train", "--config", config], capsys, "--resume", "--fresh")


def test_a_runtime_failure_is_one_line_exit_1_and_debug_shows_the_traceback(tmp_path, data, capsys, monkeypatch):
    import qlora_kernels.train.trainer as trainer

    def broken(self):
        raise RuntimeError("the kernel\nexploded")

    monkeypatch.setattr(trainer._Run, "run", broken)
    code, err = _run(["train", "--config", _config(tmp_path, data)], capsys)
    assert code == EXIT_FAILURE
    assert err.strip().splitlines()[-1] == (
        "error: RuntimeError: the kernel exploded (run with --debug for the traceback)"
    )
    assert main(["train", "--config", _config(tmp_path, data), "--fresh", "--debug"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith(
        "error: RuntimeError: the kernel exploded"
    )


def test_a_disk_full_checkpoint_is_exit_1_with_a_clear_message_and_no_temp_folder(tmp_path, data, capsys, monkeypatch):
    import errno

    import qlora_kernels.train.checkpoint as ck

    real_save = ck.save_file
    calls = {"n": 0}

    def save_file(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (three safetensors files) fits on the disk
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ck, "save_file", save_file)
    code, err = _run(["train", "--config", _config(tmp_path, data)], capsys)
    assert code == EXIT_FAILURE
    line = err.strip().splitlines()[-1]
    assert "No space left on device" in line and "checkpoint-000001 is intact" in line
    assert not list((tmp_path / "run").glob(".tmp-*"))


# ------------------------------------------------------------------------- eval, merge
def _copy_run(trained: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run" / "adapter"


def _poison(adapter: Path) -> str:
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = sorted(tensors)[1]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(file))
    return key


def test_eval_number_arguments(trained, capsys, no_model_load):
    for argv in (["--n", "0"], ["--n", "-3"], ["--n", "x"], ["--show", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--adapter", str(trained / "adapter"), *argv])
        assert exit_info.value.code == EXIT_USAGE
        assert f"argument {argv[0]}" in capsys.readouterr().err


def test_damaged_adapters_exit_2_naming_the_file(trained, tmp_path, capsys, no_model_load):
    adapter = _copy_run(trained, tmp_path)
    weights, config = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    good_weights, good_config = weights.read_bytes(), config.read_text()
    key = _poison(adapter)
    for command in ("eval", "merge"):
        argv = [command, "--adapter", str(adapter)] + (["--out", str(tmp_path / "m")] if command == "merge" else [])
        _usage_error(argv, capsys, str(weights), key, "NaN/inf")
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    _usage_error(["eval", "--adapter", str(adapter)], capsys, str(weights))
    weights.write_bytes(b"garbage")
    _usage_error(["eval", "--adapter", str(adapter)], capsys, str(weights))
    weights.write_bytes(good_weights)
    config.write_text("{not json")
    _usage_error(["eval", "--adapter", str(adapter)], capsys, str(config), "not valid JSON")
    peft = json.loads(good_config)
    del peft["r"]
    config.write_text(json.dumps(peft))
    save_file(load_file(str(weights)), str(weights))  # no qlora-kernels metadata: read as a PEFT adapter
    _usage_error(["eval", "--adapter", str(adapter)], capsys, str(config), "'r'")
    _usage_error(["eval", "--adapter", str(tmp_path / "none")], capsys, "does not exist")
    _usage_error(["eval", "--adapter", str(weights)], capsys, "is a file")


def test_eval_data_is_checked_before_the_model_loads(trained, tmp_path, capsys, no_model_load):
    adapter = str(trained / "adapter")
    for name, content, expected in BAD_DATA:
        path = _jsonl(tmp_path, name, content)
        _usage_error(["eval", "--adapter", adapter, "--data", str(path)], capsys, expected)
    _usage_error(["eval", "--adapter", adapter, "--data", str(tmp_path / "absent.jsonl")], capsys, "absent.jsonl")


def test_eval_reads_the_runs_config_and_names_its_problems(trained, tmp_path, capsys, no_model_load):
    adapter = _copy_run(trained, tmp_path)
    run_config = adapter.parent / "train_config.json"
    settings = json.loads(run_config.read_text())
    settings["eval_file"] = str(tmp_path / "gone.jsonl")
    run_config.write_text(json.dumps(settings))
    _usage_error(["eval", "--adapter", str(adapter)], capsys, "gone.jsonl", "--data")
    run_config.write_text("{oops")
    _usage_error(["eval", "--adapter", str(adapter)], capsys, "train_config.json")


def test_eval_uses_the_runs_eval_file_and_shows_samples(trained, capsys):
    assert main(["eval", "--adapter", str(trained / "adapter"), "--n", "3", "--show", "2"]) == 0
    captured = capsys.readouterr()
    eval_file = json.loads((trained / "train_config.json").read_text())["eval_file"]
    assert f"3 examples from {eval_file} (the run's eval_file)" in captured.err
    assert "(trained 2 steps)" in captured.err
    lines = captured.out.strip().splitlines()
    assert sum(line.startswith("--- sample") for line in lines) == 2
    assert sum(line.startswith("reference: ") for line in lines) == 2
    assert json.loads(lines[-1])["n_eval"] == 3


def test_merge_out_that_is_a_file_or_read_only(trained, tmp_path, capsys, no_model_load, monkeypatch):
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep")
    _usage_error(["merge", "--adapter", str(trained / "adapter"), "--out", str(target)], capsys, "is a file")
    assert target.read_bytes() == b"keep"
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real_access(p, mode, **kw))
    argv = ["merge", "--adapter", str(trained / "adapter"), "--out", str(read_only / "m")]
    _usage_error(argv, capsys, "not writable")


# ---------------------------------------------------------------------- demo, commands
def test_demo_arguments_are_checked_before_the_model_loads(tmp_path, capsys, no_model_load):
    for argv in (["--n-eval", "0"], ["--n-eval", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", *argv])
        assert exit_info.value.code == EXIT_USAGE
        assert "argument --n-eval: must be >= 1" in capsys.readouterr().err
    a_file = tmp_path / "f"
    a_file.write_text("x")
    _usage_error(["demo", "--out", str(a_file)], capsys, "is a file")
    _usage_error(["demo", "--out", str(tmp_path / "d"), "--set", "lr=fast"], capsys, "'lr'")
    _usage_error(["demo", "--out", str(tmp_path / "d"), "--set", "bogus=1"], capsys, "bogus")


def test_no_command_and_unknown_commands(capsys):
    assert main([]) == EXIT_USAGE
    assert "error: choose a command" in capsys.readouterr().err
    for command in ("bench", "frobnicate"):
        with pytest.raises(SystemExit) as exit_info:
            main([command])
        assert exit_info.value.code == EXIT_USAGE
