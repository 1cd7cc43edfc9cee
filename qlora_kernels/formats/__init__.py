"""Weight formats: int8 (per row), int4 (group-wise) and NF4 (QLoRA), packed for the kernels.

Modules, bottom to top (each imports only those before it): `layout` (format ids, group rules,
stored tensors), `codebooks` and `packing`, `reference` (pure-PyTorch encode / decode),
`backends` (decoder registry and the "auto" policy), `tensor` (`QuantizedTensor`, state dicts
and files), `quantize` (the entry point). See docs/architecture.md.
"""

from ..common import atomic_save_safetensors
from .backends import auto_backend, available_dequant_backends, register_dequant_backend
from .codebooks import NF4_LEVELS, dynamic_table, nf4_table
from .layout import FORMAT_IDS, FORMATS, GROUP_SIZES, NESTED_BLOCK
from .packing import pack_nibbles, unpack_nibbles
from .quantize import quantize
from .reference import codes, dequantize_reference, nf4_absmax
from .tensor import TENSOR_FIELDS, QuantizedTensor, load_quantized, save_quantized

__all__ = [
    "FORMATS",
    "FORMAT_IDS",
    "GROUP_SIZES",
    "NESTED_BLOCK",
    "NF4_LEVELS",
    "TENSOR_FIELDS",
    "QuantizedTensor",
    "atomic_save_safetensors",
    "auto_backend",
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
    "unpack_nibbles",
]
