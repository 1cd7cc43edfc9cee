"""The SFT training loop: plan (check everything, `plan.py`), set up, (resume), then step until `max_steps`.

One optimizer step = `grad_accum` micro-batches. The loss is the sum of token losses over the
completion tokens of all of them divided by their total count, so a step's gradient does not
depend on how the examples were split (transformers #34191).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..ops.linear_cross_entropy import linear_cross_entropy
from .checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    remove_stale_temp_dirs,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig
from .data import (
    IGNORE_INDEX,
    DataStats,
    Example,
    LengthGroupedBatches,
    collate,
    count_label_tokens,
    tokenize_records,
)
from .distributed import Distributed, DistributedPlan, plan_distributed, start_distributed
from .parallel import full_state, wrap_model
from .plan import RunPlan, plan_run, print_notes
from .precision import apply_cpu_precision
from .schedule import lr_at

METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
CONFIG_FILE = "train_config.json"
ADAPTER_STEP_KEY = "qk_train_step"  # adapter metadata: the optimizer step the weights are from
BUDGET_PROBE_STEPS = 3  # steps timed before a time budget may shorten the run (still inside warmup)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a run did: steps reached, last loss, wall time of the loop, peak memory, where it saved.

    After a SIGINT / SIGTERM (`signal_number`), `checkpoint_dir` and `adapter_dir` both hold the
    weights of `step`: the run can be resumed, and its adapter used as it is.
    """

    step: int
    loss: float
    train_seconds: float
    peak_memory_mb: float
    output_dir: Path
    adapter_dir: Path | None
    interrupted: bool = False
    data_stats: dict[str, str] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    signal_number: int = 0
    checkpoint_dir: Path | None = None
    max_steps: int = 0
    precision: str = ""


# ------------------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def autocast_context(device: torch.device, dtype: str) -> tuple[Callable[[], Any], torch.amp.GradScaler | None]:
    """(autocast factory, grad scaler or None) for a resolved dtype: bf16 on CPU/CUDA, fp16 + scaler on CUDA only."""
    if dtype == "fp32":
        return contextlib.nullcontext, None
    if dtype == "fp16":
        if device.type != "cuda":
            raise ConfigError("dtype 'fp16' needs CUDA (it needs a grad scaler); use dtype bf16 or fp32 on the CPU")
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # config keys that change logits


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head if the fused head + loss can replace it: a plain bias-free `nn.Linear`
    whose output is the logits as they are (no soft-capping or scaling in the config)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head else None
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS):
        return None
    return head


