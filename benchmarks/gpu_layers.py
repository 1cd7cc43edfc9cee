"""gpu_check part "layers": one quantized LoRA layer, ours against bf16 F.linear + LoRA and
against bitsandbytes Linear4bit + PEFT LoRA, forward and forward+backward, over M and the
Llama-3-8B projection shapes, with the device's copy bandwidth and matmul rate measured in the
same run.

Every provider runs under the run's autocast (bf16 on the GPU, as in training) with LoRA rank
`profile.rank`, fp32 LoRA weights (as PEFT keeps them) and no bias. Timings are medians of
triton's do_bench (CUDA events, L2 flushed between runs). Bytes moved by our forward (packed
weight, x, y, LoRA, x @ A^T) over its time, against the measured copy bandwidth, give the
"% of HBM" column. For M in `profile.path_ms` both the fused kernel and the dense path are
timed directly, which is what FUSED_MAX_M in qlora_kernels/kernels/qlora_ops.py should be
set from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.gpu_common import Deadline, Profile, Records, bench_ms, copy_bandwidth_gb_s, matmul_tflop_s


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
        y.backward(dy)

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
    a16, b16 = a.detach(), b.detach()
    return {
        "fused_fwd_ms": bench_ms(lambda: qm.qlora_forward_fused(x, qt, a16, b16, s), profile),
        "dense_fwd_ms": bench_ms(lambda: qd.qlora_forward_dense(x, qt, a16, b16, s), profile),
        "fused_bwd_ms": bench_ms(lambda: qm.qlora_grad_input_fused(dy, qt, a16, b16, s), profile),
        "dense_bwd_ms": bench_ms(lambda: qd.qlora_grad_input_dense(dy, qt, a16, b16, s), profile),
    }


def run(profile: Profile, records: Records, deadline: Deadline) -> None:
    import qlora_kernels as qk
    from qlora_kernels.kernels import qlora_configs as qc
    from qlora_kernels.kernels import qlora_matmul as qm
    from qlora_kernels.kernels import qlora_ops as qo

    device = profile.torch_device
    peak_bw = copy_bandwidth_gb_s(device, 2**30 if device.type == "cuda" else 2**26)
    peak_tflops = matmul_tflop_s(device, profile.dtype, 8192 if device.type == "cuda" else 256)
    records.add("peaks", copy_gb_s=peak_bw, matmul_tflop_s=peak_tflops, matmul_dtype=str(profile.dtype))
    peers_note, torchao_note = _peers_note(), _torchao_note()
    for note in filter(None, (peers_note, torchao_note)):
        records.add("unavailable", note=note)
    act_bytes = torch.empty(0, dtype=profile.dtype).element_size()
    for si, (n, k) in enumerate(profile.layer_shapes):
        w, a, b = _lora_weights(n, k, profile, seed=si)
        quantized = {fmt: qk.quantize(w, fmt, group_size=profile.groups[fmt]) for fmt in profile.formats}
        bnb_model = None
        if peers_note is None:
            try:
                bnb_model = bnb_peft_layer(w, a.detach(), b.detach(), profile)
            except Exception as exc:
                records.add("error", provider="bnb+peft", shape=f"{n}x{k}", error=repr(exc)[:500])
        ao_layer = None
        if torchao_note is None:
            try:
                ao_layer = torchao_int4_layer(w, profile)
            except Exception as exc:
                records.add("error", provider="torchao", shape=f"{n}x{k}", error=repr(exc)[:500])
                torchao_note = "torchao failed"
        base_fwd, base_params = _bf16_lora(w, a, b, profile)
        for m in profile.layer_ms:
            if deadline.passed(reserve=2.0):
                records.add("budget", shape=f"{n}x{k}", stopped_before_m=m)
                return
            g = torch.Generator().manual_seed(1000 + m)
            x = torch.randn(m, k, generator=g).to(device, profile.dtype)
            dy = torch.randn(m, n, generator=g).to(device, profile.dtype)
            row: dict[str, Any] = {"N": n, "K": k, "M": m, "bf16_weight_bytes": n * k * 2}
            try:
                row["bf16_fwd_ms"], row["bf16_fwdbwd_ms"] = _time_provider(base_fwd, x, dy, base_params, profile)
            except Exception as exc:
                row["bf16_error"] = repr(exc)[:300]
            if bnb_model is not None:
                try:
                    params = [p for p in bnb_model.parameters() if p.requires_grad]
                    row["bnb_fwd_ms"], row["bnb_fwdbwd_ms"] = _time_provider(bnb_model, x, dy, params, profile)
                    row["bnb_weight_bytes"] = bnb_weight_bytes(bnb_model)
                except Exception as exc:
                    row["bnb_error"] = repr(exc)[:300]
            if ao_layer is not None:
                try:
                    with torch.no_grad():
                        row["torchao_int4_fwd_ms"] = bench_ms(lambda x=x, layer=ao_layer: layer(x), profile)
                except Exception as exc:
                    row["torchao_error"] = repr(exc)[:300]
            for key, qt in quantized.items():
                try:
                    ours = _ours(qt, a, b, profile)
                    fwd_ms, fb_ms = _time_provider(ours, x, dy, [a, b], profile)
                    row[f"{key}_fwd_ms"], row[f"{key}_fwdbwd_ms"] = fwd_ms, fb_ms
                    if m <= qo.FUSED_MAX_M:
                        row[f"{key}_fwd_config"] = qc.config_label(qm.autotuner(qc.MODE_FORWARD).best_config)
                    nbytes = _forward_bytes(qt.nbytes, m, n, k, profile.rank, act_bytes)
                    row[f"{key}_weight_bytes"] = qt.nbytes
                    row[f"{key}_fwd_gb_s"] = nbytes / (fwd_ms * 1e6)
                    row[f"{key}_fwd_pct_hbm"] = 100 * row[f"{key}_fwd_gb_s"] / peak_bw
                    row[f"{key}_fwdbwd_tflop_s"] = 2 * 2 * m * n * k / (fb_ms * 1e9)
                    if "bf16_fwd_ms" in row:
                        row[f"{key}_speedup_fwd_vs_bf16"] = row["bf16_fwd_ms"] / fwd_ms
                        row[f"{key}_speedup_fwdbwd_vs_bf16"] = row["bf16_fwdbwd_ms"] / fb_ms
                    if "bnb_fwd_ms" in row:
                        row[f"{key}_speedup_fwd_vs_bnb"] = row["bnb_fwd_ms"] / fwd_ms
                        row[f"{key}_speedup_fwdbwd_vs_bnb"] = row["bnb_fwdbwd_ms"] / fb_ms
                    if m in profile.path_ms:
                        for name, ms in _path_times(x, qt, a, b, profile, dy).items():
                            row[f"{key}_{name}"] = ms
                except Exception as exc:
                    row[f"{key}_error"] = repr(exc)[:300]
            records.add("layer", **row)
            del x, dy
        del quantized, bnb_model, ao_layer
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
