"""qlora_linear's argument checks, dispatch, autocast and the torch backend's autograd function."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import assert_close_by_norm

import qlora_kernels as qk
from qlora_kernels.formats.backends import auto_backend
from qlora_kernels.ops.qlora_linear import QLoRALinearFunction, resolve_backend

K, N, R = 64, 48, 4


@pytest.fixture
def args():
    qt = qk.quantize(torch.randn(N, K) * 0.1, "nf4")
    return qt, torch.randn(R, K) * 0.1, torch.randn(N, R) * 0.1, torch.randn(N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
def test_torch_backend_matches_the_reference(args, dtype, lead):
    qt, a, b, bias = args
    x = torch.randn(*lead, K).to(dtype)
    y = qk.qlora_linear(x, qt, a, b, 0.7, bias, backend="torch")
    assert y.dtype == dtype and y.shape == (*lead, N)
    assert_close_by_norm(y, qk.qlora_linear_ref(x, qt, a, b, 0.7, bias), 1e-6)


def test_the_function_saves_no_dense_weight(args):
    qt, a, b, bias = args
    x = torch.randn(6, K, requires_grad=True)
    a = a.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        qk.qlora_linear(x, qt, a, b, 1.0, bias, backend="torch").sum().backward()
    assert (N, K) not in saved, f"a dense weight was saved for backward: {saved}"


def test_autocast_on_cpu_gives_bf16(args):
    qt, a, b, bias = args
    x = torch.randn(4, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qk.qlora_linear(x, qt, a, b, 1.0, bias, backend="torch")
    assert y.dtype == torch.bfloat16
    assert_close_by_norm(y, qk.qlora_linear_ref(x.bfloat16(), qt, a, b, 1.0, bias), 1e-6)


def test_non_contiguous_x_equals_its_contiguous_copy(args):
    qt, a, b, bias = args
    big = torch.randn(7, 2 * K)
    x = big[:, ::2]
    assert not x.is_contiguous()
    torch.testing.assert_close(
        qk.qlora_linear(x, qt, a, b, 1.0, bias, backend="torch"),
        qk.qlora_linear(x.contiguous(), qt, a, b, 1.0, bias, backend="torch"),
        rtol=0,
        atol=0,
    )


def test_bias_gradient_and_no_lora(args):
    qt, _, _, bias = args
    bias = bias.clone().requires_grad_()
    x = torch.randn(5, K, requires_grad=True)
    qk.qlora_linear(x, qt, None, None, 1.0, bias, backend="torch").sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((N,), 5.0))
    torch.testing.assert_close(x.grad, qt.dequantize(torch.float32).sum(0).expand(5, K).contiguous())


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda x, a, b, bias: (x[:, :-1], a, b, bias), ValueError, "last dimension must equal in_features"),
        (lambda x, a, b, bias: (x.long(), a, b, bias), TypeError, "x must be a bfloat16"),
        (lambda x, a, b, bias: (x, a[:, :-1], b, bias), ValueError, "lora_a must have shape"),
        (lambda x, a, b, bias: (x, a, b[:, :-1], bias), ValueError, "lora_b must have shape"),
        (lambda x, a, b, bias: (x, a[:-1], b, bias), ValueError, "lora_b must have shape"),
        (lambda x, a, b, bias: (x, a, None, bias), ValueError, "both lora_a and lora_b"),
        (lambda x, a, b, bias: (x, a, b, bias[:-1]), ValueError, "bias must have shape"),
        (lambda x, a, b, bias: (x, a.long(), b, bias), TypeError, "lora_a must be a float"),
        (lambda x, a, b, bias: (x, a.to("meta"), b, bias), ValueError, "one device"),
    ],
)
def test_bad_input(args, change, exc, match):
    qt, a, b, bias = args
    x, a, b, bias = change(torch.randn(3, K), a, b, bias)
    with pytest.raises(exc, match=match):
        qk.qlora_linear(x, qt, a, b, 1.0, bias, backend="torch")


def test_unknown_backend_and_bad_weight(args):
    qt, a, b, bias = args
    with pytest.raises(ValueError, match="backend must be one of"):
        qk.qlora_linear(torch.randn(2, K), qt, a, b, 1.0, bias, backend="cuda")
    with pytest.raises(TypeError, match="QuantizedTensor"):
        qk.qlora_linear(torch.randn(2, K), torch.randn(N, K), a, b)


def test_auto_backend_on_the_cpu_uses_native_when_built(monkeypatch):
    module = importlib.import_module("qlora_kernels.ops.qlora_linear")
    native = importlib.import_module("qlora_kernels.ops.native")
    cpu = torch.device("cpu")

    for built in (True, False):
        monkeypatch.setattr(native, "native_available", lambda built=built: built)
        monkeypatch.setattr(module, "native_available", lambda built=built: built)
        expected = "native" if built else "torch"
        assert resolve_backend("auto", cpu).decode == expected
        # one policy: dequantize(backend="auto") picks the same backend as qlora_linear
        assert auto_backend(cpu) == expected
    assert auto_backend(torch.device("cuda")) == "triton"
    assert resolve_backend("torch", cpu).decode == "torch"
    with pytest.raises(ValueError, match="not built"):
        resolve_backend("native", cpu)
    assert QLoRALinearFunction is not None


def test_native_and_torch_backends_agree_exactly(args):
    from qlora_kernels.ops.native import native_available

    if not native_available():
        pytest.skip("native extension not built")
    qt, a, b, bias = args
    x = torch.randn(2, 9, K, requires_grad=True)
    y1 = qk.qlora_linear(x, qt, a, b, 0.5, bias, backend="native")
    (g1,) = torch.autograd.grad(y1.square().sum(), x)
    y2 = qk.qlora_linear(x, qt, a, b, 0.5, bias, backend="torch")
    (g2,) = torch.autograd.grad(y2.square().sum(), x)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)


@pytest.mark.parametrize(
    "scaling,exc,match",
    [
        (float("nan"), ValueError, "scaling must be a finite number, got nan"),
        (float("inf"), ValueError, "scaling must be a finite number"),
        ("1", TypeError, "scaling must be a real number"),
        (True, TypeError, "scaling must be a real number"),
        (None, TypeError, "scaling must be a real number"),
    ],
)
def test_scaling_must_be_a_finite_number(args, scaling, exc, match):
    qt, a, b, bias = args
    with pytest.raises(exc, match=match):
        qk.qlora_linear(torch.randn(2, K), qt, a, b, scaling, bias, backend="torch")


def test_register_qlora_backend_makes_the_name_selectable(args, monkeypatch):
    module = importlib.import_module("qlora_kernels.ops.qlora_linear")
    monkeypatch.setattr(module, "_BACKEND_IMPLS", dict(module._BACKEND_IMPLS))  # forget "mine" afterwards

    class Counting(module.TorchBackend):
        calls = 0

        def forward(self, *a, **kw):
            Counting.calls += 1
            return super().forward(*a, **kw)

    qk.ops.register_qlora_backend("mine", Counting("torch"))
    assert "mine" in module.qlora_backend_names()
    qt, a, b, bias = args
    x = torch.randn(3, K)
    y = qk.qlora_linear(x, qt, a, b, 0.5, bias, backend="mine")
    assert Counting.calls == 1
    assert_close_by_norm(y, qk.qlora_linear_ref(x, qt, a, b, 0.5, bias), 1e-6)
    qk.QuantLinear(qt, bias, backend="mine")(x)
    assert Counting.calls == 2
    with pytest.raises(TypeError, match="must provide forward"):
        qk.ops.register_qlora_backend("broken", object())
    with pytest.raises(ValueError, match="other than 'auto'"):
        qk.ops.register_qlora_backend("auto", module.TorchBackend("torch"))


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_without_gradients_the_forward_skips_autograd_and_gives_the_same_values(args, backend, monkeypatch):
    from qlora_kernels.ops.native import native_available

    if backend == "native" and not native_available():
        pytest.skip("native extension not built")
    qt, a, b, bias = args
    x = torch.randn(3, 7, K)
    with_grad = qk.qlora_linear(x.requires_grad_(), qt, a, b, 0.5, bias, backend=backend)
    applied = []
    monkeypatch.setattr(QLoRALinearFunction, "apply", lambda *args: applied.append(1))
    with torch.no_grad():
        without = qk.qlora_linear(x, qt, a, b, 0.5, bias, backend=backend)
    plain = qk.qlora_linear(x.detach(), qt, a, b, 0.5, bias, backend=backend)  # nothing requires grad
    assert applied == [] and not without.requires_grad
    assert torch.equal(without, with_grad.detach()) and torch.equal(plain, without)
