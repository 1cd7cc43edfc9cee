"""lora_swiglu_mlp (one autograd node for a quantized LoRA SwiGLU MLP) and fuse_swiglu_mlps on models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlora_kernels as qk
from qlora_kernels.nn.fused_mlp import fuse_swiglu_mlps, is_swiglu_lora_mlp
from qlora_kernels.ops import native
from qlora_kernels.ops.lora_mlp import LoRALinearArgs, lora_swiglu_mlp

HIDDEN, INTER, R = 96, 160, 4  # multiples of the 32-weight group, not of 64; the down projection has N = 99


def _linear_args(n: int, k: int, fmt: str, lora: bool, bias: bool, backend: str) -> LoRALinearArgs:
    qt = qk.quantize(torch.randn(n, k) * 0.1, fmt, 32 if fmt != "int8" else None)
    a = (torch.randn(R, k) * 0.1).requires_grad_() if lora else None
    b = (torch.randn(n, R) * 0.1).requires_grad_() if lora else None
    return LoRALinearArgs(qt, a, b, 0.5, torch.randn(n) * 0.1 if bias else None, backend)


def _unfused(x: torch.Tensor, gate: LoRALinearArgs, up: LoRALinearArgs, down: LoRALinearArgs) -> torch.Tensor:
    call = lambda s, t: qk.qlora_linear(t, s.qt, s.lora_a, s.lora_b, s.scaling, s.bias, backend=s.backend)
    return call(down, F.silu(call(gate, x)) * call(up, x))


def _grads(fn, x, specs) -> list[torch.Tensor | None]:
    x = x.detach().clone().requires_grad_()
    y = fn(x, *specs)
    torch.manual_seed(3)
    y.backward(torch.randn_like(y))
    leaves = [x] + [t for s in specs for t in (s.lora_a, s.lora_b) if t is not None]
    grads = [t.grad.clone() if t.grad is not None else None for t in leaves]
    for t in leaves:
        t.grad = None
    return [y.detach(), *grads]


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 9)])
def test_values_and_gradients_equal_three_qlora_linear_calls(backend, fmt, dtype, lead):
    if backend == "native" and not native.native_available():
        pytest.skip(native.native_status().error or "the C++ extension is not built")
    torch.manual_seed(0)
    specs = (
        _linear_args(INTER, HIDDEN, fmt, True, False, backend),
        _linear_args(INTER, HIDDEN, fmt, True, True, backend),
        _linear_args(HIDDEN + 3, INTER, fmt, True, False, backend),
    )
    x = torch.randn(*lead, HIDDEN).to(dtype)
    fused, reference = _grads(lora_swiglu_mlp, x, specs), _grads(_unfused, x, specs)
    assert fused[0].shape == (*lead, HIDDEN + 3) and fused[0].dtype == dtype
    for got, want in zip(fused, reference, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_backend_gives_the_same_values_and_gradients(dtype):
    """The GPU's backend (here in Triton's interpreter) through the fused node and through three calls."""
    torch.manual_seed(0)
    specs = (
        _linear_args(INTER, HIDDEN, "nf4", True, False, "triton"),
        _linear_args(INTER, HIDDEN, "nf4", True, False, "triton"),
        _linear_args(HIDDEN, INTER, "nf4", True, False, "triton"),
    )
    x = torch.randn(2, 9, HIDDEN).to(dtype)
    for got, want in zip(_grads(lora_swiglu_mlp, x, specs), _grads(_unfused, x, specs), strict=True):
        assert torch.equal(got, want)


def test_without_lora_and_without_grad_it_is_the_plain_forward():
    torch.manual_seed(0)
    specs = tuple(_linear_args(n, k, "nf4", False, False, "torch") for n, k in ((INTER, HIDDEN),) * 2) + (
        _linear_args(HIDDEN, INTER, "nf4", False, False, "torch"),
    )
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        assert torch.equal(lora_swiglu_mlp(x, *specs), _unfused(x, *specs))
    x.requires_grad_()
    lora_swiglu_mlp(x, *specs).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_it_saves_two_intermediate_tensors_instead_of_four():
    torch.manual_seed(0)
    specs = (
        _linear_args(INTER, HIDDEN, "nf4", True, False, "torch"),
        _linear_args(INTER, HIDDEN, "nf4", True, False, "torch"),
        _linear_args(HIDDEN, INTER, "nf4", True, False, "torch"),
    )
    x = torch.randn(8, HIDDEN, requires_grad=True)

    def intermediate_storages(fn) -> int:
        storages = set()

        def pack(t):
            if t.shape[-1] == INTER and t.dim() == 2 and t.shape[0] == 8:
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, *specs)
        return len(storages)

    assert intermediate_storages(_unfused) == 4
    assert intermediate_storages(lora_swiglu_mlp) == 2


def test_bad_arguments_get_clear_errors():
    specs = [_linear_args(INTER, HIDDEN, "nf4", True, False, "torch") for _ in range(2)]
    down = _linear_args(HIDDEN, INTER, "nf4", True, False, "torch")
    x = torch.randn(2, HIDDEN)
    with pytest.raises(TypeError, match="up must be a LoRALinearArgs"):
        lora_swiglu_mlp(x, specs[0], "up", down)
    with pytest.raises(ValueError, match="down's in_features"):
        lora_swiglu_mlp(x, *specs, _linear_args(HIDDEN, INTER + 32, "nf4", True, False, "torch"))
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        lora_swiglu_mlp(x, specs[0], _linear_args(INTER + 32, HIDDEN, "nf4", True, False, "torch"), down)
    with pytest.raises(ValueError, match="in_features K=96"):
        lora_swiglu_mlp(torch.randn(2, HIDDEN + 1), *specs, down)


# ------------------------------------------------------------------------------ on models
def _tiny_llama(dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def _unfuse(model: nn.Module) -> None:
    for module in model.modules():
        module.__dict__.pop("forward", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepare_model_fuses_llama_mlps_without_changing_loss_or_gradients(dtype):
    fused = qk.prepare_model(_tiny_llama(dtype), "qlora", r=R, group_size=32, target_modules="all-linear")
    mlps = [m for m in fused.modules() if is_swiglu_lora_mlp(m)]
    assert len(mlps) == 2 and all("forward" in m.__dict__ for m in mlps)
    torch.manual_seed(1)
    for p in fused.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)  # B is zero at init: give the LoRA path a value
    plain = copy.deepcopy(fused)
    assert all("forward" in m.__dict__ for m in plain.modules() if is_swiglu_lora_mlp(m))
    _unfuse(plain)
    ids = torch.randint(0, 97, (2, 21))
    losses = []
    for model in (fused, plain):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(*losses)
    for p, q in zip(fused.parameters(), plain.parameters(), strict=True):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad)
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids[:, :1]).logits, plain(input_ids=ids[:, :1]).logits)


def test_merged_or_dropout_projections_take_the_class_forward(monkeypatch):
    model = qk.prepare_model(
        _tiny_llama(torch.float32), "qlora", r=R, group_size=32, dropout=0.1, target_modules="all-linear"
    )
    mlp = model.model.layers[0].mlp
    calls = []
    monkeypatch.setattr("qlora_kernels.nn.fused_mlp.lora_swiglu_mlp", lambda *a: calls.append(1) or a[0])
    x = torch.randn(1, 3, HIDDEN)
    model.train()
    mlp(x)  # dropout active in training: the class's forward applies it
    assert calls == []
    model.eval()
    mlp(x)
    assert calls == [1]
    mlp.up_proj.merge()
    mlp(x)
    assert calls == [1]


class _NotSwiGLU(nn.Module):
    """Same attribute names as a Llama MLP, a different formula: must not be fused."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(HIDDEN, INTER, bias=False), nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


def test_an_mlp_with_another_formula_keeps_its_forward():
    model = nn.Sequential(_NotSwiGLU())
    model.requires_grad_(False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        dense = getattr(model[0], name)
        setattr(model[0], name, qk.LoRALinear(qk.QuantLinear.from_linear(dense, "nf4", 32), r=R))
    assert is_swiglu_lora_mlp(model[0])
    assert fuse_swiglu_mlps(model) == 0
    assert "forward" not in model[0].__dict__
