"""The native CPU dequantization (csrc/dequant_cpu.cpp): bit-identical to the reference, clear errors, fallback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import poisoned

import qlora_kernels as qk
from qlora_kernels.formats import auto_backend, dynamic_table, nf4_table
from qlora_kernels.ops import native
from qlora_kernels.ops.qlora_linear import qlora_linear

needs_native = pytest.mark.skipif(not native.native_available(), reason=native.native_status().error or "")

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (format, group_size, quantize options)
CONFIGS = [
    ("nf4", 64, {"double_quant": True}),
    ("nf4", 64, {"double_quant": False}),
    ("nf4", 32, {"double_quant": True}),
    ("nf4", 128, {"double_quant": False}),
    ("nf4", 256, {"double_quant": True}),
    ("int4", 32, {}),
    ("int4", 64, {"symmetric": True}),
    ("int4", 64, {}),
    ("int4", 128, {"symmetric": True}),
    ("int4", 256, {}),
    ("int8", None, {}),
]
ROWS = (1, 3, 17, 100)
COLS_4BIT = (64, 192, 320, 256)
COLS_INT8 = (64, 192, 320, 123)


def _config_id(config) -> str:
    fmt, group, opts = config
    return "-".join([fmt, str(group)] + [k for k, v in opts.items() if v])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 vs 0.0 counts as a difference."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bit_identical(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same bits for every non-NaN value and NaN at the same places. NaN bits are not compared:
    torch itself writes a bf16 NaN as 0xFFFF in its vectorised loop and 0x7FC0 in the scalar tail."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN pattern differs"
    same = _bits(got) == _bits(expected)
    if not bool((same | nan).all()):
        idx = (~(same | nan)).nonzero()[0].tolist()
        raise AssertionError(f"{what}: first difference at {idx}: {got[tuple(idx)]} vs {expected[tuple(idx)]}")


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Random weights over several magnitudes, with an outlier, so groups differ in scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 2, n)[:, None]
    w[0, k // 2] = 7.5 * w[0].abs().max() + 1.0
    return w


def _native_out(qt: qk.QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    out = poisoned(qt.shape, dtype)
    native.dequantize_into(qt, out)
    return out


@pytest.fixture
def forced_fallback(monkeypatch: pytest.MonkeyPatch):
    """Make the loader report the extension as absent (as on a machine without a compiler)."""

    def missing():
        raise ModuleNotFoundError(f"No module named {native.EXTENSION!r}")

    monkeypatch.setattr(native, "_import_extension", missing)
    native.native_status.cache_clear()
    yield
    monkeypatch.undo()
    native.native_status.cache_clear()


# --------------------------------------------------------------------------- bit identity
@needs_native
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_native_equals_reference_bit_for_bit(config, dtype: torch.dtype) -> None:
    fmt, group, opts = config
    for n in ROWS:
        for k in COLS_INT8 if fmt == "int8" else COLS_4BIT:
            if group is not None and k % group:
                continue
            qt = qk.quantize(_weight(n, k, seed=n * 1000 + k), fmt, group_size=group, **opts)
            expected = qt.dequantize(dtype, backend="torch")
            got = _native_out(qt, dtype)
            assert_bit_identical(got, expected, f"{fmt} g{group} {opts} ({n}, {k}) {dtype}")
            assert_bit_identical(qt.dequantize(dtype, backend="native"), expected, "backend='native'")


@needs_native
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
def test_native_equals_reference_on_a_bitsandbytes_sized_weight(dtype: torch.dtype) -> None:
    """Many nested absmax blocks (double quantization) and several threads' worth of rows."""
    qt = qk.quantize(torch.randn(576, 1536), "nf4")
    assert_bit_identical(_native_out(qt, dtype), qt.dequantize(dtype, backend="torch"))


@needs_native
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
def test_non_finite_scales_match_the_reference_bits(dtype: torch.dtype) -> None:
    qt = qk.quantize(torch.randn(4, 64), "int8")
    scales = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38])
    qt = dataclasses.replace(qt, scales=scales)
    assert_bit_identical(_native_out(qt, dtype), qt.dequantize(dtype, backend="torch"))
    nf4 = qk.quantize(torch.randn(4, 64), "nf4", double_quant=False)
    nf4 = dataclasses.replace(nf4, scales=torch.tensor([float("nan"), float("inf"), 1e-40, 3e38]))
    assert_bit_identical(_native_out(nf4, dtype), nf4.dequantize(dtype, backend="torch"))


