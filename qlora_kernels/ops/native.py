"""The optional C++ extension ``qlora_kernels._native``: loading, the "native" backend, reused buffers.

The extension (csrc/, built by ``QK_BUILD_NATIVE=1 pip install -e . --no-build-isolation``, which
scripts/bootstrap.sh runs) registers ``torch.ops.qlora_kernels.dequantize_{int8,int4,nf4}_into``:
one-pass CPU dequantization into a caller-provided fp32/bf16/fp16 buffer, bit-identical to the
PyTorch reference; and ``qlora_small_m``: the fused forward y = x W^T + scaling (x A^T) B^T + bias
for a few rows of x (token-by-token decoding), W decoded in registers (`fused_small_m_forward`).
Without it every caller falls back to the reference; only an explicit ``backend="native"`` raises.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..common import FLOAT_DTYPES
from ..formats import QuantizedTensor, dynamic_table, nf4_table
from .compute_policy import cpu_matmul_dtype

EXTENSION = "qlora_kernels._native"
OP_NAMES: tuple[str, ...] = (
    "dequantize_int8_into",
    "dequantize_int4_into",
    "dequantize_nf4_into",
    "qlora_small_m",
    "small_m_isa",
    "set_small_m_task_macs",
)
BUILD_HINT = (
    "build it with `QK_BUILD_NATIVE=1 pip install -e . --no-build-isolation` (scripts/bootstrap.sh does this; "
    "needs a C++ compiler)"
)


@dataclasses.dataclass(frozen=True)
class NativeStatus:
    """Whether the extension loaded, which operators it registered, and why not if it failed."""

    available: bool
    ops: tuple[str, ...] = ()
    error: str | None = None


def _import_extension() -> ModuleType:
    """Import the compiled module (its import registers the torch operators)."""
    return importlib.import_module(EXTENSION)


def _built_library() -> Path | None:
    """A compiled ``_native`` library next to the package, if one exists."""
    package_dir = Path(__file__).resolve().parent.parent
    return next(iter(sorted(package_dir.glob("_native*.so")) + sorted(package_dir.glob("_native*.pyd"))), None)


@functools.cache
def native_status() -> NativeStatus:
    """Load the extension once. A missing module means "not built"; a library that exists but
    fails to load (e.g. built against another torch) is reported with a warning, not hidden."""
    try:
        _import_extension()
    except ImportError as err:
        library = _built_library()
        if library is not None and not isinstance(err, ModuleNotFoundError):
            warnings.warn(
                f"{library} exists but failed to load ({err}); using the PyTorch reference. Rebuild it: {BUILD_HINT}",
                RuntimeWarning,
                stacklevel=2,
            )
            return NativeStatus(False, (), f"failed to load {library.name}: {err}")
        return NativeStatus(False, (), f"extension not built ({err})")
    present = tuple(name for name in OP_NAMES if hasattr(torch.ops.qlora_kernels, name))
    missing = sorted(set(OP_NAMES) - set(present))
    if missing:
        warnings.warn(
            f"{EXTENSION} loaded but lacks operators {missing}: it is stale; rebuild it: {BUILD_HINT}",
            RuntimeWarning,
            stacklevel=2,
        )
        return NativeStatus(False, present, f"stale build: missing operators {missing}")
    torch.ops.qlora_kernels.set_small_m_task_macs(small_m_task_macs())
    return NativeStatus(True, present, None)


def small_m_task_macs() -> int:
    """Multiply-adds below which the fused small-M kernel keeps a call on one thread.

    Idle OpenMP threads that sleep (OMP_WAIT_POLICY=PASSIVE, the package's default when it is
    imported before torch) take about as long to wake as 2^20 multiply-adds take one core;
    spinning ones (torch imported first, or another policy) are at hand. SmolLM2 QLoRA greedy
    decoding on 2 threads (2-core AMD EPYC): with spinning threads 65.5 tokens/s at 2^20, 68.7 at
    2^18, 69.1 at 2^16 and 68.0 at 2^14 (interleaved in one process; dense bf16 49.4); with sleeping
    ones 2^16 cost a third of the rate (1.19x dense bf16 against 1.81x). OpenMP reads the policy
    when torch loads, which the environment variable still tells (this package sets it only before
    torch loads).
    """
    passive = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
    return 1 << 20 if passive else 1 << 16


def native_available() -> bool:
    """True when the extension is built and loads with all its operators."""
    return native_status().available


def native_ops() -> tuple[str, ...]:
    """Names of the ``torch.ops.qlora_kernels`` operators the extension registered (empty when absent)."""
    return native_status().ops


def _require_native() -> None:
    status = native_status()
    if not status.available:
        raise ValueError(
            f"backend='native' is unavailable: {status.error}. Either {BUILD_HINT}, "
            "or use backend='auto' (falls back to the PyTorch reference) or backend='torch'"
        )


# ------------------------------------------------------------------------------ dequantize
def dequantize_into(qt: QuantizedTensor, out: torch.Tensor) -> torch.Tensor:
    """Decode `qt` into the contiguous CPU tensor `out` (shape qt.shape, fp32/bf16/fp16); returns `out`."""
    _require_native()
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"dequantize_into: qt must be a QuantizedTensor (qk.quantize(...)), got {type(qt).__name__}")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(qt.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"dequantize_into: out must be a tensor of the weight's shape {tuple(qt.shape)}, got {got}")
    if out.dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize_into: out's dtype must be one of {FLOAT_DTYPES}, got {out.dtype}")
    ops = torch.ops.qlora_kernels
    if qt.format == "int8":
        ops.dequantize_int8_into(qt.data, qt.scales, out)
    elif qt.format == "int4":
        ops.dequantize_int4_into(qt.data, qt.scales, qt.mins, qt.group_size, out)
    elif qt.format == "nf4":
        device = qt.data.device
        nested = dynamic_table(device) if qt.double_quant else None
        ops.dequantize_nf4_into(
            qt.data,
            qt.scales,
            nf4_table(device),
            qt.group_size,
            nested,
            qt.absmax_scales,
            qt.absmax_offset,
            out,
        )
    else:
        raise ValueError(f"dequantize_into: unknown format {qt.format!r}")
    # The operator writes in place without autograd seeing it: bump the version counter so a
    # buffer that autograd saved and that is then overwritten raises instead of giving wrong grads.
    torch.autograd.graph.increment_version(out)
    return out


def dequantize_native(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """``qt.dequantize(dtype, backend="native")``: a new (N, K) tensor of `dtype`."""
    _require_native()
    if qt.device.type != "cpu":
        raise ValueError(
            f"backend='native' runs on the CPU, but the weight is on {qt.device}: "
            "use backend='triton' (or 'auto') for CUDA weights, or move it with qt.to('cpu')"
        )
    return dequantize_into(qt, torch.empty(qt.shape, dtype=dtype))


# --------------------------------------------------------------------------- reused buffer
class DequantWorkspace:
    """One dense buffer per dtype, grown to the largest weight seen and reused for every layer.

    ``dequantize(qt, dtype)`` returns a view of the buffer that the next call overwrites: use
    it at once (e.g. in a matmul) and never let autograd save it; `matmul` does both safely.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode `qt` (on the CPU) into the shared buffer; valid until the next call."""
        numel = qt.numel()
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[dtype] = torch.empty(numel, dtype=dtype)
        return dequantize_into(qt, buffer[:numel].view(qt.shape))

    def matmul(self, x: torch.Tensor, qt: QuantizedTensor, *, transpose: bool = True) -> torch.Tensor:
        """``x @ W^T`` (or ``x @ W`` with transpose=False) for 2-D `x`, W decoded in x's dtype.

        Runs without autograd (for use inside an `autograd.Function`), so the buffer is never saved.
        """
        with torch.no_grad():
            w = self.dequantize(qt, x.dtype)
            return x @ (w.t() if transpose else w)

    def clear(self) -> None:
        """Free the buffers."""
        self._buffers.clear()


_local = threading.local()


def workspace() -> DequantWorkspace:
    """This thread's shared `DequantWorkspace` (threads never share a buffer)."""
    ws = getattr(_local, "workspace", None)
    if ws is None:
        ws = _local.workspace = DequantWorkspace()
    return ws


