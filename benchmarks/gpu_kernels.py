"""gpu_check part "configs": every autotune config of the fused kernel, forced one at a time,
against the fp32 reference, in a pool of processes.

Forward (y and x @ A^T), backward (dX) and the dequant kernel, for every format. Each forced
config runs twice: split-K reduces in a fixed order, so the two runs must agree bit for bit.
Outputs are poisoned (every launcher allocation starts as NaN), so an unwritten element fails.

The processes compile the kernels in parallel, and Triton's disk cache keeps them: the launches
here have the operand types of the later parts (bf16 x, fp32 LoRA, no bias, rank 16, sizes
divisible by 16), so the layer timings and the model runs find every config compiled.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from typing import Any

import torch

from benchmarks.gpu_common import Deadline, Profile, Records, rel_err

#: Tolerances (relative, by norm) against the fp32 reference.
OUTPUT_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
#: x @ A^T is accumulated in fp32 from operands in x's dtype: only the summation order differs.
XA_TOL = 1e-4


def configs_to_check(profile: Profile, mode: int, fmt: str) -> list:
    """The configs some launch of `fmt` can use in `mode` (any M bucket), or the interpreter's pair."""
    from qlora_kernels.kernels import qlora_configs as qc
    from qlora_kernels.kernels._runtime import interpreter_enabled

    if interpreter_enabled():
        return [qc.INTERPRETER_CONFIG] + ([qc.INTERPRETER_SPLIT_K_CONFIG] if mode == qc.MODE_FORWARD else [])
    group = profile.groups[fmt] or 1
    fmt_id = {"int8": 0, "int4": 1, "nf4": 2}[fmt]
    r_pad = qc.lora_r_pad(profile.rank)
    buckets = (1, qc.SPLIT_K_MAX_M, qc.M_BUCKET_CAP)
    return [
        c for c in qc.gpu_configs(mode) if any(qc.config_is_valid(c, mode, group, fmt_id, b, r_pad) for b in buckets)
    ]


def jobs(profile: Profile) -> list[tuple[str, str, int]]:
    """(format, "fwd" | "bwd" | "dequant", config index) of every check."""
    from qlora_kernels.kernels import qlora_configs as qc

    out = []
    for fmt in profile.formats:
        out.append((fmt, "dequant", -1))
        for mode, name in ((qc.MODE_FORWARD, "fwd"), (qc.MODE_GRAD_INPUT, "bwd")):
            out += [(fmt, name, i) for i in range(len(configs_to_check(profile, mode, fmt)))]
    return out


def _poison_allocations() -> None:
    """Every floating tensor from torch.empty starts as NaN in this process."""
    real_empty = torch.empty

    def nan_empty(*size, **kw):
        out = real_empty(*size, **kw)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    torch.empty = nan_empty


def _problem(profile: Profile, fmt: str, m: int, seed: int):
    import qlora_kernels as qk

    n, k = profile.check_shape
    g = torch.Generator().manual_seed(seed)
    device = profile.torch_device
    qt = qk.quantize((torch.randn(n, k, generator=g) * 0.02).to(device), fmt, group_size=profile.groups[fmt])
    a = (torch.randn(profile.rank, k, generator=g) * 0.02).to(device)
    b = (torch.randn(n, profile.rank, generator=g) * 0.02).to(device)
    x = torch.randn(m, k, generator=g).to(device, profile.dtype)
    return qt, a, b, x


def _rows_for(cfg) -> int:
    """An odd M that fills part of the config's M tile (masks are exercised)."""
    return {16: 7, 32: 29}.get(cfg.kwargs["BLOCK_M"], 45)


