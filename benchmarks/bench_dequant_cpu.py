"""CPU dequantization throughput: native C++ vs the PyTorch reference vs bitsandbytes' `dequantize_4bit`.

GB/s counts the bytes of dense output written (N * K * itemsize). Every ratio compares timings
taken in the same run, on the same machine. Run as a script (writes JSON + markdown) or with
pytest-benchmark:

    python -m benchmarks.bench_dequant_cpu [--quick] [--out DIR]   (default: benchmarks/results/<machine>)
    python -m pytest benchmarks/bench_dequant_cpu.py --benchmark-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

import qlora_kernels as qk
from qlora_kernels.ops import native

#: (name, N, K): Llama-8B-style projections and SmolLM2-135M's MLP.
SHAPES: tuple[tuple[str, int, int], ...] = (
    ("4096x4096", 4096, 4096),
    ("2048x5632", 2048, 5632),
    ("smollm2 576x1536", 576, 1536),
)
#: (label, format, group, quantize options)
FORMATS: tuple[tuple[str, str, int | None, dict], ...] = (
    ("nf4 b64 dq", "nf4", 64, {"double_quant": True}),
    ("int4 g128", "int4", 128, {}),
    ("int8", "int8", None, {}),
)


def fastest_seconds(fns: dict[str, Callable[[], object]], rounds: int = 12, min_time: float = 0.05) -> dict[str, float]:
    """Fastest time of each function over interleaved rounds, after a warm-up.

    Interleaving gives every candidate the same share of a busy machine, and the minimum is the
    least disturbed run (other processes only ever add time). Fast functions repeat within a
    round until `min_time` has passed.
    """
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                now = time.perf_counter()
                best[name] = min(best[name], now - t0)
                if now - start >= min_time:
                    break
    return best


def _bnb_case(weight: torch.Tensor, dtype: torch.dtype) -> Callable[[], object] | None:
    """bitsandbytes NF4 (block 64, double quant) dequantization of `weight` in `dtype`, or None."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    packed, state = bnbf.quantize_4bit(weight.to(dtype), blocksize=64, quant_type="nf4", compress_statistics=True)
    return lambda: bnbf.dequantize_4bit(packed, state)


def run(
    quick: bool = False,
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32),
    threads: tuple[int, ...] = (),
) -> dict:
    """Time every (threads, shape, format, dtype); returns a JSON-ready dict.

    threads: torch thread counts to measure (default: torch's choice). On a shared machine one
    thread is the robust per-core figure: a busy neighbour stalls every parallel region.
    """
    if not native.native_available():
        raise SystemExit(f"native extension unavailable ({native.native_status().error}); {native.BUILD_HINT}")
    shapes = SHAPES[2:] if quick else SHAPES
    load_before = os.getloadavg()[0]
    default_threads = torch.get_num_threads()
    rows = []
    for n_threads in threads or (default_threads,):
        torch.set_num_threads(n_threads)
        rows += [_measure(n_threads, *shape, dtypes) for shape in shapes]
    torch.set_num_threads(default_threads)
    threads_arg = f" --threads {','.join(map(str, threads))}" if threads else ""
    return {
        "benchmark": "CPU dequantization, GB/s of output written",
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "bitsandbytes": _version("bitsandbytes"),
            # The machine may be shared: the 1-minute load average before and after the run.
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "command": "python -m benchmarks.bench_dequant_cpu" + (" --quick" if quick else "") + threads_arg,
        "rows": [row for group in rows for row in group],
    }


