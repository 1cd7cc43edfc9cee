"""One rank of a distributed SFT measurement (run by `benchmarks.distributed` under torchrun).

``python -m torch.distributed.run --standalone --nproc-per-node N -m benchmarks.distributed_child '<json spec>'``
(or plain ``python -m benchmarks.distributed_child '<spec>'`` for one process). Each rank writes
``rank-<r>.json`` into the spec's output_dir: its peak RSS during training (reset right before
step 1, after the model is loaded, prepared, sharded and the data tokenized), its process peak
RSS, and the bytes of the frozen base it holds. Rank 0 also writes the throughput, from the
trainer's metrics (global tokens per step over the step's wall time, after the warm-up steps).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.sft_child import peak_rss_mb, process_peak_rss_mb, reset_peak_rss, throughput


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import qlora_kernels as qk
    from qlora_kernels.train import TrainConfig, train
    from qlora_kernels.train import trainer as trainer_module
    from qlora_kernels.train.parallel import local_frozen_bytes

    cfg = TrainConfig.from_dict(spec["config"])
    model, tokenizer = qk.load_model(cfg.model, dtype=cfg.torch_model_dtype)
    info: dict[str, Any] = {}
    original_build = trainer_module.build_optimizer

    def build_and_reset(model_, cfg_):  # runs after prepare + wrap_model (FSDP has sharded), before step 1
        optimizer = original_build(model_, cfg_)
        info["peak_reset"] = reset_peak_rss()
        return optimizer

    trainer_module.build_optimizer = build_and_reset
    try:
        train(cfg, model=model, tokenizer=tokenizer)
    finally:
        trainer_module.build_optimizer = original_build
    result = {
        "rank": int(os.environ.get("RANK", "0")),
        "train_peak_rss_mb": peak_rss_mb(),
        "process_peak_rss_mb": process_peak_rss_mb(),
        "frozen_base_mb": local_frozen_bytes(model) / 2**20,
        "packed_base_mb": local_frozen_bytes(model, quantized_only=True) / 2**20,
        **info,
    }
    if result["rank"] == 0:
        records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "tokens" in r]
        result.update(throughput([r["tokens"] for r in steps], [r["step_seconds"] for r in steps], spec["warmup"]))
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    result = run(spec)
    out = Path(spec["config"]["output_dir"]) / f"rank-{result['rank']}.json"
    out.write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
