"""Model surgery: prepare_model (LoRA, QLoRA, adapters, prompt tuning, partial, full), adapter I/O, merge."""

from .config import METHODS, PARTIAL_POLICIES, TuningConfig, get_config
from .io import load_adapter, save_adapter
from .merge import merge
from .params import count_parameters, print_trainable_parameters
from .partial import param_groups
from .prepare import prepare_model

__all__ = [
    "METHODS",
    "PARTIAL_POLICIES",
    "TuningConfig",
    "count_parameters",
    "get_config",
    "load_adapter",
    "merge",
    "param_groups",
    "prepare_model",
    "print_trainable_parameters",
    "save_adapter",
]
