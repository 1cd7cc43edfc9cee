"""`QuantLinear`: a frozen linear layer whose weight is a packed `QuantizedTensor`.

The packed weight lives in buffers, not Parameters, and the class does not subclass
`nn.Linear`: PEFT's k-bit preparation upcasts every fp16/bf16 Parameter and treats an
`nn.Linear` subclass as a dense layer (its merge would write into packed data).
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantizedTensor, quantize
from ..ops import qlora_linear

_PREFIX = "weight_"
_FIELDS = ("data", "scales", "mins", "absmax_scales", "absmax_offset")


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + bias, W stored as int8 / int4 / NF4 (no gradient to W)."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(qweight, QuantizedTensor):
            raise TypeError(f"QuantLinear needs a QuantizedTensor (qk.quantize(w, ...)), got {type(qweight).__name__}")
        self.out_features, self.in_features = qweight.shape
        self.backend = backend
        self._set_weight(qweight)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _set_weight(self, qweight: QuantizedTensor) -> None:
        self.format = qweight.format
        self.group_size = qweight.group_size
        self.symmetric = qweight.symmetric
        for name, tensor in qweight.state_dict().items():
            self.register_buffer(_PREFIX + name, tensor)
        for name in _FIELDS:  # absent optional fields are explicit None buffers
            if not hasattr(self, _PREFIX + name):
                self.register_buffer(_PREFIX + name, None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        format: str = "nf4",
        group_size: int | None = None,
        *,
        symmetric: bool = False,
        double_quant: bool = True,
        backend: str = "auto",
    ) -> QuantLinear:
        """Quantize an `nn.Linear`'s weight (its bias is kept as is)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        qt = quantize(linear.weight.detach(), format, group_size, symmetric=symmetric, double_quant=double_quant)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(qt, bias, backend=backend)

    @property
    def qweight(self) -> QuantizedTensor:
        """The packed weight as a `QuantizedTensor` (a view of the buffers, no copy)."""
        fields = {name: getattr(self, _PREFIX + name) for name in _FIELDS}
        return QuantizedTensor(
            self.format, (self.out_features, self.in_features), self.group_size, symmetric=self.symmetric, **fields
        )

    def replace_weight(self, qweight: QuantizedTensor) -> None:
        """Swap in a new packed weight of the same shape (used by merging)."""
        if qweight.shape != (self.out_features, self.in_features):
            raise ValueError(f"new weight has shape {qweight.shape}, layer is {(self.out_features, self.in_features)}")
        for name in (*_FIELDS, "meta"):
            if hasattr(self, _PREFIX + name):
                delattr(self, _PREFIX + name)
        self._set_weight(qweight.to(self.weight_data.device) if hasattr(self, "weight_data") else qweight)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlora_linear(x, self.qweight, None, None, 1.0, self.bias, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        key = prefix + _PREFIX + "meta"
        if key in state_dict:
            # Rebuild (and validate) the packed weight from the incoming tensors before copying.
            incoming = {k[len(prefix + _PREFIX) :]: v for k, v in state_dict.items() if k.startswith(prefix + _PREFIX)}
            qt = QuantizedTensor.from_state_dict(
                incoming, expect_shape=(self.out_features, self.in_features), expect_format=self.format
            )
            self.replace_weight(qt)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)

    def extra_repr(self) -> str:
        opts = f", group_size={self.group_size}" if self.format != "int8" else ""
        opts += ", symmetric" if self.symmetric else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{opts}, "
            f"bias={self.bias is not None}, bits_per_param={self.qweight.bits_per_param:.3f}"
        )
