"""Compile every Triton kernel for sm_80 / sm_90 on this (GPU-less) machine and report its SASS.

Per kernel, format and config: registers, shared memory, local-memory spills, tensor-core
instructions (HMMA / HGMMA), and the width of the global loads of the packed weight (found
through the line info: SASS loads attributed to the `tl.load(data_ptr ...)` line of
`weight_tile.py`). Prints a table, and JSON with ``--json``.

Runs with TRITON_INTERPRET=0 (set here before triton is imported), so it works as a
subprocess of the test suite, whose conftest turns the interpreter on.

    python benchmarks/kernel_report.py [--arch 80 90] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qlora_kernels.formats import FORMAT_IDS  # noqa: E402
from qlora_kernels.kernels import dequant, qlora_matmul, weight_tile  # noqa: E402

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
    kernel: str
    format: str
    arch: int
    config: str
    registers: int
    shared_bytes: int
    spill_bytes: int
    local_ld_st: int
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
    become constexprs and multiples of 16 get the divisibility hint; floats are fp32.
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
        elif value == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


#: Triton 3.9 reports the lines of an inlined @triton.jit callee a few lines off (seen: +3
#: for load_weight_tile), while columns are exact; a site matches within this many lines.
LINE_SLACK = 5


def weight_load_sites() -> set[tuple[int, int]]:
    """(line, column) in weight_tile.py of the tl.load calls that read the packed data."""
    source = inspect.getsource(weight_tile).splitlines()
    return {
        (number, line.index("tl.load(data_ptr") + 1)
        for number, line in enumerate(source, start=1)
        if "tl.load(data_ptr" in line
    }


def is_weight_site(line: int, col: int, sites: set[tuple[int, int]]) -> bool:
    return any(col == c and abs(line - n) <= LINE_SLACK for n, c in sites)


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
    uses. cp.async copies (pipelined loads, LDGSTS in SASS) are reported as "async:<bits>".
    """
    files = {m.group(1): m.group(2) for m in map(PTX_FILE_RE.match, ptx.splitlines()) if m}  # listed last
    file_id, line_no, col = "", 0, 0
    widths: dict[str, int] = {}
    for line in ptx.splitlines():
        m = PTX_LOC_RE.match(line)
        if m:
            file_id, line_no, col = m.group(1), int(m.group(2)), int(m.group(3))
            continue
        if not (files.get(file_id, "").endswith("weight_tile.py") and is_weight_site(line_no, col, sites)):
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


