"""prepare_model / save / load / merge / param_groups on a tiny random Llama (no download)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import qlora_kernels as qk
from qlora_kernels.nn import BottleneckAdapter, LoRALinear, QuantLinear

VOCAB = 128


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 9))


def fresh(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def randomize_lora(model: nn.Module) -> None:
    """Non-zero B so that LoRA changes the output (B starts at zero)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05)
            if isinstance(m, BottleneckAdapter):
                m.up.weight.normal_(0, 0.05)


METHODS = [
    ("lora", {}),
    ("qlora", {"quant": "nf4"}),
    ("qlora", {"quant": "int4", "target_modules": "all-linear"}),
    ("qlora", {"quant": "int8"}),
    ("adapter", {"bottleneck": 8}),
    ("adapter", {"bottleneck": 8, "quant": "nf4"}),
    ("prompt", {"num_virtual_tokens": 4}),
    ("partial", {"policy": "top_k", "k": 1}),
    ("partial", {"policy": "head"}),
    ("partial", {"policy": "no_embeddings"}),
    ("partial", {"policy": "top_k", "k": 1, "quant": "int8"}),
    ("full", {}),
]


@pytest.mark.parametrize("method,opts", METHODS, ids=lambda v: str(v))
def test_step_trains_only_trainable_and_dtypes(tiny, ids, method, opts):
    model = qk.prepare_model(fresh(tiny), method, **opts)
    assert model.qk_config.method == method
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # frozen weights keep the model's dtype (fp32 here) unless compute_dtype asks otherwise
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if not p.requires_grad)
    randomize_lora(model)  # else the zero-initialised B / up make A / down gradients zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers() if b is not None}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == p.requires_grad, f"{n}: changed={changed}, trainable={p.requires_grad}"
    for n, b in model.named_buffers():
        if b is not None:
            assert torch.equal(b, buffers[n]), f"buffer {n} changed"
    model.eval()
    out = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_lora_closed_form_count():
    """The lecture's number: r=8 on a 4096x4096 matrix trains 2 * 4096 * 8 = 65,536 parameters (256x fewer)."""
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4096, 4096, bias=False))
    qk.prepare_model(model, "lora", r=8, target_modules=["q_proj"], compute_dtype=torch.float32)
    trainable, total = qk.count_parameters(model)
    assert trainable == 65_536
    assert total == 4096 * 4096 + 65_536
    assert 4096 * 4096 // trainable == 256


def test_counts_quantized_by_logical_size_and_peft_format(tiny, capsys):
    dense_total = sum(p.numel() for p in tiny.parameters())
    model = qk.prepare_model(fresh(tiny), "qlora", r=4, target_modules="all-linear")
    lora = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in model.modules() if isinstance(m, LoRALinear))
    assert qk.count_parameters(model) == (lora, dense_total + lora)
    qk.print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    expected = f"trainable params: {lora:,d} || all params: {dense_total + lora:,d} || trainable%: "
    assert line.startswith(expected) and line.endswith(f"{100 * lora / (dense_total + lora):.4f}")


def test_targets_all_linear_skips_head_unless_named(tiny):
    model = qk.prepare_model(fresh(tiny), "lora", target_modules="all-linear", compute_dtype=torch.float32)
    assert not isinstance(model.lm_head, LoRALinear)
    assert len(model.qk_config.target_modules) == 3 * 7
    model = qk.prepare_model(fresh(tiny), "lora", target_modules=["q_proj", "lm_head"], r=4)
    assert isinstance(model.lm_head, LoRALinear)


def test_qlora_wraps_quantlinear_and_default_targets(tiny):
    model = qk.prepare_model(fresh(tiny), "qlora")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, QuantLinear) and layer.base.format == "nf4"
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    assert model.qk_config.quant == "nf4" and model.qk_config.compute_dtype is None


@pytest.mark.parametrize(
    "method,opts,match",
    [
        ("dora", {}, "unknown method='dora'"),
        ("lora", {"target_modules": ["qproj"]}, r"'qproj' matches no linear layer.*candidates are \[.*'q_proj'"),
        ("lora", {"target_modules": ["mlp"]}, "LlamaMLP modules, not linear layers"),
        ("lora", {"target_modules": []}, "target_modules is empty"),
        ("lora", {"r": 40, "target_modules": ["k_proj"]}, r"r=40 is larger than .*k_proj's dims \(32x64\).*r <= 32"),
        ("lora", {"quant": "nf4"}, "use method='qlora'"),
        ("qlora", {"quant": "fp8"}, "quant must be one of"),
        ("qlora", {"group_size": 128, "target_modules": ["q_proj"]}, "cannot quantize .*q_proj.*group_size=128"),
        ("partial", {"policy": "middle"}, "policy must be one of"),
        ("partial", {"policy": "top_k", "k": 9}, r"k in \[1, 3\]"),
        ("full", {"quant": "nf4"}, "drop quant="),
        ("adapter", {"bottleneck": 0}, "bottleneck must be"),
        ("prompt", {"num_virtual_tokens": 0}, "num_virtual_tokens must be"),
    ],
)
def test_bad_input_is_rejected_before_changes(tiny, method, opts, match):
    model = fresh(tiny)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        qk.prepare_model(model, method, **opts)
    assert getattr(model, "qk_config", None) is None
    assert set(model.state_dict()) == set(before)
    assert all(p.requires_grad for p in model.parameters())


