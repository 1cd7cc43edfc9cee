"""Checkpoints that lose nothing, are never half-written and hold no pickle.

A checkpoint folder holds:

- ``trainable.safetensors``: the trainable tensors only (never the full model state dict: peft #447);
- ``optimizer.safetensors``: optimizer and grad-scaler state, tensors in the file, everything else
  as JSON in its metadata (`state_tree`), so loading one runs no code;
- ``rng.safetensors``: the Python, NumPy, torch (and CUDA) RNG states, stored the same way;
- ``state.json``: step, data position, config and the effective max_steps.

It is written into a temporary directory and renamed into place; the file `latest` (replaced
atomically) then names it. A run killed at any moment leaves the previous checkpoint intact;
`latest_checkpoint` returns the newest intact one and skips a damaged one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..common.files import atomic_write, set_default_file_mode

LATEST = "latest"
PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
FILES = (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
LEGACY_FILES = ("optimizer.pt", "rng.pt")  # pickled states of older versions: never loaded
TMP_PREFIX = ".tmp-"
TREE_KEY = "state_tree"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX}(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is damaged or does not fit the model; the message names the file."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions); the previous checkpoint is intact."""


@dataclass
class TrainState:
    """The scalar progress of a run."""

    step: int
    data: dict[str, int]
    config: dict[str, Any]
    extra: dict[str, Any]


# ------------------------------------------------------------------- pickle-free state trees
def flatten_state(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able tree, tensors by key): tensors and NumPy arrays go to the dict, the rest stays JSON.

    Dicts with non-string keys (the optimizer's parameter indices) and tuples are tagged so
    `unflatten_state` rebuilds them exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(obj, np.ndarray):
            tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "iu" else obj.copy())
            return {"__ndarray__": path, "dtype": str(obj.dtype)}
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, dict):
            items = enumerate(obj.items())
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in items]}
        if isinstance(obj, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store a {type(obj).__name__} (at {path or 'the root'}) in a checkpoint")

    return walk(tree, "s"), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return tensors[tree["__ndarray__"]].numpy().astype(tree["dtype"])
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        if "__dict__" in tree:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in tree["__dict__"]}
        raise ValueError(f"unknown entry {sorted(tree)} in a checkpoint state tree")
    return tree


def save_state_file(tree: Any, path: Path) -> None:
    """Write a state tree as one safetensors file (tensors + JSON metadata)."""
    json_tree, tensors = flatten_state(tree)
    save_file(tensors, str(path), metadata={TREE_KEY: json.dumps(json_tree)})


def load_state_file(path: Path) -> Any:
    """Read a file written by `save_state_file`; a damaged file raises CheckpointError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return unflatten_state(json.loads(metadata[TREE_KEY]), tensors)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged or not a checkpoint state file ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- the states
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (contiguous CPU copies, safe to serialise)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ------------------------------------------------------------------------ finding them
def checkpoint_step(path: Path) -> int | None:
    """The step in a `checkpoint-<step>` folder name, or None for other names."""
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-<step>` folder in `output_dir`, oldest step first (intact or not)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a usable checkpoint (a missing, truncated or malformed file), or None if intact."""
    if any((path / name).exists() for name in LEGACY_FILES) and not (path / OPTIMIZER_FILE).exists():
        return "written by an older qlora-kernels (pickled optimizer.pt / rng.pt, which is never loaded)"
    for name in FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        payload = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        int(payload["step"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__}: {e})"
    for name in (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE):
        try:
            with safe_open(str(path / name), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f"{name} is damaged ({e})"
    return None


def find_intact_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest intact checkpoint or None, [(damaged checkpoint, why)] newer than it)."""
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint in `output_dir` (a damaged newer one is skipped), or None."""
    return find_intact_checkpoint(output_dir)[0]


