"""qlora-kernels: quantized LoRA fine-tuning from the command line.

Commands: info, train, eval, merge, demo, generate, chat. Add --debug (before or after the command) to see the
traceback of an error.

Exit codes: 0 ok; 1 a failure while running (one line, the traceback with --debug); 2 bad usage,
config or data, found before any model loads; 3 training diverged (NaN/inf loss, the last good
checkpoint is kept); 130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM, after saving a checkpoint
and the adapter.

The benchmark suites run from a source checkout: .venv/bin/python -m benchmarks.suite --suite cpu
(see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .versions import package_version

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DIVERGED = 0, 1, 2, 3
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
DEFAULT_MODEL = "smollm2-135m-instruct"
HEAVY_COMMANDS = ("train", "eval", "merge", "demo", "generate", "chat")
RUN_CONFIG = "train_config.json"  # written by train next to adapter/


class UsageError(Exception):
    """Bad arguments or input files, found before any model loads (exit code 2)."""


# --------------------------------------------------------------------------- arguments
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's help ends with its default unless that is empty."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # by identity for None/False: 0 == False, and a default of 0 (--seed, --temperature) is worth showing
        empty = action.default is None or action.default is False or action.default in ([], "", argparse.SUPPRESS)
        if "%(default)" in text or empty or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


@contextlib.contextmanager
def input_errors() -> Iterator[None]:
    """Turn errors about the user's inputs (files, values), raised before a model loads, into UsageError."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e


def check_output_folder(path: Path, what: str) -> None:
    """UsageError unless `path` is (or can become) a writable folder."""
    from .train.plan import check_writable_dir

    check_writable_dir(path, what)


