"""Weight formats: round trips, error bounds, bits per parameter, bad input, serialisation."""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.formats import (
    QuantizedTensor,
    codes,
    dequantize_reference,
    dynamic_table,
    nf4_table,
    pack_nibbles,
    unpack_nibbles,
)

CASES = [
    ("int8", {}),
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 64}),
    ("int4", {"group_size": 128}),
    ("int4", {"group_size": 64, "symmetric": True}),
    ("nf4", {}),
    ("nf4", {"double_quant": False}),
    ("nf4", {"group_size": 128}),
]


def _ids(case):
    fmt, kw = case
    return fmt + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_quantize_of_dequantized_reproduces_the_codes(case):
    fmt, kw = case
    w = torch.randn(96, 256) * 0.02
    qt = qk.quantize(w, fmt, **kw)
    again = qk.quantize(qt.dequantize(torch.float32, backend="torch"), fmt, **kw)
    assert torch.equal(codes(again), codes(qt))


def test_pack_unpack_is_bit_exact_and_high_nibble_first():
    c = torch.randint(0, 16, (7, 66), dtype=torch.uint8)
    packed = pack_nibbles(c)
    assert packed.shape == (7, 33)
    assert torch.equal(unpack_nibbles(packed), c)
    assert packed[0, 0] == (c[0, 0] << 4) | c[0, 1]
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(torch.zeros(3, 5, dtype=torch.uint8))


# Relative RMSE on N(0, 1) weights (measured: see the closing note of the formats issue).
# Bounds sit a few percent above the measurement, below what the next coarser setting gives.
ERROR_BOUNDS = [
    ("int8", {}, 0.0082),  # measured 0.0079
    ("int4", {"group_size": 64}, 0.093),  # measured 0.0896
    ("int4", {"group_size": 128}, 0.103),  # measured 0.0998
    ("int4", {"group_size": 128, "symmetric": True}, 0.121),  # measured 0.117
    ("nf4", {}, 0.0935),  # measured 0.0919; bitsandbytes gives 0.0924
    ("nf4", {"double_quant": False}, 0.0935),
]


@pytest.mark.parametrize("fmt,kw,bound", ERROR_BOUNDS, ids=[f"{f}-{b}" for f, _, b in ERROR_BOUNDS])
def test_relative_rmse_on_gaussian_weights(fmt, kw, bound):
    w = torch.randn(1024, 1024)
    qt = qk.quantize(w, fmt, **kw)
    err = ((qt.dequantize(torch.float32, backend="torch") - w).norm() / w.norm()).item()
    print(f"{fmt} {kw}: relative RMSE {err:.4f}")
    assert err < bound
    # Not a bound that cannot fail: a coarse format must not look like a fine one.
    assert err > bound * 0.8


def test_nf4_error_is_near_the_qlora_figure():
    w = torch.randn(2048, 1024)
    err = ((qk.quantize(w, "nf4").dequantize(torch.float32) - w).norm() / w.norm()).item()
    assert abs(err - 0.0924) < 0.002


@pytest.mark.parametrize(
    "fmt,kw,limit",
    [
        ("nf4", {}, 4.13),
        ("nf4", {"double_quant": False}, 4.5),
        ("int4", {"group_size": 128}, 4.26),
        ("int4", {"group_size": 128, "symmetric": True}, 4.126),
        ("int4", {"group_size": 64}, 4.5),
        ("int8", {}, 8.01),
    ],
)
def test_bits_per_param(fmt, kw, limit):
    qt = qk.quantize(torch.randn(4096, 4096), fmt, **kw)
    assert qt.bits_per_param <= limit
    assert qt.bits_per_param >= (8 if fmt == "int8" else 4)


