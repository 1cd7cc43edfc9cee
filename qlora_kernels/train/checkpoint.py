"""Checkpoints that lose nothing and are never half-written.

A checkpoint holds the trainable tensors only (never the full model state dict: peft #447),
the optimizer and grad-scaler states, the RNG states, the data position and the step. It is
written into a temporary directory and renamed into place; the file `latest` (replaced
atomically) then points at it. A run killed at any moment leaves the previous checkpoint
intact and the newest complete one findable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..common import atomic_write

LATEST = "latest"
PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
TMP_PREFIX = ".tmp-"


@dataclass
class TrainState:
    """The scalar progress of a run."""

    step: int
    data: dict[str, int]
    config: dict[str, Any]
    extra: dict[str, Any]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (contiguous CPU copies, safe to serialise)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    scaler: torch.amp.GradScaler | None = None,
    keep: int = 2,
) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically, point `latest` at it, prune old ones."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{PREFIX}{state.step:06d}"
    tmp = output_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / TRAINABLE_FILE))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
        tmp / OPTIMIZER_FILE,
    )
    torch.save(rng_state(), tmp / RNG_FILE)
    payload = {"step": state.step, "data": state.data, "config": state.config, "extra": state.extra}
    (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1), encoding="utf-8")
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write(output_dir / LATEST, lambda tmp: tmp.write_text(final.name, encoding="utf-8"))
    _fsync_dir(output_dir)
    _prune(output_dir, keep, final)
    return final


def _prune(output_dir: Path, keep: int, current: Path) -> None:
    checkpoints = sorted(p for p in output_dir.glob(f"{PREFIX}*") if p.is_dir())
    for old in checkpoints[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in output_dir.glob(f"{TMP_PREFIX}*"):  # leftovers of a run killed mid-save
        if stale.is_dir() and not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (the one `latest` names), or None."""
    pointer = Path(output_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(output_dir) / pointer.read_text(encoding="utf-8").strip()
    return path if (path / STATE_FILE).is_file() else None


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainState:
    """Restore trainable tensors, optimizer, scaler and RNG states in place; return the progress."""
    path = Path(path)
    tensors = load_file(str(path / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise ValueError(
            f"checkpoint {path} does not match the model (missing {missing[:3]}, unexpected {unknown[:3]}); "
            "resume with the same model, method and target_modules"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device))
    opt = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    if scaler is not None and opt["scaler"] is not None:
        scaler.load_state_dict(opt["scaler"])
    set_rng_state(torch.load(path / RNG_FILE, weights_only=False))
    payload = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    return TrainState(payload["step"], payload["data"], payload["config"], payload.get("extra", {}))
