"""What the parts of `benchmarks.gpu_check` share: the run profile (full GPU run or CPU smoke),
timing, errors against a reference, the deadline of a part and its record log.

A part runs in a child process and appends one JSON line per result to its record file, so
whatever it measured before a crash or a timeout still reaches the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Llama-3.2-1B and Llama-3-8B, from their published configs (random weights, no download).
LLAMA_3_2_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
LLAMA_3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
#: The linear layers LoRA targets in every model run (both ours and PEFT's).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one run: `FULL` on a CUDA GPU, `SMOKE` on the CPU (interpreter)."""

    name: str
    device: str
    dtype: torch.dtype  # activation / compute dtype
    formats: tuple[str, ...]
    groups: dict[str, int | None]
    rank: int
    scaling: float
    check_shape: tuple[int, int]  # (N, K) of the per-config correctness checks
    layer_shapes: tuple[tuple[int, int], ...]  # (N, K) = (out_features, in_features)
    layer_ms: tuple[int, ...]
    path_ms: tuple[int, ...]  # M at which both the fused and the dense path are timed
    models: tuple[tuple[str, dict], ...]
    batch: int
    seq: int
    sft_warmup: int
    sft_steps: int
    prompt_tokens: int
    decode_tokens: int
    bench_warmup_ms: int
    bench_rep_ms: int
    cpu_repeats: int  # timed calls per measurement on the CPU (the GPU uses bench_rep_ms)
    workers: int  # processes of the per-config check
    budgets: dict[str, float]  # seconds per part

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def autocast(self):
        """bf16 autocast on the GPU (as training runs); nothing in the fp32 CPU smoke run."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.dtype)


FULL = Profile(
    name="full",
    device="cuda",
    dtype=torch.bfloat16,
    formats=("nf4", "int4", "int8"),
    groups={"nf4": 64, "int4": 128, "int8": None},
    rank=16,
    scaling=2.0,
    check_shape=(1024, 2048),
    layer_shapes=((4096, 4096), (14336, 4096), (4096, 14336)),
    layer_ms=(1, 4, 16, 64, 256, 1024, 4096, 8192),
    path_ms=(4, 16, 64),
    models=(("llama-3.2-1b", LLAMA_3_2_1B), ("llama-3-8b", LLAMA_3_8B)),
    batch=8,
    seq=512,
    sft_warmup=2,
    sft_steps=3,
    prompt_tokens=32,
    decode_tokens=48,
    bench_warmup_ms=5,
    bench_rep_ms=25,
    cpu_repeats=3,
    workers=8,
    # Budgets, not durations: on an H200 (2026-11-28) configs took 17 s, pytest 44 s and models
    # 63 s; layers needs about 6 s per row (24 rows). About 5.5 minutes in all.
    budgets={"configs": 60, "pytest": 60, "layers": 170, "models": 110},
)

SMOKE = Profile(
    name="smoke",
    device="cpu",
    dtype=torch.float32,
    formats=("nf4", "int4", "int8"),
    groups={"nf4": 64, "int4": 64, "int8": None},
    rank=4,
    scaling=2.0,
    check_shape=(48, 128),
    layer_shapes=((48, 128),),
    layer_ms=(24,),
    path_ms=(24,),
    models=(("tiny-llama", TINY_LLAMA),),
    batch=2,
    seq=40,  # 80 tokens: the SFT step takes the dense path; decoding takes the fused kernel
    sft_warmup=1,
    sft_steps=1,
    prompt_tokens=4,
    decode_tokens=2,
    bench_warmup_ms=0,
    bench_rep_ms=0,
    cpu_repeats=1,
    workers=2,
    budgets={"configs": 90, "pytest": 90, "layers": 90, "models": 120},
)

PROFILES = {p.name: p for p in (FULL, SMOKE)}


# --------------------------------------------------------------------------------- timing
def bench_ms(fn: Callable[[], Any], profile: Profile, grad_to_none=None) -> float:
    """Median time of fn() in ms: triton's do_bench (CUDA events, L2 flushed) on the GPU; on
    the CPU the median of `profile.cpu_repeats` timed calls after one warm-up."""
    if profile.device == "cuda":
        from triton.testing import do_bench

        median = do_bench(
            fn, warmup=profile.bench_warmup_ms, rep=profile.bench_rep_ms, grad_to_none=grad_to_none, quantiles=[0.5]
        )
        return float(median[0] if isinstance(median, (list, tuple)) else median)
    fn()
    times = []
    for _ in range(profile.cpu_repeats):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gb_s(device: torch.device, nbytes: int) -> float:
    """Measured device memory bandwidth: a large copy, bytes read + written over the median time."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(8):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i >= 2:  # the first copies page memory in
            times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def matmul_tflop_s(device: torch.device, dtype: torch.dtype, side: int) -> float:
    """Measured dense matmul rate on random data (not zeros: those run faster on some cards)."""
    a = torch.randn(side, side, device=device).to(dtype)
    b = torch.randn(side, side, device=device).to(dtype)
    times = []
    for i in range(6):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * side**3 / statistics.median(times) / 1e12


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in fp64; NaN anywhere in got gives inf."""
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


# ------------------------------------------------------------------------- part plumbing
class Deadline:
    """The end of a part's time budget (time.monotonic seconds)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self, reserve: float = 0.0) -> bool:
        """True when less than `reserve` seconds are left."""
        return self.left() < reserve


class Records:
    """Appends one JSON object per line to the part's record file, flushed at once, and prints it."""

    def __init__(self, path: Path, part: str) -> None:
        self.path = path
        self.part = part

    def add(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, **fields}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}
        print(f"[{self.part}] {kind}: {json.dumps(shown, default=str)}", flush=True)

    def note(self, text: str) -> None:
        print(f"[{self.part}] {text}", flush=True)


def read_records(path: Path) -> list[dict]:
    """The records a part wrote (a torn last line, from a killed child, is dropped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def environment() -> dict[str, Any]:
    """Versions and the device of this process."""
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "peft", "bitsandbytes", "torchao"):
        try:  # the installed version, without importing (bitsandbytes takes seconds to import)
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    else:
        info["device"] = "cpu"
    info["cpu_count"] = os.cpu_count()
    return info
