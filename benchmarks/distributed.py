"""Two ranks against one on the CPU: tokens/s scaling and per-rank peak RSS of DDP and FSDP2 QLoRA.

``python -m benchmarks.distributed [--rounds 2] [--steps 5] [--quick] [--out DIR]``

SmolLM2-135M-Instruct, QLoRA NF4 r16 on all linears, bf16, the expense task (worked labels),
max_length 256, the same global batch everywhere (4 examples a step): one process with
batch 2 x grad_accum 2, or two ranks (gloo) with batch 2 each. Runs:

* ``1 rank, 1 thread``: the per-rank baseline; ``2 ranks`` / this = scaling per added rank;
* ``1 rank, 2 threads``: one process on the same two cores the two ranks use;
* ``ddp 2 ranks`` and ``fsdp 2 ranks``, one thread per rank.

Each run is a fresh launch, and the runs go in interleaved rounds (every configuration once per
round), so a busy neighbour slows all of them alike; tokens/s is the median over rounds, peak RSS
the largest. Writes ``distributed.{json,md}`` into the results folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, machine_name, markdown_table, write_report
from benchmarks.sft import REPO_ROOT, child_env

#: (label, ranks, threads per rank, distributed mode)
RUNS: list[tuple[str, int, int, str]] = [
    ("1 rank, 1 thread", 1, 1, "none"),
    ("1 rank, 2 threads", 1, 2, "none"),
    ("ddp 2 ranks x 1 thread", 2, 1, "ddp"),
    ("fsdp 2 ranks x 1 thread", 2, 1, "fsdp"),
]
GLOBAL_BATCH = 4
PER_RANK_BATCH = 2


def launch(
    label: str, ranks: int, threads: int, mode: str, steps: int, warmup: int, model: Path, data: Path
) -> dict[str, Any]:
    """One measurement in fresh processes; per-rank results merged, or {"error": ...}."""
    out = Path(tempfile.mkdtemp(prefix="qk-bench-dist-"))
    config = {
        "model": str(model),
        "method": "qlora",
        "quant": "nf4",
        "r": 16,
        "alpha": 32.0,
        "train_file": str(data),
        "max_length": 256,
        "max_steps": steps,
        "batch_size": PER_RANK_BATCH,
        "grad_accum": GLOBAL_BATCH // (PER_RANK_BATCH * ranks),
        "lr": 1e-3,
        "warmup_steps": 2,
        "dtype": "bf16",
        "model_dtype": "bf16",
        "progress": False,
        "output_dir": str(out),
        "distributed": mode,
    }
    spec = json.dumps({"config": config, "warmup": warmup})
    runner = [sys.executable, "-m", "benchmarks.distributed_child"]
    if ranks > 1:
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        runner += ["-m", "benchmarks.distributed_child"]
    env = {**child_env(), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([*runner, spec], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    try:
        if done.returncode != 0:
            tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
            return {"label": label, "error": " | ".join(tail) or f"exit code {done.returncode}"}
        per_rank = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(ranks)]
        return {"label": label, "ranks": ranks, "threads": threads, "mode": mode, "per_rank": per_rank}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summarise(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"label": label, "error": runs[0]["error"]}
    per_rank = [rank for r in ok for rank in r["per_rank"]]
    return {
        "label": label,
        "ranks": ok[0]["ranks"],
        "tokens_per_s": statistics.median(r["per_rank"][0]["tokens_per_s"] for r in ok),
        "tokens_per_s_all": [round(r["per_rank"][0]["tokens_per_s"], 1) for r in ok],
        "train_peak_rss_mb": max(r["train_peak_rss_mb"] for r in per_rank),
        "process_peak_rss_mb": max(r["process_peak_rss_mb"] for r in per_rank),
        "packed_base_mb": max(r["packed_base_mb"] for r in per_rank),
        "frozen_base_mb": max(r["frozen_base_mb"] for r in per_rank),
        "rounds": len(ok),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all runs (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run; the first 2 are not timed")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 steps (a smoke run)")
    parser.add_argument("--out", type=Path, help=f"result folder (default {RESULTS_DIR}/<machine>)")
    args = parser.parse_args(argv)
    rounds, steps = (1, 3) if args.quick else (args.rounds, args.steps)
    warmup = 2 if steps > 2 else 0

    import gc

    import torch

    import qlora_kernels as qk
    from qlora_kernels.train import expenses

    work = Path(tempfile.mkdtemp(prefix="qk-bench-dist-data-"))
    train, _ = expenses.make_splits(GLOBAL_BATCH * steps * 2, 0, seed=0)
    data = expenses.write_jsonl(work / "train.jsonl", train, "worked")
    model, tokenizer = qk.load_model("smollm2-135m-instruct", dtype=torch.bfloat16)  # decode the GGUF file once
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    del model, tokenizer
    gc.collect()

    results: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in RUNS}
    try:
        for round_index in range(rounds):
            for label, ranks, threads, mode in RUNS:
                result = launch(label, ranks, threads, mode, steps, warmup, work / "model", data)
                results[label].append(result)
                print(f"round {round_index + 1}/{rounds}: {label}: {result.get('error') or 'done'}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [summarise(label, runs) for label, runs in results.items()]
    base = {r["label"]: r for r in rows if "error" not in r}
    one, one_two = base.get(RUNS[0][0]), base.get(RUNS[1][0])
    for row in rows:
        if "error" in row:
            continue
        if one:
            row["speedup_vs_1_rank_1_thread"] = row["tokens_per_s"] / one["tokens_per_s"]
            row["peak_rss_vs_1_rank"] = row["train_peak_rss_mb"] / one["train_peak_rss_mb"]
        if one_two:
            row["speedup_vs_1_rank_2_threads"] = row["tokens_per_s"] / one_two["tokens_per_s"]
    columns = [
        ("label", "run"),
        ("tokens_per_s", "tokens/s (median)"),
        ("speedup_vs_1_rank_1_thread", "vs 1 rank 1 thread"),
        ("speedup_vs_1_rank_2_threads", "vs 1 rank 2 threads"),
        ("train_peak_rss_mb", "train peak RSS / rank (MiB)"),
        ("peak_rss_vs_1_rank", "vs 1 rank"),
        ("process_peak_rss_mb", "process peak RSS / rank (MiB)"),
        ("packed_base_mb", "packed base / rank (MiB)"),
        ("frozen_base_mb", "frozen base / rank (MiB)"),
        ("error", "error"),
    ]
    table = markdown_table(rows, columns)
    spec = {"model": "smollm2-135m-instruct", "global_batch": GLOBAL_BATCH, "steps": steps, "warmup": warmup}
    folder = write_report("distributed", rows, table, args.out or RESULTS_DIR / machine_name(), {"spec": spec})
    print(table)
    print(f"wrote {folder}/distributed.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