def _measure(n_threads: int, shape_name: str, n: int, k: int, dtypes: tuple[torch.dtype, ...]) -> list[dict]:
    """Rows for one shape: every format and output dtype, native vs reference (vs bitsandbytes)."""
    rows = []
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    for label, fmt, group, opts in FORMATS:
        qt = qk.quantize(weight, fmt, group_size=group, **opts)
        for dtype in dtypes:
            out = torch.empty(n, k, dtype=dtype)
            out_bytes = n * k * out.element_size()
            fns = {
                "native": lambda qt=qt, out=out: native.dequantize_into(qt, out),
                "reference": lambda qt=qt, dtype=dtype: qt.dequantize(dtype, backend="torch"),
            }
            bnb = _bnb_case(weight, dtype) if fmt == "nf4" else None
            if bnb is not None:
                fns["bnb"] = bnb
            times = fastest_seconds(fns)
            t_native, t_ref, t_bnb = times["native"], times["reference"], times.get("bnb")
            row = {
                "threads": n_threads,
                "shape": shape_name,
                "N": n,
                "K": k,
                "format": label,
                "dtype": str(dtype).removeprefix("torch."),
                "native_ms": 1e3 * t_native,
                "reference_ms": 1e3 * t_ref,
                "bnb_ms": None if t_bnb is None else 1e3 * t_bnb,
                "native_GBps": out_bytes / t_native / 1e9,
                "reference_GBps": out_bytes / t_ref / 1e9,
                "bnb_GBps": None if t_bnb is None else out_bytes / t_bnb / 1e9,
                "native_vs_reference": t_ref / t_native,
                "native_vs_bnb": None if t_bnb is None else t_bnb / t_native,
            }
            rows.append(row)
            print(_md_row(row), flush=True)
    return rows


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


MD_HEADER = (
    "| threads | shape | format | out dtype | native GB/s | reference GB/s | bnb GB/s | native / reference "
    "| native / bnb |\n|---:|---|---|---|---:|---:|---:|---:|---:|"
)


def _md_row(r: dict) -> str:
    return (
        f"| {r['threads']} | {r['shape']} | {r['format']} | {r['dtype']} | "
        f"{_fmt(r['native_GBps'])} | {_fmt(r['reference_GBps'])} | "
        f"{_fmt(r['bnb_GBps'])} | {_fmt(r['native_vs_reference'], 1, 'x')} | {_fmt(r['native_vs_bnb'], 1, 'x')} |"
    )


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# CPU dequantization throughput",
        "",
        f"{m['cpu']}, {m['cores']} cores (load average {m['load_average'][0]} before, "
        f"{m['load_average'][1]} after: a shared machine); torch {m['torch']}, bitsandbytes {m['bitsandbytes']}. "
        f"Command: `{result['command']}`.",
        "GB/s of dense output written; ratios are speed-ups of native measured in the same run "
        "(fastest of 12 interleaved rounds). bnb: bitsandbytes `dequantize_4bit` (NF4, block 64, double quant) "
        "on the same weight; only NF4 has a bitsandbytes counterpart.",
        "",
        MD_HEADER,
        *(_md_row(r) for r in result["rows"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the SmolLM2 shape")
    parser.add_argument("--out", type=Path, default=None, help="folder for dequant_cpu.{json,md}")
    parser.add_argument(
        "--threads", default="", help="comma-separated torch thread counts, e.g. 2,1 (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    print(MD_HEADER)
    result = run(quick=args.quick, threads=tuple(int(t) for t in args.threads.split(",") if t))
    if args.out is None:
        from benchmarks.common import RESULTS_DIR, machine_name

        args.out = RESULTS_DIR / machine_name()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dequant_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "dequant_cpu.md").write_text(to_markdown(result))
    print(f"wrote {args.out / 'dequant_cpu.json'} and {args.out / 'dequant_cpu.md'}")
    return 0


# ------------------------------------------------------------------ pytest-benchmark suite
try:
    import pytest
except ImportError:  # plain-script use without pytest
    pytest = None

if pytest is not None:
    _needs_native = pytest.mark.skipif(not native.native_available(), reason=native.native_status().error or "")

    @_needs_native
    @pytest.mark.parametrize("backend", ["native", "torch", "bitsandbytes"])
    def test_dequant_nf4_cpu(benchmark, backend: str) -> None:
        """NF4 (block 64, double quant) 2048x5632 -> bf16."""
        weight = torch.randn(2048, 5632)
        if backend == "bitsandbytes":
            fn = _bnb_case(weight, torch.bfloat16)
            if fn is None:
                pytest.skip("bitsandbytes is not installed")
        else:
            qt = qk.quantize(weight, "nf4")
            out = torch.empty(qt.shape, dtype=torch.bfloat16)
            fn = (
                (lambda: native.dequantize_into(qt, out))
                if backend == "native"
                else (lambda: qt.dequantize(torch.bfloat16, backend="torch"))
            )
        benchmark.extra_info["out_bytes"] = weight.numel() * 2
        benchmark(fn)


if __name__ == "__main__":
    raise SystemExit(main())
