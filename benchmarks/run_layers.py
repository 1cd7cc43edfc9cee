"""Layer suite as a script: times every provider on every case, writes JSON + markdown + summary rows."""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import markdown_table, time_median, write_report
from benchmarks.layers import PROVIDERS, LayerCase

# CPU-sized subset of the issue's shapes: SmolLM2's projections and one Llama-sized square.
CPU_SHAPES = [(576, 1536), (1536, 576), (2048, 2048)]
CPU_MS = [1, 16, 256]
GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (576, 1536)]
GPU_MS = [1, 16, 64, 256, 1024, 4096, 8192]


def cases(device: torch.device, formats=("nf4", "int4", "int8")) -> list[LayerCase]:
    shapes, ms = (GPU_SHAPES, GPU_MS) if device.type == "cuda" else (CPU_SHAPES, CPU_MS)
    return [
        LayerCase(k, n, m, fmt, mode) for fmt in formats for (k, n) in shapes for m in ms for mode in ("fwd", "fwd+bwd")
    ]


def run_layer_suite(device: torch.device, formats=("nf4", "int4", "int8"), repeat: int = 5) -> list[dict]:
    rows = []
    for case in cases(device, formats):
        row = {"case": case.name, "fmt": case.fmt, "k": case.k, "n": case.n, "m": case.m, "mode": case.mode}
        for provider, build in PROVIDERS.items():
            built = build(case, device)
            if built is None:
                continue
            fn, nbytes = built
            row[f"{provider}_ms"] = time_median(fn, warmup=2, repeat=repeat)["median_ms"]
            row[f"{provider}_weight_bytes"] = nbytes
        for baseline in ("bf16+lora", "bnb+peft"):
            if f"{baseline}_ms" in row:
                row[f"speedup_vs_{baseline}"] = row[f"{baseline}_ms"] / row["ours_ms"]
        flops = 2 * case.m * case.k * case.n * (1 if case.mode == "fwd" else 2)
        row["ours_gflops"] = flops / (row["ours_ms"] * 1e6)
        rows.append(row)
        print(
            f"{case.name:<36} ours {row['ours_ms']:8.3f} ms  bf16 {row['bf16+lora_ms']:8.3f} ms"
            + (f"  bnb {row['bnb+peft_ms']:8.3f} ms" if "bnb+peft_ms" in row else "")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--formats", default="nf4,int4,int8")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_layer_suite(device, tuple(args.formats.split(",")), args.repeat)
    table = markdown_table(
        rows,
        [
            ("case", "case"),
            ("ours_ms", "ours ms"),
            ("bf16+lora_ms", "bf16+LoRA ms"),
            ("bnb+peft_ms", "bnb+PEFT ms"),
            ("speedup_vs_bf16+lora", "x vs bf16"),
            ("speedup_vs_bnb+peft", "x vs bnb"),
            ("ours_weight_bytes", "weight bytes"),
        ],
    )
    print(write_report("layers", rows, table))


if __name__ == "__main__":
    main()
