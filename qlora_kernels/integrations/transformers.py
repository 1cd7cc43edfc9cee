"""transformers integration: ``from_pretrained(..., quantization_config=QLoRAKernelsConfig("nf4"))``.

Importing this module registers the quant method ``"qlora_kernels"`` with transformers'
quantizer registry (``qlora_kernels.QLoRAKernelsConfig`` imports it on first use, so plain
``import qlora_kernels`` does not pay for transformers). What loading does:

* Quantizing while loading: the target `nn.Linear` / `Conv1D` layers stay on the meta device;
  as each weight is read from its shard it is quantized at once and its layer replaced by a
  `QuantLinear`, so the dense weights never sit in memory together.
* Saving: ``save_pretrained`` writes the packed buffers (``<layer>.weight_data``, ``weight_scales``,
  ...) as safetensors and the config under ``quantization_config`` in config.json.
* Loading a saved folder: the targets become empty `QuantLinear` shells before loading and the
  packed tensors are copied in as they are (bit-identical, no requantization). This module must
  have been imported first (``import qlora_kernels.integrations.transformers`` or touch
  ``qk.QLoRAKernelsConfig``), or transformers does not know the quant method.

The quantizer says it is trainable, so the HF Trainer and TRL accept the model with a PEFT
adapter (see `qlora_kernels.integrations.peft`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats import FORMATS, GROUP_SIZES, QuantizedTensor, quantize
from ..formats.layout import layout
from ..formats.quantize import resolve_group_size
from ..formats.tensor import validate_layout
from ..nn import QuantLinear
from ..nn.dense import dense_weight, in_out_features, is_conv1d, is_dense_linear
from ..tuning.config import dtype_name, parse_dtype
from ..tuning.targets import set_submodule
from .load_memory import MappedCheckpoint

QUANT_METHOD = "qlora_kernels"

__all__ = ["QUANT_METHOD", "QLoRAKernelsConfig", "QLoRAKernelsHfQuantizer"]


class QLoRAKernelsConfig(QuantizationConfigMixin):
    """Quantize the linear layers of a transformers model to int8 / int4 / NF4 while loading.

    format: "nf4" (default), "int4" or "int8". group_size: block / group along the input features
    (32, 64, 128 or 256; None picks 64, or the largest smaller size that divides the layer);
    int8 takes None. modules_to_not_convert: modules to keep dense, each named by a dotted part of
    the full name (``"lm_head"``, ``"mlp"``, ``"model.layers.0"``) or a transformers pattern, on
    top of what transformers always keeps (the output head, tied weights, the model's
    ``_keep_in_fp32_modules``). compute_dtype: dtype the quantized matmuls run in (inputs cast to
    it, outputs cast back); None computes in the input's dtype. double_quant: NF4 absmax values
    stored as 8-bit codes. symmetric: int4 without zero points.
    """

    def __init__(
        self,
        format: str = "nf4",
        group_size: int | None = None,
        modules_to_not_convert: list[str] | None = None,
        compute_dtype: torch.dtype | str | None = None,
        double_quant: bool = True,
        symmetric: bool = False,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise TypeError(f"QLoRAKernelsConfig got unknown options {unknown}")
        if kwargs.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {kwargs['quant_method']!r}")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if format == "int8" and group_size is not None:
            raise ValueError("int8 uses one scale per output row: pass group_size=None")
        if group_size is not None and group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} or None, got {group_size!r}")
        if symmetric and format != "int4":
            raise ValueError("symmetric=True applies to format='int4' only")
        if modules_to_not_convert is not None and (
            isinstance(modules_to_not_convert, str) or not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise TypeError(f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}")
        self.quant_method = QUANT_METHOD
        self.format = format
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.compute_dtype = parse_dtype(compute_dtype) if compute_dtype is not None else None
        self.double_quant = bool(double_quant)
        self.symmetric = bool(symmetric)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["compute_dtype"] = dtype_name(self.compute_dtype) if self.compute_dtype is not None else None
        return out

    def layer_group_size(self, in_features: int) -> int:
        """The group size a layer with `in_features` inputs gets (raises ValueError if none fits)."""
        return resolve_group_size(self.format, self.group_size, in_features)


class QLoRAKernelsQuantize(ConversionOps):
    """Loading step for one target weight: quantize it and swap its layer for a `QuantLinear`."""

    def __init__(self, hf_quantizer: QLoRAKernelsHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, Any],
        full_layer_name: str | None = None,
        model: nn.Module | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        _, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        module_name = full_layer_name.rpartition(".")[0]
        layer = model.get_submodule(module_name)
        self.hf_quantizer.replace_with_quantized(model, module_name, layer, value)
        self.hf_quantizer.checkpoint.release(value)
        self.hf_quantizer.checkpoint.trim_heap()
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class QLoRAKernelsHfQuantizer(HfQuantizer):
    """The transformers quantizer behind `QLoRAKernelsConfig` (see the module docstring)."""

    requires_calibration = False
    quantization_config: QLoRAKernelsConfig

    def __init__(self, quantization_config: QLoRAKernelsConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.targets: set[str] = set()
        self.checkpoint = MappedCheckpoint([])

    @property
    def quantized_element_size(self) -> float:
        return 1.0 if self.quantization_config.format == "int8" else 0.5

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "qlora_kernels quantized layers cannot be offloaded to disk; use a device_map without 'disk'"
            )

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name == "weight" and module_name in self.targets

    def get_quantize_ops(self) -> QLoRAKernelsQuantize:
        return QLoRAKernelsQuantize(self)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        config = self.quantization_config
        skip = self.get_modules_to_not_convert(
            model, config.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True
        )
        targets = {
            name: module
            for name, module in model.named_modules()
            if name and is_dense_linear(module) and not _skipped(name, skip)
        }
        for name, module in targets.items():
            in_features = in_out_features(module)[0]
            try:
                config.layer_group_size(in_features)
            except ValueError as exc:
                raise ValueError(
                    f"cannot quantize {name} (in_features={in_features}): {exc}; "
                    "or keep it dense with QLoRAKernelsConfig(modules_to_not_convert=[...])"
                ) from None
        self.targets = set(targets)
        self.checkpoint = MappedCheckpoint(kwargs.get("checkpoint_files") or [])
        if self.pre_quantized:
            for name, module in targets.items():
                set_submodule(model, name, self._empty_layer(module))

    def replace_with_quantized(self, model: nn.Module, name: str, module: nn.Module, weight: torch.Tensor) -> None:
        """Quantize `weight` (as stored by `module`) and put a `QuantLinear` in `module`'s place."""
        config = self.quantization_config
        if is_conv1d(module):
            weight = weight.t()
        qt = quantize(
            weight.contiguous(),
            config.format,
            config.layer_group_size(weight.shape[1]),
            symmetric=config.symmetric,
            double_quant=config.double_quant,
        )
        dtype = module.weight.dtype if module.weight.is_floating_point() else weight.dtype
        layer = QuantLinear(qt, module.bias, dtype=dtype, compute_dtype=config.compute_dtype)
        layer._is_hf_initialized = True
        set_submodule(model, name, layer)

    def _empty_layer(self, module: nn.Module) -> QuantLinear:
        """A `QuantLinear` shell with meta tensors of the exact layout the saved weight has."""
        config = self.quantization_config
        in_features, out_features = in_out_features(module)
        group = config.layer_group_size(in_features)
        fields = {
            name: torch.empty(shape, dtype=dtype, device="meta")
            for name, (shape, dtype) in layout(
                config.format,
                (out_features, in_features),
                group,
                symmetric=config.symmetric,
                double_quant=config.format == "nf4" and config.double_quant,
            ).items()
        }
        qt = QuantizedTensor(config.format, (out_features, in_features), group, symmetric=config.symmetric, **fields)
        layer = QuantLinear(qt, module.bias, dtype=dense_weight(module).dtype, compute_dtype=config.compute_dtype)
        layer._is_hf_initialized = True
        return layer

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        modules = dict(model.named_modules())
        for name in sorted(self.targets):
            layer = modules.get(name)
            if not isinstance(layer, QuantLinear):
                raise ValueError(
                    f"{name} was not quantized while loading (its weight is missing from the checkpoint or could "
                    "not be converted; see the loading report above)"
                )
            on_meta = [k for k, t in layer.state_dict().items() if t.is_meta]
            if on_meta:
                raise ValueError(f"{name}: {on_meta} were not in the checkpoint; the saved folder is incomplete")
            qt = layer.qweight
            validate_layout(qt)
            if not torch.equal(layer.weight_meta.cpu(), qt.state_dict()["meta"]):
                raise ValueError(
                    f"{name}: the packed weight in the checkpoint was made with other options than "
                    f"{self.quantization_config.to_dict()}"
                )
            layer.requires_grad_(False)
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantLinear):
                want = dtype or module.dtype
                dense = nn.Linear(
                    module.in_features,
                    module.out_features,
                    bias=module.bias is not None,
                    device=module.weight_data.device,
                    dtype=want,
                )
                with torch.no_grad():
                    dense.weight.copy_(module.dequantized_weight(torch.float32))
                    if module.bias is not None:
                        dense.bias.copy_(module.bias)
                set_submodule(model, name, dense)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return False


def _skipped(name: str, patterns: list[str]) -> bool:
    """True if a dotted part of `name` is one of `patterns`, or transformers' own matching says so."""
    dotted = f".{name}."
    return any(f".{p}." in dotted for p in patterns) or not should_convert_module(name, patterns)


def _register() -> None:
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QLoRAKernelsConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QLoRAKernelsHfQuantizer)


_register()
