"""Typed training config: a YAML or JSON file plus `--set key=value` overrides, validated once."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import torch
import yaml

from .precision import Precision, resolve_precision

METHODS = ("qlora", "lora", "adapter", "prompt", "partial", "full")
QUANTS = ("nf4", "int4", "int8", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")
DISTRIBUTED = ("none", "ddp", "fsdp", "auto")  # checked against the launch by train.distributed


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or an invalid value."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved next to its checkpoints so a resume can check it matches."""

    # model and method
    model: str = "smollm2-135m-instruct"
    model_dtype: str = "auto"  # weights as loaded; auto: bf16 where this machine computes bf16 fast, else fp32
    method: str = "qlora"
    quant: str = "nf4"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    bottleneck: int = 64  # method "adapter"
    num_virtual_tokens: int = 20  # method "prompt"
    policy: str = "top_k"  # method "partial": head | top_k | no_embeddings
    k: int = 2  # method "partial", policy "top_k"
    lr_decay: float = 1.0  # layer-wise LR decay of the parameter groups (1: one LR)
    # data
    train_file: str = ""
    eval_file: str = ""
    max_length: int = 256
    # optimisation
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    time_budget_s: float = 0.0  # > 0: every 3 steps, set max_steps (at most as configured) to fit this many seconds
    dtype: str = "auto"  # autocast dtype; auto: bf16 on CUDA and on CPUs with a fast bf16 GEMM, else fp32
    gradient_checkpointing: bool = False
    # bookkeeping
    output_dir: str = "out/run"
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int = 4
    save_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True
    threads: int = 0
    distributed: str = "none"  # under torchrun: ddp | fsdp | auto (ddp when WORLD_SIZE > 1)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the key and the accepted values."""
        checks = [
            (self.method in METHODS, "method", f"one of {METHODS}"),
            (self.quant in QUANTS, "quant", f"one of {QUANTS}"),
            (self.dtype in DTYPES, "dtype", f"one of {DTYPES}"),
            (self.model_dtype in DTYPES, "model_dtype", f"one of {DTYPES}"),
            (self.max_steps >= 1, "max_steps", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.grad_accum >= 1, "grad_accum", ">= 1"),
            (self.lr > 0, "lr", "> 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps", ">= 0"),
            (self.r >= 1, "r", ">= 1"),
            (self.max_length >= 2, "max_length", ">= 2"),
            (self.grad_clip >= 0, "grad_clip", ">= 0 (0 disables clipping)"),
            (self.time_budget_s >= 0, "time_budget_s", ">= 0 (0: no budget)"),
            (len(self.betas) == 2, "betas", "a list of two floats"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1"),
            (0 < self.lr_decay <= 1, "lr_decay", "in (0, 1]"),
            (self.distributed in DISTRIBUTED, "distributed", f"one of {DISTRIBUTED}"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"config key {key!r} must be {expected}, got {getattr(self, key)!r}")
        if self.method == "qlora" and self.quant == "none":
            raise ConfigError("method 'qlora' needs a quant format: set quant to nf4, int4 or int8")

    def precision(self, device: torch.device | None = None) -> Precision:
        """The run's resolved dtypes ("auto" replaced) on `device` (default: CUDA if present, else CPU)."""
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return resolve_precision(self.dtype, self.model_dtype, device)

    @property
    def torch_model_dtype(self) -> torch.dtype:
        """The dtype the model's weights are loaded in, "auto" resolved for this machine."""
        return self.precision().torch_model_dtype

    @property
    def quant_format(self) -> str | None:
        """The weight format for model preparation: None for a dense base ("lora", "full" are never quantized)."""
        return None if self.quant == "none" or self.method in ("lora", "full") else self.quant

    @classmethod
    def from_file(cls, path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
        """Load YAML/JSON (or start from the defaults), apply `key=value` overrides, validate."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            text = path.read_text(encoding="utf-8")
            try:
                data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text) or {}
            except (json.JSONDecodeError, yaml.YAMLError) as e:
                raise ConfigError(f"config file {path} is not valid {path.suffix[1:] or 'YAML'}: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config file {path} must hold a mapping of keys to values")
            base = path.parent
            for key in ("train_file", "eval_file"):  # relative data paths are relative to the config
                if isinstance(data.get(key), str) and data[key] and not Path(data[key]).is_absolute():
                    data[key] = str(base / data[key])
        return cls.from_dict(apply_overrides(data, overrides))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        hints = get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A copy of `data` with `key=value` strings applied; values parse as YAML scalars (3, 1e-4, true, [a, b])."""
    data = dict(data)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        data[key.strip()] = yaml.safe_load(value)
    return data


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a value against the field's type; ints are accepted for floats."""
    hint_s = str(hint)
    if hint is bool or hint_s == "bool":
        if isinstance(value, bool):
            return value
    elif hint is int or hint_s == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float or hint_s == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str or hint_s == "str":
        if isinstance(value, str):
            return value
    elif "list" in hint_s:
        if isinstance(value, list):
            return value
        if isinstance(value, str) and "str" in hint_s:
            return value
    else:
        return value
    expected = getattr(hint, "__name__", hint_s)
    raise ConfigError(f"config key {key!r} expects {expected}, got {value!r} ({type(value).__name__})")
