"""BottleneckAdapter: identity at init, residual bottleneck, attaches by hook without renaming the host."""

import pytest
import torch
from torch import nn

from qlora_kernels.nn import BottleneckAdapter


def test_identity_at_init_and_trainable_path():
    adapter = BottleneckAdapter(16, bottleneck=4)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    assert torch.equal(adapter(x), x)
    nn.init.normal_(adapter.up.weight)
    y = adapter(x)
    assert y.dtype == torch.bfloat16 and not torch.equal(y, x)
    assert sum(p.numel() for p in adapter.parameters()) == 16 * 4 + 4 + 4 * 16 + 16


def test_attach_hooks_tuple_outputs_and_keeps_names():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.o_proj(x), None

    host = Attn()
    names = {n for n, _ in host.named_parameters()}
    adapter = BottleneckAdapter(8, bottleneck=2)
    adapter.attach(host)
    assert {n for n, _ in host.named_parameters()} == names | {f"adapter.{n}" for n, _ in adapter.named_parameters()}
    nn.init.normal_(adapter.up.weight)
    x = torch.randn(4, 8)
    out, extra = host(x)
    assert extra is None
    torch.testing.assert_close(out, adapter(host.o_proj(x)))
    with pytest.raises(ValueError, match="already has an attribute 'adapter'"):
        BottleneckAdapter(8, 2).attach(host)


@pytest.mark.parametrize("kwargs,match", [({"bottleneck": 0}, "bottleneck"), ({"activation": "swish"}, "activation")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BottleneckAdapter(8, **{"bottleneck": 2, **kwargs})
