"""GPU check for the QLoRA matmul: bf16 correctness vs the fp32 reference, then timings.

Times (triton.testing.do_bench medians) our forward and forward+backward against bf16
F.linear + unfused LoRA at 4096x4096 and 4096x14336 (N x K) for M in {1, 16, 256, 4096},
prints a table and writes results.json + results.md to the folder given as argument.
Works with torch 2.11 / triton 3.6 as well as newer versions.

    python benchmarks/gpu_check.py OUT_DIR [--formats int4 nf4 int8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

#: (N, K) = (out_features, in_features): Llama-8B q_proj and the MLP down-projection shape.
SHAPES = [(4096, 4096), (4096, 14336)]
M_VALUES = [1, 16, 256, 4096]
RANK = 16
SCALING = 2.0
GROUP = {"int4": 128, "nf4": 64, "int8": None}
#: bf16 tolerance (relative, by norm) of ours vs the fp32 reference on the same dequantized W.
BF16_REL_TOL = 1e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make_problem(fmt: str, n: int, k: int, m: int, device: str = "cuda", seed: int = 0):
    """Quantized W, LoRA A/B (bf16), bias and bf16 x for one case."""
    import qlora_kernels as qk

    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    qt = qk.quantize(w.to(device), fmt, group_size=GROUP[fmt])
    a = (torch.randn(RANK, k, generator=g) * 0.02).to(device, torch.bfloat16)
    b = (torch.randn(n, RANK, generator=g) * 0.02).to(device, torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    return qt, a, b, x


def check_correctness(fmt: str, n: int, k: int, m: int, device: str = "cuda") -> dict:
    """Forward and dx/dA/dB of backend='triton' vs the fp32 reference (autograd on qlora_linear_ref)."""
    from qlora_kernels.ops import qlora_linear, qlora_linear_ref

    qt, a, b, x = make_problem(fmt, n, k, m, device)
    errors = {}
    outs = []
    for fn, cast in ((lambda *t: qlora_linear(*t, backend="triton"), torch.bfloat16), (qlora_linear_ref, None)):
        xs = (x if cast else x.float()).clone().requires_grad_()
        al = a.clone().requires_grad_()
        bl = b.clone().requires_grad_()
        y = fn(xs, qt, al, bl, SCALING)
        dy = torch.ones_like(y) * 0.01 + torch.linspace(-0.02, 0.02, y.shape[-1], device=y.device, dtype=y.dtype)
        y.backward(dy)
        outs.append((y.detach(), xs.grad, al.grad, bl.grad))
    for name, got, ref in zip(("y", "dx", "da", "db"), outs[0], outs[1], strict=True):
        errors[name] = rel_err(got.float(), ref.float())
    errors["ok"] = all(v <= BF16_REL_TOL for v in errors.values())
    return errors


def check_forward_configs(fmt: str, n: int, k: int, m: int, device: str = "cuda", configs=None) -> list[dict]:
    """The fused forward with each config forced (default: every GPU config valid for this case,
    split-K ones included) vs the fp32 reference, run twice: y and x @ A^T errors, and whether the
    two runs are bitwise equal (split-K reduces in a fixed order: they must be)."""
    from qlora_kernels.kernels import qlora_matmul as qm
    from qlora_kernels.ops import qlora_linear_ref

    qt, a, b, x = make_problem(fmt, n, k, m, device)
    ref = qlora_linear_ref(x.float(), qt, a, b, SCALING)
    xa_ref = x.float() @ a.float().t()
    group, fmt_id = (qt.group_size if fmt != "int8" else 1), {"int8": 0, "int4": 1, "nf4": 2}[fmt]
    if configs is None:
        valid = lambda c: qm.config_is_valid(c, qm.MODE_FORWARD, group, fmt_id, qm.m_bucket(m), qm.lora_r_pad(RANK))
        configs = [c for c in qm.gpu_configs(qm.MODE_FORWARD) if valid(c)]
    tuned = qm._forward_tuned
    saved = tuned.configs, tuned.cache
    results = []
    try:
        for cfg in configs:
            tuned.configs, tuned.cache = [cfg], {}
            y1, xa1 = qm.qlora_forward_fused(x, qt, a, b, SCALING)
            y2, xa2 = qm.qlora_forward_fused(x, qt, a, b, SCALING)
            y_err, xa_err = rel_err(y1.float(), ref), rel_err(xa1, xa_ref)
            results.append({
                "format": fmt, "M": m, "config": str(cfg), "y": y_err, "xa": xa_err,
                "reproducible": bool(torch.equal(y1, y2) and torch.equal(xa1, xa2)),
                "ok": y_err <= BF16_REL_TOL and xa_err <= BF16_REL_TOL and torch.equal(y1, y2),
            })  # fmt: skip
    finally:
        tuned.configs, tuned.cache = saved
    return results


def baseline_fns(w_bf16: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """bf16 F.linear + unfused LoRA (what a PEFT layer on a bf16 base computes)."""

    def fwd(x):
        return F.linear(x, w_bf16) + SCALING * F.linear(F.linear(x, a), b)

    return fwd


def time_case(fmt: str, n: int, k: int, m: int) -> dict:
    """Median ms of forward and forward+backward, ours vs the bf16 baseline."""
    from triton.testing import do_bench

    from qlora_kernels.kernels import qlora_matmul as qm
    from qlora_kernels.ops import qlora_linear

    qt, a, b, x = make_problem(fmt, n, k, m)
    w_bf16 = qt.dequantize(torch.bfloat16)
    base = baseline_fns(w_bf16, a, b)
    ours = lambda x_: qlora_linear(x_, qt, a, b, SCALING, backend="triton")
    xg = x.clone().requires_grad_()
    al, bl = a.clone().requires_grad_(), b.clone().requires_grad_()
    base_g = baseline_fns(w_bf16, al, bl)
    dy = torch.randn(m, n, device=x.device, dtype=torch.bfloat16)

    def fb(fn):
        def run():
            fn(xg).backward(dy)

        return run

    ours_g = lambda x_: qlora_linear(x_, qt, al, bl, SCALING, backend="triton")
    row = {"format": fmt, "N": n, "K": k, "M": m}
    with torch.no_grad():
        row["ours_fwd_ms"] = do_bench(lambda: ours(x), quantiles=[0.5])
        row["base_fwd_ms"] = do_bench(lambda: base(x), quantiles=[0.5])
    row["ours_fwdbwd_ms"] = do_bench(fb(ours_g), quantiles=[0.5], grad_to_none=[xg, al, bl])
    row["base_fwdbwd_ms"] = do_bench(fb(base_g), quantiles=[0.5], grad_to_none=[xg, al, bl])
    row = {k_: (v[0] if isinstance(v, (list, tuple)) else v) for k_, v in row.items()}
    if m <= qm.FUSED_MAX_M:  # the config the autotuner chose for the fused forward (split-K or not)
        row["fwd_config"] = str(qm._forward_tuned.best_config)
    row["speedup_fwd"] = row["base_fwd_ms"] / row["ours_fwd_ms"]
    row["speedup_fwdbwd"] = row["base_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
    return row


def markdown_table(rows: list[dict]) -> str:
    head = "| format | N x K | M | ours fwd ms | bf16 fwd ms | fwd speedup | ours f+b ms | bf16 f+b ms | f+b speedup |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['N']}x{r['K']} | {r['M']} | {r['ours_fwd_ms']:.4f} | {r['base_fwd_ms']:.4f} | "
            f"{r['speedup_fwd']:.2f}x | {r['ours_fwdbwd_ms']:.4f} | {r['base_fwdbwd_ms']:.4f} | "
            f"{r['speedup_fwdbwd']:.2f}x |"
        )
    return "\n".join(lines)


def environment() -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--formats", nargs="+", default=["int4", "nf4", "int8"])
    parser.add_argument("--quick", action="store_true", help="first shape only, M in {1, 4096}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to do", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    shapes = SHAPES[:1] if args.quick else SHAPES
    m_values = [1, 4096] if args.quick else M_VALUES
    env = environment()
    print(env)
    checks = []
    for fmt in args.formats:
        for m in (1, 16, 300):
            errs = check_correctness(fmt, 1024, 2048, m)
            checks.append({"format": fmt, "M": m, **errs})
            print(f"check {fmt:5} M={m:<4} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items() if k != "ok"))
        for m in (1, 16):  # every fused forward config, split-K included (its GPU memory ordering)
            for res in check_forward_configs(fmt, 1024, 2048, m):
                checks.append(res)
                print(f"config {fmt:5} M={m:<3} y={res['y']:.2e} xa={res['xa']:.2e} "
                      f"reproducible={res['reproducible']} {res['config']}")  # fmt: skip
    rows = []
    for fmt in args.formats:
        for n, k in shapes:
            for m in m_values:
                rows.append(time_case(fmt, n, k, m))
                r = rows[-1]
                print(f"{fmt:5} {n}x{k} M={m:<5} fwd {r['speedup_fwd']:.2f}x  fwd+bwd {r['speedup_fwdbwd']:.2f}x")
    table = markdown_table(rows)
    print(table)
    payload = {"environment": env, "checks": checks, "timings": rows}
    (args.out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    (args.out_dir / "results.md").write_text(f"# QLoRA matmul on {env['device']}\n\n{table}\n")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
