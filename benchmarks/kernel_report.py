"""Compile every Triton kernel for sm_80 / sm_90 on this (GPU-less) machine and report its SASS.

Per kernel, format and config: registers, shared memory, local-memory spills, tensor-core
instructions (HMMA / HGMMA), and the width of the global loads of the packed weight (found
through the PTX line info: loads attributed to the `tl.load(data_ptr ...)` lines of
`weight_tile.py`). Prints a table, and JSON with ``--json``.

``--tritons`` compiles with several Triton versions, one subprocess each, and merges the rows:
"installed" is the environment's own Triton, a folder is put first on PYTHONPATH (a side-by-side
install, e.g. ``pip install --no-deps --target .triton36 triton==3.6.0``, as scripts/bootstrap.sh
makes; the GPU machines we run on have Triton 3.6).

Runs with TRITON_INTERPRET=0 (set here before triton is imported), so it works as a
subprocess of the test suite, whose conftest turns the interpreter on.

    python -m benchmarks.kernel_report [--arch 80 90] [--json out.json] [--quick] [--tritons installed .triton36]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qlora_kernels.formats import FORMAT_IDS  # noqa: E402
from qlora_kernels.kernels import dequant, qlora_configs, qlora_matmul, weight_tile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
#: Max shared memory per block (opt-in), bytes: A100 (sm_80) and H100 (sm_90).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
#: Representative launch: Llama-8B q_proj (4096 x 4096), LoRA r=16, decode-sized M (16, so
#: the split-K forward configs, valid for M <= SPLIT_K_MAX_M, are compiled too).
SHAPE = {"M": 16, "N": 4096, "K": 4096, "R": 16}
#: (format, group) compiled for every kernel: int4 at group 128 (the widest K tiles) and 32
#: (the narrowest), NF4 at its usual 64, int8 (one config: it shares int4's).
FORMATS = [("int4", 128), ("int4", 32), ("nf4", 64), ("int8", 1)]
DATA_TYPE = {"int8": "*i8", "int4": "*u8", "nf4": "*u8"}


def weight_pointer_types(fmt: str) -> dict[str, str]:
    """Triton signature types of the packed-weight pointers every kernel takes (see weight_kernel_args)."""
    return {
        "data_ptr": DATA_TYPE[fmt],
        "scales_ptr": {"int8": "*fp32", "int4": "*fp16", "nf4": "*u8"}[fmt],
        "mins_ptr": "*fp16" if fmt == "int4" else "*fp32",
        "absmax_scales_ptr": "*fp32",
        "absmax_offset_ptr": "*fp32",
        "nested_table_ptr": "*fp32",
    }


@dataclasses.dataclass
class Row:
    triton: str
    kernel: str
    format: str
    arch: int
    config: str
    registers: int
    shared_bytes: int
    spill_bytes: int
    local_ld_st: int | None
    tensor_core_ops: dict
    weight_load_widths: dict
    sass_global_load_widths: dict
    compile_s: float


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: this triton wheel ships no CUDA binutils")
    return str(path)


def specialize(fn, values: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attrs as the JIT would specialize these launch values.

    Strings are pointer types (16-byte aligned, like PyTorch allocations); ints equal to 1
    become constexprs and multiples of 16 get the divisibility hint, unless the kernel names
    them in do_not_specialize; floats are fp32.
    """
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = values[name]
        if isinstance(value, str):
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif fn.params[i].do_not_specialize:
            signature[name] = "i32"
        elif value == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def weight_load_sites() -> set[tuple[int, int]]:
    """(line, column) in weight_tile.py of the tl.load calls that read the packed data.

    Each call is listed at two columns: Triton 3.9 places a load at the start of `tl.load`,
    Triton 3.6 at its opening parenthesis.
    """
    source = inspect.getsource(weight_tile).splitlines()
    sites = set()
    for number, line in enumerate(source, start=1):
        if "tl.load(data_ptr" in line:
            start = line.index("tl.load(data_ptr")
            sites |= {(number, start + 1), (number, start + len("tl.load("))}
    return sites