# ------------------------------------------------------------------------ fused small-M forward
#: Largest number of rows of x (M) the fused kernel serves: token-by-token decoding and batched
#: evaluation (16 prompts at a time), the issue's scope. Measured (`python -m benchmarks.small_m
#: --crossover`, NF4 double quant + LoRA r16, 2048x2048, x bf16): on a Xeon computing in fp32 the
#: fused kernel took 1.10 ms at M = 16 against 2.75 ms for decoding into the shared buffer + fp32
#: matmul, still ahead at M = 128; on an AMD EPYC computing in bf16 (bf16 dot products against a
#: decode + bf16 GEMM, W in the L3 cache) 0.53 against 0.93 ms at M = 16, ahead up to M = 32 on 1
#: thread and M = 48 on 2. Raising the threshold (short prompts' prefill) needs that measurement on
#: the target machine, with W larger than its cache too (each 8 rows of x read W once more).
SMALL_M_MAX = 16
SMALL_M_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ISAS = ("auto", "avx512_bf16", "avx512", "avx2", "scalar")


def small_m_isa() -> str:
    """The fused kernel's best instruction set on this CPU: "avx512_bf16" (AVX-512 with bf16 dot
    products), "avx512", "avx2" or "scalar" ("" without the extension)."""
    if not native_available():
        return ""
    return _best_isa()


@functools.cache
def _best_isa() -> str:
    return torch.ops.qlora_kernels.small_m_isa()  # fixed for the process: one dispatcher call, not one per layer call


@functools.cache
def _vector_isa() -> bool:
    return small_m_isa() in ("avx512_bf16", "avx512", "avx2")


