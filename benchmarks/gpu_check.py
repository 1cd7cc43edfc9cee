"""The GPU check: correctness and speed of the kernels on a CUDA card, in one command.

    python -m benchmarks.gpu_check --all OUT      # on the GPU: every part, <= 7 minutes on an H100
    python -m benchmarks.gpu_check --smoke OUT    # on the CPU: the same code, tiny shapes, interpreter
    python -m benchmarks.gpu_check --parts layers,models OUT

Parts, each in its own process with its own time budget (a part that fails, crashes the CUDA
context or runs out of time is recorded, and the next one runs):

* ``configs`` (b): every autotune config of the fused kernel forced against the fp32 reference,
  forward, backward and dequant, in parallel processes that also fill Triton's kernel cache;
* ``pytest`` (a): ``pytest -m gpu`` on the test files that have GPU tests, kernels compiled;
* ``layers`` (c): M in 1..8192 on the Llama-3-8B shapes, NF4/int4/int8, forward and
  forward+backward, against bf16 F.linear + LoRA and bitsandbytes + PEFT, with the copy
  bandwidth measured in the same run and the % of it our forward reaches;
* ``models`` (d, e): Llama-3.2-1B and Llama-3-8B sized models with random weights, SFT step
  tokens/s and peak memory, and batch-1 decoding tokens/s, ours against PEFT + bitsandbytes.

OUT receives at most 8 files (what the device tool brings back): gpu_check.json (everything),
gpu_check.md (tables and the issue's targets), gpu_check.log (all output), layers.png and
models.png. Runs on torch >= 2.8, Triton >= 3.6, transformers >= 5.

When bitsandbytes is not installed on the GPU machine (an offline image), bring its wheel::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2          # where pip works
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site python3 -m benchmarks.gpu_check --all OUT       # on the GPU machine

Without it the bitsandbytes columns say "unavailable" and everything else runs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Execution order (configs first: its processes compile every kernel for the later parts).
PARTS = ("configs", "pytest", "layers", "models")
PART_TITLES = {
    "configs": "every autotune config vs the fp32 reference",
    "pytest": "pytest -m gpu",
    "layers": "layer timings, % of HBM",
    "models": "SFT step and decoding, Llama sizes",
}
#: Seconds a part may overrun its budget (finishing its current case) before it is killed.
GRACE_S = 15.0
OUTPUT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.log", "layers.png", "models.png")


# -------------------------------------------------------------------------- orchestration
@dataclasses.dataclass
class PartRun:
    """How one part is run: its command and environment, and what happened."""

    name: str
    command: list[str]
    env: dict[str, str]
    budget_s: float
    records_path: Path
    status: str = "not run"
    seconds: float = 0.0
    returncode: int | None = None
    output_tail: list[str] = dataclasses.field(default_factory=list)


def run_part(part: PartRun, log) -> None:
    """Run one part's process, streaming its output to stdout and the log; kill its whole
    process group (pool workers, pytest) when it outlives budget + GRACE_S."""
    start = time.monotonic()
    header = f"==== part {part.name} (budget {part.budget_s:.0f} s)"
    print(header, flush=True)
    log.write(header + "\n")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(
        part.command, cwd=ROOT, env=part.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip

    def pump() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            tail.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        part.returncode = proc.wait(timeout=part.budget_s + GRACE_S)
        part.status = "ok" if part.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        part.status = "timeout"
    with contextlib.suppress(ProcessLookupError):  # the part and whatever it left running (pytest workers)
        os.killpg(proc.pid, signal.SIGKILL)
    part.returncode = proc.wait()
    reader.join(timeout=5)
    part.seconds = time.monotonic() - start
    part.output_tail = list(tail)
    footer = f"==== part {part.name}: {part.status} in {part.seconds:.1f} s"
    print(footer, flush=True)
    log.write(footer + "\n")
    log.flush()


def child_env(profile_name: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_AUTOTUNING": "1"}
    env["TRITON_INTERPRET"] = "1" if profile_name == "smoke" else "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def plan(parts: list[str], profile_name: str, budgets: dict[str, float], scale: float, workdir: Path) -> list[PartRun]:
    runs = []
    for name in parts:
        budget = budgets[name] * scale
        records = workdir / f"{name}.jsonl"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", name, "--profile", profile_name,
               "--budget", f"{budget:.1f}", "--records", str(records), str(workdir)]  # fmt: skip
        runs.append(PartRun(name, cmd, child_env(profile_name), budget, records))
    return runs


# ---------------------------------------------------------------------------- child side
def run_pytest_part(profile, records, deadline) -> int:
    """pytest -m gpu on every test file with GPU tests; counts and failures from its JUnit XML."""
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        env = {**os.environ}
        if profile.device == "cuda":
            env["QK_TEST_ON_GPU"] = "1"  # conftest: compiled kernels, no interpreter
            env.pop("TRITON_INTERPRET", None)
            if importlib.util.find_spec("xdist") is not None:  # tests that compile new shapes do it in parallel
                cmd += ["-n", str(max(1, min(4, (os.cpu_count() or 2) // 2)))]
        records.note(f"{' '.join(cmd[1:])} {' '.join(Path(f).name for f in files)}")
        start = time.perf_counter()
        proc = subprocess.run(cmd + files, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(deadline.left(), 1.0))  # fmt: skip
        print(proc.stdout[-6000:], proc.stderr[-2000:], flush=True)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed = []
        if junit.exists():
            for suite in ET.parse(junit).getroot().iter("testsuite"):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
            for case in ET.parse(junit).getroot().iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    records.add("pytest", returncode=proc.returncode, passed=passed, **counts, failed=failed,
                seconds=time.perf_counter() - start, files=[Path(f).name for f in files])  # fmt: skip
    return 0 if proc.returncode in (0, 5) else 1


def run_child(name: str, profile_name: str, budget: float, records_path: Path) -> int:
    from benchmarks.gpu_common import PROFILES, Deadline, Records, environment

    profile = PROFILES[profile_name]
    records = Records(records_path, name)
    deadline = Deadline(budget)
    records.add("environment", **environment())
    try:
        if name == "pytest":
            return run_pytest_part(profile, records, deadline)
        module = {"configs": "gpu_kernels", "layers": "gpu_layers", "models": "gpu_models"}[name]
        failures = importlib.import_module(f"benchmarks.{module}").run(profile, records, deadline)
    except Exception as exc:
        traceback.print_exc()
        records.add("error", error=repr(exc)[:1000], traceback=traceback.format_exc()[-4000:])
        return 1
    if failures:
        records.note(f"{failures} failed measurements or checks of ours (see the records)")
    return 1 if failures else 0


# ------------------------------------------------------------------------------- reporting
def _geomean(values: list[float]) -> float:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _target(name: str, values: list[float], threshold: float, higher_is_better: bool, unit: str, note: str = ""):
    """A summary row: the worst value over the cases decides `met`."""
    if not values:
        return {"name": name, "ours": None, "baseline": None, "unit": unit, "ratio": None, "target": threshold,
                "met": None, "note": note or "not measured"}  # fmt: skip
    worst = min(values) if higher_is_better else max(values)
    met = worst >= threshold if higher_is_better else worst <= threshold
    return {"name": name, "ours": worst, "baseline": None, "unit": unit, "ratio": _geomean(values), "target": threshold,
            "met": met, "note": note or f"worst of {len(values)} cases; ratio = geometric mean"}  # fmt: skip


def targets(layers: list[dict], sft: list[dict]) -> list[dict]:
    """The GPU speed targets (benchmarks/README.md), each judged by its worst case."""
    small = [r for r in layers if r["M"] <= 16]
    large = [r for r in layers if r["M"] >= 4096]
    m1 = [r for r in layers if r["M"] == 1]
    four_bit = ("nf4", "int4")

    def collect(rows, key):
        return [r[f"{fmt}_{key}"] for r in rows for fmt in four_bit if f"{fmt}_{key}" in r]

    fb_time_ratio = [r[f"{fmt}_fwdbwd_ms"] / r["bf16_fwdbwd_ms"] for r in large for fmt in four_bit
                     if f"{fmt}_fwdbwd_ms" in r and "bf16_fwdbwd_ms" in r]  # fmt: skip
    rows = [
        _target("M <= 16 forward, NF4/int4 + LoRA: speed-up over bf16 F.linear + LoRA",
                collect(small, "speedup_fwd_vs_bf16"), 3.5, True, "x"),
        _target("M <= 16 forward, NF4/int4 + LoRA: speed-up over bitsandbytes + PEFT",
                collect(small, "speedup_fwd_vs_bnb"), 2.0, True, "x"),
        _target("M = 1 forward, NF4/int4: % of measured HBM bandwidth", collect(m1, "fwd_pct_hbm"), 75.0, True, "%"),
        _target("M >= 4096 forward+backward: time over bf16 F.linear + LoRA", fb_time_ratio, 1.1, False, "x time"),
        _target("M >= 4096 forward+backward: speed-up over bitsandbytes + PEFT",
                collect(large, "speedup_fwdbwd_vs_bnb"), 1.3, True, "x"),
    ]  # fmt: skip
    by = {(r["model"], r["method"]): r for r in sft if "tokens_per_s" in r}
    ours, bnb = by.get(("llama-3-8b", "ours")), by.get(("llama-3-8b", "peft+bnb"))
    if ours and bnb:
        ratio = ours["tokens_per_s"] / bnb["tokens_per_s"]
        mem_ok = ours.get("peak_mem_gib", 0) <= bnb.get("peak_mem_gib", float("inf"))
        rows.append({"name": "SFT step at Llama-3-8B: tokens/s over PEFT + bitsandbytes, at no more peak memory",
                     "ours": ours["tokens_per_s"], "baseline": bnb["tokens_per_s"], "unit": "tokens/s", "ratio": ratio,
                     "target": 1.5, "met": ratio >= 1.5 and mem_ok,
                     "note": f"peak {ours.get('peak_mem_gib', float('nan')):.1f} GiB vs "
                             f"{bnb.get('peak_mem_gib', float('nan')):.1f} GiB"})  # fmt: skip
    else:
        rows.append(_target("SFT step at Llama-3-8B: tokens/s over PEFT + bitsandbytes", [], 1.5, True, "x",
                            "not measured (a run is missing)"))  # fmt: skip
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return str(v)


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def _records(runs: dict[str, dict], part: str, kind: str) -> list[dict]:
    return [r for r in runs.get(part, {}).get("records", []) if r.get("kind") == kind]


def markdown(report: dict) -> str:
    env, runs = report["environment"], report["parts"]
    out = [f"# GPU check: {env.get('device', '?')} ({report['profile']} run)", ""]
    versions = ("torch", "triton", "transformers", "peft", "bitsandbytes")
    out.append(", ".join(f"{k} {env[k]}" for k in versions if k in env))
    out += ["", "## Targets", "", md_table(report["targets"], [
        ("name", "target"), ("ours", "ours (worst case)"), ("ratio", "geomean"), ("target", "threshold"),
        ("met", "met"), ("note", "note")])]  # fmt: skip
    parts = [{"part": n, "what": PART_TITLES.get(n, ""), **{k: r[k] for k in ("status", "seconds", "budget_s")}}
             for n, r in runs.items()]  # fmt: skip
    out += ["", "## Parts", "", md_table(parts, [("part", "part"), ("what", "what"), ("status", "status"),
                                                ("seconds", "s"), ("budget_s", "budget s")])]  # fmt: skip
    for name, run in runs.items():
        errors = [r for r in run["records"] if r.get("kind") == "error"]
        if run["status"] != "ok" or errors:
            detail = errors[-1]["error"] if errors else "\n".join(run.get("output_tail", [])[-8:])
            out += ["", f"**{name} {run['status']}**:", "", "```", detail, "```"]
    tests = _records(runs, "pytest", "pytest")
    if tests:
        t = tests[-1]
        out += ["", "## (a) pytest -m gpu", "", f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                f"{t['skipped']} skipped in {t['seconds']:.0f} s ({', '.join(t['files'])})"]  # fmt: skip
        out += [f"- failed: {name}" for name in t["failed"]]
    checks = _records(runs, "configs", "config_check")
    if checks:
        bad = [c for c in checks if not c.get("ok")]
        out += ["", "## (b) Every autotune config against the fp32 reference", "",
                f"{len(checks) - len(bad)} of {len(checks)} checks pass (bf16; y, dX within 1e-2, x @ A^T within "
                "1e-4, two runs bitwise equal, dequant exact).", "",
                md_table(checks, [("format", "format"), ("kernel", "kernel"), ("config", "config"), ("M", "M"),
                                  ("y_err", "y err"), ("xa_err", "xa err"), ("dx_err", "dx err"),
                                  ("reproducible", "bitwise repeat"), ("exact", "exact"), ("ok", "ok"),
                                  ("error", "error")])]  # fmt: skip
    layers = _records(runs, "layers", "layer")
    peaks = _records(runs, "layers", "peaks")
    if layers:
        fmts = [f for f in ("nf4", "int4", "int8") if any(f"{f}_fwd_ms" in r for r in layers)]
        if peaks:
            p = peaks[-1]
            out += ["", "## (c) Layers", "", f"Measured in the same run: copy bandwidth {p['copy_gb_s']:.0f} GB/s "
                    f"(read + write), {p['matmul_dtype']} matmul {p['matmul_tflop_s']:.0f} TFLOP/s. Times in ms "
                    "(do_bench medians); LoRA r=16, fp32 LoRA weights, bf16 autocast."]  # fmt: skip
        for mode, label in (("fwd", "Forward"), ("fwdbwd", "Forward + backward")):
            cols = [("N", "N"), ("K", "K"), ("M", "M"), (f"bf16_{mode}_ms", "bf16+LoRA")]
            cols += [(f"bnb_{mode}_ms", "bnb+PEFT")]
            for f in fmts:
                cols += [(f"{f}_{mode}_ms", f), (f"{f}_speedup_{mode}_vs_bf16", f"{f} x bf16")]
                cols += [(f"{f}_speedup_{mode}_vs_bnb", f"{f} x bnb")] if f == "nf4" else []
                cols += [(f"{f}_fwd_pct_hbm", f"{f} % HBM")] if mode == "fwd" else []
            out += ["", f"### {label}", "", md_table(layers, cols)]
        path_rows = [r for r in layers if any(f"{f}_fused_fwd_ms" in r for f in fmts)]
        if path_rows:
            cols = [("N", "N"), ("K", "K"), ("M", "M")]
            for f in fmts:
                cols += [(f"{f}_{p}_ms", f"{f} {p}") for p in ("fused_fwd", "dense_fwd", "fused_bwd", "dense_bwd")]
            title = "### Fused kernel vs dense path (sets FUSED_MAX_M, FUSED_BWD_MAX_M)"
            out += ["", title, "", md_table(path_rows, cols)]
        configs = [{"N": r["N"], "K": r["K"], "M": r["M"], **{f: r.get(f"{f}_fwd_config") for f in fmts}}
                   for r in layers if any(f"{f}_fwd_config" in r for f in fmts)]  # fmt: skip
        if configs:
            cols = [("N", "N"), ("K", "K"), ("M", "M")] + [(f, f"{f} forward config") for f in fmts]
            out += ["", "### Configs the autotuner chose", "", md_table(configs, cols)]
    sft = _records(runs, "models", "sft")
    if sft:
        base = {r["model"]: r for r in sft if r["method"] == "peft+bnb" and "tokens_per_s" in r}
        for r in sft:
            if "tokens_per_s" in r and r["model"] in base:
                r["x_vs_bnb"] = r["tokens_per_s"] / base[r["model"]]["tokens_per_s"]
        out += ["", "## (d) SFT step", "", md_table(sft, [
            ("model", "model"), ("method", "method"), ("batch", "batch"), ("seq", "seq"), ("tokens_per_s", "tokens/s"),
            ("x_vs_bnb", "x PEFT+bnb"), ("step_s", "step s"), ("peak_mem_gib", "peak GiB"),
            ("model_mem_gib", "model GiB"), ("build_s", "build s"), ("error", "error")])]  # fmt: skip
    dec = _records(runs, "models", "decode")
    if dec:
        out += ["", "## (e) Decoding at batch 1", "", md_table(dec, [
            ("model", "model"), ("method", "method"), ("decode_tokens_per_s", "tokens/s"), ("prefill_s", "prefill s"),
            ("prompt_tokens", "prompt"), ("decode_tokens", "generated"), ("error", "error")])]  # fmt: skip
    notes = [r["note"] for part in runs.values() for r in part["records"] if r.get("kind") == "unavailable"]
    if notes:
        out += ["", "## Not measured", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(out) + "\n"


def plot(report: dict, out_dir: Path) -> list[str]:
    """layers.png (speed-up over bf16 vs M per shape) and models.png (SFT and decoding); returns
    notes for what could not be drawn (a plot never stops the report)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return [f"no plots: matplotlib unavailable ({exc})"]
    notes = []
    for name, draw in (("layers.png", _plot_layers), ("models.png", _plot_models)):
        try:
            fig = draw(plt, report["parts"])
        except Exception as exc:
            notes.append(f"{name} not drawn: {exc!r}")
            continue
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=90)
            plt.close(fig)
    return notes