def completion_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], fused: bool = True) -> torch.Tensor:
    """Sum of next-token cross-entropies over the completion tokens of a batch (fp32).

    The head runs only on the positions from the earliest completion token on
    (`logits_to_keep`): prompt positions need no logits, which saves a large matmul. With a plain
    linear head (`fused_head`) it runs on the completion tokens alone, fused with the loss
    (`linear_cross_entropy`), so no tokens x vocab logit tensor is kept for the backward.
    """
    labels = batch["labels"]
    length = labels.shape[1]
    has_label = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(has_label[0]) if len(has_label) else length - 1  # first predicting position
    keep = length - first
    targets = labels[:, first + 1 :]
    head = fused_head(model) if fused else None
    if head is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
        logits = out.logits[:, -keep:-1] if keep > 1 else out.logits[:, :0]
        return F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    captured: list[torch.Tensor] = []

    def take_hidden_states(module: nn.Module, args: tuple) -> tuple:
        captured.append(args[0])
        return (args[0][:, :0],)  # the head itself computes nothing

    handle = head.register_forward_pre_hook(take_hidden_states)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    finally:
        handle.remove()
    hidden = captured[0][:, -keep:-1] if keep > 1 else captured[0][:, :0]
    rows = targets != IGNORE_INDEX
    return linear_cross_entropy(hidden[rows], head.weight, targets[rows])


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    run: Distributed | None = None,
) -> tuple[float, int]:
    """Backward over all micro-batches of one step; returns (mean loss per completion token, token count).

    Each micro-batch's summed loss is divided by the completion tokens of the whole step, so the
    accumulated gradient equals that of one batch holding every example, whatever the split.
    Under DDP/FSDP (`run`) the step spans all ranks' micro-batches: tokens and loss are summed
    over ranks too, so the result equals one process with the same global batch.
    """
    run = run or Distributed(DistributedPlan("none"))
    n_tokens = run.sum_int(sum(count_label_tokens(b) for b in micro_batches))
    divisor = run.loss_divisor(n_tokens)
    loss_sum = 0.0
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss = completion_loss_sum(model, batch) / divisor
        (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.item()
    return run.mean(loss_sum), n_tokens


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast,
    max_batches: int,
) -> float:
    """Mean completion-token loss over (the first `max_batches` batches of) `examples`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for i in range(0, min(len(ordered), batch_size * max_batches), batch_size):
        batch = {k: v.to(device) for k, v in collate(ordered[i : i + batch_size], pad_id).items()}
        with autocast():
            total += completion_loss_sum(model, batch).item()
        count += count_label_tokens(batch)
    model.train(was_training)
    return total / max(count, 1)


def prepare(model: nn.Module, cfg: TrainConfig, tokenizer: Any, model_dtype: torch.dtype | None = None) -> None:
    """Apply the fine-tuning method with `qk.prepare_model`: quantize, attach LoRA/adapters, freeze."""
    from .. import prepare_model  # the tuning layer; imported late to keep `train` light

    options: dict[str, Any] = {
        "qlora": {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": cfg.target_modules},
        "adapter": {"bottleneck": cfg.bottleneck},
        "prompt": {"num_virtual_tokens": cfg.num_virtual_tokens, "tokenizer": tokenizer},
        "partial": {"policy": cfg.policy, "k": cfg.k},
    }
    options["lora"] = options["qlora"]
    prepare_model(
        model,
        cfg.method,
        quant=cfg.quant_format,
        group_size=cfg.group_size or None,
        compute_dtype=model_dtype or cfg.torch_model_dtype,  # frozen weights keep their loaded dtype
        gradient_checkpointing=cfg.gradient_checkpointing,
        **options.get(cfg.method, {}),
    )


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, in the tuning layer's parameter groups."""
    from .. import param_groups

    groups = param_groups(model, cfg.lr, decay=cfg.lr_decay, weight_decay=cfg.weight_decay)
    for g in groups:
        g["lr_scale"] = g["lr"] / cfg.lr  # the schedule multiplies each group's share of lr
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def save_final_adapter(model: nn.Module, output_dir: Path, step: int | None = None) -> Path:
    """output_dir/adapter, with the step it was saved at in its metadata (`ADAPTER_STEP_KEY`)."""
    from .. import save_adapter

    path = output_dir / ADAPTER_DIR
    save_adapter(model, path, metadata={ADAPTER_STEP_KEY: str(step)} if step is not None else None)
    return path


def fit_to_time_budget(
    budget_s: float, max_steps: int, cap: int, start_step: int, step: int, seconds_per_step: float
) -> int:
    """The max_steps (at most `cap`) that ends the run within `budget_s` at the measured speed.

    First called while still in warmup: the warmup LRs do not depend on max_steps, so the run is
    the one `max_steps=<new value>` would have given. Later calls (every few steps) follow the
    average speed both ways: down when the machine got slower, up again (to `cap`) when a slow
    start made the first estimate too cautious. Small drifts keep the current value.
    """
    affordable = min(cap, start_step + int(budget_s / seconds_per_step))  # counted from this start
    new = max(step + 1, affordable)
    return new if abs(new - max_steps) > (max_steps - step) // 10 else max_steps