def _bf16_dot_isa(x_dtype: torch.dtype, qt: QuantizedTensor) -> bool:
    """Whether `isa="auto"` takes the bf16 dot products: bf16 x times a 4-bit weight, on a CPU
    that has them, while the compute-dtype policy multiplies bf16 inputs in bf16 (the dense path
    then rounds the decoded weight to bf16 too)."""
    return (
        x_dtype == torch.bfloat16
        and qt.format != "int8"
        and small_m_isa() == "avx512_bf16"
        and cpu_matmul_dtype(torch.bfloat16) == torch.bfloat16
    )


def small_m_serves(x_dtype: torch.dtype, qt: QuantizedTensor) -> bool:
    """Whether the fused kernel can run for x of this dtype and this weight, whatever x's shape:
    the extension is built, the CPU has AVX2 or AVX-512, x is fp32/bf16/fp16, W is on the CPU."""
    return x_dtype in SMALL_M_DTYPES and qt.data.device.type == "cpu" and native_available() and _vector_isa()


def fused_small_m_applies(x: torch.Tensor, qt: QuantizedTensor) -> bool:
    """True when `fused_small_m_forward` serves this call: `small_m_serves`, and x is a 2-D CPU
    tensor with 1..SMALL_M_MAX rows."""
    return x.dim() == 2 and 0 < x.shape[0] <= SMALL_M_MAX and x.device.type == "cpu" and small_m_serves(x.dtype, qt)


def _fp32_operand(t: torch.Tensor, detach: bool) -> torch.Tensor:
    """t as a contiguous fp32 tensor outside autograd (itself when it already is one: no per-call ops)."""
    if detach:
        t = t.detach()
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def fused_small_m_forward(
    x: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    *,
    isa: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = x @ W^T + scaling * (x @ A^T) @ B^T + bias in one pass over the packed weight -> (y, xa).

    x: (M, K) fp32, bf16 or fp16 on the CPU; y: (M, N) in x's dtype, accumulated in fp32;
    xa = x @ A^T: (M, r) fp32 (what the autograd function saves for the backward), or None
    without LoRA. lora_a / lora_b are used in fp32 (converted if stored otherwise). Every output
    is computed by one thread in a fixed order, so the result does not depend on the thread count.
    isa: "auto" (the best this CPU has: for bf16 x and a 4-bit weight, where the compute-dtype
    policy multiplies in bf16, bf16 dot products with the decoded weight rounded to bf16, as the
    dense bf16 path rounds it; otherwise exact fp32 products), or "avx512_bf16" / "avx512" /
    "avx2" / "scalar" to pin a code path (tests).
    """
    _require_native()
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"fused_small_m_forward: qt must be a QuantizedTensor, got {type(qt).__name__}")
    if isa not in ISAS:
        raise ValueError(f"fused_small_m_forward: isa must be one of {ISAS}, got {isa!r}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("fused_small_m_forward: pass both lora_a and lora_b, or neither")
    return small_m_call(x, qt, lora_a, lora_b, scaling, bias, isa)


@functools.cache
def _cpu_tables() -> tuple[torch.Tensor, torch.Tensor]:
    return nf4_table(), dynamic_table()


def small_m_call(
    x: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None,
    isa: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`fused_small_m_forward` without its Python-side argument checks (the op checks shapes and
    dtypes itself)."""
    detach = torch.is_grad_enabled()  # the op has no autograd formula; without grad mode nothing to cut
    args, _ = small_m_args(qt, x.dtype, lora_a, lora_b, scaling, bias, isa, detach=detach)
    y, xa = small_m_op()((x.detach() if detach else x).contiguous(), *args)
    return y, (xa if lora_a is not None else None)


def small_m_args(
    qt: QuantizedTensor,
    x_dtype: torch.dtype,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None,
    isa: str = "auto",
    *,
    detach: bool = False,
) -> tuple[tuple, bool]:
    """The native op's arguments after x, for x of `x_dtype` -> (args, reusable).

    reusable: the arguments hold `lora_a`, `lora_b` and `bias` themselves (no converted copy), so
    decoding can keep them for the next token while those tensors and the weight stay the same
    objects (`QuantLinear.decode_step`).
    """
    if isa == "auto" and _bf16_dot_isa(x_dtype, qt):
        isa = "avx512_bf16"
    a, b = lora_a, lora_b
    if a is not None:
        a, b = _fp32_operand(a, detach), _fp32_operand(b, detach)
    bias_arg = bias
    if bias is not None:
        bias_arg = (bias.detach() if detach else bias).contiguous()
    levels = nested = None
    if qt.format == "nf4":
        levels, nested = _cpu_tables()
        if not qt.double_quant:
            nested = None
    args = (
        qt.format,
        qt.data,
        qt.scales,
        qt.mins,
        levels,
        nested,
        qt.absmax_scales,
        qt.absmax_offset,
        qt.group_size,
        a,
        b,
        float(scaling),
        bias_arg,
        isa,
    )
    return args, a is lora_a and b is lora_b and bias_arg is bias


@functools.cache
def small_m_op():
    """The `qlora_small_m` operator overload itself (skips the per-call overload lookup); x of
    any shape (..., K). Loads the extension (a ValueError with the build command without it)."""
    _require_native()
    return torch.ops.qlora_kernels.qlora_small_m.default
