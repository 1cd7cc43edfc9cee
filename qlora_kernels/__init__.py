"""qlora-kernels: quantized LoRA fine-tuning kernels, layers and a small SFT trainer."""

import os as _os
import sys as _sys

# Idle OpenMP threads sleep instead of spinning, as under the `qlora-kernels` command: with
# busy-waiting, small matmuls (decoding, small batches) lose whole scheduler ticks whenever another
# process shares the cores. OpenMP reads this once, when torch loads, so it only takes effect when
# this package is imported before torch; an explicit OMP_WAIT_POLICY always wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import ops as _ops  # noqa: F401  (registers kernel backends; imports no triton yet)
from .formats import FORMATS, QuantizedTensor, quantize
from .models import load_model
from .nn import BottleneckAdapter, LoRALinear, PromptEmbedding, QuantLinear
from .ops import qlora_linear, qlora_linear_ref
from .tuning import (
    TuningConfig,
    count_parameters,
    load_adapter,
    merge,
    param_groups,
    prepare_model,
    print_trainable_parameters,
    save_adapter,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # transformers' quantizer registry costs ~1 s to import: load it only when the config is used
    if name == "QLoRAKernelsConfig":
        from .integrations.transformers import QLoRAKernelsConfig

        return QLoRAKernelsConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "BottleneckAdapter",
    "LoRALinear",
    "PromptEmbedding",
    "QuantLinear",
    "QuantizedTensor",
    "TuningConfig",
    "__version__",
    "count_parameters",
    "load_adapter",
    "load_model",
    "merge",
    "param_groups",
    "prepare_model",
    "print_trainable_parameters",
    "qlora_linear",
    "qlora_linear_ref",
    "quantize",
    "save_adapter",
]
