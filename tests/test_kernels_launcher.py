"""The launchers of the QLoRA matmul own their contract: operand checks, strided bias, empty M,
the fp32 x @ A^T of both paths, the split-K workspace and the NF4 table kept per device.

On the CPU the kernels run in Triton's interpreter (conftest).
"""

from __future__ import annotations

import pytest
import torch
from helpers import REL_TOL, assert_close_by_norm

import qlora_kernels as qk
from qlora_kernels.kernels import dequant
from qlora_kernels.kernels import qlora_configs as qc
from qlora_kernels.kernels import qlora_dense as qd
from qlora_kernels.kernels import qlora_matmul as qm
from qlora_kernels.kernels import qlora_ops as qo
from qlora_kernels.ops import qlora_linear, qlora_linear_ref

N, K, R = 45, 128, 4
FORWARDS = {"fused": qm.qlora_forward_fused, "dense": qd.qlora_forward_dense}
GRAD_INPUTS = {"fused": qm.qlora_grad_input_fused, "dense": qd.qlora_grad_input_dense}


def _problem(device, fmt="int4", dtype=torch.bfloat16, m=5):
    qt = qk.quantize(torch.randn(N, K) * 0.05, fmt).to(device)
    a = (torch.randn(R, K) * 0.1).to(device)
    b = (torch.randn(N, R) * 0.1).to(device)
    x = torch.randn(m, K).to(device, dtype)
    return qt, a, b, x


