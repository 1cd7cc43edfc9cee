"""Dense linear layers seen through one interface: `nn.Linear` and transformers' `Conv1D` (GPT-2).

`Conv1D` computes ``x @ W + b`` with W stored as (in_features, out_features), the transpose of
`nn.Linear`'s layout (PEFT's ``fan_in_fan_out``). The helpers here hand out W as (out, in), so
quantizing and merging code needs one code path. transformers is never imported here: a model
can only hold a `Conv1D` once ``transformers.pytorch_utils`` has been imported by someone else.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def conv1d_class() -> type[nn.Module] | None:
    """transformers' `Conv1D` class if transformers is loaded, else None."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_dense_linear(module: nn.Module) -> bool:
    """True for `nn.Linear` and transformers' `Conv1D`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a dense linear, a `Conv1D`, or any layer with those attributes."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise TypeError(f"{type(module).__name__} is not a linear layer (no in_features / out_features)")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an `nn.Linear` or `Conv1D` as (out_features, in_features): a view, not a copy."""
    if is_conv1d(module):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"dense_weight expects an nn.Linear or a transformers Conv1D, got {type(module).__name__}")
