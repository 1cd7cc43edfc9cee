"""Peak memory of one training step of a stack of QLoRA layers: ours vs bitsandbytes + PEFT.

Each measurement runs in a fresh subprocess so the peak resident set size (CPU) or
`max_memory_allocated` (CUDA) belongs to that provider alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

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
after_load = base_rss_mb()
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
x = torch.randn(tokens, hidden, generator=g).to(device, torch.bfloat16).requires_grad_()
model(x).float().square().mean().backward()
if opt:
    opt.step()
peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else base_rss_mb()
print(json.dumps({"provider": provider, "peak_mb": peak, "after_load_mb": after_load}))
"""


def measure(provider: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, provider, str(STACK_LAYERS), str(HIDDEN), str(TOKENS)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_memory_suite() -> list[dict]:
    rows = []
    for provider in ("ours", "bnb+peft", "bf16-frozen"):
        try:
            rows.append(measure(provider))
        except subprocess.CalledProcessError as err:
            rows.append({"provider": provider, "error": err.stderr.strip().splitlines()[-1]})
    return rows


def bytes_per_param() -> list[dict]:
    import qlora_kernels as qk

    w = torch.randn(4096, 4096)
    rows = [{"format": "bf16", "bits_per_param": 16.0}]
    for fmt, kw in (("int8", {}), ("int4", {"group_size": 64}), ("int4", {"group_size": 128}), ("nf4", {})):
        qt = qk.quantize(w, fmt, **kw)
        rows.append(
            {"format": f"{fmt} g{qt.group_size}" if fmt != "int8" else fmt, "bits_per_param": qt.bits_per_param}
        )
    return rows
