"""Generation-based evaluation: batched greedy decoding with left padding, format / exact metrics.

The token budget comes from the tokenizer, not from characters: "Итого: 365 рублей." is about
18 tokens for 18 characters with SmolLM2's tokenizer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import end_of_turn_token, render_completion, render_prompt

BUDGET_MARGIN = 1.25  # generous: a model may phrase the answer a little longer than the reference
BUDGET_EXTRA_TOKENS = 8
DEFAULT_EVAL_BATCH = 16
MIN_SHARED_PREFIX = 16  # shorter shared prefixes are not worth a separate forward pass

Messages = list[dict[str, str]]


@dataclass
class Scores:
    """Fractions in [0, 1] over `n` examples."""

    format: float
    exact: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"format": self.format, "exact": self.exact}


def token_budget(tokenizer: Any, conversations: Sequence[Messages]) -> int:
    """max_new_tokens for these conversations: the longest reference completion in tokens, plus a margin."""
    longest = max(
        len(tokenizer(render_completion(tokenizer, c), add_special_tokens=False)["input_ids"]) for c in conversations
    )
    return math.ceil(longest * BUDGET_MARGIN) + BUDGET_EXTRA_TOKENS


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Messages],
    max_new_tokens: int,
    batch_size: int = DEFAULT_EVAL_BATCH,
    autocast: Callable[[], Any] | None = None,
) -> list[str]:
    """Greedy completions of chat prompts (each ends with the user's turn) as text, in input order."""
    token_ids = generate_token_ids(model, tokenizer, prompts, max_new_tokens, batch_size, autocast)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in token_ids]


@torch.no_grad()
def generate_token_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Messages],
    max_new_tokens: int,
    batch_size: int = DEFAULT_EVAL_BATCH,
    autocast: Callable[[], Any] | None = None,
) -> list[list[int]]:
    """The new token ids of greedy decoding (padding after an early stop included), in input order.

    Prompts are rendered with the same chat template as in training, sorted by length and
    left-padded so every row's last real token sits at the end, where generation continues.
    Token prefixes that all rows of a batch share (the system turn, few-shot examples) are run
    once and their key/value cache is copied to every row (`shared_prefix_cache`).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    texts = [render_prompt(tokenizer, p) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id
    outputs: list[list[int]] = [[] for _ in ids]
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        prefix = shared_prefix_length([ids[i] for i in rows])
        # rows are [shared prefix | left padding | own suffix]: positions come from the mask's cumsum
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            suffix = ids[i][prefix:]
            input_ids[j, :prefix] = torch.tensor(ids[i][:prefix], dtype=torch.long)
            input_ids[j, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long)
            mask[j, :prefix] = 1
            mask[j, width - len(suffix) :] = 1
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            cache_kwargs = {}
            if prefix:
                cache_kwargs = shared_prefix_cache(model, input_ids[:1, :prefix].to(device), len(rows))
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eot_id,
                pad_token_id=pad_id,
                **cache_kwargs,
            )
        for j, i in enumerate(rows):
            outputs[i] = generated[j, width:].tolist()
    model.train(was_training)
    return outputs


def shared_prefix_length(rows: Sequence[Sequence[int]], min_length: int | None = None) -> int:
    """Tokens all rows start with, leaving each row at least one token of its own (0 if under `min_length`).

    Works on token ids, not text, so it never depends on how a tokenizer merges across a boundary.
    """
    min_length = MIN_SHARED_PREFIX if min_length is None else min_length
    if len(rows) < 2:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n if n >= min_length else 0


def cache_argument(model: nn.Module) -> str:
    """The name of the key/value cache argument: transformers 5 says `cache`, 4.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def shared_prefix_cache(model: nn.Module, prefix_ids: torch.Tensor, batch: int) -> dict[str, Any]:
    """Run the (1, P) shared prefix once; the key/value cache repeated `batch` times, as generate() kwargs.

    Returns no kwargs (plain generation) when the cache holds more positions than the prefix has
    tokens, as with prompt tuning's virtual tokens: generate() would then skip real tokens.
    """
    cache_name = cache_argument(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=prefix_ids, use_cache=True, **keep)  # the cache is what we want, not P x vocab logits
    cache = out[cache_name] if cache_name in out else out.get("past_key_values")
    if cache is None or cache.get_seq_length() != prefix_ids.shape[1]:
        return {}
    cache.batch_repeat_interleave(batch)
    return {cache_name: cache}


def score(outputs: Sequence[str], references: Sequence[str], parse: Callable[[str], Any]) -> Scores:
    """format: `parse` finds an answer in the output; exact: the answer equals the reference's."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    parsed = [parse(o) for o in outputs]
    fmt = sum(p is not None for p in parsed)
    exact = sum(p is not None and p == parse(r) for p, r in zip(parsed, references, strict=True))
    n = max(len(outputs), 1)
    return Scores(fmt / n, exact / n, len(outputs))
