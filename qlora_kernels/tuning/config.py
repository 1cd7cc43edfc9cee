"""`TuningConfig`: what `prepare_model` did to a model, so save / load / merge know the method and options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

METHODS = ("qlora", "lora", "adapter", "prompt", "partial", "full")
PARTIAL_POLICIES = ("head", "top_k", "no_embeddings")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: torch.dtype | str, arg: str = "compute_dtype") -> torch.dtype:
    """torch dtype from a dtype or its name ("bf16", "bfloat16", "fp32", ...)."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32"}
    name = aliases.get(str(value), str(value).removeprefix("torch."))
    if name not in DTYPES:
        raise ValueError(f"{arg} must be one of torch.float32 / torch.bfloat16 / torch.float16, got {value!r}")
    return DTYPES[name]


@dataclass
class TuningConfig:
    """The method and resolved options of a prepared model (stored as ``model.qk_config``)."""

    method: str
    compute_dtype: str | None  # None: frozen weights kept their own dtypes
    quant: str | None = None
    group_size: int | None = None
    double_quant: bool = True
    # LoRA
    r: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    target_modules: list[str] = field(default_factory=list)  # resolved full module names
    # bottleneck adapters
    bottleneck: int | None = None
    adapter_activation: str = "gelu"
    adapter_blocks: list[str] = field(default_factory=list)  # full names of the host blocks
    # prompt tuning
    num_virtual_tokens: int | None = None
    prompt_init_text: str | None = None
    token_dim: int | None = None
    # partial
    policy: str | None = None
    k: int | None = None
    trainable: list[str] = field(default_factory=list)  # parameter names trained (partial / full)
    quantized_modules: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    base_model_name_or_path: str | None = None
    model_signature: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuningConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """Architecture facts an adapter must agree with (compared on load)."""
    config = getattr(model, "config", None)
    sig: dict[str, Any] = {"class": type(model).__name__}
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if config is not None and getattr(config, key, None) is not None:
            sig[key] = getattr(config, key)
    return sig


def get_config(model: torch.nn.Module) -> TuningConfig:
    """The model's `TuningConfig`; a clear error if `prepare_model` was not applied."""
    cfg = getattr(model, "qk_config", None)
    if not isinstance(cfg, TuningConfig):
        raise ValueError(
            "model was not prepared by qk.prepare_model (no model.qk_config); call qk.prepare_model(model, method=...) "
            "first, or qk.load_adapter(model, dir) on a fresh model"
        )
    return cfg
