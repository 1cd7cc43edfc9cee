"""The QLoRA matmul as torch.library custom ops, dispatched by M, and the Triton backend.

`qlora_forward_triton` / `qlora_grad_input_triton` pick the fused kernel (`qlora_matmul`) for
small M and the decode-buffer + cuBLAS path (`qlora_dense`) above `FUSED_MAX_M` /
`FUSED_BWD_MAX_M`. They are registered as the custom ops "qlora_kernels::qlora_forward" and
"qlora_kernels::qlora_grad_input", whose fake implementations check the operands' shapes with
`torch._check` and give torch.compile the output shapes, so the Triton launch is one opaque
graph node instead of a graph break. `TritonBackend` is what `qlora_linear(backend="triton")`
calls: the custom ops while torch.compile traces, the launchers directly in eager mode (the
dispatcher's custom-op wrappers cost more host time per call than the launch itself).
"""

from __future__ import annotations

import torch

from ..formats import QuantizedTensor
from .qlora_dense import qlora_forward_dense, qlora_grad_input_dense
from .qlora_matmul import qlora_forward_fused, qlora_grad_input_fused

# ------------------------------------------------------------------------------ dispatch
#: Largest M (rows of x) that takes the fused forward kernel; above it, dequantize + cuBLAS.
#: From benchmarks/gpu_check.py on an H200 (Triton 3.6, 2026-11-28; layer rows "fused_fwd_ms" /
#: "dense_fwd_ms" on the three Llama-3-8B shapes, NF4/int4/int8): the fused forward was faster
#: in 8 of 9 cases at M = 16 and slower in 7 of 9 at M = 64 (2-3x slower at M = 256).
FUSED_MAX_M = 16
#: Same, for the backward dX kernel (dY (M, N) @ W): at M = 16 it beat the dense path in 4 of 9
#: cases (within 10% in 2 more), at M = 64 in none (1.5-4.5x slower).
FUSED_BWD_MAX_M = 16


