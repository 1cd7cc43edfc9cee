"""Partial training from the lecture: which parameters to unfreeze, and layer-wise learning-rate decay.

Policies: ``"head"`` (the LM head only), ``"top_k"`` (the top k transformer blocks and the
final norm), ``"no_embeddings"`` (everything except the input embeddings). With tied input /
output embeddings (SmolLM2) the head *is* the embedding matrix: ``"head"`` trains it and
``"no_embeddings"`` freezes it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .config import PARTIAL_POLICIES
from .targets import find_blocks, input_embeddings, output_head


def partial_trainable(model: nn.Module, policy: str, k: int | None) -> list[str]:
    """Names of the parameters a partial-training policy unfreezes (tied parameters once)."""
    if policy not in PARTIAL_POLICIES:
        raise ValueError(f"policy must be one of {PARTIAL_POLICIES}, got {policy!r}")
    params = dict(model.named_parameters())  # named_parameters() dedups tied tensors
    ids = {id(p): n for n, p in params.items()}
    if policy == "head":
        head = output_head(model)
        if head is None:
            raise ValueError(f"policy='head': {type(model).__name__} has no get_output_embeddings(); use 'top_k'")
        return [ids[id(p)] for p in head.parameters()]
    if policy == "no_embeddings":
        emb = input_embeddings(model)
        frozen = {id(p) for p in emb.parameters()} if emb is not None else set()
        return [n for n, p in params.items() if id(p) not in frozen]
    prefix, blocks = find_blocks(model)
    if not isinstance(k, int) or not 1 <= k <= len(blocks):
        raise ValueError(f"policy='top_k' needs k in [1, {len(blocks)}] (number of blocks), got k={k!r}")
    chosen = {id(p) for block in list(blocks)[-k:] for p in block.parameters()}
    # the final norm: parameters that sit after the blocks and are neither the head nor the embeddings
    excluded = set()
    for mod in (output_head(model), input_embeddings(model)):
        if mod is not None:
            excluded |= {id(p) for p in mod.parameters()}
    in_blocks = {id(p) for p in blocks.parameters()}
    for name, p in params.items():
        if id(p) not in in_blocks and id(p) not in excluded and re.search(r"(^|\.)(norm|ln_f|final_layernorm)\.", name):
            chosen.add(id(p))
    return [n for n, p in params.items() if id(p) in chosen]


def param_groups(model: nn.Module, lr: float, decay: float = 1.0, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters with layer-wise LR decay.

    Block i of L gets ``lr * decay ** (L - 1 - i)`` (the top block gets lr), parameters after
    the blocks (final norm, head) get lr, those before them (embeddings, soft prompt) get
    ``lr * decay ** L``. Biases and norms get no weight decay. decay=1 gives one LR for all.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    try:
        prefix, blocks = find_blocks(model)
    except ValueError:
        prefix, blocks = "", nn.ModuleList()
    n_blocks = len(blocks)
    block_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.") if prefix else None
    seen_blocks = False
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = block_re.match(name) if block_re else None
        if m:
            depth, seen_blocks = n_blocks - 1 - int(m.group(1)), True
        elif prefix and name.startswith(prefix + "."):
            depth = 0
        elif name.startswith("qk_prompt."):
            depth = n_blocks
        else:
            depth = 0 if seen_blocks or not n_blocks else n_blocks
        no_wd = p.dim() < 2
        groups.setdefault((depth, no_wd), []).append(p)
    if not groups:
        raise ValueError("model has no trainable parameters; call qk.prepare_model first")
    return [
        {"params": ps, "lr": lr * decay**depth, "weight_decay": 0.0 if no_wd else weight_decay, "layer_depth": depth}
        for (depth, no_wd), ps in sorted(groups.items())
    ]
