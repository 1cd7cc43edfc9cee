"""gpu_check part "models": Llama-architecture models with random weights, built from a config
(no download), ours against PEFT + bitsandbytes.

(d) SFT step: tokens/s and peak device memory at batch x sequence `profile.batch` x
`profile.seq`, full-sequence causal-LM loss, AdamW on the LoRA weights only, bf16 autocast,
no gradient checkpointing, the same step code for every method.
(e) Decoding: tokens/s at batch 1, greedy, through the KV cache, after a warm-up that tunes
the kernels for the decode shapes.

Methods: "ours" (`qk.prepare_model(..., "qlora", quant="nf4")`: NF4 base, LoRA r=16 on every
projection, Triton kernels), "peft+bnb" (bitsandbytes NF4 Linear4bit with double quant and
PEFT LoRA on the same projections) and, when time is left, "peft-bf16" (PEFT LoRA on the bf16
base: the unquantized reference).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from torch import nn

from benchmarks.gpu_common import LORA_TARGETS, Deadline, Profile, Records, synchronize

#: Seconds a model run needs at least, by model (build, quantize, steps, decode), so a run
#: that cannot finish inside the part's budget is not started.
MIN_SECONDS = {"llama-3.2-1b": 15.0, "llama-3-8b": 45.0, "tiny-llama": 1.0}


def build_llama(config_kwargs: dict, profile: Profile) -> nn.Module:
    """A LlamaForCausalLM with random weights, created directly on the device in the run's dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    dtype = torch.bfloat16 if profile.device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(profile.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def prepare_ours(model: nn.Module, profile: Profile) -> nn.Module:
    """QLoRA through the package; its quantized layers use the Triton kernels (on the CPU too,
    through the interpreter, where "auto" would pick the PyTorch path)."""
    import qlora_kernels as qk

    dtype = torch.bfloat16 if profile.device == "cuda" else torch.float32
    model = qk.prepare_model(
        model, "qlora", quant="nf4", r=profile.rank, alpha=profile.scaling * profile.rank,
        target_modules=list(LORA_TARGETS), compute_dtype=dtype,
    )  # fmt: skip
    for module in model.modules():
        if isinstance(module, qk.QuantLinear):
            module.backend = "triton"
    return model


def _to_bnb_nf4(model: nn.Module, profile: Profile) -> None:
    """Replace every target projection with a bitsandbytes NF4 Linear4bit (double quant)."""
    import bitsandbytes as bnb

    compute = torch.bfloat16 if profile.device == "cuda" else torch.float32
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute, quant_type="nf4", device="meta")  # fmt: skip
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)  # fmt: skip
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        layer = layer.to(profile.device)  # quantizes
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[-1], layer)
        del module


def prepare_peft(model: nn.Module, profile: Profile, quantize: bool) -> nn.Module:
    import peft

    for p in model.parameters():
        p.requires_grad_(False)
    if quantize:
        _to_bnb_nf4(model, profile)
    config = peft.LoraConfig(
        r=profile.rank, lora_alpha=profile.scaling * profile.rank, lora_dropout=0.0,
        target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
    )  # fmt: skip
    return peft.get_peft_model(model, config)


def sft_steps(model: nn.Module, profile: Profile, vocab: int) -> dict[str, Any]:
    """Warm-up then timed SFT steps; tokens/s and peak memory over all of them."""
    device = profile.torch_device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (profile.batch, profile.seq), generator=g).to(device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(profile.sft_warmup + profile.sft_steps):
        synchronize(device)
        start = time.perf_counter()
        with profile.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= profile.sft_warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    tokens = profile.batch * profile.seq
    out = {
        "tokens_per_s": tokens * len(times) / sum(times),
        "step_s": sum(times) / len(times),
        "losses": losses,
        "trainable_params": sum(p.numel() for p in params),
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del optimizer
    return out


@torch.inference_mode()
def decode(model: nn.Module, profile: Profile, vocab: int) -> dict[str, Any]:
    """Greedy decoding at batch 1 through the KV cache: a warm-up run, then a timed one."""
    device = profile.torch_device
    model.eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, profile.prompt_tokens), generator=g).to(device)

    def generate(n_tokens: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        with profile.autocast():
            out = model(input_ids=prompt, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(n_tokens - 1):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        synchronize(device)
        return time.perf_counter() - start

    generate(min(4, profile.decode_tokens))  # tunes the kernels for the prefill and decode shapes
    prefill = generate(1)
    total = generate(profile.decode_tokens)
    return {
        "decode_tokens_per_s": (profile.decode_tokens - 1) / max(total - prefill, 1e-9),
        "prefill_s": prefill,
        "decode_tokens": profile.decode_tokens,
        "prompt_tokens": profile.prompt_tokens,
    }


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peers_available() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def run_order(profile: Profile) -> list[tuple[str, dict, str]]:
    """(model, config, method) in the order they run: the largest model's QLoRA pair first (the
    SFT target is measured there), the unquantized references last."""
    models = sorted(profile.models, key=lambda item: -item[1]["hidden_size"] * item[1]["num_hidden_layers"])
    quantized = [(name, cfg, method) for name, cfg in models for method in ("ours", "peft+bnb")]
    return quantized + [(name, cfg, "peft-bf16") for name, cfg in reversed(models)]


def run(profile: Profile, records: Records, deadline: Deadline) -> int:
    """Every (model, method) run that fits the budget; returns how many runs of ours failed."""
    device = profile.torch_device
    peers_missing = _peers_available()
    failures = 0
    for model_name, config, method in run_order(profile):
        if method != "ours" and peers_missing is not None:
            records.add("unavailable", model=model_name, method=method, note=peers_missing)
            continue
        if deadline.passed(reserve=MIN_SECONDS.get(model_name, 10.0)):
            records.add("budget", model=model_name, method=method)
            continue
        row: dict[str, Any] = {"model": model_name, "method": method, "batch": profile.batch, "seq": profile.seq}
        model = None
        try:
            start = time.perf_counter()
            torch.manual_seed(0)
            model = build_llama(config, profile)
            if method == "ours":
                model = prepare_ours(model, profile)
            else:
                model = prepare_peft(model, profile, quantize=method == "peft+bnb")
            synchronize(device)
            row["build_s"] = time.perf_counter() - start
            if device.type == "cuda":
                row["model_mem_gib"] = torch.cuda.memory_allocated(device) / 2**30
            row.update(sft_steps(model, profile, config["vocab_size"]))
            records.add("sft", **row)
        except Exception as exc:
            records.add("sft", **row, error=repr(exc)[:500])
            failures += method == "ours"
        try:
            if model is not None and not deadline.passed(reserve=2.0):
                records.add("decode", model=model_name, method=method, **decode(model, profile, config["vocab_size"]))
        except Exception as exc:
            records.add("decode", model=model_name, method=method, error=repr(exc)[:500])
            failures += method == "ours"
        del model
        _free(device)
    return failures
