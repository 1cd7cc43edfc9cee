"""Shared helpers of the trainer tests: SmolLM2's tokenizer and a tiny random Llama, built once per process."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from qlora_kernels.train import expenses

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


@functools.lru_cache(maxsize=1)
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="qk-train-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=1)
def tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct's tokenizer (chat template, pad = EOS = <|im_end|>) saved as a plain folder."""
    from transformers import AutoTokenizer

    from qlora_kernels.models import resolve_model_source

    folder, gguf = resolve_model_source("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = _workdir() / "tokenizer"
    tok.save_pretrained(out)
    return out


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir())


@functools.lru_cache(maxsize=1)
def tiny_model_dir() -> Path:
    """A randomly initialised 2-layer Llama with SmolLM2's vocabulary, saved with the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer()
    out = _workdir() / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_expense_data(folder: Path, n_train: int = 32, n_eval: int = 8, style: str = "worked") -> tuple[Path, Path]:
    train, held_out = expenses.make_splits(n_train, n_eval, seed=0)
    return (
        expenses.write_jsonl(folder / "train.jsonl", train, style),
        expenses.write_jsonl(folder / "eval.jsonl", held_out, style),
    )
