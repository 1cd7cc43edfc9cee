"""Files that are never half-written, and safetensors reads whose errors name the file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def default_file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0666 minus the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def set_default_file_mode(path: str | os.PathLike) -> None:
    """Give a written file the mode a plain `open()` would (temp files start at 0600)."""
    os.chmod(path, default_file_mode())


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create or replace `path` all at once: `write(tmp)` fills a temp file in the same folder,
    which is flushed to disk and renamed over `path`. A failure leaves `path` as it was and no
    temp file behind. The file gets the mode of any file the user creates (temp files start at
    0600, which would hide a saved weight from other users). Returns `path`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write `tensors` (as contiguous CPU copies) to the safetensors file `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or foreign file raises an error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file at {path}")
    if not path.is_file():
        raise ValueError(f"{path} is a directory, not a safetensors file")
    try:
        return load_file(str(path), device=device)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or not safetensors): {err}") from None
