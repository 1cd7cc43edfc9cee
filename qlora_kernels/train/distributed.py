"""One training run on several processes: which mode, which rank, and what the ranks agree on.

Launch with ``torchrun --nproc-per-node N`` (or ``accelerate launch``, which runs torchrun):
each process is a rank, told its place by the environment (WORLD_SIZE, RANK, LOCAL_RANK).
The config key ``distributed`` picks the engine: ``none`` (one process), ``ddp`` (every rank
holds the whole model; gradients of the trainable tensors are all-reduced), ``fsdp`` (FSDP2:
parameters, the quantized base included, are sharded across ranks; see `parallel`), or
``auto`` (ddp when WORLD_SIZE > 1, else none).

What makes N ranks train like one process with the same global batch:

* data: one optimizer step takes N x grad_accum micro-batches from the shared, deterministic
  batch stream; rank r keeps micro-batches r, r+N, ... The stream's position counts all ranks'
  micro-batches, so a checkpoint resumes under another world size too.
* loss: each rank divides its summed token losses by the completion tokens of the whole global
  step (an all-reduce) over N, since DDP and FSDP average gradients over ranks; the logged loss
  is the mean over ranks, i.e. the global per-token loss.
* dropout: each step seeds the RNG from (seed, step, rank), so a resumed run needs no per-rank
  RNG state.
* files: rank 0 writes metrics, checkpoints and the adapter (each atomically); the others wait
  at a barrier. Every rank reads the checkpoint to resume, so output_dir must be shared storage.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import DISTRIBUTED, ConfigError, TrainConfig

MODES = DISTRIBUTED


@dataclass(frozen=True)
class DistributedPlan:
    """The resolved mode and this process's place, read from the config and the environment."""

    mode: str  # "none" | "ddp" | "fsdp"
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def plan_distributed(cfg: TrainConfig, env: Mapping[str, str] | None = None) -> DistributedPlan:
    """Check `cfg.distributed` against the launch (no side effects); ConfigError says what to change."""
    env = os.environ if env is None else env
    mode = cfg.distributed
    if mode not in MODES:
        raise ConfigError(f"config key 'distributed' must be one of {MODES}, got {mode!r}")
    world = _env_int(env, "WORLD_SIZE", 1)
    if world < 1:
        raise ConfigError(f"WORLD_SIZE must be >= 1, got {world}")
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    # accelerate launch runs one process unless --multi_gpu is given, also on a CPU-only machine
    launch = "launch with torchrun --nproc-per-node N (or accelerate launch --multi_gpu --num_processes N)"
    if mode == "none":
        if world > 1:
            raise ConfigError(
                f"WORLD_SIZE={world} but config key 'distributed' is 'none': the ranks would train "
                "independently and overwrite each other's files; set distributed to ddp, fsdp or auto"
            )
        return DistributedPlan("none")
    if world == 1:
        raise ConfigError(
            f"distributed: {mode} needs several processes, but WORLD_SIZE is {env.get('WORLD_SIZE', 'unset')}: "
            f"{launch}, or set distributed to none (or auto)"
        )
    if "RANK" not in env:
        raise ConfigError(f"WORLD_SIZE={world} but RANK is not set: {launch}")
    rank, local_rank = _env_int(env, "RANK", 0), _env_int(env, "LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if mode == "fsdp" and cfg.dtype == "fp16":
        raise ConfigError(
            "distributed: fsdp trains in bf16 or fp32 (fp16 needs a grad scaler, untested with sharded "
            "gradients): set dtype to bf16, or use distributed: ddp"
        )
    if cfg.time_budget_s > 0:
        raise ConfigError(
            "time_budget_s is not supported with distributed training (ranks would stop at different "
            "steps); set max_steps instead"
        )
    return DistributedPlan(mode, world, rank, local_rank)


class Distributed:
    """This process's part in a run; with mode "none" every method is the one-process identity."""

    def __init__(self, plan: DistributedPlan) -> None:
        self.plan = plan

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    @property
    def rank(self) -> int:
        return self.plan.rank

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and prints progress (rank 0)."""
        return self.plan.rank == 0

    @property
    def device(self) -> torch.device:
        """CUDA device LOCAL_RANK when CUDA is present, else the CPU."""
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self.plan.local_rank) if self.mode != "none" else torch.device("cuda")

    # ---------------------------------------------------------------------- data
    def step_batches(self, batches: Iterator[Any], grad_accum: int) -> list[Any]:
        """This rank's micro-batches of one optimizer step: every rank draws world_size x grad_accum
        batches from the same stream and keeps those at its rank, stride world_size."""
        drawn = [next(batches) for _ in range(self.world_size * grad_accum)]
        return drawn[self.rank :: self.world_size]

    def seed_step(self, seed: int, step: int) -> None:
        """Seed dropout for this step and rank (distributed runs only; one process keeps its RNG stream)."""
        if self.mode != "none":
            torch.manual_seed(hash((seed, step, self.rank)) % 2**63)

    # ---------------------------------------------------------------- reductions
    def _all_reduce(self, values: list[float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
        if self.mode == "none":
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum_int(self, value: int) -> int:
        """`value` summed over ranks."""
        return int(round(self._all_reduce([float(value)])[0]))

    def mean(self, value: float) -> float:
        """`value` averaged over ranks."""
        return self._all_reduce([value])[0] / self.world_size

    def any(self, flag: bool) -> bool:
        """True when `flag` is true on any rank (e.g. one rank got Ctrl-C: all stop at the same step)."""
        return self._all_reduce([float(bool(flag))], dist.ReduceOp.MAX)[0] > 0

    def loss_divisor(self, global_tokens: int) -> float:
        """What each rank divides its summed loss by: the global step's completion tokens over the
        world size, because DDP and FSDP average the ranks' gradients (one process: the token count)."""
        return max(global_tokens, 1) / self.world_size

    def note_global_batch_change(self, saved_config: dict, saved_extra: dict, cfg: TrainConfig) -> None:
        """Say so (rank 0) when a resumed run takes another number of examples per step than the
        run that wrote the checkpoint: it continues from the same data position, but its loss curve
        is no longer the one the first run would have drawn."""
        saved_world = int(saved_extra.get("world_size", 1))
        before = saved_world * int(saved_config.get("batch_size", 0)) * int(saved_config.get("grad_accum", 0))
        now = self.world_size * cfg.batch_size * cfg.grad_accum
        if self.is_main and before and before != now:
            print(
                f"note: the checkpoint was written with {before} examples per step "
                f"({saved_world} rank(s) x batch_size x grad_accum), this run takes {now}; "
                "for the same run, keep world_size x grad_accum the same",
                file=sys.stderr,
            )

    def barrier(self) -> None:
        if self.mode != "none":
            dist.barrier()


def start_distributed(plan: DistributedPlan) -> Distributed:
    """Join the process group of the plan (created once per process; gloo on the CPU, NCCL on CUDA)."""
    run = Distributed(plan)
    if plan.mode == "none":
        return run
    if dist.is_initialized():  # the caller (e.g. accelerate's Accelerator) made the group: join it
        if dist.get_world_size() != plan.world_size:
            raise ConfigError(
                f"a process group of {dist.get_world_size()} ranks exists, but WORLD_SIZE is {plan.world_size}"
            )
        _share_cpu_compute_dtype(run)
        return run
    device = run.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=plan.rank, world_size=plan.world_size)
    atexit.register(_destroy_process_group)
    _share_cpu_compute_dtype(run)
    return run


def _share_cpu_compute_dtype(run: Distributed) -> None:
    """On the CPU every rank computes in rank 0's choice: "auto" measures the bf16 GEMM speed, and
    on a busy host two ranks could measure differently and pick different dtypes."""
    if run.device.type != "cpu":
        return
    from ..ops.compute_policy import cpu_compute_dtype, set_cpu_compute_dtype

    choice = [cpu_compute_dtype().name if run.is_main else None]
    dist.broadcast_object_list(choice, src=0)
    if not run.is_main and cpu_compute_dtype().name != choice[0]:
        set_cpu_compute_dtype(choice[0])


def _destroy_process_group() -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()
