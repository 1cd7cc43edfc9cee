"""Installed package versions, for `qlora-kernels info` and the benchmark metadata."""

from __future__ import annotations

import importlib.metadata


def package_version(package: str) -> str:
    """Installed version of `package`, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
