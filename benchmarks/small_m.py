"""Small-M forward on the CPU (token-by-token decoding): the fused native kernel vs its peers, in one run.

    python -m benchmarks.small_m [--threads 1,2] [--rounds 5] [--new-tokens 48] [--quick] [--out DIR]
    python -m benchmarks.small_m --crossover     # fused vs decode + matmul over M (sets SMALL_M_MAX)

For each thread count, measured in interleaved rounds (every round runs each candidate in turn,
so a busy neighbour slows all alike; the fastest round counts):

* one LoRA layer (NF4 with double quantization, r 16, alpha 32) at M = 1, shapes 4096x4096 and
  5632x2048 (N x K), x in bf16: ours (`qk.LoRALinear(qk.QuantLinear)`, backend auto = the fused
  kernel), bf16 `F.linear` + unfused LoRA, bitsandbytes `Linear4bit` NF4 + PEFT LoRA. Each
  candidate cycles through copies of its weights adding up to more than 4x the last-level cache,
  as decoding a model streams every layer's weight from memory once per token;
* a STREAM-like copy (256 MB arrays) in the same rounds: the weight bytes ours reads per second
  as a fraction of the copy bandwidth (read + write bytes, as STREAM counts them), and, for
  context, of a read-only stream (a sum over 256 MB), which is what a GEMV does;
* SmolLM2-135M-Instruct greedy decoding in tokens/s: QLoRA (NF4 on all linear layers, r 16, bf16
  compute, adapter unmerged) vs the same model dense in bf16, both through `model.generate`;
  the decoding rate excludes the prompt (time of prompt + N tokens minus prompt + 1 token).

Writes benchmarks/results/<machine>/small_m.{json,md}: the detail rows and the issue's target rows
(shaped as summary.json's rows).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qlora_kernels as qk  # noqa: E402
from benchmarks.common import RESULTS_DIR, fastest_interleaved, machine_name, markdown_table, write_report  # noqa: E402
from benchmarks.layers import ALPHA, RANK, LayerCase, build_bnb_peft  # noqa: E402
from benchmarks.suite import SUMMARY_COLUMNS, target_row  # noqa: E402
from qlora_kernels.ops import native  # noqa: E402
from qlora_kernels.ops.compute_policy import cpu_matmul_dtype  # noqa: E402

SHAPES = ((4096, 4096), (5632, 2048))  # (N, K)
COPY_MB = 256
DEFAULT_LLC_BYTES = 32 * 2**20
PROMPT = "Write a short story about a cat who learns to play the piano."
CROSSOVER_M = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


def last_level_cache_bytes() -> int:
    """The largest CPU cache (sysfs), or 32 MiB when unknown."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=DEFAULT_LLC_BYTES)


def copies_for(nbytes: int, llc: int) -> int:
    return max(1, math.ceil(4 * llc / nbytes))


def rotating(fns: list[Callable[[], Any]]) -> Callable[[], Any]:
    """Call the next of `fns` each time (each has its own weights, so none stays in cache)."""
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return run


# ----------------------------------------------------------------------------- layers
@dataclasses.dataclass
class Layer:
    """The shared weights of one shape: W (N, K) fp32, LoRA A (r, K), B (N, r), x (1, K) bf16."""

    w: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor

    @classmethod
    def make(cls, n: int, k: int) -> Layer:
        g = torch.Generator().manual_seed(0)
        return cls(
            torch.randn(n, k, generator=g) * 0.02,
            torch.randn(RANK, k, generator=g) * 0.02,
            torch.randn(n, RANK, generator=g) * 0.02,
            torch.randn(1, k, generator=g).bfloat16(),
        )


def build_ours(layer: Layer, llc: int) -> tuple[Callable[[], Any], int]:
    """Our LoRALinear on an NF4 QuantLinear; copies share nothing. Returns (run, bytes read per call)."""
    qt = qk.quantize(layer.w, "nf4")
    nbytes = qt.nbytes + (layer.a.numel() + layer.b.numel()) * 4
    modules = []
    for _ in range(copies_for(nbytes, llc)):
        copy = dataclasses.replace(qt, **{name: t.clone() for name, t in qt.tensors().items()})
        module = qk.LoRALinear(qk.QuantLinear(copy), r=RANK, alpha=ALPHA).eval()
        module.lora_A.weight.data.copy_(layer.a)
        module.lora_B.weight.data.copy_(layer.b)
        modules.append(module)

    def call(module):
        with torch.no_grad():
            return module(layer.x)

    return rotating([lambda m=m: call(m) for m in modules]), nbytes


