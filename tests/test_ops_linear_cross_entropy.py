"""Fused LM head + cross-entropy against the unfused oracle: loss and gradients, dtypes, odd sizes."""

from __future__ import annotations

import pytest
import torch

from qlora_kernels.ops.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_ref

VOCAB, HIDDEN = 1000, 48
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(rows: int, dtype: torch.dtype, ignored: float = 0.25):
    hidden = torch.randn(rows, HIDDEN, dtype=dtype, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (rows,))
    targets[torch.rand(rows) < ignored] = IGNORE_INDEX
    return hidden, weight, targets


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "chunk_rows"), [(1, 64), (3, 64), (17, 5), (300, 64)])
def test_loss_and_gradients_match_the_unfused_reference(dtype, rows, chunk_rows):
    hidden, weight, targets = _inputs(rows, dtype)
    targets[0] = 7  # at least one counted row
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    (loss * 0.5).backward()  # an upstream gradient other than 1
    dh, dw = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    ref = linear_cross_entropy_ref(hidden, weight, targets)
    (ref * 0.5).backward()
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())  # fp32 math on the same inputs
    assert _rel(dh, hidden.grad) <= TOL[dtype]
    assert _rel(dw, weight.grad) <= TOL[dtype]
    assert torch.count_nonzero(dh[targets == IGNORE_INDEX]) == 0


def test_frozen_weight_gets_no_gradient_and_ignored_rows_count_nothing():
    hidden, weight, targets = _inputs(20, torch.float32)
    weight.requires_grad_(False)
    targets[:] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert loss.item() == 0.0 and weight.grad is None
    assert torch.count_nonzero(hidden.grad) == 0


def test_no_grad_computes_the_loss_only(monkeypatch):
    hidden, weight, targets = _inputs(40, torch.float32)
    calls = []
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1))  # the gradient matmul of hidden
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    assert calls == []
    assert abs(loss.item() - linear_cross_entropy_ref(hidden, weight, targets).item()) <= 1e-5 * loss.item()


def test_runs_in_fp32_under_bf16_autocast():
    hidden, weight, targets = _inputs(33, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets)
    ref = linear_cross_entropy_ref(hidden, weight, targets)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.mark.parametrize(
    ("hidden_shape", "weight_shape", "targets", "match"),
    [
        ((4, 8), (10, 9), torch.zeros(4, dtype=torch.long), "need hidden"),
        ((2, 4, 8), (10, 8), torch.zeros(4, dtype=torch.long), "need hidden"),
        ((4, 8), (10, 8), torch.zeros(3, dtype=torch.long), "targets must be int64 of shape"),
        ((4, 8), (10, 8), torch.zeros(4, dtype=torch.int32), "targets must be int64"),
    ],
)
def test_bad_shapes_say_what_is_expected(hidden_shape, weight_shape, targets, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(torch.randn(hidden_shape), torch.randn(weight_shape), targets)


@pytest.mark.parametrize(("rows", "chunk_rows"), [(1, 64), (17, 5), (300, 64)])
def test_bf16_matmuls_under_the_bf16_cpu_policy(rows, chunk_rows):
    from qlora_kernels.ops.compute_policy import set_cpu_compute_dtype
    from qlora_kernels.ops.linear_cross_entropy import head_matmul_dtype

    hidden, weight, targets = _inputs(rows, torch.bfloat16)
    targets[0] = 7
    set_cpu_compute_dtype("bf16")
    try:
        assert head_matmul_dtype(hidden) == torch.bfloat16
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
        loss.backward()
    finally:
        set_cpu_compute_dtype(None)
    assert head_matmul_dtype(hidden) == torch.float32  # the tests' pinned fp32 policy again
    dh, dw = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    ref = linear_cross_entropy_ref(hidden, weight, targets)
    ref.backward()
    assert loss.dtype == torch.float32 and dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item())  # logits rounded to bf16 before the softmax
    assert _rel(dh, hidden.grad) <= 2e-2
    assert _rel(dw, weight.grad) <= 2e-2
    assert torch.count_nonzero(dh[targets == IGNORE_INDEX]) == 0
