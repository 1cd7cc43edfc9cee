"""`lora_swiglu_mlp`: down(silu(gate(x)) * up(x)) over three quantized LoRA linears, one autograd node.

The MLP of Llama-family models keeps four (tokens, intermediate) tensors for the backward when
its linears and the SwiGLU run as separate autograd nodes: gate(x) and up(x) (saved by silu and
the product), silu(gate(x)) (saved by the product) and h = silu(gate(x)) * up(x) (saved by the
down projection for its LoRA A gradient). They are most of a training step's activation memory:
for SmolLM2-135M at 8 x 256 tokens in fp32, 1.4 of 2.5 GiB. This node saves gate(x) and up(x)
only and recomputes silu and h in the backward (two elementwise ops, a fraction of a percent
of the step), with the same operations in the same dtypes as the separate nodes, so values and
gradients are the same bit for bit.

Each linear runs through the backend of `qlora_linear` (and its checks, autocast rule and
compute-dtype policy), so the forward is what three `qlora_linear` calls compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..formats import QuantizedTensor
from .qlora_linear import _Static, check_qlora_args, linear_backward, resolve_backend


@dataclass(frozen=True)
class LoRALinearArgs:
    """One quantized linear with its optional LoRA side path: x @ W^T + scaling * (x @ A^T) @ B^T + bias."""

    qt: QuantizedTensor
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float = 1.0
    bias: torch.Tensor | None = None
    backend: str = "auto"

    def tensors(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return self.lora_a, self.lora_b, self.bias


def _forward_linear(x: torch.Tensor, static: _Static, lora_a, lora_b, bias) -> tuple[torch.Tensor, torch.Tensor]:
    return static.backend.forward(x, static.qt, lora_a, lora_b, static.scaling, bias)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class LoRASwiGLUFunction(torch.autograd.Function):
    """Saves x, gate(x), up(x) and the three x @ A^T; silu(gate(x)) * up(x) is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, ga, gb, gbias, ua, ub, ubias, da, db, dbias, statics: tuple[_Static, _Static, _Static]):
        s_gate, s_up, s_down = statics
        g, xa_g = _forward_linear(x, s_gate, ga, gb, gbias)
        u, xa_u = _forward_linear(x, s_up, ua, ub, ubias)
        y, xa_d = _forward_linear(_swiglu(g, u), s_down, da, db, dbias)
        ctx.statics = statics
        ctx.bias_dtypes = tuple(b.dtype if b is not None else None for b in (gbias, ubias, dbias))
        ctx.save_for_backward(x, g, u, xa_g, xa_u, xa_d, ga, gb, ua, ub, da, db)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, u, xa_g, xa_u, xa_d, ga, gb, ua, ub, da, db = ctx.saved_tensors
        s_gate, s_up, s_down = ctx.statics
        need = ctx.needs_input_grad
        act = F.silu(g)
        h = act * u if need[7] and da is not None else None  # the down projection's x, for its dA only
        dh, d_da, d_db, d_dbias = linear_backward(
            dy, h, xa_d, da, db, s_down, True, need[7], need[8], need[9], ctx.bias_dtypes[2]
        )
        du = dh * act  # the product's and silu's own backward formulas, as autograd runs them
        dg = torch.ops.aten.silu_backward(dh * u, g)
        need_x = need[0]
        dx_g, d_ga, d_gb, d_gbias = linear_backward(
            dg, x, xa_g, ga, gb, s_gate, need_x, need[1], need[2], need[3], ctx.bias_dtypes[0]
        )
        dx_u, d_ua, d_ub, d_ubias = linear_backward(
            du, x, xa_u, ua, ub, s_up, need_x, need[4], need[5], need[6], ctx.bias_dtypes[1]
        )
        dx = dx_g + dx_u if need_x else None
        return dx, d_ga, d_gb, d_gbias, d_ua, d_ub, d_ubias, d_da, d_db, d_dbias, None


def lora_swiglu_mlp(x: torch.Tensor, gate: LoRALinearArgs, up: LoRALinearArgs, down: LoRALinearArgs) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), each linear a quantized base plus an optional LoRA side path.

    x: (..., K) in bf16, fp16 or fp32; gate and up: (I, K) weights, down: (K', I). Output (..., K')
    in x's dtype (or the autocast dtype inside an autocast region), equal to three `qlora_linear`
    calls around ``F.silu(g) * u``, with less activation memory when gradients are needed.
    """
    for name, spec in (("gate", gate), ("up", up), ("down", down)):
        if not isinstance(spec, LoRALinearArgs):
            raise TypeError(f"lora_swiglu_mlp: {name} must be a LoRALinearArgs, got {type(spec).__name__}")
    check_qlora_args(x, gate.qt, gate.lora_a, gate.lora_b, gate.scaling, gate.bias)
    if up.qt.shape != gate.qt.shape:
        raise ValueError(f"lora_swiglu_mlp: gate and up must have one shape, got {gate.qt.shape} and {up.qt.shape}")
    check_qlora_args(x, up.qt, up.lora_a, up.lora_b, up.scaling, up.bias)
    intermediate = gate.qt.shape[0]
    if down.qt.shape[1] != intermediate:
        raise ValueError(
            f"lora_swiglu_mlp: down's in_features must equal gate's out_features {intermediate}, got {down.qt.shape}"
        )
    check_qlora_args(x.new_empty(0, intermediate), down.qt, down.lora_a, down.lora_b, down.scaling, down.bias)
    device_type = x.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    if autocast_on:
        x = x.to(torch.get_autocast_dtype(device_type))
    statics = tuple(_Static(s.qt, float(s.scaling), resolve_backend(s.backend, x.device)) for s in (gate, up, down))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    tensors = (*gate.tensors(), *up.tensors(), *down.tensors())
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, *tensors)):
            y = LoRASwiGLUFunction.apply(x2, *tensors, statics)
        else:  # nothing to differentiate: the three forwards without an autograd node
            s_gate, s_up, s_down = statics
            g, _ = _forward_linear(x2, s_gate, *gate.tensors())
            u, _ = _forward_linear(x2, s_up, *up.tensors())
            y, _ = _forward_linear(_swiglu(g, u), s_down, *down.tensors())
    return y.reshape(*lead, down.qt.shape[0])