class TrainingStopped(KeyboardInterrupt):
    """A second SIGINT / SIGTERM during training: stop at once, without a checkpoint."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class _StopRequest:
    """Turns the first SIGINT or SIGTERM into a flag checked after each step; a second one aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_number = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_number:
            raise TrainingStopped(signum)
        self.signal_number = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: finishing this step, then saving a checkpoint ({name} again aborts)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget what a killed run logged after its last checkpoint (and any half-written line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def prepare_output_dir(plan: RunPlan) -> None:
    """Create output_dir, drop what failed writes left and, for a new run, the previous run's files."""
    output_dir = plan.output_dir
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp_dirs(output_dir):
            print(f"removed {stale} (left by a failed or killed save)", file=sys.stderr)
        if plan.resume_from is None:
            remove_checkpoints(output_dir)
            shutil.rmtree(output_dir / ADAPTER_DIR, ignore_errors=True)
            (output_dir / METRICS_FILE).unlink(missing_ok=True)
        (output_dir / CONFIG_FILE).write_text(json.dumps(plan.cfg.to_dict(), indent=1), encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"output_dir {output_dir}: cannot write ({e.strerror or e})") from None


# --------------------------------------------------------------------------------- train
def train(
    cfg: TrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    resume: bool = False,
    change_schedule: bool = False,
    eval_fn: Callable[[nn.Module, Any], dict[str, float]] | None = None,
) -> TrainResult:
    """Run SFT as configured; pass `model`/`tokenizer` to skip loading (they are prepared here).

    `plan_run` first checks the whole config, the data files, output_dir, the checkpoint to
    resume from and the model's layers, so a mistake raises ConfigError / DataError before any
    weight loads or file changes. `cfg` itself is never modified. Without `resume`, a new run
    replaces the checkpoints, metrics and adapter of an earlier run in output_dir. With it, the
    run continues from the newest intact checkpoint (same model, method, r, targets, batch size
    and seed; a different LR schedule needs `change_schedule=True`).
    """
    if model is not None and tokenizer is None:
        raise ValueError("train(model=...) also needs tokenizer=...")
    distributed = plan_distributed(cfg)  # `distributed` against the launch (torchrun's variables) first
    plan = plan_run(cfg, resume=resume, change_schedule=change_schedule, model=model, has_eval_fn=eval_fn is not None)
    print_notes(plan)
    return _Run(plan, distributed, model, tokenizer, eval_fn).run()


class _Run:
    """One training run, applying a checked `RunPlan`: set-up in __init__, then `run()` steps to the end."""

    def __init__(
        self,
        plan: RunPlan,
        distributed: DistributedPlan,
        model: nn.Module | None,
        tokenizer: Any,
        eval_fn: Callable | None,
    ) -> None:
        cfg = self.cfg = plan.cfg
        self.run_group = start_distributed(distributed)  # one process: a no-op group of size 1
        self.plan, self.eval_fn, self.device = plan, eval_fn, self.run_group.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.precision = cfg.precision(self.device)
        apply_cpu_precision(self.precision, self.device, cfg.dtype)
        print(f"precision: {self.precision.describe()}", file=sys.stderr)
        if self.run_group.is_main:
            prepare_output_dir(plan)
        self.run_group.barrier()
        self.metrics_path = plan.output_dir / METRICS_FILE
        if model is None:
            from .. import load_model

            model, tokenizer = load_model(cfg.model, dtype=self.precision.torch_model_dtype)
        prepare(model, cfg, tokenizer, self.precision.torch_model_dtype)
        model.to(self.device)
        # the module to call: the DDP wrapper, the FSDP-sharded model, or the model itself
        self.engine = wrap_model(model, self.run_group, self.precision.dtype)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer, self.pad_id = model, tokenizer, tokenizer.pad_token_id

        self.train_examples, self.train_stats = tokenize_records(
            plan.train_records, tokenizer, cfg.max_length, cfg.train_file
        )
        self.eval_examples: list[Example] = []
        self.eval_stats = DataStats()
        if plan.eval_records:
            self.eval_examples, self.eval_stats = tokenize_records(
                plan.eval_records, tokenizer, cfg.max_length, cfg.eval_file
            )
        print(f"train data: {self.train_stats.summary()}", file=sys.stderr)
        self.batches = LengthGroupedBatches(self.train_examples, cfg.batch_size, cfg.seed)
        self.optimizer = build_optimizer(model, cfg)
        self.autocast, self.scaler = autocast_context(self.device, self.precision.dtype)
        self.step, self.max_steps = plan.start_step, plan.max_steps
        if plan.resume_from is not None:
            with full_state(self.run_group, model, self.optimizer, load=True):
                state = load_checkpoint(plan.resume_from, model, self.optimizer, self.scaler)
            self.batches.load_state_dict(state.data)
            if self.run_group.is_main:
                _truncate_metrics(self.metrics_path, self.step)
            print(f"resumed from {plan.resume_from} at step {self.step}", file=sys.stderr)
            self.run_group.note_global_batch_change(state.config, state.extra, cfg)
        self.run_group.barrier()  # rank 0 has cleaned up the metrics before anyone writes
        self.losses: list[float] = []
        self.loss_value = float("nan")

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.model.train()
        start_step = self.step
        disable = not (cfg.progress and self.run_group.is_main)
        bar = tqdm(total=self.max_steps, initial=self.step, disable=disable, desc="train", dynamic_ncols=True)
        t_start = time.perf_counter()
        with _StopRequest() as stop:
            while self.step < self.max_steps:
                lr, tokens, dt = self.train_step(bar)
                done = self.step - start_step
                if cfg.time_budget_s and done >= BUDGET_PROBE_STEPS and done % BUDGET_PROBE_STEPS == 0:
                    self.fit_budget(start_step, (time.perf_counter() - t_start) / done, bar)
                bar.set_postfix(loss=f"{self.loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
                bar.update(1)
                self.maybe_evaluate(bar)
                if self.run_group.any(bool(stop.signal_number)):  # every rank stops after the same step
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.max_steps:
                    self.checkpoint()
        bar.close()
        train_seconds = time.perf_counter() - t_start
        checkpoint_dir = self.checkpoint()
        with full_state(self.run_group, self.model):
            if self.run_group.is_main:
                adapter_dir = save_final_adapter(self.model, self.plan.output_dir, self.step)
            else:
                adapter_dir = self.plan.output_dir / ADAPTER_DIR
        self.run_group.barrier()
        return TrainResult(
            step=self.step,
            loss=self.loss_value,
            train_seconds=train_seconds,
            peak_memory_mb=peak_memory_mb(self.device),
            output_dir=self.plan.output_dir,
            adapter_dir=adapter_dir,
            interrupted=bool(stop.signal_number),
            data_stats={
                "train": self.train_stats.summary(),
                "eval": self.eval_stats.summary() if self.eval_examples else "none",
            },
            losses=self.losses,
            signal_number=stop.signal_number,
            checkpoint_dir=checkpoint_dir,
            max_steps=self.max_steps,
            precision=self.precision.describe(),
        )

    def train_step(self, bar: tqdm) -> tuple[float, int, float]:
        """One optimizer step over `grad_accum` micro-batches; returns (lr, tokens, seconds)."""
        cfg, optimizer = self.cfg, self.optimizer
        t0 = time.perf_counter()
        lr = lr_at(
            self.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=self.max_steps, min_lr_ratio=cfg.min_lr_ratio
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        group = self.run_group
        group.seed_step(cfg.seed, self.step)
        micro = [
            collate(b, self.pad_id, cfg.pad_to_multiple_of, cfg.max_length)
            for b in group.step_batches(self.batches, cfg.grad_accum)
        ]
        loss_sum, n_tokens = accumulate_gradients(self.engine, micro, self.device, self.autocast, self.scaler, group)
        if not math.isfinite(loss_sum):
            bar.close()
            last = latest_checkpoint(self.plan.output_dir)
            raise TrainingDiverged(
                f"loss is {loss_sum} at step {self.step + 1}: training stopped without applying this update; "
                f"last good checkpoint: {last or 'none yet'}. Lower lr (now {cfg.lr}), keep grad_clip > 0, "
                "or use dtype=bf16 instead of fp16"
            )
        if self.scaler:
            self.scaler.unscale_(optimizer)
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.loss_value = loss_sum
        self.losses.append(loss_sum)
        dt = time.perf_counter() - t0
        tokens = group.sum_int(sum(int(b["attention_mask"].sum()) for b in micro))
        if group.is_main and (self.step % cfg.log_every == 0 or self.step == self.max_steps):
            record = {
                "step": self.step,
                "loss": loss_sum,
                "lr": lr,
                "tokens": tokens,
                "label_tokens": n_tokens,
                "tokens_per_s": tokens / dt,
                "step_seconds": dt,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
            }
            _append_metrics(self.metrics_path, record)
        return lr, tokens, dt

    def fit_budget(self, start_step: int, seconds_per_step: float, bar: tqdm) -> None:
        cfg = self.cfg
        budget, cap = cfg.time_budget_s, cfg.max_steps
        new = fit_to_time_budget(budget, self.max_steps, cap, start_step, self.step, seconds_per_step)
        if new != self.max_steps:
            bar.write(
                f"time budget {cfg.time_budget_s:.0f}s at {seconds_per_step:.1f}s/step: "
                f"max_steps {self.max_steps} -> {new}"
            )
            self.max_steps = bar.total = new
            bar.refresh()

    def maybe_evaluate(self, bar: tqdm) -> None:
        cfg = self.cfg
        if not (cfg.eval_every and self.step % cfg.eval_every == 0 and (self.eval_examples or self.eval_fn)):
            return
        evaluation: dict[str, Any] = {"step": self.step}
        if self.eval_examples:
            evaluation["eval_loss"] = evaluate_loss(
                self.model,
                self.eval_examples,
                cfg.batch_size,
                self.pad_id,
                self.device,
                self.autocast,
                cfg.eval_batches,
            )
        if self.eval_fn:
            evaluation.update(self.eval_fn(self.model, self.tokenizer))
            self.model.train()
        if self.run_group.is_main:
            _append_metrics(self.metrics_path, evaluation)
        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in evaluation.items()))

    def checkpoint(self) -> Path:
        """Rank 0 writes the whole trainable state (gathered from the ranks), as one process would."""
        extra = {"max_steps": self.max_steps, "world_size": self.run_group.world_size}
        state = TrainState(self.step, self.batches.state_dict(), self.cfg.to_dict(), extra)
        with full_state(self.run_group, self.model, self.optimizer):
            if self.run_group.is_main:
                save_checkpoint(
                    self.plan.output_dir, self.model, self.optimizer, state, self.scaler, keep=self.cfg.keep_checkpoints
                )
        self.run_group.barrier()
        return latest_checkpoint(self.plan.output_dir)