def compile_kernel(fn, values: dict, constexprs: dict, arch: int, warps: int, stages: int, workdir: Path):
    signature, consts, attrs = specialize(fn, values, constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
    cubin = workdir / f"k{time.monotonic_ns()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([tool("nvdisasm"), "-c", "-g", str(cubin)], capture_output=True, text=True, check=True).stdout
    # shared memory Triton allocates dynamically is in the metadata, not the cubin's static count
    return cubin, sass, compiled.asm["ptx"], int(getattr(compiled.metadata, "shared", 0))


def matmul_values(mode: int, fmt: str, group: int, elem: str) -> dict:
    m, n, k, r = SHAPE["M"], SHAPE["N"], SHAPE["K"], SHAPE["R"]
    data_stride = k if fmt == "int8" else k // 2
    scales_stride = k // group if fmt == "int4" else 0
    forward = mode == qlora_matmul.MODE_FORWARD
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


def jobs(quick: bool):
    """(kernel name, fn, format, config label, values, constexprs, warps, stages) to compile."""
    elem = "*bf16"
    for mode, name in ((qlora_matmul.MODE_FORWARD, "qlora_fwd"), (qlora_matmul.MODE_GRAD_INPUT, "qlora_grad_input")):
        for fmt, group in FORMATS if not quick else FORMATS[:1]:
            r_pad = qlora_matmul.lora_r_pad(SHAPE["R"])
            configs = [
                c
                for c in qlora_matmul.gpu_configs(mode)
                if any(
                    qlora_matmul.config_is_valid(c, mode, group, FORMAT_IDS[fmt], bucket, r_pad)
                    for bucket in (qlora_matmul.SPLIT_K_MAX_M, qlora_matmul.M_BUCKET_CAP)  # every config some M uses
                )
            ]
            if fmt == "int8":  # int8 shares int4's configs; one shows its (byte) decode
                configs = configs[:1]
            for cfg in configs:
                consts = {
                    "MODE": mode,
                    **weight_constexprs(fmt, group),
                    "HAS_LORA": True,
                    "HAS_BIAS": mode == qlora_matmul.MODE_FORWARD,
                    "STORE_SIDE": mode == qlora_matmul.MODE_FORWARD,
                    "R_PAD": r_pad,
                    **cfg.kwargs,
                }
                label = "M{BLOCK_M}-O{BLOCK_OUT}-R{BLOCK_RED}".format(**cfg.kwargs)
                label += f"-w{cfg.num_warps}-s{cfg.num_stages}"
                if cfg.kwargs["SPLIT_K"] > 1:
                    label += "-k{SPLIT_K}".format(**cfg.kwargs)
                values = matmul_values(mode, fmt, group, elem)
                yield (
                    name,
                    qlora_matmul._qlora_matmul_kernel,
                    format_label(fmt, group),
                    label,
                    values,
                    consts,
                    cfg.num_warps,
                    cfg.num_stages,
                )
    for fmt, group in FORMATS if not quick else FORMATS[:1]:
        n, k = SHAPE["N"], SHAPE["K"]
        block_k = dequant.DEQUANT_MAX_BLOCK_K if fmt == "int8" else min(dequant.DEQUANT_MAX_BLOCK_K, group)
        values = {
            **weight_pointer_types(fmt),
            "out_ptr": elem,
            "N": n,
            "K": k,
            "stride_data_n": k if fmt == "int8" else k // 2,
            "stride_scales_n": k // group if fmt == "int4" else 0,
            "stride_out_n": k,
        }
        consts = {**weight_constexprs(fmt, group), "BLOCK_N": dequant.DEQUANT_BLOCK_N, "BLOCK_K": block_k}
        label = f"N{dequant.DEQUANT_BLOCK_N}-K{block_k}-w4-s3"
        yield "dequant", dequant._dequant_kernel, format_label(fmt, group), label, values, consts, 4, 3


def run(archs: list[int], quick: bool) -> list[Row]:
    sites = weight_load_sites()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for name, fn, fmt, label, values, consts, warps, stages in jobs(quick):
                start = time.perf_counter()
                cubin, sass, ptx, dyn_shared = compile_kernel(fn, values, consts, arch, warps, stages, Path(tmp))
                reg, static_shared, local = resource_usage(cubin)
                mma, local_ops, every = analyse_sass(sass)
                weight = weight_load_widths(ptx, sites)
                shared = max(dyn_shared, static_shared)
                elapsed = round(time.perf_counter() - start, 2)
                rows.append(Row(name, fmt, arch, label, reg, shared, local, local_ops, mma, weight, every, elapsed))
    return rows


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'kernel':<17}{'fmt':<10}{'sm':<4}{'config':<25}{'regs':>5}{'smem':>8}{'spill':>6}  {'mma':<14}weight loads"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        mma = ",".join(f"{k}:{v}" for k, v in r.tensor_core_ops.items() if v) or "-"
        loads = ",".join(f"{k}x{v}" for k, v in sorted(r.weight_load_widths.items())) or "?"
        print(
            f"{r.kernel:<17}{r.format:<10}{r.arch:<4}{r.config:<25}{r.registers:>5}{r.shared_bytes:>8}"
            f"{r.spill_bytes:>6}  {mma:<14}{loads}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="int4 only (fast smoke run)")
    args = parser.parse_args(argv)
    rows = run(args.arch, args.quick)
    print_table(rows)
    if args.json:
        payload = {
            "triton": triton.__version__,
            "shape": SHAPE,
            "smem_limit": SMEM_LIMIT,
            "rows": [dataclasses.asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
