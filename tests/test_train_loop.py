"""The loop on a tiny random Llama: loss goes down, token-normalised accumulation, config, schedule, NaN stop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_support import load_tokenizer, tiny_model_dir, write_expense_data

import qlora_kernels as qk
from qlora_kernels.train import ConfigError, TrainConfig, TrainingDiverged, latest_checkpoint, lr_at, train
from qlora_kernels.train import trainer as trainer_module
from qlora_kernels.train.data import collate, load_examples
from qlora_kernels.train.trainer import accumulate_gradients


def _config(tmp_path, **overrides) -> TrainConfig:
    train_file, eval_file = write_expense_data(tmp_path / "data")
    settings = {
        "model": str(tiny_model_dir()),
        "method": "lora",
        "r": 4,
        "alpha": 8.0,
        "train_file": str(train_file),
        "eval_file": str(eval_file),
        "max_steps": 12,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 1,
        "output_dir": str(tmp_path / "run"),
        "progress": False,
        "max_length": 256,
    }
    return TrainConfig.from_dict({**settings, **overrides})


def test_tiny_llama_trains_and_loss_goes_down(tmp_path):
    cfg = _config(tmp_path, eval_every=12, grad_accum=2, method="full", lr=3e-3)  # LoRA r=4 on width 32 is slow
    result = train(cfg)
    assert result.step == 12 and not result.interrupted
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 1.0, f"loss did not go down: {result.losses}"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert {"lr", "tokens_per_s", "grad_norm"} <= set(records[0]) and "eval_loss" in records[-1]
    assert any(result.adapter_dir.iterdir())
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-000012"


def test_accumulating_four_micro_batches_gives_the_full_batch_gradient():
    model, tokenizer = qk.load_model(tiny_model_dir())
    qk.prepare_model(model, "lora", r=4, target_modules="all-linear", compute_dtype=torch.float32)
    with torch.no_grad():  # B = 0 at init would make most gradients trivially equal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        train_file, _ = write_expense_data(Path(d), n_train=8)
        examples, _ = load_examples(train_file, tokenizer, 256)
    lengths = {len(e.input_ids) for e in examples}
    assert len(lengths) > 1, "the micro-batches must have different lengths and completion counts"
    pad = tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(micro):
        model.zero_grad()
        accumulate_gradients(model, micro, torch.device("cpu"))
        return [p.grad.clone() for p in params]

    full = grads([collate(examples, pad)])
    split = grads([collate(examples[i : i + 2], pad) for i in range(0, 8, 2)])
    for a, b in zip(full, split, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # Averaging per micro-batch (the transformers #34191 bug) would give a different gradient.
    model.zero_grad()
    for i in range(0, 8, 2):
        batch = collate(examples[i : i + 2], pad)
        (trainer_module.completion_loss_sum(model, batch) / (4 * (batch["labels"][:, 1:] != -100).sum())).backward()
    assert not all(torch.allclose(p.grad, a, rtol=1e-4, atol=1e-6) for p, a in zip(params, full, strict=True))


@pytest.mark.parametrize("method", ["lora", "full", "prompt"])
def test_fused_head_loss_equals_the_logits_path(method):
    """The fused head + loss (completion tokens only) gives the loss and gradients of full logits."""
    model, tokenizer = qk.load_model(tiny_model_dir())
    opts = {"r": 4, "target_modules": "all-linear"} if method == "lora" else {}
    opts = {"num_virtual_tokens": 3} if method == "prompt" else opts
    qk.prepare_model(model, method, compute_dtype=torch.float32, **opts)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    assert trainer_module.fused_head(model) is model.lm_head
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        train_file, _ = write_expense_data(Path(d), n_train=4)
        examples, _ = load_examples(train_file, tokenizer, 256)
    batch = collate(examples, tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fused):
        model.zero_grad()
        loss = trainer_module.completion_loss_sum(model, batch, fused=fused)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    (fused_loss, fused_grads), (ref_loss, ref_grads) = loss_and_grads(True), loss_and_grads(False)
    torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-5, atol=0)
    for a, b in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_head_only_replaces_a_plain_linear_head():
    model, _ = qk.load_model(tiny_model_dir())
    qk.prepare_model(model, "lora", r=4, target_modules=["lm_head"], compute_dtype=torch.float32)
    assert trainer_module.fused_head(model) is None  # a LoRA head: the logits path
    model, _ = qk.load_model(tiny_model_dir())
    model.config.final_logit_softcapping = 30.0
    assert trainer_module.fused_head(model) is None


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = _config(tmp_path, save_every=2, max_steps=8)
    real = trainer_module.completion_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(trainer_module, "completion_loss_sum", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*last good checkpoint: .*checkpoint-000004"):
        train(cfg)
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-000004"
    assert not (tmp_path / "run" / "adapter").exists()


def test_schedule_warms_up_then_decays_by_cosine_to_the_floor():
    kw = {"lr": 1e-3, "warmup_steps": 4, "max_steps": 20, "min_lr_ratio": 0.1}
    warm = [lr_at(s, **kw) for s in range(4)]
    assert warm == sorted(warm) and warm[-1] < 1e-3
    assert lr_at(4, **kw) == pytest.approx(1e-3)
    assert lr_at(12, **kw) == pytest.approx(1e-4 + 0.5 * 0.9e-3)
    assert lr_at(20, **kw) == pytest.approx(1e-4) and lr_at(40, **kw) == pytest.approx(1e-4)
    assert all(math.isfinite(lr_at(s, **kw)) for s in range(25))


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: lora\nr: 8\ntrain_file: data/train.jsonl\ntarget_modules: [q_proj, v_proj]\n")
    cfg = TrainConfig.from_file(path, ["lr=3e-4", "max_steps=7", "gradient_checkpointing=true"])
    assert (cfg.method, cfg.r, cfg.lr, cfg.max_steps, cfg.gradient_checkpointing) == ("lora", 8, 3e-4, 7, True)
    assert cfg.train_file == "data/train.jsonl"  # kept as written: relative to the working directory
    assert cfg.target_modules == ["q_proj", "v_proj"]
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"batch_size": 2}))
    assert TrainConfig.from_file(json_path).batch_size == 2
    with pytest.raises(ConfigError, match="unknown config key.*'lerning_rate'"):
        TrainConfig.from_file(path, ["lerning_rate=1"])
    with pytest.raises(ConfigError, match="'max_steps' expects int"):
        TrainConfig.from_file(path, ["max_steps=many"])
    with pytest.raises(ConfigError, match="'method' must be one of"):
        TrainConfig.from_file(path, ["method=magic"])
    with pytest.raises(ConfigError, match="key=value"):
        TrainConfig.from_file(path, ["lr"])


def test_tokenizer_fixture_pads_with_eos():
    tok = load_tokenizer()
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_time_budget_sets_max_steps_from_the_average_speed_within_the_cap():
    from qlora_kernels.train.trainer import fit_to_time_budget

    steps = fit_to_time_budget(100.0, 80, 80, 0, 3, 2.0)  # 2 s/step: 50 steps fit
    assert steps == 50
    steps = fit_to_time_budget(100.0, steps, 80, 0, 6, 1.9)  # 52 fit: a small drift is ignored
    assert steps == 50
    steps = fit_to_time_budget(100.0, steps, 80, 0, 30, 1.6)  # a slow start: raised again once the average shows it
    assert steps == 62
    steps = fit_to_time_budget(100.0, steps, 80, 0, 33, 1.0)  # 100 would fit, but never past the configured max_steps
    assert steps == 80
    steps = fit_to_time_budget(100.0, steps, 80, 0, 78, 5.0)  # far too slow now: stop after the next step
    assert steps == 79
    assert fit_to_time_budget(100.0, 80, 80, 40, 43, 4.0) == 65  # the budget counts from the resumed step


def test_a_time_budget_leaves_the_callers_config_unchanged(tmp_path, monkeypatch):
    cfg = _config(tmp_path, max_steps=12, time_budget_s=1e-3)  # far too short: the run stops early
    result = train(cfg)
    assert result.step < 12 and result.max_steps == result.step
    assert cfg.max_steps == 12 and cfg.time_budget_s == 1e-3
