"""The SFT training loop, top to bottom: set up, (resume), then step until `max_steps`.

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
import signal
import sys
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
from .checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import IGNORE_INDEX, DataStats, Example, LengthGroupedBatches, collate, count_label_tokens, load_examples
from .distributed import Distributed, DistributedPlan, plan_distributed, start_distributed
from .parallel import full_state, wrap_model
from .precision import apply_cpu_precision
from .schedule import lr_at

METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
CONFIG_FILE = "train_config.json"
EXIT_INTERRUPTED = 130
BUDGET_PROBE_STEPS = 3  # steps timed before a time budget may shorten the run (still inside warmup)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a run did: steps reached, last loss, wall time of the loop, peak memory, where it saved."""

    step: int
    loss: float
    train_seconds: float
    peak_memory_mb: float
    output_dir: Path
    adapter_dir: Path | None
    interrupted: bool = False
    data_stats: dict[str, str] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
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
            raise ValueError("dtype='fp16' needs CUDA (it needs a grad scaler); use dtype='bf16' on the CPU")
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


def save_final_adapter(model: nn.Module, output_dir: Path) -> Path:
    from .. import save_adapter

    path = output_dir / ADAPTER_DIR
    save_adapter(model, path)
    return path


def fit_to_time_budget(
    cfg: TrainConfig, cap: int, start_step: int, step: int, seconds_per_step: float, bar: tqdm
) -> None:
    """Set `cfg.max_steps` (at most `cap`) so the run ends within `cfg.time_budget_s` at the measured speed.

    First called while still in warmup: the warmup LRs do not depend on max_steps, so the run is
    the one `max_steps=<new value>` would have given. Later calls (every few steps) follow the
    average speed both ways: down when the machine got slower, up again (to `cap`) when a slow
    start made the first estimate too cautious. Each later change moves the cosine tail a little.
    """
    affordable = min(cap, start_step + int(cfg.time_budget_s / seconds_per_step))  # counted from this start
    new = max(step + 1, affordable)
    if abs(new - cfg.max_steps) > (cfg.max_steps - step) // 10:  # ignore small drifts (it re-checks)
        bar.write(
            f"time budget {cfg.time_budget_s:.0f}s at {seconds_per_step:.1f}s/step: max_steps {cfg.max_steps} -> {new}"
        )
        cfg.max_steps = new
        bar.total = new
        bar.refresh()


