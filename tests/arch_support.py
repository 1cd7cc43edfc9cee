"""Tiny random models of the architectures people fine-tune most (no download), built once per process.

Every model has hidden size 64 (so 64-wide groups divide every layer), one or two layers, a
128-token vocabulary and fp32 weights; `base(arch)` returns the shared, unmodified model in eval
mode: take ``copy.deepcopy`` before changing it.
"""

from __future__ import annotations

import functools

import torch
import transformers as T

VOCAB = 128
H = 64
_SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DECODER = {"hidden_size": H, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


def _configs() -> dict[str, tuple[T.PretrainedConfig, type]]:
    return {
        "llama": (T.LlamaConfig(num_hidden_layers=2, **_DECODER), T.LlamaForCausalLM),
        "mistral": (T.MistralConfig(num_hidden_layers=1, **_DECODER), T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config(num_hidden_layers=1, **_DECODER), T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config(num_hidden_layers=1, head_dim=16, **_DECODER), T.Qwen3ForCausalLM),
        "gemma2": (T.Gemma2Config(num_hidden_layers=1, head_dim=16, **_DECODER), T.Gemma2ForCausalLM),
        "gemma3": (T.Gemma3TextConfig(num_hidden_layers=1, head_dim=16, **_DECODER), T.Gemma3ForCausalLM),
        "phi3": (T.Phi3Config(num_hidden_layers=1, **_DECODER), T.Phi3ForCausalLM),
        "gpt_neox": (
            T.GPTNeoXConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4),
            T.GPTNeoXForCausalLM,
        ),
        "gpt2": (T.GPT2Config(n_embd=H, n_layer=1, n_head=4, n_positions=64), T.GPT2LMHeadModel),
        "opt": (
            T.OPTConfig(hidden_size=H, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4, word_embed_proj_dim=H),
            T.OPTForCausalLM,
        ),
        "falcon": (T.FalconConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=4), T.FalconForCausalLM),
        "t5": (
            T.T5Config(d_model=H, d_ff=128, d_kv=16, num_layers=1, num_heads=4, decoder_start_token_id=0),
            T.T5ForConditionalGeneration,
        ),
        "bart": (
            T.BartConfig(
                d_model=H,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                max_position_embeddings=64,
                decoder_start_token_id=2,
                forced_eos_token_id=None,
            ),
            T.BartForConditionalGeneration,
        ),
    }


ARCHS = tuple(_configs())


@functools.cache
def base(arch: str) -> torch.nn.Module:
    """The shared tiny model of `arch` (fp32, eval mode). Never modify it."""
    config, cls = _configs()[arch]
    config.vocab_size = VOCAB
    for key, value in _SPECIAL.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return cls(config).eval()


def inputs(arch: str, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    """Random token ids (never the special ids 0-2) with labels; fixed per call site via the test seed."""
    ids = torch.randint(3, VOCAB, (batch, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def is_encoder_decoder(arch: str) -> bool:
    return bool(base(arch).config.is_encoder_decoder)
