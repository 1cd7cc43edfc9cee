"""Command line: ``qlora-kernels info | ...``. Exit codes: 0 ok, 1 failure, 2 bad usage."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _triton_status() -> str:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "not installed"
    from .kernels._runtime import interpreter_enabled

    if torch.cuda.is_available():
        return "available (CUDA)"
    if interpreter_enabled():
        return "interpreter (TRITON_INTERPRET=1, slow; for tests)"
    return "installed; needs CUDA (or TRITON_INTERPRET=1)"


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, device and which backends work, plus a quantization check on random weights."""
    from . import formats

    print(f"qlora-kernels {_version('qlora-kernels')} on Python {platform.python_version()} ({platform.machine()})")
    for package in ("torch", "triton", "transformers", "safetensors", "bitsandbytes", "peft"):
        print(f"  {package:<13} {_version(package)}")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    print(f"device: {device}; CPU threads: {torch.get_num_threads()}")
    print(f"backends: torch reference: available; triton: {_triton_status()}")
    print(f"dequantize backends registered: {', '.join(formats.available_dequant_backends())}")
    from .ops.native import native_status

    native = native_status()
    ops = ", ".join(native.ops) if native.available else "none"
    print(f"native ops: {ops} ({native.error or 'CPU extension qlora_kernels._native built'})")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 512, generator=generator)
    print("\nformat  group  bits/param  rel. RMSE on N(0,1)")
    for fmt, group in (("int8", None), ("int4", 64), ("int4", 128), ("nf4", 64)):
        qt = formats.quantize(weight, fmt, group_size=group)
        err = (qt.dequantize(torch.float32, backend="torch") - weight).norm() / weight.norm()
        print(f"{fmt:<6}  {qt.group_size:>5}  {qt.bits_per_param:>10.3f}  {err.item():.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, device, available backends")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
