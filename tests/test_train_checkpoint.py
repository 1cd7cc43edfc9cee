"""Checkpoints: no pickle, exact round trips of optimizer and RNG states, damaged ones skipped, failed writes clean."""

from __future__ import annotations

import errno
import inspect
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import qlora_kernels.train.checkpoint as ck
from qlora_kernels.train.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    TrainState,
    checkpoint_problem,
    find_intact_checkpoint,
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temp_dirs,
    save_checkpoint,
    unflatten_state,
)


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    model[1].requires_grad_(False)
    groups = [
        {"params": list(model[0].parameters()), "lr": 1e-2, "lr_scale": 0.5},
        {"params": list(model[2].parameters()), "lr": 2e-2, "lr_scale": 1.0, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    return model, optimizer


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(4, 7)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _state(step: int) -> TrainState:
    return TrainState(step, {"position": step, "seed": 0, "batch_size": 4}, {"r": 4}, {"max_steps": 10})


def test_state_trees_round_trip_exactly_without_pickle():
    tree = {
        0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 2, dtype=torch.bfloat16)},
        "groups": [{"betas": (0.9, 0.999), "lr": float("inf"), "params": [0, 1], "fused": None, "amsgrad": False}],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "nested": ((1, "a"), [2.5, None]),
    }
    json_tree, tensors = flatten_state(tree)
    import json

    rebuilt = unflatten_state(json.loads(json.dumps(json_tree)), tensors)
    assert rebuilt[0]["step"].item() == 3.0 and torch.equal(rebuilt[0]["exp_avg"], tree[0]["exp_avg"])
    assert rebuilt["groups"] == tree["groups"] and rebuilt["nested"] == tree["nested"]
    assert rebuilt["python"] == tree["python"]
    assert rebuilt["numpy"][0] == "MT19937" and np.array_equal(rebuilt["numpy"][1], tree["numpy"][1])
    assert rebuilt["numpy"][1].dtype == np.uint32
    with pytest.raises(TypeError, match="cannot store a object"):
        flatten_state({"x": object()})


def test_resuming_restores_optimizer_and_rng_exactly_and_loads_no_pickle(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    _steps(model, optimizer, 3)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, model, optimizer, _state(3))
    assert sorted(p.name for p in path.iterdir()) == sorted(ck.FILES)
    expected_next = (random.random(), np.random.rand(), torch.rand(1))

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used for checkpoints")

    monkeypatch.setattr(torch, "load", no_pickle)
    fresh_model, fresh_optimizer = _model_and_optimizer(seed=1)
    fresh_optimizer.param_groups[0]["weight_decay"] = 0.3  # the resumed run's own hyperparameters win
    state = load_checkpoint(path, fresh_model, fresh_optimizer)
    assert state.step == 3 and state.extra == {"max_steps": 10}
    assert fresh_optimizer.param_groups[0]["weight_decay"] == 0.3
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_next
    for key, value in optimizer.state_dict()["state"].items():
        for name, tensor in value.items():
            torch.testing.assert_close(fresh_optimizer.state_dict()["state"][key][name], tensor, rtol=0, atol=0)
    assert "torch.load" not in inspect.getsource(ck)


def test_resumed_steps_equal_uninterrupted_ones(tmp_path):
    model, optimizer = _model_and_optimizer()
    _steps(model, optimizer, 2)
    torch.manual_seed(11)
    path = save_checkpoint(tmp_path, model, optimizer, _state(2))
    _steps(model, optimizer, 3)
    fresh_model, fresh_optimizer = _model_and_optimizer(seed=5)
    load_checkpoint(path, fresh_model, fresh_optimizer)
    _steps(fresh_model, fresh_optimizer, 3)
    for got, want in zip(fresh_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_files_are_readable_by_all_like_any_saved_file(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = save_checkpoint(tmp_path, model, optimizer, _state(1))
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(f.stat().st_mode & 0o777) for f in path.iterdir()} == {oct(0o666 & ~umask)}


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: (p / "trainable.safetensors").unlink(), "trainable.safetensors is missing"),
        (lambda p: (p / "optimizer.safetensors").write_bytes(b"x" * 40), "optimizer.safetensors is damaged"),
        (lambda p: (p / "rng.safetensors").write_bytes((p / "rng.safetensors").read_bytes()[:100]), "rng.safetensors"),
        (lambda p: (p / "state.json").write_text("{"), "state.json is unreadable"),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, damage, problem):
    model, optimizer = _model_and_optimizer()
    for step in (2, 4):
        save_checkpoint(tmp_path, model, optimizer, _state(step), keep=3)
    newest = tmp_path / "checkpoint-000004"
    damage(newest)
    assert problem in checkpoint_problem(newest)
    found, skipped = find_intact_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint-000002" and skipped[0][0] == newest
    assert latest_checkpoint(tmp_path) == found
    with pytest.raises(CheckpointError, match="checkpoint-000004 is not usable"):
        load_checkpoint(newest, model, optimizer)


def test_the_latest_pointer_is_not_needed(tmp_path):
    model, optimizer = _model_and_optimizer()
    for step in (2, 4):
        save_checkpoint(tmp_path, model, optimizer, _state(step))
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000004"


def test_a_pickled_checkpoint_of_an_older_version_is_never_loaded(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = save_checkpoint(tmp_path, model, optimizer, _state(2))
    (path / "optimizer.safetensors").unlink()
    (path / "optimizer.pt").write_bytes(b"a pickle")
    assert "older qlora-kernels" in checkpoint_problem(path)
    assert latest_checkpoint(tmp_path) is None


def test_checkpoints_that_do_not_fit_the_model_name_the_file(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = save_checkpoint(tmp_path, model, optimizer, _state(2))
    wider = nn.Sequential(nn.Linear(7, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    wider[1].requires_grad_(False)
    with pytest.raises(
        CheckpointError, match=r"trainable.safetensors: 0\.(weight|bias) has shape \(5.*\), the model \(6"
    ):
        load_checkpoint(path, wider, torch.optim.AdamW(wider.parameters()))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    nan_path = save_checkpoint(tmp_path, model, optimizer, _state(3))
    with pytest.raises(CheckpointError, match="0.weight holds NaN"):
        load_checkpoint(nan_path, *_model_and_optimizer())


def test_a_failed_write_leaves_no_temp_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    save_checkpoint(tmp_path, model, optimizer, _state(2))

    def disk_full(tensors, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(ck, "save_file", disk_full)
    with pytest.raises(
        CheckpointWriteError, match="No space left on device; the previous checkpoint .*000002 is intact"
    ):
        save_checkpoint(tmp_path, model, optimizer, _state(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "latest"]


def test_stale_temp_folders_are_removed_unless_a_live_process_owns_them(tmp_path):
    dead = tmp_path / ".tmp-checkpoint-000006-999999999"
    dead.mkdir()
    live = tmp_path / f".tmp-checkpoint-000006-{os.getppid()}"
    live.mkdir()
    pointer = tmp_path / ".tmp-latest-999999998"
    pointer.write_text("x")
    assert sorted(remove_stale_temp_dirs(tmp_path)) == sorted([dead, pointer])
    assert live.exists() and not dead.exists()
