"""Shared pieces of the benchmark suites: timing, run metadata and report writing."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_name() -> str:
    """'cpu' here; the GPU's name (spaces to dashes) on a CUDA machine."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return "cpu"


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
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "triton", "transformers", "bitsandbytes", "peft")},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
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


def write_report(name: str, rows: list[dict], table_md: str, out_dir: Path | None = None) -> Path:
    """Write `<out_dir>/<name>.json` (metadata + rows) and `<name>.md` (the table); returns the folder."""
    out_dir = out_dir or RESULTS_DIR / machine_name()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = run_metadata()
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    header = (
        f"<!-- {meta['machine']}, torch {meta['versions']['torch']}, commit {meta['git_commit']}, {meta['date']} -->\n"
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
    return int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
