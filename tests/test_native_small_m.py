"""The fused small-M forward (csrc/small_m_cpu.cpp): y = x W^T + s (x A^T) B^T + bias for M <= 16 rows.

Against the fp32 reference `qlora_linear_ref` on every format and group size, odd shapes, every
instruction-set path this CPU has, with and without LoRA and bias; the result does not depend on
the thread count; the CPU backend dispatches to it by M; bad input gives clear errors.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.ops import native
from qlora_kernels.ops.qlora_linear import qlora_linear, qlora_linear_ref

qlora_linear_module = importlib.import_module("qlora_kernels.ops.qlora_linear")  # the package re-exports the function
quant_linear_module = importlib.import_module("qlora_kernels.nn.quant_linear")

needs_native = pytest.mark.skipif(not native.native_available(), reason=native.native_status().error or "")

_ISA_ORDER = ("scalar", "avx2", "avx512", "avx512_bf16")
# The paths this CPU can run (each tested explicitly), best last.
ISAS = _ISA_ORDER[: _ISA_ORDER.index(native.small_m_isa()) + 1] if native.native_available() else ()
# (format, group_size, quantize options, K values: multiples of the group, odd where the group allows)
CONFIGS = [
    ("nf4", 32, {"double_quant": True}, (96, 160)),
    ("nf4", 64, {"double_quant": True}, (192, 576)),
    ("nf4", 64, {"double_quant": False}, (192,)),
    ("nf4", 128, {"double_quant": True}, (384,)),
    ("nf4", 256, {"double_quant": False}, (768,)),
    ("int4", 32, {}, (96, 192, 224)),
    ("int4", 32, {"symmetric": True}, (160,)),
    ("int4", 64, {}, (192,)),
    ("int4", 128, {"symmetric": True}, (384,)),
    ("int4", 256, {}, (256,)),
    ("int8", None, {}, (123, 77, 64)),
]
ROWS = (37, 5, 67)  # N: odd, below and above the 4-row tiles


def _config_id(config) -> str:
    fmt, group, opts, _ = config
    return "-".join([fmt, str(group)] + [k for k, v in opts.items() if v])


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows of several magnitudes, so groups differ in scale."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.logspace(-2, 0.5, n)[:, None]


def _lora(n: int, k: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, k, generator=g) / k**0.5, torch.randn(n, r, generator=g) * 0.1


def _reference32(x, qt, a, b, scaling, bias) -> torch.Tensor:
    """The reference in fp32 on x's values (before rounding to x's dtype)."""
    return qlora_linear_ref(x.float(), qt, a, b, scaling, None if bias is None else bias.float())


def assert_matches_reference(
    y: torch.Tensor, expected32: torch.Tensor, dtype: torch.dtype, what: str, isa: str = "auto"
) -> None:
    """fp32: within fp32 accumulation-order error; bf16 / fp16: within one rounding of the fp32 result
    (two for bf16 on the "avx512_bf16" path, which also rounds the decoded weight to bf16)."""
    assert y.dtype == dtype, what
    scale = expected32.abs().amax().clamp(min=1e-6)
    rel = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    if isa == "avx512_bf16" and dtype == torch.bfloat16:
        rel *= 2
    err = ((y.float() - expected32).abs() / scale).amax().item()
    assert err <= rel, f"{what}: max error {err:.3g} x max|y| exceeds {rel:.3g}"


# ---------------------------------------------------------------------------- correctness
@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_fused_matches_the_reference(config, isa: str) -> None:
    """Every M in 1..16 with odd N and K, LoRA of several ranks (and none), bias, three x dtypes."""
    fmt, group, opts, ks = config
    for k in ks:
        for n in ROWS:
            qt = qk.quantize(_weight(n, k, seed=n * 7 + k), fmt, group_size=group, **opts)
            for m in range(1, 17):
                dtype = (torch.float32, torch.bfloat16, torch.float16)[m % 3]
                r = (None, 1, 16, 17, 3)[m % 5]
                a, b = _lora(n, k, r, seed=m) if r else (None, None)
                bias = torch.randn(n).to(dtype if m % 2 else torch.float32) if m % 4 else None
                x = torch.randn(m, k).to(dtype)
                y, xa = native.fused_small_m_forward(x, qt, a, b, 1.5, bias, isa=isa)
                what = f"{fmt} g{group} {opts} N={n} K={k} M={m} r={r} bias={bias is not None} {dtype} {isa}"
                assert y.shape == (m, n), what
                assert_matches_reference(y, _reference32(x, qt, a, b, 1.5, bias), dtype, what, isa)
                if a is None:
                    assert xa is None
                else:
                    assert xa.dtype == torch.float32 and xa.shape == (m, r)
                    torch.testing.assert_close(xa, x.float() @ a.t(), rtol=1e-5, atol=1e-5, msg=what)


@needs_native
def test_the_op_takes_x_with_leading_dimensions() -> None:
    """x (..., K) -> y (..., N) and xa (..., r), equal to the flattened call's."""
    qt = qk.quantize(_weight(24, 192, seed=1), "nf4")
    a, b = _lora(24, 192, 5, seed=2)
    x = torch.randn(2, 3, 192).bfloat16()
    args, _ = native.small_m_args(qt, x.dtype, a, b, 1.5, None)
    y, xa = native.small_m_op()(x, *args)
    y2, xa2 = native.small_m_op()(x.reshape(6, 192), *args)
    assert y.shape == (2, 3, 24) and xa.shape == (2, 3, 5)
    assert torch.equal(y.reshape(6, 24), y2) and torch.equal(xa.reshape(6, 5), xa2)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_many_nested_blocks_and_rows_per_thread(isa: str) -> None:
    """A bitsandbytes-sized NF4 weight: double-quant scales cross 256-block boundaries inside a row."""
    qt = qk.quantize(torch.randn(576, 1536) * 0.02, "nf4", group_size=32)
    a, b = _lora(576, 1536, 16, seed=1)
    x = torch.randn(3, 1536)
    y, _ = native.fused_small_m_forward(x, qt, a, b, 2.0, None, isa=isa)
    assert_matches_reference(y, _reference32(x, qt, a, b, 2.0, None), torch.float32, isa)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_results_do_not_depend_on_how_the_rows_are_split(isa: str) -> None:
    """2 threads with the work split as finely as possible (every 4-row tile a task) and as coarsely
    as the kernel does with sleeping threads: the same bits (each output is one thread's fixed sum)."""
    qt = qk.quantize(_weight(203, 576, seed=9), "nf4")
    a, b = _lora(203, 576, 16, seed=3)
    x = torch.randn(3, 576).bfloat16()
    set_task_macs = torch.ops.qlora_kernels.set_small_m_task_macs
    threads, before = torch.get_num_threads(), set_task_macs(1 << 20)
    try:
        torch.set_num_threads(2)
        coarse = native.fused_small_m_forward(x, qt, a, b, 2.0, None, isa=isa)
        set_task_macs(1)
        fine = native.fused_small_m_forward(x, qt, a, b, 2.0, None, isa=isa)
    finally:
        set_task_macs(before)
        torch.set_num_threads(threads)
    assert torch.equal(coarse[0], fine[0]) and torch.equal(coarse[1], fine[1])
    with pytest.raises(ValueError, match="macs must be >= 1"):
        set_task_macs(0)


