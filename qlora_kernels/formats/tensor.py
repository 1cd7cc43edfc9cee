"""`QuantizedTensor`: a frozen weight matrix in one of the packed formats.

Layouts (weight W of shape (N, K): N output features, K input features):

* ``int8``: ``data`` int8 (N, K); ``scales`` fp32 (N,). W[n, k] = data[n, k] * scales[n].
* ``int4``: ``data`` uint8 (N, K/2), two codes a byte (see `packing`); ``scales`` fp16
  (N, K/G); affine: ``mins`` fp16 (N, K/G), W = q * s + m; symmetric: no ``mins``,
  W = (q - 8) * s.
* ``nf4``: ``data`` uint8 (N, K/2); blocks of G over the row-major flattened W, and
  since G divides K a block never spans two rows. W = NF4_LEVELS[q] * absmax[block].
  ``scales`` holds absmax: fp32 (N*K/G,), or with double quantization uint8 codes of
  the dynamic table, decoded as dynamic[code] * absmax_scales[block // 256] + absmax_offset.

All layouts keep a K-tile of one row contiguous, so a kernel loads it in one wide load.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

FORMATS: tuple[str, ...] = ("int8", "int4", "nf4")
_FORMAT_IDS = {name: i for i, name in enumerate(FORMATS)}
#: Blocks of NF4 absmax values that share one fp32 scale under double quantization.
NESTED_BLOCK = 256
_STATE_VERSION = 1
_TENSOR_FIELDS = ("data", "scales", "mins", "absmax_scales", "absmax_offset")


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Packed weight + scales + the metadata needed to decode them (see module docstring)."""

    format: str
    shape: tuple[int, int]
    group_size: int
    data: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    absmax_scales: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    symmetric: bool = False

    # ----------------------------------------------------------------- properties
    @property
    def double_quant(self) -> bool:
        """True when NF4's absmax values are themselves 8-bit quantized."""
        return self.absmax_scales is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def numel(self) -> int:
        """Logical element count of the dense weight."""
        return self.shape[0] * self.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (absent optional fields left out)."""
        out = {}
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_param(self) -> float:
        """Storage bits per logical weight element, scales and nested statistics included."""
        return 8.0 * self.nbytes / self.numel()

    # ------------------------------------------------------------------ decoding
    def dequantize(self, dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> torch.Tensor:
        """Decode to a dense (N, K) tensor of `dtype`.

        backend: ``"torch"`` (pure PyTorch reference), ``"triton"`` (kernels; CUDA, or the
        CPU under ``TRITON_INTERPRET=1``), ``"native"`` (the optional C++ extension), or
        ``"auto"`` (Triton on CUDA, otherwise the fastest available CPU path).
        """
        from .backends import dequantize_with

        return dequantize_with(self, dtype, backend)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy with every stored tensor on `device`."""
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def __repr__(self) -> str:
        extra = ", symmetric" if self.symmetric else ""
        extra += ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedTensor(format={self.format!r}, shape={self.shape}, group_size={self.group_size}"
            f"{extra}, bits_per_param={self.bits_per_param:.3f}, device={self.device})"
        )

    # ------------------------------------------------------------- serialisation
    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors to save, plus a ``meta`` tensor holding format, shape and options."""
        meta = torch.tensor(
            [
                _STATE_VERSION,
                _FORMAT_IDS[self.format],
                self.shape[0],
                self.shape[1],
                self.group_size,
                int(self.symmetric),
                int(self.double_quant),
            ],
            dtype=torch.int64,
        )
        out = {prefix + "meta": meta}
        out.update({prefix + name: t for name, t in self.tensors().items()})
        return out

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        prefix: str = "",
        *,
        expect_format: str | None = None,
        expect_shape: tuple[int, int] | None = None,
    ) -> QuantizedTensor:
        """Rebuild from `state_dict()` output; checks every tensor against the metadata."""
        if prefix + "meta" not in state:
            raise ValueError(
                f"state dict has no '{prefix}meta' entry: it was not written by QuantizedTensor.state_dict()"
            )
        version, fmt_id, n, k, group, symmetric, double_quant = (int(v) for v in state[prefix + "meta"].tolist())
        if version != _STATE_VERSION:
            raise ValueError(f"state dict version {version} is not supported (expected {_STATE_VERSION})")
        fmt = FORMATS[fmt_id]
        if expect_format is not None and fmt != expect_format:
            raise ValueError(f"state dict holds a {fmt!r} weight, but a {expect_format!r} weight was expected")
        if expect_shape is not None and (n, k) != tuple(expect_shape):
            raise ValueError(
                f"state dict holds a weight of shape {(n, k)}, but shape {tuple(expect_shape)} was expected"
            )
        fields = {name: state.get(prefix + name) for name in _TENSOR_FIELDS}
        qt = cls(format=fmt, shape=(n, k), group_size=group, symmetric=bool(symmetric), **fields)
        if qt.double_quant != bool(double_quant):
            raise ValueError("state dict is inconsistent: double-quant flag does not match the stored tensors")
        validate_layout(qt)
        return qt

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (atomically: temp file + rename)."""
        from .io import save_quantized

        save_quantized(self, path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> QuantizedTensor:
        """Read a file written by `save`."""
        from .io import load_quantized

        return load_quantized(path, device=device)


def expected_layout(qt: QuantizedTensor) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
    """Shape and dtype every field must have for `qt`'s format and options."""
    n, k = qt.shape
    g = qt.group_size
    if qt.format == "int8":
        return {
            "data": ((n, k), torch.int8),
            "scales": ((n,), torch.float32),
            "mins": None,
            "absmax_scales": None,
            "absmax_offset": None,
        }
    if qt.format == "int4":
        mins = None if qt.symmetric else ((n, k // g), torch.float16)
        return {
            "data": ((n, k // 2), torch.uint8),
            "scales": ((n, k // g), torch.float16),
            "mins": mins,
            "absmax_scales": None,
            "absmax_offset": None,
        }
    blocks = n * k // g
    if qt.double_quant:
        return {
            "data": ((n, k // 2), torch.uint8),
            "scales": ((blocks,), torch.uint8),
            "mins": None,
            "absmax_scales": ((math.ceil(blocks / NESTED_BLOCK),), torch.float32),
            "absmax_offset": ((1,), torch.float32),
        }
    return {
        "data": ((n, k // 2), torch.uint8),
        "scales": ((blocks,), torch.float32),
        "mins": None,
        "absmax_scales": None,
        "absmax_offset": None,
    }


def validate_layout(qt: QuantizedTensor) -> None:
    """Raise ValueError unless every stored tensor has the shape and dtype of the format."""
    if qt.format not in FORMATS:
        raise ValueError(f"unknown format {qt.format!r}; expected one of {FORMATS}")
    for name, spec in expected_layout(qt).items():
        value = getattr(qt, name)
        if spec is None:
            if value is not None:
                raise ValueError(f"{qt.format} weight must not have a '{name}' tensor")
            continue
        shape, dtype = spec
        if value is None:
            raise ValueError(f"{qt.format} weight is missing its '{name}' tensor")
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise ValueError(
                f"{qt.format} weight of shape {qt.shape}: '{name}' should be {dtype} {shape}, "
                f"got {value.dtype} {tuple(value.shape)}"
            )
