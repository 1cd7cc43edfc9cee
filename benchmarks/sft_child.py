"""One SFT run in a fresh process: our trainer or TRL's `SFTTrainer` + PEFT, timed and measured.

Run by `benchmarks.sft` as ``python -m benchmarks.sft_child '<json spec>'``; prints one JSON line.
A fresh process per run makes the peak resident set size (RSS) belong to that run alone. Two
peaks are reported:

* ``peak_rss_mb``: the process's high-water mark, model load and quantization included;
* ``train_peak_rss_mb``: the high-water mark from the start of training (after the model is
  loaded, prepared and the data tokenized) to the end of the last step. Linux resets the mark
  when "5" is written to ``/proc/self/clear_refs``; both runners reset it at the same point,
  just before their first step.

Throughput counts the non-padding tokens of every step after the first `warmup_steps`
(which allocate buffers and optimizer state) over the wall time of those steps.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux); False where the kernel does not allow it."""
    _PEAK_BEFORE_RESET[0] = max(_PEAK_BEFORE_RESET[0], peak_rss_mb())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM of this process in MiB (since the last reset), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_PEAK_BEFORE_RESET = [0.0]


def process_peak_rss_mb() -> float:
    """The process's peak RSS since exec in MiB: the larger of VmHWM now and VmHWM when it was reset.

    Not ru_maxrss: Linux carries that over from the parent across fork + exec.
    """
    return max(_PEAK_BEFORE_RESET[0], peak_rss_mb())


def throughput(step_tokens: list[int], step_seconds: list[float], warmup_steps: int) -> dict[str, float]:
    """tokens/s and mean step time over the steps after the warm-up ones."""
    tokens, seconds = step_tokens[warmup_steps:], step_seconds[warmup_steps:]
    if not seconds:
        raise ValueError(f"need more than {warmup_steps} steps to measure throughput, got {len(step_seconds)}")
    return {
        "tokens_per_s": sum(tokens) / sum(seconds),
        "step_seconds": sum(seconds) / len(seconds),
        "measured_steps": len(seconds),
        "tokens_per_step": sum(tokens) / len(tokens),
    }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- our trainer
def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Our trainer (`qlora_kernels.train.train`) with spec's method/quant; optional held-out scoring."""
    import torch

    import qlora_kernels as qk
    from qlora_kernels.train import TrainConfig, train
    from qlora_kernels.train import trainer as trainer_module

    settings = {
        "model": "smollm2-135m-instruct",
        "model_dtype": spec.get("model_dtype", "auto"),
        "method": spec["method"],
        "quant": spec.get("quant", "nf4"),
        "r": 16,
        "alpha": 32.0,
        "target_modules": "all-linear",
        "train_file": spec["train_file"],
        "max_length": spec["max_length"],
        "max_steps": spec["steps"],
        "batch_size": spec["batch_size"],
        "lr": spec.get("lr", 1e-3),
        "warmup_steps": spec.get("lr_warmup_steps", 2),
        "dtype": spec.get("dtype", "auto"),
        "seed": 0,
        "save_every": 0,
        "progress": False,
        "output_dir": spec["output_dir"],
        **spec.get("extra", {}),
    }
    cfg = TrainConfig.from_dict(settings)
    precision = cfg.precision()
    model, tokenizer = qk.load_model(cfg.model, dtype=precision.torch_model_dtype)
    after_load = process_peak_rss_mb()
    info: dict[str, Any] = {}

    # Reset the RSS high-water mark where the loop starts: `build_optimizer` runs after the model
    # is prepared (quantized, adapters attached) and the data tokenized, right before step 1.
    original_build = trainer_module.build_optimizer

    def build_and_reset(model_, cfg_):
        counts = qk.count_parameters(model_)
        info["trainable_params"], info["total_params"] = counts[0], counts[1]
        optimizer = original_build(model_, cfg_)
        info["peak_reset"] = reset_peak_rss()
        return optimizer

    trainer_module.build_optimizer = build_and_reset
    result = train(cfg, model=model, tokenizer=tokenizer)
    train_peak = peak_rss_mb()
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "step_seconds" in r]
    out: dict[str, Any] = {
        **throughput([r["tokens"] for r in steps], [r["step_seconds"] for r in steps], spec["warmup_steps"]),
        "steps": result.step,
        "final_loss": result.loss,
        "train_peak_rss_mb": train_peak,
        "peak_rss_mb": process_peak_rss_mb(),
        "after_load_rss_mb": after_load,
        "adapter_bytes": dir_bytes(result.adapter_dir) if result.adapter_dir else None,
        "threads": torch.get_num_threads(),
        "precision": result.precision,
        **info,
    }
    if spec.get("eval_n"):
        out.update(score_held_out(model, tokenizer, spec["eval_n"]))
    return out