# ------------------------------------------------------------------------- operand checks
@pytest.mark.parametrize("path", ["fused", "dense"])
def test_forward_rejects_operands_that_do_not_match_the_weight(path, device):
    forward = FORWARDS[path]
    qt, a, b, x = _problem(device)
    wide_x = torch.randn(5, K + 32, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"x must have {K} columns"):
        forward(wide_x, qt, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_a must have shape"):
        forward(x, qt, torch.randn(R, K + 32, device=device), b, 1.0)
    with pytest.raises(ValueError, match="lora_b must be"):
        forward(x, qt, a, torch.randn(N, R + 1, device=device), 1.0)
    with pytest.raises(ValueError, match="both lora_a and lora_b"):
        forward(x, qt, a, None, 1.0)
    with pytest.raises(ValueError, match=rf"bias must have shape \(N,\)=\({N},\)"):
        forward(x, qt, a, b, 1.0, torch.randn(N + 1, device=device))
    with pytest.raises(TypeError, match="lora_a must be bf16, fp16 or fp32"):
        forward(x, qt, a.double(), b, 1.0)
    with pytest.raises(TypeError, match="qt must be a QuantizedTensor"):
        forward(x, qt.dequantize(torch.float32), a, b, 1.0)


@pytest.mark.parametrize("path", ["fused", "dense"])
def test_grad_input_rejects_dy_that_does_not_match_the_weight(path, device):
    qt, a, b, _ = _problem(device)
    with pytest.raises(ValueError, match=f"dy must have {N} columns"):
        GRAD_INPUTS[path](torch.randn(3, N + 16, device=device, dtype=torch.bfloat16), qt, a, b, 1.0)


@pytest.mark.parametrize("path", ["fused", "dense"])
def test_strided_bias_is_read_correctly(path, device):
    """A bias with stride 2 (a view of every other element) gives the result of its contiguous copy."""
    qt, a, b, x = _problem(device, dtype=torch.float32)
    bias = torch.randn(2 * N, device=device)[::2]
    assert bias.stride(0) == 2
    y, _ = FORWARDS[path](x, qt, a, b, 0.5, bias)
    assert_close_by_norm(y, qlora_linear_ref(x, qt, a, b, 0.5, bias.contiguous()), REL_TOL[torch.float32], "bias")


@pytest.mark.parametrize("path", ["fused", "dense"])
def test_empty_batch_gives_empty_outputs(path, device):
    qt, a, b, _ = _problem(device)
    x = torch.empty(0, K, device=device, dtype=torch.bfloat16)
    y, xa = FORWARDS[path](x, qt, a, b, 1.0, torch.randn(N, device=device))
    assert y.shape == (0, N) and xa.shape == (0, R) and xa.dtype == torch.float32
    dx = GRAD_INPUTS[path](torch.empty(0, N, device=device, dtype=torch.bfloat16), qt, a, b, 1.0)
    assert dx.shape == (0, K)


def test_launch_refuses_outputs_without_unit_inner_stride(device):
    qt, a, b, x = _problem(device)
    out = torch.empty(N, x.shape[0], device=device, dtype=x.dtype).t()
    with pytest.raises(ValueError, match="unit stride"):
        qm._launch(qc.MODE_FORWARD, x, qt, a, b, 1.0, None, out, None)


@pytest.mark.skipif(not qo._HAS_CUSTOM_OP, reason="this torch has no torch.library.custom_op")
def test_fake_implementations_check_operand_shapes(device):
    """Under fake tensors (torch.compile's tracing) the ops check shapes with torch._check and
    give the output shapes without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    qt, a, b, _ = _problem(device)
    mode = FakeTensorMode()
    fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
    fields = [fake(f) for f in qo.weight_fields(qt)]
    fa, fb = fake(a), fake(b)
    forward, grad_input = torch.ops.qlora_kernels.qlora_forward, torch.ops.qlora_kernels.qlora_grad_input
    with mode:
        y, xa = forward(torch.empty(3, K, dtype=torch.bfloat16, device=device), *fields, fa, fb, 0.5, None)
        assert y.shape == (3, N) and xa.shape == (3, R) and xa.dtype == torch.float32
        with pytest.raises(RuntimeError, match=f"{K} columns"):
            forward(torch.empty(3, K + 1, dtype=torch.bfloat16, device=device), *fields, fa, fb, 0.5, None)
        with pytest.raises(RuntimeError, match="bias must have"):
            forward(torch.empty(3, K, dtype=torch.bfloat16, device=device), *fields, fa, fb, 0.5,
                    torch.empty(N + 1, device=device))  # fmt: skip
        with pytest.raises(RuntimeError, match=f"{N} columns"):
            grad_input(torch.empty(3, N - 1, dtype=torch.bfloat16, device=device), *fields, fa, fb, 0.5)


# ------------------------------------------------------------------ x @ A^T is fp32 on both paths
@pytest.mark.parametrize("path", ["fused", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_down_projection_is_accumulated_and_returned_in_fp32(path, dtype, device):
    """xa = x @ A^T from operands in x's dtype (A rounded to it, as the kernel's dot takes it),
    accumulated and returned in fp32: no rounding of the result to x's dtype (which costs ~1e-3)."""
    qt, a, b, x = _problem(device, dtype=dtype, m=20)
    _, xa = FORWARDS[path](x, qt, a, b, 1.0)
    exact = x.double() @ a.to(dtype).double().t()
    assert xa.dtype == torch.float32
    assert_close_by_norm(xa, exact, 1e-6, f"{path} x @ A^T")


def test_lora_b_gradient_is_the_same_on_both_paths(monkeypatch, device):
    """dB = s * dy^T @ (x @ A^T) comes from the saved x @ A^T, so it must not depend on the path."""
    qt, a, b, x = _problem(device, m=24)
    grads = {}
    for path, limit in (("fused", 1 << 30), ("dense", -1)):
        monkeypatch.setattr(qo, "FUSED_MAX_M", limit)
        monkeypatch.setattr(qo, "FUSED_BWD_MAX_M", limit)
        bl = b.clone().requires_grad_()
        y = qlora_linear(x, qt, a, bl, 2.0, backend="triton")
        torch.manual_seed(3)
        y.backward(torch.randn_like(y))
        grads[path] = bl.grad
    assert_close_by_norm(grads["dense"], grads["fused"], 1e-5, "dB dense vs fused")


