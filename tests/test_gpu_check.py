"""benchmarks/gpu_check.py cannot rot: its CPU smoke run (tiny shapes, Triton interpreter) runs
every part through the same code as the GPU run, and a part that fails or hangs is recorded
while the next one still runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check, gpu_kernels  # noqa: E402
from benchmarks.gpu_common import SMOKE  # noqa: E402


@pytest.mark.slow
def test_smoke_run_measures_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it per part
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert set(files) <= set(gpu_check.OUTPUT_FILES) and len(files) <= 8, files
    assert {"gpu_check.json", "gpu_check.md", "gpu_check.log"} <= set(files)
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    assert all(p["status"] == "ok" for p in parts.values()), {n: p["status"] for n, p in parts.items()}

    def records(part, kind):
        return [r for r in parts[part]["records"] if r["kind"] == kind]

    checks = records("configs", "config_check")
    assert len(checks) == len(gpu_kernels.jobs(SMOKE)) and all(c["ok"] for c in checks), checks
    assert {(c["format"], c["kernel"]) for c in checks} == {
        (f, k) for f in SMOKE.formats for k in ("fwd", "bwd", "dequant")
    }
    assert any(c["config"].endswith("-k3") for c in checks), "the split-K config was checked"
    assert records("pytest", "pytest")[0]["files"], "the GPU test files were found"
    (peaks,) = records("layers", "peaks")
    assert peaks["copy_gb_s"] > 0
    layers = records("layers", "layer")
    assert [(r["N"], r["K"], r["M"]) for r in layers] == [
        (n, k, m) for n, k in SMOKE.layer_shapes for m in SMOKE.layer_ms
    ]
    for row in layers:
        for fmt in SMOKE.formats:
            assert row[f"{fmt}_fwd_ms"] > 0 and row[f"{fmt}_fwdbwd_ms"] > 0 and row[f"{fmt}_fwd_pct_hbm"] > 0
            assert row[f"{fmt}_fused_fwd_ms"] > 0 and row[f"{fmt}_dense_bwd_ms"] > 0
        assert row["bf16_fwd_ms"] > 0
    sft = {r["method"]: r for r in records("models", "sft")}
    assert "error" not in sft["ours"] and sft["ours"]["tokens_per_s"] > 0
    decode = {r["method"]: r for r in records("models", "decode")}
    assert decode["ours"]["decode_tokens_per_s"] > 0
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
        pass
    else:
        assert all(row["bnb_fwd_ms"] > 0 for row in layers)
        assert sft["peft+bnb"]["tokens_per_s"] > 0 and decode["peft+bnb"]["decode_tokens_per_s"] > 0
    assert len(report["targets"]) == 6 and all(t["met"] is None for t in report["targets"])
    text = (out / "gpu_check.md").read_text()
    for heading in ("## Targets", "## (a) pytest", "## (b)", "## (c) Layers", "## (d) SFT step", "## (e) Decoding"):
        assert heading in text


def test_failed_or_hanging_part_is_recorded_and_the_next_part_runs(tmp_path):
    """A part whose process exits non-zero is "failed", one past budget + grace is killed as
    "timeout" (with its process group), and the parts after them still run."""
    env = dict(os.environ)
    ok_records = tmp_path / "ok.jsonl"
    script = f'open({str(ok_records)!r}, \'w\').write(\'{{"kind": "layer", "N": 1, "K": 1, "M": 1}}\\n\')'
    runs = [
        gpu_check.PartRun("configs", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], env, 5.0,
                          tmp_path / "a.jsonl"),
        gpu_check.PartRun("pytest", [sys.executable, "-c", "import time; time.sleep(60)"], env, 0.2,
                          tmp_path / "b.jsonl"),
        gpu_check.PartRun("layers", [sys.executable, "-c", script], env, 5.0, ok_records),
    ]  # fmt: skip
    original_grace = gpu_check.GRACE_S
    gpu_check.GRACE_S = 0.5
    try:
        report = gpu_check.orchestrate(runs, tmp_path / "out", "smoke")
    finally:
        gpu_check.GRACE_S = original_grace
    assert [r.status for r in runs] == ["failed", "timeout", "ok"]
    assert runs[0].returncode == 3 and runs[1].seconds < 10
    assert report["parts"]["configs"]["output_tail"] == ["boom"]
    assert report["parts"]["layers"]["records"] == [{"kind": "layer", "N": 1, "K": 1, "M": 1}]
    text = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "**configs failed**" in text and "**pytest timeout**" in text
