"""Where Triton kernels can run: CUDA tensors, or CPU tensors under the Triton interpreter."""

from __future__ import annotations

import os

import torch


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1 (it must be set before the kernel modules are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_launchable(*tensors: torch.Tensor, op: str) -> None:
    """Raise a clear error unless a Triton kernel can run on these tensors' device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreter_enabled():
        return
    raise RuntimeError(
        f"{op}: Triton kernels need CUDA tensors (got {device}). On the CPU use backend='torch', "
        "or set TRITON_INTERPRET=1 before importing qlora_kernels to run the kernels in Triton's interpreter."
    )


def device_key(device: torch.device | str) -> torch.device:
    """`device` with its index filled in ("cuda" -> "cuda:<current>"), as tensors report it:
    the key of the per-device caches."""
    key = torch.device(device)
    if key.type == "cuda" and key.index is None:
        key = torch.device("cuda", torch.cuda.current_device())
    return key
