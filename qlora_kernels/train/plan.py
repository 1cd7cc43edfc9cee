"""Plan a training run: check everything that can be checked before a weight loads or a file changes.

`plan_run` reads the config, the data files (parsed, not yet tokenized), the output folder,
the checkpoint to resume from and the model's architecture (on the meta device: layer names
and widths, no weights). Anything wrong raises `ConfigError` or `DataError` naming the key or
file and the fix. `trainer.train` then applies the plan.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, find_intact_checkpoint, read_train_state
from .config import ConfigError, TrainConfig
from .data import read_jsonl

# A checkpoint fits a config only if these match: they decide the trainable tensors and the data order.
RESUME_MUST_MATCH = (
    "model",
    "method",
    "quant",
    "group_size",
    "r",
    "alpha",
    "target_modules",
    "bottleneck",
    "num_virtual_tokens",
    "policy",
    "k",
    "batch_size",
    "seed",
)
# These shape the learning-rate schedule: changing them on resume needs an explicit yes.
SCHEDULE_KEYS = ("max_steps", "lr", "warmup_steps", "min_lr_ratio", "time_budget_s")
LORA_METHODS = ("qlora", "lora")


@dataclass
class RunPlan:
    """A checked run: the config (a private copy), where it runs, its data records and where it starts."""

    cfg: TrainConfig
    device: torch.device
    output_dir: Path
    train_records: list[dict[str, Any]]
    eval_records: list[dict[str, Any]]
    resume_from: Path | None = None
    start_step: int = 0
    max_steps: int = 0  # the effective value: a resumed time-budget run continues with its own
    notes: list[str] = field(default_factory=list)


def plan_run(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    change_schedule: bool = False,
    model: nn.Module | None = None,
    has_eval_fn: bool = False,
) -> RunPlan:
    """Check `cfg` against the machine, the files and the model; returns the plan (nothing is changed)."""
    cfg = copy.deepcopy(cfg)
    cfg.validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "fp16" and device.type != "cuda":
        raise ConfigError("dtype 'fp16' needs CUDA (it trains with a grad scaler); use dtype bf16 or fp32 on the CPU")
    if not cfg.train_file:
        raise ConfigError("config key 'train_file' is empty: point it at a JSONL file of training records")
    if cfg.eval_every and not cfg.eval_file and not has_eval_fn:
        raise ConfigError(f"eval_every={cfg.eval_every} but eval_file is empty: set eval_file, or eval_every=0")
    if Path(cfg.model).expanduser().exists():  # a local folder or file: recorded absolute, found from anywhere
        cfg.model = str(Path(cfg.model).expanduser().resolve())
    cfg.train_file = str(Path(cfg.train_file).expanduser().resolve())
    train_records = read_jsonl(cfg.train_file)
    eval_records: list[dict[str, Any]] = []
    if cfg.eval_file:
        cfg.eval_file = str(Path(cfg.eval_file).expanduser().resolve())
        eval_records = read_jsonl(cfg.eval_file)
    output_dir = Path(cfg.output_dir)
    check_writable_dir(output_dir, "output_dir")
    plan = RunPlan(cfg, device, output_dir, train_records, eval_records, max_steps=cfg.max_steps)
    if resume:
        _plan_resume(plan, change_schedule)
    check_model_fits(cfg, model if model is not None else _meta_model(cfg.model))
    return plan


def check_writable_dir(path: Path, what: str) -> None:
    """Raise ConfigError unless `path` is a folder we can write, or can be created as one."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; choose another {what}")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} is not writable ({existing} is read-only for this user)")


def _plan_resume(plan: RunPlan, change_schedule: bool) -> None:
    """Pick the newest intact checkpoint and check that it fits the config."""
    ckpt, skipped = find_intact_checkpoint(plan.output_dir)
    for path, problem in skipped:
        plan.notes.append(f"skipping {path}: {problem}")
    if ckpt is None:
        if skipped:
            raise ConfigError(
                f"--resume: no intact checkpoint in {plan.output_dir} ({'; '.join(plan.notes)}); "
                "start over instead (--fresh on the command line, resume=False in Python)"
            )
        plan.notes.append(f"--resume: no checkpoint in {plan.output_dir}, starting from step 0")
        return
    try:
        state = read_train_state(ckpt)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    cfg, saved = plan.cfg, state.config
    differ = [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != getattr(cfg, k)]
    if differ:
        pairs = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in differ)
        raise ConfigError(
            f"--resume: {ckpt} was made with other settings ({pairs}); resume with the checkpoint's settings, "
            "or start over (--fresh on the command line, resume=False in Python)"
        )
    if cfg.max_steps < state.step:
        raise ConfigError(
            f"--resume: max_steps={cfg.max_steps} is below the checkpoint's step {state.step} ({ckpt}); "
            f"set max_steps >= {state.step}"
        )
    changed = [k for k in SCHEDULE_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if changed and not change_schedule:
        pairs = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ConfigError(
            f"--resume: the learning-rate schedule differs from the checkpoint's ({pairs}), so the resumed run "
            "would not be the interrupted one; use the checkpoint's values, or accept the new schedule from step "
            f"{state.step} on (--change-schedule on the command line, change_schedule=True in Python)"
        )
    if changed:
        plan.notes.append(f"--change-schedule: from step {state.step} the schedule follows {', '.join(changed)}")
        plan.max_steps = cfg.max_steps
    else:
        plan.max_steps = int(state.extra.get("max_steps", cfg.max_steps))
    plan.resume_from, plan.start_step = ckpt, state.step


def _meta_model(name: str) -> nn.Module:
    from ..models import meta_model

    try:
        return meta_model(name)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key 'model': {e}") from None


def check_model_fits(cfg: TrainConfig, model: nn.Module) -> None:
    """Check target_modules, r and k against the model's layers (a meta-device model is enough)."""
    from ..tuning.targets import find_blocks, resolve_targets

    if cfg.method in LORA_METHODS:
        try:
            names = resolve_targets(model, cfg.target_modules)
        except ValueError as e:
            raise ConfigError(f"config key 'target_modules': {e}") from None
        modules = dict(model.named_modules())
        width, narrowest = min((min(modules[n].in_features, modules[n].out_features), n) for n in names)
        if cfg.r > width:
            raise ConfigError(
                f"config key 'r' is {cfg.r}, above the width {width} of the targeted layer {narrowest}: a LoRA update "
                f"B A has rank at most min(in, out); choose r <= {width} (8 to 64 is usual)"
            )
    if cfg.method == "partial" and cfg.policy == "top_k":
        try:
            _, blocks = find_blocks(model)
        except ValueError as e:
            raise ConfigError(f"method 'partial': {e}") from None
        if cfg.k > len(blocks):
            raise ConfigError(f"config key 'k' is {cfg.k}, but the model has {len(blocks)} transformer blocks")


def print_notes(plan: RunPlan) -> None:
    for note in plan.notes:
        print(note, file=sys.stderr)
