"""SFT data: JSONL loading, chat templating, completion-only labels, collation, length-grouped batches.

The loss of supervised fine-tuning covers the completion only: prompt and padding tokens get
the label -100. The completion's end-of-turn token is always a label, also when the tokenizer
pads with that same token, so the trained model learns to stop (trl #1623).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
# A length-grouped batch is cut from a window of this many batches sorted by length: similar
# lengths (little padding) while the order stays random across windows.
SORT_WINDOW_BATCHES = 16


class DataError(ValueError):
    """A data file or record is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One tokenized training example: ids and labels of equal length (-100 on the prompt)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class DataStats:
    """What tokenization did to a file: kept, truncated (kept, completion cut) and dropped examples."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    max_tokens: int = 0
    label_tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.kept} examples kept ({self.label_tokens} completion tokens), {self.truncated} truncated, "
            f"{self.dropped} dropped (completion truncated away), longest {self.max_tokens} tokens"
        )


# ------------------------------------------------------------------------------- reading
def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file as `{"messages": [...]}`; anything malformed raises DataError naming file:line."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a directory; point train_file / eval_file at a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist (check train_file / eval_file)")
    records = []
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                try:
                    records.append({"messages": to_messages(obj)})
                except DataError as e:
                    raise DataError(f"{path}:{lineno}: {e}") from None
    except OSError as e:
        raise DataError(f"data file {path} cannot be read: {e.strerror or e}") from None
    if not records:
        raise DataError(f"{path}: no records (expected one JSON object per line)")
    return records


def to_messages(obj: Any) -> list[dict[str, str]]:
    """Normalise a record (`prompt`/`completion` or `messages`) to chat messages ending with the assistant."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError('"messages" must be a non-empty list of {"role", "content"} objects')
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f'each message needs "role" in {ROLES} and a string "content", got {m!r}')
        if messages[-1]["role"] != "assistant":
            raise DataError("the last message must be the assistant's (it is the completion to learn)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise DataError('"prompt" and "completion" must be strings')
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise DataError(f'a record needs "prompt" and "completion", or "messages"; got keys {sorted(obj)}')


# ---------------------------------------------------------------------------- templating
def end_of_turn_token(tokenizer: Any) -> str:
    """The token that ends an assistant turn (the EOS token; `<|im_end|>` for ChatML templates)."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token to the end-of-turn token")
    return tokenizer.eos_token


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The text the model sees before it answers: the chat template with the generation prompt.

    Training and inference both call this, so the model is trained on exactly what it gets later.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    # No template (a bare test tokenizer): a plain, still unambiguous layout.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def render_completion(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The assistant's last turn as the template writes it, cut right after its end-of-turn token."""
    eot = end_of_turn_token(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        return messages[-1]["content"] + eot
    prompt = render_prompt(tokenizer, messages[:-1])
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders the prompt differently with and without the answer; "
            "cannot split prompt from completion"
        )
    completion = full[len(prompt) :]
    end = completion.rfind(eot)
    if end < 0:  # templates that do not close the turn: close it ourselves
        return completion + eot
    return completion[: end + len(eot)]


def tokenize_example(
    tokenizer: Any, messages: Sequence[dict[str, str]], max_length: int
) -> tuple[Example | None, bool]:
    """Token ids with completion-only labels, cut to `max_length`; returns (example or None, truncated).

    Prompt and completion are tokenized separately so the boundary is exact. Truncation cuts the
    end (the completion); an example left with no completion token is dropped (None).
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, messages[:-1]), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(render_completion(tokenizer, messages), add_special_tokens=False)["input_ids"]
    ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels[1:]):  # position 0 is never predicted
        return None, truncated
    return Example(ids, labels), truncated


def load_examples(path: str | Path, tokenizer: Any, max_length: int) -> tuple[list[Example], DataStats]:
    """Read and tokenize a JSONL file; counts truncated and dropped examples."""
    return tokenize_records(read_jsonl(path), tokenizer, max_length, source=str(path))


def tokenize_records(
    records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, source: str = "data"
) -> tuple[list[Example], DataStats]:
    """Tokenize records read by `read_jsonl` (read first, so bad data fails before a model loads)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    stats = DataStats()
    examples = []
    for record in records:
        example, truncated = tokenize_example(tokenizer, record["messages"], max_length)
        if example is None:
            stats.dropped += 1
            continue
        stats.truncated += truncated
        stats.kept += 1
        stats.max_tokens = max(stats.max_tokens, len(example.input_ids))
        stats.label_tokens += example.n_label_tokens
        examples.append(example)
    if not examples:
        raise DataError(f"{source}: every example was dropped; raise max_length (now {max_length})")
    return examples, stats


# ----------------------------------------------------------------------------- batching
def collate(
    examples: Sequence[Example], pad_id: int, multiple_of: int = 1, max_width: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, rounded up to `multiple_of` tokens but not past `max_width`
    (never below the longest): padding gets label -100 and attention 0 (never id-based)."""
    if pad_id is None:
        raise ValueError("pad_id is None; set tokenizer.pad_token (the EOS token is fine: labels do not use it)")
    longest = max(len(e.input_ids) for e in examples)
    width = -(-longest // multiple_of) * multiple_of
    if max_width is not None:
        width = max(longest, min(width, max_width))
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is computed on (labels shifted by one: position 0 predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class LengthGroupedBatches:
    """An endless, resumable stream of micro-batches grouped by length.

    Epoch e is a fixed function of (seed, e): shuffle, sort windows of `SORT_WINDOW_BATCHES`
    batches by length, cut, shuffle the batches. The position is just the number of batches
    served, so a resumed run continues with exactly the batch it would have seen.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not examples:
            raise ValueError("no examples to batch")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last and len(examples) >= batch_size
        self.position = 0
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Index lists of the batches of one epoch (deterministic)."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        window = self.batch_size * SORT_WINDOW_BATCHES
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(self.examples[i].input_ids))
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        self._epoch_cache = (epoch, batches)
        return batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        per_epoch = self.batches_per_epoch
        epoch, index = divmod(self.position, per_epoch)
        self.position += 1
        return [self.examples[i] for i in self.epoch_batches(epoch)[index]]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ValueError(
                f"checkpoint was written with seed={state['seed']}, batch_size={state['batch_size']}; "
                f"this run has seed={self.seed}, batch_size={self.batch_size}: resume with the same config"
            )
        self.position = int(state["position"])
