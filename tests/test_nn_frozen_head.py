"""A frozen LM head fed generate()'s last-position slice stays one GEMM (no per-row weight copy)."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import qlora_kernels as qk
from qlora_kernels.nn.frozen_head import fold_frozen_head_inputs


def _ops(fn) -> set[str]:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def _last_position(batch: int = 3, length: int = 7, hidden: int = 32) -> torch.Tensor:
    return torch.randn(batch, length, hidden)[:, -1:, :]  # (B, 1, H), batch stride length * hidden


def test_a_frozen_head_batches_a_strided_slice_without_the_hook_and_folds_it_with_it() -> None:
    torch.manual_seed(0)
    head = nn.Linear(32, 500, bias=False).requires_grad_(False)
    x = _last_position()
    expected = x.reshape(3, 32) @ head.weight.t()
    assert "aten::bmm" in _ops(lambda: head(x))  # the PyTorch behaviour the hook exists for
    assert fold_frozen_head_inputs(head) and fold_frozen_head_inputs(head)  # idempotent
    assert len(head._forward_pre_hooks) == 1
    ops = _ops(lambda: head(x))
    assert "aten::bmm" not in ops and "aten::mm" in ops
    torch.testing.assert_close(head(x).reshape(3, 500), expected)
    head.weight.requires_grad_(True)  # a trainable head folds on its own: the hook leaves it alone
    with torch.no_grad():
        assert head(x).shape == (3, 1, 500)


def test_only_dense_heads_get_the_hook() -> None:
    assert not fold_frozen_head_inputs(None)
    assert not fold_frozen_head_inputs(nn.Embedding(4, 4))


def test_prepare_model_installs_it_so_generation_never_copies_the_head() -> None:
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    qk.prepare_model(model, "qlora", quant="nf4", r=4, alpha=8, group_size=32)
    ids = torch.randint(0, 300, (3, 6))
    ops = _ops(lambda: model(input_ids=ids, logits_to_keep=1))
    assert "aten::bmm" not in ops
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1:, :]
        last = model(input_ids=ids, logits_to_keep=1).logits
    torch.testing.assert_close(last, full)
