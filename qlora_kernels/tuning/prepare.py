"""`prepare_model`: turn a causal LM (or any module with nn.Linear children) into a trainable PEFT model.

Defaults, and why:
* ``compute_dtype``: None keeps every frozen weight in the dtype it has, as PEFT does; pass
  e.g. ``torch.bfloat16`` to cast the frozen weights that are not quantized (halves their
  memory for an fp32 model). Trainable parameters are always fp32.
* ``target_modules``: the attention projections for LoRA (the lecture's W_q, W_k, W_v, W_o:
  every linear inside an attention module); every linear except the LM head for quantizing the
  frozen base of the other methods.
* Input embeddings are made to require grad whenever they are frozen, so gradient
  checkpointing (now or enabled later) trains the adapters (peft #137).
Everything is validated before the model is touched: a bad option leaves it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..formats.quantize import resolve_group_size
from ..nn import BottleneckAdapter, LoRALinear, QuantLinear
from ..nn.dense import in_out_features, is_dense_linear
from .config import (
    METHODS,
    PARTIAL_POLICIES,
    QUANT_FORMATS,
    TuningConfig,
    dtype_name,
    model_signature,
    parse_dtype,
)
from .partial import partial_trainable
from .prompt import attach_prompt
from .targets import (
    adapter_hosts,
    default_lora_targets,
    hidden_size,
    input_embeddings,
    linear_modules,
    output_head,
    resolve_targets,
    set_submodule,
)


def prepare_model(
    model: nn.Module,
    method: str = "qlora",
    *,
    quant: str | None = None,
    group_size: int | None = None,
    double_quant: bool = True,
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    target_modules: str | Iterable[str] | None = None,
    bottleneck: int = 64,
    adapter_activation: str = "gelu",
    num_virtual_tokens: int = 20,
    prompt_init_text: str | None = None,
    tokenizer=None,
    policy: str = "top_k",
    k: int = 2,
    compute_dtype: torch.dtype | str | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Apply a fine-tuning method in place and return the model (with ``model.qk_config`` recording it).

    method: "qlora" (quantized base + LoRA; quant defaults to "nf4"), "lora", "adapter" (bottleneck
    adapters of size `bottleneck` after each attention and MLP block), "prompt" (`num_virtual_tokens`
    soft tokens from `prompt_init_text` + `tokenizer`, or random vocabulary embeddings), "partial"
    (`policy` "head" | "top_k" (with `k`) | "no_embeddings"; LR decay via `qk.param_groups`), "full".
    quant ("nf4" | "int4" | "int8", `group_size`) also quantizes the frozen linears of "adapter",
    "prompt" and "partial".
    """
    if method not in METHODS:
        raise ValueError(f"unknown method={method!r}; choose one of {METHODS}")
    if getattr(model, "qk_config", None) is not None:
        raise ValueError(
            f"model is already prepared (method={model.qk_config.method!r}); prepare a freshly loaded model"
        )
    if method == "qlora" and quant is None:
        quant = "nf4"
    if quant is not None and quant not in QUANT_FORMATS:
        raise ValueError(f"quant must be one of {QUANT_FORMATS} or None, got {quant!r}")
    if method == "lora" and quant is not None:
        raise ValueError(f"method='lora' keeps a dense base; for quant={quant!r} use method='qlora'")
    if method == "full" and quant is not None:
        raise ValueError("method='full' trains every weight, so nothing can be quantized; drop quant=")
    if method == "partial" and policy not in PARTIAL_POLICIES:
        raise ValueError(f"policy must be one of {PARTIAL_POLICIES}, got {policy!r}")
    if compute_dtype is not None:
        compute_dtype = parse_dtype(compute_dtype)

    # ---- resolve and validate everything before the first change
    cfg = TuningConfig(
        method=method,
        compute_dtype=dtype_name(compute_dtype) if compute_dtype is not None else None,
        quant=quant,
        group_size=group_size,
        double_quant=double_quant,
        gradient_checkpointing=gradient_checkpointing,
        base_model_name_or_path=_name_or_path(model),
        model_signature=model_signature(model),
    )
    if method in ("qlora", "lora"):
        targets = default_lora_targets(model) if target_modules is None else resolve_targets(model, target_modules)
        _check_lora_options(model, targets, r, dropout)
        cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init = r, float(alpha), dropout, use_rslora, init
        cfg.target_modules = targets
    quantize_names: list[str] = []
    if quant is not None:
        if method == "qlora":
            quantize_names = cfg.target_modules
        else:
            quantize_names = resolve_targets(model, "all-linear" if target_modules is None else target_modules)
    trainable: list[str] = []
    if method == "partial":
        trainable = partial_trainable(model, policy, k)
        cfg.policy, cfg.k = policy, k if policy == "top_k" else None
        trained = {id(p) for n, p in model.named_parameters() if n in set(trainable)}
        head = output_head(model)
        quantize_names = [
            n
            for n in quantize_names
            if model.get_submodule(n) is not head
            and not any(id(p) in trained for p in model.get_submodule(n).parameters())
        ]
    if method == "full":
        trainable = [n for n, _ in model.named_parameters()]
    cfg.trainable = trainable
    modules = linear_modules(model)
    for name in quantize_names:
        if is_dense_linear(modules[name]):
            try:
                resolve_group_size(quant, group_size, in_out_features(modules[name])[0])
            except ValueError as exc:
                raise ValueError(f"cannot quantize {name}: {exc}") from None
    if method == "adapter":
        cfg.bottleneck, cfg.adapter_activation = bottleneck, adapter_activation
        cfg.adapter_blocks = adapter_hosts(model)
        BottleneckAdapter(hidden_size(model), bottleneck, adapter_activation)  # validates the options
    if method == "prompt":
        if input_embeddings(model) is None:
            raise ValueError(
                f"method='prompt' needs input embeddings (get_input_embeddings() returning nn.Embedding); "
                f"{type(model).__name__} has none: use method='lora' or 'adapter'"
            )
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
        if prompt_init_text is not None and tokenizer is None:
            raise ValueError("prompt_init_text needs tokenizer=...; pass the model's tokenizer to prepare_model")
        cfg.num_virtual_tokens, cfg.prompt_init_text = num_virtual_tokens, prompt_init_text
        cfg.token_dim = input_embeddings(model).embedding_dim

    # ---- surgery
    for p in model.parameters():
        p.requires_grad_(False)
    for name in quantize_names:
        module = modules[name]
        if is_dense_linear(module):
            q = QuantLinear.from_linear(module, quant, group_size, double_quant=double_quant)
            set_submodule(model, name, q.to(module.weight.device))
    cfg.quantized_modules = [n for n in quantize_names]
    if method in ("qlora", "lora"):
        for name in cfg.target_modules:
            base = model.get_submodule(name)
            set_submodule(model, name, LoRALinear(base, r, alpha, dropout, use_rslora, init))
    elif method == "adapter":
        size = hidden_size(model)
        for host in cfg.adapter_blocks:
            block = model.get_submodule(host)
            device = next(t for t in (*block.parameters(), *block.buffers()) if t is not None).device
            BottleneckAdapter(size, bottleneck, adapter_activation).to(device).attach(block)
    elif method == "prompt":
        attach_prompt(model, num_virtual_tokens, prompt_init_text, tokenizer)
    elif method in ("partial", "full"):
        params = dict(model.named_parameters())
        for name in trainable:
            params[name].requires_grad_(True)

    # ---- dtypes: trainable fp32; frozen as they are, or in the compute dtype when one was asked for
    for p in model.parameters():
        if p.is_floating_point():
            want = torch.float32 if p.requires_grad else (compute_dtype or p.dtype)
            if p.dtype != want:
                p.data = p.data.to(want)
    if compute_dtype is not None:
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.dtype = compute_dtype
    emb = input_embeddings(model)
    if emb is not None and not emb.weight.requires_grad and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError(
                f"gradient_checkpointing=True needs a transformers model; {type(model).__name__} has no "
                "gradient_checkpointing_enable()"
            )
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    if compute_dtype is not None and getattr(model, "config", None) is not None and hasattr(model.config, "dtype"):
        model.config.dtype = compute_dtype
    model.qk_config = cfg
    return model


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def _check_lora_options(model: nn.Module, targets: list[str], r: int, dropout: float) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    for name in targets:
        in_f, out_f = in_out_features(model.get_submodule(name))
        if r > min(in_f, out_f):
            raise ValueError(
                f"r={r} is larger than {name}'s dims ({out_f}x{in_f}); "
                f"choose r <= {min(in_f, out_f)} or leave this layer out of target_modules"
            )
