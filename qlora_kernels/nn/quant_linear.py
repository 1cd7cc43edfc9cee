"""`QuantLinear`: a frozen linear layer whose weight is a packed `QuantizedTensor`.

The packed weight lives in buffers, not Parameters, and the class does not subclass
`nn.Linear`: PEFT's k-bit preparation upcasts every fp16/bf16 Parameter and treats an
`nn.Linear` subclass as a dense layer (its merge would write into packed data).
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import TENSOR_FIELDS, QuantizedTensor, quantize
from ..ops import qlora_linear
from ..ops.qlora_linear import check_backend_name

_PREFIX = "weight_"


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + bias, W stored as int8 / int4 / NF4 (no gradient to W)."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(qweight, QuantizedTensor):
            raise TypeError(f"QuantLinear needs a QuantizedTensor (qk.quantize(w, ...)), got {type(qweight).__name__}")
        self.out_features, self.in_features = qweight.shape
        self.backend = check_backend_name(backend)
        self._set_weight(qweight)
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias must be a tensor of shape ({self.out_features},), got {type(bias).__name__}")
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _set_weight(self, qweight: QuantizedTensor) -> None:
        """(Re)register the buffers: ``weight_<field>`` for every stored tensor and ``weight_meta``."""
        self.format = qweight.format
        self.group_size = qweight.group_size
        self.symmetric = qweight.symmetric
        state = qweight.state_dict()
        for name in (*TENSOR_FIELDS, "meta"):  # absent optional fields are explicit None buffers
            self.register_buffer(_PREFIX + name, state.get(name))

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
        fields = {name: getattr(self, _PREFIX + name) for name in TENSOR_FIELDS}
        return QuantizedTensor(
            self.format, (self.out_features, self.in_features), self.group_size, symmetric=self.symmetric, **fields
        )

    def replace_weight(self, qweight: QuantizedTensor) -> None:
        """Swap in a new packed weight of the same shape (used by merging), moved to this layer's device."""
        if not isinstance(qweight, QuantizedTensor):
            raise TypeError(f"replace_weight needs a QuantizedTensor, got {type(qweight).__name__}")
        if qweight.shape != (self.out_features, self.in_features):
            raise ValueError(f"new weight has shape {qweight.shape}, layer is {(self.out_features, self.in_features)}")
        self._set_weight(qweight.to(self.weight_data.device))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlora_linear(x, self.qweight, None, None, 1.0, self.bias, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors):
        if prefix + _PREFIX + "meta" in state_dict:
            # Validate the incoming weight, then give the layer buffers of its layout (own copies on
            # this layer's device: the caller's state dict is never aliased); nn.Module copies into them.
            qt = QuantizedTensor.from_state_dict(
                state_dict,
                prefix + _PREFIX,
                expect_shape=(self.out_features, self.in_features),
                expect_format=self.format,
            )
            self._set_weight(qt.to(self.weight_data.device, copy=True))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors)

    def extra_repr(self) -> str:
        opts = f", group_size={self.group_size}" if self.format != "int8" else ""
        opts += ", symmetric" if self.symmetric else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{opts}, "
            f"bias={self.bias is not None}, bits_per_param={self.qweight.bits_per_param:.3f}"
        )
