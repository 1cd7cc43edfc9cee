"""gpu_check part "layers": one quantized LoRA layer, ours against bf16 F.linear + LoRA and
against bitsandbytes Linear4bit + PEFT LoRA, forward and forward+backward, over M and the
Llama-3-8B projection shapes, with the device's copy bandwidth and matmul rate measured in the
same run.

Every provider runs under the run's autocast (bf16 on the GPU, as in training) with LoRA rank
`profile.rank`, fp32 LoRA weights (as PEFT keeps them) and no bias. Timings are medians of
triton's do_bench (CUDA events, L2 flushed between runs): "_ms" fields. At M <= GRAPH_MAX_M
the forward is also timed as CUDA-graph replays ("_graph_ms"), which leaves out the Python and
launch overhead that dominates a ~10 us kernel; each replayed call reads another copy of the
weight, and the copies together are several times the L2 cache, so the replays read HBM.

Bytes our forward must move (packed weight, x, y, LoRA, x @ A^T) over its time, against the
measured copy bandwidth, give "% of HBM". For M in `profile.path_ms` the fused kernel and the
dense path are timed directly, which is what FUSED_MAX_M in qlora_kernels/kernels/qlora_ops.py
should be set from.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.gpu_common import Deadline, Profile, Records, bench_ms, copy_bandwidth_gb_s, matmul_tflop_s

#: Forward timings as CUDA-graph replays up to this M (above it the GPU time dwarfs the overhead).
GRAPH_MAX_M = 64
#: The weight copies a graph cycles through hold at least this many times the L2 cache.
L2_MULTIPLE = 4
MAX_COPIES = 32


# ------------------------------------------------------------------------------ providers
def _ours(qt, a, b, profile: Profile) -> Callable[[torch.Tensor], torch.Tensor]:
    from qlora_kernels.ops import qlora_linear

    backend = "triton"
    return lambda x: qlora_linear(x, qt, a, b, profile.scaling, backend=backend)


def _bf16_lora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, profile: Profile):
    """bf16 F.linear + unfused LoRA in bf16: what a LoRA layer on a bf16 base runs under autocast."""
    w16, a16, b16 = (t.detach().to(profile.dtype) for t in (w, a, b))
    a16.requires_grad_(a.requires_grad)
    b16.requires_grad_(b.requires_grad)

    def forward(x):
        return F.linear(x, w16) + profile.scaling * F.linear(F.linear(x, a16), b16)

    return forward, [a16, b16]


def bnb_peft_layer(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, profile: Profile) -> nn.Module:
    """bitsandbytes NF4 Linear4bit (double quant, bf16 compute) with a PEFT LoRA of the same A, B."""
    import bitsandbytes as bnb
    import peft

    n, k = w.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=profile.dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)  # fmt: skip
    layer = layer.to(profile.torch_device)
    holder = nn.Sequential()
    holder.add_module("proj", layer)
    config = peft.LoraConfig(r=profile.rank, lora_alpha=profile.scaling * profile.rank, target_modules=["proj"])
    model = peft.get_peft_model(holder, config)
    lora = model.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(a)
        lora.lora_B["default"].weight.copy_(b)
    return model


def bnb_weight_bytes(model: nn.Module) -> int:
    weight = model.base_model.model.proj.base_layer.weight
    state = weight.quant_state
    extra = state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "state2", None) is not None:
        extra += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return weight.numel() * weight.element_size() + extra


def _peers_note() -> str | None:
    """Why bitsandbytes + PEFT cannot run here, or None."""
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except Exception as exc:
        return f"bitsandbytes + PEFT unavailable: {type(exc).__name__}: {exc}"[:300]
    return None


def _torchao_note() -> str | None:
    try:
        import torchao  # noqa: F401
    except Exception as exc:
        return f"torchao unavailable: {type(exc).__name__}"
    return None


def torchao_int4_layer(w: torch.Tensor, profile: Profile) -> nn.Module:
    """torchao's int4 weight-only linear (group 128) on a bf16 copy of w (no LoRA: forward only)."""
    from torchao.quantization import quantize_

    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=profile.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    try:
        from torchao.quantization import Int4WeightOnlyConfig

        quantize_(linear, Int4WeightOnlyConfig(group_size=128))
    except ImportError:
        from torchao.quantization import int4_weight_only

        quantize_(linear, int4_weight_only(group_size=128))
    return linear


