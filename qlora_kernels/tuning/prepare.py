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
Plan, then apply: `plan_preparation` validates every option and decides what to replace, without
touching the model; `apply_plan` then changes it. So a bad option leaves the model unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..common import check_bool, check_int
from ..formats import FORMATS
from ..formats.quantize import resolve_group_size
from ..nn import BottleneckAdapter, LoRALinear, QuantLinear
from ..nn.adapter import check_adapter_options
from ..nn.dense import in_out_features, is_dense_linear
from ..nn.frozen_head import fold_frozen_head_inputs
from ..nn.fused_mlp import fuse_swiglu_mlps
from ..nn.lora_linear import check_lora_options
from .config import (
    METHODS,
    PARTIAL_POLICIES,
    TuningConfig,
    dtype_name,
    model_signature,
    parse_dtype,
)
from .partial import partial_trainable
from .prompt import attach_prompt, init_prompt_vectors
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


@dataclass
class PreparePlan:
    """What `apply_plan` will do, fully validated: the config to record (which names the modules
    to quantize, wrap or unfreeze and every option), the dtype of the frozen weights, and the
    soft prompt's initial vectors for method="prompt"."""

    config: TuningConfig
    compute_dtype: torch.dtype | None
    prompt_init: torch.Tensor | None = None


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
    "prompt" and "partial". Every option is checked before the model changes.
    """
    plan = plan_preparation(
        model,
        method,
        quant=quant,
        group_size=group_size,
        double_quant=double_quant,
        r=r,
        alpha=alpha,
        dropout=dropout,
        use_rslora=use_rslora,
        init=init,
        target_modules=target_modules,
        bottleneck=bottleneck,
        adapter_activation=adapter_activation,
        num_virtual_tokens=num_virtual_tokens,
        prompt_init_text=prompt_init_text,
        tokenizer=tokenizer,
        policy=policy,
        k=k,
        compute_dtype=compute_dtype,
        gradient_checkpointing=gradient_checkpointing,
    )
    apply_plan(model, plan)
    return model


# ------------------------------------------------------------------------------------ plan
def plan_preparation(
    model: nn.Module,
    method: str,
    *,
    quant: str | None,
    group_size: int | None,
    double_quant: bool,
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
    init: str,
    target_modules: str | Iterable[str] | None,
    bottleneck: int,
    adapter_activation: str,
    num_virtual_tokens: int,
    prompt_init_text: str | None,
    tokenizer,
    policy: str,
    k: int,
    compute_dtype: torch.dtype | str | None,
    gradient_checkpointing: bool,
) -> PreparePlan:
    """Validate every option of `prepare_model` against `model` and decide what to change; the
    model is only read. Raises TypeError / ValueError naming the option."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. from qk.load_model), got {type(model).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method={method!r}; choose one of {METHODS}")
    if getattr(model, "qk_config", None) is not None:
        raise ValueError(
            f"model is already prepared (method={model.qk_config.method!r}); prepare a freshly loaded model"
        )
    quant = _check_quant(method, quant)
    if group_size is not None:
        group_size = check_int(group_size, "group_size")
    check_bool(double_quant, "double_quant")
    check_bool(gradient_checkpointing, "gradient_checkpointing")
    if gradient_checkpointing:
        _check_checkpointing_support(model)
    _check_target_modules(target_modules)
    if compute_dtype is not None:
        compute_dtype = parse_dtype(compute_dtype)

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
    prompt_init = None
    if method in ("qlora", "lora"):
        cfg.target_modules = (
            default_lora_targets(model) if target_modules is None else resolve_targets(model, target_modules)
        )
        cfg.r, cfg.alpha, cfg.dropout = check_lora_options(r, alpha, dropout, use_rslora, init)
        cfg.use_rslora, cfg.init = use_rslora, init
        _check_rank_fits(model, cfg.target_modules, cfg.r)
    elif method == "adapter":
        check_adapter_options(hidden_size(model), bottleneck, adapter_activation, 0.0)
        cfg.bottleneck, cfg.adapter_activation = bottleneck, adapter_activation
        cfg.adapter_blocks = adapter_hosts(model)
    elif method == "prompt":
        if input_embeddings(model) is None:
            raise ValueError(
                f"method='prompt' needs input embeddings (get_input_embeddings() returning nn.Embedding); "
                f"{type(model).__name__} has none: use method='lora' or 'adapter'"
            )
        num_virtual_tokens = check_int(num_virtual_tokens, "num_virtual_tokens", minimum=1)
        prompt_init = init_prompt_vectors(model, num_virtual_tokens, prompt_init_text, tokenizer)
        cfg.num_virtual_tokens, cfg.prompt_init_text = num_virtual_tokens, prompt_init_text
        cfg.token_dim = input_embeddings(model).embedding_dim
    elif method == "partial":
        if not isinstance(policy, str) or policy not in PARTIAL_POLICIES:
            raise ValueError(f"policy must be one of {PARTIAL_POLICIES}, got {policy!r}")
        if policy == "top_k":
            k = check_int(k, "k", minimum=1)
        cfg.trainable = partial_trainable(model, policy, k)
        cfg.policy, cfg.k = policy, k if policy == "top_k" else None
    elif method == "full":
        cfg.trainable = [n for n, _ in model.named_parameters()]
    cfg.quantized_modules = _modules_to_quantize(model, cfg, target_modules)
    return PreparePlan(cfg, compute_dtype, prompt_init)


