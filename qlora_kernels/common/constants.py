"""Values that several layers must agree on."""

from __future__ import annotations

import torch

#: Label of a token that carries no loss (prompt, padding, virtual tokens): PyTorch's and
#: transformers' ``ignore_index`` default.
IGNORE_INDEX = -100

#: The floating-point dtypes the layers compute in and the formats decode to.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
