"""Generation-based evaluation: the shared-prefix cache changes no output, scoring counts right."""

from __future__ import annotations

import pytest
import torch
from train_support import load_tokenizer, tiny_model_dir

from qlora_kernels.train import evaluate, expenses
from qlora_kernels.train.demo import few_shot_prompt


@pytest.mark.parametrize(
    ("rows", "min_length", "expected"),
    [
        ([[1, 2, 3, 4], [1, 2, 3, 5, 6]], 1, 3),
        ([[1, 2, 3], [1, 2, 3, 4]], 1, 2),  # each row keeps at least one token of its own
        ([[7, 2, 3], [1, 2, 3]], 1, 0),
        ([[1, 2, 3, 4], [1, 2, 3, 5]], 4, 0),  # shorter than worth a separate pass
        ([[1, 2, 3, 4]], 1, 0),  # a single row has nothing to share
    ],
)
def test_shared_prefix_length(rows, min_length, expected):
    assert evaluate.shared_prefix_length(rows, min_length) == expected


def _tiny_model_with_varied_outputs():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    with torch.no_grad():  # larger random weights: at init scale every row greedily repeats one token
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.5)
    return model


def test_generation_with_the_shared_prefix_cache_equals_plain_generation(monkeypatch):
    tok = load_tokenizer()
    model = _tiny_model_with_varied_outputs()
    train, held_out = expenses.make_splits(20, 6, seed=0)
    prompts = [few_shot_prompt(train[:1], e, "worked", "ru") for e in held_out]  # suffixes of different lengths

    calls = []
    real_cache = evaluate.shared_prefix_cache
    monkeypatch.setattr(evaluate, "shared_prefix_cache", lambda *a: calls.append(a[1].shape[1]) or real_cache(*a))
    cached = evaluate.generate_token_ids(model, tok, prompts, max_new_tokens=12, batch_size=3)
    assert len(calls) == 2 and all(n > 60 for n in calls)  # per batch: the system turn and one solved example

    monkeypatch.setattr(evaluate, "MIN_SHARED_PREFIX", 10**9)
    plain = evaluate.generate_token_ids(model, tok, prompts, max_new_tokens=12, batch_size=3)
    assert len(calls) == 2  # the plain run made no cache
    assert cached == plain
    assert len({tuple(t) for t in cached}) > 1  # the rows differ: a real check, not a constant output


def test_prompt_tuning_falls_back_to_plain_generation(monkeypatch):
    """The virtual tokens make the cache longer than the shared prefix: the cache must not be used."""
    import qlora_kernels as qk

    tok = load_tokenizer()
    model = qk.prepare_model(
        _tiny_model_with_varied_outputs(), "prompt", num_virtual_tokens=4, compute_dtype=torch.float32
    )
    prompts = [[{"role": "user", "content": expenses.prompt(e)}] for e in expenses.make_splits(4, 4, seed=0)[1]]
    prefix_ids = torch.tensor([tok(evaluate.render_prompt(tok, prompts[0]), add_special_tokens=False)["input_ids"]])
    assert evaluate.shared_prefix_cache(model, prefix_ids[:, :20], 4) == {}
    cached = evaluate.generate_token_ids(model, tok, prompts, max_new_tokens=8, batch_size=4)
    monkeypatch.setattr(evaluate, "MIN_SHARED_PREFIX", 10**9)
    assert cached == evaluate.generate_token_ids(model, tok, prompts, max_new_tokens=8, batch_size=4)


def test_score_counts_format_and_exact_answers():
    outputs = ["10 + 20 = 30. Итого: 30 рублей.", "Итого: 31 рублей.", "тридцать"]
    references = ["Итого: 30 рублей."] * 3
    s = evaluate.score(outputs, references, expenses.parse_total)
    assert (s.format, s.exact, s.n) == (2 / 3, 1 / 3, 3)
    with pytest.raises(ValueError, match="2 outputs for 3 references"):
        evaluate.score(outputs[:2], references, expenses.parse_total)
