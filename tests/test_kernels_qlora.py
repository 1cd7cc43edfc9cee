"""Triton QLoRA matmul (fused and large-M paths) against the fp32 reference, with gradients.

On the CPU the kernels run in Triton's interpreter (conftest), so shapes are small; every
output buffer the kernels write is poisoned with NaN first (the launchers allocate with
torch.empty, which we patch to torch.full(nan) for these tests).
"""

from __future__ import annotations

import pytest
import torch
from helpers import REL_TOL, assert_close_by_norm

import qlora_kernels as qk
from qlora_kernels.kernels import qlora_configs as qc
from qlora_kernels.kernels import qlora_dense as qd
from qlora_kernels.kernels import qlora_matmul as qm
from qlora_kernels.kernels import qlora_ops as qo
from qlora_kernels.ops import qlora_linear, qlora_linear_ref

# (format, quantize kwargs, K): K not a multiple of the interpreter's 32-wide tile for int8.
FORMATS = [("int8", {}, 100), ("int4", {"group_size": 64}, 192), ("nf4", {}, 192)]
FORMAT_IDS = [f[0] for f in FORMATS]
#: Gradient tolerances are looser than the forward's: dA sums over M and N in fp32 from
#: inputs rounded to the dtype, dX adds two rounded products.
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every tensor the launchers allocate starts as NaN, so an unwritten element fails."""
    real_empty = torch.empty

    def nan_empty(*size, dtype=None, device=None, **kw):
        out = real_empty(*size, dtype=dtype, device=device, **kw)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(qm.torch, "empty", nan_empty)


@pytest.fixture(params=["fused", "dense"])
def path(request, monkeypatch):
    """Force the fused kernels (threshold up) or the decode-buffer + cuBLAS path (threshold -1)."""
    limit = 1 << 30 if request.param == "fused" else -1
    monkeypatch.setattr(qo, "FUSED_MAX_M", limit)
    monkeypatch.setattr(qo, "FUSED_BWD_MAX_M", limit)
    return request.param


def _randn(*shape, scale=1.0, device="cpu", dtype=torch.float32):
    """Gaussian data, never exactly zero (a zero could hide an unwritten or unread element)."""
    t = torch.randn(*shape) * scale
    t = torch.where(t.abs() < 1e-3 * scale, torch.full_like(t, 1e-3 * scale), t)
    return t.to(device=device, dtype=dtype)


def _problem(fmt, kw, k, n, device, r=4):
    qt = qk.quantize(_randn(n, k, scale=0.05), fmt, **kw).to(device)
    a = _randn(r, k, scale=0.1, device=device)
    b = _randn(n, r, scale=0.1, device=device)
    return qt, a, b


def _run(x, qt, a, b, bias, scaling, backend):
    """Forward + backward with a fixed random dy; returns (y, dx, da, db, dbias)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, a, b, bias)]
    xl, al, bl, biasl = leaves
    y = (qlora_linear if backend else qlora_linear_ref)(xl, qt, al, bl, scaling, biasl, **backend)
    torch.manual_seed(1)
    dy = _randn(*y.shape, device=y.device).to(y.dtype)
    y.backward(dy)
    return y.detach(), *(t.grad if t is not None else None for t in leaves)


def _check_against_reference(x, qt, a, b, bias, scaling=0.5):
    dtype = x.dtype
    got = _run(x, qt, a, b, bias, scaling, {"backend": "triton"})
    ref = _run(x.float(), qt, None if a is None else a, b, bias, scaling, {})
    errors = {}
    for name, g, e in zip(("y", "dx", "da", "db", "dbias"), got, ref, strict=True):
        if e is None:
            assert g is None, name
            continue
        tol = REL_TOL[dtype] if name == "y" else GRAD_TOL[dtype]
        assert not torch.isnan(g).any(), f"{name}: NaN (an element was not written)"
        errors[name] = assert_close_by_norm(g.float(), e.float(), tol, f"{name} {qt.format} {dtype}")
    return errors


@pytest.mark.parametrize("fmt,kw,k", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 17])
def test_matches_reference(fmt, kw, k, dtype, m, path, device):
    """Forward and gradients of x, A, B and bias, 2-D x, N = 45 (not a tile multiple)."""
    qt, a, b = _problem(fmt, kw, k, 45, device)
    x = _randn(m, k, device=device, dtype=dtype)
    bias = _randn(45, device=device)
    _check_against_reference(x, qt, a, b, bias)


