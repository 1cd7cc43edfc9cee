"""Generation-based evaluation: batched greedy decoding with left padding, format / exact metrics.

The token budget comes from the tokenizer, not from characters: "Итого: 365 рублей." is about
18 tokens for 18 characters with SmolLM2's tokenizer (DESIGN.md section 9).
"""

from __future__ import annotations

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


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Messages],
    max_new_tokens: int,
    batch_size: int = DEFAULT_EVAL_BATCH,
    autocast: Callable[[], Any] | None = None,
) -> list[str]:
    """Greedy completions of chat prompts (each ends with the user's turn), in input order.

    Prompts are rendered with the same chat template as in training, sorted by length and
    left-padded so every row's last real token sits at the end, where generation continues.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    texts = [render_prompt(tokenizer, p) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id
    outputs: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            input_ids[j, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[j, width - len(ids[i]) :] = 1
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eot_id,
                pad_token_id=pad_id,
            )
        for j, i in enumerate(rows):
            outputs[i] = tokenizer.decode(generated[j, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return outputs


def score(outputs: Sequence[str], references: Sequence[str], parse: Callable[[str], Any]) -> Scores:
    """format: `parse` finds an answer in the output; exact: the answer equals the reference's."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    parsed = [parse(o) for o in outputs]
    fmt = sum(p is not None for p in parsed)
    exact = sum(p is not None and p == parse(r) for p, r in zip(parsed, references, strict=True))
    n = max(len(outputs), 1)
    return Scores(fmt / n, exact / n, len(outputs))
