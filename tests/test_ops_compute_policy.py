"""The CPU compute-dtype policy: its decision (mocked capabilities) and the bf16 CPU path of qlora_linear."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close_by_norm

import qlora_kernels as qk
from qlora_kernels.ops import compute_policy
from qlora_kernels.ops.compute_policy import (
    cpu_compute_dtype,
    cpu_matmul_dtype,
    decide_cpu_compute_dtype,
    set_cpu_compute_dtype,
)
from qlora_kernels.ops.native import DequantWorkspace, native_available

FAST_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
NO_BF16 = frozenset({"avx2", "fma", "avx512f"})


def never_measure() -> float:
    raise AssertionError("the policy measured although the flags already decided")


@pytest.fixture
def bf16_policy():
    set_cpu_compute_dtype("bf16")
    yield
    set_cpu_compute_dtype(None)


# ---------------------------------------------------------------------------------- the decision
@pytest.mark.parametrize("env,expected", [("bf16", "bf16"), ("fp32", "fp32"), ("BFloat16", "bf16")])
def test_the_environment_decides_without_measuring(env, expected):
    decision = decide_cpu_compute_dtype(env, NO_BF16, never_measure, "x86_64")
    assert (decision.name, decision.source) == (expected, "env")
    assert "QK_CPU_DTYPE" in decision.reason


def test_a_bad_environment_value_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"QK_CPU_DTYPE must be one of \('auto', 'bf16', 'fp32'\)"):
        decide_cpu_compute_dtype("half", NO_BF16, never_measure, "x86_64")


def test_x86_without_bf16_instructions_picks_fp32_without_measuring():
    decision = decide_cpu_compute_dtype("auto", NO_BF16, never_measure, "x86_64")
    assert (decision.name, decision.source, decision.speedup) == ("fp32", "cpu flags", None)
    assert "avx512_bf16" in decision.reason


@pytest.mark.parametrize("speedup,expected", [(3.3, "bf16"), (1.3, "bf16"), (1.1, "fp32"), (0.6, "fp32")])
def test_with_bf16_instructions_the_measurement_decides(speedup, expected):
    decision = decide_cpu_compute_dtype(None, FAST_BF16, lambda: speedup, "x86_64")
    assert (decision.name, decision.source, decision.speedup) == (expected, "measured", speedup)
    assert f"{speedup:.2f}x" in decision.reason and "avx512_bf16" in decision.reason


def test_other_architectures_are_measured():
    decision = decide_cpu_compute_dtype(None, frozenset(), lambda: 2.0, "aarch64")
    assert (decision.name, decision.source) == ("bf16", "measured")


def test_the_measurement_is_a_positive_ratio():
    speedup = compute_policy.measure_bf16_speedup(shape=(32, 64, 48), rounds=3)
    assert math.isfinite(speedup) and speedup > 0


def test_an_explicit_choice_wins_over_the_environment_and_can_be_undone(monkeypatch):
    monkeypatch.setenv("QK_CPU_DTYPE", "fp32")
    compute_policy._automatic_decision.cache_clear()
    try:
        assert cpu_compute_dtype().name == "fp32"
        assert set_cpu_compute_dtype("bf16").source == "explicit"
        assert cpu_compute_dtype().name == "bf16"
        set_cpu_compute_dtype("auto")
        assert cpu_compute_dtype().source == "env"
        with pytest.raises(ValueError, match="cpu compute dtype must be one of"):
            set_cpu_compute_dtype("int8")
    finally:
        set_cpu_compute_dtype(None)
        compute_policy._automatic_decision.cache_clear()


def test_only_bf16_inputs_compute_in_bf16(bf16_policy):
    assert cpu_matmul_dtype(torch.bfloat16) == torch.bfloat16
    assert cpu_matmul_dtype(torch.float32) == torch.float32
    assert cpu_matmul_dtype(torch.float16) == torch.float32
    set_cpu_compute_dtype("fp32")
    assert cpu_matmul_dtype(torch.bfloat16) == torch.float32


# ------------------------------------------------------------------------- the bf16 CPU path
BACKENDS = ["torch"] + (["native"] if native_available() else [])
CASES = [("nf4", 64, 75, 128), ("int4", 32, 33, 96), ("int8", None, 70, 45)]


def _reference_grads(x, qt, a, b, scaling, bias, dy):
    leaves = [t.detach().float().requires_grad_() for t in (x, a, b, bias)]
    y = qk.qlora_linear_ref(*leaves[:1], qt, *leaves[1:3], scaling, leaves[3])
    y.backward(dy.float())
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt,group,n,k", CASES)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 17)])
def test_bf16_path_matches_the_fp32_reference(bf16_policy, backend, fmt, group, n, k, lead):
    r, scaling = 8, 0.7
    qt = qk.quantize(torch.randn(n, k) * 0.1, fmt, group)
    a = (torch.randn(r, k) * 0.2).requires_grad_()
    b = (torch.randn(n, r) * 0.2).requires_grad_()
    bias = torch.randn(n).requires_grad_()
    x = torch.randn(*lead, k).bfloat16().requires_grad_()
    y = qk.qlora_linear(x, qt, a, b, scaling, bias, backend=backend)
    assert y.dtype == torch.bfloat16 and y.shape == (*lead, n)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, grads_ref = _reference_grads(x, qt, a, b, scaling, bias, dy)
    assert_close_by_norm(y.float(), y_ref, 1e-2, "y")
    for name, got, want in zip(
        ("dx", "dA", "dB", "dbias"), (x.grad, a.grad, b.grad, bias.grad), grads_ref, strict=True
    ):
        assert got.dtype == want.dtype if name != "dx" else got.dtype == torch.bfloat16
        assert_close_by_norm(got.float(), want, 2e-2, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_policy_decodes_into_bf16_and_fp32_policy_into_fp32(monkeypatch, backend):
    requested: list[torch.dtype] = []
    original_qt, original_ws = qk.QuantizedTensor.dequantize, DequantWorkspace.dequantize

    def spy_qt(self, dtype=torch.float32, backend="auto"):
        requested.append(dtype)
        return original_qt(self, dtype, backend=backend)

    def spy_ws(self, qt, dtype=torch.float32):
        requested.append(dtype)
        return original_ws(self, qt, dtype)

    monkeypatch.setattr(qk.QuantizedTensor, "dequantize", spy_qt)
    monkeypatch.setattr(DequantWorkspace, "dequantize", spy_ws)
    qt = qk.quantize(torch.randn(40, 64), "nf4")
    a, b = torch.randn(4, 64).requires_grad_(), torch.randn(40, 4)
    x = torch.randn(20, 64).bfloat16().requires_grad_()  # M above the fused small-M kernel's range
    for policy, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        requested.clear()
        set_cpu_compute_dtype(policy)
        try:
            qk.qlora_linear(x, qt, a, b, 1.0, backend=backend).sum().backward()
        finally:
            set_cpu_compute_dtype(None)
        assert requested == [expected, expected], (policy, requested)  # forward and grad_input


def test_fp32_inputs_stay_fp32_under_the_bf16_policy(bf16_policy):
    qt = qk.quantize(torch.randn(48, 64), "nf4")
    a, b = torch.randn(4, 64), torch.randn(48, 4)
    x = torch.randn(3, 64)
    y = qk.qlora_linear(x, qt, a, b, 0.5, backend="torch")
    assert_close_by_norm(y, qk.qlora_linear_ref(x, qt, a, b, 0.5), 1e-6)
