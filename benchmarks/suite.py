"""Run the benchmark suites, write tables, plots and summary.json (from a source checkout).

    .venv/bin/python -m benchmarks.suite --suite cpu|methods|gpu [--out DIR] [--rounds N] [--layer-threads N]

* ``cpu`` (about 10 minutes on 2 cores): machine peaks, the layer suite (CPU subset), the
  memory suite, the end-to-end SFT step (ours vs TRL + PEFT (+ bitsandbytes)), the quick dequant
  benchmark; then plots and ``summary.json``.
* ``methods`` (about 25 minutes on 2 cores): the lecture's method comparison on the expense task
  (`benchmarks.sft.run_methods_suite`); writes methods.{json,md} and accuracy_vs_params.png.
* ``gpu``: the layer and memory suites and the SFT step on CUDA (the kernel check and the GPU
  timings with the card's peaks are `benchmarks/gpu_check.py`).

summary.json holds one row per performance target (see benchmarks/README.md):
``{"name", "ours", "baseline", "unit", "ratio", "target", "met"}`` (plus an optional "note");
``ratio`` is always "higher is better for us" and a target this machine cannot measure (the
GPU ones on a CPU) has ``met = null`` and says why.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, machine_name, machine_peaks, markdown_table, run_metadata, write_report
from benchmarks.memory import bytes_per_param, run_memory_suite
from benchmarks.run_layers import LAYER_COLUMNS, run_layer_suite
from qlora_kernels.cli import non_negative_int, positive_int

SUMMARY_KEYS = ("name", "ours", "baseline", "unit", "ratio", "target", "met")
NO_GPU_NOTE = "not measured: needs a CUDA GPU"
GPU_TARGETS = (
    "gpu: fused NF4/int4 forward at M <= 16 >= 3x faster than bf16 F.linear + LoRA",
    "gpu: fused NF4/int4 forward at M <= 16 >= 2x faster than bitsandbytes + PEFT",
    "gpu: fwd+bwd at M >= 4096 within 1.1x of bf16 F.linear + LoRA",
    "gpu: fwd+bwd at M >= 4096 >= 1.3x faster than bitsandbytes + PEFT",
)
E2E_PAIR = ("ours qlora nf4", "trl+peft+bnb nf4")  # the CPU SFT target: QLoRA vs QLoRA
E2E_OWN_LORA = "ours lora bf16"  # QLoRA's speed against our own LoRA on a bf16 base
E2E_TARGETS = {"vs own lora": 0.9, "vs trl+peft+bnb": 1.8}
SUMMARY_COLUMNS = [
    ("name", "target"),
    ("ours", "ours"),
    ("baseline", "baseline"),
    ("unit", "unit"),
    ("ratio", "ratio (>1: ours better)"),
    ("met", "met"),
    ("note", "note"),
]


def _geomean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.geometric_mean(values) if values else float("nan")


def target_row(
    name: str,
    ours: float | None,
    baseline: float | None,
    unit: str,
    target: str,
    *,
    higher_is_better: bool,
    threshold: float = 1.0,
    strict: bool = True,
    note: str | None = None,
) -> dict[str, Any]:
    """A summary row; ratio = baseline/ours for times and memory, ours/baseline for rates (so > 1 favours us)."""
    if ours is None or baseline is None or not ours or not baseline:
        return {
            "name": name,
            "ours": ours,
            "baseline": baseline,
            "unit": unit,
            "ratio": None,
            "target": target,
            "met": None,
            "note": note or "not measured",
        }
    ratio = ours / baseline if higher_is_better else baseline / ours
    row = {
        "name": name,
        "ours": ours,
        "baseline": baseline,
        "unit": unit,
        "ratio": ratio,
        "target": target,
        "met": bool(ratio > threshold if strict else ratio >= threshold),
    }
    if note:
        row["note"] = note
    return row


def cpu_targets(layer_rows: list[dict], memory_rows: list[dict], e2e_rows: list[dict]) -> list[dict[str, Any]]:
    """The CPU performance targets (layer fwd+bwd and SFT step: faster than bnb + PEFT / TRL, no more peak memory)."""
    rows = []
    fb = [r for r in layer_rows if r.get("mode") == "fwd+bwd" and "bnb+peft_ms" in r and "ours_ms" in r]
    if fb:
        ratios = [r["bnb+peft_ms"] / r["ours_ms"] for r in fb]
        worst = min(fb, key=lambda r: r["bnb+peft_ms"] / r["ours_ms"])
        note = (
            f"faster in {sum(x > 1 for x in ratios)}/{len(ratios)} cases; worst {worst['case']} "
            f"x{worst['bnb+peft_ms'] / worst['ours_ms']:.2f}"
        )
    else:
        note = "bitsandbytes + PEFT not installed (peers extra)"
    rows.append(
        target_row(
            "cpu: QLoRA NF4 layer fwd+bwd vs bitsandbytes Linear4bit + PEFT (geomean over shapes and M)",
            _geomean(r["ours_ms"] for r in fb) if fb else None,
            _geomean(r["bnb+peft_ms"] for r in fb) if fb else None,
            "ms",
            "> 1 (faster than bitsandbytes + PEFT)",
            higher_is_better=False,
            note=note,
        )
    )
    mem = {r["provider"]: r for r in memory_rows if "step_peak_mb" in r or "peak_mb" in r}
    key = "step_peak_mb"
    ours_m, theirs_m = mem.get("ours", {}), mem.get("bnb+peft", {})
    rows.append(
        target_row(
            "cpu: peak RSS of one training step, 8 NF4 LoRA layers 2048x2048, 256 tokens",
            ours_m.get(key, ours_m.get("peak_mb")),
            theirs_m.get(key, theirs_m.get("peak_mb")),
            "MB",
            ">= 1 (no more peak memory than bitsandbytes + PEFT)",
            higher_is_better=False,
            strict=False,
            note=(
                f"step adds {ours_m['step_extra_mb']:.0f} MB (ours) vs {theirs_m['step_extra_mb']:.0f} MB (bnb+PEFT)"
                if "step_extra_mb" in ours_m and "step_extra_mb" in theirs_m
                else None
            ),
        )
    )
    e2e = {r["label"]: r for r in e2e_rows if "tokens_per_s" in r}
    ours_e, theirs_e = e2e.get(E2E_PAIR[0], {}), e2e.get(E2E_PAIR[1], {})
    failed = {r["label"]: r["error"] for r in e2e_rows if "error" in r}
    shape = (
        f"batch {ours_e.get('batch_size')}, max_length {ours_e.get('max_length')}, "
        f"{ours_e.get('measured_steps')} timed steps after {ours_e.get('warmup_steps')} warm-up"
        if ours_e
        else None
    )
    precision = f"; ours at {ours_e['precision']}" if ours_e.get("precision") else ""
    rows.append(
        target_row(
            "cpu: SFT step tokens/s, SmolLM2-135M QLoRA NF4 r16: our trainer vs TRL SFTTrainer + PEFT + bitsandbytes",
            ours_e.get("tokens_per_s"),
            theirs_e.get("tokens_per_s"),
            "tokens/s",
            f">= {E2E_TARGETS['vs trl+peft+bnb']} (faster than TRL + PEFT + bitsandbytes)",
            higher_is_better=True,
            threshold=E2E_TARGETS["vs trl+peft+bnb"],
            strict=False,
            note=(shape + precision) if shape else (f"failed: {failed}" if failed else None),
        )
    )
    own = e2e.get(E2E_OWN_LORA, {})
    rows.append(
        target_row(
            "cpu: SFT step tokens/s, our QLoRA NF4 r16 vs our own LoRA r16 on a bf16 base (the cost of the 4-bit base)",
            ours_e.get("tokens_per_s"),
            own.get("tokens_per_s"),
            "tokens/s",
            f">= {E2E_TARGETS['vs own lora']} (QLoRA nearly as fast as dense LoRA)",
            higher_is_better=True,
            threshold=E2E_TARGETS["vs own lora"],
            strict=False,
            note=(shape + precision) if shape else (f"failed: {failed}" if failed else None),
        )
    )
    rows.append(
        target_row(
            "cpu: SFT peak RSS during training, same runs",
            ours_e.get("train_peak_rss_mb"),
            theirs_e.get("train_peak_rss_mb"),
            "MB",
            ">= 1 (no more peak memory than TRL + PEFT + bitsandbytes)",
            higher_is_better=False,
            strict=False,
            note=(
                f"process peaks incl. model load: {ours_e['peak_rss_mb']:.0f} vs {theirs_e['peak_rss_mb']:.0f} MB"
                if ours_e and theirs_e
                else None
            ),
        )
    )
    return rows


def gpu_rows(note: str = NO_GPU_NOTE, results: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """The GPU targets as the committed GPU checks measured them (every
    `results/<gpu>/gpu_check.json`, from `python -m benchmarks.gpu_check --all`); the
    placeholders when none is committed. ours and ratio are the check's geometric means."""
    rows = []
    for path in sorted(results.glob("*/gpu_check.json")):
        report = json.loads(path.read_text())
        device = report.get("environment", {}).get("device", path.parent.name)
        for t in report.get("targets", []):
            if t.get("ours") is None:
                worst = "not measured"
            elif t.get("baseline") is not None:
                worst = f"ours {t['ours']:.4g} vs {t['baseline']:.4g} {t['unit']}"
            else:
                worst = f"worst case {t['ours']:.3g} {t['unit']}"
            rows.append({
                "name": f"gpu: {t['name']}",
                "ours": t.get("ratio"),
                "baseline": None,
                "unit": "ratio" if t["unit"] != "%" else "%",
                "ratio": t.get("ratio"),
                "target": f"threshold {t['target']}",
                "met": t.get("met"),
                "note": f"{device}, {path.parent.name}/gpu_check.json: {worst}; {t.get('note', '')}",
            })  # fmt: skip
    return rows or gpu_placeholder_rows(note)


