"""`BottleneckAdapter`: Houlsby-style adapter, x + up(act(down(x))), attached after a sub-block.

The up-projection starts at zero, so a freshly attached adapter leaves the model unchanged.
It is attached with a forward hook on the host block (attention or MLP) instead of a wrapper
module, so the base model's parameter names, and hence its checkpoints, stay as they were.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common import check_int, check_real

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def check_adapter_options(hidden_size: int, bottleneck: int, activation: str, dropout: float) -> None:
    """Validate a bottleneck adapter's options (shared with `prepare_model`, which checks before changing a model)."""
    hidden_size = check_int(hidden_size, "hidden_size", minimum=1)
    bottleneck = check_int(bottleneck, "bottleneck", minimum=1)
    if bottleneck > hidden_size:
        raise ValueError(f"bottleneck must be an integer in [1, hidden_size={hidden_size}], got {bottleneck!r}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    dropout = check_real(dropout, "dropout")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class BottleneckAdapter(nn.Module):
    """y = x + up(act(down(dropout(x)))), computed in the adapter's (fp32) dtype, returned in x's dtype."""

    def __init__(self, hidden_size: int, bottleneck: int = 64, activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        check_adapter_options(hidden_size, bottleneck, activation, dropout)
        self.hidden_size, self.bottleneck = hidden_size, bottleneck
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden_size)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x).to(self.down.weight.dtype)
        return x + self.up(self.act(self.down(h))).to(x.dtype)

    def attach(self, block: nn.Module, name: str = "adapter") -> None:
        """Register as `block.<name>` and apply to the block's output (first element of a tuple)."""
        if hasattr(block, name):
            raise ValueError(f"{type(block).__name__} already has an attribute {name!r}; pass another name")
        block.add_module(name, self)
        block.register_forward_hook(self._on_output)

    def _on_output(self, module: nn.Module, args, output):
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bottleneck={self.bottleneck}"
