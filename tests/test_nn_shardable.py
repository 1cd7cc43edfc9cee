"""PackedWeight (the FSDP2-shardable packed weight) and ShardableQuantLinear, in one process.

FSDP2's own calls are replayed by hand: the dim-0 sharding it does at `fully_shard` (chunk,
new_zeros, narrow, copy_, view) and an all-gather (concatenating the ranks' pre-all-gather
inputs), then the post-all-gather weight must decode bit for bit to the original.
tests/test_train_distributed.py runs the real thing on two processes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.nn import LoRALinear, QuantLinear
from qlora_kernels.nn.packed_weight import ROW_FIELDS, PackedWeight
from qlora_kernels.nn.shardable import ShardableQuantLinear, to_buffers, to_shardable

# (format, group size, options); out_features 24 splits evenly over 2, 3 and 4 ranks. NF4 with
# double quantization at (24, 192) has 72 blocks of 64: its nested table is shared by all rows.
CASES = [
    ("nf4", 64, {}),
    ("nf4", 32, {"double_quant": False}),
    ("int4", 32, {}),
    ("int4", 64, {"symmetric": True}),
    ("int8", None, {}),
]
SHAPE = (24, 192)


def _quantized(fmt, group, options, shape=SHAPE):
    return qk.quantize(torch.randn(*shape), fmt, group, **options)


def _shard_as_fsdp_does(weight: PackedWeight, world: int) -> list[PackedWeight]:
    """What `fully_shard` makes of the weight on each rank (even rows: no padding)."""
    shards = []
    for chunk in torch.chunk(weight, world, dim=0):
        padded = chunk.new_zeros(chunk.shape)
        padded.narrow(0, 0, chunk.shape[0]).copy_(chunk)
        assert padded.view(-1).numel() == padded.numel()
        shards.append(padded.narrow(0, 0, chunk.shape[0]))
    return shards


def _gather(shards: list[PackedWeight], dtype=torch.float32):
    """An all-gather of the shards' pre-all-gather inputs, then the post-all-gather weight."""
    inputs = [s.fsdp_pre_all_gather(None, None, None, None, None) for s in shards]
    metadata = inputs[0][1]
    outputs = tuple(torch.cat(parts) for parts in zip(*(i[0] for i in inputs), strict=True))
    weight, inner = shards[0].fsdp_post_all_gather(outputs, metadata, dtype)
    return torch.as_strided(weight, (SHAPE[0], SHAPE[1]), (SHAPE[1], 1), 0), inner, outputs, metadata


@pytest.mark.parametrize(("fmt", "group", "options"), CASES)
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_then_gathered_weight_decodes_bit_identically(fmt, group, options, world):
    qt = _quantized(fmt, group, options)
    weight = PackedWeight.from_quantized(qt, torch.bfloat16)
    assert weight.shape == SHAPE and weight.dtype == torch.bfloat16 and not weight.requires_grad
    shards = _shard_as_fsdp_does(weight, world)
    assert all(s.rows == SHAPE[0] // world for s in shards)
    with pytest.raises(ValueError, match="an FSDP shard"):
        shards[0].to_quantized()
    gathered = _gather(shards)[0]
    param = nn.Parameter(gathered, requires_grad=False)  # as FSDP registers it
    assert isinstance(param, PackedWeight)
    expected = qt.dequantize(torch.float32, backend="torch")
    assert torch.equal(param.to_quantized().dequantize(torch.float32, backend="torch"), expected)
    assert param.packed_nbytes == qt.nbytes


def test_the_gathered_weight_aliases_the_all_gather_outputs_so_fsdp_can_free_and_refill_them():
    qt = _quantized("nf4", 64, {})
    shards = _shard_as_fsdp_does(PackedWeight.from_quantized(qt), 2)
    gathered, inner, outputs, metadata = _gather(shards)
    param = nn.Parameter(gathered, requires_grad=False)
    assert [t.untyped_storage().data_ptr() for t in inner] == [t.untyped_storage().data_ptr() for t in outputs]
    row_tensors = [param.fields[n] for n in ROW_FIELDS if n in param.fields]
    assert [t.untyped_storage().data_ptr() for t in row_tensors] == [t.untyped_storage().data_ptr() for t in outputs]
    # FSDP frees the storage after use, re-allocates it and gathers again, then calls the hook with out=.
    for tensor in outputs:
        tensor.untyped_storage().resize_(0)
    assert all(t.untyped_storage().nbytes() == 0 for t in row_tensors)
    for tensor, again in zip(outputs, _gather(shards)[2], strict=True):
        tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())
        tensor.copy_(again)
    assert shards[0].fsdp_post_all_gather(outputs, metadata, torch.float32, out=param) is None
    assert torch.equal(param.to_quantized().dequantize(torch.float32), qt.dequantize(torch.float32))
    # Gathered into other tensors, the out= call copies into the registered weight.
    fresh = _gather(shards)[2]
    for tensor in outputs:
        tensor.zero_()
    shards[0].fsdp_post_all_gather(fresh, metadata, torch.float32, out=param)
    assert torch.equal(param.to_quantized().dequantize(torch.float32), qt.dequantize(torch.float32))