def test_prepare_twice_and_unknown_option(tiny):
    model = qk.prepare_model(fresh(tiny), "lora")
    with pytest.raises(ValueError, match="already prepared"):
        qk.prepare_model(model, "lora")
    with pytest.raises(TypeError):
        qk.prepare_model(fresh(tiny), "lora", rank=8)


def test_prompt_needs_input_embeddings():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="needs input embeddings"):
        qk.prepare_model(model, "prompt")


def test_prompt_generate_matches_uncached_greedy_with_left_padding(tiny):
    model = qk.prepare_model(fresh(tiny), "prompt", num_virtual_tokens=3, compute_dtype=torch.float32)
    row = torch.randint(1, VOCAB, (1, 6))
    x = row
    with torch.no_grad():
        for _ in range(4):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    gen = model.generate(input_ids=row, max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, x)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(row)], 1)
    batch = model.generate(
        input_ids=torch.cat([padded, torch.randint(1, VOCAB, (1, 8))]),
        attention_mask=torch.cat([mask, torch.ones(1, 8, dtype=torch.long)]),
        max_new_tokens=4,
        do_sample=False,
    )
    assert torch.equal(batch[0, 2:], x[0])


def test_prompt_labels_and_text_init(tiny):
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5, 6]}

    model = qk.prepare_model(fresh(tiny), "prompt", num_virtual_tokens=5, prompt_init_text="hi", tokenizer=Tok())
    emb = tiny.get_input_embeddings().weight
    assert torch.allclose(model.qk_prompt.embedding.weight, emb[[5, 6, 5, 6, 5]])
    ids = torch.randint(1, VOCAB, (2, 4))
    out = model(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (2, 9, VOCAB) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="needs tokenizer"):
        qk.prepare_model(fresh(tiny), "prompt", prompt_init_text="hi")


