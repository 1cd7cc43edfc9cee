"""PEFT's `get_peft_model` on models with our QuantLinear layers (tiny random Llama / GPT-2, no download)."""

from __future__ import annotations

import copy

import pytest
import torch
from arch_support import base, inputs
from helpers import assert_close_by_norm
from torch import nn

import qlora_kernels as qk
import qlora_kernels.nn.quant_linear as quant_linear_module
from qlora_kernels.nn import QuantLinear
from qlora_kernels.nn.dense import dense_weight
from qlora_kernels.tuning.targets import linear_modules, set_submodule

peft = pytest.importorskip("peft", reason="peers extra (peft) not installed")
from qlora_kernels.integrations.peft import QuantLoraLinear, load_peft_adapter, register_lora_layers  # noqa: E402

pytestmark = pytest.mark.peers
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]


def quantized(arch: str = "llama", fmt: str = "nf4", only: list[str] | None = None) -> nn.Module:
    """The tiny model with every linear except the head (or those named in `only`) quantized."""
    model = copy.deepcopy(base(arch))
    head = model.get_output_embeddings()
    for name, module in linear_modules(model).items():
        if module is not head and (only is None or name.rsplit(".", 1)[-1] in only):
            set_submodule(model, name, QuantLinear.from_linear(module, fmt))
    return model