def test_the_task_size_follows_the_openmp_wait_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert native.small_m_task_macs() == 1 << 20
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert native.small_m_task_macs() == 1 << 16
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert native.small_m_task_macs() == 1 << 16


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("fmt", "group", "opts"), [("nf4", 32, {}), ("int4", 64, {"symmetric": False})])
def test_long_rows_with_many_rows_of_x(fmt: str, group: int, opts: dict, isa: str) -> None:
    """K long enough that the kernel splits it into blocks of x that stay in the L1 cache."""
    n, k = 37, 2624  # 82 chunks of 32: blocks of 24 to 64 chunks, and a shorter last block
    qt = qk.quantize(_weight(n, k, seed=9), fmt, group_size=group, **opts)
    a, b = _lora(n, k, 16, seed=9)
    bias = torch.randn(n)
    for m in (3, 5, 8, 11, 16):
        x = torch.randn(m, k)
        y, _ = native.fused_small_m_forward(x, qt, a, b, 0.5, bias, isa=isa)
        assert_matches_reference(y, _reference32(x, qt, a, b, 0.5, bias), torch.float32, f"{fmt} M={m} {isa}")


@needs_native
@pytest.mark.parametrize(("fmt", "k"), [("nf4", 512), ("int4", 512), ("int8", 512), ("nf4", 2048)])
def test_the_result_does_not_depend_on_the_thread_count(fmt: str, k: int) -> None:
    n = 4099  # enough rows that every M here splits into several tasks (the grain is about 2^20 MACs)
    qt = qk.quantize(torch.randn(n, k), fmt)
    a, b = _lora(n, k, 16, seed=2)
    bias = torch.randn(n)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3, 4):
            torch.set_num_threads(count)
            results.append([native.fused_small_m_forward(torch.ones(m, k) / m, qt, a, b, 2.0, bias) for m in (1, 7)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for (y0, xa0), (y1, xa1) in zip(results[0], other, strict=True):
            assert torch.equal(y0, y1) and torch.equal(xa0, xa1)


# ------------------------------------------------------------------- bf16 dot products
needs_bf16_dots = pytest.mark.skipif(
    not native.native_available() or native.small_m_isa() != "avx512_bf16", reason="needs a CPU with avx512_bf16"
)


@needs_bf16_dots
@pytest.mark.parametrize("config", [c for c in CONFIGS if c[0] != "int8"], ids=_config_id)
def test_bf16_dot_products_equal_a_matmul_with_the_weight_rounded_to_bf16(config) -> None:
    """The bf16 path is the dense bf16 path's arithmetic: x times the decoded weight rounded to bf16
    (exact products, fp32 sums); its rounded output equals that product computed in fp64, but for
    the rare element where the fp32 sum sits within one rounding of a bf16 tie."""
    fmt, group, opts, odd_ks = config
    for k in (4 * max(group, 128), *odd_ks):  # whole 128-column chunks, and rows ending in a short one
        qt = qk.quantize(_weight(67, k, seed=k), fmt, group_size=group, **opts)
        w16 = qt.dequantize(torch.float32).bfloat16().double()
        for m in (1, 3, 9, 16):
            x = torch.randn(m, k).bfloat16()
            y, _ = native.fused_small_m_forward(x, qt, isa="avx512_bf16")
            expected = (x.double() @ w16.t()).bfloat16()
            what = f"{fmt} g{group} K={k} M={m}"
            assert (y == expected).float().mean() >= 0.99, what
            assert_matches_reference(y, _reference32(x, qt, None, None, 1.0, None), torch.bfloat16, what, "avx512_bf16")


@needs_bf16_dots
@pytest.mark.parametrize("policy", ["bf16", "fp32"])
def test_auto_takes_bf16_dot_products_for_bf16_x_only_under_the_bf16_policy(monkeypatch, policy: str) -> None:
    monkeypatch.setattr(native, "cpu_matmul_dtype", lambda dtype: torch.bfloat16 if policy == "bf16" else torch.float32)
    qt = qk.quantize(_weight(40, 256, seed=5), "nf4")
    x = torch.randn(2, 256).bfloat16()
    pinned = {isa: native.fused_small_m_forward(x, qt, isa=isa)[0] for isa in ("avx512", "avx512_bf16")}
    assert not torch.equal(pinned["avx512"], pinned["avx512_bf16"])  # the two paths round differently
    want = "avx512_bf16" if policy == "bf16" else "avx512"
    assert torch.equal(native.fused_small_m_forward(x, qt)[0], pinned[want])
    x32 = x.float()  # fp32 inputs always take the exact path
    assert torch.equal(native.fused_small_m_forward(x32, qt)[0], native.fused_small_m_forward(x32, qt, isa="avx512")[0])


# ----------------------------------------------------------------------------- dispatch
@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the M of every call the CPU backend makes to the fused kernel."""
    calls: list[int] = []
    real = qlora_linear_module.fused_small_m_forward

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(qlora_linear_module, "fused_small_m_forward", spy)
    real_op = quant_linear_module.small_m_op

    def op_spy():
        op = real_op()

        def call(x, *args):
            calls.append(x.numel() // x.shape[-1])
            return op(x, *args)

        return call

    monkeypatch.setattr(quant_linear_module, "small_m_op", op_spy)  # QuantLinear's decoding step
    return calls


@needs_native
def test_auto_uses_the_fused_kernel_for_small_m_only(fused_calls: list[int]) -> None:
    qt = qk.quantize(torch.randn(48, 128), "nf4")
    a, b = _lora(48, 128, 4, seed=3)
    for shape in ((1, 128), (2, 8, 128), (16, 128)):
        x = torch.randn(shape, dtype=torch.bfloat16)
        y = qlora_linear(x, qt, a, b, 2.0, backend="auto")
        assert y.shape == (*shape[:-1], 48) and y.dtype == torch.bfloat16
        assert_matches_reference(y.reshape(-1, 48), _reference32(x.reshape(-1, 128), qt, a, b, 2.0, None), y.dtype, "")
    assert fused_calls == [1, 16, 16]
    qlora_linear(torch.randn(17, 128), qt, a, b, 2.0, backend="auto")  # large M: decode + matmul
    qlora_linear(torch.randn(1, 128), qt, a, b, 2.0, backend="torch")  # the pure-PyTorch path stays pure
    qlora_linear(torch.randn(1, 128), qt, backend="native")
    assert fused_calls == [1, 16, 16, 1]


@needs_native
def test_gradients_through_the_fused_forward_match_the_reference(fused_calls: list[int]) -> None:
    """The fused forward returns x A^T for the backward: dX, dA, dB and dbias as the reference's."""
    qt = qk.quantize(torch.randn(40, 96), "int4", group_size=32)
    x0, bias0 = torch.randn(3, 96), torch.randn(40)
    a0, b0 = _lora(40, 96, 8, seed=4)

    def run(fn):
        x, a, b, bias = (t.clone().requires_grad_() for t in (x0, a0, b0, bias0))
        y = fn(x, a, b, bias)
        (y * torch.linspace(-1, 1, 40)).sum().backward()
        return y.detach(), x.grad, a.grad, b.grad, bias.grad

    got = run(lambda x, a, b, bias: qlora_linear(x, qt, a, b, 0.5, bias, backend="auto"))
    expected = run(lambda x, a, b, bias: qlora_linear_ref(x, qt, a, b, 0.5, bias))
    assert fused_calls == [3]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@needs_native
def test_a_lora_layer_in_eval_mode_decodes_with_the_fused_kernel(fused_calls: list[int]) -> None:
    layer = qk.LoRALinear(qk.QuantLinear.from_linear(torch.nn.Linear(64, 32), "nf4"), r=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.eval()
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        y = layer(x)
    assert fused_calls == [1]
    expected = _reference32(
        x[0], layer.base.qweight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, layer.base.bias
    )
    assert_matches_reference(y[0], expected, torch.float32, "LoRALinear")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layers_decoding_step_equals_qlora_linear(fused_calls: list[int], dtype: torch.dtype) -> None:
    """Under no_grad QuantLinear calls the kernel itself, skipping qlora_linear's dispatch: same result."""
    layer = qk.LoRALinear(qk.QuantLinear.from_linear(torch.nn.Linear(128, 40), "nf4"), r=4).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 128).to(dtype)
    b = layer.lora_B.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.lora_B.weight.data = torch.randn(41, 4)  # a LoRA weight that no longer fits the layer
        with pytest.raises(ValueError, match="lora_b"):
            layer(x)
    assert fused_calls == [6, 6]
    assert torch.equal(y, qlora_linear(x, layer.base.qweight, layer.lora_A.weight, b, layer.scaling, layer.base.bias))


@needs_native
def test_the_decoding_step_sees_replaced_tensors(fused_calls: list[int]) -> None:
    """The op's arguments are kept from token to token; a new LoRA weight, bias, scaling or packed
    weight, or another x dtype, is used from the next call on."""
    layer = qk.LoRALinear(qk.QuantLinear.from_linear(torch.nn.Linear(128, 40), "nf4"), r=4).eval()
    x = torch.randn(1, 128)

    def expected(x):
        lora = layer.lora_A.weight, layer.lora_B.weight, layer.scaling
        return native.fused_small_m_forward(x, layer.base.qweight, *lora, layer.base.bias)[0]

    with torch.no_grad():
        assert torch.equal(layer(x), expected(x))
        layer.lora_B.weight = torch.nn.Parameter(torch.randn(40, 4))
        assert torch.equal(layer(x), expected(x))
        layer.base.bias = torch.nn.Parameter(torch.randn(40))
        assert torch.equal(layer(x), expected(x))
        layer.scaling = 0.25
        assert torch.equal(layer(x), expected(x))
        layer.base.replace_weight(qk.quantize(torch.randn(40, 128), "nf4"))
        assert torch.equal(layer(x), expected(x))
        assert torch.equal(layer(x.bfloat16()), expected(x.bfloat16()))
        layer.lora_A.weight.data.mul_(2)  # in place: the same tensor, read at each call
        assert torch.equal(layer(x), expected(x))
        layer.lora_A.to(torch.bfloat16)  # the same parameters, their data now bf16 (converted per call)
        layer.lora_B.to(torch.bfloat16)
        assert torch.equal(layer(x), expected(x))
    assert len(fused_calls) == 8


def test_not_used_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "native_available", lambda: False)
    qt = qk.quantize(torch.randn(8, 64), "nf4")
    assert not native.fused_small_m_applies(torch.randn(1, 64), qt)


@needs_native
def test_applies_only_where_it_serves() -> None:
    qt = qk.quantize(torch.randn(8, 64), "nf4")
    assert native.fused_small_m_applies(torch.randn(1, 64), qt)
    assert native.fused_small_m_applies(torch.randn(native.SMALL_M_MAX, 64, dtype=torch.bfloat16), qt)
    assert not native.fused_small_m_applies(torch.randn(native.SMALL_M_MAX + 1, 64), qt)
    assert not native.fused_small_m_applies(torch.randn(0, 64), qt)
    assert not native.fused_small_m_applies(torch.randn(1, 64, dtype=torch.float64), qt)


# ------------------------------------------------------------------------------ bad input
@needs_native
def test_bad_inputs_raise_clear_errors() -> None:
    qt = qk.quantize(torch.randn(8, 64), "nf4")
    x = torch.randn(2, 64)
    a, b = _lora(8, 64, 4, seed=5)
    with pytest.raises(ValueError, match="isa must be one of"):
        native.fused_small_m_forward(x, qt, isa="neon")
    with pytest.raises(ValueError, match="pass both lora_a and lora_b"):
        native.fused_small_m_forward(x, qt, a, None)
    with pytest.raises(ValueError, match=r"'lora_b' should be torch.float32 \(8, 4\), got torch.float32 \(8, 3\)"):
        native.fused_small_m_forward(x, qt, a, b[:, :3])
    with pytest.raises(ValueError, match=r"'bias' should be torch.float32 \(8,\), got torch.float32 \(7,\)"):
        native.fused_small_m_forward(x, qt, bias=torch.randn(7))
    with pytest.raises(ValueError, match="x has 32 columns but the weight has in_features K=64"):
        native.fused_small_m_forward(torch.randn(2, 32), qt)
    with pytest.raises(ValueError, match=r"x must be a contiguous \(\.\.\., K\) CPU tensor"):
        torch.ops.qlora_kernels.qlora_small_m(
            torch.randn(64, 2).t(),
            "nf4",
            qt.data,
            qt.scales,
            None,
            None,
            None,
            None,
            None,
            64,
            None,
            None,
            1.0,
            None,
            "auto",
        )
    with pytest.raises(TypeError, match="x must be torch.float32, torch.bfloat16 or torch.float16, got torch.float64"):
        native.fused_small_m_forward(x.double(), qt)
    with pytest.raises(ValueError, match="format must be 'int8', 'int4' or 'nf4'"):
        torch.ops.qlora_kernels.qlora_small_m(
            x, "fp4", qt.data, qt.scales, None, None, None, None, None, 64, None, None, 1.0, None, "auto"
        )
    with pytest.raises(TypeError, match="qt must be a QuantizedTensor"):
        native.fused_small_m_forward(x, torch.randn(8, 64))
