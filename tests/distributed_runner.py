"""Runs training jobs on every rank of a torchrun launch, for tests/test_train_distributed.py.

Usage: torchrun --nproc-per-node N tests/distributed_runner.py JOBS.json

JOBS.json is a list of {"config": path, "resume": bool, "kill_at_step": int | null, "probe": path | null}.
The jobs run one after another in the same process group. A job with kill_at_step SIGKILLs every
rank when step `kill_at_step` + 1 starts (after step kill_at_step's checkpoint). A job with
"probe" writes, per rank, the bytes of the frozen base this rank holds and whether the weights
gathered for the forward passes were freed afterwards, to probe-<rank>.json in that folder.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora_kernels.train.trainer as trainer
from qlora_kernels.nn.packed_weight import ROW_FIELDS
from qlora_kernels.nn.shardable import ShardableQuantLinear
from qlora_kernels.train import TrainConfig, train
from qlora_kernels.train.parallel import local_frozen_bytes


def kill_when_step_starts(kill_at: int) -> None:
    real_lr_at = trainer.lr_at

    def lr_at(step: int, **kwargs):
        if step == kill_at:  # steps are counted from 0 here: step `kill_at` + 1 is starting
            os.kill(os.getpid(), signal.SIGKILL)
        return real_lr_at(step, **kwargs)

    trainer.lr_at = lr_at


def run_probed(cfg: TrainConfig, folder: Path, resume: bool) -> None:
    gathered: list[torch.Tensor] = []

    def record(module, args):
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and torch.is_grad_enabled():  # training forwards, not preparation's no-grad check
            compute_dtypes.add(str(lora_a.weight.dtype))  # as FSDP gathered it for this forward
        layer = getattr(module, "base", module)  # LoRALinear calls the fused op on its base's weight
        if isinstance(layer, ShardableQuantLinear) and id(layer) not in seen:
            seen.add(id(layer))
            fields = layer.packed_weight.fields  # the all-gathered row tensors (shared tables stay resident)
            gathered.extend(t for name, t in fields.items() if name in ROW_FIELDS)
            rows.append((layer.packed_weight.rows, layer.out_features))

    seen: set[int] = set()
    compute_dtypes: set[str] = set()
    rows: list[tuple[int, int]] = []
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=cfg.torch_model_dtype)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(cfg, model=model, tokenizer=tokenizer, resume=resume)
    finally:
        handle.remove()
    rank = int(os.environ.get("RANK", "0"))
    report = {
        "frozen_bytes": local_frozen_bytes(model),
        "quantized_bytes": local_frozen_bytes(model, quantized_only=True),
        "forward_rows_full": all(r == n for r, n in rows) and bool(rows),
        "gathered_freed": all(t.untyped_storage().nbytes() == 0 for t in gathered),
        "sharded_layers": sum(isinstance(m, ShardableQuantLinear) for m in model.modules()),
        "lora_compute_dtypes": sorted(compute_dtypes),
        "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"probe-{rank}.json").write_text(json.dumps(report), encoding="utf-8")


def main(jobs_file: str) -> int:
    for job in json.loads(Path(jobs_file).read_text(encoding="utf-8")):
        cfg = TrainConfig.from_file(job["config"])
        if job.get("kill_at_step"):
            kill_when_step_starts(job["kill_at_step"])
        if job.get("probe"):
            run_probed(cfg, Path(job["probe"]), job.get("resume", False))
        else:
            train(cfg, resume=job.get("resume", False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
