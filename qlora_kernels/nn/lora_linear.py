"""`LoRALinear`: a frozen base (`nn.Linear`, transformers `Conv1D` or `QuantLinear`) plus a trainable low-rank update.

y = base(x) + scaling * B(A(dropout(x))), scaling = alpha / r (alpha / sqrt(r) with rsLoRA).
B starts at zero, so the layer equals its base at initialisation. The parameters live in
`lora_A` / `lora_B` `nn.Linear` children, the names PEFT uses, so adapter files map 1:1
(for a `Conv1D` base too: A is (r, in), B is (out, r), as PEFT's ``fan_in_fan_out`` layers).
`.weight` is the base's weight, as on PEFT's LoRA layers, for model code that reads it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common import check_bool, check_int, check_real
from .dense import dense_weight, in_out_features, is_conv1d, is_dense_linear
from .quant_linear import QuantLinear

INITS = ("kaiming", "gaussian")


def check_lora_options(
    r: int, alpha: float, dropout: float, use_rslora: bool, init: str, max_r: int | None = None
) -> tuple[int, float, float]:
    """Validate LoRA's options (shared with `prepare_model`, which checks before changing a model).

    Returns (r, alpha, dropout) as int, float, float. `max_r`: min(in_features, out_features) of the
    layer, when known.
    """
    r = check_int(r, "r", minimum=1)
    if max_r is not None and r > max_r:
        raise ValueError(f"r must be an integer in [1, min(in_features, out_features)={max_r}], got {r}")
    alpha = check_real(alpha, "alpha")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive (scaling = alpha / r), got {alpha}")
    dropout = check_real(dropout, "dropout")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    check_bool(use_rslora, "use_rslora")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return r, alpha, dropout


class LoRALinear(nn.Module):
    """LoRA adapter around a dense or quantized linear layer; supports merge/unmerge."""

    def __init__(
        self,
        base: nn.Module,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        if not (isinstance(base, QuantLinear) or is_dense_linear(base)):
            raise TypeError(
                f"LoRALinear wraps an nn.Linear, a transformers Conv1D or a QuantLinear, got {type(base).__name__}"
            )
        in_f, out_f = in_out_features(base)
        r, alpha, dropout = check_lora_options(r, alpha, dropout, use_rslora, init, max_r=min(in_f, out_f))
        base.requires_grad_(False)  # the base is frozen: only lora_A / lora_B train
        self.base = base
        self.in_features, self.out_features = in_f, out_f
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight_data.device if isinstance(base, QuantLinear) else base.weight.device
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=torch.float32)
        self.init = init
        self.reset_lora_parameters()
        self.merged = False

    def reset_lora_parameters(self) -> None:
        """A random (kaiming-uniform as PEFT, or N(0, 1/r)), B zero: the layer starts as its base."""
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        nn.init.zeros_(self.lora_B.weight)

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.base, QuantLinear)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (read-only view for a quantized base), as PEFT's LoRA layers expose it."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if not torch.is_grad_enabled():  # decoding: straight to the quantized base's kernel call
            y = self.decode_step(x)
            if y is not None:
                return y
        a, b = self.lora_A.weight, self.lora_B.weight
        dropout_active = self.training and isinstance(self.dropout, nn.Dropout)
        if self.is_quantized and not dropout_active:
            # One fused call: base matmul and the LoRA side path share the x tiles.
            return self.base.qlora(x, a, b, self.scaling)
        y = self.base(x)
        x_lora = self.dropout(x)
        side = F.linear(F.linear(x_lora.to(a.dtype), a), b) * self.scaling
        return y + side.to(y.dtype)

    def decode_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """`QuantLinear.decode_step` with this layer's LoRA, or None (dense base, active dropout, or a
        call the small-M kernel does not serve). Reads the submodules' dicts directly: this runs once
        per layer and token, and each nn.Module attribute lookup costs about a microsecond."""
        modules = self._modules
        base = modules["base"]
        if not isinstance(base, QuantLinear) or base.compute_dtype not in (None, x.dtype):
            return None
        if self.training and isinstance(modules["dropout"], nn.Dropout):
            return None
        a = modules["lora_A"]._parameters["weight"]
        b = modules["lora_B"]._parameters["weight"]
        return base.decode_step(x, a, b, self.scaling)

    @torch.no_grad()
    def merge(self) -> float:
        """Fold B @ A into the base; returns the relative error of the stored merged weight.

        Dense base: exact up to the weight dtype's rounding. Quantized base: dequantize, add,
        requantize in the same format; the returned error is the requantization loss.
        """
        if self.merged:
            raise ValueError("LoRALinear is already merged; call unmerge() first")
        target = self.base_weight(torch.float32) + self.delta_weight()
        if self.is_quantized:
            self.base.replace_weight(self.base.quantize_like(target))
        else:
            dense_weight(self.base).copy_(target.to(self.base.weight.dtype))
        self.merged = True
        stored = self.base_weight(torch.float32)
        return ((stored - target).norm() / target.norm().clamp(min=1e-30)).item()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge()` on a dense base (a quantized base cannot be unmerged exactly)."""
        if not self.merged:
            raise ValueError("LoRALinear is not merged")
        if self.is_quantized:
            raise ValueError(
                "cannot unmerge from a quantized base: requantization lost information; "
                "keep an unmerged copy, or merge into a dequantized model instead"
            )
        weight = dense_weight(self.base)
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base's dense weight as (out_features, in_features) (dequantized if needed)."""
        if self.is_quantized:
            return self.base.dequantized_weight(dtype)
        return dense_weight(self.base).to(dtype)

    def extra_repr(self) -> str:
        fan_in_fan_out = ", fan_in_fan_out" if is_conv1d(self.base) else ""
        return (
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, "
            f"rslora={self.use_rslora}, merged={self.merged}{fan_in_fan_out}"
        )
