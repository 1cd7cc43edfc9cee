"""The model under DDP or FSDP2, and its trainable state gathered whole for checkpoints.

* DDP: the model is replicated; only the trainable tensors take part (frozen weights and all
  buffers are neither broadcast nor reduced: every rank loaded the same base).
* FSDP2: every `QuantLinear` first becomes a `ShardableQuantLinear` (its packed weight a frozen
  `PackedWeight` Parameter), then `fully_shard` is applied to each transformer block (the
  model's ``_no_split_modules``) and to the root. Each rank holds 1/N of every parameter, the
  packed base included; a block's parameters are gathered for its forward and backward and
  freed afterwards. With bf16 training the mixed-precision policy computes in bf16 and reduces
  gradients in fp32 into fp32 master weights (LoRA and adapters are created in fp32).

`full_state` lends the checkpoint and adapter writers the whole trainable tensors and optimizer
state, as a one-process run holds them, so files do not depend on the world size.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..nn.shardable import to_shardable
from .distributed import Distributed


class DataParallelModel(DistributedDataParallel):
    """DDP that also exposes the wrapped model's `get_output_embeddings` and `config`, which the
    trainer's fused head + loss reads from the module it calls."""

    def get_output_embeddings(self) -> nn.Module | None:
        get = getattr(self.module, "get_output_embeddings", None)
        return get() if get else None

    @property
    def config(self):
        return getattr(self.module, "config", None)


def wrap_model(model: nn.Module, run: Distributed, dtype: str) -> nn.Module:
    """Apply the run's engine; returns the module to call for the forward pass.

    DDP returns a wrapper (checkpoints and adapters still read `model`); FSDP2 shards `model`
    in place and returns it. `dtype` is the run's resolved autocast dtype ("bf16", "fp16", "fp32").
    Build the optimizer after this call: FSDP2 replaces the Parameters by sharded ones.
    """
    if run.mode == "ddp":
        return _data_parallel(model, run)
    if run.mode == "fsdp":
        _fully_shard(model, run, dtype)
    return model


def _data_parallel(model: nn.Module, run: Distributed) -> DataParallelModel:
    frozen = [n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]
    buffers = [n for n, _ in model.named_buffers(remove_duplicate=False)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen + buffers)
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    # No buffer sync per forward (the ignored buffers are skipped at init too); the keyword was renamed in torch 2.13.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DataParallelModel(model, device_ids=device_ids, **no_sync)


def mixed_precision(dtype: str):
    """FSDP2's policy for the run's dtype: compute in bf16/fp16, reduce gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)


def _fully_shard(model: nn.Module, run: Distributed, dtype: str) -> None:
    from torch.distributed.fsdp import fully_shard

    replicated = to_shardable(model, rows_multiple_of=run.world_size)
    if replicated and run.is_main:
        print(
            f"fsdp: {len(replicated)} quantized layers have out_features not divisible by {run.world_size} "
            f"ranks and stay replicated (e.g. {replicated[0]})",
            file=sys.stderr,
        )
    policy = mixed_precision(dtype)
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names and m is not model]
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


# ---------------------------------------------------------------- whole state for files
def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def full_state(
    run: Distributed, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, load: bool = False
) -> Iterator[None]:
    """While open, `model`'s trainable Parameters and the optimizer's state are whole tensors.

    Under FSDP2 the sharded trainable Parameters are gathered (a collective: every rank enters)
    and set on their modules in place of the shards; `trainable_state`, `save_adapter` and
    `optimizer.state_dict()` then see what a one-process run sees. With ``load=True`` whatever
    was loaded into them (and into the optimizer) is split back into this rank's shards on exit;
    otherwise the shards are put back unchanged. Without FSDP this does nothing.
    """
    if run.mode != "fsdp":
        yield
        return
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.requires_grad or not _is_sharded(param):
                continue
            if id(param) not in whole:  # a tied Parameter is gathered once
                whole[id(param)] = nn.Parameter(param.full_tensor(), requires_grad=True)
            module._parameters[name] = whole[id(param)]
            swapped.append((module, name, param))
    saved_state = {}
    if optimizer is not None:
        for param, state in optimizer.state.items():
            saved_state[param] = dict(state)
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and _is_sharded(value):
                    state[key] = value.full_tensor()
    try:
        yield
    finally:
        for module, name, sharded in swapped:
            if load:
                with torch.no_grad():
                    sharded.to_local().copy_(_local_shard(module._parameters[name].detach(), sharded))
            module._parameters[name] = sharded
        if optimizer is not None:
            if load:
                _shard_optimizer_state(optimizer)
            else:
                for param, state in saved_state.items():
                    optimizer.state[param] = state


def _local_shard(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `whole`, laid out as the sharded tensor `like` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict` of a whole state: each tensor of a sharded Parameter's
    shape becomes a DTensor laid out like that Parameter."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for param in group["params"]:
            if not _is_sharded(param):
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not _is_sharded(value) and value.shape == param.shape:
                    local = _local_shard(value.to(param.to_local().device), param)
                    state[key] = DTensor.from_local(
                        local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
                    )


def local_frozen_bytes(model: nn.Module, quantized_only: bool = False) -> int:
    """Bytes of the frozen parameters and buffers this process holds (its shards under FSDP2), each
    storage counted once: the resident size of the base on this rank. `quantized_only`: only the
    packed weights of `QuantLinear` layers (buffers or `PackedWeight` Parameters)."""
    from ..nn import QuantLinear
    from ..nn.packed_weight import PackedWeight

    if quantized_only:
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        tensors = [t for m in layers for n, t in m.named_parameters(recurse=False) if n != "bias"]
        tensors += [t for m in layers for t in m.buffers(recurse=False)]
    else:
        tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if _is_sharded(tensor):
            tensor = tensor.to_local()
        parts = tensor.fields.values() if isinstance(tensor, PackedWeight) else (tensor,)
        for part in parts:
            storage = part.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total
