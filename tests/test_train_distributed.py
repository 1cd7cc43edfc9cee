"""DDP and FSDP2 on the CPU (gloo, 2 processes under torchrun) against one process with the same global batch.

One process with grad_accum=2 and two ranks with grad_accum=1 take the same 4 examples per step
(batch_size 2). In fp32 the losses agree to LOSS_RTOL_FP32; under bf16 mixed precision (FSDP2
casts parameters to bf16, one process autocasts) to LOSS_RTOL_BF16. Two torchrun launches cover
DDP, FSDP2 (qlora fp32, qlora bf16, adapters bf16), a SIGKILL after step 3, and resuming with
two ranks (FSDP2, DDP) or one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_support import load_tokenizer, tiny_model_dir, write_expense_data

from qlora_kernels.cli import EXIT_USAGE, main
from qlora_kernels.train import TrainConfig, latest_checkpoint, train
from qlora_kernels.train.distributed import Distributed, DistributedPlan, plan_distributed
from qlora_kernels.train.parallel import local_frozen_bytes

RUNNER = Path(__file__).with_name("distributed_runner.py")
STEPS = 5
KILL_AT = 3
# One process sums two micro-batches' gradients; two ranks all-reduce one each, which changes
# only the order of summation. Under bf16, FSDP2 casts the parameters to bf16 before the forward
# where one process casts them inside each op (autocast, and the fused LoRA op), the same values.
# Measured here: bit-identical on the tiny Llama (fp32 and bf16) and on SmolLM2 (bf16); an
# fp32 SmolLM2 run was 5.6e-7 apart (this process multiplies on 2 threads, the ranks on 1). The
# tolerances leave room for summation order only: a wrong loss normalisation is off by 0.5.
LOSS_RTOL_FP32 = 1e-5
LOSS_RTOL_BF16 = 1e-4


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _torchrun(jobs: list[dict], jobs_file: Path) -> subprocess.Popen:
    """Start two ranks running `jobs` (see distributed_runner.py), logging to JOBS.log; `_wait` collects them."""
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    with jobs_file.with_suffix(".log").open("w") as log:
        return subprocess.Popen([*cmd, str(RUNNER), str(jobs_file)], env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(launch: subprocess.Popen, jobs_file: Path) -> tuple[int, str]:
    """(exit code, log) of a launch."""
    try:
        launch.wait(timeout=600)
    finally:
        if launch.poll() is None:
            launch.kill()
    return launch.returncode, jobs_file.with_suffix(".log").read_text()


def _single(cfg: TrainConfig, resume: bool = False):
    """One process, in this one; returns the trained model for measuring."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=cfg.torch_model_dtype)
    train(cfg, model=model, tokenizer=load_tokenizer(), resume=resume)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every run of this module: one process in this one, two ranks in two torchrun launches."""
    root = tmp_path_factory.mktemp("distributed")
    train_file, _ = write_expense_data(root / "data", n_train=24)
    base = {
        "model": str(tiny_model_dir()),
        "method": "qlora",
        "r": 4,
        "alpha": 8.0,
        "train_file": str(train_file),
        "max_steps": STEPS,
        "batch_size": 2,
        "lr": 5e-3,
        "warmup_steps": 1,
        "progress": False,
        "seed": 1,
        "dtype": "fp32",
        "model_dtype": "fp32",
    }
    two_ranks = {"grad_accum": 1}
    bf16 = {"dtype": "bf16", "model_dtype": "bf16"}
    adapter = {"method": "adapter", "bottleneck": 8}
    variants = {
        "single": {"grad_accum": 2},
        "single_bf16": {"grad_accum": 2, **bf16},
        "single_adapter_bf16": {"grad_accum": 2, **bf16, **adapter},
        "ddp": {**two_ranks, "distributed": "ddp"},
        "fsdp": {**two_ranks, "distributed": "fsdp"},
        "fsdp_bf16": {**two_ranks, "distributed": "fsdp", **bf16},
        "fsdp_adapter_bf16": {**two_ranks, "distributed": "fsdp", **bf16, **adapter},
        "killed": {**two_ranks, "distributed": "fsdp", "save_every": KILL_AT},
        "resume_fsdp": {**two_ranks, "distributed": "fsdp"},
        "resume_ddp": {**two_ranks, "distributed": "ddp"},
        "resume_single": {"grad_accum": 2},
    }
    configs = {}
    for name, extra in variants.items():
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({**base, **extra, "output_dir": str(root / name)}))

    # The one-process runs train here while the first launch's ranks start (they begin by importing).
    first = _torchrun(
        [
            {"config": str(configs["ddp"])},
            {"config": str(configs["fsdp"]), "probe": str(root / "probe")},
            {"config": str(configs["fsdp_bf16"]), "probe": str(root / "probe_bf16")},
            {"config": str(configs["fsdp_adapter_bf16"])},
            {"config": str(configs["killed"]), "kill_at_step": KILL_AT},
        ],
        root / "jobs-1.json",
    )
    single = _single(TrainConfig.from_file(configs["single"]))
    sizes = {"frozen_bytes": local_frozen_bytes(single), "quantized_bytes": local_frozen_bytes(single, True)}
    (root / "single-sizes.json").write_text(json.dumps(sizes))
    for name in ("single_bf16", "single_adapter_bf16"):
        _single(TrainConfig.from_file(configs[name]))
    code, err = _wait(first, root / "jobs-1.json")
    assert code != 0, "the last job SIGKILLs both ranks"
    assert "Signal 9 (SIGKILL)" in err, err[-3000:]
    for name in ("resume_fsdp", "resume_ddp", "resume_single"):
        shutil.copytree(root / "killed", root / name)

    second = _torchrun(
        [
            {"config": str(configs["resume_fsdp"]), "resume": True},
            {"config": str(configs["resume_ddp"]), "resume": True},
        ],
        root / "jobs-2.json",
    )
    _single(TrainConfig.from_file(configs["resume_single"]), resume=True)
    code, err = _wait(second, root / "jobs-2.json")
    assert code == 0, err[-3000:]
    return root


def _assert_close(got: dict[int, float], expected: dict[int, float], rtol: float) -> None:
    assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
    worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)
    print(f"{len(expected)} steps, worst relative loss difference {worst:.2e} (tolerance {rtol:.0e})")
    assert worst <= rtol, {s: (got[s], expected[s]) for s in expected}


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_the_same_global_batch_fp32(runs, engine):
    expected = _losses(runs / "single")
    assert sorted(expected) == list(range(1, STEPS + 1))
    _assert_close(_losses(runs / engine), expected, LOSS_RTOL_FP32)
    assert (runs / engine / "adapter" / "adapter_model.safetensors").is_file()
    assert latest_checkpoint(runs / engine).name == f"checkpoint-{STEPS:06d}"


@pytest.mark.parametrize("method", ["qlora", "adapter"])
def test_fsdp_with_bf16_mixed_precision_equals_one_process_in_bf16(runs, method):
    suffix = "bf16" if method == "qlora" else "adapter_bf16"
    _assert_close(_losses(runs / f"fsdp_{suffix}"), _losses(runs / f"single_{suffix}"), LOSS_RTOL_BF16)


def test_fsdp_mixed_precision_keeps_fp32_masters_and_computes_in_bf16(runs):
    for rank in (0, 1):
        bf16 = json.loads((runs / "probe_bf16" / f"probe-{rank}.json").read_text())
        assert bf16["trainable_dtypes"] == ["torch.float32"], bf16  # the sharded LoRA masters
        assert bf16["lora_compute_dtypes"] == ["torch.bfloat16"], bf16  # what FSDP2 gathers for the forward
        fp32 = json.loads((runs / "probe" / f"probe-{rank}.json").read_text())
        assert fp32["lora_compute_dtypes"] == ["torch.float32"], fp32


def test_fsdp_adapter_files_equal_one_process(runs):
    from safetensors.torch import load_file

    ours = load_file(runs / "fsdp" / "adapter" / "adapter_model.safetensors")
    single = load_file(runs / "single" / "adapter" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(single)
    worst = max(float((ours[k] - single[k]).abs().max()) for k in single)
    assert worst <= 1e-6, worst


def test_fsdp_shards_the_quantized_base_and_frees_what_it_gathers(runs):
    single = json.loads((runs / "single-sizes.json").read_text())
    for rank in (0, 1):
        probe = json.loads((runs / "probe" / f"probe-{rank}.json").read_text())
        assert probe["sharded_layers"] == 14  # 7 projections x 2 layers, all quantized and sharded
        assert probe["forward_rows_full"], "each layer's weight is gathered whole for its forward"
        assert probe["gathered_freed"], "the gathered weights are freed after use"
        packed = probe["quantized_bytes"] / single["quantized_bytes"]
        frozen = probe["frozen_bytes"] / single["frozen_bytes"]
        print(f"rank {rank}: packed base {packed:.3f}x, all frozen tensors {frozen:.3f}x of one process")
        assert 0.45 <= packed <= 0.55, packed  # half the rows, plus the replicated NF4 tables and metadata
        assert 0.45 <= frozen <= 0.55, frozen


@pytest.mark.parametrize("resumed", ["resume_fsdp", "resume_ddp", "resume_single"])
def test_resume_after_a_kill_at_step_3_equals_the_uninterrupted_run(runs, resumed):
    killed = _losses(runs / "killed")
    assert sorted(killed) == list(range(1, KILL_AT + 1)), "the killed run logged steps 1-3 only"
    assert latest_checkpoint(runs / "killed").name == f"checkpoint-{KILL_AT:06d}"
    _assert_close(_losses(runs / resumed), _losses(runs / "single"), LOSS_RTOL_FP32)


# ------------------------------------------------------------------ set-up checks (no launch)
LAUNCHED = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


@pytest.mark.parametrize(
    ("settings", "env", "message"),
    [
        ({"distributed": "fsdp"}, {}, "needs several processes, but WORLD_SIZE is unset"),
        ({"distributed": "ddp"}, {}, "accelerate launch --multi_gpu --num_processes N"),
        ({"distributed": "ddp"}, {"WORLD_SIZE": "1"}, "needs several processes, but WORLD_SIZE is 1"),
        ({}, LAUNCHED, "WORLD_SIZE=2 but config key 'distributed' is 'none'"),
        ({"distributed": "fsdp"}, {"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"distributed": "ddp"}, {**LAUNCHED, "RANK": "2"}, "RANK=2 is outside [0, WORLD_SIZE=2)"),
        ({"distributed": "fsdp", "dtype": "fp16"}, LAUNCHED, "set dtype to bf16"),
        ({"distributed": "auto", "time_budget_s": 60.0}, LAUNCHED, "time_budget_s is not supported"),
        ({"distributed": "ddp"}, {"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ],
)
def test_bad_setups_exit_2_before_the_model_loads(tmp_path, monkeypatch, capsys, settings, env, message):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = tmp_path / "c.yaml"
    missing_model = str(tmp_path / "no-such-model")  # loading it would fail with another message
    config.write_text(yaml.safe_dump({"model": missing_model, "train_file": "x.jsonl", **settings}))
    assert main(["train", "--config", str(config)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "key"),
    [({"distributed": "deepspeed"}, "distributed"), ({"distributed": "fsdp", "method": "dora"}, "method")],
)
def test_unknown_modes_and_methods_are_config_errors(tmp_path, capsys, settings, key):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train_file": "x.jsonl", **settings}))
    assert main(["train", "--config", str(config)]) == EXIT_USAGE
    assert f"config key '{key}' must be one of" in capsys.readouterr().err


def test_auto_picks_ddp_only_when_launched_on_several_ranks():
    cfg = TrainConfig(distributed="auto")
    assert plan_distributed(cfg, {}).mode == "none"
    assert plan_distributed(cfg, {"WORLD_SIZE": "1"}).mode == "none"
    assert plan_distributed(cfg, {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == DistributedPlan("ddp", 4, 3, 1)


def test_ranks_split_each_step_of_the_shared_batch_stream():
    stream = list(range(24))
    per_rank = []
    for rank in range(3):
        run = Distributed(DistributedPlan("ddp", 3, rank))
        batches = iter(stream)
        per_rank.append([run.step_batches(batches, 2) for _ in range(4)])
    one = Distributed(DistributedPlan("none"))
    batches = iter(stream)
    for step in range(4):
        whole = one.step_batches(batches, 6)
        assert sorted(b for rank in per_rank for b in rank[step]) == whole
        assert per_rank[1][step] == whole[1::3]
    assert Distributed(DistributedPlan("ddp", 3, 0)).loss_divisor(12) == 4.0
    assert one.loss_divisor(0) == 1.0


@pytest.mark.slow
def test_fsdp_qlora_on_smollm2_equals_one_process_and_halves_the_packed_base(smollm2, tmp_path):
    """QLoRA (NF4) on SmolLM2-135M under bf16 mixed precision: 2 steps of 2 short examples."""
    model, tokenizer = smollm2
    folder = tmp_path / "smollm2"  # the ranks load this copy: faster than decoding the GGUF file twice
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    train_file, _ = write_expense_data(tmp_path / "data", n_train=4, style="answer")
    base = {
        "model": str(folder),
        "method": "qlora",
        "r": 8,
        "train_file": str(train_file),
        "max_steps": 2,
        "batch_size": 1,
        "lr": 1e-3,
        "warmup_steps": 1,
        "progress": False,
        "dtype": "bf16",
        "model_dtype": "bf16",
    }
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text(yaml.safe_dump({**base, "grad_accum": 1, "distributed": "fsdp", "output_dir": str(tmp_path / "f")}))
    launch = _torchrun([{"config": str(fsdp), "probe": str(tmp_path / "probe")}], tmp_path / "jobs.json")
    # Loaded as the ranks load it (a bf16 load keeps the rotary tables in fp32; .to(bf16) would not).
    single = _single(TrainConfig.from_dict({**base, "grad_accum": 2, "output_dir": str(tmp_path / "s")}))
    code, log = _wait(launch, tmp_path / "jobs.json")
    assert code == 0, log[-3000:]
    _assert_close(_losses(tmp_path / "f"), _losses(tmp_path / "s"), LOSS_RTOL_BF16)
    for rank in (0, 1):
        probe = json.loads((tmp_path / "probe" / f"probe-{rank}.json").read_text())
        assert probe["sharded_layers"] == 30 * 7 and probe["gathered_freed"]
        assert probe["trainable_dtypes"] == ["torch.float32"] and probe["lora_compute_dtypes"] == ["torch.bfloat16"]
        ratio = probe["quantized_bytes"] / local_frozen_bytes(single, quantized_only=True)
        print(f"SmolLM2 rank {rank}: packed base {ratio:.3f}x of one process")
        assert 0.49 <= ratio <= 0.51, ratio


def test_a_resume_that_changes_the_global_batch_says_so(capsys):
    saved = {"batch_size": 2, "grad_accum": 1}
    two_ranks = {"world_size": 2}
    Distributed(DistributedPlan("none")).note_global_batch_change(
        saved, two_ranks, TrainConfig(batch_size=2, grad_accum=2)
    )
    assert capsys.readouterr().err == ""  # 2 ranks x 1 = 1 rank x 2
    Distributed(DistributedPlan("ddp", 4, 0)).note_global_batch_change(saved, two_ranks, TrainConfig(batch_size=2))
    assert "written with 4 examples per step" in capsys.readouterr().err
    Distributed(DistributedPlan("ddp", 4, 1)).note_global_batch_change(saved, two_ranks, TrainConfig(batch_size=2))
    assert capsys.readouterr().err == ""  # rank 0 speaks for all