def read_train_state(path: str | Path) -> TrainState:
    """The progress stored in a checkpoint's state.json."""
    file = Path(path) / STATE_FILE
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
        return TrainState(int(payload["step"]), payload["data"], payload["config"], payload.get("extra", {}))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file} is unreadable ({type(e).__name__}: {e})") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(output_dir: str | Path) -> list[Path]:
    """Delete what an earlier killed or failed save left (`.tmp-*` folders, a `.latest.*.tmp` pointer),
    except a live other process's; returns them."""
    folder = Path(output_dir)
    removed = []
    if not folder.is_dir():
        return removed
    for stale in [*folder.glob(f"{TMP_PREFIX}*"), *folder.glob(f".{LATEST}.*.tmp")]:
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def remove_checkpoints(output_dir: str | Path) -> None:
    """Delete every checkpoint and the `latest` pointer (a new run replaces the old one's)."""
    for path in list_checkpoints(output_dir):
        shutil.rmtree(path)
    (Path(output_dir) / LATEST).unlink(missing_ok=True)


# --------------------------------------------------------------------- saving, loading
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_checkpoint_files(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    scaler: torch.amp.GradScaler | None,
) -> None:
    save_file(trainable_state(model), str(folder / TRAINABLE_FILE))
    save_state_file(
        {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
        folder / OPTIMIZER_FILE,
    )
    save_state_file(rng_state(), folder / RNG_FILE)
    payload = {"step": state.step, "data": state.data, "config": state.config, "extra": state.extra}
    (folder / STATE_FILE).write_text(json.dumps(payload, indent=1), encoding="utf-8")
    for f in folder.iterdir():
        set_default_file_mode(f)
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(
    output_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    scaler: torch.amp.GradScaler | None = None,
    keep: int = 2,
) -> Path:
    """Write `output_dir/checkpoint-<step>` atomically, point `latest` at it, prune old ones.

    A failed write (disk full, permissions) removes its temporary folder and raises
    CheckpointWriteError; the previous checkpoint is untouched.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{PREFIX}{state.step:06d}"
    tmp = output_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_checkpoint_files(tmp, model, optimizer, state, scaler)
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write(output_dir / LATEST, lambda pointer: pointer.write_text(final.name, encoding="utf-8"))
        _fsync_dir(output_dir)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(output_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        reason = getattr(e, "strerror", None) or str(e)
        raise CheckpointWriteError(f"could not write checkpoint {final}: {reason}; {kept}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(output_dir, keep, final)
    return final


def _prune(output_dir: Path, keep: int, current: Path) -> None:
    for old in list_checkpoints(output_dir)[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    remove_stale_temp_dirs(output_dir)


def load_trainable_tensors(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's trainable tensors, checked against the model: names, shapes, finite values."""
    file = path / TRAINABLE_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is damaged or not a safetensors file ({e})") from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise CheckpointError(
            f"checkpoint {path} does not match the model (missing {missing[:3]}, unexpected {unknown[:3]}); "
            "resume with the same model, method and target_modules"
        )
    for name, tensor in tensors.items():
        if tensor.shape != params[name].shape:
            raise CheckpointError(
                f"{file}: {name} has shape {tuple(tensor.shape)}, the model {tuple(params[name].shape)}; "
                "resume with the same model, method, r and target_modules"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{file}: tensor {name} holds NaN or inf values; the checkpoint cannot be resumed")
    return tensors


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainState:
    """Restore trainable tensors, optimizer, scaler and RNG states in place; return the progress.

    Everything is read and checked before anything is changed. The optimizer's hyperparameters
    (weight decay, betas, per-group LR scale) stay those of `optimizer`: the config of the
    resumed run decides them, the checkpoint only its moment estimates.
    """
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}")
    tensors = load_trainable_tensors(path, model)
    opt = load_state_file(path / OPTIMIZER_FILE)
    rng = load_state_file(path / RNG_FILE)
    state = read_train_state(path)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(opt["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / OPTIMIZER_FILE} does not fit this optimizer: {e}") from None
    for group, own in zip(optimizer.param_groups, hyper, strict=True):
        group.update(own)
    if scaler is not None and opt["scaler"] is not None:
        scaler.load_state_dict(opt["scaler"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device))
    set_rng_state(rng)
    return state
