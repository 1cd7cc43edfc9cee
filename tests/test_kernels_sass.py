"""GPU code quality without a GPU: every kernel and config compiled for sm_80 / sm_90 with the
installed Triton and with Triton 3.6 (the version on the GPU machines we run on).

Runs benchmarks/kernel_report.py in a subprocess (it needs TRITON_INTERPRET=0, which this test
session's conftest turned on; it compiles with each Triton in its own subprocess, Triton 3.6
from the side-by-side install .triton36/ that scripts/bootstrap.sh makes) and checks its JSON:
no spills (the cubin's resource usage), tensor-core instructions in the matmul kernels (counted
in the PTX: mma.sync / wgmma, which ptxas emits as HMMA / HGMMA), shared memory within the card,
and 128-bit loads of the packed weight in every kernel, with one named exception (int8 backward).
The report is cached under ~/.cache/qlora-kernels, keyed on the kernel sources, every job's
launch values and configs, the report script and the Triton version, so a rerun on unchanged
kernels does not recompile.
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
TRITON36 = ROOT / ".triton36"
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MATMUL_KERNELS = ("qlora_fwd", "qlora_grad_input")
KERNELS = (*MATMUL_KERNELS, "dequant")


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
    assert (TRITON36 / "triton").is_dir(), (
        f"Triton 3.6 side install missing: run scripts/bootstrap.sh (makes {TRITON36})"
    )
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.kernel_report", "--tritons", "installed", str(TRITON36), "--cache"]
    cmd.append("--no-sass")  # tensor-core instructions read from the PTX: a third less time
    proc = subprocess.run([*cmd, "--json", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def _where(r: dict) -> str:
    return f"triton {r['triton']} {r['kernel']} {r['format']} sm_{r['arch']} {r['config']}"


def test_both_tritons_compiled_every_kernel_and_config(report):
    rows = report["rows"]
    assert {r["triton"] for r in rows} == {"3.6.0", triton.__version__}
    per_version = {}
    for r in rows:
        per_version.setdefault(r["triton"], set()).add((r["kernel"], r["format"], r["arch"], r["config"]))
    first, *others = per_version.values()
    assert all(o == first for o in others), "the two Tritons compiled different job lists"
    assert {(k, a) for k, _, a, _ in first} == {(k, a) for k in KERNELS for a in (80, 90)}
    assert all(r["registers"] > 0 for r in rows)


def test_no_spills(report):
    spilling = [(_where(r), r["spill_bytes"]) for r in report["rows"] if r["spill_bytes"] or r["local_ld_st"]]
    assert not spilling, f"local-memory spills: {spilling}"


def test_tensor_cores_in_matmul_kernels(report):
    """Tensor-core instructions in every matmul config but the forward's BLOCK_M = 1 GEMV, which
    by design has none (it multiplies the decoded tile in registers)."""
    for r in report["rows"]:
        if r["kernel"] in MATMUL_KERNELS:
            ops = r["tensor_core_ops"]
            count = ops["HMMA"] if r["arch"] == 80 else ops["HMMA"] + ops["HGMMA"]
            if r["config"].startswith("M1-"):
                assert count == 0, f"tensor-core instructions in the GEMV: {_where(r)}"
            else:
                assert count > 0, f"no tensor-core instructions: {_where(r)}"


def test_shared_memory_within_card(report):
    limits = {int(k): v for k, v in report["smem_limit"].items()}
    for r in report["rows"]:
        assert r["shared_bytes"] <= limits[r["arch"]], _where(r)


def _is_int8_backward_exception(r: dict) -> bool:
    """int8's pipelined backward copies its tile 64 bits at a time (Triton gives the loaded int8
    tile the layout of the tensor-core operand it feeds; see qlora_configs.gpu_configs); only a
    BLOCK_M = 64 config escaped that on sm_90, and none is left."""
    return (
        r["kernel"] == "qlora_grad_input"
        and r["format"] == "int8"
        and not (r["arch"] == 90 and r["config"].startswith("M64-"))
    )


def test_packed_weight_loads_are_128_bit(report):
    """Every load of the packed weight is 128 bits wide (ld.global.v4 or a 16-byte cp.async), in
    every kernel, format, config and arch, under both Tritons (the load attribution works on both)."""
    for r in report["rows"]:
        widths = r["weight_load_widths"]
        assert widths, f"no packed-weight load found in the PTX of {_where(r)}"
        bits = {int(k.split(":")[1]) for k in widths}
        want = {64} if _is_int8_backward_exception(r) else {128}
        assert bits == want, f"{_where(r)}: packed-weight loads {widths}, expected {want} bits"


def test_split_k_forward_configs_compiled(report):
    """The split-K forward configs (M <= SPLIT_K_MAX_M) are in the report for every 4-bit format."""
    for fmt in ("int4/g128", "int4/g32", "nf4/g64"):
        for arch in (80, 90):
            split = [r for r in report["rows"] if r["kernel"] == "qlora_fwd" and r["format"] == fmt
                     and r["arch"] == arch and "-k" in r["config"]]  # fmt: skip
            assert split, f"no split-K forward config compiled for {fmt} sm_{arch}"