class _InterruptFlag:
    """Turns the first SIGINT into a flag checked after each step; a second one aborts at once."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptFlag:
        if threading_is_main():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True
        print("\ninterrupt: finishing this step, saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget what a killed run logged after its last checkpoint."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


# --------------------------------------------------------------------------------- train
def train(
    cfg: TrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    resume: bool = False,
    eval_fn: Callable[[nn.Module, Any], dict[str, float]] | None = None,
) -> TrainResult:
    """Run SFT as configured; pass `model`/`tokenizer` to skip loading (they are prepared here)."""
    # ---- set-up: threads, seeds, device, model, data, optimizer
    run = start_distributed(plan_distributed(cfg))  # checks `distributed` against the launch first
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = run.device
    precision = cfg.precision(device)
    apply_cpu_precision(precision, device, cfg.dtype)
    print(f"precision: {precision.describe()}", file=sys.stderr)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if run.is_main:
        (output_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1), encoding="utf-8")
    metrics_path = output_dir / METRICS_FILE
    if model is None:
        from .. import load_model

        model, tokenizer = load_model(cfg.model, dtype=precision.torch_model_dtype)
    elif tokenizer is None:
        raise ValueError("train(model=...) also needs tokenizer=...")
    prepare(model, cfg, tokenizer, precision.torch_model_dtype)
    model.to(device)
    engine = wrap_model(model, run, precision.dtype)  # the module to call: DDP wrapper, FSDP-sharded model or model
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id

    if not cfg.train_file:
        raise ValueError("config key 'train_file' is empty: point it at a JSONL file")
    train_examples, train_stats = load_examples(cfg.train_file, tokenizer, cfg.max_length)
    eval_examples, eval_stats = ([], DataStats())
    if cfg.eval_file:
        eval_examples, eval_stats = load_examples(cfg.eval_file, tokenizer, cfg.max_length)
    print(f"train data: {train_stats.summary()}", file=sys.stderr)
    batches = LengthGroupedBatches(train_examples, cfg.batch_size, cfg.seed)
    optimizer = build_optimizer(model, cfg)
    autocast, scaler = autocast_context(device, precision.dtype)

    # ---- resume: trainable tensors, optimizer, RNG, data position, step
    step = 0
    if resume:
        ckpt = latest_checkpoint(output_dir)
        if ckpt is None:
            print(f"--resume: no checkpoint in {output_dir}, starting from step 0", file=sys.stderr)
            if run.is_main:
                metrics_path.unlink(missing_ok=True)
        else:
            with full_state(run, model, optimizer, load=True):
                state = load_checkpoint(ckpt, model, optimizer, scaler)
            batches.load_state_dict(state.data)
            step = state.step
            if run.is_main:
                _truncate_metrics(metrics_path, step)
            print(f"resumed from {ckpt} at step {step}", file=sys.stderr)
            run.note_global_batch_change(state.config, state.extra, cfg)
    elif run.is_main:
        metrics_path.unlink(missing_ok=True)
    run.barrier()  # rank 0 has cleaned up the metrics before anyone writes

    def checkpoint() -> Path:
        state = TrainState(step, batches.state_dict(), cfg.to_dict(), {"world_size": run.world_size})
        with full_state(run, model, optimizer):  # whole tensors, as one process holds them
            if run.is_main:
                save_checkpoint(output_dir, model, optimizer, state, scaler, keep=cfg.keep_checkpoints)
        run.barrier()
        return latest_checkpoint(output_dir)

    # ---- the loop
    model.train()
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    losses: list[float] = []
    loss_value = float("nan")
    interrupted = False
    start_step = step
    max_steps_cap = cfg.max_steps  # a time budget moves max_steps below this, never above
    bar = tqdm(
        total=cfg.max_steps, initial=step, disable=not (cfg.progress and run.is_main), desc="train", dynamic_ncols=True
    )
    t_start = time.perf_counter()
    with _InterruptFlag() as interrupt:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(
                step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio
            )
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]

            run.seed_step(cfg.seed, step)
            micro = [collate(b, pad_id) for b in run.step_batches(batches, cfg.grad_accum)]
            loss_sum, n_tokens = accumulate_gradients(engine, micro, device, autocast, scaler, run)
            if not math.isfinite(loss_sum):
                bar.close()
                last = latest_checkpoint(output_dir)
                raise TrainingDiverged(
                    f"loss is {loss_sum} at step {step + 1}: training stopped without applying this update; "
                    f"last good checkpoint: {last or 'none yet'}. Lower lr (now {cfg.lr}), keep grad_clip > 0, "
                    "or use dtype=bf16 instead of fp16"
                )
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = loss_sum
            losses.append(loss_value)

            dt = time.perf_counter() - t0
            tokens = run.sum_int(sum(int(b["attention_mask"].sum()) for b in micro))
            record = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "tokens": tokens,
                "label_tokens": n_tokens,
                "tokens_per_s": tokens / dt,
                "step_seconds": dt,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
            }
            if run.is_main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                _append_metrics(metrics_path, record)
            done = step - start_step
            if cfg.time_budget_s and done >= BUDGET_PROBE_STEPS and done % BUDGET_PROBE_STEPS == 0:
                fit_to_time_budget(cfg, max_steps_cap, start_step, step, (time.perf_counter() - t_start) / done, bar)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
            bar.update(1)

            if cfg.eval_every and step % cfg.eval_every == 0 and (eval_examples or eval_fn):
                evaluation: dict[str, Any] = {"step": step}
                if eval_examples:
                    evaluation["eval_loss"] = evaluate_loss(
                        model, eval_examples, cfg.batch_size, pad_id, device, autocast, cfg.eval_batches
                    )
                if eval_fn:
                    evaluation.update(eval_fn(model, tokenizer))
                    model.train()
                if run.is_main:
                    _append_metrics(metrics_path, evaluation)
                bar.write(
                    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in evaluation.items())
                )

            if run.any(interrupt.raised):  # every rank stops after the same step
                interrupted = True
                bar.write(f"saved {checkpoint()}; resume with --resume")
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoint()
    bar.close()
    train_seconds = time.perf_counter() - t_start

    # ---- the end: a last checkpoint and the adapter
    adapter_dir = None
    if not interrupted:
        checkpoint()
        with full_state(run, model):
            adapter_dir = save_final_adapter(model, output_dir) if run.is_main else output_dir / ADAPTER_DIR
        run.barrier()
    return TrainResult(
        step=step,
        loss=loss_value,
        train_seconds=train_seconds,
        peak_memory_mb=peak_memory_mb(device),
        output_dir=output_dir,
        adapter_dir=adapter_dir,
        interrupted=interrupted,
        data_stats={"train": train_stats.summary(), "eval": eval_stats.summary() if eval_examples else "none"},
        losses=losses,
        precision=precision.describe(),
    )