# ---------------------------------------------------------------------------- graph timing
def copies_for(nbytes: int, device: torch.device) -> int:
    """How many copies of a weight of `nbytes` make L2_MULTIPLE times the device's L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(MAX_COPIES, math.ceil(L2_MULTIPLE * l2 / max(nbytes, 1))))


def clone_quantized(qt):
    return dataclasses.replace(qt, **{name: t.clone() for name, t in qt.tensors().items()})


def graph_ms(calls: list[Callable[[], object]], profile: Profile) -> float:
    """Median ms per call of CUDA-graph replays that cycle through `calls` (one per weight copy)."""
    from triton.testing import do_bench_cudagraph

    cycle = itertools.cycle(calls)
    with torch.no_grad(), torch.autocast("cuda", dtype=profile.dtype, cache_enabled=False):
        median = do_bench_cudagraph(lambda: next(cycle)(), rep=profile.bench_rep_ms, quantiles=[0.5])
    return float(median[0] if isinstance(median, (list, tuple)) else median)


# ---------------------------------------------------------------------------------- cases
def _time_provider(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor, params, profile: Profile
) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of one provider."""
    with torch.no_grad(), profile.autocast():
        fwd = bench_ms(lambda: forward(x), profile)
    xg = x.detach().requires_grad_()

    def step():
        with profile.autocast():
            y = forward(xg)
        y.backward(dy.to(y.dtype))

    fb = bench_ms(step, profile, grad_to_none=[xg, *params])
    return fwd, fb


