"""The ecosystem path on SmolLM2: transformers loading and TRL + PEFT training, our quantizer vs bitsandbytes.

Two tables, every measurement in a fresh process (its peak RSS is its own), repeated in
interleaved rounds (ours, peer, ours, peer, ...) so a busy neighbour slows both alike:

* **load**: ``AutoModelForCausalLM.from_pretrained(<SmolLM2 saved as bf16 safetensors in 64 MB
  shards>, quantization_config=...)`` with `QLoRAKernelsConfig` nf4 / int4 / int8, bitsandbytes
  NF4 and no quantization. Peak RSS while loading is the RSS high-water mark during the call
  minus the RSS just before it (imports and the model class already loaded), split by sampling
  into anonymous memory and file-backed pages of the mapped shards. The bound of issue 14:
  peak <= 1.3 x (loaded model + largest shard), the loaded model counted as the bytes of its
  distinct tensors.
* **train**: TRL ``SFTTrainer`` + PEFT LoRA (r 16, alpha 32, all linear layers) on the expense
  task, the model loaded through our quantizer (NF4, PEFT layers registered with
  `qlora_kernels.integrations.peft`) or through bitsandbytes NF4 (double quant, bf16 compute);
  same data, batch, length and steps; bf16 autocast; tokens/s over the steps after the warm-up
  ones and the RSS high-water mark from the first step on (as `benchmarks.sft`).

Run from a source checkout: ``python -m benchmarks.ecosystem [--quick] [--rounds N] [--out DIR]``;
writes ``ecosystem.json`` and ``ecosystem.md``. Figures taken on a shared machine are provisional.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.sft import run_json_child

SHARD_SIZE = "64MB"
LOAD_RUNS = ["qk-nf4", "qk-int4", "qk-int8", "bnb-nf4", "dense-bf16"]
TRAIN_RUNS = ["qk-nf4", "bnb-nf4"]
TRAIN = {"batch_size": 8, "max_length": 256, "steps": 6, "warmup_steps": 2}
QUICK_TRAIN = {"batch_size": 2, "max_length": 256, "steps": 4, "warmup_steps": 1}
BOUND = 1.3


# --------------------------------------------------------------------------------------- children
def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def _quantization_config(run: str):
    import torch
    from transformers import BitsAndBytesConfig

    import qlora_kernels as qk

    if run.startswith("qk-"):
        return {"quantization_config": qk.QLoRAKernelsConfig(run.removeprefix("qk-"))}
    if run == "bnb-nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        return {"quantization_config": config, "device_map": "cpu"}
    return {}


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def child_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of one quantized (or dense) from_pretrained of the sharded checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.sft_child import peak_rss_mb, reset_peak_rss

    folder = Path(spec["folder"])
    extra = _quantization_config(spec["run"])
    with torch.device("meta"):  # imports the model class, so its import does not count as loading
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    before = _status_kb()
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = _status_kb()
            for key in peaks:
                peaks[key] = max(peaks[key], now[key] - before[key])
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    reset = reset_peak_rss()
    sampler.start()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, **extra)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    shards = sorted(p.stat().st_size for p in folder.glob("*.safetensors"))
    model_mb = _tensor_bytes(model) / 2**20
    largest_mb = shards[-1] / 2**20
    peak_mb = peak_rss_mb() - before["VmRSS"] / 1024
    return {
        "load_seconds": seconds,
        "model_mb": model_mb,
        "largest_shard_mb": largest_mb,
        "checkpoint_mb": sum(shards) / 2**20,
        "peak_load_rss_mb": peak_mb,
        "peak_anon_mb": peaks["RssAnon"] / 1024,
        "peak_file_mb": peaks["RssFile"] / 1024,
        "bound_mb": BOUND * (model_mb + largest_mb),
        "peak_reset": reset,
    }


def _dataset(n: int):
    from datasets import Dataset

    from qlora_kernels.train import expenses

    train, _ = expenses.make_splits(n, 10, seed=0)
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": expenses.prompt(e)}],
                "completion": [{"role": "assistant", "content": expenses.completion(e, "worked")}],
            }
            for e in train
        ]
    )


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL SFTTrainer + PEFT LoRA on a model loaded through our quantizer or bitsandbytes."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from benchmarks.sft_child import peak_rss_mb, process_peak_rss_mb, reset_peak_rss, throughput

    folder = Path(spec["folder"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **_quantization_config(spec["run"]))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if spec["run"].startswith("qk-"):
        from qlora_kernels.integrations.peft import register_lora_layers

        register_lora_layers(lora, model)
    step_tokens: list[int] = []
    step_seconds: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.reset = reset_peak_rss()

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.t0)

    config = SFTConfig(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_length=spec["max_length"],
        bf16=True,
        use_cpu=True,
        gradient_checkpointing=False,
        completion_only_loss=True,
        packing=False,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=_dataset(spec["steps"] * spec["batch_size"] * 2),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Timer()],
    )
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        step_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    result = trainer.train()
    return {
        **throughput(step_tokens[: len(step_seconds)], step_seconds, spec["warmup_steps"]),
        "final_loss": float(result.training_loss),
        "train_peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb": process_peak_rss_mb(),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------- driver
def save_checkpoint(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors checkpoint in `SHARD_SIZE` shards, with its tokenizer."""
    import torch

    import qlora_kernels as qk

    model, tokenizer = qk.load_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(folder)
    return folder