@needs_native
def test_fp16_overflow_and_subnormals_match_the_reference() -> None:
    qt = qk.quantize(torch.randn(3, 64), "int8")
    qt = dataclasses.replace(qt, scales=torch.tensor([1e3, 1e-7, 3e-6]))
    expected = qt.dequantize(torch.float16, backend="torch")
    assert_bit_identical(_native_out(qt, torch.float16), expected)


@needs_native
def test_auto_prefers_native_on_the_cpu() -> None:
    qt = qk.quantize(torch.randn(8, 64), "nf4")
    assert auto_backend(qt.device) == "native"
    assert torch.equal(qt.dequantize(torch.bfloat16), qt.dequantize(torch.bfloat16, backend="torch"))
    assert set(native.native_ops()) == set(native.OP_NAMES)


# -------------------------------------------------------------------------- reused buffer
@needs_native
def test_workspace_reuses_one_buffer_and_matches_the_reference() -> None:
    ws = native.DequantWorkspace()
    big = qk.quantize(torch.randn(48, 128), "nf4")
    small = qk.quantize(torch.randn(16, 64), "int4")
    x = torch.randn(5, 128)
    y = ws.matmul(x, big)
    torch.testing.assert_close(y, x @ big.dequantize(torch.float32, backend="torch").t(), rtol=0, atol=0)
    first = ws.dequantize(big).data_ptr()
    assert ws.dequantize(small).data_ptr() == first, "a smaller weight must reuse the buffer"
    dy = torch.randn(5, 16)
    torch.testing.assert_close(
        ws.matmul(dy, small, transpose=False), dy @ small.dequantize(torch.float32, backend="torch"), rtol=0, atol=0
    )
    assert native.workspace() is native.workspace()


@needs_native
def test_overwriting_a_buffer_autograd_saved_raises() -> None:
    ws = native.DequantWorkspace()
    a = qk.quantize(torch.randn(8, 64), "nf4")
    w = ws.dequantize(a)
    x = torch.randn(2, 64, requires_grad=True)
    y = x @ w.t()
    ws.dequantize(qk.quantize(torch.randn(8, 64), "nf4"))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@needs_native
def test_qlora_linear_with_native_equals_the_fallback_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's forward and gradients are the same with the extension and without it."""
    qt = qk.quantize(torch.randn(24, 64), "nf4")
    x = torch.randn(3, 5, 64)
    a, b = torch.randn(4, 64) * 0.1, torch.randn(24, 4) * 0.1

    def run():
        xs, la, lb = (t.clone().requires_grad_() for t in (x, a, b))
        y = qlora_linear(xs, qt, la, lb, 2.0, backend="torch")
        y.square().sum().backward()
        return y.detach(), xs.grad, la.grad, lb.grad

    with_native = run()
    monkeypatch.setattr(native, "native_available", lambda: False)
    assert auto_backend(qt.device) == "torch"
    without = run()
    for got, expected in zip(with_native, without, strict=True):
        assert torch.equal(got, expected)


