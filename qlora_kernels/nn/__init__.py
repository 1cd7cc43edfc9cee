"""Modules: QuantLinear, LoRALinear (and, from the tuning layer, adapters and soft prompts)."""

from .lora_linear import LoRALinear
from .quant_linear import QuantLinear

__all__ = ["LoRALinear", "QuantLinear"]
