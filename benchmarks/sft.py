"""End-to-end SFT step benchmark and the lecture's method comparison, on SmolLM2 and the expense task.

* `run_e2e_suite`: tokens/s and peak RSS of our trainer vs TRL's `SFTTrainer` + PEFT LoRA, with
  and without bitsandbytes NF4, same data, batch, sequence length and number of steps.
* `run_methods_suite`: full SFT, partial (top-k blocks), LoRA, QLoRA NF4/int4/int8, bottleneck
  adapters and prompt tuning with our trainer, the same step budget each: trainable parameters,
  peak memory, step time, adapter size, held-out format and exact-sum accuracy.

Every run is a fresh subprocess (`benchmarks.sft_child`) so its peak RSS is its own; runs are
sequential, so they do not compete for the two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The e2e benchmark's shape: the demo's batch and sequence length, a few steps (a throughput measurement).
E2E = {"batch_size": 8, "max_length": 256, "steps": 6, "warmup_steps": 2}
#: (label, runner, spec): ours vs the peers, QLoRA NF4 first (the target), dense LoRA beside it.
#: Our QLoRA run uses the machine's compute-dtype policy (dtype auto); the dense LoRA runs and
#: the peers keep a bf16 base, as people run them.
E2E_RUNS: list[tuple[str, str, dict[str, Any]]] = [
    ("ours qlora nf4", "ours", {"method": "qlora", "quant": "nf4", "dtype": "auto", "model_dtype": "auto"}),
    ("trl+peft+bnb nf4", "trl", {"quant": "nf4"}),
    ("ours lora bf16", "ours", {"method": "lora", "quant": "none", "dtype": "bf16", "model_dtype": "bf16"}),
    ("trl+peft lora bf16", "trl", {"quant": "none"}),
]

#: The methods suite's budget: the same for every method.
METHODS = {"batch_size": 8, "max_length": 256, "steps": 20, "warmup_steps": 2, "eval_n": 20}
#: (label, spec): method, quant, LR (each method's usual LR range; recorded in the table) and extras.
METHOD_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("full SFT", {"method": "full", "quant": "none", "lr": 1e-4, "model_dtype": "fp32"}),
    (
        "partial top-2 blocks",
        {"method": "partial", "quant": "none", "lr": 3e-4, "model_dtype": "fp32", "extra": {"policy": "top_k", "k": 2}},
    ),
    ("LoRA r16 (bf16 base)", {"method": "lora", "quant": "none", "lr": 1e-3}),
    ("QLoRA NF4 r16", {"method": "qlora", "quant": "nf4", "lr": 1e-3}),
    ("QLoRA int4 r16", {"method": "qlora", "quant": "int4", "lr": 1e-3}),
    ("QLoRA int8 r16", {"method": "qlora", "quant": "int8", "lr": 1e-3}),
    ("bottleneck adapters 64", {"method": "adapter", "quant": "none", "lr": 1e-3, "extra": {"bottleneck": 64}}),
    ("prompt tuning 20 tokens", {"method": "prompt", "quant": "none", "lr": 3e-2, "extra": {"num_virtual_tokens": 20}}),
]


def child_env() -> dict[str, str]:
    """The children's environment: the repo on PYTHONPATH, passive OpenMP waits (shared 2-core machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_json_child(argv: list[str], spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``python <argv> '<spec as JSON>'`` from the repo root; its last stdout line is the JSON result.

    A failure or a timeout gives ``{**spec, "error": ...}`` instead of raising, so a suite goes on.
    """
    try:
        out = subprocess.run(
            [sys.executable, *argv, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            env=child_env(),
        )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f}s"}
    if out.returncode != 0:
        tail = [line for line in out.stderr.strip().splitlines() if line.strip()][-3:]
        return {**spec, "error": " | ".join(tail) or f"exit code {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run one SFT measurement in a fresh process (`benchmarks.sft_child`)."""
    return run_json_child(["-m", "benchmarks.sft_child"], spec, timeout)


def write_train_data(folder: Path, n_train: int = 1000) -> Path:
    """The expense task's training split (worked labels), the one the demo trains on."""
    from qlora_kernels.train import expenses

    train, _ = expenses.make_splits(n_train, 40, seed=0)
    return expenses.write_jsonl(folder / "train.jsonl", train, "worked")


