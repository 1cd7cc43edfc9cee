"""Peak memory of one training step of a stack of QLoRA layers: ours vs bitsandbytes + PEFT.

Each measurement runs in a fresh subprocess so the peak resident set size (CPU) or
`max_memory_allocated` (CUDA) belongs to that provider alone. On the CPU two peaks are kept:
`peak_mb`, the process's high-water mark (building and quantizing the layers included; read from
VmHWM, which starts fresh at exec, unlike ru_maxrss, which Linux carries over from the parent), and
`step_peak_mb`, the high-water mark of the training step alone (Linux resets it when "5" is
written to /proc/self/clear_refs, done right before the step); `step_extra_mb` is what the step
added on top of the resident set before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

STACK_LAYERS = 8
HIDDEN = 2048
TOKENS = 256

_CHILD = r"""
import json, resource, sys, torch
from torch import nn
from benchmarks.layers import ALPHA, RANK
provider, layers, hidden, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
g = torch.Generator().manual_seed(0)
def base_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return base_rss_mb()
def reset_hwm():
    try:
        open("/proc/self/clear_refs", "w").write("5")
        return True
    except OSError:
        return False
blocks = []
for _ in range(layers):
    w = torch.randn(hidden, hidden, generator=g) * 0.02
    if provider == "ours":
        import qlora_kernels as qk
        blocks.append(qk.LoRALinear(qk.QuantLinear(qk.quantize(w, "nf4")), r=RANK, alpha=ALPHA))
    elif provider == "bnb+peft":
        import bitsandbytes as bnb, peft
        lin = bnb.nn.Linear4bit(hidden, hidden, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
        seq = nn.Sequential(); seq.add_module("proj", lin.to(device))
        blocks.append(peft.get_peft_model(seq, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"])))
    else:
        lin = nn.Linear(hidden, hidden, bias=False, dtype=torch.bfloat16); lin.weight.data.copy_(w)
        lin.requires_grad_(False)
        blocks.append(lin)
model = nn.Sequential(*blocks).to(device)
del w
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4) if params else None
after_load = hwm_mb()  # VmHWM starts fresh at exec; ru_maxrss would carry the parent's peak over
current = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
reset = reset_hwm()
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
x = torch.randn(tokens, hidden, generator=g).to(device, torch.bfloat16).requires_grad_()
model(x).float().square().mean().backward()
if opt:
    opt.step()
step_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else hwm_mb()
peak = step_peak if device.type == "cuda" else max(after_load, step_peak)
print(json.dumps({"provider": provider, "peak_mb": peak, "after_load_mb": after_load, "rss_before_step_mb": current,
                  "step_peak_mb": step_peak, "step_extra_mb": step_peak - current, "hwm_reset": reset}))
"""


def measure(provider: str) -> dict:
    """One provider's step in a fresh process (repo root on PYTHONPATH); the child's JSON line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, provider, str(STACK_LAYERS), str(HIDDEN), str(TOKENS)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_memory_suite() -> list[dict]:
    """Ours, bitsandbytes + PEFT and a frozen bf16 stack (no LoRA: the dense reference), one process each."""
    rows = []
    for provider in ("ours", "bnb+peft", "bf16-frozen"):
        try:
            rows.append(measure(provider))
        except subprocess.CalledProcessError as err:
            rows.append({"provider": provider, "error": err.stderr.strip().splitlines()[-1]})
    return rows


def bytes_per_param() -> list[dict]:
    """Bits per parameter of each weight format (scales included) on a 4096x4096 weight."""
    import qlora_kernels as qk

    w = torch.randn(4096, 4096)
    rows = [{"format": "bf16", "bits_per_param": 16.0}]
    for fmt, kw in (("int8", {}), ("int4", {"group_size": 64}), ("int4", {"group_size": 128}), ("nf4", {})):
        qt = qk.quantize(w, fmt, **kw)
        rows.append(
            {"format": f"{fmt} g{qt.group_size}" if fmt != "int8" else fmt, "bits_per_param": qt.bits_per_param}
        )
    return rows