def build_dense_bf16(layer: Layer, llc: int) -> tuple[Callable[[], Any], int]:
    """bf16 F.linear + unfused LoRA (bf16 A, B)."""
    a, b = layer.a.bfloat16(), layer.b.bfloat16()
    nbytes = layer.w.numel() * 2 + (a.numel() + b.numel()) * 2
    weights = [layer.w.bfloat16() for _ in range(copies_for(nbytes, llc))]
    scaling = ALPHA / RANK

    def call(w):
        with torch.no_grad():
            return F.linear(layer.x, w) + scaling * F.linear(F.linear(layer.x, a), b)

    return rotating([lambda w=w: call(w) for w in weights]), nbytes


def build_bnb(layer: Layer, llc: int, n: int, k: int) -> tuple[Callable[[], Any], int] | None:
    """bitsandbytes Linear4bit NF4 + PEFT LoRA (benchmarks.layers), as many copies as ours."""
    case = LayerCase(k=k, n=n, m=1, fmt="nf4", mode="fwd")
    first = build_bnb_peft(case, torch.device("cpu"))
    if first is None:
        return None
    run, nbytes = first
    runs = [run] + [build_bnb_peft(case, torch.device("cpu"))[0] for _ in range(copies_for(nbytes, llc) - 1)]
    return rotating(runs), nbytes


def stream_copy() -> tuple[Callable[[], Any], int]:
    """A STREAM-like copy of COPY_MB; returns (run, bytes moved = read + write)."""
    n = COPY_MB * 2**20 // 4
    src = torch.empty(n).uniform_()
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * n * 4


