"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, readable by HF PEFT.

LoRA (and QLoRA) use PEFT's key names, ``base_model.model.<module>.lora_A.weight``, and a
``peft_type: "LORA"`` config; prompt tuning uses the ``prompt_embeddings`` key and
``peft_type: "PROMPT_TUNING"``. Bottleneck adapters, partial and full training use the same
two files with a ``QK_*`` peft_type and the model's own parameter names. Our full
`TuningConfig` rides in the safetensors metadata (PEFT ignores it). Only adapter tensors are
written, never the full state dict (peft #447); both files are written atomically, readable by
all as any file the user creates (mode 0666 minus the umask). Reading checks every file and
tensor: a damaged file or a NaN/inf value raises a ValueError naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..common.files import atomic_save_safetensors, atomic_write
from ..nn import BottleneckAdapter, LoRALinear
from ..nn.dense import is_conv1d
from .config import TuningConfig, get_config, model_signature
from .targets import linear_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"
PEFT_TYPES = {
    "qlora": "LORA",
    "lora": "LORA",
    "prompt": "PROMPT_TUNING",
    "adapter": "QK_BOTTLENECK_ADAPTER",
    "partial": "QK_PARTIAL",
    "full": "QK_FULL",
}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, under their file keys (shared tensors once)."""
    cfg = get_config(model)
    out: dict[str, torch.Tensor] = {}
    if cfg.method in ("qlora", "lora"):
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
                out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
    elif cfg.method == "prompt":
        out[PROMPT_KEY] = model.qk_prompt.embedding.weight
    elif cfg.method == "adapter":
        for name, module in model.named_modules():
            if isinstance(module, BottleneckAdapter):
                for pname, p in module.named_parameters():
                    out[f"{name}.{pname}"] = p
    else:
        params = dict(model.named_parameters())
        out = {name: params[name] for name in cfg.trainable}
    return out


def _peft_config(cfg: TuningConfig, model: nn.Module) -> dict[str, Any]:
    common = {
        "peft_type": PEFT_TYPES[cfg.method],
        "task_type": _task_type(model),
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
    }
    if cfg.method in ("qlora", "lora"):
        return {
            **common,
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": cfg.use_rslora,
            "target_modules": _compact_targets(model, cfg.target_modules),
            "bias": "none",
            # PEFT's flag for transformers Conv1D layers (GPT-2), which store W as (in, out)
            "fan_in_fan_out": any(is_conv1d(m.base) for m in model.modules() if isinstance(m, LoRALinear)),
            "init_lora_weights": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": False,
        }
    if cfg.method == "prompt":
        config = getattr(model, "config", None)
        return {
            **common,
            "num_virtual_tokens": cfg.num_virtual_tokens,
            "token_dim": cfg.token_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(config, "num_attention_heads", None),
            "num_layers": getattr(config, "num_hidden_layers", None),
            # the stored vectors replace any initialisation; "TEXT" would make PEFT load a tokenizer
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
        }
    return {**common, "library": "qlora-kernels", "qk_config": cfg.to_dict()}


def _task_type(model: nn.Module) -> str:
    """PEFT's task type: SEQ_2_SEQ_LM for encoder-decoder models (T5, BART), else CAUSAL_LM."""
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"


def _compact_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Short names (q_proj, ...) when they select exactly the targeted layers, else the full names."""
    short = sorted({t.rsplit(".", 1)[-1] for t in targets})
    # every layer PEFT could match: the LoRA layers and the other linears (GPT-2 has attn.c_proj and mlp.c_proj)
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] + list(linear_modules(model))
    matched = {n for n in names for s in short if n == s or n.endswith("." + s)}
    return short if matched == set(targets) else sorted(targets)


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write the adapter (tensors only) and its config to `out_dir`; returns the folder.

    `metadata`: extra string entries for the safetensors header (the trainer records its step);
    `adapter_metadata` reads them back.
    """
    cfg = get_config(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in adapter_tensors(model).items()
    }
    metadata = {**(metadata or {}), "format": "pt", "library": "qlora-kernels", "qk_config": json.dumps(cfg.to_dict())}
    atomic_save_safetensors(tensors, out / WEIGHTS_NAME, metadata=metadata)
    config_text = json.dumps(_peft_config(cfg, model), indent=2, sort_keys=True) + "\n"
    atomic_write(out / CONFIG_NAME, lambda tmp: tmp.write_text(config_text, encoding="utf-8"))
    return out


def adapter_metadata(adapter_dir: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of an adapter folder's weights file ({} if it has none)."""
    file = Path(adapter_dir) / WEIGHTS_NAME
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is damaged or not a safetensors file ({e})") from None


def check_finite(tensors: dict[str, torch.Tensor], file: str | os.PathLike) -> None:
    """Raise a ValueError naming `file` and the first tensor holding NaN or inf values."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(
                    f"{file}: tensor {key!r} holds {bad} NaN/inf value(s) of {tensor.numel()}; the adapter is "
                    "damaged (a diverged run?) and would make every output NaN"
                )


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], TuningConfig | None, dict[str, torch.Tensor]]:
    """(adapter_config.json, our TuningConfig if the file has one, tensors) from a folder.

    Every problem raises naming its file: a missing or malformed file, a damaged safetensors
    file, a tensor with NaN/inf values (ValueError; FileNotFoundError for a missing file).
    """
    folder = Path(adapter_dir)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"adapter folder {folder} {what}; pass the adapter/ folder written by train")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no {name} in {folder}: not an adapter folder written by qk.save_adapter or PEFT")
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    try:
        peft_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(peft_config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(peft_config).__name__}")
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_file} is damaged or not a safetensors file ({e})") from None
    check_finite(tensors, weights_file)
    try:
        ours = TuningConfig.from_dict(json.loads(metadata["qk_config"])) if "qk_config" in metadata else None
        if ours is None and "qk_config" in peft_config:
            ours = TuningConfig.from_dict(peft_config["qk_config"])
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{folder}: the stored qlora-kernels config is malformed ({e})") from None
    return peft_config, ours, tensors


def check_adapter(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Check an adapter folder without a model: files, config and tensors; returns its prepare_model options."""
    folder = Path(adapter_dir)
    peft_config, ours, _ = read_adapter(folder)
    return _prepare_options(peft_config, ours, folder)


def _prepare_options(peft_config: dict[str, Any], ours: TuningConfig | None, folder: Path) -> dict[str, Any]:
    """prepare_model() arguments that rebuild the adapter's structure on a fresh model."""
    peft_type = peft_config.get("peft_type")
    if ours is not None:
        opts: dict[str, Any] = {"method": ours.method, "compute_dtype": ours.compute_dtype}
        if ours.quant is not None:
            opts.update(quant=ours.quant, group_size=ours.group_size, double_quant=ours.double_quant)
        if ours.method in ("qlora", "lora"):
            opts.update(
                r=ours.r,
                alpha=ours.alpha,
                dropout=ours.dropout,
                use_rslora=ours.use_rslora,
                target_modules=ours.target_modules,
            )
        elif ours.method == "adapter":
            opts.update(bottleneck=ours.bottleneck, adapter_activation=ours.adapter_activation)
        elif ours.method == "prompt":
            opts.update(num_virtual_tokens=ours.num_virtual_tokens)
        elif ours.method == "partial":
            opts.update(policy=ours.policy, k=ours.k if ours.k is not None else 2)
        return opts
    if peft_type == "LORA":
        for key in ("rank_pattern", "alpha_pattern"):
            if peft_config.get(key):
                raise ValueError(f"{folder}: PEFT {key} (per-layer ranks/alphas) is not supported; train one r/alpha")
        if peft_config.get("use_dora"):
            raise ValueError(f"{folder}: a DoRA adapter (use_dora=true) is not supported; only plain LoRA")
        targets = peft_config.get("target_modules")
        r = peft_config.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{folder / CONFIG_NAME}: a LORA config needs an integer rank 'r' >= 1, got {r!r}")
        return {
            "method": "lora",
            "r": r,
            "alpha": peft_config.get("lora_alpha", r),
            "dropout": peft_config.get("lora_dropout", 0.0),
            "use_rslora": peft_config.get("use_rslora", False),
            "target_modules": targets if isinstance(targets, (str, list)) else list(targets or []),
        }
    if peft_type == "PROMPT_TUNING":
        if peft_config.get("num_transformer_submodules", 1) != 1:
            raise ValueError(f"{folder}: only decoder-only prompt tuning (num_transformer_submodules=1) is supported")
        n = peft_config.get("num_virtual_tokens")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{folder / CONFIG_NAME}: PROMPT_TUNING needs 'num_virtual_tokens' >= 1, got {n!r}")
        return {"method": "prompt", "num_virtual_tokens": n}
    raise ValueError(
        f"{folder}: peft_type={peft_type!r} is not supported; qlora-kernels reads LORA, PROMPT_TUNING and its own "
        f"{sorted(v for v in PEFT_TYPES.values() if v.startswith('QK_'))}"
    )


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Load an adapter folder (ours or PEFT's) into `model`; returns the model.

    A model not yet prepared is prepared from the adapter's config first (`overrides` go to
    `prepare_model`, e.g. ``quant="nf4"`` to put a PEFT LoRA on a quantized base, or
    ``compute_dtype=torch.float32``). A prepared model must match the adapter's method, rank and
    layers; any mismatch (another model, rank, method) raises a ValueError naming it.
    """
    from .prepare import prepare_model

    folder = Path(adapter_dir)
    peft_config, ours, tensors = read_adapter(folder)
    if peft_config.get("task_type") not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise ValueError(
            f"{folder}: task_type={peft_config.get('task_type')!r}; "
            "only CAUSAL_LM and SEQ_2_SEQ_LM adapters are supported"
        )
    if ours is not None and ours.model_signature:
        sig = model_signature(model)
        diff = {k: (v, sig.get(k)) for k, v in ours.model_signature.items() if k != "class" and sig.get(k) != v}
        if diff:
            raise ValueError(
                f"{folder} was made for another model: (adapter, this model) differ in {diff}; "
                f"load it into {ours.base_model_name_or_path or 'the model it was trained on'}"
            )
    opts = _prepare_options(peft_config, ours, folder)
    if getattr(model, "qk_config", None) is None:
        if overrides.get("quant") and opts["method"] == "lora":
            opts["method"] = "qlora"
        if overrides.get("method") == "lora" or "quant" in overrides and overrides["quant"] is None:
            for key in ("quant", "group_size", "double_quant"):
                opts.pop(key, None)
            if opts["method"] == "qlora":
                opts["method"] = "lora"
        prepare_model(model, **{**opts, **overrides})
    else:
        _check_compatible(model, opts, folder)
    _copy_tensors(model, tensors, folder)
    return model


def _check_compatible(model: nn.Module, opts: dict[str, Any], folder: Path) -> None:
    cfg = get_config(model)
    family = {"qlora": "lora"}.get
    if family(cfg.method, cfg.method) != family(opts["method"], opts["method"]):
        raise ValueError(
            f"{folder} holds a {opts['method']!r} adapter but the model was prepared with method={cfg.method!r}; "
            "load it into a fresh (unprepared) model, which qk.load_adapter prepares to match"
        )
    if cfg.method in ("qlora", "lora"):
        if opts["r"] != cfg.r:
            raise ValueError(f"{folder} has LoRA rank r={opts['r']} but the model was prepared with r={cfg.r}")
        alpha = float(opts["alpha"])
        if alpha != cfg.alpha or bool(opts["use_rslora"]) != cfg.use_rslora:
            raise ValueError(
                f"{folder} has lora_alpha={alpha}, use_rslora={opts['use_rslora']} but the model has "
                f"alpha={cfg.alpha}, use_rslora={cfg.use_rslora}"
            )
    if cfg.method == "prompt" and opts["num_virtual_tokens"] != cfg.num_virtual_tokens:
        raise ValueError(
            f"{folder} has num_virtual_tokens={opts['num_virtual_tokens']}, the model {cfg.num_virtual_tokens}"
        )
    if cfg.method == "adapter" and opts.get("bottleneck") not in (None, cfg.bottleneck):
        raise ValueError(f"{folder} has bottleneck={opts['bottleneck']}, the model {cfg.bottleneck}")


def _copy_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    expected = adapter_tensors(model)
    if get_config(model).method in ("qlora", "lora"):  # PEFT may keep the adapter name in keys
        tensors = {
            k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
            for k, v in tensors.items()
        }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{folder} does not fit this model (made for another model or other target modules): "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''} ({len(unexpected)})"
        )
    for key, param in expected.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ValueError(
                f"{folder}: {key} has shape {tuple(tensors[key].shape)} but the model expects {tuple(param.shape)} "
                "(adapter made for another model or rank)"
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
