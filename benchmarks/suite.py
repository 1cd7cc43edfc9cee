"""`qlora-kernels bench --suite cpu|gpu`: run the suites, write tables, plots and summary.json.

summary.json holds one row per target of the benchmark issue:
{"name", "ours", "baseline", "unit", "ratio", "target", "met"}; a target that this machine
cannot measure (the GPU ones on a CPU) is listed with met = null and the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, machine_name, markdown_table, run_metadata, write_report
from benchmarks.memory import bytes_per_param, run_memory_suite
from benchmarks.run_layers import run_layer_suite

LAYER_COLUMNS = [
    ("case", "case"),
    ("ours_ms", "ours ms"),
    ("bf16+lora_ms", "bf16+LoRA ms"),
    ("bnb+peft_ms", "bnb+PEFT ms"),
    ("speedup_vs_bf16+lora", "x vs bf16"),
    ("speedup_vs_bnb+peft", "x vs bnb"),
]


def _geomean(values: list[float]) -> float:
    return statistics.geometric_mean(values) if values else float("nan")


def cpu_targets(layer_rows: list[dict], memory_rows: list[dict]) -> list[dict]:
    """Rows for the CPU targets: layer fwd+bwd speed and peak memory vs bitsandbytes + PEFT."""
    rows = []
    fb = [r for r in layer_rows if r["mode"] == "fwd+bwd" and "bnb+peft_ms" in r]
    if fb:
        ours = _geomean([r["ours_ms"] for r in fb])
        theirs = _geomean([r["bnb+peft_ms"] for r in fb])
        rows.append(
            {
                "name": "cpu: QLoRA NF4 layer fwd+bwd, geomean over shapes and M",
                "ours": ours,
                "baseline": theirs,
                "unit": "ms",
                "ratio": theirs / ours,
                "target": "> 1 (faster than bitsandbytes + PEFT)",
                "met": theirs / ours > 1,
            }
        )
    mem = {r["provider"]: r for r in memory_rows if "peak_mb" in r}
    if "ours" in mem and "bnb+peft" in mem:
        ours, theirs = mem["ours"]["peak_mb"], mem["bnb+peft"]["peak_mb"]
        rows.append(
            {
                "name": "cpu: peak RSS of one training step, 8 NF4 LoRA layers 2048x2048, 256 tokens",
                "ours": ours,
                "baseline": theirs,
                "unit": "MB",
                "ratio": theirs / ours,
                "target": ">= 1 (no more peak memory than bitsandbytes + PEFT)",
                "met": ours <= theirs,
            }
        )
    for name in (
        "gpu: fused NF4/int4 forward at M <= 16 >= 3x bf16 F.linear + LoRA",
        "gpu: fused NF4/int4 forward at M <= 16 >= 2x bitsandbytes + PEFT",
        "gpu: fwd+bwd at M >= 4096 within 1.1x of bf16 LoRA",
        "gpu: fwd+bwd at M >= 4096 >= 1.3x faster than bitsandbytes + PEFT",
    ):
        rows.append(
            {
                "name": name,
                "ours": None,
                "baseline": None,
                "unit": "ms",
                "ratio": None,
                "target": name,
                "met": None,
                "note": "no GPU was lent for this run",
            }
        )
    return rows


def plot_layers(rows: list[dict], out_dir: Path) -> None:
    """time vs M per provider, one line per (shape, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for provider, style in (("ours", "-o"), ("bf16+lora", "--s"), ("bnb+peft", ":^")):
            for shape in sorted({(r["k"], r["n"]) for r in rows}):
                pts = [
                    (r["m"], r[f"{provider}_ms"])
                    for r in rows
                    if r["mode"] == mode and (r["k"], r["n"]) == shape and r["fmt"] == "nf4" and f"{provider}_ms" in r
                ]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{provider} {shape[0]}x{shape[1]}")
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="ms", title=f"NF4 LoRA layer, {mode}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "layers_time_vs_m.png", dpi=120)
    plt.close(fig)


def plot_memory(rows: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "peak_mb" in r]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([r["provider"] for r in ok], [r["peak_mb"] for r in ok])
    ax.set(ylabel="peak MB", title="one training step, 8 LoRA layers 2048x2048")
    fig.tight_layout()
    fig.savefig(out_dir / "memory_bars.png", dpi=120)
    plt.close(fig)


def run(suite: str, out_dir: Path | None = None, repeat: int = 5) -> Path:
    device = torch.device("cuda" if suite == "gpu" else "cpu")
    if suite == "gpu" and not torch.cuda.is_available():
        raise SystemExit("bench --suite gpu needs a CUDA GPU; use --suite cpu here")
    out_dir = out_dir or RESULTS_DIR / machine_name()
    layer_rows = run_layer_suite(device, repeat=repeat)
    write_report("layers", layer_rows, markdown_table(layer_rows, LAYER_COLUMNS), out_dir)
    memory_rows = run_memory_suite()
    bpp = bytes_per_param()
    write_report(
        "memory",
        memory_rows + bpp,
        markdown_table(
            memory_rows, [("provider", "provider"), ("peak_mb", "peak MB"), ("after_load_mb", "after load MB")]
        )
        + "\n\n"
        + markdown_table(bpp, [("format", "format"), ("bits_per_param", "bits / param")]),
        out_dir,
    )
    plot_layers(layer_rows, out_dir)
    plot_memory(memory_rows, out_dir)
    summary = cpu_targets(layer_rows, memory_rows)
    (out_dir / "summary.json").write_text(json.dumps({"meta": run_metadata(), "targets": summary}, indent=2) + "\n")
    print(
        markdown_table(
            summary,
            [
                ("name", "target"),
                ("ours", "ours"),
                ("baseline", "baseline"),
                ("unit", "unit"),
                ("ratio", "ratio"),
                ("met", "met"),
            ],
        )
    )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-kernels bench", description=__doc__)
    parser.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="result folder (default benchmarks/results/<machine>)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print(run(args.suite, args.out, args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
