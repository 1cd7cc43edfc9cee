"""`PackedWeight`: a packed `QuantizedTensor` as one tensor that FSDP2 can shard by rows.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards Parameters, not buffers, and only along
dim 0. `PackedWeight` presents an (N, K) quantized weight as a frozen tensor of that logical
shape (its dtype is the dense dtype it stands for; its memory is the packed tensors only), so
a `QuantLinear`'s weight can become a Parameter that FSDP2 shards, gathers per layer for the
forward and backward passes, and frees afterwards.

Stored tensors are split in two kinds:

* row tensors, whose dim 0 runs over the N output rows: ``data``, ``scales`` (NF4's flat
  per-block scales are held as (N, K/G): a block never spans two rows) and ``mins``. These are
  sharded: rank r holds rows [r N/W, (r+1) N/W).
* shared tensors: NF4's double-quantization tables ``absmax_scales`` and ``absmax_offset``.
  A table entry covers 256 blocks, which may span rows, so they are replicated on every rank
  (about 1/4096 of the packed bytes).

FSDP2's extension protocol (torch/distributed/fsdp/_fully_shard/_fsdp_param.py):
``fsdp_pre_all_gather`` hands over the row tensors to all-gather, ``fsdp_post_all_gather``
wraps the gathered tensors (no copy) into the unsharded weight; FSDP frees and re-allocates
their storage between uses, and later calls pass ``out=``. FSDP's initial sharding calls
``split``, ``new_zeros``, ``slice``, ``copy_``, ``view`` and ``as_strided`` on the weight; those
and the usual tensor plumbing (``detach``, ``clone``, ``_to_copy``, ``empty_like``, pinning)
are implemented below. Anything else (arithmetic, matmul) raises: decode with
`to_quantized().dequantize()` instead. Moving to another dtype changes only the logical dtype;
the packed tensors move by device only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch._prims_common import make_contiguous_strides_for

from ..formats import TENSOR_FIELDS, QuantizedTensor

aten = torch.ops.aten

#: Stored tensors whose dim 0 runs over rows (sharded); the others are replicated.
SHARED_FIELDS: tuple[str, ...] = ("absmax_scales", "absmax_offset")
_INNER_PREFIX = "packed_"
ROW_FIELDS: tuple[str, ...] = tuple(f for f in TENSOR_FIELDS if f not in SHARED_FIELDS)


@dataclass(frozen=True)
class PackedMeta:
    """What decoding needs besides the tensors; `out_features` is the unsharded row count."""

    format: str
    group_size: int
    symmetric: bool
    out_features: int
    in_features: int


class PackedWeight(torch.Tensor):
    """A frozen (rows, K) quantized weight: row tensors sharded on dim 0, shared tables replicated."""

    meta: PackedMeta
    _names: tuple[str, ...]

    @staticmethod
    def __new__(
        cls,
        meta: PackedMeta,
        fields: dict[str, torch.Tensor],
        dtype: torch.dtype,
        shape: tuple[int, ...] | None = None,
    ) -> PackedWeight:
        rows = fields["data"].shape[0]
        shape = tuple(shape) if shape is not None else (rows, meta.in_features)
        if math.prod(shape) != rows * meta.in_features:
            raise ValueError(f"PackedWeight of {rows} rows x {meta.in_features} cannot have shape {shape}")
        return torch.Tensor._make_wrapper_subclass(
            cls,
            shape,
            strides=make_contiguous_strides_for(shape),
            dtype=dtype,
            device=fields["data"].device,
            requires_grad=False,
        )

    def __init__(
        self,
        meta: PackedMeta,
        fields: dict[str, torch.Tensor],
        dtype: torch.dtype,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        self.meta = meta
        self._names = tuple(fields)
        for name, tensor in fields.items():  # real attributes: __tensor_flatten__ names them
            setattr(self, _INNER_PREFIX + name, tensor)

    @property
    def fields(self) -> dict[str, torch.Tensor]:
        """The stored tensors held here, by `QuantizedTensor` field name (row tensors as (rows, ...))."""
        return {name: getattr(self, _INNER_PREFIX + name) for name in self._names}

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> PackedWeight:
        """Wrap `qt`'s stored tensors (no copy); `dtype` is the dense dtype the weight stands for."""
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"PackedWeight.from_quantized needs a QuantizedTensor, got {type(qt).__name__}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype (the dense dtype the weight stands for), got {dtype}")
        n, k = qt.shape
        fields = {}
        for name, tensor in qt.tensors().items():
            if name in ROW_FIELDS:
                tensor = tensor.reshape(n, -1) if tensor.dim() == 1 and tensor.numel() != n else tensor
            fields[name] = tensor
        meta = PackedMeta(qt.format, qt.group_size, qt.symmetric, n, k)
        return cls(meta, fields, dtype)

    @property
    def rows(self) -> int:
        """Rows held here: `meta.out_features` when unsharded, a shard of them otherwise."""
        return self.fields["data"].shape[0]

    def to_quantized(self) -> QuantizedTensor:
        """The weight as a `QuantizedTensor` (views of these tensors, no copy); needs all rows."""
        if self.rows != self.meta.out_features:
            raise ValueError(
                f"this PackedWeight holds {self.rows} of {self.meta.out_features} rows (an FSDP shard); "
                "only the gathered weight, inside the FSDP module's forward/backward, can be decoded"
            )
        stored = {}
        for name, tensor in self.fields.items():
            if name == "scales" and self.meta.format == "nf4":
                tensor = tensor.reshape(-1)
            stored[name] = tensor
        return QuantizedTensor(
            self.meta.format,
            (self.meta.out_features, self.meta.in_features),
            self.meta.group_size,
            symmetric=self.meta.symmetric,
            **stored,
        )

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the stored tensors held here (row shard plus shared tables)."""
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        m = self.meta
        return (
            f"PackedWeight(format={m.format!r}, rows={self.rows}/{m.out_features}, in_features={m.in_features}, "
            f"group_size={m.group_size}, dtype={self.dtype}, device={self.device})"
        )

    # --------------------------------------------------------- tensor subclass protocol
    def __tensor_flatten__(self) -> tuple[list[str], tuple[PackedMeta, tuple[str, ...], torch.dtype]]:
        return [_INNER_PREFIX + n for n in self._names], (self.meta, self._names, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], context, outer_size, outer_stride) -> PackedWeight:
        meta, names, dtype = context
        return PackedWeight(meta, {n: inner[_INNER_PREFIX + n] for n in names}, dtype, tuple(outer_size))

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"PackedWeight (a frozen packed weight) does not support {func}; "
                "decode it with .to_quantized().dequantize() to compute with it"
            )
        return handler(*args, **kwargs)

    # ---------------------------------------------------------------- FSDP2 extension
    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: Any, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        """The row tensors to all-gather, and what the post hook needs to rebuild the weight."""
        names = tuple(n for n in ROW_FIELDS if n in self.fields)
        shared = {n: self.fields[n] for n in SHARED_FIELDS if n in self.fields}
        return tuple(self.fields[n].contiguous() for n in names), (self.meta, names, shared)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[PackedWeight, tuple[torch.Tensor, ...]] | None:
        """Wrap the gathered row tensors (all ranks' shards in rank order = all rows) without copying."""
        meta, names, shared = metadata
        gathered = dict(zip(names, all_gather_outputs, strict=True))
        if out is not None:
            # FSDP re-allocated the storage of the tensors returned by the first call and gathered into
            # them again; `out` wraps the same storage, so normally there is nothing to copy.
            for name, tensor in gathered.items():
                target = out.fields[name]
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)
            return None
        weight = PackedWeight(meta, {**gathered, **shared}, param_dtype)
        return weight, tuple(all_gather_outputs)