def check_one(profile: Profile, fmt: str, kind: str, index: int) -> dict[str, Any]:
    """One check: the config forced, two runs, errors against the reference."""
    from qlora_kernels.kernels import dequant
    from qlora_kernels.kernels import qlora_configs as qc
    from qlora_kernels.kernels import qlora_matmul as qm
    from qlora_kernels.ops import qlora_linear_ref

    if kind == "dequant":
        qt, _, _, _ = _problem(profile, fmt, 1, seed=1)
        got = dequant.dequantize_triton(qt, profile.dtype)
        ref = qt.dequantize(profile.dtype, backend="torch")
        exact = bool(torch.equal(got, ref))
        return {"format": fmt, "kernel": kind, "config": "default", "exact": exact, "ok": exact}
    mode = qc.MODE_FORWARD if kind == "fwd" else qc.MODE_GRAD_INPUT
    cfg = configs_to_check(profile, mode, fmt)[index]
    tuner = qm.autotuner(mode)
    saved = tuner.configs, tuner.cache
    tuner.configs, tuner.cache = [cfg], {}
    try:
        m = _rows_for(cfg)
        qt, a, b, x = _problem(profile, fmt, m, seed=2 + index)
        s = profile.scaling
        w = qt.dequantize(torch.float32, backend="torch")
        row: dict[str, Any] = {"format": fmt, "kernel": kind, "config": qc.config_label(cfg), "M": m}
        if mode == qc.MODE_FORWARD:
            runs = [qm.qlora_forward_fused(x, qt, a, b, s) for _ in range(2)]
            ref = qlora_linear_ref(x.float(), qt, a, b, s)
            xa_ref = x.float() @ a.to(x.dtype).float().t()
            row["y_err"] = rel_err(runs[0][0], ref)
            row["xa_err"] = rel_err(runs[0][1], xa_ref)
            row["reproducible"] = all(torch.equal(p, q) for p, q in zip(runs[0], runs[1], strict=True))
            row["ok"] = row["y_err"] <= OUTPUT_TOL[x.dtype] and row["xa_err"] <= XA_TOL and row["reproducible"]
        else:
            dy = torch.randn(m, qt.shape[0], device=x.device).to(x.dtype)
            runs = [qm.qlora_grad_input_fused(dy, qt, a, b, s) for _ in range(2)]
            dyf = dy.float()
            ref = dyf @ w + s * (dyf @ b.float()) @ a.float()
            row["dx_err"] = rel_err(runs[0], ref)
            row["reproducible"] = bool(torch.equal(runs[0], runs[1]))
            row["ok"] = row["dx_err"] <= OUTPUT_TOL[x.dtype] and row["reproducible"]
        return row
    finally:
        tuner.configs, tuner.cache = saved


def _worker_init() -> None:
    _poison_allocations()


def _worker(args: tuple[str, str, str, int]) -> dict[str, Any]:
    from benchmarks.gpu_common import PROFILES

    profile_name, fmt, kind, index = args
    try:
        return check_one(PROFILES[profile_name], fmt, kind, index)
    except Exception as exc:
        return {"format": fmt, "kernel": kind, "index": index, "ok": False, "error": repr(exc)[:500],
                "traceback": traceback.format_exc()[-3000:]}  # fmt: skip


def run(profile: Profile, records: Records, deadline: Deadline) -> int:
    """Every check, `profile.workers` processes at a time, until the deadline; returns the
    number of checks that failed or did not run."""
    todo = jobs(profile)
    records.note(f"{len(todo)} checks (every config and format: forward, backward, dequant), {profile.workers} workers")
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    done = failed = 0
    pool = context.Pool(min(profile.workers, len(todo)), initializer=_worker_init)
    try:
        results = pool.imap_unordered(_worker, [(profile.name, *job) for job in todo])
        while done < len(todo):
            try:
                row = results.next(timeout=max(deadline.left(), 0.1))
            except multiprocessing.TimeoutError:
                records.add("budget", checked=done, skipped=len(todo) - done)
                break
            done += 1
            failed += not row.get("ok")
            records.add("config_check", **row)
    finally:
        pool.terminate()
        pool.join()
    records.add("summary", checked=done, failed=failed, total=len(todo), pid=os.getpid())
    return failed + len(todo) - done