def stream_read() -> tuple[Callable[[], Any], int]:
    """A read-only stream (a sum) over COPY_MB: the bandwidth a GEMV, which only reads, can approach."""
    src = torch.empty(COPY_MB * 2**20 // 4).uniform_()
    return (lambda: src.sum()), src.numel() * 4


def layer_rows(threads: int, rounds: int, llc: int, shapes=SHAPES) -> tuple[list[dict], float]:
    """Interleaved timings of the three layers and the copy; returns (rows, best copy GB/s)."""
    torch.set_num_threads(threads)
    copy_run, copy_bytes = stream_copy()
    read_run, read_bytes = stream_read()
    rows, copy_gb_s = [], []
    for n, k in shapes:
        layer = Layer.make(n, k)
        candidates = {"ours": build_ours(layer, llc), "bf16+lora": build_dense_bf16(layer, llc)}
        bnb = build_bnb(layer, llc, n, k)
        if bnb is not None:
            candidates["bnb+peft"] = bnb
        fns = {name: run for name, (run, _) in candidates.items()}
        fns["copy"] = copy_run
        fns["read"] = read_run
        times = fastest_interleaved(fns, rounds=rounds, min_round_s=0.1)
        copy_gb_s.append(copy_bytes / (times["copy"]["min_ms"] * 1e6))
        read_gb_s = read_bytes / (times["read"]["min_ms"] * 1e6)
        for name, (_, nbytes) in candidates.items():
            ms = times[name]["min_ms"]
            rows.append(
                {
                    "threads": threads,
                    "shape": f"{n}x{k}",
                    "m": 1,
                    "provider": name,
                    "ms": ms,
                    "median_ms": times[name]["median_ms"],
                    "weight_mb": nbytes / 2**20,
                    "gb_s": nbytes / (ms * 1e6),
                    "pct_copy_bw": 100 * nbytes / (ms * 1e6) / copy_gb_s[-1],
                    "copy_gb_s": copy_gb_s[-1],
                    "pct_read_bw": 100 * nbytes / (ms * 1e6) / read_gb_s,
                    "read_gb_s": read_gb_s,
                }
            )
        del candidates, fns
    return rows, max(copy_gb_s)


# ---------------------------------------------------------------------------- decoding
def smollm2_models() -> dict[str, tuple[Any, Any]]:
    """SmolLM2-135M-Instruct dense in bf16, and QLoRA (NF4 all-linear, r 16, bf16 compute, random B)."""
    dense, tokenizer = qk.load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    qlora, _ = qk.load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    qk.prepare_model(qlora, "qlora", quant="nf4", target_modules="all-linear", r=RANK, alpha=ALPHA)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return {"qlora nf4": (qlora.eval(), tokenizer), "dense bf16": (dense.eval(), tokenizer)}


def decode_rows(models: dict[str, tuple[Any, Any]], threads: int, rounds: int, new_tokens: int) -> list[dict]:
    """Greedy decoding tokens/s of each model, in interleaved rounds (fastest round)."""
    torch.set_num_threads(threads)
    rates: dict[str, list[float]] = {name: [] for name in models}

    def generate(model, ids, count):
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
            return time.perf_counter() - start

    prompts = {}
    for name, (model, tokenizer) in models.items():
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
        )
        prompts[name] = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        generate(model, prompts[name], 4)  # warm-up
    for _ in range(rounds):
        for name, (model, _) in models.items():
            first = generate(model, prompts[name], 1)
            full = generate(model, prompts[name], new_tokens + 1)
            rates[name].append(new_tokens / max(full - first, 1e-9))
    return [
        {
            "threads": threads,
            "model": name,
            "tokens_s": max(r),
            "median_tokens_s": sorted(r)[len(r) // 2],
            "new_tokens": new_tokens,
            "prompt_tokens": int(prompts[name].shape[1]),
        }
        for name, r in rates.items()
    ]


# ----------------------------------------------------------------------------- targets
def target_rows(layers: list[dict], decoding: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets, one row per thread count (and shape), shaped as summary.json's rows.

    The bandwidth row compares with the copy timed in the same interleaved rounds as that shape."""
    out = []
    by = {(r["threads"], r["shape"], r["provider"]): r for r in layers}
    for threads, shape in sorted({(r["threads"], r["shape"]) for r in layers}):
        ours = by[(threads, shape, "ours")]
        dense = by[(threads, shape, "bf16+lora")]
        bnb = by.get((threads, shape, "bnb+peft"))
        label = f"cpu: M=1 NF4+LoRA r16 forward {shape}, {threads} thread{'s' if threads > 1 else ''}"
        out.append(
            target_row(
                f"{label}: vs bf16 F.linear + LoRA",
                ours["ms"],
                dense["ms"],
                "ms",
                ">= 2.0x faster than bf16 F.linear + LoRA",
                higher_is_better=False,
                threshold=2.0,
                strict=False,
                note="weights cycle through > 4x the last-level cache",
            )
        )
        out.append(
            target_row(
                f"{label}: vs bitsandbytes Linear4bit + PEFT",
                ours["ms"],
                bnb["ms"] if bnb else None,
                "ms",
                ">= 3x faster than bitsandbytes Linear4bit + PEFT",
                higher_is_better=False,
                threshold=3.0,
                strict=False,
                note=None if bnb else "bitsandbytes or peft not installed",
            )
        )
        out.append(
            target_row(
                f"{label}: weight GB/s vs a STREAM-like copy",
                ours["gb_s"],
                ours["copy_gb_s"],
                "GB/s",
                ">= 60% of the copy bandwidth measured in the same run",
                higher_is_better=True,
                threshold=0.6,
                strict=False,
                note=f"packed weight + scales + LoRA bytes per call; copy counts read + write ({COPY_MB} MB arrays); "
                f"{ours['pct_read_bw']:.0f}% of a read-only stream ({ours['read_gb_s']:.1f} GB/s)",
            )
        )
    rates = {(r["threads"], r["model"]): r for r in decoding}
    for threads in sorted({r["threads"] for r in decoding}):
        ours, dense = rates[(threads, "qlora nf4")], rates[(threads, "dense bf16")]
        out.append(
            target_row(
                f"cpu: SmolLM2-135M QLoRA greedy decoding tokens/s vs dense bf16, {threads} "
                f"thread{'s' if threads > 1 else ''}",
                ours["tokens_s"],
                dense["tokens_s"],
                "tokens/s",
                ">= 1.5x the tokens/s of the same model's dense bf16 decoding",
                higher_is_better=True,
                threshold=1.5,
                strict=False,
                note=f"NF4 all-linear r16, bf16 compute, adapter unmerged; {ours['new_tokens']} new tokens after a "
                f"{ours['prompt_tokens']}-token prompt",
            )
        )
    return out


# --------------------------------------------------------------------------- crossover
def crossover_rows(threads: int, rounds: int, n: int = 2048, k: int = 2048) -> list[dict]:
    """Fused kernel vs decode-into-buffer + matmul (the large-M CPU path) over M: where to switch."""
    torch.set_num_threads(threads)
    layer = Layer.make(n, k)
    qt = qk.quantize(layer.w, "nf4")
    a, b, scaling = layer.a, layer.b, ALPHA / RANK
    rows = []
    for m in CROSSOVER_M:
        x = torch.randn(m, k).bfloat16()

        def decode_then_matmul(x=x):  # the large-M CPU path, in the dtype the compute policy picks
            xc = x.to(cpu_matmul_dtype(x.dtype))
            y = native.workspace().matmul(xc, qt)
            y.addmm_(xc @ a.to(xc.dtype).t(), b.to(xc.dtype).t(), alpha=scaling)
            return y.to(x.dtype)

        times = fastest_interleaved(
            {
                "fused": lambda x=x: native.fused_small_m_forward(x, qt, a, b, scaling),
                "decode+matmul": decode_then_matmul,
            },
            rounds=rounds,
            min_round_s=0.05,
        )
        fused, dense = times["fused"]["min_ms"], times["decode+matmul"]["min_ms"]
        rows.append(
            {
                "threads": threads,
                "shape": f"{n}x{k}",
                "m": m,
                "fused_ms": fused,
                "decode_matmul_ms": dense,
                "ratio": dense / fused,
            }
        )
    return rows


# -------------------------------------------------------------------------------- main
LAYER_COLUMNS = [
    ("threads", "threads"),
    ("shape", "N x K"),
    ("provider", "provider"),
    ("ms", "ms (fastest round)"),
    ("median_ms", "ms (median round)"),
    ("weight_mb", "MB read"),
    ("gb_s", "GB/s"),
    ("pct_copy_bw", "% of copy BW"),
    ("pct_read_bw", "% of read BW"),
]
DECODE_COLUMNS = [
    ("threads", "threads"),
    ("model", "model"),
    ("tokens_s", "tokens/s (fastest round)"),
    ("median_tokens_s", "tokens/s (median)"),
]
CROSSOVER_COLUMNS = [
    ("threads", "threads"),
    ("shape", "N x K"),
    ("m", "M"),
    ("fused_ms", "fused ms"),
    ("decode_matmul_ms", "decode + matmul ms"),
    ("ratio", "speed-up of fused"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.small_m", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement (default 5)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per SmolLM2 run (default 48)")
    parser.add_argument("--quick", action="store_true", help="one shape, 2 rounds, 16 tokens (a smoke run)")
    parser.add_argument("--no-decode", action="store_true", help="skip the SmolLM2 decoding measurement")
    parser.add_argument("--crossover", action="store_true", help="only measure fused vs decode + matmul over M")
    parser.add_argument("--out", help="result folder (default benchmarks/results/<machine>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not native.fused_small_m_applies(torch.zeros(1, 64), qk.quantize(torch.randn(8, 64), "nf4")):
        raise SystemExit(f"the fused kernel is not available here ({native.native_status().error or 'no AVX2'})")
    threads = [int(t) for t in args.threads.split(",")]
    out_dir = Path(args.out) if args.out else RESULTS_DIR / machine_name()
    rounds = 2 if args.quick else args.rounds
    started = time.perf_counter()
    if args.crossover:
        rows = [row for t in threads for row in crossover_rows(t, rounds)]
        table = markdown_table(rows, CROSSOVER_COLUMNS)
        write_report("small_m_crossover", rows, table, out_dir)
        print(table)
        return 0
    llc = last_level_cache_bytes()
    shapes = SHAPES[:1] if args.quick else SHAPES
    layers, copy_bw = [], {}
    for t in threads:
        rows, copy_bw[t] = layer_rows(t, rounds, llc, shapes)
        layers += rows
    decoding = []
    if not args.no_decode:
        models = smollm2_models()
        new_tokens = 16 if args.quick else args.new_tokens
        for t in threads:
            decoding += decode_rows(models, t, rounds if args.quick else max(2, rounds // 2), new_tokens)
    targets = target_rows(layers, decoding)
    table = "\n\n".join(
        [
            "## Targets\n\n" + markdown_table(targets, SUMMARY_COLUMNS),
            "## M = 1 layer forward (x bf16, NF4 double quant, LoRA r16)\n\n" + markdown_table(layers, LAYER_COLUMNS),
            "## SmolLM2-135M-Instruct greedy decoding\n\n" + markdown_table(decoding, DECODE_COLUMNS),
        ]
    )
    extra = {
        "targets": targets,
        "decoding": decoding,
        "copy_gb_s": copy_bw,
        "llc_bytes": llc,
        "kernel_isa": native.small_m_isa(),
        "seconds": time.perf_counter() - started,
    }
    write_report("small_m", layers, table, out_dir, extra=extra)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