def test_double_quant_tables_are_replicated_not_sharded():
    qt = _quantized("nf4", 64, {}, shape=(64, 1024))  # 1024 blocks: 4 nested scales, spanning 16 rows each
    shards = _shard_as_fsdp_does(PackedWeight.from_quantized(qt), 4)
    for shard in shards:
        assert torch.equal(shard.fields["absmax_scales"], qt.absmax_scales)
        assert shard.fields["scales"].shape == (16, 1024 // 64)
    inputs, (_, names, shared) = shards[0].fsdp_pre_all_gather(None, None, None, None, None)
    assert names == ("data", "scales") and sorted(shared) == ["absmax_offset", "absmax_scales"]


def test_dtype_conversions_keep_the_packed_tensors():
    qt = _quantized("int4", 32, {})
    weight = PackedWeight.from_quantized(qt)
    moved = weight.to(torch.bfloat16)
    assert isinstance(moved, PackedWeight) and moved.dtype == torch.bfloat16
    assert {n: t.dtype for n, t in moved.fields.items()} == {n: t.dtype for n, t in weight.fields.items()}
    assert torch.equal(moved.to_quantized().dequantize(torch.float32), qt.dequantize(torch.float32))
    copy = weight.clone()
    assert copy.fields["data"].data_ptr() != weight.fields["data"].data_ptr()
    with pytest.raises(TypeError, match="floating"):
        weight.to(torch.int8)


def test_arithmetic_on_a_packed_weight_is_refused_with_a_hint():
    weight = PackedWeight.from_quantized(_quantized("nf4", 64, {}))
    with pytest.raises(NotImplementedError, match=r"to_quantized\(\)\.dequantize\(\)"):
        weight + 1
    with pytest.raises(NotImplementedError, match="dim 0"):
        torch.chunk(weight, 2, dim=1)
    with pytest.raises(NotImplementedError, match="must keep K=192 columns"):
        weight.view(SHAPE[1], SHAPE[0])
    with pytest.raises(NotImplementedError, match="viewed whole"):
        weight.view(2, 12, 192)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        PackedWeight.from_quantized(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="does not match"):
        weight.copy_(PackedWeight.from_quantized(_quantized("nf4", 32, {})))


# --------------------------------------------------------------------------- the layer
def _layer(fmt="nf4", group=64, bias=True, out_features=24, in_features=192) -> QuantLinear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    return QuantLinear.from_linear(linear, fmt, group)


@pytest.mark.parametrize(("fmt", "group", "options"), CASES[:3])
def test_shardable_layer_computes_and_saves_as_the_quant_linear_it_came_from(fmt, group, options):
    layer = _layer(fmt, group)
    shardable = ShardableQuantLinear.from_quant_linear(layer)
    assert list(dict(shardable.named_parameters())) == ["bias", "packed_weight"]
    assert not list(shardable.buffers()) and not shardable.packed_weight.requires_grad
    x = torch.randn(3, 5, 192)
    assert torch.equal(shardable(x), layer(x))
    expected, got = layer.state_dict(), shardable.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    lora = LoRALinear(layer, r=4)
    nn.init.normal_(lora.lora_B.weight)
    reference = lora(x)
    lora.base = shardable
    assert torch.equal(lora(x), reference)  # the fused path reads the packed weight the same way


def test_shardable_layer_loads_a_quant_linear_state_dict_as_own_copies():
    source, target = _layer(), ShardableQuantLinear.from_quant_linear(_layer())
    state = source.state_dict()
    target.load_state_dict(state)
    x = torch.randn(4, 192)
    assert torch.equal(target(x), source(x))
    assert target.packed_weight.fields["data"].data_ptr() != state["weight_data"].data_ptr()
    with pytest.raises(RuntimeError, match="weight_meta"):
        target.load_state_dict({"bias": state["bias"]})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        target.load_state_dict({**state, "extra": torch.zeros(1)})


def test_to_shardable_and_back_in_a_model():
    model = nn.Sequential(_layer(bias=False), nn.ReLU(), QuantLinear.from_linear(nn.Linear(24, 25), "int8"))
    before = model.state_dict()
    x = torch.randn(2, 192)
    expected = model(x)
    kept = to_shardable(model, dtype=torch.bfloat16, rows_multiple_of=2)
    assert kept == ["2"], "25 rows cannot be split evenly over 2 ranks: that layer stays replicated"
    assert type(model[0]) is ShardableQuantLinear and type(model[2]) is QuantLinear
    assert model[0].packed_weight.dtype == torch.bfloat16
    assert torch.equal(model(x), expected)
    model[0].to(torch.float16)  # quantized state moves by device only
    assert model[0].packed_weight.dtype == torch.float16
    assert {n: t.dtype for n, t in model[0].packed_weight.fields.items()} == {
        "data": torch.uint8,
        "scales": torch.uint8,
        "absmax_scales": torch.float32,
        "absmax_offset": torch.float32,
    }
    assert to_buffers(model) == 1 and type(model[0]) is QuantLinear
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
