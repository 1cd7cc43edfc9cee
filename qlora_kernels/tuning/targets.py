"""Finding the modules to change: linear targets, transformer blocks, embeddings and head."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..nn import LoRALinear, QuantLinear

LINEAR_TYPES = (nn.Linear, QuantLinear)
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def output_head(model: nn.Module) -> nn.Module | None:
    """The LM head (``get_output_embeddings()`` for HF models), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def input_embeddings(model: nn.Module) -> nn.Embedding | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        emb = getter() if callable(getter) else None
    except NotImplementedError:
        emb = None
    return emb if isinstance(emb, nn.Embedding) else None


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> every nn.Linear / QuantLinear (not those inside a LoRALinear or our adapters)."""
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, LoRALinear):
            skip.append(name)
            continue
        if isinstance(module, LINEAR_TYPES) and name:
            found[name] = module
    return found


def resolve_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Full names of the linear layers selected by `target_modules`.

    A name matches a module whose full name equals it or ends with ``"." + name`` (PEFT's rule);
    ``"all-linear"`` selects every linear layer except the LM head (name ``lm_head`` explicitly to add it).
    """
    linears = linear_modules(model)
    head = output_head(model)
    candidates = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            names = [n for n, m in linears.items() if m is not head]
            if not names:
                raise ValueError("target_modules='all-linear' matched nothing: the model has no nn.Linear layers")
            return names
        target_modules = [target_modules]
    targets = list(target_modules)
    if not targets:
        raise ValueError(f"target_modules is empty; pass names from {candidates} or 'all-linear'")
    selected: list[str] = []
    all_names = dict(model.named_modules())
    for key in targets:
        hits = [n for n in linears if n == key or n.endswith("." + key)]
        if not hits:
            other = [n for n in all_names if n and (n == key or n.endswith("." + key))]
            what = f"it names {type(all_names[other[0]]).__name__} modules, not linear layers; " if other else ""
            raise ValueError(
                f"target_modules entry {key!r} matches no linear layer: {what}candidates are {candidates} "
                "(or 'all-linear')"
            )
        selected.extend(h for h in hits if h not in selected)
    return selected


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the longest nn.ModuleList in the model (``model.layers`` for Llama)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks")
    return best


def block_children(block: nn.Module, names: tuple[str, ...]) -> str | None:
    """The first attribute of `block` among `names` that is a module."""
    for name in names:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    return None


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "hidden_size", None), int):
        return config.hidden_size
    emb = input_embeddings(model)
    if emb is not None:
        return emb.embedding_dim
    raise ValueError("cannot infer the hidden size: the model has neither config.hidden_size nor input embeddings")


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
