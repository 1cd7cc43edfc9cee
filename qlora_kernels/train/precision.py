"""The training run's dtypes: what ``dtype: auto`` and ``model_dtype: auto`` become on this machine.

On CUDA, auto means bf16 (autocast and weights). On the CPU it follows the measured policy of
`qlora_kernels.ops.compute_policy`: bf16 where this host's bf16 GEMM clearly beats fp32 (weights
loaded in bf16, bf16 autocast, quantized layers decoding straight into bf16), fp32 elsewhere.
An explicit ``dtype: bf16`` / ``fp32`` on the CPU also sets the quantized layers' compute dtype,
so the whole model computes in the dtype the user asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.compute_policy import cpu_compute_dtype, set_cpu_compute_dtype

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """The resolved dtypes of a run and why: `dtype` for autocast, `model_dtype` for the loaded weights."""

    dtype: str
    model_dtype: str
    reason: str

    @property
    def torch_model_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.model_dtype]

    def describe(self) -> str:
        return f"dtype {self.dtype}, weights {self.model_dtype} ({self.reason})"


def resolve_precision(dtype: str, model_dtype: str, device: torch.device) -> Precision:
    """Replace "auto" in `dtype` / `model_dtype` by what this device computes fastest."""
    if dtype == "fp16" and device.type != "cuda":
        raise ValueError("dtype='fp16' needs CUDA (it needs a grad scaler); use dtype='bf16' or 'auto' on the CPU")
    if device.type == "cuda":
        auto, reason = "bf16", "CUDA"
    elif dtype in ("bf16", "fp32"):
        auto, reason = dtype, f"dtype: {dtype} as configured"
    else:
        decision = cpu_compute_dtype()
        auto, reason = decision.name, f"CPU compute dtype {decision.describe()}"
    resolved_dtype = auto if dtype == "auto" else dtype
    resolved_model = auto if model_dtype == "auto" else model_dtype
    return Precision(resolved_dtype, resolved_model, reason)


def apply_cpu_precision(precision: Precision, device: torch.device, configured_dtype: str) -> None:
    """An explicit bf16/fp32 `dtype` on the CPU also fixes the quantized layers' compute dtype."""
    if device.type == "cpu" and configured_dtype in ("bf16", "fp32"):
        set_cpu_compute_dtype(configured_dtype)
