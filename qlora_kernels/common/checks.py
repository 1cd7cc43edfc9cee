"""Argument checks shared by the public API: one wording for every type and range error.

``bool`` is a subclass of ``int`` in Python, but ``r=True`` or ``group_size=False`` is always a
mistake, so the integer and real checks refuse it.
"""

from __future__ import annotations

import math
import numbers

import torch


def check_int(value: object, name: str, *, minimum: int | None = None) -> int:
    """`value` as an int; TypeError unless it is an integer (not a bool), ValueError below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_real(value: object, name: str) -> float:
    """`value` as a float; TypeError unless it is a real number (not a bool), ValueError if NaN or inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_bool(value: object, name: str) -> bool:
    """`value` unchanged; TypeError unless it is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_device(device: object, name: str = "device") -> torch.device:
    """`device` as a torch.device that exists on this machine (a clear error for CUDA without a GPU)."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name} must be a str or torch.device such as 'cpu' or 'cuda', got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{name}={device!r} is not a device name such as 'cpu', 'cuda' or 'cuda:1' ({err})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={str(device)!r} needs a CUDA GPU, but none is available here; use 'cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name}={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
            )
    return parsed
