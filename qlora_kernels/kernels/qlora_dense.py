"""The large-M QLoRA matmul: decode W into a reused dense buffer, then cuBLAS.

Large M (training, M = batch x seq in the thousands) is compute bound, so fusing the decode
into the matmul saves little: the packed weight is decoded once per call into a buffer shared
by every layer of that shape (`dequantize_triton`) and `torch.mm` does the product. LoRA is
applied rank first. Same contract and outputs as the fused launchers in `qlora_matmul`: y in
the activation's dtype and x @ A^T in fp32, accumulated in fp32 from operands in the
activation's dtype (A rounded to it, as the fused kernel's tensor-core dot does), so both
paths give the backward the same x @ A^T.
"""

from __future__ import annotations

import torch

from ..formats import QuantizedTensor
from ._runtime import device_key
from .dequant import dequantize_triton
from .qlora_configs import MODE_FORWARD, MODE_GRAD_INPUT
from .qlora_matmul import check_operands

#: Dense decode buffers, keyed on (shape, dtype, device). One buffer is reused by every layer
#: of that shape: the decode and the matmul that reads it run in stream order, and nothing
#: keeps a reference past the matmul (autograd saves x and x @ A^T, never the buffer). Not
#: safe if two streams run layers of one shape concurrently.
_WEIGHT_BUFFERS: dict[tuple[tuple[int, int], torch.dtype, torch.device], torch.Tensor] = {}


def weight_buffer(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The reused (N, K) decode buffer for this shape/dtype/device (allocated on first use)."""
    key = (tuple(shape), dtype, device_key(device))
    buf = _WEIGHT_BUFFERS.get(key)
    if buf is None:
        buf = torch.empty(shape, dtype=dtype, device=device)
        _WEIGHT_BUFFERS[key] = buf
    return buf


def clear_weight_buffers() -> None:
    """Free the decode buffers (e.g. after training, or between models of different shapes)."""
    _WEIGHT_BUFFERS.clear()


def _decoded(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_triton(qt, dtype, out=weight_buffer(qt.shape, dtype, qt.device))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated in fp32 with an fp32 result (no rounding to a's dtype).

    On CUDA, 16-bit operands go to cuBLAS with an fp32 output (`torch.mm(..., out_dtype=)`,
    torch >= 2.8), so no fp32 copy of a is made; elsewhere the operands are upcast, which
    is exact (every bf16/fp16 value is an fp32 value).
    """
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def qlora_forward_dense(
    x: torch.Tensor,
    qt: QuantizedTensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Large-M forward: (y (M, N) in x's dtype, x @ A^T (M, r) in fp32 or None)."""
    check_operands(x, qt, lora_a, lora_b, bias, MODE_FORWARD, op="qlora_forward_dense")
    dtype = x.dtype
    w = _decoded(qt, dtype)
    y = torch.addmm(bias.to(dtype), x, w.t()) if bias is not None else torch.mm(x, w.t())
    xa = None
    if lora_a is not None:
        xa = _mm_fp32(x, lora_a.to(dtype).t())
        y.addmm_(xa.to(dtype), lora_b.to(dtype).t(), alpha=scaling)
    return y, xa


def qlora_grad_input_dense(
    dy: torch.Tensor, qt: QuantizedTensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Large-M backward: dx (M, K) in dy's dtype; W is decoded again (never kept from the forward)."""
    check_operands(dy, qt, lora_a, lora_b, None, MODE_GRAD_INPUT, op="qlora_grad_input_dense")
    dtype = dy.dtype
    dx = torch.mm(dy, _decoded(qt, dtype))
    if lora_a is not None:
        dyb = _mm_fp32(dy, lora_b.to(dtype))
        dx.addmm_(dyb.to(dtype), lora_a.to(dtype), alpha=scaling)
    return dx
