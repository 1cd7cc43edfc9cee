"""Keep the RSS of quantize-while-loading near (quantized model + one weight) on Linux.

Two things would otherwise grow it to about the size of the dense checkpoint:

1. transformers maps every safetensors shard for the whole of ``from_pretrained`` and hands out
tensors that are views of those mappings. Each page read stays in the process's RSS until the
shards are unmapped at the end, so a load that reads every weight once would end with the whole
checkpoint resident. Once a weight is quantized, nothing refers to its pages any more, and
``madvise(MADV_DONTNEED)`` on exactly its byte range drops them (a later read would fault them
in again from the file, so this is safe even if the range were used). Pages shared with other
tensors (the partial pages at either end) are kept.
2. glibc keeps the heap memory of the freed fp32 temporaries of quantization (a few MB a
   weight) instead of returning it, interleaved with the packed weights that stay; its
   ``malloc_trim`` hands the free pages back.

Elsewhere than on Linux with glibc these do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from collections.abc import Iterable

import torch

_MADV_DONTNEED = 4


class MappedCheckpoint:
    """The mappings of a set of checkpoint files in this process, and `release` for tensors inside them."""

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        self.paths = {os.path.realpath(p) for p in paths}
        self._ranges: list[tuple[int, int]] = []
        libc = _libc() if sys.platform == "linux" else None
        self._madvise = _function(libc, "madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
        self._malloc_trim = _function(libc, "malloc_trim", (ctypes.c_size_t,))

    def _refresh(self) -> None:
        ranges = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() in self.paths:
                    start, end = (int(v, 16) for v in parts[0].split("-"))
                    ranges.append((start, end))
        self._ranges = ranges

    def _mapped(self, start: int, end: int) -> bool:
        return any(lo <= start and end <= hi for lo, hi in self._ranges)

    def release(self, tensor: torch.Tensor) -> int:
        """Drop the whole pages of `tensor` if it is a view of a mapped checkpoint file; returns bytes released."""
        if self._madvise is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return 0
        page = mmap.PAGESIZE
        first = tensor.data_ptr()
        start = -(-first // page) * page
        end = (first + tensor.numel() * tensor.element_size()) // page * page
        if end <= start:
            return 0
        if not self._mapped(start, end):
            self._refresh()
            if not self._mapped(start, end):
                return 0
        if self._madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
            return 0
        return end - start

    def trim_heap(self) -> None:
        """Return the C heap's free pages to the system (glibc)."""
        if self._malloc_trim is not None:
            self._malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _function(libc: ctypes.CDLL | None, name: str, argtypes: tuple):
    function = getattr(libc, name, None) if libc is not None else None
    if function is not None:
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return function
