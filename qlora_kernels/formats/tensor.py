"""`QuantizedTensor`: a frozen weight matrix in one of the packed formats (layouts: `layout`).

The class holds the stored tensors and the metadata to decode them, checks both when a weight
comes from a state dict or a file, and decodes through the backends registry. Every list of
its stored tensors derives from the one declaration below (`TENSOR_FIELDS`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..common import atomic_save_safetensors, check_device, load_safetensors
from .backends import dequantize_with
from .layout import FORMAT_IDS, FORMATS, check_group_size, layout

#: Version of the state-dict / file layout; bumped when it changes incompatibly.
STATE_VERSION = 1
#: The integers of the ``meta`` entry of a state dict, in order.
META_FIELDS: tuple[str, ...] = (
    "version",
    "format_id",
    "out_features",
    "in_features",
    "group_size",
    "symmetric",
    "double_quant",
)


def _stored(*, optional: bool = False) -> Any:
    """Declares a dataclass field as a stored tensor (listed in TENSOR_FIELDS)."""
    if optional:
        return dataclasses.field(default=None, metadata={"stored": True})
    return dataclasses.field(metadata={"stored": True})


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Packed weight + scales + the metadata needed to decode them (layouts: `qlora_kernels.formats.layout`)."""

    format: str
    shape: tuple[int, int]
    group_size: int
    data: torch.Tensor = _stored()
    scales: torch.Tensor = _stored()
    mins: torch.Tensor | None = _stored(optional=True)
    absmax_scales: torch.Tensor | None = _stored(optional=True)
    absmax_offset: torch.Tensor | None = _stored(optional=True)
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
        return {name: getattr(self, name) for name in TENSOR_FIELDS if getattr(self, name) is not None}

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
        return dequantize_with(self, dtype, backend)

    def to(self, device: torch.device | str, *, copy: bool = False) -> QuantizedTensor:
        """This weight with every stored tensor on `device` (new tensors when ``copy=True``)."""
        device = check_device(device)
        moved = {name: t.to(device, copy=copy) for name, t in self.tensors().items()}
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
        """Tensors to save, plus a ``meta`` int64 tensor holding META_FIELDS."""
        values = {
            "version": STATE_VERSION,
            "format_id": FORMAT_IDS[self.format],
            "out_features": self.shape[0],
            "in_features": self.shape[1],
            "group_size": self.group_size,
            "symmetric": int(self.symmetric),
            "double_quant": int(self.double_quant),
        }
        meta = torch.tensor([values[name] for name in META_FIELDS], dtype=torch.int64, device=self.device)
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
        source: str | None = None,
    ) -> QuantizedTensor:
        """Rebuild from `state_dict()` output, checking the metadata, every tensor's shape and
        dtype, and that no scale is NaN or inf. Errors name the tensor, and `source` (e.g. the
        file) when given."""
        where = f"{source}: " if source else ""
        meta = _read_meta(state, prefix, where)
        fmt = FORMATS[meta["format_id"]]
        n, k = meta["out_features"], meta["in_features"]
        if expect_format is not None and fmt != expect_format:
            raise ValueError(f"{where}state dict holds a {fmt!r} weight, but a {expect_format!r} weight was expected")
        if expect_shape is not None and (n, k) != tuple(expect_shape):
            raise ValueError(
                f"{where}state dict holds a weight of shape {(n, k)}, but shape {tuple(expect_shape)} was expected"
            )
        fields = {name: state.get(prefix + name) for name in TENSOR_FIELDS}
        qt = cls(format=fmt, shape=(n, k), group_size=meta["group_size"], symmetric=bool(meta["symmetric"]), **fields)
        if qt.double_quant != bool(meta["double_quant"]):
            raise ValueError(f"{where}state dict is inconsistent: its double-quant flag does not match its tensors")
        try:
            validate_layout(qt, prefix)
        except ValueError as err:
            raise ValueError(f"{where}{err}") from None
        for name, tensor in qt.tensors().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{where}tensor '{prefix}{name}' holds NaN or inf values: the weight is corrupt")
        return qt

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (atomically: temp file + rename)."""
        save_quantized(self, path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> QuantizedTensor:
        """Read a file written by `save`, checked as `from_state_dict` checks, onto `device`."""
        return load_quantized(path, device)


#: The stored tensor fields, in declaration order: the one list every other derives from.
TENSOR_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(QuantizedTensor) if f.metadata.get("stored"))


def _read_meta(state: dict[str, torch.Tensor], prefix: str, where: str) -> dict[str, int]:
    """The ``meta`` entry as META_FIELDS -> int, each value checked."""
    key = prefix + "meta"
    if key not in state:
        raise ValueError(f"{where}state dict has no '{key}' entry: it was not written by QuantizedTensor.state_dict()")
    meta = state[key]
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int64 or tuple(meta.shape) != (len(META_FIELDS),):
        got = f"{meta.dtype} {tuple(meta.shape)}" if isinstance(meta, torch.Tensor) else type(meta).__name__
        raise ValueError(
            f"{where}'{key}' must be an int64 tensor of {len(META_FIELDS)} values ({', '.join(META_FIELDS)}), "
            f"got {got}: the weight is corrupt"
        )
    values = dict(zip(META_FIELDS, (int(v) for v in meta.tolist()), strict=True))
    where = f"{where}'{key}': "
    if values["version"] != STATE_VERSION:
        raise ValueError(f"{where}layout version {values['version']} is not supported (expected {STATE_VERSION})")
    if not 0 <= values["format_id"] < len(FORMATS):
        known = ", ".join(f"{i}={name}" for name, i in FORMAT_IDS.items())
        raise ValueError(f"{where}unknown format id {values['format_id']} (known: {known}): the weight is corrupt")
    fmt = FORMATS[values["format_id"]]
    n, k = values["out_features"], values["in_features"]
    if n < 1 or k < 1:
        raise ValueError(f"{where}weight shape {(n, k)} is not positive: the weight is corrupt")
    for flag in ("symmetric", "double_quant"):
        if values[flag] not in (0, 1):
            raise ValueError(f"{where}{flag} flag must be 0 or 1, got {values[flag]}: the weight is corrupt")
    if values["symmetric"] and fmt != "int4":
        raise ValueError(f"{where}a {fmt} weight cannot be symmetric (int4 only): the weight is corrupt")
    if values["double_quant"] and fmt != "nf4":
        raise ValueError(f"{where}a {fmt} weight cannot be double-quantized (nf4 only): the weight is corrupt")
    try:
        check_group_size(fmt, values["group_size"], k)
    except ValueError as err:
        raise ValueError(f"{where}{err}: the weight is corrupt") from None
    return values


def validate_layout(qt: QuantizedTensor, prefix: str = "") -> None:
    """Raise ValueError unless every stored tensor has the shape and dtype of the format."""
    if qt.format not in FORMATS:
        raise ValueError(f"unknown format {qt.format!r}; expected one of {FORMATS}")
    expected = layout(qt.format, qt.shape, qt.group_size, symmetric=qt.symmetric, double_quant=qt.double_quant)
    for name in TENSOR_FIELDS:
        value, spec = getattr(qt, name), expected.get(name)
        if spec is None:
            if value is not None:
                raise ValueError(f"{qt.format} weight must not have a '{prefix}{name}' tensor")
            continue
        shape, dtype = spec
        if value is None:
            raise ValueError(f"{qt.format} weight is missing its '{prefix}{name}' tensor")
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{qt.format} weight of shape {qt.shape}: '{prefix}{name}' should be {dtype} {shape}, got {got}"
            )


def save_quantized(qt: QuantizedTensor, path: str | Path) -> None:
    """Write `qt` to the safetensors file `path` atomically (what `QuantizedTensor.save` does)."""
    atomic_save_safetensors(qt.state_dict(), path, metadata={"format": qt.format, "library": "qlora-kernels"})


def load_quantized(path: str | Path, device: torch.device | str = "cpu") -> QuantizedTensor:
    """Read a file written by `save_quantized` onto `device` (what `QuantizedTensor.load` does)."""
    target = check_device(device)  # before reading: a wrong device fails fast
    qt = QuantizedTensor.from_state_dict(load_safetensors(path), source=str(path))
    return qt.to(target)
