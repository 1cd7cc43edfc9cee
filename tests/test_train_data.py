"""Data: completion-only labels checked token by token (pad = EOS), malformed JSONL, truncation, batching."""

from __future__ import annotations

import json

import pytest
from train_support import load_tokenizer

from qlora_kernels.train.data import (
    IGNORE_INDEX,
    DataError,
    LengthGroupedBatches,
    collate,
    load_examples,
    read_jsonl,
    render_prompt,
    tokenize_example,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _messages(prompt: str, completion: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def test_labels_cover_exactly_the_completion_and_its_end_of_turn_with_pad_equal_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap of trl #1623
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    long_msgs = _messages("Хлеб: 55\nМолоко: 80\nФрукты: 230", "55 + 80 = 135; 135 + 230 = 365. Итого: 365 рублей.")
    short_msgs = _messages("Сыр: 10", "Итого: 10 рублей.")
    long_ex, _ = tokenize_example(tokenizer, long_msgs, 512)
    short_ex, _ = tokenize_example(tokenizer, short_msgs, 512)
    batch = collate([long_ex, short_ex], tokenizer.pad_token_id)

    for row, msgs in enumerate((long_msgs, short_msgs)):
        prompt_ids = tokenizer(render_prompt(tokenizer, msgs[:1]), add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(msgs[1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids, labels, mask = (batch[k][row].tolist() for k in ("input_ids", "labels", "attention_mask"))
        n_prompt, n_real = len(prompt_ids), len(prompt_ids) + len(completion_ids)
        assert ids[:n_real] == prompt_ids + completion_ids
        for i in range(len(ids)):
            if i < n_prompt:
                assert labels[i] == IGNORE_INDEX, f"prompt token {i} must not be a label"
            elif i < n_real:
                assert labels[i] == ids[i], f"completion token {i} must be its own label"
            else:
                assert labels[i] == IGNORE_INDEX and mask[i] == 0 and ids[i] == tokenizer.pad_token_id
        assert labels[n_real - 1] == eot == tokenizer.pad_token_id, "the end-of-turn token is a label"
        assert tokenizer.decode(labels[n_prompt:n_real]) == msgs[1]["content"] + "<|im_end|>"
    assert batch["labels"].shape[1] > len(short_ex.input_ids)  # the short row really was padded


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    path.write_text(good + "\n" + "\n" + '{"prompt": "a", "completion": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        read_jsonl(path)
    path.write_text(good + "\n" + json.dumps({"prompt": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*\"prompt\" and \"completion\""):
        read_jsonl(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: the last message must be the assistant"):
        read_jsonl(path)


def test_examples_whose_completion_is_truncated_away_are_dropped_and_counted(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "x" * 10, "completion": "ok"}, {"prompt": "слово " * 200, "completion": "ok"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    examples, stats = load_examples(path, tokenizer, max_length=64)
    assert (stats.kept, stats.dropped) == (1, 1)
    assert len(examples) == 1 and "1 dropped" in stats.summary()


def test_length_grouped_batches_are_deterministic_grouped_and_resumable(tokenizer):
    from qlora_kernels.train.data import Example

    examples = [Example([1] * n, [1] * n) for n in range(2, 66)]
    a = LengthGroupedBatches(examples, batch_size=4, seed=3)
    first = [[len(e.input_ids) for e in next(a)] for _ in range(40)]  # crosses an epoch boundary (16 per epoch)
    assert all(max(b) - min(b) <= 4 for b in first), "batches hold similar lengths"
    assert sorted(x for b in first[:16] for x in b) == list(range(2, 66)), "an epoch sees every example once"
    b = LengthGroupedBatches(examples, batch_size=4, seed=3)
    b.load_state_dict({"position": 25, "seed": 3, "batch_size": 4})
    assert [[len(e.input_ids) for e in next(b)] for _ in range(15)] == first[25:]
    with pytest.raises(ValueError, match="same config"):
        b.load_state_dict({"position": 1, "seed": 4, "batch_size": 4})


def test_collate_pads_to_a_multiple_within_max_width() -> None:
    from qlora_kernels.train.data import Example, collate

    examples = [Example(input_ids=[5] * n, labels=[7] * n) for n in (3, 70)]
    assert collate(examples, pad_id=0)["input_ids"].shape == (2, 70)
    batch = collate(examples, pad_id=0, multiple_of=64, max_width=256)
    assert batch["input_ids"].shape == (2, 128)
    assert batch["attention_mask"].sum() == 73 and (batch["labels"] != -100).sum() == 73
    assert (batch["input_ids"][1, 70:] == 0).all()
    assert collate(examples, pad_id=0, multiple_of=64, max_width=100)["input_ids"].shape == (2, 100)
    assert collate(examples, pad_id=0, multiple_of=64, max_width=50)["input_ids"].shape == (2, 70)  # never cuts