# ------------------------------------------------------------------------------ the ops
_OPS: dict[Any, Any] = {}


def _implements(*ops):
    def register(fn):
        for op in ops:
            _OPS[op] = fn
        return fn

    return register


def _rebuild(src: PackedWeight, fields: dict[str, torch.Tensor], dtype=None, shape=None) -> PackedWeight:
    return PackedWeight(src.meta, fields, dtype or src.dtype, shape)


def _map(src: PackedWeight, fn) -> dict[str, torch.Tensor]:
    return {name: fn(t) for name, t in src.fields.items()}


def _require_rows_dim(src: PackedWeight, dim: int, op: str) -> None:
    if src.dim() != 2 or dim not in (0, -2):
        raise NotImplementedError(f"PackedWeight supports {op} along dim 0 (rows) of its 2-D form only, got dim={dim}")


@_implements(aten.detach.default, aten.alias.default)
def _detach(src: PackedWeight) -> PackedWeight:
    return _rebuild(src, _map(src, torch.Tensor.detach), shape=src.shape)


@_implements(aten.clone.default)
def _clone(src: PackedWeight, memory_format=None) -> PackedWeight:
    return _rebuild(src, _map(src, torch.Tensor.clone), shape=src.shape)


@_implements(aten.split.Tensor)
def _split(src: PackedWeight, split_size: int, dim: int = 0) -> list[PackedWeight]:
    _require_rows_dim(src, dim, "split")
    chunks: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, tensor in src.fields.items():
        if name in ROW_FIELDS:
            chunks[name] = tensor.split(split_size, 0)
    count = len(chunks["data"])
    shared = {n: t for n, t in src.fields.items() if n in SHARED_FIELDS}
    return [_rebuild(src, {**{n: c[i] for n, c in chunks.items()}, **shared}) for i in range(count)]


