"""Command line: ``qlora-kernels info | train | eval | merge | demo | bench``.

Exit codes: 0 ok, 1 failure, 2 bad usage (arguments, config, data files), 3 training diverged
(NaN/inf loss; the last good checkpoint is kept), 130 interrupted (a checkpoint was saved).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

import torch


def package_version(package: str) -> str:
    """Installed version of `package`, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 512, generator=generator)
    print("\nformat  group  bits/param  rel. RMSE on N(0,1)")
    for fmt, group in (("int8", None), ("int4", 64), ("int4", 128), ("nf4", 64)):
        qt = formats.quantize(weight, fmt, group_size=group)
        err = (qt.dequantize(torch.float32, backend="torch") - weight).norm() / weight.norm()
        print(f"{fmt:<6}  {qt.group_size:>5}  {qt.bits_per_param:>10.3f}  {err.item():.4f}")
    return 0


EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_MODEL = "smollm2-135m-instruct"
HEAVY_COMMANDS = ("train", "eval", "merge", "demo", "bench", "generate", "chat")


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune as the config says; writes metrics.jsonl, checkpoints and adapter/ into output_dir."""
    from .train import TrainConfig, train

    cfg = TrainConfig.from_file(args.config, args.set)
    result = train(cfg, resume=args.resume)
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with: qlora-kernels train --config {args.config} --resume")
        return EXIT_INTERRUPTED
    print(
        f"done: {result.step} steps, loss {result.loss:.4f}, {result.train_seconds:.0f}s, adapter {result.adapter_dir}"
    )
    return EXIT_OK


def _model_for_adapter(adapter: Path, model: str | None) -> str:
    """The base model of an adapter: --model, else the train_config.json next to it, else SmolLM2."""
    if model:
        return model
    config = adapter.parent / "train_config.json"
    if config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("model", DEFAULT_MODEL)
    return DEFAULT_MODEL


def cmd_eval(args: argparse.Namespace) -> int:
    """Greedy generation on held-out prompts with an adapter loaded; prints format / exact scores."""
    from . import load_adapter, load_model
    from .train import expenses, generate, read_jsonl, score, token_budget

    adapter = Path(args.adapter)
    model, tokenizer = load_model(_model_for_adapter(adapter, args.model))
    load_adapter(model, adapter)
    if args.data:
        conversations = [r["messages"] for r in read_jsonl(args.data)][: args.n]
    else:
        _, held_out = expenses.make_splits(0, args.n, seed=0, language=args.language)
        conversations = [
            [
                {"role": "user", "content": expenses.prompt(e, args.language)},
                {"role": "assistant", "content": expenses.completion(e, args.label_style, args.language)},
            ]
            for e in held_out
        ]
    references = [c[-1]["content"] for c in conversations]
    outputs = generate(model, tokenizer, [c[:-1] for c in conversations], token_budget(tokenizer, conversations))
    if args.task == "expenses":
        result = score(outputs, references, lambda text: expenses.parse_total(text, args.language))
    else:
        result = score(outputs, references, lambda text: text.strip() or None)
    print(json.dumps({"n_eval": result.n, **result.as_dict()}))
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold the LoRA adapter into a dense copy of the base and save it as a transformers model."""
    from . import load_adapter, load_model, merge

    adapter = Path(args.adapter)
    model, tokenizer = load_model(_model_for_adapter(adapter, args.model))
    load_adapter(model, adapter)
    merge(model, into=args.dtype)
    errors = getattr(model, "qk_merge_errors", {})
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    worst = max(errors.values(), default=0.0)
    print(
        f"merged {len(errors)} LoRA layers into {args.dtype} weights "
        f"(worst relative error {worst:.2e}); saved {args.out}"
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: QLoRA on SmolLM2-135M-Instruct for the expense task, report before/after."""
    from .train.demo import run_demo

    metrics = run_demo(args.out, args.set, label_style=args.label_style, n_eval=args.n_eval)
    report = Path(args.out) / "report.md"
    print(report.read_text(encoding="utf-8").split("![loss]")[0])
    print(json.dumps(metrics))
    return EXIT_OK


def _generation_setup(args: argparse.Namespace, prompt: bool):
    """Check the arguments (before anything loads), then load the base with the adapter -> (session, prompt)."""
    from .generation import (
        ChatSession,
        Sampling,
        UsageError,
        check_adapter_dir,
        check_dtype,
        check_prompt,
        load_adapted_model,
    )

    try:
        adapter = check_adapter_dir(args.adapter)
        text = check_prompt(args.prompt) if prompt else None
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        dtype = check_dtype(args.dtype)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return None, None
    model, tokenizer = load_adapted_model(_model_for_adapter(adapter, args.model), adapter, dtype)
    return ChatSession(model, tokenizer, sampling, system=args.system), text


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer one prompt with the fine-tuned model (quantized base + adapter, no merge), streaming the tokens."""
    session, prompt = _generation_setup(args, prompt=True)
    if session is None:
        return EXIT_USAGE
    session.reply(prompt, sys.stdout)
    print()
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    """Talk to the fine-tuned model; the key/value cache of the conversation is reused turn after turn."""
    from .generation import chat_loop

    session, _ = _generation_setup(args, prompt=False)
    if session is None:
        return EXIT_USAGE
    chat_loop(session)
    return EXIT_OK


def _benchmarks_root() -> Path:
    """The source checkout holding ``benchmarks/`` (not an installed package): the parent of this package's folder."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "suite.py").is_file():
        raise FileNotFoundError(
            f"qlora-kernels bench needs a source checkout with benchmarks/ (looked in {root}); "
            "clone the repository and install it editable: scripts/bootstrap.sh or pip install -e '.[dev,peers]'"
        )
    return root


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite of the source checkout (benchmarks/suite.py) and write its results."""
    root = str(_benchmarks_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.suite import main as bench_main

    argv = ["--suite", args.suite, "--rounds", str(args.rounds), "--layer-threads", str(args.layer_threads)]
    argv += ["--out", args.out] if args.out else []
    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, device, available backends")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="fine-tune from a YAML/JSON config")
    train.add_argument("--config", required=True, help="YAML or JSON file (see examples/expenses/config.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="generate on held-out prompts with an adapter, print format/exact")
    ev.add_argument("--adapter", required=True, help="adapter folder written by train (output_dir/adapter)")
    ev.add_argument("--model", help="base model (default: from the run's train_config.json, else SmolLM2)")
    ev.add_argument("--data", help="JSONL of prompt/completion (default: the expense task's held-out split)")
    ev.add_argument("--n", type=int, default=40, help="number of examples (default 40)")
    ev.add_argument("--task", choices=("expenses", "exact"), default="expenses", help="how outputs are scored")
    ev.add_argument("--label-style", choices=("worked", "answer"), default="worked")
    ev.add_argument("--language", choices=("ru", "en"), default="ru")
    ev.set_defaults(func=cmd_eval)

    mg = sub.add_parser("merge", help="fold an adapter into dense weights and save a transformers model")
    mg.add_argument("--adapter", required=True, help="adapter folder")
    mg.add_argument("--out", required=True, help="output folder for save_pretrained")
    mg.add_argument("--model", help="base model (default: from the run's train_config.json, else SmolLM2)")
    mg.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="dense weight dtype")
    mg.set_defaults(func=cmd_merge)

    sampling = argparse.ArgumentParser(add_help=False)  # the options generate and chat share
    sampling.add_argument("--adapter", required=True, help="adapter folder written by train (output_dir/adapter)")
    sampling.add_argument("--model", help="base model (default: from the run's train_config.json, else SmolLM2)")
    sampling.add_argument(
        "--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="compute dtype (auto: the adapter's)"
    )
    sampling.add_argument("--system", help="system prompt (default: the chat template's)")
    sampling.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (default 256)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    sampling.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    gen = sub.add_parser("generate", parents=[sampling], help="answer a prompt with a fine-tuned adapter, streamed")
    gen.add_argument("--prompt", required=True, help="the user's message (the chat template is applied)")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", parents=[sampling], help="chat with a fine-tuned adapter (KV cache kept)")
    chat.set_defaults(func=cmd_chat)

    demo = sub.add_parser("demo", help="the main job: QLoRA SmolLM2 on the expense task, before/after report")
    demo.add_argument("--out", default="out/demo", help="output folder (report.md, loss.png, metrics.json)")
    demo.add_argument("--label-style", choices=("worked", "answer"), default="worked")
    demo.add_argument("--n-eval", type=int, default=40, help="held-out examples (default 40)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training key")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmark suites (needs a source checkout): cpu, methods, gpu")
    bench.add_argument(
        "--suite",
        choices=("cpu", "methods", "gpu"),
        default="cpu",
        help="cpu: layers, memory, SFT step vs TRL, dequant (< 15 min on 2 cores); methods: the lecture's "
        "method comparison (~25 min); gpu: the suites on CUDA",
    )
    bench.add_argument("--out", help="result folder (default benchmarks/results/cpu, or the GPU's name)")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per layer case")
    bench.add_argument(
        "--layer-threads",
        type=int,
        default=0,
        help="torch threads for the layer suite (0: default; 1: robust when busy)",
    )
    bench.set_defaults(func=cmd_bench)
    return parser


def _reexec_with_passive_openmp() -> None:
    """Restart once with OMP_WAIT_POLICY=PASSIVE unless the user chose a policy.

    With OpenMP's default busy-waiting, two torch threads on two shared cores make small matmuls
    (token-by-token decoding) 20x slower whenever another process runs. The policy is read when
    torch loads, which the package import already did, hence the re-exec.
    """
    if os.environ.get("OMP_WAIT_POLICY") is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "qlora_kernels.cli", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None and args.command in HEAVY_COMMANDS:
        _reexec_with_passive_openmp()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .train import ConfigError, DataError, TrainingDiverged

    try:
        return int(args.func(args))
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