def _plot_layers(plt, runs: dict):
    layers = [r for r in _records(runs, "layers", "layer") if "bf16_fwd_ms" in r]
    if not layers:
        return None
    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in layers))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 3.2 * len(shapes)), squeeze=False)
    for (n, k), row_axes in zip(shapes, axes, strict=True):
        rows = sorted((r for r in layers if (r["N"], r["K"]) == (n, k)), key=lambda r: r["M"])
        ms = [r["M"] for r in rows]
        for ax, mode in zip(row_axes, ("fwd", "fwdbwd"), strict=True):
            for f in ("nf4", "int4", "int8"):
                ax.plot(
                    ms, [r.get(f"{f}_speedup_{mode}_vs_bf16", math.nan) for r in rows], marker="o", label=f"ours {f}"
                )
            bnb = [r[f"bf16_{mode}_ms"] / r[f"bnb_{mode}_ms"] if f"bnb_{mode}_ms" in r else math.nan for r in rows]
            ax.plot(ms, bnb, marker="s", linestyle="--", label="bnb+PEFT nf4")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            if len(set(ms)) > 1:
                ax.set_xscale("log", base=2)
            ax.set_title(f"{n}x{k} {'forward' if mode == 'fwd' else 'forward+backward'}")
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("speed-up over bf16 + LoRA")
    axes[0][0].legend(fontsize=8)
    return fig


