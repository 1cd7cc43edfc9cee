"""QuantLinear and LoRALinear: equality with their base, merge/unmerge, state dicts, bad input, PEFT parity."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_by_norm
from torch import nn

import qlora_kernels as qk


def _linear(k: int = 96, n: int = 80, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    if bias:
        nn.init.normal_(lin.bias, std=0.1)
    return lin


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_quant_linear_matches_dense_layer_on_the_dequantized_weight(fmt):
    lin = _linear()
    q = qk.QuantLinear.from_linear(lin, fmt, group_size=None if fmt == "int8" else 32)
    x = torch.randn(2, 5, 96)
    expected = x @ q.dequantized_weight(torch.float32).t() + lin.bias
    assert_close_by_norm(q(x), expected, 1e-6, fmt)
    # and stays close to the unquantized layer (quantization error only)
    rel = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
    assert rel < (0.01 if fmt == "int8" else 0.12)
    assert not list(q.parameters(recurse=False)) or all(not p.requires_grad for p in q.parameters())
    assert fmt in repr(q)


def test_quant_linear_keeps_the_packed_weight_in_buffers_not_parameters():
    q = qk.QuantLinear.from_linear(_linear(), "nf4")
    names = {n for n, _ in q.named_parameters()}
    assert names == {"bias"}
    assert {"weight_data", "weight_scales", "weight_meta"} <= {n for n, _ in q.named_buffers()}
    assert not isinstance(q, nn.Linear)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_quant_linear_state_dict_round_trip(fmt):
    q = qk.QuantLinear.from_linear(_linear(), fmt)
    other = qk.QuantLinear.from_linear(_linear(), fmt)
    x = torch.randn(3, 96)
    assert not torch.equal(other(x), q(x))
    other.load_state_dict(q.state_dict())
    assert torch.equal(other(x), q(x))


def test_quant_linear_rejects_a_state_dict_of_another_format_or_shape():
    q = qk.QuantLinear.from_linear(_linear(), "nf4")
    with pytest.raises(ValueError, match="'int4' weight, but a 'nf4'"):
        q.load_state_dict(qk.QuantLinear.from_linear(_linear(), "int4").state_dict())
    with pytest.raises(ValueError, match="shape"):
        q.load_state_dict(qk.QuantLinear.from_linear(_linear(96, 64), "nf4").state_dict())


@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
def test_lora_linear_at_init_equals_its_base(base_kind):
    lin = _linear()
    base = lin if base_kind == "dense" else qk.QuantLinear.from_linear(lin, "nf4")
    lora = qk.LoRALinear(base, r=8, alpha=16)
    x = torch.randn(4, 96)
    assert torch.equal(lora(x), base(x))
    assert lora.lora_A.weight.abs().sum() > 0 and lora.lora_B.weight.abs().sum() == 0


@pytest.mark.parametrize("base_kind", ["dense", "int8", "int4", "nf4"])
def test_lora_forward_and_gradients_match_the_formula(base_kind):
    lin = _linear()
    base = lin if base_kind == "dense" else qk.QuantLinear.from_linear(lin, base_kind)
    lora = qk.LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight, std=0.1)
    x = torch.randn(2, 3, 96, requires_grad=True)
    w = lin.weight.detach() if base_kind == "dense" else base.dequantized_weight(torch.float32)
    a = lora.lora_A.weight.detach().clone().requires_grad_()
    b = lora.lora_B.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    expected = x2 @ w.t() + lin.bias.detach() + lora.scaling * (x2 @ a.t()) @ b.t()
    y = lora(x)
    assert_close_by_norm(y, expected, 1e-5, "forward")
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    assert_close_by_norm(x.grad, x2.grad, 1e-5, "dx")
    assert_close_by_norm(lora.lora_A.weight.grad, a.grad, 1e-5, "dA")
    assert_close_by_norm(lora.lora_B.weight.grad, b.grad, 1e-5, "dB")
    assert all(p.grad is None for p in base.parameters()), "the base must stay frozen"


def test_merge_and_unmerge_on_a_dense_base_are_not_trivial():
    lin = _linear()
    original = lin.weight.detach().clone()
    lora = qk.LoRALinear(lin, r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight, std=0.1)
    x = torch.randn(5, 96)
    with torch.no_grad():
        y = lora(x)
        assert not torch.allclose(y, lin(x), atol=1e-3), "non-zero B must change the output"
        err = lora.merge()
        assert err < 1e-6
        assert not torch.allclose(lin.weight, original), "merge must change the base weight"
        torch.testing.assert_close(lora(x), y, rtol=1e-5, atol=1e-5)
        lora.unmerge()
        torch.testing.assert_close(lin.weight, original, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lora(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not merged"):
        lora.unmerge()


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_merge_into_a_quantized_base_requantizes_and_reports_the_error(fmt):
    lora = qk.LoRALinear(qk.QuantLinear.from_linear(_linear(), fmt), r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight, std=0.02)
    x = torch.randn(5, 96)
    with torch.no_grad():
        y = lora(x)
        err = lora.merge()
        assert 0 < err < (0.01 if fmt == "int8" else 0.12)
        rel = ((lora(x) - y).norm() / y.norm()).item()
        assert rel < 0.15
    with pytest.raises(ValueError, match="cannot unmerge from a quantized base"):
        lora.unmerge()


def test_rslora_and_gaussian_init():
    lora = qk.LoRALinear(_linear(), r=16, alpha=32, use_rslora=True, init="gaussian")
    assert lora.scaling == pytest.approx(32 / 4)
    assert lora.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.2)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"r": 0}, ValueError, "r must be"),
        ({"r": 81}, ValueError, "r must be"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
        ({"init": "xavier"}, ValueError, "init"),
    ],
)
def test_lora_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        qk.LoRALinear(_linear(), **{"r": 4, **kwargs})


def test_lora_rejects_other_base_types():
    with pytest.raises(TypeError, match="nn.Linear, a transformers Conv1D or a QuantLinear, got Conv1d"):
        qk.LoRALinear(nn.Conv1d(3, 3, 1), r=1)


def test_dropout_applies_to_the_side_path_only_in_training():
    lora = qk.LoRALinear(qk.QuantLinear.from_linear(_linear(), "nf4"), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(lora.lora_B.weight, std=0.1)
    x = torch.randn(8, 96)
    lora.eval()
    y_eval = lora(x)
    assert torch.equal(y_eval, lora(x))
    lora.train()
    y_train = lora(x)
    assert not torch.allclose(y_train, y_eval)
    base_only = lora.base(x)
    # the base output is untouched by dropout: y - base is the (dropped) side path only
    assert (y_train - base_only).abs().max() < (y_eval - base_only).abs().max() * 5


peft = pytest.importorskip("peft", reason="peers extra (peft) not installed")


@pytest.mark.peers
def test_same_a_b_scaling_give_the_same_output_as_peft():
    torch.manual_seed(1)
    lin = _linear()
    model = nn.Sequential()
    model.add_module("proj", _linear())
    model.proj.load_state_dict(lin.state_dict())
    config = peft.LoraConfig(r=8, lora_alpha=24, target_modules=["proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, config)
    peft_layer = peft_model.base_model.model.proj
    nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.1)
    ours = qk.LoRALinear(lin, r=8, alpha=24)
    ours.lora_A.weight.data.copy_(peft_layer.lora_A["default"].weight)
    ours.lora_B.weight.data.copy_(peft_layer.lora_B["default"].weight)
    assert ours.scaling == peft_layer.scaling["default"]
    x = torch.randn(3, 7, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- state handling
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_replace_weight_moves_the_new_weight_to_the_layer_device(fmt):
    q = qk.QuantLinear.from_linear(_linear(), fmt).to("meta")
    q.replace_weight(qk.quantize(torch.randn(80, 96), fmt))  # a CPU weight
    assert {b.device.type for b in q.buffers()} == {"meta"}


def test_loading_a_state_dict_copies_it_instead_of_aliasing_it():
    q = qk.QuantLinear.from_linear(_linear(), "nf4")
    source = qk.QuantLinear.from_linear(_linear(), "nf4").state_dict()
    q.load_state_dict(source)
    x = torch.randn(3, 96)
    before = q(x)
    for name, tensor in source.items():
        assert getattr(q, name).data_ptr() != tensor.data_ptr(), f"{name} aliases the caller's state dict"
        tensor.zero_()  # the caller reuses its buffers
    assert torch.equal(q(x), before)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_loading_a_state_dict_keeps_the_layer_on_its_device():
    q = qk.QuantLinear.from_linear(_linear(), "int4").to("meta")
    q.load_state_dict(qk.QuantLinear.from_linear(_linear(), "int4").state_dict())  # CPU tensors
    assert {b.device.type for b in q.buffers()} == {"meta"}


def test_a_state_dict_with_nan_scales_is_refused_with_the_tensor_name():
    model = nn.Sequential(qk.QuantLinear.from_linear(_linear(), "nf4", double_quant=False))
    state = model.state_dict()
    state["0.weight_scales"][0] = float("nan")
    with pytest.raises(ValueError, match="'0.weight_scales' holds NaN or inf"):
        model.load_state_dict(state)


def test_quant_linear_rejects_an_unknown_backend_when_built():
    with pytest.raises(ValueError, match="backend must be one of"):
        qk.QuantLinear.from_linear(_linear(), "nf4", backend="cuda-magic")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"r": True}, TypeError, "r must be an integer, got True"),
        ({"r": 4.0}, TypeError, "r must be an integer"),
        ({"alpha": "32"}, TypeError, "alpha must be a real number"),
        ({"alpha": float("nan")}, ValueError, "alpha must be a finite number"),
        ({"alpha": float("inf")}, ValueError, "alpha must be a finite number"),
        ({"alpha": 0}, ValueError, "alpha must be positive"),
        ({"alpha": False}, TypeError, "alpha must be a real number"),
        ({"dropout": "0.1"}, TypeError, "dropout must be a real number"),
        ({"dropout": float("nan")}, ValueError, "dropout must be a finite number"),
        ({"use_rslora": 1}, TypeError, "use_rslora must be True or False"),
    ],
)
def test_lora_argument_types_and_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        qk.LoRALinear(qk.QuantLinear.from_linear(_linear(), "nf4"), **{"r": 4, **kwargs})


def test_lora_accepts_integer_alpha_and_numpy_numbers():
    np = pytest.importorskip("numpy")
    lora = qk.LoRALinear(_linear(), r=np.int64(4), alpha=np.float32(8.0))
    assert lora.r == 4 and isinstance(lora.r, int) and lora.scaling == 2.0
    assert qk.LoRALinear(_linear(), r=4, alpha=8).scaling == 2.0


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: qk.PromptEmbedding(True, 8), TypeError, "num_virtual_tokens must be an integer"),
        (lambda: qk.PromptEmbedding(4, 8.0), TypeError, "token_dim must be an integer"),
        (lambda: qk.BottleneckAdapter(64, bottleneck=True), TypeError, "bottleneck must be an integer"),
        (lambda: qk.BottleneckAdapter(64, bottleneck=8, dropout="0"), TypeError, "dropout must be a real number"),
    ],
)
def test_adapter_and_prompt_argument_types(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_quant_linear_bias_must_be_a_tensor():
    with pytest.raises(TypeError, match="bias must be a tensor"):
        qk.QuantLinear(qk.quantize(torch.randn(80, 96), "int8"), bias=[0.0] * 80)


def test_quant_linear_reuses_its_weight_view_until_a_buffer_changes():
    layer = qk.QuantLinear.from_linear(torch.nn.Linear(64, 32), "nf4")
    first = layer.qweight
    assert layer.qweight is first  # built once
    other = qk.quantize(torch.randn(32, 64), "nf4")
    layer.replace_weight(other)
    assert layer.qweight is not first and torch.equal(layer.qweight.data, other.data)
    moved = layer.qweight
    layer.to("meta")
    assert layer.qweight is not moved and layer.qweight.data.device.type == "meta"
