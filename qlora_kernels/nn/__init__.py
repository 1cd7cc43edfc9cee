"""Modules: QuantLinear, LoRALinear (and, from the tuning layer, adapters and soft prompts)."""

from .adapter import BottleneckAdapter
from .lora_linear import LoRALinear
from .prompt import PromptEmbedding
from .quant_linear import QuantLinear

__all__ = ["BottleneckAdapter", "LoRALinear", "PromptEmbedding", "QuantLinear"]
