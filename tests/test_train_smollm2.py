"""End to end on the real model: QLoRA NF4 on SmolLM2-135M-Instruct for a handful of steps (slow, run in CI)."""

from __future__ import annotations

import json

import pytest
from train_support import write_expense_data

from qlora_kernels.train import TrainConfig, train


@pytest.mark.slow
def test_qlora_smollm2_trains_a_few_steps_and_saves_its_adapter(tmp_path):
    train_file, _ = write_expense_data(tmp_path / "data", n_train=16, style="answer")
    cfg = TrainConfig.from_dict(
        {
            "model": "smollm2-135m-instruct",
            "model_dtype": "bf16",
            "method": "qlora",
            "quant": "nf4",
            "r": 8,
            "alpha": 16.0,
            "target_modules": ["q_proj", "v_proj"],
            "train_file": str(train_file),
            "max_steps": 3,
            "batch_size": 2,
            "lr": 1e-3,
            "warmup_steps": 0,
            "output_dir": str(tmp_path / "run"),
            "progress": False,
        }
    )
    result = train(cfg)
    assert result.step == 3 and all(0 < loss < 20 for loss in result.losses)
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and (result.adapter_dir / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
