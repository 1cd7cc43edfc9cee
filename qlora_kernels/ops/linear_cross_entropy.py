"""Fused LM head + cross-entropy: the summed token loss without keeping a (tokens x vocab) logit tensor.

A 49k-token vocabulary makes the head the widest matmul of a small model, and the usual path
(logits, log_softmax, its backward, the zero-filled gradient of the sliced logits) moves several
copies of a tokens x vocab fp32 tensor. Here the rows go through in chunks: each chunk's logits
give its loss and, at once, its gradients (softmax - one-hot), which are the only things kept.
The reference is ``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` in fp32.

The softmax, the loss and the accumulated gradients are fp32. The two matmuls run in bf16 (fp32
accumulation) when the hidden states are bf16 and the device multiplies bf16 fast (CUDA, or a CPU
whose policy in `compute_policy` picked bf16), as Liger-Kernel does; otherwise in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import IGNORE_INDEX
from .compute_policy import cpu_matmul_dtype

DEFAULT_CHUNK_ROWS = 256  # 256 x 49152 fp32 logits = 48 MiB per chunk


def head_matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """bf16 for bf16 hidden states on CUDA or on a CPU that computes bf16 fast; fp32 otherwise."""
    if hidden.dtype != torch.bfloat16:
        return torch.float32
    return torch.bfloat16 if hidden.device.type == "cuda" else cpu_matmul_dtype(torch.bfloat16)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """sum over rows with target != ignore_index of CE(hidden @ weight.T, target); fp32 softmax and loss."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int, grad_enabled: bool
    ):
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes chosen here, also under autocast
            return LinearCrossEntropyFunction._forward(ctx, hidden, weight, targets, chunk_rows, grad_enabled)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk_rows: int, grad_enabled: bool):
        # needs_input_grad ignores torch.no_grad(); grad_enabled (the caller's grad mode) does not
        need_hidden, need_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        compute = head_matmul_dtype(hidden)
        w = weight.to(compute)
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows].to(compute)
            t = targets[start : start + chunk_rows]
            valid = t != IGNORE_INDEX
            safe_t = torch.where(valid, t, 0).unsqueeze(1)
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=1)
            loss += ((lse - logits.gather(1, safe_t).squeeze(1)) * valid).sum()
            if need_hidden or need_weight:
                # d loss / d logits = softmax - one_hot, zero on ignored rows; reuses the logits' memory
                grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
                grad_logits.scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=grad_logits.dtype))
                grad_logits = grad_logits.mul_(valid.unsqueeze(1)).to(compute)
                if need_hidden:
                    if compute == torch.float32:
                        torch.mm(grad_logits, w, out=grad_hidden[start : start + chunk_rows])
                    else:
                        grad_hidden[start : start + chunk_rows] = grad_logits @ w
                if need_weight:
                    if compute == torch.float32:
                        grad_weight.addmm_(grad_logits.t(), h)
                    else:
                        grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight)))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        dh = (grad_hidden * grad_loss).to(hidden_dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_weight * grad_loss).to(weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against `targets` (rows at -100 ignored), fp32 loss.

    hidden: (N, H) in any float dtype; weight: (V, H), the LM head; targets: (N,) int64.
    The gradients are computed in the forward pass, so the backward is a multiplication.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: need hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(
            f"linear_cross_entropy: targets must be int64 of shape ({hidden.shape[0]},), "
            f"got {targets.dtype} {tuple(targets.shape)}"
        )
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, chunk_rows, torch.is_grad_enabled())


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused oracle: full fp32 logits, then `F.cross_entropy(..., reduction="sum")`."""
    logits = hidden.float() @ weight.float().t()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