# ------------------------------------------------------------------------------ bad input
@needs_native
def test_bad_inputs_raise_clear_errors() -> None:
    ops = torch.ops.qlora_kernels
    qt = qk.quantize(torch.randn(4, 64), "int4", group_size=32)
    out = torch.empty(4, 64)
    with pytest.raises(ValueError, match=r"'scales' should be torch.float16 \(4, 2\), got torch.float32 \(4, 2\)"):
        ops.dequantize_int4_into(qt.data, qt.scales.float(), qt.mins, 32, out)
    with pytest.raises(ValueError, match=r"'data' should be torch.uint8 \(4, 32\), got torch.uint8 \(4, 16\)"):
        ops.dequantize_int4_into(qt.data[:, :16].contiguous(), qt.scales, qt.mins, 32, out)
    with pytest.raises(ValueError, match="'data' must be contiguous"):
        ops.dequantize_int4_into(qt.data.t().contiguous().t(), qt.scales, qt.mins, 32, out)
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128, 256\), got 48"):
        ops.dequantize_int4_into(qt.data, qt.scales, qt.mins, 48, out)
    with pytest.raises(TypeError, match="out must be torch.float32, torch.float16 or torch.bfloat16, got torch.int32"):
        ops.dequantize_int4_into(qt.data, qt.scales, qt.mins, 32, torch.empty(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must be contiguous"):
        ops.dequantize_int4_into(qt.data, qt.scales, qt.mins, 32, torch.empty(64, 4).t())
    with pytest.raises(ValueError, match="'data' is on meta; the native kernels run on the CPU"):
        ops.dequantize_int4_into(qt.data.to("meta"), qt.scales, qt.mins, 32, out)
    with pytest.raises(ValueError, match=r"out must be a tensor of the weight's shape \(4, 64\), got \(4, 63\)"):
        native.dequantize_into(qt, torch.empty(4, 63))
    with pytest.raises(TypeError, match="dtype must be one of"):
        qt.dequantize(torch.int32, backend="native")


@needs_native
def test_bad_nf4_inputs_raise_clear_errors() -> None:
    ops = torch.ops.qlora_kernels
    qt = qk.quantize(torch.randn(4, 64), "nf4")
    out = torch.empty(4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="pass all three, or none"):
        ops.dequantize_nf4_into(qt.data, qt.scales, nf4_table(), 64, None, qt.absmax_scales, qt.absmax_offset, out)
    with pytest.raises(ValueError, match=r"'levels' should be torch.float32 \(16,\), got torch.float32 \(15,\)"):
        ops.dequantize_nf4_into(
            qt.data, qt.scales, nf4_table()[:15], 64, dynamic_table(), qt.absmax_scales, qt.absmax_offset, out
        )
    with pytest.raises(ValueError, match=r"'absmax' should be torch.float32 \(4,\), got torch.uint8 \(4,\)"):
        ops.dequantize_nf4_into(qt.data, qt.scales, nf4_table(), 64, None, None, None, out)
    with pytest.raises(ValueError, match="block_size=128 does not divide in_features K=64"):
        ops.dequantize_nf4_into(
            qt.data, qt.scales, nf4_table(), 128, dynamic_table(), qt.absmax_scales, qt.absmax_offset, out
        )


# -------------------------------------------------------------------------------- fallback
def test_fallback_without_the_extension(forced_fallback) -> None:
    """With the extension absent the package still decodes (reference), and backend='native' says why not."""
    assert not native.native_available()
    assert native.native_ops() == ()
    assert "extension not built" in native.native_status().error
    qt = qk.quantize(torch.randn(17, 64), "nf4")
    assert auto_backend(qt.device) == "torch"
    assert torch.equal(qt.dequantize(torch.bfloat16), qt.dequantize(torch.bfloat16, backend="torch"))
    with pytest.raises(ValueError, match=r"backend='native' is unavailable: extension not built.*QK_BUILD_NATIVE=1"):
        qt.dequantize(torch.bfloat16, backend="native")
    with pytest.raises(ValueError, match="backend='native' is unavailable"):
        native.dequantize_into(qt, torch.empty(17, 64))
    y = qlora_linear(torch.randn(2, 64), qt, backend="torch")
    assert y.shape == (2, 17)


def test_a_library_that_fails_to_load_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken():
        raise ImportError("_native.so: undefined symbol: _ZN3c10...")

    monkeypatch.setattr(native, "_import_extension", broken)
    monkeypatch.setattr(native, "_built_library", lambda: Path("/pkg/qlora_kernels/_native.so"))
    native.native_status.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="exists but failed to load.*Rebuild it"):
            status = native.native_status()
        assert not status.available
        assert "failed to load _native.so" in status.error
    finally:
        monkeypatch.undo()
        native.native_status.cache_clear()


def test_info_lists_the_native_ops(capsys: pytest.CaptureFixture[str]) -> None:
    from qlora_kernels.cli import main

    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("native ops:"))
    if native.native_available():
        assert all(name in line for name in native.OP_NAMES)
    else:
        assert "none" in line