def _check_quant(method: str, quant: str | None) -> str | None:
    if method == "qlora" and quant is None:
        quant = "nf4"
    if quant is not None and (not isinstance(quant, str) or quant not in FORMATS):
        raise ValueError(f"quant must be one of {FORMATS} or None, got {quant!r}")
    if method == "lora" and quant is not None:
        raise ValueError(f"method='lora' keeps a dense base; for quant={quant!r} use method='qlora'")
    if method == "full" and quant is not None:
        raise ValueError("method='full' trains every weight, so nothing can be quantized; drop quant=")
    return quant


def _check_target_modules(target_modules: object) -> None:
    if target_modules is None or isinstance(target_modules, str):
        return
    if not isinstance(target_modules, Iterable) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(
            f"target_modules must be a module name, a list of names or 'all-linear', got {target_modules!r}"
        )


def _check_checkpointing_support(model: nn.Module) -> None:
    if not any(hasattr(model, m) for m in ("activation_checkpointing_enable", "gradient_checkpointing_enable")):
        raise ValueError(
            f"gradient_checkpointing=True needs a transformers model; {type(model).__name__} has no "
            "gradient_checkpointing_enable()"
        )


def _check_rank_fits(model: nn.Module, targets: list[str], r: int) -> None:
    for name in targets:
        in_f, out_f = in_out_features(model.get_submodule(name))
        if r > min(in_f, out_f):
            raise ValueError(
                f"r={r} is larger than {name}'s dims ({out_f}x{in_f}); "
                f"choose r <= {min(in_f, out_f)} or leave this layer out of target_modules"
            )


def _modules_to_quantize(model: nn.Module, cfg: TuningConfig, target_modules) -> list[str]:
    """Full names of the linears whose frozen weight gets quantized, each checked against the group size.

    qlora: the LoRA targets. adapter / prompt / partial with quant: every linear (or `target_modules`),
    except, for partial, the head and any layer holding a trained parameter.
    """
    if cfg.quant is None:
        return []
    if cfg.method == "qlora":
        names = list(cfg.target_modules)
    else:
        names = resolve_targets(model, "all-linear" if target_modules is None else target_modules)
    if cfg.method == "partial":
        trained = {id(p) for n, p in model.named_parameters() if n in set(cfg.trainable)}
        head = output_head(model)
        names = [
            n
            for n in names
            if model.get_submodule(n) is not head
            and not any(id(p) in trained for p in model.get_submodule(n).parameters())
        ]
    modules = linear_modules(model)
    for name in names:
        if is_dense_linear(modules[name]):
            try:
                resolve_group_size(cfg.quant, cfg.group_size, in_out_features(modules[name])[0])
            except ValueError as exc:
                raise ValueError(f"cannot quantize {name}: {exc}") from None
    return names


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


# ----------------------------------------------------------------------------------- apply
def apply_plan(model: nn.Module, plan: PreparePlan) -> None:
    """Change `model` as `plan` says: freeze, quantize, add the method's modules, set dtypes and
    gradient checkpointing, record ``model.qk_config``."""
    cfg = plan.config
    for p in model.parameters():
        p.requires_grad_(False)
    _quantize_modules(model, cfg)
    _add_method(model, cfg, plan.prompt_init)
    _set_dtypes(model, plan.compute_dtype)
    if cfg.method in ("qlora", "lora"):
        fuse_swiglu_mlps(model)
    fold_frozen_head_inputs(output_head(model))
    emb = input_embeddings(model)
    if emb is not None and not emb.weight.requires_grad and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if plan.compute_dtype is not None and getattr(model, "config", None) is not None and hasattr(model.config, "dtype"):
        model.config.dtype = plan.compute_dtype
    model.qk_config = cfg


def _quantize_modules(model: nn.Module, cfg: TuningConfig) -> None:
    modules = linear_modules(model)
    for name in cfg.quantized_modules:
        module = modules[name]
        if is_dense_linear(module):
            q = QuantLinear.from_linear(module, cfg.quant, cfg.group_size, double_quant=cfg.double_quant)
            set_submodule(model, name, q.to(module.weight.device))


def _add_method(model: nn.Module, cfg: TuningConfig, prompt_init: torch.Tensor | None) -> None:
    """Wrap targets in LoRA, attach adapters or the soft prompt, or unfreeze the trained parameters."""
    if cfg.method in ("qlora", "lora"):
        for name in cfg.target_modules:
            base = model.get_submodule(name)
            set_submodule(model, name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init))
    elif cfg.method == "adapter":
        size = hidden_size(model)
        for host in cfg.adapter_blocks:
            block = model.get_submodule(host)
            device = next(t for t in (*block.parameters(), *block.buffers()) if t is not None).device
            BottleneckAdapter(size, cfg.bottleneck, cfg.adapter_activation).to(device).attach(block)
    elif cfg.method == "prompt":
        attach_prompt(model, prompt_init)
    elif cfg.method in ("partial", "full"):
        params = dict(model.named_parameters())
        for name in cfg.trainable:
            params[name].requires_grad_(True)


def _set_dtypes(model: nn.Module, compute_dtype: torch.dtype | None) -> None:
    """Trainable parameters in fp32; frozen ones as they are, or in the compute dtype when one was asked for."""
    for p in model.parameters():
        if p.is_floating_point():
            want = torch.float32 if p.requires_grad else (compute_dtype or p.dtype)
            if p.dtype != want:
                p.data = p.data.to(want)
    if compute_dtype is not None:
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.dtype = compute_dtype


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
