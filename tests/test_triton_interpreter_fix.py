"""Proof that the test harness's interpreter fixes are needed, and that they work."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
import triton_interpreter

from qlora_kernels.kernels._runtime import interpreter_enabled

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="only meaningful under TRITON_INTERPRET=1")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m = tl.arange(0, M)
    n = tl.arange(0, N)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


def _run_dot():
    a = torch.randn(16, 32).bfloat16()
    b = torch.randn(32, 16).bfloat16()
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, 16, 16, 32)
    return c, a.float() @ b.float()


def _run_cast():
    x = torch.randn(1024)
    y = torch.empty(1024, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, 1024)
    return y, x.bfloat16()


def test_interpreter_bf16_bugs_exist_and_the_shim_fixes_them():
    triton_interpreter.uninstall()
    try:
        c, expected = _run_dot()
        assert not torch.allclose(c, expected, rtol=1e-2, atol=1e-2), "bf16 tl.dot was right without the shim"
        y, y_expected = _run_cast()
        assert not torch.equal(y, y_expected), "fp32->bf16 cast rounded correctly without the shim"
    finally:
        triton_interpreter.install()
    c, expected = _run_dot()
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-4)
    y, y_expected = _run_cast()
    assert torch.equal(y, y_expected)