SASS_LOAD_RE = re.compile(r"\b(LDG|LDGSTS)(\.[A-Z0-9_.]+)?\s")
PTX_LOC_RE = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)")
PTX_FILE_RE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
PTX_LD_RE = re.compile(r"\bld\.global(?:\.[a-z_0-9]+)*?(?:\.v(\d))?\.([bsuf])(\d+)\b")
PTX_CP_ASYNC_RE = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\s+\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+)")


def sass_load_width(op: str) -> str:
    """'LDG.E.128' -> '128'; plain 'LDG.E' -> '32'; 'LDG.E.U8' -> '8'."""
    for width in ("128", "64", "U16", "S16", "U8", "S8"):
        if f".{width}" in op:
            return width.lstrip("US")
    return "32"


def analyse_sass(sass: str) -> tuple[dict, int, dict]:
    """(tensor-core op counts, local load/store count, global load widths) of the SASS."""
    mma = {"HMMA": len(re.findall(r"\bHMMA\b", sass)), "HGMMA": len(re.findall(r"\bHGMMA\b", sass))}
    local_ops = len(re.findall(r"\b(LDL|STL)\b", sass))
    widths: dict[str, int] = {}
    for m in SASS_LOAD_RE.finditer(sass):
        key = f"{m.group(1)}:{sass_load_width(m.group(0).strip())}"
        widths[key] = widths.get(key, 0) + 1
    return mma, local_ops, widths


def weight_load_widths(ptx: str, sites: set[tuple[int, int]]) -> dict:
    """Widths (bits) of the PTX global loads emitted for the packed-weight `tl.load` lines.

    PTX keeps exact `.loc` line info per instruction (SASS line info is blurred by
    scheduling), and ptxas keeps the vector width of a load, so this is the width the SASS
    uses. Triton emits each global load as an inline-asm block; the block is attributed to the
    `.loc` in effect where it begins (Triton 3.9 also steps `.loc` lines inside the block, one per
    register it zeroes). cp.async copies (pipelined loads, LDGSTS in SASS) count as "async:<bits>".
    """
    files = {m.group(1): m.group(2) for m in map(PTX_FILE_RE.match, ptx.splitlines()) if m}  # listed last
    current: tuple[str, int, int] = ("", 0, 0)
    block_start: tuple[str, int, int] | None = None
    widths: dict[str, int] = {}
    for line in ptx.splitlines():
        if "begin inline asm" in line:
            block_start = current
            continue
        if "end inline asm" in line:
            block_start = None
            continue
        m = PTX_LOC_RE.match(line)
        if m:
            current = (m.group(1), int(m.group(2)), int(m.group(3)))
            continue
        file_id, line_no, col = block_start or current
        if not (files.get(file_id, "").endswith("weight_tile.py") and (line_no, col) in sites):
            continue
        m = PTX_LD_RE.search(line)
        if m:
            bits = int(m.group(1) or 1) * int(m.group(3))
            key = f"ld:{bits}"
        else:
            m = PTX_CP_ASYNC_RE.search(line)
            if not m:
                continue
            key = f"async:{int(m.group(1), 0) * 8}"
        widths[key] = widths.get(key, 0) + 1
    return widths