def _plot_models(plt, runs: dict):
    sft = [r for r in _records(runs, "models", "sft") if "tokens_per_s" in r]
    dec = [r for r in _records(runs, "models", "decode") if "decode_tokens_per_s" in r]
    if not (sft or dec):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, rows, key, title in (
        (axes[0], sft, "tokens_per_s", "SFT step tokens/s"),
        (axes[1], sft, "peak_mem_gib", "SFT peak memory (GiB)"),
        (axes[2], dec, "decode_tokens_per_s", "decoding tokens/s (batch 1)"),
    ):
        rows = [r for r in rows if key in r]
        ax.bar(range(len(rows)), [r[key] for r in rows])
        ax.set_xticks(range(len(rows)), [f"{r['model']}\n{r['method']}" for r in rows], fontsize=7)
        ax.set_title(title)
    return fig


def build_report(runs: list[PartRun], profile_name: str, started: float) -> dict:
    from benchmarks.gpu_common import read_records

    parts = {}
    environment: dict[str, Any] = {}
    for run in runs:
        records = read_records(run.records_path)
        for r in records:
            if r.get("kind") == "environment" and not environment:
                environment = {k: v for k, v in r.items() if k != "kind"}
        parts[run.name] = {"status": run.status, "seconds": round(run.seconds, 1), "budget_s": run.budget_s,
                           "returncode": run.returncode, "records": records,
                           "output_tail": run.output_tail if run.status != "ok" else []}  # fmt: skip
    layers = [r for r in parts.get("layers", {}).get("records", []) if r.get("kind") == "layer"]
    sft = [r for r in parts.get("models", {}).get("records", []) if r.get("kind") == "sft"]
    rows = targets(layers, sft)
    if profile_name != "full":
        for row in rows:
            row["met"], row["note"] = None, "smoke run on the CPU: not a measurement of the target"
    return {"profile": profile_name, "environment": environment, "seconds": round(time.monotonic() - started, 1),
            "targets": rows, "parts": parts}  # fmt: skip


