"""qlora-kernels: quantized LoRA fine-tuning kernels, layers and a small SFT trainer."""

from . import ops as _ops  # noqa: F401  (registers kernel backends; imports no triton yet)
from .formats import FORMATS, QuantizedTensor, quantize
from .nn import LoRALinear, QuantLinear
from .ops import qlora_linear, qlora_linear_ref

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "LoRALinear",
    "QuantLinear",
    "QuantizedTensor",
    "__version__",
    "qlora_linear",
    "qlora_linear_ref",
    "quantize",
]
