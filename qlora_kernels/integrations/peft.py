"""PEFT integration: `get_peft_model` puts LoRA on our `QuantLinear` layers, running the fused kernel.

PEFT has no global registry for custom LoRA layers; its experimental custom-module API maps
base-layer types to LoRA classes per `LoraConfig` (``config._register_custom_module``), and the
mapping is not saved with the adapter. So:

    config = register_lora_layers(LoraConfig(r=16, target_modules=["q_proj", "v_proj"]), model)
    model = get_peft_model(model, config)  # or SFTTrainer(..., peft_config=config)

and to load a saved adapter onto a quantized model, `load_peft_adapter(model, adapter_dir)`.
The saved files are plain PEFT adapters: they load with ``PeftModel.from_pretrained`` on the
dense (bf16 / fp32) model as well, and with `qlora_kernels.load_adapter`.

PEFT's ``target_modules="all-linear"`` only matches `nn.Linear` / `Conv1D`; pass the model to
`register_lora_layers` and it expands "all-linear" to include the `QuantLinear` layers.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..nn import QuantLinear
from ..tuning.targets import linear_modules, output_head

__all__ = ["QuantLoraLinear", "load_peft_adapter", "register_lora_layers"]


class QuantLoraLinear(PeftLoraLinear):
    """PEFT LoRA layer on a `QuantLinear`: one fused `qlora_linear` call for base + LoRA.

    The fused path serves the common training case: one active adapter, no dropout in effect
    (p=0 or eval mode), no ``lora_bias``. Anything else (dropout while training, several active
    adapters, ``adapter_names`` mixed batches, disabled adapters) takes PEFT's generic path on
    the same layer. Merging dequantizes, adds B @ A and requantizes in the layer's format, which
    rounds (as bitsandbytes' 4-bit merge does).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        if config.use_dora:
            raise ValueError(
                "QuantLoraLinear does not support DoRA (use_dora=True); train plain LoRA on the quantized base"
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False  # QuantLinear stores W as (out, in) whatever the original layer was

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        if isinstance(module, QuantLinear):
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(
                f"QuantLoraLinear supports plain LoRA only, not the {type(variant).__name__} variant; "
                "remove that option from the LoraConfig"
            )
        return None

    def _fused_adapter(self, kwargs: dict[str, Any]) -> str | None:
        """The one adapter the fused kernel can run now, or None for PEFT's generic path."""
        if self.disable_adapters or self.merged or any(v is not None for v in kwargs.values()):
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        dropout = self.lora_dropout[name]
        if self.lora_bias.get(name, False) or (self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0):
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if args else self._fused_adapter(kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base: QuantLinear = self.get_base_layer()
        return base.qlora(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the packed weight (dequantize, add, requantize)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base: QuantLinear = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            if self.lora_bias.get(name, False):
                raise ValueError(f"cannot merge adapter {name!r}: lora_bias=True is not supported on a QuantLinear")
            weight = base.dequantized_weight(torch.float32) + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name!r} seems to be broken")
            base.replace_weight(base.quantize_like(weight))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapters again (requantizes, so the base is not restored bit for bit)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        warnings.warn(
            "Unmerging LoRA from a quantized layer requantizes it: the weights differ from the original by rounding",
            stacklevel=2,
        )
        base: QuantLinear = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            weight = base.dequantized_weight(torch.float32) - self.get_delta_weight(name).float()
            base.replace_weight(base.quantize_like(weight))

    def __repr__(self) -> str:
        return "lora.QuantLoraLinear" + super().__repr__().removeprefix("lora.Linear")


def register_lora_layers(config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
    """Map `QuantLinear` to `QuantLoraLinear` in `config` (in place; returned for chaining).

    With `model`, ``target_modules="all-linear"`` is expanded to every linear layer of the model,
    quantized ones included, except the output head (PEFT's own expansion skips `QuantLinear`).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    targets = config.target_modules
    if model is not None and isinstance(targets, str) and targets.lower() == "all-linear":
        head = output_head(model)
        config.target_modules = {name for name, module in linear_modules(model).items() if module is not head}
    return config


def load_peft_adapter(
    model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """`PeftModel.from_pretrained` for a model with `QuantLinear` layers (registers the layer mapping first)."""
    config = register_lora_layers(LoraConfig.from_pretrained(str(adapter_dir)))
    config.inference_mode = not is_trainable
    return PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable, config=config
    )
