"""`PromptEmbedding`: the trainable soft prompt of prompt tuning (num_virtual_tokens x token_dim).

Its weight is what PEFT saves as ``prompt_embeddings``; prepending it to a model's input
embeddings (with the attention mask, labels and positions) is done by `qlora_kernels.tuning`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common import check_int


class PromptEmbedding(nn.Module):
    """num_virtual_tokens soft prompt vectors, initialised from given embeddings or N(0, 1)."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        num_virtual_tokens = check_int(num_virtual_tokens, "num_virtual_tokens", minimum=1)
        token_dim = check_int(token_dim, "token_dim", minimum=1)
        self.num_virtual_tokens, self.token_dim = num_virtual_tokens, token_dim
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, dtype=torch.float32)
        if init is not None:
            if not isinstance(init, torch.Tensor):
                raise TypeError(f"init must be a tensor of shape ({num_virtual_tokens}, {token_dim}) or None")
            if tuple(init.shape) != (num_virtual_tokens, token_dim):
                raise ValueError(f"init must have shape ({num_virtual_tokens}, {token_dim}), got {tuple(init.shape)}")
            with torch.no_grad():
                self.embedding.weight.copy_(init.detach().float())

    def forward(self, batch_size: int) -> torch.Tensor:
        """The prompt expanded to (batch_size, num_virtual_tokens, token_dim)."""
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}"