def _lora_weights(n: int, k: int, profile: Profile, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    a = torch.randn(profile.rank, k, generator=g) * 0.02
    b = torch.randn(n, profile.rank, generator=g) * 0.02
    device = profile.torch_device
    return w.to(device), a.to(device).requires_grad_(), b.to(device).requires_grad_()


def _forward_bytes(qt_bytes: int, m: int, n: int, k: int, r: int, act_bytes: int) -> int:
    """Fewest bytes our fused forward must move: packed weight, x, y, fp32 A and B, fp32 x @ A^T."""
    return qt_bytes + m * k * act_bytes + m * n * act_bytes + r * (k + n) * 4 + m * r * 4


def _path_times(x: torch.Tensor, qt, a, b, profile: Profile, dy: torch.Tensor) -> dict[str, float]:
    """The fused kernel and the dense path timed directly, forward and dX."""
    from qlora_kernels.kernels import qlora_dense as qd
    from qlora_kernels.kernels import qlora_matmul as qm

    s = profile.scaling
    a32, b32 = a.detach(), b.detach()
    return {
        "fused_fwd_ms": bench_ms(lambda: qm.qlora_forward_fused(x, qt, a32, b32, s), profile),
        "dense_fwd_ms": bench_ms(lambda: qd.qlora_forward_dense(x, qt, a32, b32, s), profile),
        "fused_bwd_ms": bench_ms(lambda: qm.qlora_grad_input_fused(dy, qt, a32, b32, s), profile),
        "dense_bwd_ms": bench_ms(lambda: qd.qlora_grad_input_dense(dy, qt, a32, b32, s), profile),
    }


@dataclasses.dataclass
class ShapeSetup:
    """Everything built once per (N, K): the weights of every provider, with graph copies."""

    n: int
    k: int
    a: torch.Tensor
    b: torch.Tensor
    bf16_forward: Callable
    bf16_params: list
    bf16_copies: list  # bf16 weights for the graph replays
    quantized: dict  # format -> [QuantizedTensor copies], first one timed eagerly
    bnb_models: list  # bnb + PEFT layer copies, first one timed eagerly
    bnb_graph_copies: bool  # the copies for graph replays were made
    torchao: nn.Module | None


def _setup_shape(n: int, k: int, seed: int, profile: Profile, records: Records, peers_note, torchao_note):
    import qlora_kernels as qk

    device = profile.torch_device
    graphs = device.type == "cuda" and any(m <= GRAPH_MAX_M for m in profile.layer_ms)
    w, a, b = _lora_weights(n, k, profile, seed)
    bf16_forward, bf16_params = _bf16_lora(w, a, b, profile)
    w16 = w.to(profile.dtype)
    bf16_copies = [w16] + [w16.clone() for _ in range(copies_for(w16.numel() * 2, device) - 1)] if graphs else []
    quantized = {}
    for fmt in profile.formats:
        qt = qk.quantize(w, fmt, group_size=profile.groups[fmt])
        extra = copies_for(qt.nbytes, device) - 1 if graphs else 0
        quantized[fmt] = [qt] + [clone_quantized(qt) for _ in range(extra)]
    bnb_models, bnb_graph_copies = [], False
    if peers_note is None:
        try:
            bnb_models = [bnb_peft_layer(w, a.detach(), b.detach(), profile)]
        except Exception as exc:
            records.add("error", provider="bnb+peft", shape=f"{n}x{k}", error=repr(exc)[:500])
    if bnb_models and graphs:
        try:
            extra = copies_for(bnb_weight_bytes(bnb_models[0]), device) - 1
            bnb_models += [copy.deepcopy(bnb_models[0]) for _ in range(extra)]
            bnb_graph_copies = True
        except Exception as exc:  # without its copies a replay would read bnb's weight from L2: no graph timing
            records.add("error", provider="bnb+peft copies", shape=f"{n}x{k}", error=repr(exc)[:500])
    ao = None
    if torchao_note is None:
        try:
            ao = torchao_int4_layer(w, profile)
        except Exception as exc:
            records.add("error", provider="torchao", shape=f"{n}x{k}", error=repr(exc)[:500])
    return ShapeSetup(n, k, a, b, bf16_forward, bf16_params, bf16_copies, quantized, bnb_models, bnb_graph_copies, ao)


def _graph_calls(setup: ShapeSetup, x: torch.Tensor, profile: Profile) -> dict[str, list[Callable]]:
    """Per provider, one forward call per weight copy (for `graph_ms`)."""
    from qlora_kernels.ops import qlora_linear

    s, a, b = profile.scaling, setup.a.detach(), setup.b.detach()
    a16, b16 = a.to(profile.dtype), b.to(profile.dtype)
    calls = {fmt: [lambda qt=qt: qlora_linear(x, qt, a, b, s, backend="triton") for qt in copies]
             for fmt, copies in setup.quantized.items()}  # fmt: skip
    calls["bf16"] = [lambda w=w: F.linear(x, w) + s * F.linear(F.linear(x, a16), b16) for w in setup.bf16_copies]
    if setup.bnb_graph_copies:  # last: a capture that fails here leaves ours measured
        calls["bnb"] = [lambda m=m: m(x) for m in setup.bnb_models]
    return calls


def _ratios(row: dict, fmt: str, peak_bw: float, nbytes: int) -> None:
    """Speed-ups over the baselines (graph replays when both sides have them, else eager) and
    the forward's bandwidth against the measured copy bandwidth."""
    for mode in ("fwd", "fwdbwd"):
        for base in ("bf16", "bnb"):
            timing = (
                "graph_ms" if mode == "fwd" and f"{fmt}_fwd_graph_ms" in row and f"{base}_fwd_graph_ms" in row else "ms"
            )
            ours, theirs = row.get(f"{fmt}_{mode}_{timing}"), row.get(f"{base}_{mode}_{timing}")
            if ours and theirs:
                row[f"{fmt}_speedup_{mode}_vs_{base}"] = theirs / ours
    fwd = row.get(f"{fmt}_fwd_graph_ms") or row.get(f"{fmt}_fwd_ms")
    if fwd:
        row[f"{fmt}_fwd_gb_s"] = nbytes / (fwd * 1e6)
        row[f"{fmt}_fwd_pct_hbm"] = 100 * row[f"{fmt}_fwd_gb_s"] / peak_bw
        row[f"{fmt}_fwd_pct_hbm_timing"] = "graph" if f"{fmt}_fwd_graph_ms" in row else "eager"


def _measure_row(setup: ShapeSetup, m: int, profile: Profile, state: dict) -> tuple[dict, int]:
    """One (N, K, M) row: every provider eagerly, then (small M, CUDA) as graph replays."""
    from qlora_kernels.kernels import qlora_configs as qc
    from qlora_kernels.kernels import qlora_matmul as qm
    from qlora_kernels.kernels import qlora_ops as qo

    n, k, device = setup.n, setup.k, profile.torch_device
    g = torch.Generator().manual_seed(1000 + m)
    x = torch.randn(m, k, generator=g).to(device, profile.dtype)
    dy = torch.randn(m, n, generator=g).to(device, profile.dtype)
    row: dict[str, Any] = {"N": n, "K": k, "M": m, "bf16_weight_bytes": n * k * 2}
    failures = 0
    try:
        row["bf16_fwd_ms"], row["bf16_fwdbwd_ms"] = _time_provider(
            setup.bf16_forward, x, dy, setup.bf16_params, profile
        )
    except Exception as exc:
        row["bf16_error"] = repr(exc)[:300]
    if setup.bnb_models:
        model = setup.bnb_models[0]
        try:
            params = [p for p in model.parameters() if p.requires_grad]
            row["bnb_fwd_ms"], row["bnb_fwdbwd_ms"] = _time_provider(model, x, dy, params, profile)
            row["bnb_weight_bytes"] = bnb_weight_bytes(model)
        except Exception as exc:
            row["bnb_error"] = repr(exc)[:300]
    if setup.torchao is not None:
        try:
            with torch.no_grad(), profile.autocast():
                row["torchao_int4_fwd_ms"] = bench_ms(lambda: setup.torchao(x), profile)
        except Exception as exc:
            row["torchao_error"] = repr(exc)[:300]
    for fmt, (qt, *_) in setup.quantized.items():
        try:
            ours = _ours(qt, setup.a, setup.b, profile)
            row[f"{fmt}_fwd_ms"], row[f"{fmt}_fwdbwd_ms"] = _time_provider(ours, x, dy, [setup.a, setup.b], profile)
            if m <= qo.FUSED_MAX_M:
                row[f"{fmt}_fwd_config"] = qc.config_label(qm.autotuner(qc.MODE_FORWARD).best_config)
            row[f"{fmt}_weight_bytes"] = qt.nbytes
            row[f"{fmt}_fwdbwd_tflop_s"] = 2 * 2 * m * n * k / (row[f"{fmt}_fwdbwd_ms"] * 1e9)
            if m in profile.path_ms:
                for name, ms in _path_times(x, qt, setup.a, setup.b, profile, dy).items():
                    row[f"{fmt}_{name}"] = ms
        except Exception as exc:
            row[f"{fmt}_error"] = repr(exc)[:300]
            failures += 1
    if device.type == "cuda" and m <= GRAPH_MAX_M and not state.get("graphs_broken"):
        for name, calls in _graph_calls(setup, x, profile).items():
            if f"{name}_fwd_ms" not in row:
                continue
            try:
                row[f"{name}_fwd_graph_ms"] = graph_ms(calls, profile)
            except Exception as exc:  # a failed capture can leave the stream unusable: no more graphs
                row[f"{name}_graph_error"] = repr(exc)[:300]
                state["graphs_broken"] = True
                break
    act_bytes = x.element_size()
    for fmt, (qt, *_) in setup.quantized.items():
        _ratios(row, fmt, state["peak_bw"], _forward_bytes(qt.nbytes, m, n, k, profile.rank, act_bytes))
    return row, failures


def run(profile: Profile, records: Records, deadline: Deadline) -> int:
    """Every (shape, M) row until the deadline; returns how many of our measurements failed."""
    device = profile.torch_device
    peak_bw = copy_bandwidth_gb_s(device, 2**30 if device.type == "cuda" else 2**26)
    peak_tflops = matmul_tflop_s(device, profile.dtype, 8192 if device.type == "cuda" else 256)
    records.add("peaks", copy_gb_s=peak_bw, matmul_tflop_s=peak_tflops, matmul_dtype=str(profile.dtype))
    peers_note, torchao_note = _peers_note(), _torchao_note()
    for note in filter(None, (peers_note, torchao_note)):
        records.add("unavailable", note=note)
    state = {"peak_bw": peak_bw}
    failures = 0
    for si, (n, k) in enumerate(profile.layer_shapes):
        setup = _setup_shape(n, k, si, profile, records, peers_note, torchao_note)
        for m in profile.layer_ms:
            if deadline.passed(reserve=2.0):
                records.add("budget", shape=f"{n}x{k}", stopped_before_m=m)
                return failures
            row, failed = _measure_row(setup, m, profile, state)
            failures += failed
            records.add("layer", **row)
        del setup
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    return failures
