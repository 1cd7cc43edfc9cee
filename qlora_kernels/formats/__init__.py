"""Weight formats: int8 (per row), int4 (group-wise) and NF4 (QLoRA), packed for the kernels."""

from .backends import available_dequant_backends, register_dequant_backend, set_auto_policy
from .codebooks import NF4_LEVELS, dynamic_table, nf4_table
from .io import atomic_save_safetensors, load_quantized, save_quantized
from .packing import pack_nibbles, unpack_nibbles
from .quantize import GROUP_SIZES, quantize
from .reference import codes, dequantize_reference, nf4_absmax
from .tensor import FORMATS, NESTED_BLOCK, QuantizedTensor

__all__ = [
    "FORMATS",
    "GROUP_SIZES",
    "NESTED_BLOCK",
    "NF4_LEVELS",
    "QuantizedTensor",
    "atomic_save_safetensors",
    "available_dequant_backends",
    "codes",
    "dequantize_reference",
    "dynamic_table",
    "load_quantized",
    "nf4_absmax",
    "nf4_table",
    "pack_nibbles",
    "quantize",
    "register_dequant_backend",
    "save_quantized",
    "set_auto_policy",
    "unpack_nibbles",
]