def gpu_placeholder_rows(note: str = NO_GPU_NOTE) -> list[dict[str, Any]]:
    """The GPU targets with met = null: this machine cannot measure them."""
    return [
        target_row(name, None, None, "ms", name.removeprefix("gpu: "), higher_is_better=False, note=note)
        for name in GPU_TARGETS
    ]


def write_summary(rows: list[dict[str, Any]], out_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """summary.json ({"meta", "targets": rows}) and summary.md; every row must carry SUMMARY_KEYS."""
    for row in rows:
        missing = [k for k in SUMMARY_KEYS if k not in row]
        if missing:
            raise ValueError(f"summary row {row.get('name')!r} lacks {missing}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    path.write_text(json.dumps({"meta": run_metadata(), **(extra or {}), "targets": rows}, indent=2) + "\n")
    (out_dir / "summary.md").write_text(markdown_table(rows, SUMMARY_COLUMNS) + "\n")
    return path


# --------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layers(rows: list[dict], out_dir: Path) -> None:
    """Time vs M per provider, one line per (shape, provider), NF4; forward and forward+backward."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"ours": "tab:blue", "bf16+lora": "tab:orange", "bnb+peft": "tab:green"}
    markers = ["o", "s", "^", "D"]
    shapes = sorted({(r["k"], r["n"]) for r in rows})
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for provider, color in colors.items():
            for shape, marker in zip(shapes, markers, strict=False):
                pts = sorted(
                    (r["m"], r[f"{provider}_ms"])
                    for r in rows
                    if r["mode"] == mode and (r["k"], r["n"]) == shape and r["fmt"] == "nf4" and f"{provider}_ms" in r
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True), marker=marker, color=color, label=f"{provider} {shape[0]}x{shape[1]}"
                    )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="M (tokens)",
            ylabel="ms (fastest round)",
            title=f"NF4 LoRA layer, {mode}",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "layers_time_vs_m.png", dpi=120)
    plt.close(fig)


def plot_memory(memory_rows: list[dict], e2e_rows: list[dict], out_dir: Path) -> None:
    """Peak RSS bars: the 8-layer stack's training step, and the SmolLM2 SFT runs."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ok = [r for r in memory_rows if "step_peak_mb" in r]
    axes[0].bar([r["provider"] for r in ok], [r["step_peak_mb"] for r in ok], color="tab:blue", label="step peak")
    axes[0].bar(
        [r["provider"] for r in ok], [r["rss_before_step_mb"] for r in ok], color="tab:gray", label="before step"
    )
    axes[0].set(ylabel="RSS MB", title="one training step, 8 NF4 LoRA layers 2048x2048")
    axes[0].legend(fontsize=7)
    e2e = [r for r in e2e_rows if "train_peak_rss_mb" in r]
    axes[1].barh([r["label"] for r in e2e], [r["train_peak_rss_mb"] for r in e2e])
    axes[1].set(xlabel="peak RSS during training, MB", title="SmolLM2-135M SFT, batch 8")
    axes[1].tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "memory_bars.png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------- suites
def _gpu_note(device: torch.device) -> str:
    return NO_GPU_NOTE if device.type != "cuda" else "measured by benchmarks/gpu_check.py on this card"


def run_cpu_like(
    device: torch.device,
    out_dir: Path,
    rounds: int = 5,
    e2e: bool = True,
    dequant: bool = True,
    layer_threads: int = 0,
) -> Path:
    """Layer, memory, SFT-step and dequant suites on `device`; tables, plots and summary.json into `out_dir`.

    layer_threads > 0 runs the machine peaks and the layer suite with that many torch threads
    (1 is the robust per-core figure on a shared machine: a single thread never waits for a
    descheduled partner at a barrier); the SFT runs always use torch's default.
    """
    from benchmarks import sft

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[bench] load average {os.getloadavg()[0]:.2f}; results into {out_dir}", flush=True)

    default_threads = torch.get_num_threads()
    if layer_threads:
        torch.set_num_threads(layer_threads)
    peaks = {**machine_peaks(device), "threads": torch.get_num_threads()}
    print(f"[bench] peaks: {peaks}", flush=True)
    layer_rows = run_layer_suite(device, rounds=rounds, peaks=peaks)
    layer_meta = {"peaks": peaks, "threads": torch.get_num_threads()}
    torch.set_num_threads(default_threads)
    write_report("layers", layer_rows, markdown_table(layer_rows, LAYER_COLUMNS), out_dir, extra=layer_meta)
    plot_layers(layer_rows, out_dir)
    timings["layers_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    memory_rows = run_memory_suite()
    bpp = bytes_per_param()
    write_report(
        "memory",
        memory_rows + bpp,
        markdown_table(
            memory_rows,
            [
                ("provider", "provider"),
                ("step_peak_mb", "step peak RSS MB"),
                ("rss_before_step_mb", "RSS before step MB"),
                ("step_extra_mb", "step adds MB"),
                ("peak_mb", "process peak MB"),
            ],
        )
        + "\n\n"
        + markdown_table(bpp, [("format", "format"), ("bits_per_param", "bits / param")]),
        out_dir,
    )
    timings["memory_s"] = time.perf_counter() - t

    e2e_rows: list[dict] = []
    if e2e:
        t = time.perf_counter()
        e2e_rows = sft.run_e2e_suite()
        write_report("e2e", e2e_rows, markdown_table(e2e_rows, sft.E2E_COLUMNS), out_dir)
        sft.plot_e2e(e2e_rows, out_dir / "e2e.png")
        timings["e2e_s"] = time.perf_counter() - t
    plot_memory(memory_rows, e2e_rows, out_dir)

    if dequant and device.type == "cpu":
        t = time.perf_counter()
        run_dequant_quick(out_dir)
        timings["dequant_s"] = time.perf_counter() - t

    methods_json = out_dir / "methods.json"
    if methods_json.is_file():  # the methods suite's committed results: re-plot accuracy vs parameters
        sft.plot_accuracy_vs_params(json.loads(methods_json.read_text())["rows"], out_dir / "accuracy_vs_params.png")

    timings["total_s"] = time.perf_counter() - t0
    summary = cpu_targets(layer_rows, memory_rows, e2e_rows) + gpu_rows(_gpu_note(device))
    write_summary(summary, out_dir, extra={"suite_seconds": timings, "peaks": peaks})
    print(markdown_table(summary, SUMMARY_COLUMNS))
    print(f"[bench] done in {timings['total_s']:.0f}s: {timings}")
    return out_dir


def run_dequant_quick(out_dir: Path) -> None:
    """The dequant benchmark's quick mode (SmolLM2 shape) into dequant_quick.{json,md}; full results: dequant_cpu.md."""
    from benchmarks import bench_dequant_cpu
    from qlora_kernels.ops import native

    if not native.native_available():
        print(f"[bench] dequant skipped: native extension unavailable ({native.native_status().error})")
        return
    result = bench_dequant_cpu.run(quick=True)
    (out_dir / "dequant_quick.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "dequant_quick.md").write_text(bench_dequant_cpu.to_markdown(result))


def run_methods(
    out_dir: Path, steps: int | None = None, eval_n: int | None = None, only: list[str] | None = None
) -> Path:
    """The lecture's method comparison; methods.{json,md} and accuracy_vs_params.png into `out_dir`.

    only: labels of METHOD_RUNS to rerun; their rows replace those of the existing methods.json
    (same budget), the others are kept and the rerun is recorded in "reruns".
    """
    from benchmarks import methods_report, sft

    budget = {k: v for k, v in (("steps", steps), ("eval_n", eval_n)) if v}
    t0 = time.perf_counter()
    runs = [r for r in sft.METHOD_RUNS if not only or r[0] in only]
    if only and len(runs) != len(only):
        raise SystemExit(f"--only: unknown label(s); known: {[r[0] for r in sft.METHOD_RUNS]}")
    rows = sft.run_methods_suite(runs, **budget)
    settings = {**sft.METHODS, **budget}
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"meta": run_metadata(), "settings": settings, "seconds": time.perf_counter() - t0, "rows": rows}
    if only:
        previous = json.loads((out_dir / "methods.json").read_text())
        fresh = {r["label"]: r for r in rows}
        rows = [fresh.get(r["label"], r) for r in previous["rows"]]
        rows += [r for label, r in fresh.items() if label not in {p["label"] for p in previous["rows"]}]
        reruns = previous.get("reruns", []) + [{"labels": only, "date": payload["meta"]["date"]}]
        payload = {**previous, "rows": rows, "reruns": reruns, "seconds": previous["seconds"] + payload["seconds"]}
    (out_dir / "methods.json").write_text(json.dumps(payload, indent=2) + "\n")
    methods_report.write_markdown(payload, out_dir / "methods.md")
    sft.plot_accuracy_vs_params(rows, out_dir / "accuracy_vs_params.png")
    print((out_dir / "methods.md").read_text())
    return out_dir


def run(
    suite: str, out_dir: Path | None = None, rounds: int = 5, layer_threads: int = 0, only: list[str] | None = None
) -> Path:
    """Run one suite; returns the result folder."""
    if suite == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--suite gpu needs a CUDA GPU; use --suite cpu here (or benchmarks/gpu_check.py)")
    out_dir = out_dir or RESULTS_DIR / machine_name()
    if suite == "methods":
        return run_methods(out_dir, only=only)
    return run_cpu_like(torch.device("cuda" if suite == "gpu" else "cpu"), out_dir, rounds, layer_threads=layer_threads)


def check_out_dir(parser: argparse.ArgumentParser, out: Path | None) -> None:
    """parser.error (exit 2) unless `out` is, or can become, a folder this user can write."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--out {out} cannot be created or written ({existing} is not a writable folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", choices=("cpu", "methods", "gpu"), default="cpu", help="default: cpu")
    parser.add_argument(
        "--out", type=Path, default=None, help="result folder (default benchmarks/results/<machine kind or GPU name>)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=5, help="interleaved timing rounds per layer case (default 5)"
    )
    parser.add_argument(
        "--layer-threads",
        type=non_negative_int,
        default=0,
        help="torch threads for the layer suite (default 0: torch's default; 1: robust on a busy machine)",
    )
    parser.add_argument(
        "--only", action="append", default=None, metavar="LABEL", help="methods suite: rerun these methods only"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_out_dir(parser, args.out)
    print(run(args.suite, args.out, args.rounds, args.layer_threads, args.only))
    return 0


if __name__ == "__main__":
    if os.environ.get("OMP_WAIT_POLICY") is None:  # same as the CLI: passive OpenMP waits on a shared machine
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.suite", *sys.argv[1:]])
    raise SystemExit(main())
