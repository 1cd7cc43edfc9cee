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


# Relative RMSE on N(0, 1) weights (the measured values are in the comments).
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


# ------------------------------------------------------------- corrupt or foreign input
def _nf4_state() -> dict[str, torch.Tensor]:
    return qk.quantize(torch.randn(16, 64), "nf4").state_dict()


def _with_meta(state: dict[str, torch.Tensor], index: int, value: int) -> dict[str, torch.Tensor]:
    meta = state["meta"].clone()
    meta[index] = value
    return dict(state, meta=meta)


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda s: _with_meta(s, 1, 7), r"unknown format id 7 \(known: 0=int8, 1=int4, 2=nf4\)"),
        (lambda s: _with_meta(s, 1, -1), "unknown format id -1"),
        (lambda s: dict(s, meta=s["meta"][:5]), "'meta' must be an int64 tensor of 7 values"),
        (lambda s: dict(s, meta=s["meta"].float()), "'meta' must be an int64 tensor"),
        (lambda s: _with_meta(s, 4, 0), "group_size must be one of .* got 0"),
        (lambda s: _with_meta(s, 4, 48), "group_size must be one of .* got 48"),
        (lambda s: _with_meta(s, 3, 0), r"shape \(16, 0\) is not positive"),
        (lambda s: _with_meta(s, 5, 2), "symmetric flag must be 0 or 1"),
        (lambda s: _with_meta(s, 5, 1), "nf4 weight cannot be symmetric"),
        (lambda s: dict(s, absmax_offset=torch.tensor([float("nan")])), "'absmax_offset' holds NaN or inf"),
        (lambda s: dict(s, absmax_scales=s["absmax_scales"].clone().fill_(float("inf"))), "'absmax_scales' holds NaN"),
    ],
    ids=[
        "format-id-7",
        "format-id-minus-1",
        "short-meta",
        "float-meta",
        "group-0",
        "group-48",
        "zero-k",
        "flag-2",
        "symmetric-nf4",
        "nan-absmax-offset",
        "inf-absmax-scales",
    ],
)
def test_corrupt_metadata_or_scales_fail_with_a_clear_error(corrupt, match):
    with pytest.raises(ValueError, match=match):
        QuantizedTensor.from_state_dict(corrupt(_nf4_state()))


@pytest.mark.parametrize("fmt,field", [("nf4", "scales"), ("int4", "mins"), ("int8", "scales")])
def test_a_file_with_nan_scales_names_the_file_and_the_tensor(fmt, field, tmp_path):
    from safetensors.torch import save_file

    state = qk.quantize(torch.randn(16, 64), fmt, double_quant=False).state_dict()
    state[field] = state[field].clone()
    state[field][3] = float("nan")
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=rf"{path}: tensor '{field}' holds NaN or inf values"):
        QuantizedTensor.load(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_file_names_its_path(damage, tmp_path):
    path = tmp_path / "w.safetensors"
    qk.quantize(torch.randn(16, 64), "nf4").save(path)
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file" * 8, "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file"):
        QuantizedTensor.load(path)
    with pytest.raises(ValueError, match="is a directory"):
        QuantizedTensor.load(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_loading_onto_cuda_without_a_gpu_says_so(tmp_path):
    path = tmp_path / "w.safetensors"
    qk.quantize(torch.randn(16, 64), "int8").save(path)
    with pytest.raises(ValueError, match="device='cuda' needs a CUDA GPU, but none is available"):
        QuantizedTensor.load(path, device="cuda")
    with pytest.raises(ValueError, match="not a device name"):
        QuantizedTensor.load(path, device="gpu0")


@pytest.mark.parametrize("group_size", [64.0, "64", True, torch.tensor(64)])
def test_group_size_must_be_an_integer(group_size):
    with pytest.raises(TypeError, match="group_size must be an integer"):
        qk.quantize(torch.randn(8, 128), "int4", group_size=group_size)


@pytest.mark.parametrize("option", ["symmetric", "double_quant"])
def test_flags_must_be_booleans(option):
    with pytest.raises(TypeError, match=f"{option} must be True or False"):
        qk.quantize(torch.randn(8, 128), "int4", **{option: "no"})


@pytest.mark.parametrize("largest", [2.2e37, 3.4e38])
def test_nf4_double_quant_of_huge_finite_weights_stays_finite(largest):
    w = torch.randn(64, 128)
    w = w / w.abs().max() * largest
    qt = qk.quantize(w, "nf4")
    back = qt.dequantize(torch.float32, backend="torch")
    assert torch.isfinite(back).all()
    err = ((back.double() - w.double()).norm() / w.double().norm()).item()
    assert err < 0.1  # the usual NF4 error, not a broken scale


def test_formats_modules_import_one_way():
    """No cycle among the formats modules, and no import hidden inside a function."""
    import ast
    import importlib
    from pathlib import Path

    package = Path(importlib.import_module("qlora_kernels.formats").__file__).parent
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        # `if TYPE_CHECKING:` blocks hold annotation-only imports, never run
        annotation_only = {
            id(n)
            for block in tree.body
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for n in ast.walk(block)
        }
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in annotation_only:
                assert id(node) in top_level, f"{path.name} imports .{node.module} inside a function"
                deps.add(node.module)
        graph[path.stem] = deps
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import cycle: {' -> '.join((*stack, name))}"
        if name not in done:
            for dep in graph.get(name, ()):
                visit(dep, (*stack, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_the_stored_tensor_fields_are_declared_once():
    from qlora_kernels.formats import TENSOR_FIELDS
    from qlora_kernels.formats.layout import layout

    assert TENSOR_FIELDS == ("data", "scales", "mins", "absmax_scales", "absmax_offset")
    for fmt, kw in CASES:
        qt = qk.quantize(torch.randn(16, 256), fmt, **kw)
        spec = layout(qt.format, qt.shape, qt.group_size, symmetric=qt.symmetric, double_quant=qt.double_quant)
        assert set(spec) <= set(TENSOR_FIELDS)
        assert set(qt.tensors()) == set(spec)
        assert set(qt.state_dict()) == {"meta", *spec}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_moving_to_cuda_without_a_gpu_says_so():
    qt = qk.quantize(torch.randn(8, 64), "nf4")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        qt.to("cuda")
