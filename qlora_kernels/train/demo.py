"""The main job: QLoRA-fine-tune SmolLM2-135M-Instruct on the lecture's expense task, before/after.

Steps: write the data (train + disjoint held-out), load the model, score zero-shot and few-shot
prompting on the held-out lists, train, score the fine-tuned model, write report.md,
loss.png and metrics.json. Everything runs on the CPU in minutes.

The recipe is fixed (data, seed, step count), so the same commit gives the same held-out scores
on any machine, up to float noise; the machine's speed changes only the wall time, which the
report states. The compute dtype follows the measured CPU policy (``dtype: auto``): bf16 where
the host's bf16 GEMM is fast, fp32 elsewhere. A time budget is used only when asked for
(``--set time_budget_s=...``).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import expenses
from .config import TrainConfig, apply_overrides
from .evaluate import Scores, generate, score, token_budget
from .trainer import peak_memory_mb, train

N_TRAIN = 1000  # more lists than the run sees: each step draws fresh ones
N_EVAL = 40
N_SHOTS = 3
TARGET_SECONDS = 600  # the demo's promise: done within 10 minutes on 2 cores, model load included
TARGET_FORMAT, TARGET_EXACT = 0.98, 0.55  # issue 11's targets, shown (never asserted) in the report
TARGET_PEAK_RSS_MB = 4.5e9 / 2**20  # and its "peak RSS <= 4.5 GB" (decimal GB: the stricter reading)
METHOD_NAMES = {"qlora": "QLoRA", "lora": "LoRA", "full": "full", "partial": "partial", "adapter": "adapter"}
EVAL_BATCH = 40  # one batch: decoding is bound by reading the weights, rows are nearly free
DEMO_CONFIG: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "model_dtype": "auto",  # bf16 where this CPU's bf16 GEMM is fast, else fp32 (ops.compute_policy)
    "method": "qlora",
    "quant": "nf4",
    "r": 32,
    "alpha": 64.0,
    "target_modules": "all-linear",
    "max_length": 256,
    "max_steps": 80,
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 1e-3,
    "warmup_steps": 5,
    "min_lr_ratio": 0.1,
    "dtype": "auto",
    "seed": 0,
    "save_every": 0,
    "log_every": 1,
}


def conversation(e: expenses.Expenses, style: str, language: str) -> list[dict[str, str]]:
    """One list as a chat: the question, then the answer in `style` (the demo's training and eval format)."""
    return [
        {"role": "user", "content": expenses.prompt(e, language)},
        {"role": "assistant", "content": expenses.completion(e, style, language)},
    ]


def few_shot_prompt(shots: list[expenses.Expenses], e: expenses.Expenses, style: str, language: str) -> list[dict]:
    """Earlier solved lists as previous chat turns, then the question (the lecture's prompting baseline)."""
    turns: list[dict[str, str]] = []
    for s in shots:
        turns += conversation(s, style, language)
    return turns + [{"role": "user", "content": expenses.prompt(e, language)}]


def evaluate_prompts(model, tokenizer, prompts, references, budget, language, autocast) -> tuple[Scores, list[str]]:
    outputs = generate(model, tokenizer, prompts, budget, batch_size=EVAL_BATCH, autocast=autocast)
    return score(outputs, references, lambda text: expenses.parse_total(text, language)), outputs


def machine_summary() -> str:
    """The CPU model and the threads torch uses, e.g. "AMD EPYC, 2 threads"."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def plot_loss(metrics_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line]
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train_pts, strict=True), label="train loss (completion tokens)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run_demo(
    out_dir: str | Path,
    overrides: list[str] | None = None,
    label_style: str = "worked",
    language: str = "ru",
    n_eval: int = N_EVAL,
    n_shots: int = N_SHOTS,
) -> dict[str, Any]:
    """Run the whole demo into `out_dir`; returns the metrics.json content."""
    from .. import load_model

    t_total = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[demo {time.perf_counter() - t_total:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # ---- data: train and a disjoint held-out split
    train_lists, eval_lists = expenses.make_splits(N_TRAIN, n_eval, seed=0, language=language)
    data_dir = out / "data"
    train_file = expenses.write_jsonl(data_dir / "train.jsonl", train_lists, label_style, language)
    eval_file = expenses.write_jsonl(data_dir / "eval.jsonl", eval_lists, label_style, language)
    settings = {
        **DEMO_CONFIG,
        "train_file": str(train_file),
        "eval_file": str(eval_file),
        "output_dir": str(out / "run"),
    }
    cfg = TrainConfig.from_dict(apply_overrides(settings, overrides))

    # ---- model and the "before" numbers
    seconds: dict[str, float] = {}
    peak_rss: dict[str, float] = {}  # the process's RSS high-water mark at the end of each phase
    phase_start = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal phase_start
        now = time.perf_counter()
        seconds[name] = round(now - phase_start, 1)
        peak_rss[name] = round(peak_memory_mb(torch.device("cpu")), 1)
        phase_start = now

    precision = cfg.precision()
    model, tokenizer = load_model(cfg.model, dtype=precision.torch_model_dtype)
    phase("load")
    log(f"loaded {cfg.model}; {precision.describe()}")
    autocast = None  # generation runs in the weights' own dtype; autocast would re-cast every weight per token
    references = [expenses.completion(e, label_style, language) for e in eval_lists]
    conversations = [conversation(e, label_style, language) for e in eval_lists]
    budget = token_budget(tokenizer, conversations)
    zero_prompts = [c[:-1] for c in conversations]
    shots = sorted(train_lists[:100], key=lambda e: len(e.items))[:n_shots]  # short shots: cheaper prompts
    few_prompts = [few_shot_prompt(shots, e, label_style, language) for e in eval_lists]
    zero, zero_out = evaluate_prompts(model, tokenizer, zero_prompts, references, budget, language, autocast)
    phase("eval_zero_shot")
    log(f"zero-shot: format {zero.format:.0%}, exact {zero.exact:.0%}")
    few, few_out = evaluate_prompts(model, tokenizer, few_prompts, references, budget, language, autocast)
    phase("eval_few_shot")
    log(f"{n_shots}-shot: format {few.format:.0%}, exact {few.exact:.0%}")

    # ---- train: the fixed recipe (a time budget only if the user set one)
    result = train(cfg, model=model, tokenizer=tokenizer)
    phase("train")
    log(f"trained {result.step} steps in {result.train_seconds:.0f}s, final loss {result.loss:.4f}")
    after, after_out = evaluate_prompts(model, tokenizer, zero_prompts, references, budget, language, autocast)
    phase("eval_fine_tuned")
    log(f"fine-tuned: format {after.format:.0%}, exact {after.exact:.0%}")

    metrics = {
        "before": {"zero_shot": zero.as_dict(), "few_shot": few.as_dict()},
        "after": after.as_dict(),
        "n_eval": after.n,
        "steps": result.step,
        "precision": result.precision,
        "train_seconds": round(result.train_seconds, 1),
        "phase_seconds": seconds,
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "peak_rss_after_phase_mb": peak_rss,
        "adapter_bytes": dir_bytes(result.adapter_dir),
    }
    plot_loss(result.output_dir / "metrics.jsonl", out / "loss.png")
    samples = [
        {"prompt": expenses.prompt(e, language), "reference": r, "zero_shot": z, "few_shot": f, "fine_tuned": a}
        for e, r, z, f, a in zip(eval_lists, references, zero_out, few_out, after_out, strict=True)
    ]
    (out / "samples.jsonl").write_text(
        "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8"
    )
    total_seconds = time.perf_counter() - t_total
    metrics["total_seconds"] = round(total_seconds, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(
        render_report(metrics, cfg, label_style, n_shots, budget, total_seconds, samples[:3]), encoding="utf-8"
    )
    log(f"wrote {out / 'report.md'} (total {total_seconds:.0f}s)")
    return metrics


def render_report(
    metrics: dict[str, Any],
    cfg: TrainConfig,
    label_style: str,
    n_shots: int,
    budget: int,
    total_seconds: float,
    samples: list[dict[str, str]],
) -> str:
    """report.md: the before/after table, cost, settings and a few outputs."""
    pct = lambda x: f"{100 * x:.1f}%"
    yes = lambda ok: "met" if ok else "not met"
    method = METHOD_NAMES.get(cfg.method, cfg.method)
    b, a = metrics["before"], metrics["after"]
    exact_ok = a["exact"] >= TARGET_EXACT and a["exact"] > b["few_shot"]["exact"]
    budget_text = (
        f"time budget {cfg.time_budget_s:.0f} s as asked: max_steps followed the measured speed"
        if cfg.time_budget_s
        else "a fixed recipe: the step count never follows the clock"
    )
    phase_text = ", ".join(f"{name} {value:.0f} s" for name, value in metrics["phase_seconds"].items())
    style_text = {
        "worked": 'worked (running sum, then "Итого: X рублей.")',
        "answer": 'answer only ("Итого: X рублей.")',
    }[label_style]
    lines = [
        "# Demo: SFT of SmolLM2-135M-Instruct on the lecture's expense-total task",
        "",
        f"Held-out lists: {metrics['n_eval']} (no amount list shared with training). Label style: **{style_text}**.",
        "Format = the output ends with the answer line `Итого: <integer> рублей.`; "
        "exact = that integer is the true sum.",
        "",
        "| model | format | exact sum |",
        "|---|---|---|",
        f"| base, zero-shot | {pct(b['zero_shot']['format'])} | {pct(b['zero_shot']['exact'])} |",
        f"| base, {n_shots}-shot prompting | {pct(b['few_shot']['format'])} | {pct(b['few_shot']['exact'])} |",
        f"| {method} fine-tuned, zero-shot | {pct(a['format'])} | {pct(a['exact'])} |",
        "",
        f"Targets: format >= {pct(TARGET_FORMAT)} after training: **{yes(a['format'] >= TARGET_FORMAT)}**; exact >= "
        f"{pct(TARGET_EXACT)} and above few-shot: **{yes(exact_ok)}**"
        f"; whole demo <= {TARGET_SECONDS} s on 2 cores: **{yes(total_seconds <= TARGET_SECONDS)}**"
        f"; peak RSS <= 4.5 GB: **{yes(metrics['peak_memory_mb'] <= TARGET_PEAK_RSS_MB)}**.",
        "",
        f"- training: {metrics['steps']} steps x {cfg.batch_size * cfg.grad_accum} examples "
        f"({budget_text}), {metrics['train_seconds']:.0f} s",
        f"- wall time: {total_seconds:.0f} s in all on {machine_summary()}; by phase: {phase_text}",
        f"- precision: {metrics['precision']}",
        f"- peak memory (process RSS): {metrics['peak_memory_mb']:.0f} MiB; the high-water mark after each phase: "
        + ", ".join(f"{name} {value:.0f}" for name, value in metrics.get("peak_rss_after_phase_mb", {}).items()),
        f"- adapter on disk: {metrics['adapter_bytes'] / 2**20:.2f} MiB",
        f"- method {cfg.method}, quant {cfg.quant}, r={cfg.r}, alpha={cfg.alpha}, targets {cfg.target_modules}, "
        f"lr {cfg.lr} (warmup {cfg.warmup_steps}, cosine), seed {cfg.seed}",
        f"- generation: greedy, left padding, batch {EVAL_BATCH}, budget {budget} new tokens "
        "(longest reference completion in tokens x 1.25 + 8)",
        "",
        "![loss](loss.png)",
        "",
        "## Sample outputs (held-out)",
        "",
    ]
    for s in samples:
        lines += [
            "```",
            s["prompt"],
            "```",
            f"- reference: `{s['reference']}`",
            f"- zero-shot: `{s['zero_shot'][:200]!r}`",
            f"- few-shot: `{s['few_shot'][:200]!r}`",
            f"- fine-tuned: `{s['fine_tuned'][:200]!r}`",
            "",
        ]
    return "\n".join(lines)