def score_held_out(model, tokenizer, n_eval: int) -> dict[str, Any]:
    """Greedy generation on the expense task's held-out lists: format and exact-sum fractions."""
    from qlora_kernels.train import expenses, generate, score, token_budget

    _, held_out = expenses.make_splits(0, n_eval, seed=0)
    conversations = [
        [
            {"role": "user", "content": expenses.prompt(e)},
            {"role": "assistant", "content": expenses.completion(e, "worked")},
        ]
        for e in held_out
    ]
    start = time.perf_counter()
    outputs = generate(
        model, tokenizer, [c[:-1] for c in conversations], token_budget(tokenizer, conversations), batch_size=n_eval
    )
    scores = score(outputs, [c[-1]["content"] for c in conversations], expenses.parse_total)
    return {
        "format": scores.format,
        "exact": scores.exact,
        "n_eval": scores.n,
        "eval_seconds": time.perf_counter() - start,
        "sample_output": outputs[0],
    }


# ------------------------------------------------------------------------- TRL + PEFT (+ bnb)
def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL `SFTTrainer` + PEFT LoRA (r 16, alpha 32, all linears) on the same data; NF4 via bitsandbytes if asked."""
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import qlora_kernels as qk

    model, tokenizer = qk.load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    if spec.get("quant") == "nf4":
        # GGUF weights cannot be loaded straight into bitsandbytes: save a bf16 HF copy, reload quantized.
        folder = Path(tempfile.mkdtemp(prefix="qk-bench-hf-"))
        model.save_pretrained(folder)
        del model
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.bfloat16,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            ),
            device_map="cpu",
        )
    after_load = process_peak_rss_mb()

    records = [json.loads(line) for line in Path(spec["train_file"]).read_text(encoding="utf-8").splitlines() if line]
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in records[: spec["steps"] * spec["batch_size"] * 2]
        ]
    )

    step_tokens: list[int] = []
    step_seconds: list[float] = []
    pad_id = tokenizer.pad_token_id

    class Timer(TrainerCallback):
        """Wall time of each optimizer step and its non-padding tokens; resets the RSS peak at step 1."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.reset = reset_peak_rss()

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.t0)

    def counting(collator):
        def collate(examples):
            batch = collator(examples)
            mask = batch.get("attention_mask")
            step_tokens.append(int(mask.sum()) if mask is not None else int((batch["input_ids"] != pad_id).sum()))
            return batch

        return collate

    output_dir = Path(spec["output_dir"])
    config = SFTConfig(
        output_dir=str(output_dir),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec.get("lr", 1e-3),
        lr_scheduler_type="cosine",
        warmup_steps=spec.get("lr_warmup_steps", 2),
        max_grad_norm=1.0,
        max_length=spec["max_length"],
        bf16=True,
        use_cpu=True,
        gradient_checkpointing=False,  # TRL's default is True; ours is off: compare like with like
        completion_only_loss=True,
        packing=False,
        padding_free=False,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
        callbacks=[Timer()],
    )
    trainer.data_collator = counting(trainer.data_collator)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = trainer.train()
    train_peak = peak_rss_mb()
    # Each step's batch is collated before the step begins; the dataloader may prefetch one more.
    step_tokens = step_tokens[: len(step_seconds)]
    trainer.model.save_pretrained(output_dir / "adapter")
    return {
        **throughput(step_tokens, step_seconds, spec["warmup_steps"]),
        "steps": len(step_seconds),
        "final_loss": float(result.training_loss),
        "train_peak_rss_mb": train_peak,
        "peak_rss_mb": process_peak_rss_mb(),
        "after_load_rss_mb": after_load,
        "adapter_bytes": dir_bytes(output_dir / "adapter"),
        "trainable_params": trainable,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    runner = {"ours": run_ours, "trl": run_trl}[spec["runner"]]
    result = runner(spec)
    print(json.dumps({**spec, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