def resource_usage(cubin: Path) -> tuple[int, int, int]:
    """(registers, static shared bytes, spill bytes) from cuobjdump --dump-resource-usage.

    Register spills show up as STACK (the per-thread stack frame, in local memory), not as
    LOCAL, so both count as spills.
    """
    out = subprocess.run(
        [tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    field = lambda name: int(re.search(rf"{name}:(\d+)", out).group(1))
    return field("REG"), field("SHARED"), field("LOCAL") + field("STACK")


def analyse_ptx_mma(ptx: str) -> dict:
    """Tensor-core instructions counted in the PTX: mma.sync becomes HMMA, wgmma.mma_async HGMMA."""
    return {
        "HMMA": len(re.findall(r"\bmma\.sync\.aligned\b", ptx)),
        "HGMMA": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
    }


def compile_kernel(
    fn, values: dict, constexprs: dict, arch: int, warps: int, stages: int, workdir: Path, sass: bool = True
):
    """(cubin path, SASS or None, PTX, dynamic shared bytes) of one compiled job."""
    signature, consts, attrs = specialize(fn, values, constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
    cubin = workdir / f"k{time.monotonic_ns()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    text = None
    if sass:
        cmd = [tool("nvdisasm"), "-c", "-g", str(cubin)]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # shared memory Triton allocates dynamically is in the metadata, not the cubin's static count
    return cubin, text, compiled.asm["ptx"], int(getattr(compiled.metadata, "shared", 0))


def matmul_values(mode: int, fmt: str, group: int, elem: str) -> dict:
    m, n, k, r = SHAPE["M"], SHAPE["N"], SHAPE["K"], SHAPE["R"]
    data_stride = k if fmt == "int8" else k // 2
    scales_stride = k // group if fmt == "int4" else 0
    forward = mode == qlora_configs.MODE_FORWARD
    return {
        "act_ptr": elem,
        **weight_pointer_types(fmt),
        "down_ptr": elem,
        "up_ptr": elem,
        "bias_ptr": elem,
        "out_ptr": elem,
        "side_ptr": "*fp32",
        "part_ptr": "*fp32",
        "part_side_ptr": "*fp32",
        "counter_ptr": "*i32",
        "M": m,
        "N": n,
        "K": k,
        "R": r,
        "M_BUCKET": m,
        "stride_act_m": k if forward else n,
        "stride_act_red": 1,
        "stride_data_n": data_stride,
        "stride_scales_n": scales_stride,
        "stride_down_red": 1 if forward else r,
        "stride_down_r": k if forward else 1,
        "stride_up_r": 1 if forward else k,
        "stride_up_out": r if forward else 1,
        "stride_out_m": n if forward else k,
        "stride_side_m": r,
        "scaling": 2.0,
    }


def weight_constexprs(fmt: str, group: int) -> dict:
    return {"FORMAT": FORMAT_IDS[fmt], "GROUP": group, "SYMMETRIC": False, "DOUBLE_QUANT": fmt == "nf4"}


def format_label(fmt: str, group: int) -> str:
    return fmt if fmt == "int8" else f"{fmt}/g{group}"


def matmul_configs(mode: int, fmt: str, group: int) -> list:
    """Every GPU config that some launch of this format can use (any M bucket, rank 16)."""
    r_pad = qlora_configs.lora_r_pad(SHAPE["R"])
    buckets = (1, qlora_configs.SPLIT_K_MAX_M, qlora_configs.M_BUCKET_CAP)
    return [
        c
        for c in qlora_configs.gpu_configs(mode)
        if any(qlora_configs.config_is_valid(c, mode, group, FORMAT_IDS[fmt], b, r_pad) for b in buckets)
    ]


KERNELS = ("qlora_fwd", "qlora_grad_input", "dequant")


def jobs(quick: bool, kernels: tuple[str, ...] = KERNELS):
    """(kernel name, fn, format, config label, values, constexprs, warps, stages) to compile."""
    elem = "*bf16"
    formats = FORMATS[:1] if quick else FORMATS
    modes = ((qlora_configs.MODE_FORWARD, "qlora_fwd"), (qlora_configs.MODE_GRAD_INPUT, "qlora_grad_input"))
    for mode, name in modes:
        if name not in kernels:
            continue
        for fmt, group in formats:
            forward = mode == qlora_configs.MODE_FORWARD
            for cfg in matmul_configs(mode, fmt, group):
                consts = {
                    "MODE": mode,
                    **weight_constexprs(fmt, group),
                    "HAS_LORA": True,
                    "HAS_BIAS": forward,
                    "STORE_SIDE": forward,
                    "R_PAD": qlora_configs.lora_r_pad(SHAPE["R"]),
                    **cfg.kwargs,
                }
                values = matmul_values(mode, fmt, group, elem)
                label = qlora_configs.config_label(cfg)
                fn = qlora_matmul._qlora_matmul_kernel
                yield name, fn, format_label(fmt, group), label, values, consts, cfg.num_warps, cfg.num_stages
    for fmt, group in formats if "dequant" in kernels else ():
        n, k = SHAPE["N"], SHAPE["K"]
        block_n, block_k = dequant.dequant_tile(fmt, group)
        values = {
            **weight_pointer_types(fmt),
            "out_ptr": elem,
            "N": n,
            "K": k,
            "stride_data_n": k if fmt == "int8" else k // 2,
            "stride_scales_n": k // group if fmt == "int4" else 0,
            "stride_out_n": k,
        }
        consts = {**weight_constexprs(fmt, group), "BLOCK_N": block_n, "BLOCK_K": block_k}
        warps = dequant.DEQUANT_WARPS
        label = f"N{block_n}-K{block_k}-w{warps}-s3"
        yield "dequant", dequant._dequant_kernel, format_label(fmt, group), label, values, consts, warps, 3


def run(archs: list[int], quick: bool, kernels: tuple[str, ...] = KERNELS, sass: bool = True) -> list[Row]:
    """Compile every job for every arch with the Triton this process imports.

    Without `sass` nvdisasm is skipped (a third of the time): tensor-core instructions are then
    counted in the PTX, spills still come from the cubin's resource usage, and the SASS-only
    fields (local load/store count, every global load width) are left empty.
    """
    sites = weight_load_sites()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for name, fn, fmt, label, values, consts, warps, stages in jobs(quick, kernels):
                start = time.perf_counter()
                cubin, text, ptx, dyn_shared = compile_kernel(
                    fn, values, consts, arch, warps, stages, Path(tmp), sass=sass
                )
                reg, static_shared, local = resource_usage(cubin)
                mma, local_ops, every = analyse_sass(text) if sass else (analyse_ptx_mma(ptx), None, {})
                weight = weight_load_widths(ptx, sites)
                shared = max(dyn_shared, static_shared)
                elapsed = round(time.perf_counter() - start, 2)
                rows.append(
                    Row(triton.__version__, name, fmt, arch, label, reg, shared, local, local_ops, mma, weight, every,
                        elapsed)
                )  # fmt: skip
    return rows


def triton_version(where: str) -> str:
    """Version of the Triton "installed" here, or of the triton package in folder `where`."""
    if where == "installed":
        return importlib.metadata.version("triton")
    folder = Path(where).resolve()
    if not (folder / "triton" / "__init__.py").exists():
        raise FileNotFoundError(
            f"no triton package in {folder}; install one there with "
            f"pip install --no-deps --target {where} triton==<version> (scripts/bootstrap.sh makes .triton36)"
        )
    dists = sorted(folder.glob("triton-*.dist-info"))
    if not dists:
        raise FileNotFoundError(f"{folder} has a triton package but no triton-*.dist-info to read its version from")
    return dists[0].name.removeprefix("triton-").removesuffix(".dist-info")


def report_key(version: str, archs: list[int], quick: bool, kernels: tuple[str, ...], sass: bool) -> str:
    """Content hash of everything a report depends on: the kernel sources and the NF4 levels
    compiled into them, every job's launch values and constexprs (configs included), this
    script, the Triton version (which pins its ptxas), the archs and the options."""
    described = [(name, fmt, label, values, consts, warps, stages)
                 for name, _, fmt, label, values, consts, warps, stages in jobs(quick, kernels)]  # fmt: skip
    head = [version, sorted(archs), quick, sorted(kernels), sass, list(weight_tile.NF4_LEVELS), described]
    digest = hashlib.sha256(json.dumps(head, default=str).encode())
    for path in sorted([*(ROOT / "qlora_kernels" / "kernels").glob("*.py"), Path(__file__).resolve()]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-kernels" / "kernel-report"


def run_with_triton(
    where: str,
    archs: list[int],
    quick: bool,
    kernels: tuple[str, ...] = KERNELS,
    cache_dir: Path | None = None,
    sass: bool = True,
) -> dict:
    """The report of one Triton in a subprocess: "installed", or a folder put first on PYTHONPATH.

    With `cache_dir`, a report computed before from identical inputs (`report_key`) is reused:
    compiling and disassembling ~100 kernels takes minutes on 2 cores and gives the same rows.
    """
    version = triton_version(where)
    key = report_key(version, archs, quick, kernels, sass)
    cached = cache_dir / f"triton-{version}-{key}.json" if cache_dir else None
    if cached is not None and cached.exists():
        return {**json.loads(cached.read_text()), "cached": True}
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    paths = [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if where != "installed":
        paths.insert(0, str(Path(where).resolve()))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "benchmarks.kernel_report", "--json", str(out), "--arch", *map(str, archs)]
        cmd += ["--kernels", *kernels] + (["--quick"] if quick else []) + ([] if sass else ["--no-sass"])
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"kernel_report with triton from {where} failed:\n{proc.stderr[-4000:]}")
        report = json.loads(out.read_text())
    if report["triton"] != version:
        raise RuntimeError(f"asked for triton {version} from {where}, but the subprocess imported {report['triton']}")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(report))
        partial.replace(cached)
    return {**report, "cached": False}


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'triton':<7}{'kernel':<17}{'fmt':<10}{'sm':<4}{'config':<25}{'regs':>5}{'smem':>8}{'spill':>6}  "
        f"{'mma':<16}weight loads"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        mma = ",".join(f"{k}:{v}" for k, v in r.tensor_core_ops.items() if v) or "-"
        loads = ",".join(f"{k}x{v}" for k, v in sorted(r.weight_load_widths.items())) or "?"
        print(
            f"{r.triton:<7}{r.kernel:<17}{r.format:<10}{r.arch:<4}{r.config:<25}{r.registers:>5}{r.shared_bytes:>8}"
            f"{r.spill_bytes:>6}  {mma:<16}{loads}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="int4 only (fast smoke run)")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument(
        "--no-sass", dest="sass", action="store_false", help="skip nvdisasm: tensor-core instructions from the PTX"
    )
    parser.add_argument(
        "--tritons",
        nargs="+",
        metavar="WHERE",
        help='compile with each of these Triton installs, in parallel subprocesses: "installed" or a folder '
        "holding a triton package (default: this process's Triton only)",
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help=f"with --tritons: reuse a report made from identical sources and Triton ({default_cache_dir()})",
    )
    args = parser.parse_args(argv)
    if args.tritons:
        with ThreadPoolExecutor(max_workers=len(args.tritons)) as pool:
            kernels, cache_dir = tuple(args.kernels), default_cache_dir() if args.cache else None
            reports = list(
                pool.map(
                    lambda where: run_with_triton(where, args.arch, args.quick, kernels, cache_dir, args.sass),
                    args.tritons,
                )
            )
        rows = [Row(**r) for rep in reports for r in rep["rows"]]
        versions = [rep["triton"] for rep in reports]
        for where, rep in zip(args.tritons, reports, strict=True):
            print(f"triton {rep['triton']} ({where}): {'cached report' if rep['cached'] else 'compiled'}")
    else:
        rows = run(args.arch, args.quick, tuple(args.kernels), args.sass)
        versions = [triton.__version__]
    print_table(rows)
    if args.json:
        payload = {
            "triton": versions[0] if len(versions) == 1 else versions,
            "shape": SHAPE,
            "smem_limit": SMEM_LIMIT,
            "rows": [dataclasses.asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
