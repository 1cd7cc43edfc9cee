"""PromptEmbedding: shape, init, batch expansion."""

import pytest
import torch

from qlora_kernels.nn import PromptEmbedding


def test_init_and_expand():
    init = torch.randn(3, 8, dtype=torch.bfloat16)
    prompt = PromptEmbedding(3, 8, init=init)
    assert prompt.embedding.weight.dtype == torch.float32
    torch.testing.assert_close(prompt.embedding.weight, init.float())
    out = prompt(4)
    assert out.shape == (4, 3, 8)
    out.sum().backward()
    assert torch.equal(prompt.embedding.weight.grad, torch.full((3, 8), 4.0))


def test_bad_input():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptEmbedding(0, 8)
    with pytest.raises(ValueError, match=r"init must have shape \(3, 8\)"):
        PromptEmbedding(3, 8, init=torch.zeros(2, 8))
