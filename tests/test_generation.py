"""`qlora-kernels generate` / `chat` and qlora_kernels.generation on a tiny Llama with a QLoRA adapter.

Streaming writes the same text as a plain greedy decode, a chat turn runs only its new tokens
(the cache of earlier turns is reused) and answers as a fresh run would, and bad input exits 2
with one clear line before any model loads.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import pytest
import torch
from train_support import load_tokenizer, tiny_model_dir

import qlora_kernels as qk
from qlora_kernels import generation
from qlora_kernels.cli import EXIT_USAGE, main
from qlora_kernels.generation import ChatSession, Sampling, TextStream, UsageError, load_adapted_model


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QLoRA (NF4) adapter with random B on the tiny Llama, laid out as `train` writes it."""
    run = tmp_path_factory.mktemp("run")
    model, _ = qk.load_model(tiny_model_dir())
    qk.prepare_model(model, "qlora", quant="nf4", target_modules="all-linear", r=4)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    qk.save_adapter(model, run / "adapter")
    (run / "train_config.json").write_text(json.dumps({"model": str(tiny_model_dir())}))
    return run / "adapter"


def greedy_reference(adapter: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """The answer of a plain `model.generate` on the whole conversation, no cache carried over."""
    model, tokenizer = load_adapted_model(tiny_model_dir(), adapter)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(ids, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------ generate
def test_generate_streams_the_greedy_answer(adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--adapter", str(adapter_dir), "--prompt", "How much is 2 + 3?", "--max-new-tokens", "12"])
    assert code == 0
    printed = capsys.readouterr().out.strip()
    expected = greedy_reference(adapter_dir, [{"role": "user", "content": "How much is 2 + 3?"}], 12)
    assert printed == expected and printed


def test_the_loaded_model_is_quantized_with_the_adapter_unmerged(adapter_dir: Path) -> None:
    model, _ = load_adapted_model(tiny_model_dir(), adapter_dir, dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, qk.LoRALinear)]
    assert layers and all(m.is_quantized and not m.merged for m in layers)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_text_stream_writes_tokens_as_they_come_and_never_half_a_character() -> None:
    tokenizer = load_tokenizer()
    text = "Итого: 365 рублей 🙂, café."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = io.StringIO()
    stream = TextStream(tokenizer, out)
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt, not printed
    writes = []
    for token in ids:
        stream.put(torch.tensor([token]))
        writes.append(out.getvalue())
    stream.end()
    assert out.getvalue() == tokenizer.decode(ids)
    assert all("\ufffd" not in w for w in writes)
    assert len(set(writes)) > len(ids) // 2  # the text grew while tokens arrived, not only at the end


# ---------------------------------------------------------------------------------- chat
def test_a_chat_turn_reuses_the_cache_and_answers_as_a_fresh_run(adapter_dir: Path) -> None:
    model, tokenizer = load_adapted_model(tiny_model_dir(), adapter_dir)
    seen: list[int] = []
    forward = model.forward

    @functools.wraps(forward)  # keeps the signature, which says how the cache argument is named
    def counting_forward(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    model.forward = counting_forward
    session = ChatSession(model, tokenizer, Sampling(max_new_tokens=6))
    first = session.reply("Hello there")
    turn_one_prompt = seen[0]
    seen.clear()
    second = session.reply("And then?")
    messages = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    full = len(tokenizer(generation.render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])
    assert seen[0] < full - turn_one_prompt + 2, f"turn 2 ran {seen[0]} tokens of {full}: the cache was not reused"
    assert second == greedy_reference(adapter_dir, messages, 6)
    session.reset()
    assert session.messages == [] and session.cache is None


def test_chat_command_answers_each_line_until_exit(
    adapter_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = iter(["Hi", "", "/reset", "What is 7 * 6?", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--adapter", str(adapter_dir), "--max-new-tokens", "4", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and "(conversation cleared)" in out
    assert next(lines) == "never read"


def test_chat_stops_at_end_of_input(adapter_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eof(prompt: str = "") -> str:
        raise EOFError

    model, tokenizer = load_adapted_model(tiny_model_dir(), adapter_dir)
    assert generation.chat_loop(ChatSession(model, tokenizer), read=eof, out=io.StringIO()) == 0


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model starts loading: bad input must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded despite bad input")

    monkeypatch.setattr(generation, "load_adapted_model", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--adapter", "{missing}", "--prompt", "hi"], "adapter folder '{missing}' does not exist"),
        (["chat", "--adapter", "{missing}"], "adapter folder '{missing}' does not exist"),
        (["generate", "--adapter", "{empty}", "--prompt", "hi"], "adapter_config.json and adapter_model.safetensors"),
        (["generate", "--adapter", "{adapter}", "--prompt", ""], "the prompt is empty"),
        (["generate", "--adapter", "{adapter}", "--prompt", "  \n"], "the prompt is empty"),
        (["generate", "--adapter", "{adapter}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["chat", "--adapter", "{adapter}", "--temperature", "-1"], "--temperature must be >= 0"),
        (["chat", "--adapter", "{adapter}", "--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line_before_loading(
    argv, message, adapter_dir: Path, tmp_path: Path, no_model_load, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    paths = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty"), "adapter": str(adapter_dir)}
    assert main([a.format(**paths) for a in argv]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert message.format(**paths) in err


@pytest.mark.parametrize("command", [["generate"], ["chat"]])
def test_help_and_missing_arguments(command, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "--adapter" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(command)  # --adapter is required
    assert exit_info.value.code == EXIT_USAGE


def test_sampling_rejects_bad_values() -> None:
    with pytest.raises(UsageError, match="max-new-tokens"):
        Sampling(max_new_tokens=0)
    assert Sampling().generate_kwargs() == {"do_sample": False}
    assert Sampling(temperature=0.7, top_p=0.9).generate_kwargs() == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    with pytest.raises(UsageError, match="--dtype"):
        generation.check_dtype("fp8")
