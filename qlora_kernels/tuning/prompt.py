"""Prompt tuning on a Hugging Face causal LM: prepend the soft prompt inside the model's forward.

A forward pre-hook on the model rewrites the call: on the first pass (no cache yet) the input
ids become input embeddings with the prompt in front, the attention mask gets ones and the
labels get -100 for the virtual tokens; on cached decoding steps (``generate()``) only the mask
is extended. Positions are recomputed from the extended mask (left padding stays right) and
``cache_position`` from the cache length, which includes the virtual tokens.

On an encoder-decoder model (T5, BART) the prompt goes in front of the encoder input only:
the labels and the decoder inputs are left as they are, and no positions are passed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common import IGNORE_INDEX
from ..nn import PromptEmbedding
from .targets import input_embeddings


class SoftPromptHook:
    """Forward pre-hook (with kwargs) implementing prompt tuning for a causal LM."""

    def __init__(self, prompt: PromptEmbedding, embeddings: nn.Embedding, encoder_decoder: bool = False) -> None:
        self.prompt = prompt
        self.embeddings = embeddings
        self.encoder_decoder = encoder_decoder

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            if len(args) > 1:
                raise TypeError("with prompt tuning pass the model's inputs as keywords (input_ids=..., ...)")
            kwargs = {**kwargs, "input_ids": args[0]}
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        mask = kwargs.get("attention_mask")
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # "cache" from transformers 5.2x
        past_len = int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0
        n = self.prompt.num_virtual_tokens
        ref = input_ids if input_ids is not None else embeds
        if ref is None and self.encoder_decoder:
            raise ValueError(
                "prompt tuning on an encoder-decoder model puts the prompt in front of the encoder input, so it needs "
                "input_ids or inputs_embeds; precomputed encoder_outputs (as generate() passes) bypass it"
            )
        if ref is None:
            raise ValueError("prompt tuning needs input_ids or inputs_embeds")
        batch, device = ref.shape[0], ref.device
        if self.encoder_decoder:
            return (), self._encoder_input(kwargs, input_ids, embeds, mask, batch, device)
        if past_len == 0:  # first pass: put the prompt in front of the sequence
            if embeds is None:
                embeds = self.embeddings(input_ids)
            prompts = self.prompt(batch).to(device=device, dtype=embeds.dtype)
            embeds = torch.cat([prompts, embeds], dim=1)
            kwargs["inputs_embeds"] = embeds
            if mask is not None:
                mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
            labels = kwargs.get("labels")
            if labels is not None:
                kwargs["labels"] = torch.cat([labels.new_full((batch, n), IGNORE_INDEX), labels], dim=1)
            new_len = embeds.shape[1]
        else:  # cached decoding: the cache already holds the virtual tokens
            if input_ids is not None:
                kwargs["input_ids"] = input_ids
            else:
                kwargs["inputs_embeds"] = embeds
            new_len = ref.shape[1]
            if mask is not None and mask.shape[1] == past_len + new_len - n:
                mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if mask is not None:
            kwargs["attention_mask"] = mask
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_len:]
        else:
            positions = torch.arange(past_len, past_len + new_len, device=device).unsqueeze(0).expand(batch, -1)
        kwargs["position_ids"] = positions
        if kwargs.get("cache_position") is not None:  # transformers < 5.2x passes it
            kwargs["cache_position"] = torch.arange(past_len, past_len + new_len, device=device)
        return (), kwargs

    def _encoder_input(self, kwargs: dict, input_ids, embeds, mask, batch: int, device) -> dict:
        if embeds is None:
            embeds = self.embeddings(input_ids)
        prompts = self.prompt(batch).to(device=device, dtype=embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, self.prompt.num_virtual_tokens), mask], dim=1)
        return kwargs


def init_prompt_vectors(
    model: nn.Module, num_virtual_tokens: int, init_text: str | None, tokenizer=None
) -> torch.Tensor:
    """Initial prompt: embeddings of `init_text` (repeated / cut to length) or of random vocabulary tokens."""
    emb = input_embeddings(model)
    if init_text is not None:
        if not isinstance(init_text, str):
            raise TypeError(f"prompt_init_text must be a string or None, got {type(init_text).__name__}")
        if tokenizer is None:
            raise ValueError("prompt_init_text needs tokenizer=...; pass the model's tokenizer to prepare_model")
        ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt_init_text={init_text!r} tokenizes to nothing; pass a non-empty text")
        ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
        token_ids = torch.tensor(ids, device=emb.weight.device)
    else:
        token_ids = torch.randint(0, emb.num_embeddings, (num_virtual_tokens,), device=emb.weight.device)
    with torch.no_grad():
        return emb(token_ids).float().clone()


def attach_prompt(model: nn.Module, init: torch.Tensor) -> PromptEmbedding:
    """Create the soft prompt (initial vectors `init`, from `init_prompt_vectors`) as ``model.qk_prompt``
    and hook it into the model's forward."""
    emb = input_embeddings(model)
    if emb is None:
        raise ValueError(
            f"method='prompt' needs a model with input embeddings (get_input_embeddings() returning nn.Embedding); "
            f"{type(model).__name__} has none: use method='lora' or 'adapter'"
        )
    prompt = PromptEmbedding(init.shape[0], emb.embedding_dim, init=init).to(emb.weight.device)
    model.add_module("qk_prompt", prompt)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    model.register_forward_pre_hook(SoftPromptHook(prompt, emb, encoder_decoder), with_kwargs=True)
    return prompt
