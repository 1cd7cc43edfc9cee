"""Adapter files that are not what they claim, and NaN adapters: every error names the file and the tensor."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import qlora_kernels as qk
from qlora_kernels.nn import LoRALinear
from qlora_kernels.tuning.io import check_adapter


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def adapter(tiny, tmp_path):
    model = qk.prepare_model(copy.deepcopy(tiny), "lora", r=4, compute_dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(0, 0.05)
    return qk.save_adapter(model, tmp_path / "adapter")


def _poison(adapter, value=float("nan")) -> str:
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = sorted(tensors)[-1]
    tensors[key][1, 0] = value
    save_file(tensors, str(file), metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_adapter_is_refused_naming_file_and_tensor(tiny, adapter, value):
    key = _poison(adapter, value)
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: tensor '{key}' holds 1 NaN/inf value"):
        qk.load_adapter(copy.deepcopy(tiny), adapter)
    with pytest.raises(ValueError, match="NaN/inf"):
        check_adapter(adapter)


def test_damaged_files_name_themselves(tiny, adapter):
    weights = adapter / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=rf"{weights} is damaged or not a safetensors file"):
        qk.load_adapter(copy.deepcopy(tiny), adapter)
    weights.write_bytes(b"\x01" * 30)
    with pytest.raises(ValueError, match="is damaged or not a safetensors file"):
        check_adapter(adapter)
    weights.write_bytes(good)
    config = adapter / "adapter_config.json"
    config.write_text('{"r": 4,')
    with pytest.raises(ValueError, match=rf"{config} is not valid JSON"):
        check_adapter(adapter)
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        check_adapter(adapter)


@pytest.mark.parametrize("r", [None, 0, "4", True])
def test_a_peft_lora_config_needs_an_integer_r(tiny, adapter, r):
    weights = adapter / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as PEFT writes it
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert check_adapter(adapter)["r"] == 4  # a plain PEFT LoRA config is read
    if r is None:
        del config["r"]
    else:
        config["r"] = r
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config.json: a LORA config needs an integer rank 'r' >= 1"):
        qk.load_adapter(copy.deepcopy(tiny), adapter)


def test_saved_files_are_readable_by_all(adapter):
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in adapter.iterdir()}
    assert modes == {"adapter_model.safetensors": 0o666 & ~umask, "adapter_config.json": 0o666 & ~umask}


def test_merge_refuses_nan_and_leaves_the_model_unchanged(tiny, adapter):
    model = qk.load_adapter(copy.deepcopy(tiny), adapter)
    layer_names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    victim = model.get_submodule(layer_names[-1])
    with torch.no_grad():
        victim.lora_A.weight[0, 0] = float("nan")
    for into in ("base", "fp32", "bf16"):
        with pytest.raises(ValueError, match=rf"cannot merge: {layer_names[-1]}.lora_A.weight holds 1 NaN/inf"):
            qk.merge(model, into=into)
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == layer_names
    assert model.qk_config.method == "lora"


def test_merge_into_fp16_refuses_weights_beyond_its_range(tiny, adapter):
    model = qk.load_adapter(copy.deepcopy(tiny), adapter)
    victim_name = next(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        model.get_submodule(victim_name).lora_B.weight.fill_(1e5)
    with pytest.raises(ValueError, match=rf"cannot merge {victim_name} into torch.float16: .* merge into bf16 or fp32"):
        qk.merge(model, into="fp16")
    merged = qk.merge(model, into="fp32")
    assert all(torch.isfinite(p).all() for p in merged.parameters())
