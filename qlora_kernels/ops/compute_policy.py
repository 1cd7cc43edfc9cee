"""Which dtype the CPU computes in: bf16 where this host's bf16 GEMM beats fp32, fp32 elsewhere.

CPUs differ a lot here. An AMD EPYC with AVX-512 BF16 ran a bf16 matmul at 4x its fp32 rate;
an Intel Xeon with AVX-512 but no AMX ran bf16 at 0.5-0.6x fp32. The flags do not separate the
two, so the choice is measured, not assumed:

1. An explicit `set_cpu_compute_dtype` wins (the trainer calls it for ``dtype: bf16`` / ``fp32``),
   then ``QK_CPU_DTYPE`` (``bf16`` | ``fp32`` | ``auto``) in the environment.
2. An x86 CPU without bf16 dot-product instructions (``avx512_bf16``, ``amx_bf16``) gets fp32
   without measuring: there oneDNN widens every bf16 operand to fp32.
3. Otherwise a micro-benchmark of well under a second times bf16 and fp32 matmuls of a
   training-sized shape on one thread, interleaved, and picks bf16 when it is at least
   `BF16_MIN_SPEEDUP` times faster.

The decision is made once per process and cached. It governs the CPU path of `qlora_linear`
for bf16 inputs (decode straight into bf16, multiply in bf16 with fp32 accumulation, the LoRA
path in bf16 too; fp32 inputs always compute in fp32) and the trainer's ``dtype: auto``.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_VAR = "QK_CPU_DTYPE"
CHOICES = ("auto", "bf16", "fp32")
BF16_MIN_SPEEDUP = 1.25  # bf16 must win clearly: the quantized path also pays a decode per matmul
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# 256 tokens x SmolLM2's MLP width: large enough for the GEMM's steady state, about 0.45 GFLOP per
# product (about 4 ms in fp32 on one EPYC core), small enough that the whole measurement stays
# under 0.2 s on a CPU without a fast bf16 GEMM.
PROBE_SHAPE = (256, 576, 1536)
PROBE_ROUNDS = 7

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class ComputeDtypeDecision:
    """The CPU compute dtype, and why it was chosen (shown by ``qlora-kernels info`` and run reports)."""

    name: str  # "bf16" | "fp32"
    reason: str
    source: str  # "env" | "explicit" | "cpu flags" | "measured"
    speedup: float | None = None  # bf16 / fp32 throughput, when measured

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def describe(self) -> str:
        return f"{self.name} ({self.source}: {self.reason})"


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_bf16_speedup(shape: tuple[int, int, int] = PROBE_SHAPE, rounds: int = PROBE_ROUNDS) -> float:
    """fp32 time / bf16 time of one ``(M, K) @ (K, N)`` product on one thread.

    One thread and the fastest of interleaved rounds: on a shared machine a multi-threaded
    product of a few milliseconds mostly measures how long the other threads wait to be
    scheduled, which hides the instruction set's difference (seen: 1.0x instead of 4x).
    """
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a32 = torch.randn(m, k, generator=generator)
    b32 = torch.randn(k, n, generator=generator)
    a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):  # warm up both code paths (oneDNN primitive creation)
            torch.mm(a32, b32)
            torch.mm(a16, b16)
        fp32_best = bf16_best = float("inf")
        for _ in range(rounds):
            fp32_best = min(fp32_best, _seconds(lambda: torch.mm(a32, b32)))
            bf16_best = min(bf16_best, _seconds(lambda: torch.mm(a16, b16)))
    finally:
        torch.set_num_threads(threads)
    return fp32_best / bf16_best


def _parse_choice(value: str, where: str) -> str:
    choice = value.strip().lower()
    aliases = {"bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
    choice = aliases.get(choice, choice)
    if choice not in CHOICES:
        raise ValueError(f"{where} must be one of {CHOICES}, got {value!r}")
    return choice


def decide_cpu_compute_dtype(
    env: str | None = None,
    flags: frozenset[str] | None = None,
    measure=measure_bf16_speedup,
    machine: str | None = None,
) -> ComputeDtypeDecision:
    """Decide from the environment value, the CPU flags and a measurement (all injectable for tests)."""
    if env:
        choice = _parse_choice(env, ENV_VAR)
        if choice != "auto":
            return ComputeDtypeDecision(choice, f"{ENV_VAR}={env}", "env")
    machine = (machine or platform.machine()).lower()
    flags = cpu_flags() if flags is None else flags
    if machine in ("x86_64", "amd64", "i686", "x86") and not flags & set(BF16_CPU_FLAGS):
        return ComputeDtypeDecision(
            "fp32", f"this x86 CPU has no bf16 dot-product instructions ({', '.join(BF16_CPU_FLAGS)})", "cpu flags"
        )
    speedup = measure()
    have = sorted(flags & set(BF16_CPU_FLAGS))
    detail = f"bf16 matmul {speedup:.2f}x the fp32 rate at {'x'.join(map(str, PROBE_SHAPE))}"
    detail += f" ({', '.join(have)})" if have else ""
    name = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    detail += "" if name == "bf16" else f"; bf16 needs >= {BF16_MIN_SPEEDUP}x"
    return ComputeDtypeDecision(name, detail, "measured", speedup)


_explicit: list[ComputeDtypeDecision] = []


@functools.cache
def _automatic_decision() -> ComputeDtypeDecision:
    return decide_cpu_compute_dtype(os.environ.get(ENV_VAR))


def cpu_compute_dtype() -> ComputeDtypeDecision:
    """This process's CPU compute dtype: an explicit choice, else the environment, else measured once."""
    return _explicit[0] if _explicit else _automatic_decision()


def set_cpu_compute_dtype(value: str | None) -> ComputeDtypeDecision:
    """Override the automatic choice for this process ("bf16" / "fp32"); "auto" or None restores it."""
    if value is None or _parse_choice(value, "cpu compute dtype") == "auto":
        _explicit.clear()
    else:
        _explicit[:] = [ComputeDtypeDecision(_parse_choice(value, "cpu compute dtype"), "set explicitly", "explicit")]
    return cpu_compute_dtype()


def cpu_matmul_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU path multiplies inputs of `x_dtype` in: bf16 inputs stay bf16 where bf16
    is the chosen compute dtype; everything else (fp32, fp16, bf16 on a slow-bf16 host) in fp32."""
    if x_dtype == torch.bfloat16 and cpu_compute_dtype().name == "bf16":
        return torch.bfloat16
    return torch.float32