# ----------------------------------------------------------------------------- split-K workspace
@pytest.fixture
def split_k_only(monkeypatch):
    """The interpreter's split-K config as the forward's only config, with fresh workspaces."""
    monkeypatch.setattr(qm.autotuner(qc.MODE_FORWARD), "configs", [qc.INTERPRETER_SPLIT_K_CONFIG])
    monkeypatch.setattr(qm.autotuner(qc.MODE_FORWARD), "cache", {})
    monkeypatch.setattr(qm, "_WORKSPACES", {})


def _allocations(monkeypatch) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Record (shape, dtype) of every torch.empty / torch.zeros call from now on."""
    seen: list[tuple[tuple[int, ...], torch.dtype]] = []
    for name in ("empty", "zeros"):
        real = getattr(torch, name)

        def recording(*size, real=real, **kw):
            out = real(*size, **kw)
            seen.append((tuple(out.shape), out.dtype))
            return out

        monkeypatch.setattr(torch, name, recording)
    return seen


def test_split_k_workspace_is_allocated_once_and_reused(split_k_only, monkeypatch, device):
    qt, a, b, x = _problem(device, fmt="nf4", m=3)
    y_first, _ = qm.qlora_forward_fused(x, qt, a, b, 0.5)
    seen = _allocations(monkeypatch)
    y, _ = qm.qlora_forward_fused(x, qt, a, b, 0.5)
    assert seen == [((3, N), torch.bfloat16), ((3, R), torch.float32)], "only y and x @ A^T are allocated"
    assert torch.equal(y, y_first)
    assert not qm.split_k_workspace(device).counters.any(), "a tile counter was not reset"


def test_workspace_stays_minimal_when_no_config_splits(monkeypatch, device):
    """Without a split-K candidate the launch passes the device's one-element workspace buffers
    (so the kernel's signature does not depend on the config list) and allocates only y and xa."""
    monkeypatch.setattr(qm, "_WORKSPACES", {})
    assert all(c.kwargs["SPLIT_K"] == 1 for c in qm.autotuner(qc.MODE_FORWARD).configs)
    qt, a, b, x = _problem(device, m=2)
    qm.qlora_forward_fused(x, qt, a, b, 0.5)
    seen = _allocations(monkeypatch)
    qm.qlora_forward_fused(x, qt, a, b, 0.5)
    assert seen == [((2, N), torch.bfloat16), ((2, R), torch.float32)]
    workspace = qm.split_k_workspace(device)
    assert workspace.partials.numel() == workspace.sides.numel() == workspace.counters.numel() == 1


# ------------------------------------------------------------------------------ GEMV (M = 1)
GEMV_CONFIGS = [c for c in qc.gpu_configs(qc.MODE_FORWARD) if c.kwargs["BLOCK_M"] == 1]


def test_gemv_configs_are_offered_to_m_1_forwards_only():
    assert GEMV_CONFIGS, "no BLOCK_M = 1 forward config"
    for cfg in GEMV_CONFIGS:
        assert qc.config_is_valid(cfg, qc.MODE_FORWARD, 128, 1, 1, 16)
        assert not qc.config_is_valid(cfg, qc.MODE_FORWARD, 128, 1, 2, 16), "GEMV offered to M = 2"
        assert not qc.config_is_valid(cfg, qc.MODE_GRAD_INPUT, 128, 1, 1, 16), "GEMV offered to the backward"


GEMV_GROUPS = {"nf4": 64, "int4": 128, "int8": None}
#: (config, format) pairs the autotuner may combine: a 4-bit tile's K extent divides the group.
GEMV_CASES = [
    (cfg, fmt)
    for cfg in GEMV_CONFIGS
    for fmt, group in GEMV_GROUPS.items()
    if group is None or group % cfg.kwargs["BLOCK_RED"] == 0
]


@pytest.mark.parametrize("cfg,fmt", GEMV_CASES, ids=[f"{qc.config_label(c)}-{f}" for c, f in GEMV_CASES])
def test_gemv_config_matches_reference(cfg, fmt, monkeypatch, device):
    """Each BLOCK_M = 1 config (forced, as the autotuner may pick it on a GPU) computes y, x @ A^T
    and the bias like the reference, at M = 1 and at M = 3 (one program per row), N = 200 (not a
    tile multiple), K = 256 spanning several K steps and splits."""
    group = GEMV_GROUPS[fmt]
    monkeypatch.setattr(qm.autotuner(qc.MODE_FORWARD), "configs", [cfg])
    monkeypatch.setattr(qm.autotuner(qc.MODE_FORWARD), "cache", {})
    monkeypatch.setattr(qm, "_WORKSPACES", {})
    n, k, r = 200, 256, 5
    qt = qk.quantize(torch.randn(n, k) * 0.05, fmt, **({"group_size": group} if group else {})).to(device)
    a = (torch.randn(r, k) * 0.1).to(device)
    b = (torch.randn(n, r) * 0.1).to(device)
    bias = torch.randn(n).to(device)
    for m in (1, 3):
        x = torch.randn(m, k).to(device, torch.bfloat16)
        y, xa = qm.qlora_forward_fused(x, qt, a, b, 0.5, bias)
        ref = qlora_linear_ref(x.float(), qt, a.to(torch.bfloat16), b, 0.5, bias)
        assert_close_by_norm(y.float(), ref, REL_TOL[torch.bfloat16], f"{fmt} y, M={m}")
        xa_ref = x.double() @ a.to(torch.bfloat16).double().t()
        assert_close_by_norm(xa.double(), xa_ref, 1e-5, f"{fmt} x @ A^T, M={m}")
        assert not qm.split_k_workspace(device).counters.any(), "a tile counter was not reset"


# --------------------------------------------------------------------------------- NF4 table
def test_nf4_dynamic_table_is_built_once_per_device(monkeypatch, device):
    """The double-quant table is made and copied to the device once, not on every launch."""
    built = []
    real = dequant.dynamic_table
    monkeypatch.setattr(dequant, "dynamic_table", lambda dev="cpu": built.append(dev) or real(dev))
    monkeypatch.setattr(dequant, "_NESTED_TABLES", {})
    qt, a, b, x = _problem(device, fmt="nf4")
    assert qt.double_quant
    for _ in range(3):
        dequant.dequantize_triton(qt, torch.float32)
        qm.qlora_forward_fused(x, qt, a, b, 1.0)
    assert len(built) == 1
    assert dequant.nested_table(device) is dequant.nested_table(device)


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_dense_down_projection_is_fp32_and_split_k_is_reproducible():
    """On CUDA the dense path takes cuBLAS's fp32-output GEMM for x @ A^T; every split-K config
    gives bitwise-equal results run after run and leaves its tile counters at zero."""
    qt = qk.quantize(torch.randn(1024, 2048) * 0.05, "nf4").to("cuda")
    a = (torch.randn(16, 2048) * 0.1).cuda()
    b = (torch.randn(1024, 16) * 0.1).cuda()
    x = torch.randn(40, 2048, device="cuda").to(torch.bfloat16)
    _, xa = qd.qlora_forward_dense(x, qt, a, b, 1.0)
    assert_close_by_norm(xa, x.double() @ a.to(torch.bfloat16).double().t(), 1e-5, "dense x @ A^T on CUDA")
    tuner = qm.autotuner(qc.MODE_FORWARD)
    saved = tuner.configs, tuner.cache
    try:
        for cfg in [c for c in qc.gpu_configs(qc.MODE_FORWARD) if c.kwargs["SPLIT_K"] > 1]:
            tuner.configs, tuner.cache = [cfg], {}
            first = qm.qlora_forward_fused(x[:7], qt, a, b, 1.0)
            for _ in range(3):
                again = qm.qlora_forward_fused(x[:7], qt, a, b, 1.0)
                assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True)), qc.config_label(cfg)
            assert not qm.split_k_workspace(x.device).counters.any()
    finally:
        tuner.configs, tuner.cache = saved