@pytest.mark.parametrize("fmt,kw,k", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("lora,bias", [(False, False), (True, False), (False, True)], ids=["plain", "lora", "bias"])
def test_3d_input_with_and_without_lora_and_bias(fmt, kw, k, lora, bias, path, device):
    """3-D x (2, 32, K): M = 64; N = 100; bf16."""
    qt, a, b = _problem(fmt, kw, k, 100, device, r=8)
    x = _randn(2, 32, k, device=device, dtype=torch.bfloat16)
    _check_against_reference(
        x, qt, a if lora else None, b if lora else None, _randn(100, device=device) if bias else None
    )


@pytest.mark.parametrize("m", [3, 64])
def test_odd_m_fused_int4(m, device):
    """M = 3 and M = 64 (the fused limit) through the default dispatch."""
    qt, a, b = _problem("int4", {"group_size": 32}, 96, 45, device)
    _check_against_reference(_randn(m, 96, device=device, dtype=torch.bfloat16), qt, a, b, None)


def test_lora_rank_above_pad_and_mixed_lora_dtype(device):
    """r = 20 pads to 32; A/B in bf16 while x is fp16 (the kernel converts through fp32)."""
    qt = qk.quantize(_randn(45, 128, scale=0.05), "nf4").to(device)
    a = _randn(20, 128, scale=0.1, device=device, dtype=torch.bfloat16)
    b = _randn(45, 20, scale=0.1, device=device, dtype=torch.bfloat16)
    x = _randn(5, 128, device=device, dtype=torch.float16)
    y = qlora_linear(x, qt, a, b, 2.0, backend="triton")
    assert_close_by_norm(y.float(), qlora_linear_ref(x.float(), qt, a, b, 2.0), REL_TOL[torch.float16], "r=20")


@pytest.mark.parametrize("kind", ["sliced", "transposed"])
def test_non_contiguous_input_equals_contiguous(kind, path, device):
    qt, a, b = _problem("int4", {"group_size": 64}, 128, 45, device)
    if kind == "sliced":
        x = _randn(6, 256, device=device, dtype=torch.bfloat16)[:, ::2]
    else:
        x = _randn(128, 10, device=device, dtype=torch.bfloat16).t()[1:7]
    assert not x.is_contiguous()
    y = qlora_linear(x, qt, a, b, 0.5, backend="triton")
    assert torch.equal(y, qlora_linear(x.contiguous(), qt, a, b, 0.5, backend="triton"))


def test_kernel_launchers_take_strided_activations(device):
    """The fused launcher itself reads x through its strides (no hidden .contiguous())."""
    qt, a, b = _problem("int8", {}, 64, 45, device)
    x = _randn(4, 128, device=device)[:, ::2]
    y, xa = qm.qlora_forward_fused(x, qt, a, b, 0.5)
    y_ref, xa_ref = qm.qlora_forward_fused(x.contiguous(), qt, a, b, 0.5)
    assert torch.equal(y, y_ref) and torch.equal(xa, xa_ref)


def test_dense_path_reuses_one_buffer(monkeypatch, device):
    monkeypatch.setattr(qo, "FUSED_MAX_M", -1)
    qd.clear_weight_buffers()
    qt, a, b = _problem("nf4", {}, 128, 45, device)
    for _ in range(2):
        qlora_linear(_randn(3, 128, device=device, dtype=torch.bfloat16), qt, a, b, 1.0, backend="triton")
    assert list(qd._WEIGHT_BUFFERS) == [((45, 128), torch.bfloat16, torch.device(device))]


def test_autograd_saves_no_dense_weight(device):
    """What autograd keeps is x (M, K), x @ A^T (M, r), A and B: nothing of W's (N, K) size."""
    qt, a, b = _problem("int4", {"group_size": 64}, 128, 45, device)
    x = _randn(3, 128, device=device, dtype=torch.bfloat16).requires_grad_()
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        qlora_linear(x, qt, a.requires_grad_(), b.requires_grad_(), 0.5, backend="triton")
    assert sorted(shapes) == sorted([(3, 128), (3, 4), (4, 128), (45, 4)])


# ---------------------------------------------------------------------------------- split-K
@pytest.fixture
def split_k(monkeypatch):
    """Install the interpreter's split-K config (SPLIT_K=3, BLOCK_RED=32) as the forward's only config."""
    monkeypatch.setattr(qm.autotuner(qc.MODE_FORWARD), "configs", [qc.INTERPRETER_SPLIT_K_CONFIG])
    monkeypatch.setattr(qm.autotuner(qc.MODE_FORWARD), "cache", {})
    monkeypatch.setattr(qo, "FUSED_MAX_M", 1 << 30)
    return qc.INTERPRETER_SPLIT_K_CONFIG.kwargs["SPLIT_K"]


# K = 100 (int8): 4 K-steps in 3 splits of 2, so the last split is empty; K = 192: 6 in 3 x 2.
@pytest.mark.parametrize("fmt,kw,k", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("m", [1, 17])
def test_split_k_forward_matches_reference(fmt, kw, k, m, split_k, device):
    """LoRA side reduced over the splits, up-projection and bias added once; 2 N tiles, 1-2 M tiles."""
    qt, a, b = _problem(fmt, kw, k, 45, device)
    x = _randn(m, k, device=device, dtype=torch.bfloat16)
    bias = _randn(45, device=device)
    _check_against_reference(x, qt, a, b, bias)
    y, xa = qm.qlora_forward_fused(x, qt, a, b, 0.5, bias)
    assert_close_by_norm(xa, x.float() @ a.t(), REL_TOL[torch.bfloat16], "x @ A^T over the splits")
    assert not qm.split_k_workspace(device).counters.any(), "a tile counter was not reset"
    y2, xa2 = qm.qlora_forward_fused(x, qt, a, b, 0.5, bias)
    assert torch.equal(y, y2) and torch.equal(xa, xa2), "split-K results must be reproducible"


def test_split_k_without_lora_or_bias(split_k, device):
    qt, _, _ = _problem("nf4", {}, 128, 45, device)
    x = _randn(3, 128, device=device, dtype=torch.float32)
    y, xa = qm.qlora_forward_fused(x, qt, None, None, 1.0)
    assert xa is None
    assert_close_by_norm(y, qlora_linear_ref(x, qt, None, None, 1.0), REL_TOL[torch.float32], "split-K plain")


def test_split_k_configs_only_for_small_m_forward():
    for c in qc.gpu_configs(qc.MODE_FORWARD):
        if c.kwargs["SPLIT_K"] > 1:
            assert not qc.config_is_valid(c, qc.MODE_FORWARD, 128, 1, qc.m_bucket(qc.SPLIT_K_MAX_M + 1), 16)
    assert any(
        c.kwargs["SPLIT_K"] > 1 and qc.config_is_valid(c, qc.MODE_FORWARD, 64, 2, 1, 16)
        for c in qc.gpu_configs(qc.MODE_FORWARD)
    ), "NF4 g64 at M = 1 has a split-K config"
    assert all(c.kwargs["SPLIT_K"] == 1 for c in qc.gpu_configs(qc.MODE_GRAD_INPUT))


# ------------------------------------------------------------------------- configs / tuning
def test_m_bucket_and_rank_padding():
    assert [qc.m_bucket(m) for m in (1, 3, 16, 17, 64, 4096)] == [1, 4, 16, 32, 64, 64]
    assert [qc.lora_r_pad(r) for r in (1, 8, 16, 17, 64)] == [16, 16, 16, 32, 64]


@pytest.mark.parametrize("mode", [qc.MODE_FORWARD, qc.MODE_GRAD_INPUT])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_config_pruning_keeps_invariants(mode, group):
    for fmt_id in (1, 2):
        kept = [c for c in qc.gpu_configs(mode) if qc.config_is_valid(c, mode, group, fmt_id, 64, 16)]
        assert kept, f"no config for group {group}, format {fmt_id}"
        for c in kept:
            weight_k = c.kwargs["BLOCK_RED"] if mode == qc.MODE_FORWARD else c.kwargs["BLOCK_OUT"]
            assert group % weight_k == 0
    # small M buckets never get the 64-row tile
    assert all(
        c.kwargs["BLOCK_M"] == 16
        for c in qc.gpu_configs(mode)
        if qc.config_is_valid(c, mode, 128, 1, qc.m_bucket(3), 16)
    )


def test_interpreter_uses_one_small_config():
    assert qc.kernel_configs(qc.MODE_FORWARD) == [qc.INTERPRETER_CONFIG]
    kw = qc.INTERPRETER_CONFIG.kwargs
    assert kw["SPLIT_K"] == 1 and kw["BLOCK_M"] == 16
    assert all(group % kw["BLOCK_RED"] == 0 and group % kw["BLOCK_OUT"] == 0 for group in (32, 64, 128, 256))


# -------------------------------------------------------------------- reference / custom ops
def test_reference_gradcheck_fp64():
    qt = qk.quantize(_randn(6, 64, scale=0.05), "nf4")
    x = _randn(3, 64, dtype=torch.float64).requires_grad_()
    a = _randn(2, 64, scale=0.1, dtype=torch.float64).requires_grad_()
    b = _randn(6, 2, scale=0.1, dtype=torch.float64).requires_grad_()
    bias = _randn(6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: qlora_linear_ref(t[0], qt, t[1], t[2], 0.7, t[3]), (x, a, b, bias))


@pytest.mark.skipif(not qo._HAS_CUSTOM_OP, reason="this torch has no torch.library.custom_op")
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("lora", [True, False])
def test_opcheck_custom_ops(fmt, lora, device):
    qt, a, b = _problem(fmt, {}, 64, 20, device)
    x = _randn(3, 64, device=device, dtype=torch.bfloat16)
    fields = qo.weight_fields(qt)
    a, b = (a, b) if lora else (None, None)
    bias = _randn(20, device=device) if lora else None
    torch.library.opcheck(torch.ops.qlora_kernels.qlora_forward.default, (x, *fields, a, b, 0.5, bias))
    dy = _randn(3, 20, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.qlora_kernels.qlora_grad_input.default, (dy, *fields, a, b, 0.5))


@pytest.mark.skipif(not qo._HAS_CUSTOM_OP, reason="this torch has no torch.library.custom_op")
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_no_graph_break(compile_backend, device):
    """torch.compile(fullgraph=True) traces qlora_linear(backend="triton") through the custom
    ops' fake impls (aot_eager: AOTAutograd on fake tensors; inductor: also its codegen around
    the opaque ops), forward and backward; a graph break would raise."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    qt, a, b = _problem("nf4", {}, 64, 45, device)
    a.requires_grad_()
    x = _randn(3, 64, device=device, dtype=torch.bfloat16).requires_grad_()

    def f(x):
        return qlora_linear(x, qt, a, b, 0.5, backend="triton")

    y = torch.compile(f, fullgraph=True, backend=compile_backend)(x)
    y.float().square().sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    y_ref = qlora_linear_ref(x.detach().float(), qt, a.detach(), b, 0.5)
    assert y.dtype == torch.bfloat16
    assert_close_by_norm(y.detach().float(), y_ref, REL_TOL[torch.bfloat16], f"compiled ({compile_backend})")
    assert x.grad is not None and a.grad is not None and not torch.isnan(x.grad).any()
    torch._dynamo.reset()


def test_autocast_bf16_through_triton_backend(device):
    """An fp32 x inside torch.autocast(bf16) on x's device runs the kernels in bf16: bf16 output
    matching the reference on the bf16-rounded x, fp32 gradient for the fp32 leaf."""
    qt, a, b = _problem("int4", {"group_size": 64}, 128, 45, device)
    bias = _randn(45, device=device)
    x = _randn(2, 3, 128, device=device).requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = qlora_linear(x, qt, a, b, 0.5, bias, backend="triton")
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 45)
    ref = qlora_linear_ref(x.detach().to(torch.bfloat16).float(), qt, a, b, 0.5, bias)
    assert_close_by_norm(y.float(), ref, REL_TOL[torch.bfloat16], "autocast bf16")
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and not torch.isnan(x.grad).any()


def test_errors_name_the_problem(device):
    qt, a, b = _problem("int4", {}, 64, 20, device)
    with pytest.raises(ValueError, match="2-D"):
        qm.qlora_forward_fused(_randn(2, 3, 64, device=device), qt, a, b, 1.0)
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        qm.qlora_forward_fused(_randn(2, 64, device=device, dtype=torch.float64), qt, a, b, 1.0)


# -------------------------------------------------------------------------------- GPU (bf16)
# Sizes divisible by 16, rank 16, fp32 LoRA and no bias, like benchmarks/gpu_check.py's config
# check, so on a GPU these reuse the kernels that check compiled; one case adds a bias.
@pytest.mark.gpu
@pytest.mark.parametrize("fmt,kw,k", [("int8", {}, 4096), ("int4", {"group_size": 128}, 4096), ("nf4", {}, 4096)])
@pytest.mark.parametrize("m", [1, 16, 64, 300])
def test_gpu_bf16_matches_reference(fmt, kw, k, m):
    qt, a, b = _problem(fmt, kw, k, 1024, "cuda", r=16)
    x = _randn(m, k, device="cuda", dtype=torch.bfloat16)
    _check_against_reference(x, qt, a, b, None)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [5, 300])
def test_gpu_bf16_with_bias_and_odd_n(m):
    qt, a, b = _problem("nf4", {}, 1024, 1000, "cuda", r=16)
    x = _randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    _check_against_reference(x, qt, a, b, _randn(1000, device="cuda"))


@pytest.mark.gpu
def test_gpu_bf16_3d_non_contiguous():
    qt, a, b = _problem("nf4", {}, 512, 384, "cuda", r=16)
    x = _randn(2, 9, 1024, device="cuda", dtype=torch.bfloat16)[..., ::2]
    y = qlora_linear(x, qt, a, b, 0.5, backend="triton")
    assert torch.equal(y, qlora_linear(x.contiguous(), qt, a, b, 0.5, backend="triton"))
    assert_close_by_norm(y.float(), qlora_linear_ref(x.float(), qt, a, b, 0.5), REL_TOL[torch.bfloat16], "gpu 3d")
