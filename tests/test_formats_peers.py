"""NF4 against bitsandbytes on the CPU (the `peers` extra, which CI installs)."""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.formats import QuantizedTensor, dynamic_table, nf4_table

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="peers extra (bitsandbytes) not installed")

pytestmark = pytest.mark.peers
SHAPES = [(512, 1024), (1000, 576), (3, 64), (17, 192)]


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(bnb_functional.get_4bit_type("nf4", device="cpu"), nf4_table())
    assert torch.equal(bnb_functional.create_dynamic_map(), dynamic_table())


def _bnb_as_ours(packed, state, shape) -> QuantizedTensor:
    n, k = shape
    if state.nested:
        return QuantizedTensor(
            "nf4",
            (n, k),
            state.blocksize,
            packed.reshape(n, k // 2),
            state.absmax,
            absmax_scales=state.state2.absmax,
            absmax_offset=state.offset.reshape(1),
        )
    return QuantizedTensor("nf4", (n, k), state.blocksize, packed.reshape(n, k // 2), state.absmax)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_our_decode_of_a_bnb_weight_equals_bnb_dequantize_4bit(shape, double_quant):
    w = torch.randn(*shape)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    ours = _bnb_as_ours(packed, state, shape)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        expected = bnb_functional.dequantize_4bit(packed, state).to(dtype)
        assert torch.equal(ours.dequantize(dtype, backend="torch"), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_our_codes_equal_bnb_codes(shape, double_quant):
    w = torch.randn(*shape)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    qt = qk.quantize(w, "nf4", double_quant=double_quant)
    assert torch.equal(qt.data.reshape(-1), packed.reshape(-1)), "4-bit codes differ"
    if not double_quant:
        assert torch.equal(qt.scales, state.absmax)
        return
    assert torch.equal(qt.absmax_offset, state.offset.reshape(1))
    assert torch.equal(qt.absmax_scales, state.state2.absmax)
    # The 8-bit absmax codes: bitsandbytes' CPU kernel searches an approximate grid, so a value
    # close to the midpoint of two levels may go either way (measured: under 0.2% of the codes,
    # at most 11% of the level gap off the midpoint). Ours is the exact nearest level; a
    # difference must be one step, and only at such a close call.
    ours, theirs = qt.scales.long(), state.absmax.long()
    differ = ours != theirs
    assert differ.float().mean() < 0.005
    if differ.any():
        assert (ours - theirs)[differ].abs().max() == 1
        table = dynamic_table()
        _, absmax = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        centred = absmax.absmax - state.offset
        scaled = (centred * (1.0 / state.state2.absmax.repeat_interleave(256)[: centred.numel()]))[differ]
        mine = (scaled - table[ours[differ]]).abs()
        bnb = (scaled - table[theirs[differ]]).abs()
        assert torch.all(mine <= bnb), "our code must be the nearer level"
        gap = (table[ours[differ]] - table[theirs[differ]]).abs()
        assert torch.all(bnb - mine < 0.25 * gap), "differences only at close calls"


def test_nf4_rmse_matches_bitsandbytes():
    w = torch.randn(1024, 1024)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    bnb_err = (bnb_functional.dequantize_4bit(packed, state) - w).norm() / w.norm()
    ours_err = (qk.quantize(w, "nf4").dequantize(torch.float32) - w).norm() / w.norm()
    assert abs(bnb_err - ours_err) < 1e-4
