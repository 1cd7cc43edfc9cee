"""Give freed heap memory back to the operating system between phases of a run (glibc only)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to do
        return None


def release_free_memory() -> bool:
    """``malloc_trim(0)``: return the free pages of glibc's heap to the OS; whether it could run.

    Evaluation frees a large key/value cache in many pieces; without this the pages stay in the
    process and the training that follows stacks its own peak on top of them. Cheap once per
    phase; too slow to call every step (the next step faults the pages back in).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