def run_e2e_suite(runs: list[tuple[str, str, dict[str, Any]]] | None = None, **shape: Any) -> list[dict[str, Any]]:
    """Our trainer vs TRL + PEFT (+ bitsandbytes), one subprocess each; rows with tokens/s and peaks."""
    settings = {**E2E, **shape}
    rows = []
    with tempfile.TemporaryDirectory(prefix="qk-bench-e2e-") as tmp:
        train_file = write_train_data(Path(tmp))
        for i, (label, runner, spec) in enumerate(runs or E2E_RUNS):
            row = run_child(
                {
                    "label": label,
                    "runner": runner,
                    **settings,
                    **spec,
                    "train_file": str(train_file),
                    "output_dir": str(Path(tmp) / f"run{i}"),
                }
            )
            print(_progress(row), flush=True)
            rows.append(row)
    return rows


def run_methods_suite(runs: list[tuple[str, dict[str, Any]]] | None = None, **budget: Any) -> list[dict[str, Any]]:
    """Every fine-tuning method with our trainer, the same step budget; held-out scores included."""
    settings = {**METHODS, **budget}
    rows = []
    with tempfile.TemporaryDirectory(prefix="qk-bench-methods-") as tmp:
        train_file = write_train_data(Path(tmp))
        for i, (label, spec) in enumerate(runs or METHOD_RUNS):
            row = run_child(
                {
                    "label": label,
                    "runner": "ours",
                    **settings,
                    **spec,
                    "train_file": str(train_file),
                    "output_dir": str(Path(tmp) / f"run{i}"),
                },
                timeout=1200,
            )
            print(_progress(row), flush=True)
            rows.append(row)
    return rows


def _progress(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['label']:<26} error: {row['error']}"
    text = (
        f"{row['label']:<26} {row['tokens_per_s']:7.0f} tok/s  {row['step_seconds']:6.2f} s/step  "
        f"train peak {row['train_peak_rss_mb']:6.0f} MB  process peak {row['peak_rss_mb']:6.0f} MB"
    )
    if "exact" in row:
        text += f"  format {row['format']:.0%} exact {row['exact']:.0%}"
    return text


E2E_COLUMNS = [
    ("label", "run"),
    ("tokens_per_s", "tokens/s"),
    ("step_seconds", "s / step"),
    ("tokens_per_step", "tokens / step"),
    ("train_peak_rss_mb", "train peak RSS MB"),
    ("peak_rss_mb", "process peak RSS MB"),
    ("trainable_params", "trainable params"),
    ("final_loss", "loss at last step"),
]

METHOD_COLUMNS = [
    ("label", "method"),
    ("lr", "LR"),
    ("trainable_params", "trainable params"),
    ("train_peak_rss_mb", "train peak RSS MB"),
    ("peak_rss_mb", "process peak RSS MB"),
    ("step_seconds", "s / step"),
    ("adapter_bytes", "adapter bytes"),
    ("final_loss", "loss at last step"),
    ("format", "format"),
    ("exact", "exact sum"),
]


def plot_accuracy_vs_params(rows: list[dict[str, Any]], out: Path) -> None:
    """Held-out format and exact-sum accuracy against trainable parameters (log x), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "exact" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter([r["trainable_params"] for r in ok], [r["format"] for r in ok], marker="s", label="format")
    ax.scatter([r["trainable_params"] for r in ok], [r["exact"] for r in ok], marker="o", label="exact sum")
    for r in ok:
        ax.annotate(
            r["label"], (r["trainable_params"], r["exact"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="held-out fraction", ylim=(-0.05, 1.05))
    ax.set_title(f"SmolLM2-135M, expense task, {ok[0]['steps'] if ok else '?'} steps each", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_e2e(rows: list[dict[str, Any]], out: Path) -> None:
    """Tokens/s and training peak RSS per runner, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "tokens_per_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [r["label"] for r in ok]
    axes[0].barh(labels, [r["tokens_per_s"] for r in ok])
    axes[0].set(xlabel="tokens / s (higher is better)")
    axes[1].barh(labels, [r["train_peak_rss_mb"] for r in ok])
    axes[1].set(xlabel="peak RSS during training, MB (lower is better)")
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.suptitle("SFT step, SmolLM2-135M, expense task, batch 8", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
