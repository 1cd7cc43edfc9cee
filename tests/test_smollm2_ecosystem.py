"""SmolLM2-135M through the ecosystem: a sharded checkpoint quantized while loading, saved and reloaded
pre-quantized, then fine-tuned with TRL's SFTTrainer + PEFT on the expense task (slow, run in CI).

int4 keeps the load short (NF4 quantization of 135M weights takes ~10 s on this CPU); the NF4
path is the same code, covered on tiny models and by ``python -m benchmarks.ecosystem``.
"""

from __future__ import annotations

import copy
import statistics
import weakref

import pytest
import torch
from helpers import assert_close_by_norm
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora_kernels as qk
import qlora_kernels.integrations.transformers as qk_transformers
import qlora_kernels.nn.quant_linear as quant_linear_module
from qlora_kernels.integrations.transformers import QLoRAKernelsConfig
from qlora_kernels.nn import QuantLinear
from qlora_kernels.train import expenses

pytestmark = pytest.mark.slow
N_LINEAR = 30 * 7  # 30 blocks x (q, k, v, o, gate, up, down); the head is tied to the embeddings


def expense_messages(e: expenses.Expenses) -> dict[str, list[dict[str, str]]]:
    return {
        "prompt": [{"role": "user", "content": expenses.prompt(e, "en")}],
        "completion": [{"role": "assistant", "content": expenses.completion(e, "answer", "en")}],
    }


@pytest.fixture(scope="module")
def sharded_dir(smollm2, tmp_path_factory):
    """SmolLM2 saved as a bf16 checkpoint in several safetensors shards, with its tokenizer."""
    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("smollm2-bf16")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder, max_shard_size="64MB")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(sharded_dir, tmp_path_factory):
    """(model quantized to int4 while loading, most dense target weights alive at once, pre-quantized folder)."""
    alive: list[weakref.ref] = []
    most_alive = 0
    convert = qk_transformers.QLoRAKernelsQuantize.convert

    def spy(self, input_dict, **kwargs):
        nonlocal most_alive
        value = next(iter(input_dict.values()))
        alive.append(weakref.ref(value[0] if isinstance(value, list) else value))
        most_alive = max(most_alive, sum(ref() is not None for ref in alive))
        return convert(self, input_dict, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qk_transformers.QLoRAKernelsQuantize, "convert", spy)
        model = AutoModelForCausalLM.from_pretrained(sharded_dir, quantization_config=QLoRAKernelsConfig("int4"))
    folder = tmp_path_factory.mktemp("smollm2-nf4")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(sharded_dir).save_pretrained(folder)
    return model, most_alive, len(alive), folder


def test_sharded_checkpoint_is_quantized_while_loading(smollm2, sharded_dir, quantized):
    model, most_alive, converted, _ = quantized
    assert len(list(sharded_dir.glob("model-*.safetensors"))) >= 4
    assert converted == N_LINEAR and most_alive == 1, "more than one dense weight was held at once"
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == N_LINEAR and all(m.format == "int4" and m.dtype == torch.bfloat16 for m in layers)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.get_input_embeddings().weight

    # the same packed weights as quantizing the bf16 model in memory with prepare_model
    dense, tokenizer = smollm2
    in_memory = qk.prepare_model(
        copy.deepcopy(dense).to(torch.bfloat16), "qlora", quant="int4", target_modules="all-linear"
    )
    expected_packed = {k.replace(".base.", "."): v for k, v in in_memory.state_dict().items() if ".weight_" in k}
    del in_memory
    loaded_packed = {k: v for k, v in model.state_dict().items() if ".weight_" in k}
    assert expected_packed.keys() == loaded_packed.keys()
    assert all(torch.equal(loaded_packed[k], v) for k, v in expected_packed.items())
    text = tokenizer.apply_chat_template(expense_messages(expenses.make_splits(1, 1)[0][0])["prompt"], tokenize=False)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        got = model(input_ids=ids).logits
        expected = dense(input_ids=ids).logits
    # int4 on every linear of a 135M model: ~0.24 relative logit error against fp32 on this prompt
    assert_close_by_norm(got.float(), expected, 0.35, "SmolLM2 int4 (bf16 activations) vs fp32 dense")


def test_prequantized_folder_reloads_bit_identical(quantized, monkeypatch):
    model, _, _, folder = quantized

    def no_quantize(*args, **kwargs):
        raise AssertionError("a pre-quantized checkpoint must load without quantizing again")

    monkeypatch.setattr(qk_transformers, "quantize", no_quantize)
    again = AutoModelForCausalLM.from_pretrained(folder)
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert tensor.dtype == after[key].dtype and torch.equal(tensor, after[key]), key


@pytest.mark.peers
def test_sft_trainer_with_peft_lowers_the_expense_loss(quantized, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="peers extra (trl) not installed")
    peft = pytest.importorskip("peft", reason="peers extra (peft) not installed")
    trl = pytest.importorskip("trl", reason="peers extra (trl) not installed")
    from qlora_kernels.integrations.peft import QuantLoraLinear, register_lora_layers

    folder = quantized[3]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train, _ = expenses.make_splits(20, 2, seed=0, language="en")
    dataset = datasets.Dataset.from_list([expense_messages(e) for e in train])
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=20,
        per_device_train_batch_size=1,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        max_length=128,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    lora = register_lora_layers(peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )
    assert sum(isinstance(m, QuantLoraLinear) for m in trainer.model.modules()) == 60

    fused = []
    original = quant_linear_module.qlora_linear

    def spy(x, qt, lora_a=None, *args, **kwargs):
        fused.append(lora_a is not None)
        return original(x, qt, lora_a, *args, **kwargs)

    monkeypatch.setattr(quant_linear_module, "qlora_linear", spy)
    packed = {k: v.clone() for k, v in trainer.model.state_dict().items() if ".weight_" in k}
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 20 and all(loss == loss for loss in losses)
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < 0.7 * first, f"loss did not fall: {losses}"
    assert sum(fused) == 20 * 60, "every LoRA layer ran the fused kernel on every step"
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in packed.items()), "the base changed"