def dequantized(arch: str, model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    ref = copy.deepcopy(base(arch))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                target = ref.get_submodule(name.removeprefix("base_model.model.").removesuffix(".base_layer"))
                dense_weight(target).copy_(module.dequantized_weight())
    return ref.to(dtype)


def peft_model(arch: str = "llama", only: list[str] | None = None, **lora) -> nn.Module:
    config = register_lora_layers(peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora}))
    model = peft.get_peft_model(quantized(arch, only=only), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts qlora_linear calls made with a LoRA side path (the fused route)."""
    calls = []
    original = quant_linear_module.qlora_linear

    def spy(x, qt, lora_a=None, lora_b=None, *args, **kwargs):
        calls.append(lora_a is not None)
        return original(x, qt, lora_a, lora_b, *args, **kwargs)

    monkeypatch.setattr(quant_linear_module, "qlora_linear", spy)
    return calls


def test_get_peft_model_runs_one_fused_call_per_lora_layer(fused_calls):
    model = peft_model()
    lora_layers = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(lora_layers) == 2 * len(TARGETS)  # two blocks
    assert all(m.fan_in_fan_out is False for m in lora_layers)
    quantized_layers = sum(isinstance(m, QuantLinear) for m in model.modules())
    model.train()
    batch = inputs("llama")
    loss = model(**batch).loss
    assert len(fused_calls) == quantized_layers, "one qlora_linear call per quantized layer, LoRA included"
    assert sum(fused_calls) == len(lora_layers), "every LoRA layer ran base + side path in one call"
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_fused_path_equals_peft_generic_path():
    model = peft_model()
    batch = inputs("llama")
    fused = model(**batch)
    fused.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for module in model.modules():
        if isinstance(module, QuantLoraLinear):
            module._fused_adapter = lambda kwargs: None  # PEFT's own path: base layer, then lora_B(lora_A(x))
    generic = model(**batch)
    generic.loss.backward()
    assert_close_by_norm(fused.logits.detach(), generic.logits.detach(), 1e-5, "logits")
    for name, grad in fused_grads.items():
        assert_close_by_norm(grad, model.get_parameter(name).grad, 1e-4, name)


def test_dropout_while_training_takes_the_generic_path(fused_calls):
    model = peft_model(lora_dropout=0.1)
    batch = inputs("llama")
    model.train()
    model(**batch)
    assert not any(fused_calls), "dropout applies to the side path only, so it cannot share the fused call"
    fused_calls.clear()
    model.eval()
    model(**batch)
    assert sum(fused_calls) == 2 * len(TARGETS)


def test_saved_adapter_loads_in_plain_peft_in_qlora_kernels_and_back(tmp_path):
    model = peft_model(only=TARGETS).eval()  # qlora in qk quantizes the LoRA targets
    batch = inputs("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)

    dense = peft.PeftModel.from_pretrained(dequantized("llama", model), tmp_path).eval()
    with torch.no_grad():
        assert_close_by_norm(dense(**batch).logits, expected, 1e-5, "plain PEFT, fp32 dense model")
    dense16 = peft.PeftModel.from_pretrained(dequantized("llama", model, torch.bfloat16), tmp_path).eval()
    with torch.no_grad():
        assert_close_by_norm(dense16(**batch).logits.float(), expected, 3e-2, "plain PEFT, bf16 dense model")

    ours = qk.load_adapter(copy.deepcopy(base("llama")), tmp_path, quant="nf4")
    with torch.no_grad():
        assert_close_by_norm(ours(**batch).logits, expected, 1e-5, "qk.load_adapter with quant='nf4'")

    again = load_peft_adapter(quantized(only=TARGETS), tmp_path)
    assert any(isinstance(m, QuantLoraLinear) for m in again.modules())
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, expected)


def test_merge_and_unload_requantizes_into_quantlinear():
    model = peft_model(r=4).eval()
    batch = inputs("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    merged = model.merge_and_unload()
    assert not any(isinstance(m, QuantLoraLinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        assert_close_by_norm(merged(**batch).logits, expected, 0.2, "merged (requantized) vs adapter")


def test_unmerge_restores_the_adapter_output_up_to_requantization():
    model = peft_model().eval()
    batch = inputs("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    model.merge_adapter()
    with pytest.warns(UserWarning, match="requantizes"):
        model.unmerge_adapter()
    with torch.no_grad():
        assert_close_by_norm(model(**batch).logits, expected, 0.2, "merge + unmerge")


def test_unsupported_options_are_rejected():
    with pytest.raises(ValueError, match="does not support DoRA"):
        peft_model(use_dora=True)
    with pytest.raises(TypeError, match="must be a peft.LoraConfig"):
        register_lora_layers({"r": 4})


def test_lora_bias_uses_the_generic_path(fused_calls):
    model = peft_model(lora_bias=True)
    model(**inputs("llama"))
    assert not any(fused_calls)


def test_all_linear_includes_quantized_layers_when_the_model_is_given():
    model = quantized()
    config = register_lora_layers(peft.LoraConfig(r=4, target_modules="all-linear"), model)
    assert "lm_head" not in config.target_modules
    assert config.target_modules == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    wrapped = peft.get_peft_model(model, config)
    assert sum(isinstance(m, QuantLoraLinear) for m in wrapped.modules()) == 14


def test_gpt2_conv1d_layers_quantized_then_peft():
    model = peft_model("gpt2", target_modules=["c_attn", "c_fc"]).eval()
    layers = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(layers) == 2 and all(not m.fan_in_fan_out for m in layers)
    batch = inputs("gpt2")
    ref = dequantized("gpt2", model)
    with torch.no_grad():
        for name, module in model.named_modules():  # add B @ A to the dense Conv1D weights (stored (in, out))
            if isinstance(module, QuantLoraLinear):
                target = ref.get_submodule(name.removeprefix("base_model.model."))
                dense_weight(target).add_(module.get_delta_weight("default"))
        assert_close_by_norm(model(**batch).logits, ref(**batch).logits, 1e-5, "GPT-2 with QuantLoraLinear")


def test_kbit_preparation_and_gradient_checkpointing_keep_the_packed_weights(fused_calls):
    """The usual QLoRA recipe: prepare_model_for_kbit_training, then LoRA, trained with checkpointing."""
    model = quantized()
    before = {k: v.clone() for k, v in model.state_dict().items() if ".weight_" in k}
    model = peft.prepare_model_for_kbit_training(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # PEFT turns checkpointing on for bitsandbytes-style models only; TRL (gradient_checkpointing=True) does it so
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    config = register_lora_layers(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = inputs("llama")
    model.train()
    model(**batch).loss.backward()
    checkpointed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    recomputed = sum(fused_calls)
    fused_calls.clear()
    model.zero_grad()
    model.base_model.model.gradient_checkpointing_disable()
    model(**batch).loss.backward()
    assert recomputed == 2 * sum(fused_calls) > 0, "checkpointing should run every LoRA layer's forward again"
    for name, grad in checkpointed.items():
        assert_close_by_norm(grad, model.get_parameter(name).grad, 1e-5, name)
