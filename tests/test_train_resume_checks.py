"""--resume survives mistakes: damaged checkpoints are skipped, other settings refused, the schedule guarded."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from train_support import tiny_model_dir, write_expense_data

from qlora_kernels.cli import EXIT_USAGE, main
from qlora_kernels.train import TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_expense_data(tmp_path_factory.mktemp("data"), n_train=12, n_eval=4)[0]


def _settings(data: Path, output_dir: Path, **overrides) -> dict:
    return {
        "model": str(tiny_model_dir()),
        "method": "lora",
        "r": 2,
        "train_file": str(data),
        "max_steps": 4,
        "batch_size": 4,
        "save_every": 2,
        "keep_checkpoints": 3,
        "output_dir": str(output_dir),
        "progress": False,
        **overrides,
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig.from_dict(_settings(data, run)))
    return run


def _copy(finished: Path, tmp_path: Path, data: Path, **overrides) -> str:
    shutil.copytree(finished, tmp_path / "run")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_settings(data, tmp_path / "run", **overrides)))
    return str(config)


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_resuming_a_finished_run_says_there_is_nothing_to_train(finished, tmp_path, data, capsys):
    config = _copy(finished, tmp_path, data)
    assert main(["train", "--config", config, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "step 4 of 4" in out and "--change-schedule" in out
    assert "nan" not in out


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"method": "full"}, "method: 'lora' -> 'full'"),
        ({"method": "qlora", "quant": "int8"}, "method"),
        ({"r": 4}, "r: 2 -> 4"),
        ({"alpha": 4.0}, "alpha"),
        ({"target_modules": ["q_proj", "v_proj"]}, "target_modules"),
        ({"batch_size": 2}, "batch_size: 4 -> 2"),
        ({"seed": 3}, "seed"),
        ({"max_steps": 3}, "max_steps=3 is below the checkpoint's step 4"),
        ({"max_steps": 10}, "max_steps: 4 -> 10"),
        ({"lr": 1e-3}, "lr"),
        ({"warmup_steps": 0}, "warmup_steps"),
    ],
)
def test_resume_refuses_a_checkpoint_made_with_other_settings(finished, tmp_path, data, capsys, overrides, expected):
    config = _copy(finished, tmp_path, data, **overrides)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    line = _error(["train", "--config", config, "--resume"], capsys)
    assert expected in line
    assert any(remedy in line for remedy in ("--fresh", "--change-schedule", "set max_steps >= 4")), line
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before, "a refused resume changes nothing"


def test_a_new_schedule_needs_change_schedule(finished, tmp_path, data, capsys):
    config = _copy(finished, tmp_path, data, max_steps=6)
    assert main(["train", "--config", config, "--resume", "--change-schedule"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "at step 4" in err and "schedule follows max_steps" in err
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "damage",
    [
        lambda ckpt: shutil.rmtree(ckpt),
        lambda ckpt: (ckpt / "trainable.safetensors").write_bytes(b"\0" * 16),
        lambda ckpt: (ckpt / "state.json").unlink(),
    ],
    ids=["deleted", "garbage", "no-state"],
)
def test_resume_falls_back_to_the_newest_intact_checkpoint(finished, tmp_path, data, capsys, damage):
    config = _copy(finished, tmp_path, data)
    damage(tmp_path / "run" / "checkpoint-000004")
    assert main(["train", "--config", config, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "at step 2" in err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_resume_with_every_checkpoint_damaged_says_so(finished, tmp_path, data, capsys):
    config = _copy(finished, tmp_path, data)
    for ckpt in (tmp_path / "run").glob("checkpoint-*"):
        (ckpt / "rng.safetensors").write_bytes(b"")
    line = _error(["train", "--config", config, "--resume"], capsys)
    assert "no intact checkpoint" in line and "rng.safetensors" in line and "--fresh" in line


def test_fresh_replaces_the_earlier_run(finished, tmp_path, data, capsys):
    config = _copy(finished, tmp_path, data, max_steps=2, save_every=0)
    stale = tmp_path / "run" / ".tmp-checkpoint-000009-999999999"
    stale.mkdir()
    assert main(["train", "--config", config, "--fresh"]) == 0
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["adapter", "checkpoint-000002", "latest", "metrics.jsonl", "train_config.json"]


def test_the_api_leaves_the_config_alone_and_saves_absolute_data_paths(tmp_path, data, monkeypatch):
    monkeypatch.chdir(data.parent)
    cfg = TrainConfig.from_dict(_settings(Path(data.name), tmp_path / "run", max_steps=1, save_every=0))
    result = train(cfg)
    assert cfg.train_file == data.name  # the caller's object is untouched
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["train_file"] == str(data) and result.step == 1


RUNNER = textwrap.dedent(
    """
    import os, sys
    import qlora_kernels.train.trainer as tr
    from qlora_kernels.cli import main
    sig, argv = int(sys.argv[1]), sys.argv[2:]
    real_lr_at = tr.lr_at
    def lr_at(step, **kw):
        if step == 1:
            os.kill(os.getpid(), sig)  # as Ctrl-C or a scheduler's SIGTERM: the step finishes, then it saves
        return real_lr_at(step, **kw)
    tr.lr_at = lr_at
    sys.exit(main(argv))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGINT: test_train_resume.py (the same path, exit 130)
def test_a_signal_saves_checkpoint_and_adapter_and_prints_a_command_that_resumes_this_run(tmp_path, data, capsys, sig):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_settings(data, tmp_path / "default-run", save_every=0)))
    overrides = ["--set", f"output_dir={tmp_path / 'other run'}", "--set", "lr=3e-3"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", RUNNER, str(int(sig)), "train", "--config", str(config), *overrides]
    child = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 128 + sig, child.stderr
    run = tmp_path / "other run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000002"]
    from qlora_kernels.tuning.io import adapter_metadata

    assert adapter_metadata(run / "adapter")["qk_train_step"] == "2", "the adapter is saved with the checkpoint"
    line = next(line for line in child.stderr.splitlines() if "Continue with:" in line)
    assert f"stopped by {sig.name} at step 2 of 4" in line and "Traceback" not in child.stderr
    command = shlex.split(line.split("Continue with:")[1].split("   (output_dir")[0])
    assert command[0] == "qlora-kernels" and command[-1] == "--resume"
    assert main(command[1:]) == 0  # the printed command, as printed
    err = capsys.readouterr().err
    assert f"resumed from {run / 'checkpoint-000002'} at step 2" in err
    assert not (tmp_path / "default-run").exists(), "it resumed the interrupted run, not the config's output_dir"