def run_child(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """One measurement in a fresh process; {"error": ...} instead of raising."""
    return run_json_child(["-m", "benchmarks.ecosystem", "--child"], spec, timeout)


def interleaved(specs: list[dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """Every spec once per round, in order; all rows (with their round)."""
    rows = []
    for i in range(rounds):
        for spec in specs:
            row = run_child({**spec, "round": i})
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Median of each key per run label over the rounds without errors."""
    out = []
    for run in dict.fromkeys(r["run"] for r in rows):
        ok = [r for r in rows if r["run"] == run and "error" not in r]
        summary: dict[str, Any] = {"run": run, "rounds": len(ok)}
        if not ok:
            summary["error"] = next(r["error"] for r in rows if r["run"] == run)
        for key in keys:
            if ok:
                summary[key] = statistics.median(r[key] for r in ok)
        out.append(summary)
    return out


def markdown(load: list[dict[str, Any]], train: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Ecosystem: transformers loading and TRL + PEFT training on SmolLM2-135M",
        "",
        f"Provisional (machine shared, load average {meta['load_average']}); medians of "
        f"{meta['rounds']} interleaved rounds; `python -m benchmarks.ecosystem`. Commit {meta['git_commit']}.",
        "",
        "## Peak RSS while loading a sharded bf16 checkpoint",
        "",
        "| run | peak RSS MB | anon MB | file MB | loaded model MB | largest shard MB | bound 1.3x MB | met | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in load:
        if "error" in r:
            lines.append(f"| {r['run']} | error: {r['error']} |||||||")
            continue
        met = "yes" if r["peak_load_rss_mb"] <= r["bound_mb"] else "no"
        lines.append(
            f"| {r['run']} | {r['peak_load_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} | {r['peak_file_mb']:.0f} | "
            f"{r['model_mb']:.0f} | {r['largest_shard_mb']:.0f} | {r['bound_mb']:.0f} | {met} | "
            f"{r['load_seconds']:.1f} |"
        )
    shape = meta["train"]
    lines += [
        "",
        f"## TRL SFTTrainer + PEFT LoRA (r 16, all linear), batch {shape['batch_size']}, max_length "
        f"{shape['max_length']}, {shape['steps']} steps ({shape['warmup_steps']} untimed)",
        "",
        "| run | tokens/s | s/step | train peak RSS MB | process peak RSS MB | trainable params |",
        "|---|---|---|---|---|---|",
    ]
    for r in train:
        if "error" in r:
            lines.append(f"| {r['run']} | error: {r['error']} |||||")
            continue
        lines.append(
            f"| {r['run']} | {r['tokens_per_s']:.0f} | {r['step_seconds']:.2f} | {r['train_peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['trainable_params']:,} |"
        )
    ours = next((r for r in train if r["run"] == "qk-nf4" and "error" not in r), None)
    peer = next((r for r in train if r["run"] == "bnb-nf4" and "error" not in r), None)
    if ours and peer:
        lines += [
            "",
            f"Ours / bitsandbytes: {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x tokens/s, "
            f"{ours['train_peak_rss_mb'] / peer['train_peak_rss_mb']:.2f}x training peak RSS.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="batch 2, 4 steps: a smoke run of the training table")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every run (default 2)")
    parser.add_argument("--skip-train", action="store_true", help="only the loading table")
    parser.add_argument("--out", type=Path, default=None, help="result folder (default results/<machine kind>)")
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = (child_load if spec["kind"] == "load" else child_train)(spec)
        print(json.dumps({**spec, **result}))
        return 0
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    from benchmarks.common import RESULTS_DIR, machine_name, run_metadata

    shape = QUICK_TRAIN if args.quick else TRAIN
    with tempfile.TemporaryDirectory(prefix="qk-bench-eco-") as tmp:
        folder = save_checkpoint(Path(tmp) / "smollm2-bf16")
        load_rows = interleaved([{"kind": "load", "run": r, "folder": str(folder)} for r in LOAD_RUNS], args.rounds)
        train_rows = []
        if not args.skip_train:
            specs = [
                {"kind": "train", "run": r, "folder": str(folder), "output_dir": str(Path(tmp) / r), **shape}
                for r in TRAIN_RUNS
            ]
            train_rows = interleaved(specs, args.rounds)
    load_keys = ["peak_load_rss_mb", "peak_anon_mb", "peak_file_mb", "model_mb", "largest_shard_mb", "bound_mb"]
    load = summarize(load_rows, [*load_keys, "load_seconds"])
    train = summarize(
        train_rows, ["tokens_per_s", "step_seconds", "train_peak_rss_mb", "peak_rss_mb", "trainable_params"]
    )
    meta = {**run_metadata(), "rounds": args.rounds, "train": shape, "provisional": True}
    args.out = args.out or RESULTS_DIR / machine_name()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "load": load, "train": train, "load_rows": load_rows, "train_rows": train_rows}
    (args.out / "ecosystem.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "ecosystem.md").write_text(markdown(load, train, meta))
    print(markdown(load, train, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