def orchestrate(runs: list[PartRun], out_dir: Path, profile_name: str) -> dict:
    """Run the parts in order, then write the report files into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (out_dir / "gpu_check.log").open("w") as log:
        for run in runs:
            run_part(run, log)
        report = build_report(runs, profile_name, started)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        text = markdown(report)
        (out_dir / "gpu_check.md").write_text(text)
        for note in plot(report, out_dir):
            log.write(note + "\n")
        summary = ["", f"gpu_check: {report['seconds']:.0f} s, files in {out_dir}", ""]
        summary.append(md_table([{"part": r.name, "status": r.status, "s": round(r.seconds)} for r in runs],
                                [("part", "part"), ("status", "status"), ("s", "seconds")]))  # fmt: skip
        summary += ["", md_table(report["targets"], [("name", "target"), ("ours", "ours"), ("target", "threshold"),
                                                      ("met", "met")])]  # fmt: skip
        print("\n".join(summary), flush=True)
        log.write("\n".join(summary) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the report files (a work folder for --child)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--all", action="store_true", help="every part on the GPU")
    mode.add_argument("--smoke", action="store_true", help="every part on the CPU with tiny shapes (CI)")
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--profile", choices=("full", "smoke"), default="full", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child, args.profile, args.budget, args.records)
    if not (args.all or args.smoke or args.parts):
        parser.error("choose --all (GPU), --smoke (CPU) or --parts")
    parts = PARTS if not args.parts else tuple(p.strip() for p in args.parts.split(","))
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    profile_name = "smoke" if args.smoke else "full"
    if profile_name == "full":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; run --smoke for the CPU check", file=sys.stderr)
            return 2
    from benchmarks.gpu_common import PROFILES

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        runs = plan([p for p in PARTS if p in parts], profile_name, PROFILES[profile_name].budgets,
                    args.budget_scale, Path(tmp))  # fmt: skip
        orchestrate(runs, args.out, profile_name)
    return 0 if all(r.status == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
