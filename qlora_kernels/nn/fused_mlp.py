"""Run Llama-style MLPs whose three linears are quantized LoRA layers as one `lora_swiglu_mlp` node.

A transformers MLP of the Llama family computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
with ``act_fn`` SiLU (Llama, Mistral, Qwen2/3, Granite, OLMo, DeepSeek, SmolLM ...). When all
three projections are `LoRALinear` over a `QuantLinear`, `fuse_swiglu_mlps` gives the MLP module
a forward that makes the same computation one autograd node: it saves half the MLP's activations
(see `ops.lora_mlp`) and makes one Python call per MLP instead of three.

The forward is set on the instance (the class is untouched, so state dicts, saving and PEFT see
the same module). Before the first instance of a class is changed, its own forward and the fused
one are run on a small random input and must agree bit for bit; a class whose forward does
anything else keeps it. At call time the fused path steps aside (to the class's forward) when a
projection is merged, has active dropout, or the three do not share one compute dtype.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lora_mlp import LoRALinearArgs, lora_swiglu_mlp
from .lora_linear import LoRALinear
from .quant_linear import QuantLinear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SILU_CLASS_NAMES = ("SiLUActivation", "SiLU")
_FUSED_FLAG = "_qk_fused_swiglu"
_CHECK_TOKENS = 32  # more rows than the small-M decode path takes, so both sides run the same kernels


def _projections(module: nn.Module) -> tuple[LoRALinear, LoRALinear, LoRALinear] | None:
    modules = module._modules  # direct reads: this runs once per MLP and token while decoding
    layers = tuple(modules.get(name) for name in PROJECTIONS)
    if not all(isinstance(layer, LoRALinear) and isinstance(layer.base, QuantLinear) for layer in layers):
        return None
    return layers


def _is_silu(act: object) -> bool:
    # transformers' ACT2FN["silu"] is its own SiLUActivation module, not an nn.SiLU
    return isinstance(act, nn.SiLU) or (isinstance(act, nn.Module) and type(act).__name__ in SILU_CLASS_NAMES)


def is_swiglu_lora_mlp(module: nn.Module) -> bool:
    """A Llama-style MLP (gate/up/down projections, SiLU) whose projections are quantized LoRA layers."""
    return _is_silu(getattr(module, "act_fn", None)) and _projections(module) is not None


def _linear_args(layer: LoRALinear) -> LoRALinearArgs:
    base = layer.base
    return LoRALinearArgs(
        base.qweight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, base.bias, base.backend
    )


def _fusable_now(layers: tuple[LoRALinear, LoRALinear, LoRALinear], x: torch.Tensor) -> bool:
    for layer in layers:
        if layer.merged or (layer.training and isinstance(layer.dropout, nn.Dropout)):
            return False
        if layer.base.compute_dtype not in (None, x.dtype):
            return False
    return True


def _decode_step(layers: tuple[LoRALinear, LoRALinear, LoRALinear], x: torch.Tensor) -> torch.Tensor | None:
    """Token-by-token decoding: the three fused small-M kernel calls without `lora_swiglu_mlp`'s
    checks and dispatch (`LoRALinear.decode_step`), or None where that kernel does not serve x."""
    gate, up, down = layers
    g = gate.decode_step(x)
    if g is None:
        return None
    u = up.decode_step(x)
    h = F.silu(g) * (u if u is not None else up(x))
    y = down.decode_step(h)
    return y if y is not None else down(h)


def fused_swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward as one `lora_swiglu_mlp` call (the class's own forward when it cannot apply)."""
    layers = _projections(self)
    if layers is None or not _fusable_now(layers, x):
        return type(self).forward(self, x)
    if not torch.is_grad_enabled():
        y = _decode_step(layers, x)
        if y is not None:
            return y
    return lora_swiglu_mlp(x, *(_linear_args(layer) for layer in layers))


@torch.no_grad()
def _agrees_with_class_forward(module: nn.Module) -> bool:
    gate = module.gate_proj
    generator = torch.Generator().manual_seed(0)  # a private stream: the caller's random state stays as it was
    x = torch.randn(1, _CHECK_TOKENS, gate.in_features, generator=generator)
    x = x.to(device=gate.base.weight_data.device, dtype=gate.base.dtype)
    try:
        return torch.equal(type(module).forward(module, x), fused_swiglu_forward(module, x))
    except (RuntimeError, TypeError, ValueError):
        return False


def fuse_swiglu_mlps(model: nn.Module) -> int:
    """Give every eligible MLP of `model` the fused forward (idempotent); returns how many have it."""
    verdicts: dict[type, bool] = {}
    count = 0
    for module in model.modules():
        if getattr(module, _FUSED_FLAG, False):
            count += 1
            continue
        if not is_swiglu_lora_mlp(module):
            continue
        cls = type(module)
        if cls not in verdicts:
            verdicts[cls] = _agrees_with_class_forward(module)
        if verdicts[cls]:
            module.forward = types.MethodType(fused_swiglu_forward, module)
            setattr(module, _FUSED_FLAG, True)
            count += 1
    return count
