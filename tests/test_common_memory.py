"""release_free_memory returns freed heap pages to the OS where the C library can (glibc)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from qlora_kernels.common import memory


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_small_blocks_go_back_to_the_os() -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(4000)]  # 250 MiB below the mmap threshold: heap pages
    keep = blocks[-1]
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    before = _rss_mib()
    for b in blocks[:-1]:
        libc.free(b)
    assert memory.release_free_memory()
    assert _rss_mib() < before - 100  # without the trim the freed pages stay resident
    libc.free(keep)


def test_no_c_library_means_nothing_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_free_memory() is False
