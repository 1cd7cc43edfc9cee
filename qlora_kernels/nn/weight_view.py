"""`QuantizedWeightView`: the read-only dense weight a `QuantLinear` stands for.

Model code and peer libraries read ``layer.weight``: T5 reads ``wo.weight.dtype`` to cast its
hidden states, PEFT reads ``weight.device`` / ``weight.dtype`` to place adapters, DoRA-style code
reads the values. The view answers shape (out_features, in_features), dtype (the layer's dense
dtype) and device without touching the packed data; any operation on its values dequantizes the
weight at that moment (nothing is cached, so it never goes stale after a merge). Writes raise:
the packed buffers are the only storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils._pytree import tree_map

if TYPE_CHECKING:
    from .quant_linear import QuantLinear

_ALIASES = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)


class QuantizedWeightView(torch.Tensor):
    """A tensor of the layer's logical shape whose values are decoded from the packed weight on use."""

    _layer: QuantLinear
    #: transformers' weight initialisation skips tensors flagged so: a packed weight holds trained values
    _is_hf_initialized = True

    @staticmethod
    def __new__(cls, layer: QuantLinear) -> QuantizedWeightView:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            (layer.out_features, layer.in_features),
            dtype=layer.dtype,
            device=layer.weight_data.device,
            requires_grad=False,
        )

    def __init__(self, layer: QuantLinear) -> None:
        self._layer = layer

    __torch_function__ = torch._C._disabled_torch_function_impl

    def dequantize(self) -> torch.Tensor:
        """The dense weight, decoded now, as a plain tensor of this view's dtype."""
        return self._layer.dequantized_weight(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALIASES:  # .detach() / .data: another view of the same layer, still lazy
            return cls(args[0]._layer)
        if func._schema.is_mutable:
            raise RuntimeError(
                f"{func.__name__}: the weight of a QuantLinear is a read-only view of its packed buffers; "
                "to change it, build a new layer (QuantLinear.from_linear) or call replace_weight()"
            )

        def dense(value):
            return value.dequantize() if isinstance(value, QuantizedWeightView) else value

        return func(*tree_map(dense, args), **tree_map(dense, kwargs))

    def __repr__(self) -> str:  # no decoding just to print
        layer = self._layer
        return (
            f"QuantizedWeightView(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"format={layer.format})"
        )

    def __reduce_ex__(self, protocol):
        # pickling / deepcopy store the dense values: the view itself is tied to a live layer
        return self.dequantize().__reduce_ex__(protocol)
