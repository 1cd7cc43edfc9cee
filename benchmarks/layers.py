"""Quantized LoRA layer: ours vs bf16 F.linear + unfused LoRA vs bitsandbytes Linear4bit + PEFT LoRA.

Each provider builds the same layer (same weight, same A, B, scaling) and returns a closure
running forward or forward+backward on x of shape (M, K). Used by `run_layer_suite` (plain
script, reports) and by `test_bench_layers.py` (pytest-benchmark).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import qlora_kernels as qk

RANK = 16
ALPHA = 32


@dataclass(frozen=True)
class LayerCase:
    k: int
    n: int
    m: int
    fmt: str = "nf4"
    mode: str = "fwd"  # "fwd" or "fwd+bwd"

    @property
    def name(self) -> str:
        return f"{self.fmt} {self.k}x{self.n} M={self.m} {self.mode}"


def _weights(case: LayerCase, device: torch.device):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(case.n, case.k, generator=g) * 0.02).to(device)
    a = (torch.randn(RANK, case.k, generator=g) * 0.02).to(device)
    b = (torch.randn(case.n, RANK, generator=g) * 0.02).to(device)
    x = torch.randn(case.m, case.k, generator=g).to(device, torch.bfloat16)
    return w, a, b, x


def _closure(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params, mode: str):
    if mode == "fwd":

        def run():
            with torch.no_grad():
                return forward(x)

        return run
    x = x.detach().requires_grad_()

    def run_backward():
        for p in (x, *params):
            p.grad = None
        forward(x).float().sum().backward()

    return run_backward


def build_ours(case: LayerCase, device: torch.device):
    w, a, b, x = _weights(case, device)
    base = qk.QuantLinear(qk.quantize(w, case.fmt))
    lora = qk.LoRALinear(base, r=RANK, alpha=ALPHA).to(device)
    lora.lora_A.weight.data.copy_(a)
    lora.lora_B.weight.data.copy_(b)
    return _closure(lora, x, list(lora.parameters()), case.mode), base.qweight.nbytes


def build_dense_bf16(case: LayerCase, device: torch.device):
    w, a, b, x = _weights(case, device)
    w = w.bfloat16()
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    scaling = ALPHA / RANK

    def forward(inp):
        return F.linear(inp, w) + scaling * F.linear(F.linear(inp, a.bfloat16()), b.bfloat16())

    return _closure(forward, x, [a, b], case.mode), w.numel() * 2


def build_bnb_peft(case: LayerCase, device: torch.device):
    """bitsandbytes NF4 Linear4bit with a PEFT LoRA (None when the peers are not installed)."""
    if case.fmt != "nf4":
        return None
    try:
        import bitsandbytes as bnb
        import peft
    except ImportError:
        return None
    w, a, b, x = _weights(case, device)
    layer = bnb.nn.Linear4bit(case.k, case.n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.cpu().clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to(device)
    model = nn.Sequential()
    model.add_module("proj", layer)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]))
    lora_layer = model.base_model.model.proj
    lora_layer.lora_A["default"].weight.data.copy_(a)
    lora_layer.lora_B["default"].weight.data.copy_(b)
    params = [p for p in model.parameters() if p.requires_grad]
    nbytes = layer.weight.numel() + sum(
        t.numel() * t.element_size() for t in (layer.weight.quant_state.absmax, layer.weight.quant_state.state2.absmax)
    )
    return _closure(model, x, params, case.mode), nbytes


PROVIDERS = {"ours": build_ours, "bf16+lora": build_dense_bf16, "bnb+peft": build_bnb_peft}
