"""Layer suite as a script: times every provider on every case, writes JSON + markdown.

    python -m benchmarks.run_layers [--formats nf4,int4,int8] [--rounds 5]

Providers of one case are timed in interleaved rounds (`fastest_interleaved`), so the ratios
compare timings taken side by side in the same run; the fastest round is reported (a busy
neighbour only ever adds time), the median round beside it.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import fastest_interleaved, machine_peaks, markdown_table, write_report
from benchmarks.layers import PROVIDERS, RANK, LayerCase

# CPU-sized subset of the GPU grid's shapes: SmolLM2's MLP projections and one Llama-sized square;
# M up to an SFT micro-batch (batch 8 x ~200 tokens ~ 1600 tokens) on the small shapes.
CPU_SHAPES = [(576, 1536), (1536, 576), (2048, 2048)]
CPU_MS = [1, 16, 256, 1024]
CPU_MAX_MK = 1024 * 1536  # skip M x K beyond this on the CPU (the 2048-wide square stops at M=256)
GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (576, 1536)]
GPU_MS = [1, 16, 64, 256, 1024, 4096, 8192]
PROVIDER_NAMES = tuple(PROVIDERS)

LAYER_COLUMNS = [
    ("case", "case"),
    ("ours_ms", "ours ms"),
    ("bf16+lora_ms", "bf16+LoRA ms"),
    ("bnb+peft_ms", "bnb+PEFT ms"),
    ("speedup_vs_bf16+lora", "x vs bf16+LoRA"),
    ("speedup_vs_bnb+peft", "x vs bnb+PEFT"),
    ("ours_gflop_s", "ours GFLOP/s"),
    ("ours_pct_peak_flops", "% peak fp32 matmul"),
    ("ours_weight_gb_s", "ours weight GB/s"),
    ("ours_weight_bytes", "weight bytes"),
]


def cases(device: torch.device, formats: tuple[str, ...] = ("nf4", "int4", "int8")) -> list[LayerCase]:
    """Every (format, shape, M, mode) measured on `device`: the full grid on CUDA, a subset on the CPU."""
    if device.type == "cuda":
        shapes, ms, max_mk = GPU_SHAPES, GPU_MS, None
    else:
        shapes, ms, max_mk = CPU_SHAPES, CPU_MS, CPU_MAX_MK
    return [
        LayerCase(k, n, m, fmt, mode)
        for fmt in formats
        for (k, n) in shapes
        for m in ms
        if max_mk is None or m * k <= max_mk
        for mode in ("fwd", "fwd+bwd")
    ]


def case_flops(case: LayerCase) -> int:
    """Useful FLOPs: base matmul (x2 for backward's dX) plus the LoRA products (fwd 2, bwd 4)."""
    base = 2 * case.m * case.k * case.n
    lora = 2 * case.m * RANK * (case.k + case.n)
    return base + lora if case.mode == "fwd" else 2 * base + 3 * lora


def run_layer_suite(
    device: torch.device,
    formats: tuple[str, ...] = ("nf4", "int4", "int8"),
    rounds: int = 5,
    peaks: dict[str, float] | None = None,
    case_list: list[LayerCase] | None = None,
) -> list[dict]:
    """One row per case: each provider's fastest and median round (ms), speed-ups, GFLOP/s, GB/s of weights."""
    rows = []
    for case in case_list or cases(device, formats):
        row: dict = {"case": case.name, "fmt": case.fmt, "k": case.k, "n": case.n, "m": case.m, "mode": case.mode}
        fns = {}
        for provider, build in PROVIDERS.items():
            built = build(case, device)
            if built is None:
                continue
            fns[provider], row[f"{provider}_weight_bytes"] = built
        times = fastest_interleaved(fns, rounds=rounds)
        for provider, t in times.items():
            row[f"{provider}_ms"] = t["min_ms"]
            row[f"{provider}_median_ms"] = t["median_ms"]
        for baseline in ("bf16+lora", "bnb+peft"):
            if f"{baseline}_ms" in row:
                row[f"speedup_vs_{baseline}"] = row[f"{baseline}_ms"] / row["ours_ms"]
        row["ours_gflop_s"] = case_flops(case) / (row["ours_ms"] * 1e6)
        # weight bytes read: once in forward, twice in forward+backward (decoded again for dX)
        reads = 1 if case.mode == "fwd" else 2
        row["ours_weight_gb_s"] = reads * row["ours_weight_bytes"] / (row["ours_ms"] * 1e6)
        if peaks:
            row["ours_pct_peak_flops"] = 100 * row["ours_gflop_s"] / peaks["matmul_fp32_gflop_s"]
        rows.append(row)
        del fns
        print(
            f"{case.name:<36} ours {row['ours_ms']:8.3f} ms  bf16 {row['bf16+lora_ms']:8.3f} ms"
            + (f"  bnb {row['bnb+peft_ms']:8.3f} ms" if "bnb+peft_ms" in row else ""),
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="nf4,int4,int8")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peaks = machine_peaks(device)
    rows = run_layer_suite(device, tuple(args.formats.split(",")), args.rounds, peaks)
    print(write_report("layers", rows, markdown_table(rows, LAYER_COLUMNS), extra={"peaks": peaks}))


if __name__ == "__main__":
    main()
