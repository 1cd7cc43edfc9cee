"""Checkpoints lose nothing: Ctrl-C saves, exits 130; SIGKILL mid-save then --resume equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import yaml
from train_support import tiny_model_dir, write_expense_data

from qlora_kernels.train import latest_checkpoint

MAX_STEPS = 8
# Runs the CLI in a child process, optionally hurting itself at a chosen moment.
RUNNER = textwrap.dedent(
    """
    import os, signal, sys
    import qlora_kernels.train.checkpoint as ck
    import qlora_kernels.train.trainer as tr
    from qlora_kernels.cli import main

    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "sigint-in-step-2":
        real_lr_at = tr.lr_at
        def lr_at(step, **kw):
            if step == 1:
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the step finishes, then it saves
            return real_lr_at(step, **kw)
        tr.lr_at = lr_at
    elif mode == "sigkill-while-saving-step-6":
        real_save = ck.save_file
        def save_file(tensors, path, *a, **kw):
            real_save(tensors, path, *a, **kw)
            if "checkpoint-000006" in path:  # half-written: the temp dir has one file
                os.kill(os.getpid(), signal.SIGKILL)
        ck.save_file = save_file
    sys.exit(main(argv))
    """
)


def _run(mode: str, config, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", RUNNER, mode, "train", "--config", str(config), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_interrupt_and_kill_then_resume_equals_an_uninterrupted_run(tmp_path):
    train_file, _ = write_expense_data(tmp_path / "data", n_train=24)
    base = {
        "model": str(tiny_model_dir()),
        "method": "lora",
        "r": 4,
        "alpha": 8.0,
        "dropout": 0.1,
        "train_file": str(train_file),
        "max_steps": MAX_STEPS,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 5e-3,
        "warmup_steps": 2,
        "save_every": 2,
        "progress": False,
        "seed": 1,
        "max_length": 256,
    }
    configs = {}
    for name in ("straight", "broken"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({**base, "output_dir": str(tmp_path / name)}))

    straight = _run("none", configs["straight"])
    assert straight.returncode == 0, straight.stderr

    first = _run("sigint-in-step-2", configs["broken"])
    assert first.returncode == 130, first.stderr
    assert latest_checkpoint(tmp_path / "broken").name == "checkpoint-000002"

    second = _run("sigkill-while-saving-step-6", configs["broken"], "--resume")
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert "resumed from" in second.stderr
    assert latest_checkpoint(tmp_path / "broken").name == "checkpoint-000004"  # step 6 never completed
    assert list((tmp_path / "broken").glob(".tmp-*")), "the killed save left its temp dir, not a checkpoint"

    third = _run("none", configs["broken"], "--resume")
    assert third.returncode == 0, third.stderr
    assert not list((tmp_path / "broken").glob(".tmp-*")), "stale temp dirs are cleaned up"

    expected, got = _losses(tmp_path / "straight"), _losses(tmp_path / "broken")
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)
    print(f"resume equivalence: {len(expected)} steps, worst relative loss difference {worst:.2e}")
    assert worst <= 1e-5, {s: (got[s], expected[s]) for s in expected}
