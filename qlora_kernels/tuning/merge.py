"""`merge`: fold LoRA into the base weights and return a plain transformers model.

``into="base"`` folds into the layer as it is: a dense base exactly (up to its dtype), a quantized
base by dequantize + add + requantize, which loses accuracy (peft #2321, unsloth #1519), so the
relative error per layer is reported. ``into="bf16" | "fp16" | "fp32"`` dequantizes every
quantized layer and merges into dense weights of that dtype: the portable choice that
``save_pretrained`` / ``from_pretrained`` round-trip. Errors land in ``model.qk_merge_errors``.

Every LoRA layer is checked before the first one is changed: NaN/inf in A, B or the scaling, or
a merged weight beyond the target dtype's range, raises a ValueError naming the layer and leaves
the model as it was.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..nn import LoRALinear, QuantLinear
from .config import get_config, parse_dtype
from .targets import set_submodule

log = logging.getLogger(__name__)
MERGE_TARGETS = ("base", "bf16", "fp16", "fp32")


def _dense(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(dtype))
    return layer


def check_mergeable(model: nn.Module, into: str) -> None:
    """Raise a ValueError naming the first LoRA layer whose merge would give NaN/inf weights."""
    dtype = None if into == "base" else parse_dtype(into, "into")
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        for part in ("lora_A", "lora_B"):
            weight = getattr(module, part).weight
            bad = int((~torch.isfinite(weight)).sum())
            if bad:
                raise ValueError(
                    f"cannot merge: {name}.{part}.weight holds {bad} NaN/inf value(s); the adapter is damaged "
                    "(a diverged run?), merging it would make the model output NaN"
                )
        if not math.isfinite(module.scaling):
            raise ValueError(f"cannot merge: {name} has a non-finite LoRA scaling {module.scaling}")
        target_dtype = dtype or (module.base.weight.dtype if isinstance(module.base, nn.Linear) else None)
        if target_dtype == torch.float16:  # the one target whose range is far below fp32's
            limit = torch.finfo(target_dtype).max
            largest = (module.base_weight(torch.float32) + module.delta_weight()).abs().max().item()
            if largest > limit:
                raise ValueError(
                    f"cannot merge {name} into {target_dtype}: a merged weight reaches {largest:.3g}, beyond the "
                    f"dtype's range ({limit:.3g}); merge into bf16 or fp32"
                )


def _rel_err(stored: torch.Tensor, target: torch.Tensor) -> float:
    return ((stored.float() - target).norm() / target.norm().clamp(min=1e-30)).item()


@torch.no_grad()
def merge(model: nn.Module, into: str = "base") -> nn.Module:
    """Fold the LoRA updates into the weights; returns the same model object, without LoRA layers.

    Bottleneck adapters and soft prompts are not linear in the weights and cannot be merged
    (the lecture's point); partial / full training has nothing to fold, so merge only cleans up.
    """
    if into not in MERGE_TARGETS:
        raise ValueError(f"into must be one of {MERGE_TARGETS}, got {into!r}")
    cfg = get_config(model)
    if cfg.method in ("adapter", "prompt"):
        raise ValueError(
            f"method={cfg.method!r} adds modules that cannot be folded into the weights; keep the adapter "
            "(qk.save_adapter) and load it on the base model for inference"
        )
    check_mergeable(model, into)
    dtype = None if into == "base" else parse_dtype(into, "into")
    errors: dict[str, float] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        if dtype is None:
            errors[name] = module.merge()
            new = module.base
            if isinstance(new, nn.Linear):
                new.weight.requires_grad_(True)
        else:
            target = module.base_weight(torch.float32) + module.delta_weight()
            new = _dense(target, module.base.bias, dtype)
            errors[name] = _rel_err(new.weight, target)
        set_submodule(model, name, new)
    if dtype is not None:
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantLinear):
                set_submodule(model, name, _dense(module.dequantized_weight(torch.float32), module.bias, dtype))
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        if getattr(model, "config", None) is not None:
            model.config.dtype = dtype
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "disable_input_require_grads") and getattr(model, "_require_grads_hooks", None):
        model.disable_input_require_grads()
    if errors:
        worst = max(errors, key=errors.get)
        log.info(
            "merged %d LoRA layers into %s; worst relative weight error %.3g (%s)",
            len(errors),
            into,
            errors[worst],
            worst,
        )
    del model.qk_config
    model.qk_merge_errors = errors
    return model