def qlora_forward_triton(
    x: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward on (M, K) x: fused kernel for M <= FUSED_MAX_M, else the dense path."""
    if x.shape[0] <= FUSED_MAX_M:
        return qlora_forward_fused(x, qt, lora_a, lora_b, scaling, bias)
    return qlora_forward_dense(x, qt, lora_a, lora_b, scaling, bias)


def qlora_grad_input_triton(
    dy: torch.Tensor, qt: QuantizedTensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """dX on (M, N) dy: fused kernel for M <= FUSED_BWD_MAX_M, else the dense path."""
    if dy.shape[0] <= FUSED_BWD_MAX_M:
        return qlora_grad_input_fused(dy, qt, lora_a, lora_b, scaling)
    return qlora_grad_input_dense(dy, qt, lora_a, lora_b, scaling)


# ------------------------------------------------------------- torch.library custom ops
# The launchers take a QuantizedTensor, which torch.library cannot type; the ops take its
# fields and rebuild it (a frozen dataclass: free).
OP_NAMESPACE = "qlora_kernels"
_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")


def _rebuild(data, scales, mins, absmax_scales, absmax_offset, fmt, n, k, group_size, symmetric) -> QuantizedTensor:
    return QuantizedTensor(
        format=fmt,
        shape=(n, k),
        group_size=group_size,
        data=data,
        scales=scales,
        mins=mins,
        absmax_scales=absmax_scales,
        absmax_offset=absmax_offset,
        symmetric=symmetric,
    )


def _check_fake_operands(op: str, act, act_cols: int, n: int, k: int, lora_a, lora_b, bias=None) -> None:
    """The launchers' shape contract, stated with torch._check so it also holds for symbolic shapes."""
    torch._check(act.dim() == 2, lambda: f"{op}: the activation must be 2-D, got {act.dim()}-D")
    torch._check(act.shape[1] == act_cols, lambda: f"{op}: the activation must have {act_cols} columns")
    torch._check((lora_a is None) == (lora_b is None), lambda: f"{op}: pass both lora_a and lora_b, or neither")
    if lora_a is not None:
        torch._check(lora_a.dim() == 2, lambda: f"{op}: lora_a must be 2-D (r, K)")
        torch._check(lora_b.dim() == 2, lambda: f"{op}: lora_b must be 2-D (N, r)")
        torch._check(lora_a.shape[1] == k, lambda: f"{op}: lora_a must have K={k} columns")
        torch._check(lora_b.shape[0] == n, lambda: f"{op}: lora_b must have N={n} rows")
        torch._check(lora_b.shape[1] == lora_a.shape[0], lambda: f"{op}: lora_b's columns must equal lora_a's rows")
    if bias is not None:
        torch._check(bias.dim() == 1, lambda: f"{op}: bias must be 1-D (N,)")
        torch._check(bias.shape[0] == n, lambda: f"{op}: bias must have N={n} elements")


def _forward_impl(
    x: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    absmax_scales: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    fmt: str,
    n: int,
    k: int,
    group_size: int,
    symmetric: bool,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa); without LoRA xa is an empty (M, 0) tensor (custom ops cannot return None)."""
    qt = _rebuild(data, scales, mins, absmax_scales, absmax_offset, fmt, n, k, group_size, symmetric)
    y, xa = qlora_forward_triton(x, qt, lora_a, lora_b, scaling, bias)
    if xa is None:
        xa = x.new_empty((x.shape[0], 0), dtype=torch.float32)
    return y, xa


def _forward_fake(x, data, scales, mins, absmax_scales, absmax_offset, fmt, n, k, group_size, symmetric, lora_a,
                  lora_b, scaling, bias):  # fmt: skip
    _check_fake_operands("qlora_forward", x, k, n, k, lora_a, lora_b, bias)
    r = lora_a.shape[0] if lora_a is not None else 0
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], r), dtype=torch.float32)


def _grad_input_impl(
    dy: torch.Tensor,
    data: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    absmax_scales: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    fmt: str,
    n: int,
    k: int,
    group_size: int,
    symmetric: bool,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    qt = _rebuild(data, scales, mins, absmax_scales, absmax_offset, fmt, n, k, group_size, symmetric)
    return qlora_grad_input_triton(dy, qt, lora_a, lora_b, scaling)


def _grad_input_fake(dy, data, scales, mins, absmax_scales, absmax_offset, fmt, n, k, group_size, symmetric, lora_a,
                     lora_b, scaling):  # fmt: skip
    _check_fake_operands("qlora_grad_input", dy, n, n, k, lora_a, lora_b)
    return dy.new_empty((dy.shape[0], k))


if _HAS_CUSTOM_OP:
    qlora_forward_op = torch.library.custom_op(f"{OP_NAMESPACE}::qlora_forward", mutates_args=())(_forward_impl)
    torch.library.register_fake(f"{OP_NAMESPACE}::qlora_forward")(_forward_fake)
    qlora_grad_input_op = torch.library.custom_op(f"{OP_NAMESPACE}::qlora_grad_input", mutates_args=())(
        _grad_input_impl
    )
    torch.library.register_fake(f"{OP_NAMESPACE}::qlora_grad_input")(_grad_input_fake)
else:  # torch without torch.library.custom_op: call the launchers directly (eager only)
    qlora_forward_op = _forward_impl
    qlora_grad_input_op = _grad_input_impl


def _compiling() -> bool:
    """True while torch.compile traces: then the launch must be the custom op (one opaque node)."""
    return _HAS_CUSTOM_OP and torch.compiler.is_compiling()


def weight_fields(qt: QuantizedTensor) -> tuple:
    """`qt` as the ops' weight arguments: its tensors, format, N, K, group size and symmetry."""
    n, k = qt.shape
    return (qt.data, qt.scales, qt.mins, qt.absmax_scales, qt.absmax_offset, qt.format, n, k, qt.group_size,
            qt.symmetric)  # fmt: skip


# --------------------------------------------------------------------------- the backend
class TritonBackend:
    """`QLoRABackend` on the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1)."""

    @staticmethod
    def compute_dtype(dy: torch.Tensor) -> torch.dtype:
        """dtype of the LoRA weight-gradient matmuls: 16-bit dY's own on CUDA (tensor cores, as PEFT
        under autocast; in fp32 these skinny (r x M) @ (M x K) products get none), fp32 elsewhere."""
        if dy.is_cuda and dy.dtype in (torch.bfloat16, torch.float16):
            return dy.dtype
        return torch.float32

    def forward(
        self,
        x: torch.Tensor,
        qt: QuantizedTensor,
        lora_a: torch.Tensor | None,
        lora_b: torch.Tensor | None,
        scaling: float,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not _compiling():  # eager: the launcher directly, without the dispatcher's ~10 us per call
            return qlora_forward_triton(x, qt, lora_a, lora_b, float(scaling), bias)
        y, xa = qlora_forward_op(x, *weight_fields(qt), lora_a, lora_b, float(scaling), bias)
        return y, (xa if lora_a is not None else None)

    def grad_input(
        self,
        dy: torch.Tensor,
        qt: QuantizedTensor,
        lora_a: torch.Tensor | None,
        lora_b: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        if not _compiling():
            return qlora_grad_input_triton(dy, qt, lora_a, lora_b, float(scaling))
        return qlora_grad_input_op(dy, *weight_fields(qt), lora_a, lora_b, float(scaling))
