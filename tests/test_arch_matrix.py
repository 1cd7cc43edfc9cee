"""Drop-in coverage: every method on tiny random models of the common architectures.

Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Phi3, GPT-NeoX, GPT-2 (Conv1D), OPT, Falcon,
T5 and BART; for each: qlora (nf4 / int4 / int8), lora, adapter and prompt run forward and
backward with the logits at init equal to the unmodified model's (up to the quantization, which
is checked exactly against the dequantized weights); `.weight` reads; dtype and device moves
keep the packed buffers; adapters cross over to and from PEFT.
"""

from __future__ import annotations

import copy

import pytest
import torch
from arch_support import ARCHS, base, inputs, is_encoder_decoder
from helpers import assert_close_by_norm
from torch import nn

import qlora_kernels as qk
from qlora_kernels.nn import LoRALinear, QuantLinear
from qlora_kernels.nn.dense import dense_weight

METHODS = [
    ("qlora", "nf4"),
    ("qlora", "int4"),
    ("qlora", "int8"),
    ("lora", None),
    ("adapter", None),
    ("prompt", None),
]
#: loose bound on the whole model's logits against the unquantized model (the exact check is the dequantized one)
QUANT_DRIFT = {"nf4": 0.3, "int4": 0.3, "int8": 0.03}


def prepare(arch: str, method: str, quant: str | None = None, **opts) -> nn.Module:
    defaults = {"qlora": {"r": 4}, "lora": {"r": 4}, "adapter": {"bottleneck": 8}, "prompt": {"num_virtual_tokens": 3}}
    opts = {**defaults[method], **opts}
    if quant is not None:
        opts["quant"] = quant
    return qk.prepare_model(copy.deepcopy(base(arch)), method, **opts)


def dequantized_reference(arch: str, model: nn.Module) -> nn.Module:
    """The unmodified model with each quantized layer's weight set to what the packed weight decodes to."""
    ref = copy.deepcopy(base(arch))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                dense_weight(ref.get_submodule(name.removesuffix(".base"))).copy_(module.dequantized_weight())
    return ref


