"""The bottom layer: constants, argument checks and file helpers that every other layer may import.

It imports nothing from the rest of the package, so any module can depend on it without a cycle
(see docs/architecture.md).
"""

from .checks import check_bool, check_device, check_int, check_real
from .constants import FLOAT_DTYPES, IGNORE_INDEX
from .files import atomic_save_safetensors, atomic_write, load_safetensors

__all__ = [
    "FLOAT_DTYPES",
    "IGNORE_INDEX",
    "atomic_save_safetensors",
    "atomic_write",
    "check_bool",
    "check_device",
    "check_int",
    "check_real",
    "load_safetensors",
]
