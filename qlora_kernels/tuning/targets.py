"""Finding the modules to change: linear targets, transformer blocks, embeddings and head.

Linear layers are `nn.Linear`, transformers' `Conv1D` (GPT-2) and our `QuantLinear`. Attention
modules are recognised by their class name ending in "Attention" (LlamaAttention, GPT2Attention,
T5Attention, BartAttention, ...), which holds across the architectures transformers ships, so
defaults work for decoder-only and encoder-decoder models alike.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..nn import LoRALinear, QuantLinear
from ..nn.dense import is_dense_linear
from .config import DEFAULT_TARGETS

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "DenseReluDense")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers Conv1D or QuantLinear."""
    return isinstance(module, QuantLinear) or is_dense_linear(module)


def is_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention")


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
        if is_linear(module) and name:
            found[name] = module
    return found


def default_lora_targets(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside attention modules (q/k/v/o, c_attn, query_key_value, ...).

    Models without recognisable attention modules fall back to the names in `DEFAULT_TARGETS`.
    """
    attention = [name for name, module in model.named_modules() if name and is_attention(module)]
    names = [n for n in linear_modules(model) if any(n.startswith(a + ".") for a in attention)]
    return names if names else resolve_targets(model, DEFAULT_TARGETS)


def adapter_hosts(model: nn.Module) -> list[str]:
    """Where bottleneck adapters go: after each block's self-attention and its feed-forward part.

    Blocks are the elements of the outermost `nn.ModuleList`s whose elements hold an attention
    module (``model.layers``; ``encoder.block`` and ``decoder.block`` for T5). In a block, the
    attention host is the first attention module with no attention module inside (T5Attention,
    not T5LayerSelfAttention: the output before the residual add); the feed-forward host is the
    first child named in `MLP_NAMES`, else (OPT, BART: fc1 / fc2 sit in the block) the block's
    last direct linear child.
    """
    hosts: list[str] = []
    for prefix, blocks in _block_lists(model):
        for i, block in enumerate(blocks):
            base = f"{prefix}.{i}"
            attention = _innermost_attention(block)
            ffn = _feed_forward(block)
            if attention is None or ffn is None:
                what = "an attention module" if attention is None else f"a feed-forward child (one of {MLP_NAMES})"
                raise ValueError(f"method='adapter': block {base} ({type(block).__name__}) has no {what}")
            hosts += [f"{base}.{attention}", f"{base}.{ffn}"]
    if not hosts:
        prefix, blocks = find_blocks(model)
        for i, block in enumerate(blocks):
            for names in (ATTENTION_NAMES, MLP_NAMES):
                child = block_children(block, names)
                if child is None:
                    raise ValueError(
                        f"method='adapter': block {prefix}.{i} ({type(block).__name__}) has no child named one of "
                        f"{names}"
                    )
                hosts.append(f"{prefix}.{i}.{child}")
    return hosts


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if all(any(is_attention(m) for m in block.modules()) for block in module):
            found.append((name, module))
    return found


def _innermost_attention(block: nn.Module) -> str | None:
    for name, module in block.named_modules():
        if name and is_attention(module) and not any(is_attention(m) for m in list(module.modules())[1:]):
            return name
    return None


def _feed_forward(block: nn.Module) -> str | None:
    for name, _ in block.named_modules():
        if name and name.rsplit(".", 1)[-1] in MLP_NAMES:
            return name
    linears = [name for name, child in block.named_children() if is_linear(child)]
    return linears[-1] if linears else None


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