# ------------------------------------------------------------------------------- info
def _triton_status() -> str:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "not installed"
    from .kernels._runtime import interpreter_enabled

    if torch.cuda.is_available():
        return "available (CUDA)"
    if interpreter_enabled():
        return "interpreter (TRITON_INTERPRET=1, slow; for tests)"
    return "installed; needs CUDA (or TRITON_INTERPRET=1)"


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, device and which backends work, plus a quantization check on random weights."""
    from . import formats

    print(
        f"qlora-kernels {package_version('qlora-kernels')} on Python {platform.python_version()} ({platform.machine()})"
    )
    for package in ("torch", "triton", "transformers", "safetensors", "bitsandbytes", "peft"):
        print(f"  {package:<13} {package_version(package)}")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    print(f"device: {device}; CPU threads: {torch.get_num_threads()}")
    print(f"backends: torch reference: available; triton: {_triton_status()}")
    print(f"dequantize backends registered: {', '.join(formats.available_dequant_backends())}")
    from .ops.native import native_status

    native = native_status()
    ops = ", ".join(native.ops) if native.available else "none"
    print(f"native ops: {ops} ({native.error or 'CPU extension qlora_kernels._native built'})")
    from .ops.compute_policy import cpu_compute_dtype

    print(f"CPU compute dtype: {cpu_compute_dtype().describe()}; override with QK_CPU_DTYPE=bf16|fp32")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 512, generator=generator)
    print("\nformat  group  bits/param  rel. RMSE on N(0,1) weights 256x512")
    for fmt, group in (("int8", None), ("int4", 64), ("int4", 128), ("nf4", 64)):
        qt = formats.quantize(weight, fmt, group_size=group)
        err = (qt.dequantize(torch.float32, backend="torch") - weight).norm() / weight.norm()
        label = "row" if group is None else str(qt.group_size)  # int8: one scale per row, 8 + 32/K bits
        print(f"{fmt:<6}  {label:>5}  {qt.bits_per_param:>10.3f}  {err.item():.4f}")
    return EXIT_OK


# ------------------------------------------------------------------------------ train
def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run: the same --config and --set overrides, plus --resume."""
    parts = ["qlora-kernels", "train", "--config", args.config]
    for item in args.set:
        parts += ["--set", item]
    return shlex.join([*parts, "--resume"])


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune as the config says; writes metrics.jsonl, checkpoints and adapter/ into output_dir."""
    from .train import TrainConfig, list_checkpoints, train
    from .train.config import reference_markdown

    if args.help_config:
        sys.stdout.write(reference_markdown())
        return EXIT_OK
    if not args.config:
        raise UsageError("train needs --config FILE (a YAML or JSON file; its keys: qlora-kernels train --help-config)")
    cfg = TrainConfig.from_file(args.config, args.set)
    existing = list_checkpoints(cfg.output_dir)
    if existing and not (args.resume or args.fresh):
        raise UsageError(
            f"output_dir {cfg.output_dir} holds checkpoints of an earlier run (newest {existing[-1].name}): "
            "continue it with --resume, or start over with --fresh (deletes its checkpoints, metrics and adapter)"
        )
    result = train(cfg, resume=args.resume, change_schedule=args.change_schedule)
    if result.interrupted:
        name = signal.Signals(result.signal_number).name
        print(
            f"stopped by {name} at step {result.step} of {result.max_steps}: checkpoint {result.checkpoint_dir}, "
            f"adapter {result.adapter_dir} (same step). Continue with: {resume_command(args)}   "
            f"(output_dir {cfg.output_dir})",
            file=sys.stderr,
        )
        return 128 + result.signal_number
    if not result.losses:
        print(
            f"nothing to train: the run in {cfg.output_dir} already reached step {result.step} of {result.max_steps} "
            f"(adapter {result.adapter_dir}); to train on, raise max_steps and add --change-schedule"
        )
        return EXIT_OK
    print(
        f"done: {result.step} steps, loss {result.loss:.4f}, {result.train_seconds:.0f}s, adapter {result.adapter_dir}"
    )
    return EXIT_OK


# ----------------------------------------------------------------------- eval, merge
def read_run_config(adapter: Path) -> dict[str, Any]:
    """The train_config.json of the run that wrote `adapter` (next to it), or {} if there is none."""
    file = adapter.parent / RUN_CONFIG
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{file} is not valid JSON ({e}); pass --model (and --data) explicitly") from None
    if not isinstance(data, dict):
        raise UsageError(f"{file} must hold a JSON object; pass --model (and --data) explicitly")
    return data


def check_adapter_and_model(args: argparse.Namespace) -> tuple[Path, str, dict[str, Any]]:
    """(adapter folder, base model, the run's config): all checked before any weight loads."""
    from .models import find_model
    from .tuning.io import check_adapter

    adapter = Path(args.adapter)
    with input_errors():
        check_adapter(adapter)  # files readable, config complete, every tensor finite
        run_config = read_run_config(adapter)
        model = args.model or run_config.get("model") or DEFAULT_MODEL
        find_model(model)
    return adapter, model, run_config


def eval_conversations(args: argparse.Namespace, run_config: dict[str, Any]) -> tuple[list[list[dict]], str]:
    """(conversations to score, where they come from): --data, else the run's eval_file, else the expense task."""
    from .train import expenses, read_jsonl

    data = args.data
    source = data
    if not data and run_config.get("eval_file"):
        data = run_config["eval_file"]
        source = f"{data} (the run's eval_file)"
        if not Path(data).is_file():
            raise UsageError(f"the run's eval_file {data} (in {RUN_CONFIG}) does not exist; pass --data FILE")
    if data:
        with input_errors():
            records = read_jsonl(data)
        return [r["messages"] for r in records][: args.n], source
    _, held_out = expenses.make_splits(0, args.n, seed=0, language=args.language)
    conversations = [
        [
            {"role": "user", "content": expenses.prompt(e, args.language)},
            {"role": "assistant", "content": expenses.completion(e, args.label_style, args.language)},
        ]
        for e in held_out
    ]
    return conversations, f"the expense task's held-out split ({args.language}, {args.label_style} labels)"


def print_samples(conversations: list[list[dict]], outputs: list[str], parse: Callable[[str], Any], n: int) -> None:
    for i, (conversation, output) in enumerate(zip(conversations[:n], outputs[:n], strict=True), start=1):
        reference = conversation[-1]["content"]
        verdict = "exact" if parse(output) is not None and parse(output) == parse(reference) else "wrong"
        print(f"--- sample {i} ({verdict})")
        print(f"prompt:    {conversation[-2]['content'] if len(conversation) > 1 else ''}")
        print(f"reference: {reference}")
        print(f"output:    {output}")


def cmd_eval(args: argparse.Namespace) -> int:
    """Greedy generation on held-out prompts with an adapter loaded; prints format / exact scores."""
    from . import load_adapter, load_model
    from .train import expenses, generate, score, token_budget
    from .train.trainer import ADAPTER_STEP_KEY
    from .tuning.io import adapter_metadata

    adapter, model_name, run_config = check_adapter_and_model(args)
    conversations, source = eval_conversations(args, run_config)
    step = adapter_metadata(adapter).get(ADAPTER_STEP_KEY)
    trained = f" (trained {step} steps)" if step else ""
    print(f"eval: {len(conversations)} examples from {source}; model {model_name}{trained}", file=sys.stderr)
    model, tokenizer = load_model(model_name)
    load_adapter(model, adapter)
    references = [c[-1]["content"] for c in conversations]
    outputs = generate(model, tokenizer, [c[:-1] for c in conversations], token_budget(tokenizer, conversations))
    if args.task == "expenses":
        parse = lambda text: expenses.parse_total(text, args.language)  # noqa: E731
    else:
        parse = lambda text: text.strip() or None  # noqa: E731
    result = score(outputs, references, parse)
    print_samples(conversations, outputs, parse, args.show)
    print(json.dumps({"n_eval": result.n, **result.as_dict()}))
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold the LoRA adapter into a dense copy of the base and save it as a transformers model."""
    from . import load_adapter, load_model, merge

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"--out {out} is a file; merge writes a folder (config.json, model.safetensors, tokenizer files)"
        )
    check_output_folder(out, "--out")
    adapter, model_name, _ = check_adapter_and_model(args)
    model, tokenizer = load_model(model_name)
    load_adapter(model, adapter)
    merge(model, into=args.dtype)
    errors = getattr(model, "qk_merge_errors", {})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "config.json").is_file():
        raise RuntimeError(f"save_pretrained wrote no config.json into {out}")
    worst = max(errors.values(), default=0.0)
    print(f"merged {len(errors)} LoRA layers into {args.dtype} weights (worst relative error {worst:.2e}); saved {out}")
    return EXIT_OK


# ------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: QLoRA on SmolLM2-135M-Instruct for the expense task, report before/after."""
    from .train.config import TrainConfig, apply_overrides
    from .train.demo import run_demo

    check_output_folder(Path(args.out), "--out")
    TrainConfig.from_dict(apply_overrides({}, args.set))  # a bad --set fails before the model loads
    metrics = run_demo(args.out, args.set, label_style=args.label_style, n_eval=args.n_eval)
    report = Path(args.out) / "report.md"
    print(report.read_text(encoding="utf-8").split("![loss]")[0])
    print(json.dumps(metrics))
    return EXIT_OK


# ---------------------------------------------------------------------- generate, chat
def chat_session(args: argparse.Namespace, with_prompt: bool):
    """Check every argument (before anything loads), then load the base with the adapter -> (session, prompt)."""
    from .generation import ChatSession, Sampling, check_adapter_dir, check_dtype, check_prompt, load_adapted_model

    with input_errors():
        check_adapter_dir(args.adapter)
        prompt = check_prompt(args.prompt) if with_prompt else None
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        dtype = check_dtype(args.dtype)
    adapter, model_name, _ = check_adapter_and_model(args)
    model, tokenizer = load_adapted_model(model_name, adapter, dtype)
    return ChatSession(model, tokenizer, sampling, system=args.system), prompt


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer one prompt with the fine-tuned model (quantized base + adapter, no merge), streaming the tokens."""
    session, prompt = chat_session(args, with_prompt=True)
    session.reply(prompt, sys.stdout)
    print()
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    """Talk to the fine-tuned model; the key/value cache of the conversation is reused turn after turn."""
    from .generation import chat_loop

    session, _ = chat_session(args, with_prompt=False)
    chat_loop(session)
    return EXIT_OK


# ----------------------------------------------------------------------------- parser
def add_command(
    sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int], summary: str, doc: str
) -> argparse.ArgumentParser:
    """A subcommand with the shared options (--debug) and help formatting; `main` handles its errors."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    parser = sub.add_parser(name, help=summary, description=doc, parents=[common], formatter_class=HelpFormatter)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from .train.expenses import LABEL_STYLES, LANGUAGES

    parser = argparse.ArgumentParser(prog="qlora-kernels", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_command(
        sub,
        "info",
        cmd_info,
        "versions, device, available backends",
        "Print the versions of qlora-kernels and its peers, the device, which backends (torch, Triton, native "
        "CPU ops) work here, and the bits per parameter and error of each format on random weights.",
    )

    train = add_command(
        sub,
        "train",
        cmd_train,
        "fine-tune from a YAML/JSON config",
        "Fine-tune a model as a YAML/JSON config says. output_dir gets train_config.json, metrics.jsonl,\n"
        "checkpoint-NNNNNN/ folders and adapter/. Ctrl-C or SIGTERM finishes the step, saves a checkpoint\n"
        "and the adapter, and prints the command that continues the run.\n\n"
        "The config keys, their defaults and meaning: qlora-kernels train --help-config",
    )
    train.add_argument("--config", metavar="FILE", help="YAML or JSON config file")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in output_dir")
    start.add_argument(
        "--fresh", action="store_true", help="start over: delete the checkpoints, metrics and adapter in output_dir"
    )
    train.add_argument(
        "--change-schedule",
        action="store_true",
        help="with --resume: accept a max_steps / lr / warmup_steps / min_lr_ratio other than the checkpoint's",
    )
    train.add_argument("--help-config", action="store_true", help="print the config reference and exit")

    ev = add_command(
        sub,
        "eval",
        cmd_eval,
        "generate with an adapter and score the answers",
        "Greedy generation with an adapter on held-out prompts; prints the format and exact-answer scores as\n"
        "JSON (the last line). Data: --data, else the run's eval_file (from train_config.json next to the\n"
        "adapter), else the expense task's held-out split.",
    )
    ev.add_argument("--adapter", required=True, help="adapter folder written by train (output_dir/adapter)")
    ev.add_argument("--model", help="base model (default: the run's model from train_config.json, else SmolLM2)")
    ev.add_argument("--data", metavar="FILE", help="JSONL of prompt/completion or messages records to score")
    ev.add_argument("--n", type=positive_int, default=40, help="number of examples (the first N of the data)")
    ev.add_argument(
        "--task",
        choices=("expenses", "exact"),
        default="expenses",
        help="scoring: expenses = the total in 'Итого: N рублей.' must match; exact = the whole answer must match",
    )
    ev.add_argument(
        "--label-style",
        choices=LABEL_STYLES,
        default="worked",
        help="expense task without --data: worked = a running sum, then the total; answer = the total only",
    )
    ev.add_argument(
        "--language", choices=LANGUAGES, default="ru", help="language of the expense task's prompts and answers"
    )
    ev.add_argument("--show", type=non_negative_int, default=0, metavar="N", help="print N samples with the outputs")

    mg = add_command(
        sub,
        "merge",
        cmd_merge,
        "fold an adapter into dense weights and save a transformers model",
        "Fold a LoRA adapter into dense weights of the base model and save it with save_pretrained\n"
        "(readable by transformers' from_pretrained, no qlora-kernels needed).",
    )
    mg.add_argument("--adapter", required=True, help="adapter folder written by train")
    mg.add_argument("--out", required=True, help="output folder for save_pretrained (created if missing)")
    mg.add_argument("--model", help="base model (default: the run's model from train_config.json, else SmolLM2)")
    mg.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="dtype of the dense weights")

    demo = add_command(
        sub,
        "demo",
        cmd_demo,
        "QLoRA on SmolLM2 for the expense task, before/after report",
        "The main job: QLoRA fine-tuning of SmolLM2-135M-Instruct on the expense-total task, scored before\n"
        "(zero-shot, few-shot) and after on held-out lists; writes report.md, loss.png, metrics.json.",
    )
    demo.add_argument("--out", default="out/demo", help="output folder")
    demo.add_argument(
        "--label-style",
        choices=LABEL_STYLES,
        default="worked",
        help="worked = a running sum, then the total; answer = the total only",
    )
    demo.add_argument("--n-eval", type=positive_int, default=40, help="held-out examples")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training config key")

    gen = add_command(
        sub,
        "generate",
        cmd_generate,
        "answer a prompt with a fine-tuned adapter, streamed",
        "Answer one prompt with the base model and a trained adapter on top (quantized as the adapter says,\n"
        "not merged). The chat template is applied and the answer is printed as it is generated.",
    )
    gen.add_argument("--prompt", required=True, help="the user's message")
    add_sampling_options(gen)
    chat = add_command(
        sub,
        "chat",
        cmd_chat,
        "chat with a fine-tuned adapter",
        "Talk to the base model with a trained adapter on top; each turn reuses the key/value cache of the\n"
        "conversation so far. /reset starts a new conversation, /exit (or Ctrl-D) ends it.",
    )
    add_sampling_options(chat)
    return parser


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The options generate and chat share: the adapter, the base model, dtype and sampling."""
    parser.add_argument("--adapter", required=True, help="adapter folder written by train (output_dir/adapter)")
    parser.add_argument("--model", help="base model (default: the run's model from train_config.json, else SmolLM2)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="compute dtype of the quantized base (auto: the one the adapter was trained with)",
    )
    parser.add_argument("--system", help="system prompt (default: the chat template's)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (>= 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")


# ------------------------------------------------------------------------------- main
def _reexec_with_passive_openmp() -> None:
    """Restart once with OMP_WAIT_POLICY=PASSIVE unless the user chose a policy.

    With OpenMP's default busy-waiting, two torch threads on two shared cores make small matmuls
    (token-by-token decoding) 20x slower whenever another process runs. The policy is read when
    torch loads, which the package import already did, hence the re-exec.
    """
    if os.environ.get("OMP_WAIT_POLICY") is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "qlora_kernels.cli", *sys.argv[1:]])


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM outside the training loop stops the command like Ctrl-C does (exit 143, not a silent kill)."""
    from .train.trainer import TrainingStopped

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise TrainingStopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; every error becomes one line on stderr and its exit code (module docstring)."""
    from .train import ConfigError, DataError, TrainingDiverged

    usage_errors = (UsageError, ConfigError, DataError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
    debug = getattr(args, "debug", False)
    try:
        with _sigterm_raises():
            return int(func(args))
    except usage_errors as e:
        error, code, message = e, EXIT_USAGE, one_line(e)
    except TrainingDiverged as e:
        error, code, message = e, EXIT_DIVERGED, one_line(e)
    except KeyboardInterrupt as e:
        number = getattr(e, "signal_number", signal.SIGINT)
        error, code, message = e, 128 + number, f"stopped by {signal.Signals(number).name}"
    except Exception as e:
        hint = "" if debug else " (run with --debug for the traceback)"
        error, code, message = e, EXIT_FAILURE, f"{type(e).__name__}: {one_line(e)}{hint}"
    if debug:
        traceback.print_exception(error)
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command in HEAVY_COMMANDS:
        _reexec_with_passive_openmp()
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        print("qlora-kernels: error: choose a command (qlora-kernels --help lists them)", file=sys.stderr)
        return EXIT_USAGE
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