def prompt_reference_logits(arch: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unmodified model fed the soft prompt in front of the input embeddings by hand."""
    ref = base(arch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt = model.qk_prompt.embedding.weight.detach()
    embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), ref.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([mask.new_ones(ids.shape[0], prompt.shape[0]), mask], dim=1)
    kwargs = {"labels": batch["labels"]} if is_encoder_decoder(arch) else {}
    with torch.no_grad():
        return ref(inputs_embeds=embeds, attention_mask=mask, **kwargs).logits


def check_weight_reads(model: nn.Module) -> None:
    """`.weight` of QuantLinear and LoRALinear answers shape, dtype and device, and its values decode."""
    checked_values = False
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            w = module.weight
            assert w.shape == (module.out_features, module.in_features), name
            assert w.dtype == torch.float32 and w.device == module.weight_data.device and not w.requires_grad, name
            if not checked_values:
                assert torch.equal(w * 1, module.dequantized_weight(torch.float32)), name
                checked_values = True
        elif isinstance(module, LoRALinear):
            if isinstance(module.base, QuantLinear):
                assert module.weight.shape == module.base.weight.shape and module.weight.dtype == torch.float32
            else:
                assert module.weight is module.base.weight, name


@pytest.mark.parametrize("method,quant", METHODS, ids=lambda v: str(v))
@pytest.mark.parametrize("arch", ARCHS)
def test_method_runs_forward_backward_and_starts_as_the_model(arch, method, quant):
    model = prepare(arch, method, quant)
    batch = inputs(arch)
    frozen_dtypes = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert set(frozen_dtypes.values()) == {torch.float32}, "prepare_model changed the dtype of frozen weights"
    check_weight_reads(model)

    out = model(**batch)
    if method == "prompt":
        expected = prompt_reference_logits(arch, model, batch)
    else:
        ref = dequantized_reference(arch, model) if quant else base(arch)
        with torch.no_grad():
            expected = ref(**batch).logits
    assert_close_by_norm(out.logits.detach(), expected, 1e-5, f"{arch} {method} {quant}: logits at init")
    if quant:
        with torch.no_grad():
            dense = base(arch)(**batch).logits
        assert_close_by_norm(out.logits.detach(), dense, QUANT_DRIFT[quant], f"{arch} {quant} vs the dense model")

    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert any(p.grad.abs().sum() > 0 for p in trainable.values()), "no gradient reached the trainable parameters"
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def packed(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("weight_")}


def assert_same_packed(before: dict[str, torch.Tensor], model: nn.Module, device: str = "cpu") -> None:
    after = {n: b for n, b in model.named_buffers() if n in before}
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype and tensor.device.type == device, name
        if device != "meta":
            assert torch.equal(tensor, before[name]), f"{name} changed"


MOVES = [(arch, "nf4") for arch in ARCHS] + [("llama", "int4"), ("llama", "int8"), ("gpt2", "int4"), ("t5", "int8")]


@pytest.mark.parametrize("arch,quant", MOVES)
def test_dtype_and_device_moves_keep_the_packed_weights(arch, quant):
    model = prepare(arch, "qlora", quant, target_modules="all-linear")
    batch = inputs(arch)
    before = packed(model)
    assert before, "nothing was quantized"
    with torch.no_grad():
        logits32 = model(**batch).logits

    model.to(torch.bfloat16)
    assert_same_packed(before, model)
    assert all(m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        logits16 = model(**batch).logits
    assert logits16.dtype == torch.bfloat16
    assert_close_by_norm(logits16.float(), logits32, 0.05, f"{arch}: bf16 forward after .to(bfloat16)")

    saved = model.state_dict()  # a state dict saved after .to(bf16) reloads into a fresh bf16 model
    fresh = prepare(arch, "qlora", quant, target_modules="all-linear").to(torch.bfloat16)
    fresh.load_state_dict(saved)
    assert_same_packed(before, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, logits16)

    model.half()
    assert_same_packed(before, model)
    model.float()
    assert_same_packed(before, model)
    with torch.no_grad():
        assert_close_by_norm(model(**batch).logits, logits32, 0.05, f"{arch}: fp32 forward after .half().float()")

    model.to("meta")
    assert_same_packed(before, model, device="meta")
    assert all(m.weight.device.type == "meta" for m in model.modules() if isinstance(m, QuantLinear))


@pytest.mark.gpu
def test_to_cuda_moves_the_packed_weights_and_keeps_the_output():
    model = prepare("llama", "qlora", "nf4", target_modules="all-linear")
    batch = inputs("llama")
    before = packed(model)
    with torch.no_grad():
        cpu_logits = model(**batch).logits
    model.to("cuda")
    assert_same_packed({n: t.cuda() for n, t in before.items()}, model, device="cuda")
    with torch.no_grad():
        cuda_logits = model(**{k: v.cuda() for k, v in batch.items()}).logits
    assert_close_by_norm(cuda_logits.cpu(), cpu_logits, 1e-3, "cuda vs cpu")


def randomize_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)


@pytest.mark.peers
@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_cross_over_with_peft(arch, tmp_path):
    peft = pytest.importorskip("peft", reason="peers extra (peft) not installed")
    batch = inputs(arch)

    ours = prepare(arch, "lora")
    randomize_lora(ours)
    qk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base(arch)), tmp_path / "ours").eval()
    n_lora = sum(isinstance(m, LoRALinear) for m in ours.modules())
    n_peft = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in theirs.modules())
    assert n_peft == n_lora, "PEFT put LoRA on other layers than the adapter was trained on"
    with torch.no_grad():
        expected = ours(**batch).logits
        assert_close_by_norm(theirs(**batch).logits, expected, 1e-5, f"{arch}: our adapter in PEFT")

    targets = ours.qk_config.target_modules
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    trained = peft.get_peft_model(copy.deepcopy(base(arch)), config)
    randomize_lora(trained)
    trained.save_pretrained(tmp_path / "peft")
    loaded = qk.load_adapter(copy.deepcopy(base(arch)), tmp_path / "peft")
    with torch.no_grad():
        expected = trained(**batch).logits
        assert_close_by_norm(loaded(**batch).logits, expected, 1e-5, f"{arch}: PEFT adapter in qlora-kernels")

    quantized = prepare(arch, "qlora", "nf4")
    randomize_lora(quantized)
    qk.save_adapter(quantized, tmp_path / "qlora")
    dense = peft.PeftModel.from_pretrained(dequantized_reference(arch, quantized), tmp_path / "qlora").eval()
    with torch.no_grad():
        expected = quantized(**batch).logits
        assert_close_by_norm(dense(**batch).logits, expected, 1e-5, f"{arch}: QLoRA adapter on the dequantized model")
