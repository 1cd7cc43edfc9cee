"""``from_pretrained(..., quantization_config=QLoRAKernelsConfig(...))`` on tiny random models (no download)."""

from __future__ import annotations

import copy
import json
import mmap
import os
import subprocess
import sys
import weakref

import pytest
import torch
from arch_support import base, inputs
from helpers import assert_close_by_norm
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.trainer_utils import validate_quantization_for_training

import qlora_kernels.integrations.transformers as qk_transformers
from qlora_kernels.integrations.load_memory import MappedCheckpoint
from qlora_kernels.integrations.transformers import QLoRAKernelsConfig
from qlora_kernels.nn import QuantLinear
from qlora_kernels.nn.dense import dense_weight

FORMATS = ["nf4", "int4", "int8"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> folder with the tiny model saved in several safetensors shards."""
    folders = {}

    def save(arch: str):
        if arch not in folders:
            folder = tmp_path_factory.mktemp(arch)
            base(arch).save_pretrained(folder, max_shard_size="20KB")
            folders[arch] = folder
        return folders[arch]

    return save


def load(folder, config=None, arch="llama", **kwargs):
    auto = AutoModelForSeq2SeqLM if base(arch).config.is_encoder_decoder else AutoModelForCausalLM
    extra = {"quantization_config": config} if config is not None else {}
    return auto.from_pretrained(folder, **extra, **kwargs)


def dequantized_reference(arch, model):
    ref = copy.deepcopy(base(arch))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                dense_weight(ref.get_submodule(name)).copy_(module.dequantized_weight())
    return ref


def packed(model):
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].startswith("weight_")}


def test_import_qlora_kernels_does_not_load_transformers_until_the_config_is_used():
    code = (
        "import sys, qlora_kernels as qk\n"
        "assert 'transformers' not in sys.modules\n"
        "config = qk.QLoRAKernelsConfig('int4')\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "from qlora_kernels.integrations.transformers import QLoRAKernelsHfQuantizer\n"
        "assert AUTO_QUANTIZER_MAPPING['qlora_kernels'] is QLoRAKernelsHfQuantizer\n"
        "assert AUTO_QUANTIZATION_CONFIG_MAPPING['qlora_kernels'] is type(config)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"format": "fp4"}, ValueError, "format must be one of"),
        ({"format": "int8", "group_size": 64}, ValueError, "int8 uses one scale per output row"),
        ({"group_size": 48}, ValueError, "group_size must be one of"),
        ({"format": "nf4", "symmetric": True}, ValueError, "symmetric=True applies to format='int4'"),
        ({"modules_to_not_convert": "lm_head"}, TypeError, "modules_to_not_convert must be a list"),
        ({"compute_dtype": "int8"}, ValueError, "compute_dtype must be one of"),
        ({"bits": 4}, TypeError, r"unknown options \['bits'\]"),
        ({"quant_method": "bitsandbytes"}, ValueError, "quant_method must be 'qlora_kernels'"),
    ],
)
def test_config_rejects_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        QLoRAKernelsConfig(**kwargs)


def test_config_json_round_trip():
    config = QLoRAKernelsConfig("int4", 32, ["mlp"], compute_dtype="bf16", symmetric=True)
    data = json.loads(config.to_json_string())
    assert data == {
        "quant_method": "qlora_kernels",
        "format": "int4",
        "group_size": 32,
        "modules_to_not_convert": ["mlp"],
        "compute_dtype": "bfloat16",
        "double_quant": True,
        "symmetric": True,
    }
    again = QLoRAKernelsConfig.from_dict(data)
    assert again.to_dict() == config.to_dict() and again.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizes_while_loading_and_round_trips_bit_identical(saved, tmp_path, monkeypatch, fmt):
    folder = saved("llama")
    assert len(list(folder.glob("*.safetensors"))) > 1, "the checkpoint should be sharded"
    model = load(folder, QLoRAKernelsConfig(fmt))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 and all(m.format == fmt for m in layers.values())  # 2 blocks x 7; lm_head dense
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.hf_quantizer.is_trainable and model.is_quantized
    assert all(not p.requires_grad for m in layers.values() for p in m.parameters())
    batch = inputs("llama")
    with torch.no_grad():
        logits = model(**batch).logits
        expected = dequantized_reference("llama", model)(**batch).logits
    assert_close_by_norm(logits, expected, 1e-5, f"{fmt}: quantized-while-loading vs its dequantized weights")

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["format"] == fmt

    def no_quantize(*args, **kwargs):
        raise AssertionError("a pre-quantized checkpoint must load without quantizing again")

    monkeypatch.setattr(qk_transformers, "quantize", no_quantize)
    again = load(tmp_path)
    assert isinstance(again.hf_quantizer, qk_transformers.QLoRAKernelsHfQuantizer)
    before, after = packed(model), packed(again)
    assert before.keys() == after.keys() and before
    for key, tensor in before.items():
        assert tensor.dtype == after[key].dtype and torch.equal(tensor, after[key]), key
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, logits)


def test_dense_weights_are_quantized_one_at_a_time(saved, monkeypatch):
    """Each dense weight is gone before the next one is quantized: the dense model never sits in memory."""
    alive: list[weakref.ref] = []
    most_alive = []
    convert = qk_transformers.QLoRAKernelsQuantize.convert

    def spy(self, input_dict, **kwargs):
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        most_alive.append(sum(ref() is not None for ref in alive))
        alive.append(weakref.ref(value))
        return convert(self, input_dict, **kwargs)

    monkeypatch.setattr(qk_transformers.QLoRAKernelsQuantize, "convert", spy)
    load(saved("llama"), QLoRAKernelsConfig("nf4"))
    assert len(most_alive) == 14 and max(most_alive) == 0, most_alive


@pytest.mark.parametrize("arch", ["gpt2", "t5", "falcon"])
def test_other_architectures(saved, arch):
    model = load(saved(arch), QLoRAKernelsConfig("nf4"), arch=arch)
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert layers
    if arch == "t5":  # T5 keeps `wo` in fp32 (_keep_in_fp32_modules), as for bitsandbytes
        assert not any(n.endswith(".wo") for n in layers)
        assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.wo, torch.nn.Linear)
    batch = inputs(arch)
    with torch.no_grad():
        expected = dequantized_reference(arch, model)(**batch).logits
        assert_close_by_norm(model(**batch).logits, expected, 1e-5, f"{arch}: logits vs dequantized weights")


def test_modules_to_not_convert_and_group_size_errors(saved):
    model = load(saved("llama"), QLoRAKernelsConfig("int4", modules_to_not_convert=["mlp"]))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert quantized and not any(".mlp." in n for n in quantized)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    with pytest.raises(ValueError, match=r"cannot quantize model\.layers\.0\.self_attn\.q_proj \(in_features=64\).*"):
        load(saved("llama"), QLoRAKernelsConfig("nf4", group_size=128))


def test_compute_dtype_casts_inputs_for_the_matmul_only(saved):
    model = load(saved("llama"), QLoRAKernelsConfig("int8", compute_dtype=torch.bfloat16))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = torch.nn.functional.linear(x.bfloat16().float(), layer.dequantized_weight())
    assert_close_by_norm(y, expected, 1e-2, "bf16 compute")


def test_trainer_accepts_it_with_an_adapter_only(saved):
    peft = pytest.importorskip("peft", reason="peers extra (peft) not installed")
    from qlora_kernels.integrations.peft import register_lora_layers

    model = load(saved("llama"), QLoRAKernelsConfig("nf4"))
    with pytest.raises(ValueError, match="purely quantized models"):
        validate_quantization_for_training(model)
    config = register_lora_layers(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    validate_quantization_for_training(peft.get_peft_model(model, config))


def test_dequantize_gives_back_dense_layers(saved):
    model = load(saved("llama"), QLoRAKernelsConfig("int4"))
    batch = inputs("llama")
    with torch.no_grad():
        expected = model(**batch).logits
    model.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert not hasattr(model.config, "quantization_config")
    with torch.no_grad():
        assert_close_by_norm(model(**batch).logits, expected, 1e-5, "dequantized model")


def test_disk_offload_is_refused(saved):
    with pytest.raises(ValueError, match="cannot be offloaded to disk"):
        load(saved("llama"), QLoRAKernelsConfig("nf4"), device_map={"": "disk"})


@pytest.mark.skipif(sys.platform != "linux", reason="releasing mapped pages is Linux-only (a no-op elsewhere)")
def test_mapped_checkpoint_pages_are_released_and_reread_correctly(tmp_path):
    def file_rss() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile"))

    path = tmp_path / "w.safetensors"
    weight = torch.randn(2048, 1024)  # 8 MiB
    save_file({"w": weight, "small": torch.ones(3)}, str(path))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        view = f.get_slice("w")[...]
        assert torch.equal(view, weight)  # touches every page
        before = file_rss()
        released = MappedCheckpoint([path]).release(view)
        assert released >= weight.numel() * 4 - 2 * mmap.PAGESIZE
        assert before - file_rss() >= released - 2 * mmap.PAGESIZE
        assert torch.equal(view, weight), "a released range reads back from the file"
        assert MappedCheckpoint([tmp_path / "other.safetensors"]).release(view) == 0  # not a view of those files
        assert MappedCheckpoint([path]).release(weight) == 0  # ordinary memory is never touched
