"""`QuantLinear`: a frozen linear layer whose weight is a packed `QuantizedTensor`.

The packed weight lives in buffers, not Parameters, and the class does not subclass
`nn.Linear`: PEFT's k-bit preparation upcasts every fp16/bf16 Parameter and treats an
`nn.Linear` subclass as a dense layer (its merge would write into packed data).

Like bitsandbytes' `Params4bit`, the packed buffers move between devices but never change
dtype: ``model.to(torch.bfloat16)`` / ``.half()`` / ``.float()`` cast the bias and change the
layer's `dtype` (what ``.weight`` reports), while the codes and scales keep the dtypes their
format prescribes, so the layer stays valid and its state dict reloads.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import TENSOR_FIELDS, QuantizedTensor, quantize
from ..ops import qlora_linear
from ..ops.native import SMALL_M_MAX, small_m_args, small_m_op, small_m_serves
from ..ops.qlora_linear import check_backend_name
from .dense import dense_weight, is_dense_linear
from .weight_view import QuantizedWeightView

_PREFIX = "weight_"


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + bias, W stored as int8 / int4 / NF4 (no gradient to W).

    dtype: the dtype of the dense weight the layer stands for (what ``.weight`` reports; default:
    the bias's dtype, else float32). compute_dtype: when set, inputs are cast to it for the matmul
    and the output cast back to the input's dtype (bitsandbytes' ``compute_dtype``); None computes
    in the input's dtype.
    """

    def __init__(
        self,
        qweight: QuantizedTensor,
        bias: torch.Tensor | None = None,
        backend: str = "auto",
        *,
        dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(qweight, QuantizedTensor):
            raise TypeError(f"QuantLinear needs a QuantizedTensor (qk.quantize(w, ...)), got {type(qweight).__name__}")
        for arg, value in (("dtype", dtype), ("compute_dtype", compute_dtype)):
            if value is not None and (not isinstance(value, torch.dtype) or not value.is_floating_point):
                raise TypeError(f"{arg} must be a floating torch.dtype such as torch.bfloat16 or None, got {value!r}")
        self.out_features, self.in_features = qweight.shape
        self.backend = check_backend_name(backend)
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor of shape ({self.out_features},), got {type(bias).__name__}")
        if dtype is None:
            dtype = bias.dtype if bias is not None and bias.is_floating_point() else torch.float32
        self.dtype = dtype
        self.compute_dtype = compute_dtype
        self._set_weight(qweight)
        if bias is not None:
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
        linear: nn.Module,
        format: str = "nf4",
        group_size: int | None = None,
        *,
        symmetric: bool = False,
        double_quant: bool = True,
        backend: str = "auto",
        compute_dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """Quantize an `nn.Linear`'s (or transformers `Conv1D`'s) weight; the bias is kept as is."""
        if not is_dense_linear(linear):
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        weight = dense_weight(linear).detach()
        qt = quantize(weight.contiguous(), format, group_size, symmetric=symmetric, double_quant=double_quant)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(qt, bias, backend=backend, dtype=weight.dtype, compute_dtype=compute_dtype)

    @property
    def weight(self) -> QuantizedWeightView:
        """Read-only (out_features, in_features) view in `dtype`, decoded only when its values are used."""
        return QuantizedWeightView(self)

    @property
    def qweight(self) -> QuantizedTensor:
        """The packed weight as a `QuantizedTensor` (a view of the buffers, no copy).

        Built once and reused while the buffers are the same tensor objects (decoding calls every
        layer once per token, and building and validating the view costs several microseconds);
        any buffer replaced (`.to`, `replace_weight`, `load_state_dict`) builds a new one.
        """
        buffers = self._buffers  # direct reads: nn.Module.__getattr__ costs ~1 us a field, per token per layer
        key = (self.format, self.group_size, self.symmetric, *map(id, buffers.values()))
        cached = self.__dict__.get("_qweight_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        fields = {name: buffers.get(_PREFIX + name) for name in TENSOR_FIELDS}
        qt = QuantizedTensor(
            self.format, (self.out_features, self.in_features), self.group_size, symmetric=self.symmetric, **fields
        )
        self.__dict__["_qweight_cache"] = (key, qt)  # holds the buffers, so their ids cannot be reused meanwhile
        return qt

    def replace_weight(self, qweight: QuantizedTensor) -> None:
        """Swap in a new packed weight of the same shape (used by merging), moved to this layer's device."""
        if not isinstance(qweight, QuantizedTensor):
            raise TypeError(f"replace_weight needs a QuantizedTensor, got {type(qweight).__name__}")
        if qweight.shape != (self.out_features, self.in_features):
            raise ValueError(f"new weight has shape {qweight.shape}, layer is {(self.out_features, self.in_features)}")
        self._set_weight(qweight.to(self.weight_data.device))

    def quantize_like(self, weight: torch.Tensor) -> QuantizedTensor:
        """Quantize a dense (out, in) weight with this layer's format and options (for merging)."""
        return quantize(
            weight,
            self.format,
            self.group_size if self.format != "int8" else None,
            symmetric=self.symmetric,
            double_quant=self.weight_absmax_scales is not None if self.format == "nf4" else True,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def qlora(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor | None = None,
        lora_b: torch.Tensor | None = None,
        scaling: float = 1.0,
    ) -> torch.Tensor:
        """This layer plus an optional LoRA side path in one fused `qlora_linear` call."""
        if self.compute_dtype is None or x.dtype == self.compute_dtype:
            y = self.decode_step(x, lora_a, lora_b, scaling)
            if y is not None:
                return y
            return qlora_linear(x, self.qweight, lora_a, lora_b, scaling, self.bias, backend=self.backend)
        xc = x.to(self.compute_dtype)
        return qlora_linear(xc, self.qweight, lora_a, lora_b, scaling, self.bias, backend=self.backend).to(x.dtype)

    def decode_step(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor | None = None,
        lora_b: torch.Tensor | None = None,
        scaling: float = 1.0,
    ) -> torch.Tensor | None:
        """The fused small-M kernel called directly when nothing is differentiated (token-by-token
        decoding), or None where `qlora_linear` would not pick it. x: (..., in_features).

        The same call `qlora_linear` ends in, without its per-call argument checks and dispatch:
        the packed weight is valid by construction, the native op checks every shape and dtype
        itself, and the op's other arguments are built once and reused while the weight, LoRA
        tensors, scaling, bias and x's dtype stay the same (a SmolLM2-sized layer call: 19 -> 15 us).
        """
        if torch.is_grad_enabled() or not x.is_cpu or self.backend not in ("auto", "native"):
            return None
        k = self.in_features
        if x.dim() == 0 or x.shape[-1] != k or not 0 < x.numel() <= SMALL_M_MAX * k or torch.is_autocast_enabled("cpu"):
            return None
        qt = self.qweight
        bias = self._parameters["bias"]
        key = (id(qt), x.dtype, id(lora_a), id(lora_b), scaling, id(bias))
        if lora_a is not None:  # `.to(dtype)` changes a parameter's data in place: a copy may be needed now
            key += (lora_a.dtype, lora_b.dtype)
        plan = self.__dict__.get("_decode_plan")
        if plan is None or plan[0] != key:
            if not small_m_serves(x.dtype, qt):
                return None
            args, reusable = small_m_args(qt, x.dtype, lora_a, lora_b, scaling, bias)
            plan = (key, args, qt)
            # Kept only while it holds every object of the key itself (so no id in it can be reused).
            self.__dict__["_decode_plan"] = plan if reusable else None
        y, _ = small_m_op()(x if x.is_contiguous() else x.contiguous(), *plan[1])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qlora(x)

    def _apply(self, fn, recurse: bool = True):
        """Move the packed buffers by device only; the bias and `dtype` follow `fn` as usual."""
        packed = dict(self._buffers)
        for name in packed:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(packed)
        for name, tensor in packed.items():
            if tensor is not None:
                moved = fn(tensor)
                self._buffers[name] = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.weight_data.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self

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
            f"bias={self.bias is not None}, dtype={self.dtype}, bits_per_param={self.qweight.bits_per_param:.3f}"
        )
