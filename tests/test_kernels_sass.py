"""GPU code quality without a GPU: compile every kernel and config for sm_80 / sm_90 and read the SASS.

Runs benchmarks/kernel_report.py in a subprocess (it needs TRITON_INTERPRET=0, which this
test session's conftest turned on) and checks its JSON: no spills, tensor-core instructions
in the matmul kernels, shared memory within the card, 128-bit packed-weight loads in the
bandwidth-bound small-M forward for every format (NF4 included, since it decodes in registers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MATMUL_KERNELS = ("qlora_fwd", "qlora_grad_input")


def _toolchain_missing() -> str | None:
    for tool in ("cuobjdump", "nvdisasm", "ptxas"):
        if not (BIN / tool).exists():
            return f"the triton wheel ships no {tool} (looked in {BIN}): cannot compile for CUDA on this machine"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        return f"this triton cannot compile ahead of time for a GPU target: {err}"
    return None


pytestmark = pytest.mark.skipif(_toolchain_missing() is not None, reason=str(_toolchain_missing()))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def test_every_kernel_and_config_compiled(report):
    rows = report["rows"]
    kernels = {(r["kernel"], r["arch"]) for r in rows}
    assert kernels == {(k, a) for k in (*MATMUL_KERNELS, "dequant") for a in (80, 90)}
    for row in rows:
        assert row["registers"] > 0, row


def test_no_spills(report):
    spilling = [
        (r["kernel"], r["format"], r["arch"], r["config"], r["spill_bytes"], r["local_ld_st"])
        for r in report["rows"]
        if r["spill_bytes"] or r["local_ld_st"]
    ]
    assert not spilling, f"local-memory spills: {spilling}"


def test_tensor_cores_in_matmul_kernels(report):
    for r in report["rows"]:
        if r["kernel"] not in MATMUL_KERNELS:
            continue
        ops = r["tensor_core_ops"]
        count = ops["HMMA"] if r["arch"] == 80 else ops["HMMA"] + ops["HGMMA"]
        assert count > 0, f"no tensor-core instructions: {r['kernel']} {r['format']} sm_{r['arch']} {r['config']}"


def test_shared_memory_within_card(report):
    limits = {int(k): v for k, v in report["smem_limit"].items()}
    for r in report["rows"]:
        assert r["shared_bytes"] <= limits[r["arch"]], r


def test_small_m_forward_loads_packed_weight_128_bit(report):
    """Every packed-weight load of the fused forward is a 128-bit vector load, in every format
    (NF4 too: its codes decode in registers, see weight_tile._nf4_level), split-K configs too."""
    for r in report["rows"]:
        if r["kernel"] != "qlora_fwd":
            continue
        widths = r["weight_load_widths"]
        assert widths, f"no packed-weight load found in the PTX of {r['format']} {r['config']}"
        narrow = {k: v for k, v in widths.items() if int(k.split(":")[1]) < 128}
        assert not narrow, f"{r['format']} sm_{r['arch']} {r['config']}: narrow packed loads {narrow}"


def test_split_k_forward_configs_compiled(report):
    """The split-K forward configs (M <= SPLIT_K_MAX_M) are in the report for every 4-bit format."""
    for fmt in ("int4/g128", "int4/g32", "nf4/g64"):
        for arch in (80, 90):
            split = [r for r in report["rows"] if r["kernel"] == "qlora_fwd" and r["format"] == fmt
                     and r["arch"] == arch and "-k" in r["config"]]  # fmt: skip
            assert split, f"no split-K forward config compiled for {fmt} sm_{arch}"
