"""Trying a fine-tuned model: chat-templated generation that streams tokens, with KV-cache reuse across turns.

The base model is loaded and quantized as the adapter says, and the adapter goes on top
(`qk.load_model` + `qk.load_adapter`): nothing is merged, so the weights are the ones trained.
On the CPU the quantized layers decode token by token with the fused small-M kernel.

A chat keeps the key/value cache of everything said so far. Each turn the whole conversation is
rendered with the chat template (as in training) and tokenized; the tokens it shares with the
cached ones are not run again (the cache is cut back to the shared prefix, which also covers a
template that renders earlier turns differently), so a turn costs only its new tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from .train.data import end_of_turn_token, render_prompt
from .train.evaluate import cache_argument, shared_prefix_length
from .tuning.io import CONFIG_NAME, WEIGHTS_NAME

Messages = list[dict[str, str]]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


class UsageError(ValueError):
    """Bad input found before the model loads (the CLI exits with code 2)."""


# ------------------------------------------------------------------------------ checks
def check_adapter_dir(adapter: str | Path) -> Path:
    """The adapter folder, checked to hold the two files `qk.save_adapter` (or PEFT) writes."""
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise UsageError(f"adapter folder {str(folder)!r} does not exist (pass --adapter OUTPUT_DIR/adapter)")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise UsageError(
            f"{folder} is not an adapter folder: {' and '.join(missing)} missing "
            "(train writes one to OUTPUT_DIR/adapter)"
        )
    return folder


def check_prompt(prompt: str | None) -> str:
    """A prompt with some text in it."""
    if prompt is None or not prompt.strip():
        raise UsageError('the prompt is empty: pass some text, e.g. --prompt "Hello"')
    return prompt


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy with temperature 0 (the default), else sampled."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


def check_dtype(name: str | None) -> torch.dtype | None:
    """The compute dtype to load in: None keeps the adapter's."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {('auto', *DTYPES)}, got {name!r}")
    return DTYPES[name]


# ------------------------------------------------------------------------------- loading
def load_adapted_model(
    base: str | Path, adapter: str | Path, dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any]:
    """The base model with the adapter on it (quantized as the adapter says, not merged) -> (model, tokenizer).

    dtype: compute dtype of the frozen base (bf16 halves the memory read per token); None keeps the
    adapter's.
    """
    from .models import load_model
    from .tuning import load_adapter

    model, tokenizer = load_model(base)
    overrides = {"compute_dtype": dtype} if dtype is not None else {}
    load_adapter(model, adapter, **overrides)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- streaming
class TextStream:
    """A transformers streamer that writes the reply's text to `out` as tokens arrive.

    Tokens are decoded together (a character may span several tokens); text that ends in an
    incomplete character is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.tokens: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.printed:
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)


# --------------------------------------------------------------------------------- chat
@dataclass
class ChatSession:
    """A conversation with a model: its messages and the key/value cache of the tokens already run."""

    model: nn.Module
    tokenizer: Any
    sampling: Sampling = field(default_factory=Sampling)
    system: str | None = None
    messages: Messages = field(default_factory=list)
    cache: Any = None
    cached_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the system prompt)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache, self.cached_ids = None, []

    @torch.no_grad()
    def reply(self, text: str, out: TextIO | None = None) -> str:
        """The model's answer to the user's `text` (streamed to `out` as it comes); both join the history."""
        self.messages.append({"role": "user", "content": text})
        tokenizer = self.tokenizer
        ids = tokenizer(render_prompt(tokenizer, self.messages), add_special_tokens=False)["input_ids"]
        cache_kwargs = self._reusable_cache(ids)
        device = next(self.model.parameters()).device
        eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
        if self.sampling.temperature > 0:
            torch.manual_seed(self.sampling.seed)
        output = self.model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=self.sampling.max_new_tokens,
            eos_token_id=eot_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id,
            streamer=TextStream(tokenizer, out) if out is not None else None,
            return_dict_in_generate=True,
            use_cache=True,
            **self.sampling.generate_kwargs(),
            **cache_kwargs,
        )
        sequence = output.sequences[0].tolist()
        answer = tokenizer.decode(sequence[len(ids) :], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        self._keep_cache(output, sequence)
        return answer

    def _reusable_cache(self, ids: list[int]) -> dict[str, Any]:
        """generate() kwargs with the cache cut back to the tokens `ids` shares with what was run before."""
        if self.cache is None:
            return {}
        shared = shared_prefix_length([self.cached_ids, ids], min_length=1)
        if shared == 0 or not _crop(self.cache, shared):
            self.cache, self.cached_ids = None, []
            return {}
        self.cached_ids = self.cached_ids[:shared]
        return {cache_argument(self.model): self.cache}

    def _keep_cache(self, output: Any, sequence: list[int]) -> None:
        """Keep the cache generate() returned if it covers exactly a prefix of the tokens (not, e.g., with
        prompt tuning's virtual tokens, which it holds besides the text)."""
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        length = cache.get_seq_length() if cache is not None else 0
        if cache is None or length > len(sequence):
            self.cache, self.cached_ids = None, []
            return
        self.cache, self.cached_ids = cache, sequence[:length]


def _crop(cache: Any, keep: int) -> bool:
    """Cut `cache` back to its first `keep` positions; False when this cache cannot be cut."""
    length = cache.get_seq_length()
    if length < keep:
        return False
    if length == keep:
        return True
    if getattr(cache, "is_croppable", True) is False or not hasattr(cache, "crop"):
        return False
    cache.crop(keep - length)  # a negative count removes that many positions (transformers 4.x and 5.x)
    return cache.get_seq_length() == keep


def chat_loop(session: ChatSession, read: Callable[[str], str] | None = None, out: TextIO | None = None) -> int:
    """Read a line (`read`, default input()), stream the reply to `out` (default stdout), repeat;
    /reset starts over, /exit, /quit or end of input stop. Returns the number of replies given."""
    read = read or input
    out = out or sys.stdout
    replies = 0
    out.write(f"chat: {', '.join(EXIT_COMMANDS)} or Ctrl-D to stop, {RESET_COMMAND} to start over\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return replies
        text = line.strip()
        if text in EXIT_COMMANDS:
            return replies
        if text == RESET_COMMAND:
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        out.write("model> ")
        session.reply(text, out)
        out.write("\n")
        replies += 1
