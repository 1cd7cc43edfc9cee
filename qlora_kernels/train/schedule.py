"""Learning-rate schedule: linear warmup then cosine decay to `min_lr_ratio * lr`.

A pure function of the step (as in nanoGPT): nothing to checkpoint but the step itself.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    min_lr = lr * min_lr_ratio
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
