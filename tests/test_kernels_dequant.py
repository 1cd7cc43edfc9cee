"""Triton dequantization kernels (interpreter on the CPU) against the PyTorch reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.kernels.dequant import dequantize_triton

CASES = [
    ("int8", {}),
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 128}),
    ("int4", {"group_size": 64, "symmetric": True}),
    ("nf4", {}),
    ("nf4", {"double_quant": False}),
    ("nf4", {"group_size": 256}),
]
# N and K that are not multiples of the 64 x 128 tile; more than 256 NF4 blocks for the nested scales.
SHAPES = [(1, 256), (3, 64), (17, 192), (100, 320), (130, 512)]


PARAMS = [
    pytest.param(fmt, kw, shape, id=f"{fmt}{''.join(f'-{k}={v}' for k, v in kw.items())}-{shape}")
    for fmt, kw in CASES
    for shape in SHAPES
    if fmt == "int8" or shape[1] % kw.get("group_size", 64) == 0
]


@pytest.mark.parametrize("fmt,kw,shape", PARAMS)
def test_triton_dequant_equals_reference_exactly(fmt, kw, shape, device):
    qt = qk.quantize(torch.randn(*shape) * 0.05, fmt, **kw).to(device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.full(shape, float("nan"), dtype=dtype, device=device)
        dequantize_triton(qt, dtype, out=out)
        assert torch.equal(out, qt.dequantize(dtype, backend="torch")), f"{dtype}"


def test_int8_with_odd_k(device):
    qt = qk.quantize(torch.randn(5, 123), "int8").to(device)
    assert torch.equal(qt.dequantize(torch.float32, backend="triton"), qt.dequantize(torch.float32, backend="torch"))


def test_dequant_out_buffer_is_checked(device):
    qt = qk.quantize(torch.randn(8, 64), "nf4").to(device)
    with pytest.raises(ValueError, match="row-major"):
        dequantize_triton(qt, torch.bfloat16, out=torch.empty(8, 32, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,kw", CASES, ids=[f"{f}{''.join(f'-{k}={v}' for k, v in kw.items())}" for f, kw in CASES])
def test_gpu_dequant_equals_reference_exactly(fmt, kw):
    """The compiled dequant kernel on the GPU decodes bit for bit like the PyTorch reference."""
    qt = qk.quantize(torch.randn(300, 1024) * 0.05, fmt, **kw).to("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((300, 1024), float("nan"), dtype=dtype, device="cuda")
        dequantize_triton(qt, dtype, out=out)
        assert torch.equal(out, qt.dequantize(dtype, backend="torch")), f"{dtype}"
