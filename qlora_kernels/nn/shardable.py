"""`ShardableQuantLinear`: a `QuantLinear` whose packed weight is one frozen Parameter, for FSDP2.

`QuantLinear` keeps its packed weight in buffers (PEFT's k-bit preparation would upcast
Parameters, and buffers move by device only). FSDP2 shards Parameters only, so before
`fully_shard` each `QuantLinear` is converted (`to_shardable`) into this subclass, whose
``packed_weight`` Parameter is a `PackedWeight` (requires_grad=False). The conversion reuses
the packed tensors (no copy). `to_buffers` converts back to plain `QuantLinear` layers, and the
state dict of this class has the same keys and values as `QuantLinear`'s, so files written from
either form are interchangeable.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import TENSOR_FIELDS, QuantizedTensor
from .packed_weight import PackedWeight
from .quant_linear import QuantLinear

_BUFFER_PREFIX = "weight_"  # QuantLinear's buffer names: weight_<field>, weight_meta


class ShardableQuantLinear(QuantLinear):
    """`QuantLinear` with the packed weight as the frozen Parameter ``packed_weight`` (a `PackedWeight`)."""

    def __init__(
        self,
        qweight: QuantizedTensor,
        bias: torch.Tensor | None = None,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(qweight, bias, backend)  # validates and registers the buffers ...
        packed = PackedWeight.from_quantized(QuantLinear.qweight.fget(self), dtype)
        for name in (*TENSOR_FIELDS, "meta"):  # ... which the Parameter then replaces
            self._buffers.pop(_BUFFER_PREFIX + name, None)
        self.packed_weight = nn.Parameter(packed, requires_grad=False)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear, dtype: torch.dtype = torch.float32) -> ShardableQuantLinear:
        """The same layer (same packed tensors, bias and backend) with its weight as a Parameter."""
        if not isinstance(layer, QuantLinear) or isinstance(layer, ShardableQuantLinear):
            raise TypeError(f"from_quant_linear expects a QuantLinear, got {type(layer).__name__}")
        new = cls(layer.qweight, layer.bias, layer.backend, dtype)
        new.train(layer.training)
        return new

    def to_quant_linear(self) -> QuantLinear:
        """A plain `QuantLinear` (weight in buffers) sharing this layer's packed tensors."""
        layer = QuantLinear(self.qweight, self.bias, backend=self.backend)
        layer.train(self.training)
        return layer

    @property
    def qweight(self) -> QuantizedTensor:
        """The packed weight as a `QuantizedTensor` (views, no copy); needs the unsharded weight."""
        weight = self.packed_weight
        if not isinstance(weight, PackedWeight):  # FSDP registers a DTensor of shards between passes
            raise RuntimeError(
                f"this layer's weight is sharded ({type(weight).__name__}); FSDP gathers it only inside "
                "the forward and backward of the FSDP module that holds it"
            )
        return weight.to_quantized()

    def replace_weight(self, qweight: QuantizedTensor) -> None:
        if not isinstance(qweight, QuantizedTensor):
            raise TypeError(f"replace_weight needs a QuantizedTensor, got {type(qweight).__name__}")
        if qweight.shape != (self.out_features, self.in_features):
            raise ValueError(f"new weight has shape {qweight.shape}, layer is {(self.out_features, self.in_features)}")
        old = self.qweight  # raises if sharded
        self.format, self.group_size, self.symmetric = qweight.format, qweight.group_size, qweight.symmetric
        packed = PackedWeight.from_quantized(qweight.to(old.device), self.packed_weight.dtype)
        self.packed_weight = nn.Parameter(packed, requires_grad=False)

    def _apply(self, fn, recurse: bool = True):
        # PackedWeight moves its packed tensors by device only, whatever `fn` asks for.
        return nn.Module._apply(self, fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """QuantLinear's entries (``bias``, ``weight_<field>``, ``weight_meta``): either form loads the other's."""
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        state = self.qweight.state_dict(prefix + _BUFFER_PREFIX)
        for name in (*TENSOR_FIELDS, "meta"):  # QuantLinear's buffer order
            tensor = state.get(prefix + _BUFFER_PREFIX + name)
            if tensor is not None:
                destination[prefix + _BUFFER_PREFIX + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        known = {prefix + _BUFFER_PREFIX + f for f in (*TENSOR_FIELDS, "meta")} | {prefix + "bias"}
        if prefix + _BUFFER_PREFIX + "meta" in state_dict:
            qt = QuantizedTensor.from_state_dict(
                state_dict,
                prefix + _BUFFER_PREFIX,
                expect_shape=(self.out_features, self.in_features),
                expect_format=self.format,
            )
            self.replace_weight(qt.to(self.packed_weight.device, copy=True))  # own copies, never aliases
        else:
            missing_keys.append(prefix + _BUFFER_PREFIX + "meta")
        if self.bias is not None:
            bias = state_dict.get(prefix + "bias")
            if bias is None:
                missing_keys.append(prefix + "bias")
            elif bias.shape != self.bias.shape:
                errors.append(f"size mismatch for {prefix}bias: {tuple(bias.shape)} vs {tuple(self.bias.shape)}")
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)
        if strict:
            unexpected.extend(
                k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix) :] and k not in known
            )


def to_shardable(model: nn.Module, dtype: torch.dtype | None = None, rows_multiple_of: int = 1) -> list[str]:
    """Replace every `QuantLinear` of `model` by a `ShardableQuantLinear` (in place, no copy).

    `dtype`: the dense dtype the packed weights stand for (default: the model's first floating
    Parameter's dtype, so `model.dtype`-style lookups are unchanged). Layers whose out_features is
    not a multiple of `rows_multiple_of` (the FSDP world size: even shards) stay `QuantLinear`,
    i.e. replicated; their names are returned.
    """
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    kept: list[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not QuantLinear:
                continue
            if child.out_features % rows_multiple_of:
                kept.append(f"{name}.{child_name}" if name else child_name)
                continue
            setattr(module, child_name, ShardableQuantLinear.from_quant_linear(child, dtype))
    return kept


def to_buffers(model: nn.Module) -> int:
    """Replace every `ShardableQuantLinear` by a plain `QuantLinear` (in place); returns how many.

    The weights must be unsharded (e.g. a model that `fully_shard` was never applied to).
    """
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, ShardableQuantLinear):
                setattr(module, child_name, child.to_quant_linear())
                count += 1
    return count
