"""Shared pieces of the benchmark suites: timing, run metadata and report writing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qlora_kernels.versions import package_version

RESULTS_DIR = Path(__file__).parent / "results"


def machine_name() -> str:
    """The results folder's name: the GPU's name (spaces to dashes) on a CUDA machine; on the CPU
    its kind for our compute-dtype policy, decided as the policy decides without overrides:
    "cpu-bf16" (bf16 matmuls clearly faster than fp32, so layers compute in bf16) or "cpu"."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    from qlora_kernels.ops.compute_policy import decide_cpu_compute_dtype

    return "cpu-bf16" if decide_cpu_compute_dtype(env=None).name == "bf16" else "cpu"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_compute_dtype() -> str:
    from qlora_kernels.ops.compute_policy import cpu_compute_dtype

    return cpu_compute_dtype().describe()


def run_metadata() -> dict:
    """Machine, versions, date and git commit: attached to every result file."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "machine": machine_name(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_compute_dtype": _cpu_compute_dtype(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {p: package_version(p) for p in ("torch", "triton", "transformers", "bitsandbytes", "peft", "trl")},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        # The machine may be shared: the 1/5/15-minute load averages when the report was written.
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def time_median(fn: Callable[[], object], warmup: int = 2, repeat: int = 7, min_seconds: float = 0.0) -> dict:
    """Median wall time of fn() in milliseconds, with the 20th and 80th percentiles.

    On CUDA the device is synchronised around every call; on the CPU a call is synchronous.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "n": len(times)}


def fastest_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int = 5, min_round_s: float = 0.02, warmup: int = 1
) -> dict[str, dict]:
    """Per function: the fastest and the median of its per-round times (ms), measured in interleaved rounds.

    Every round calls each function in turn (repeating one within the round until `min_round_s`
    passes, keeping its fastest call), so a busy neighbour on a shared machine slows every
    candidate alike; the fastest round is the least disturbed figure (other processes only add
    time), which is what the ratios use. On CUDA the device is synchronised around every call.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best = float("inf")
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                sync()
                now = time.perf_counter()
                best = min(best, now - t0)
                if now - start >= min_round_s:
                    break
            per_round[name].append(best * 1e3)
    return {
        name: {"min_ms": min(t), "median_ms": statistics.median(t), "rounds": len(t)} for name, t in per_round.items()
    }


def machine_peaks(device: torch.device, size_mb: int = 256) -> dict[str, float]:
    """Measured copy bandwidth (GB/s, read + write) and fp32 / bf16 matmul rates (GFLOP/s) of `device`.

    The layer suite reports its numbers as a % of these, measured in the same run.
    """
    n = size_mb * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = fastest_interleaved({"copy": lambda d=dst, s=src: d.copy_(s)}, rounds=3, min_round_s=0.05)["copy"]["min_ms"]
    del src, dst
    side = 2048 if device.type == "cpu" else 8192
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        ms = fastest_interleaved({"mm": lambda a=a, b=b: a @ b}, rounds=3, min_round_s=0.05)["mm"]["min_ms"]
        rates[str(dtype).removeprefix("torch.")] = 2 * side**3 / (ms * 1e6)
    return {
        "copy_gb_s": 2 * n * 4 / (copy * 1e6),
        "matmul_fp32_gflop_s": rates["float32"],
        "matmul_bf16_gflop_s": rates["bfloat16"],
        "matmul_side": side,
    }


def write_report(
    name: str, rows: list[dict], table_md: str, out_dir: Path | None = None, extra: dict | None = None
) -> Path:
    """Write `<out_dir>/<name>.json` (metadata + rows + extra) and `<name>.md` (the table); returns the folder."""
    out_dir = out_dir or RESULTS_DIR / machine_name()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = run_metadata()
    payload = {"meta": meta, **(extra or {}), "rows": rows}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = (
        f"<!-- {meta['machine']}, torch {meta['versions']['torch']}, commit {meta['git_commit']}, {meta['date']}, "
        f"load average {meta['load_average']} -->\n"
    )
    (out_dir / f"{name}.md").write_text(header + table_md + "\n")
    return out_dir


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of `rows` with (key, header) columns; floats to 3 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def env_threads() -> int:
    """Threads the run uses: OMP_NUM_THREADS if set, else torch's choice."""
    return int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