def test_nf4_levels_and_decode_use_the_tables():
    qt = qk.quantize(torch.randn(4, 64), "nf4", double_quant=False)
    c = codes(qt).long()
    expected = nf4_table()[c] * qt.scales.reshape(4, 1)
    assert torch.equal(qt.dequantize(torch.float32), expected)
    assert len(dynamic_table()) == 256 and torch.all(dynamic_table().diff() > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_and_output_dtypes(dtype):
    w = torch.randn(64, 128).to(dtype)
    for fmt in ("int8", "int4", "nf4"):
        qt = qk.quantize(w, fmt)
        for out in (torch.float32, torch.float16, torch.bfloat16):
            d = qt.dequantize(out, backend="torch")
            assert d.dtype == out and d.shape == (64, 128)
            assert torch.equal(d, dequantize_reference(qt, torch.float32).to(out))


# ------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "weight,fmt,kw,exc,match",
    [
        (torch.randn(4, 8, 8), "nf4", {}, ValueError, "2-D"),
        (torch.randn(64), "nf4", {}, ValueError, "2-D"),
        (torch.randn(8, 64), "fp4", {}, ValueError, "unsupported format"),
        (torch.randn(8, 96), "int4", {"group_size": 64}, ValueError, "does not divide"),
        (torch.randn(8, 96), "nf4", {"group_size": 48}, ValueError, "group_size must be one of"),
        (torch.randint(-3, 3, (8, 64)), "int8", {}, TypeError, "float32, float16 or bfloat16"),
        (torch.randn(8, 64, dtype=torch.float64), "nf4", {}, TypeError, "weight.float"),
        (torch.empty(0, 64), "int8", {}, ValueError, "empty"),
        (torch.full((8, 64), float("nan")), "nf4", {}, ValueError, "NaN or inf"),
        (torch.full((8, 64), float("inf")), "int4", {}, ValueError, "NaN or inf"),
        (torch.randn(8, 64), "int8", {"group_size": 32}, ValueError, "one scale per output row"),
        (torch.randn(8, 64), "nf4", {"symmetric": True}, ValueError, "int4 only"),
    ],
)
def test_bad_input_raises_a_clear_error(weight, fmt, kw, exc, match):
    with pytest.raises(exc, match=match):
        qk.quantize(weight, fmt, **kw)


def test_group_error_suggests_groups_that_fit():
    with pytest.raises(ValueError, match=r"\[32, 64\]"):
        qk.quantize(torch.randn(8, 576), "int4", group_size=128)


def test_bad_dequantize_arguments():
    qt = qk.quantize(torch.randn(8, 64), "int4")
    with pytest.raises(ValueError, match="unknown or unavailable backend"):
        qt.dequantize(torch.float32, backend="cuda-magic")
    with pytest.raises(TypeError, match="dtype"):
        qt.dequantize(torch.int32)


# --------------------------------------------------------------- serialisation
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_state_dict_and_safetensors_round_trip(case, tmp_path):
    fmt, kw = case
    qt = qk.quantize(torch.randn(48, 256), fmt, **kw)
    back = QuantizedTensor.from_state_dict(qt.state_dict(prefix="w."), prefix="w.")
    assert back.format == qt.format and back.shape == qt.shape and back.group_size == qt.group_size
    assert torch.equal(back.dequantize(torch.float32), qt.dequantize(torch.float32))
    path = tmp_path / "w.safetensors"
    qt.save(path)
    loaded = QuantizedTensor.load(path)
    assert loaded.symmetric == qt.symmetric and loaded.double_quant == qt.double_quant
    assert torch.equal(loaded.dequantize(torch.bfloat16), qt.dequantize(torch.bfloat16))
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"


def test_loading_a_state_dict_of_another_format_or_shape_fails_clearly():
    state = qk.quantize(torch.randn(16, 64), "nf4").state_dict()
    with pytest.raises(ValueError, match="'nf4' weight, but a 'int4'"):
        QuantizedTensor.from_state_dict(state, expect_format="int4")
    with pytest.raises(ValueError, match=r"shape \(16, 64\), but shape \(32, 64\)"):
        QuantizedTensor.from_state_dict(state, expect_shape=(32, 64))
    broken = dict(state, scales=state["scales"][:-1])
    with pytest.raises(ValueError, match="'scales' should be"):
        QuantizedTensor.from_state_dict(broken)
    with pytest.raises(ValueError, match="meta"):
        QuantizedTensor.from_state_dict({"data": state["data"]})
    with pytest.raises(FileNotFoundError):
        QuantizedTensor.load("/nonexistent/w.safetensors")


def test_to_device_and_repr():
    qt = qk.quantize(torch.randn(8, 64), "nf4")
    assert qt.to("cpu").device.type == "cpu"
    assert "nf4" in repr(qt) and "double_quant" in repr(qt)


def test_default_group_falls_back_to_one_that_divides_k():
    assert qk.quantize(torch.randn(4, 96), "nf4").group_size == 32
    assert qk.quantize(torch.randn(4, 128), "int4").group_size == 64
    with pytest.raises(ValueError, match="does not divide"):
        qk.quantize(torch.randn(4, 100), "int4")