@_implements(aten.slice.Tensor)
def _slice(src: PackedWeight, dim: int = 0, start=None, end=None, step: int = 1) -> PackedWeight:
    _require_rows_dim(src, dim, "slice")
    if step != 1:
        raise NotImplementedError("PackedWeight supports slicing rows with step 1 only")
    fields = {n: (t[start:end] if n in ROW_FIELDS else t) for n, t in src.fields.items()}
    return _rebuild(src, fields)


def _rows_of(src: PackedWeight, size) -> int:
    size = tuple(size)
    if len(size) != 2 or size[1] != src.meta.in_features:
        raise NotImplementedError(
            f"PackedWeight can only make (rows, {src.meta.in_features}) tensors of its own kind, got size {size}"
        )
    return size[0]


@_implements(aten.new_zeros.default, aten.new_empty.default)
def _new_rows(src: PackedWeight, size, dtype=None, layout=None, device=None, pin_memory=None) -> PackedWeight:
    rows = _rows_of(src, size)
    fields = {}
    for name, tensor in src.fields.items():
        shape = (rows, *tensor.shape[1:]) if name in ROW_FIELDS else tensor.shape
        fields[name] = torch.zeros(shape, dtype=tensor.dtype, device=device or tensor.device)
    return _rebuild(src, fields, dtype=dtype)


@_implements(aten.empty_like.default, aten.zeros_like.default)
def _like(src: PackedWeight, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return _rebuild(src, _map(src, lambda t: torch.zeros_like(t, device=device)), dtype=dtype, shape=src.shape)


@_implements(aten.copy_.default)
def _copy(dst: PackedWeight, src: torch.Tensor, non_blocking: bool = False) -> PackedWeight:
    if not isinstance(src, PackedWeight):
        raise TypeError(f"PackedWeight.copy_ needs another PackedWeight, got {type(src).__name__}")
    if (src.meta, src.rows, tuple(src.fields)) != (dst.meta, dst.rows, tuple(dst.fields)):
        raise ValueError(f"PackedWeight.copy_: {src!r} does not match {dst!r}")
    for name, tensor in dst.fields.items():
        tensor.copy_(src.fields[name], non_blocking=non_blocking)
    return dst


def _check_whole(src: PackedWeight, size, stride=None, storage_offset: int = 0) -> tuple[int, ...]:
    size = tuple(size)
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size = tuple(src.numel() // known if s == -1 else s for s in size)
    contiguous = stride is None or tuple(stride) == tuple(make_contiguous_strides_for(size))
    if math.prod(size) != src.numel() or not contiguous or storage_offset != 0 or len(size) > 2:
        raise NotImplementedError(
            f"PackedWeight can only be viewed whole and contiguous as (rows, K) or flat, got size {size}"
        )
    if len(size) == 2 and size[1] != src.meta.in_features:
        raise NotImplementedError(f"PackedWeight's 2-D view must keep K={src.meta.in_features} columns, got {size}")
    return size


@_implements(aten.view.default, aten._unsafe_view.default)
def _view(src: PackedWeight, size) -> PackedWeight:
    return _rebuild(src, src.fields, shape=_check_whole(src, size))


@_implements(aten.as_strided.default)
def _as_strided(src: PackedWeight, size, stride, storage_offset=None) -> PackedWeight:
    return _rebuild(src, src.fields, shape=_check_whole(src, size, stride, storage_offset or 0))


@_implements(aten._to_copy.default)
def _to_copy(src: PackedWeight, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, **_):
    """Moves the packed tensors by device only; `dtype` changes the logical (dense) dtype."""
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"a PackedWeight stands for a floating weight; cannot convert it to {dtype}")
    fields = _map(src, lambda t: t.to(device=device or t.device, non_blocking=non_blocking, copy=True))
    return _rebuild(src, fields, dtype=dtype, shape=src.shape)


@_implements(aten.is_pinned.default)
def _is_pinned(src: PackedWeight, device=None) -> bool:
    return all(t.is_pinned() for t in src.fields.values())


@_implements(aten._pin_memory.default)
def _pin_memory(src: PackedWeight, device=None) -> PackedWeight:
    return _rebuild(src, _map(src, torch.Tensor.pin_memory), shape=src.shape)