def test_gradient_checkpointing_trains_lora(tiny, ids):
    model = qk.prepare_model(fresh(tiny), "lora", gradient_checkpointing=True, compute_dtype=torch.float32)
    randomize_lora(model)
    model.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [m.lora_A.weight.grad for m in model.modules() if isinstance(m, LoRALinear)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "method,opts",
    [
        ("lora", {"r": 4, "alpha": 8, "use_rslora": True}),
        ("qlora", {"quant": "int4", "r": 4}),
        ("adapter", {"bottleneck": 8}),
        ("prompt", {"num_virtual_tokens": 3}),
        ("partial", {"policy": "top_k", "k": 1}),
        ("full", {}),
    ],
)
def test_save_load_round_trip(tiny, ids, tmp_path, method, opts):
    model = qk.prepare_model(fresh(tiny), method, compute_dtype=torch.float32, **opts)
    randomize_lora(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and method in ("partial", "full", "prompt"):
                p.add_(0.01 * torch.randn_like(p))
        want = model(input_ids=ids).logits
    qk.save_adapter(model, tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    loaded = qk.load_adapter(fresh(tiny), tmp_path, compute_dtype=torch.float32)
    assert loaded.qk_config.method == method
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)
    # into an already prepared model as well
    again = qk.prepare_model(fresh(tiny), method, compute_dtype=torch.float32, **opts)
    qk.load_adapter(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want)


def test_lora_files_use_peft_keys_and_only_adapter_tensors(tiny, tmp_path):
    model = qk.prepare_model(fresh(tiny), "qlora", r=4, target_modules=["q_proj", "v_proj"])
    qk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 3 * 2 * 2 and all(".lora_" in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    assert not list(tmp_path.glob("*.tmp"))


def test_load_mismatches_fail_clearly(tiny, tmp_path):
    model = qk.prepare_model(fresh(tiny), "lora", r=4)
    qk.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"rank r=4 but the model was prepared with r=8"):
        qk.load_adapter(qk.prepare_model(fresh(tiny), "lora", r=8), tmp_path)
    with pytest.raises(ValueError, match="'lora' adapter but the model was prepared with method='prompt'"):
        qk.load_adapter(qk.prepare_model(fresh(tiny), "prompt"), tmp_path)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="made for another model"):
        qk.load_adapter(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter folder .*missing does not exist"):
        qk.load_adapter(fresh(tiny), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        qk.load_adapter(fresh(tiny), tmp_path / "empty")


def test_merge_dense_is_exact_and_reloads(tiny, ids, tmp_path):
    model = qk.prepare_model(fresh(tiny), "lora", target_modules="all-linear", compute_dtype=torch.float32)
    randomize_lora(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    merged = qk.merge(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert max(merged.qk_merge_errors.values()) < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path)
    back = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_merge_quantized_reports_error_and_bf16_option(tiny, ids):
    model = qk.prepare_model(fresh(tiny), "qlora", quant="nf4", compute_dtype=torch.float32)
    randomize_lora(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    into_base = qk.merge(copy.deepcopy(model), into="base")
    errs = into_base.qk_merge_errors
    assert isinstance(into_base.model.layers[0].self_attn.q_proj, QuantLinear)
    assert 1e-3 < max(errs.values()) < 0.3  # requantization loses accuracy: reported, not hidden
    dense = qk.merge(model, into="fp32")
    assert not any(isinstance(m, (QuantLinear, LoRALinear)) for m in dense.modules())
    assert max(dense.qk_merge_errors.values()) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot be folded"):
        qk.merge(qk.prepare_model(fresh(tiny), "adapter"))
    with pytest.raises(ValueError, match="into must be one of"):
        qk.merge(qk.prepare_model(fresh(tiny), "lora"), into="int4")


def test_param_groups_layerwise_decay(tiny):
    model = qk.prepare_model(fresh(tiny), "full")
    groups = qk.param_groups(model, lr=1.0, decay=0.5, weight_decay=0.1)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    layers = model.model.layers
    assert lr_of[id(layers[2].self_attn.q_proj.weight)] == 1.0
    assert lr_of[id(layers[1].self_attn.q_proj.weight)] == 0.5
    assert lr_of[id(layers[0].self_attn.q_proj.weight)] == 0.25
    assert lr_of[id(model.model.embed_tokens.weight)] == 0.125
    assert lr_of[id(model.model.norm.weight)] == 1.0
    assert all(g["weight_decay"] == 0.0 for g in groups if g["params"][0].dim() < 2)
    lora = qk.prepare_model(fresh(tiny), "lora")
    assert sum(len(g["params"]) for g in qk.param_groups(lora, 1e-3)) == 3 * 4 * 2
    with pytest.raises(ValueError, match="decay must be in"):
        qk.param_groups(model, 1e-3, decay=0)


class _EmptyTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": []}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert getattr(model, "qk_config", None) is None
    after = model.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, (LoRALinear, QuantLinear, BottleneckAdapter)) for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "method,opts,exc,match",
    [
        ("qlora", {"init": "xavier"}, ValueError, "init must be one of"),
        ("qlora", {"alpha": float("nan")}, ValueError, "alpha must be a finite number"),
        ("lora", {"alpha": "32"}, TypeError, "alpha must be a real number"),
        ("lora", {"alpha": -8}, ValueError, "alpha must be positive"),
        ("lora", {"r": True}, TypeError, "r must be an integer"),
        ("lora", {"dropout": float("nan")}, ValueError, "dropout must be a finite number"),
        ("lora", {"use_rslora": 1}, TypeError, "use_rslora must be True or False"),
        ("lora", {"target_modules": 5}, TypeError, "target_modules must be"),
        ("qlora", {"group_size": 64.0}, TypeError, "group_size must be an integer"),
        ("qlora", {"double_quant": "yes"}, TypeError, "double_quant must be True or False"),
        ("adapter", {"bottleneck": 8.0}, TypeError, "bottleneck must be an integer"),
        ("adapter", {"adapter_activation": "swish"}, ValueError, "activation must be one of"),
        ("prompt", {"num_virtual_tokens": True}, TypeError, "num_virtual_tokens must be an integer"),
        ("prompt", {"prompt_init_text": "x", "tokenizer": _EmptyTokenizer()}, ValueError, "tokenizes to nothing"),
        ("partial", {"policy": "top_k", "k": True}, TypeError, "k must be an integer"),
        ("lora", {"gradient_checkpointing": "yes"}, TypeError, "gradient_checkpointing must be True or False"),
        ("lora", {"compute_dtype": "int8"}, ValueError, "compute_dtype must be one of"),
    ],
)
def test_every_bad_option_leaves_the_model_unchanged(tiny, method, opts, exc, match):
    model = fresh(tiny)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        qk.prepare_model(model, method, **opts)
    _assert_unchanged(model, before)


def test_gradient_checkpointing_on_a_plain_module_is_refused_before_changes():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 8))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs a transformers model"):
        qk.prepare_model(model, "lora", r=2, gradient_checkpointing=True)
    _assert_unchanged(model, before)


def test_prepare_model_needs_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        qk.prepare_model("model")


def test_frozen_weights_keep_their_dtype_unless_compute_dtype_asks(tiny, ids):
    """PEFT's convention: the frozen base keeps its dtype, so LoRA at init computes exactly the base model."""
    model = qk.prepare_model(fresh(tiny), "lora")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.dtype == tiny.config.dtype
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny(input_ids=ids).logits)

    half = qk.prepare_model(fresh(tiny).to(torch.bfloat16), "adapter", bottleneck=8)
    assert {p.dtype for p in half.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in half.parameters() if p.requires_grad} == {torch.float32}

    cast = qk.prepare_model(fresh(tiny), "qlora", compute_dtype="bf16")
    assert {p.dtype for p in cast.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in cast.parameters() if p.requires_grad} == {torch.float32}
    assert all(m.weight.dtype == torch.bfloat16 for m in cast.modules() if isinstance(m, QuantLinear))
    assert cast.qk_config.compute_dtype == "bfloat16" and cast.config.dtype == torch.bfloat16
