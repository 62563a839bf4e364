"""Upstream llm2vec's Python API (llm2vec 0.2.3: `LLM2Vec.from_pretrained`, `LLM2Vec.encode`) as a thin layer
over `Encoder`: code written for llm2vec runs with its import changed to `from l2v import LLM2Vec`.

Upstream's semantics decide every embedding: attention is bidirectional unless enable_bidirectional=False;
pooling_mode, max_length, doc_max_length, skip_instruction come from the arguments, else from the
llm2vec_config.json of the last adapter (of the base model when there is none), else upstream's defaults;
l2v's own settings files (prompt, causal attention: encoder_config.json) are not read; a chat template
follows the base model's hub name, as upstream's did; weights and arithmetic are in torch_dtype (float32
when not given), without autocast. `encode` returns a float32 CPU tensor in input order (numpy with
convert_to_numpy=True, unless convert_to_tensor=True).

Differences that change no embedding beyond float rounding:
  - texts are packed (`Encoder`), so an embedding does not depend on what it is batched with; batch_size
    bounds the tokens of a forward pass (batch_size x max_length, at most Encoder's default);
  - adapters are always merged: merge_peft=False computed the same up to rounding;
  - one device, no multi-GPU pool; attn_implementation is ignored: the one SDPA call computes what
    sdpa, eager and flash_attention_2 compute (and stays bidirectional for every architecture);
  - a list mixing strings and pairs is read item by item (upstream read a string after a pair as a pair of
    its first two characters); a bare string is one text; an empty text is an error, not pooled padding.
Upstream arguments l2v cannot honour (quantization, device maps over layers, ...) are a ValueError.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import read_json, resolve_device, resolve_dtype
from .encoder import Encoder, default_batch_tokens
from .hub import adapter_base, is_hub_id, resolve_model
from .settings import DEFAULTS as SETTINGS
from .settings import UPSTREAM_KEYS, read_settings

DEFAULTS = {k: SETTINGS[k] for k in UPSTREAM_KEYS}  # upstream's four, with upstream's defaults
# Upstream chose the chat template by the base model's hub name (LLM2Vec.prepare_for_tokenization).
TEMPLATES_BY_NAME = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral",
    "meta-llama/Llama-2-7b-chat-hf": "mistral",
    "Qwen/Qwen2-1.5B-Instruct": "chatml",
    "Qwen/Qwen2-7B-Instruct": "chatml",
    "google/gemma-2-9b-it": "gemma",
}
# transformers loading arguments that change nothing here (see the module docstring).
IGNORED = {
    "attn_implementation": ("sdpa", "eager", "flash_attention_2", None),
    "trust_remote_code": None,
    "low_cpu_mem_usage": None,
    "use_safetensors": (True, None),
}
HINTS = {
    "load_in_4bit": "l2v loads float32, bfloat16 or float16 weights, not quantized ones",
    "load_in_8bit": "l2v loads float32, bfloat16 or float16 weights, not quantized ones",
    "quantization_config": "l2v loads float32, bfloat16 or float16 weights, not quantized ones",
    "token": "log in with `hf auth login` or set HF_TOKEN",
    "cache_dir": "set HF_HOME or HF_HUB_CACHE",
    "local_files_only": "set HF_HUB_OFFLINE=1",
    "max_memory": "l2v puts the model on one device",
    "offload_folder": "l2v puts the model on one device",
}


def device_from_map(device_map) -> torch.device:
    """transformers' device_map -> one device. None: the CPU (transformers' default; `encode` then moves the
    model, as upstream's did)."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(map(str, device_map.values()))
        if len(devices) != 1:
            raise ValueError(f"device_map: {device_map!r} spreads the model over devices; l2v puts it on one")
        device_map = devices.pop()
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        device_map = f"cuda:{device_map}"
    if isinstance(device_map, str) and device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"device_map: {device_map!r} spreads the model over devices; l2v puts it on one "
            "(use 'auto', 'cuda', 'cuda:N' or 'cpu')"
        )
    return resolve_device(device_map)


def dtype_from(torch_dtype, base) -> torch.dtype:
    """torch_dtype as transformers reads it: None = float32; "auto" = the dtype config.json records."""
    if torch_dtype is None:
        return torch.float32
    if torch_dtype == "auto":
        cfg = read_json(base / "config.json")
        return resolve_dtype(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return resolve_dtype(torch_dtype)


def check_kwargs(kwargs: dict) -> None:
    """What is left of upstream's **kwargs after l2v took what it uses: ignorable, or an error."""
    bad = []
    for key, value in kwargs.items():
        if key not in IGNORED or (IGNORED[key] is not None and value not in IGNORED[key]):
            bad.append(f"{key}={value!r}" + (f" ({HINTS[key]})" if key in HINTS else ""))
    if bad:
        raise ValueError(
            f"LLM2Vec.from_pretrained: unsupported argument(s) {', '.join(bad)}; l2v takes "
            "pooling_mode, max_length, doc_max_length, skip_instruction, torch_dtype, "
            "device_map, revision and attn_implementation"
        )


def hub_name(given, base: Path, adapter_first: Path | None) -> str:
    """The base model's hub name as upstream saw it (`model.config._name_or_path`): an adapter repository's
    base_model_name_or_path, a hub id as given, or a local folder's config.json `_name_or_path`."""
    if adapter_first:
        return adapter_base(adapter_first)
    if is_hub_id(given):
        return str(given).partition("@")[0]
    name = read_json(base / "config.json").get("_name_or_path", "")
    return name if isinstance(name, str) else ""


def _setting(name: str, doc: str) -> property:
    def get(self):
        return getattr(self.encoder, name)

    def put(self, value):
        setattr(self.encoder, name, value)

    return property(get, put, doc=doc)


class LLM2Vec:
    """An `Encoder` behind upstream llm2vec's interface; `encoder` is the l2v object doing the work."""

    def __init__(self, encoder: Encoder):
        if not isinstance(encoder, Encoder):
            raise TypeError(
                "LLM2Vec(encoder): build it with LLM2Vec.from_pretrained(...), or from an l2v "
                f"Encoder (not from a transformers model: got {type(encoder).__name__})"
            )
        self.encoder = encoder

    pooling_mode = _setting("pooling", "mean | weighted_mean | eos_token | last_token | bos_token")
    max_length = _setting("max_length", "token limit of instruction + text")
    doc_max_length = _setting("doc_max_length", "texts are shortened by words to this many tokens first")
    skip_instruction = _setting("skip_instruction", "pool the text's tokens only")

    @property
    def model(self):
        return self.encoder.model

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @classmethod
    def from_pretrained(
        cls,
        base_model_name_or_path,
        peft_model_name_or_path=None,
        merge_peft=False,
        enable_bidirectional=True,
        extra_model_name_or_path=None,
        **kwargs,
    ) -> LLM2Vec:
        """Base model (a folder or a hub id; an adapter repository such as upstream's `...-mntp` loads the
        base model it names and merges itself first), then peft_model_name_or_path, then each of
        extra_model_name_or_path (a name or a list), merged in that order. merge_peft is accepted: adapters
        are always merged. kwargs: pooling_mode, max_length, doc_max_length, skip_instruction (None = not
        given, as upstream), torch_dtype (or dtype), device_map, revision (of a hub base model), and the
        loading arguments that change nothing here (attn_implementation, trust_remote_code, ...)."""
        settings = {k: kwargs.pop(k) for k in list(UPSTREAM_KEYS) if k in kwargs}
        settings = {k: v for k, v in settings.items() if v is not None}
        dtype = kwargs.pop("torch_dtype", None)
        dtype = kwargs.pop("dtype", None) if dtype is None else dtype
        device = device_from_map(kwargs.pop("device_map", None))
        revision = kwargs.pop("revision", None)
        check_kwargs(kwargs)
        path = (str, os.PathLike)
        if not isinstance(base_model_name_or_path, path):
            raise TypeError(
                "base_model_name_or_path must be a folder or a hub id, "
                f"got {type(base_model_name_or_path).__name__}"
            )
        if peft_model_name_or_path is not None and not isinstance(peft_model_name_or_path, path):
            raise TypeError(
                "peft_model_name_or_path must be a folder, a hub id or None, "
                f"got {type(peft_model_name_or_path).__name__}"
            )
        if not isinstance(enable_bidirectional, (bool, np.bool_)):  # "no" would be truthy: bidirectional
            raise TypeError(f"enable_bidirectional must be True or False, got {enable_bidirectional!r}")
        given = base_model_name_or_path
        if revision is not None and is_hub_id(given) and "@" not in str(given):
            given = f"{given}@{revision}"
        extra = extra_model_name_or_path
        extra = [extra] if isinstance(extra, (str, os.PathLike)) else list(extra or [])
        adapters = [peft_model_name_or_path] * (peft_model_name_or_path is not None) + extra
        base, folders, _ = resolve_model(given, adapters)
        adapter_first = folders[0] if len(folders) > len(adapters) else None
        # Upstream read llm2vec_config.json from one folder: the adapter's, else the base model's.
        found, _ = read_settings(folders[-1] if folders else base)
        cfg = {**DEFAULTS, **{k: v for k, v in found.items() if k in UPSTREAM_KEYS}, **settings}
        encoder = Encoder.from_pretrained(
            base,
            adapters=folders,
            is_causal=not enable_bidirectional,
            dtype=dtype_from(dtype, base),
            pooling=cfg["pooling_mode"],
            max_length=cfg["max_length"],
            doc_max_length=cfg["doc_max_length"],
            skip_instruction=cfg["skip_instruction"],
            prompt="",
            device=device,
            autocast="none",
            chat_template=TEMPLATES_BY_NAME.get(hub_name(given, base, adapter_first)),
            upstream_template=True,
        )
        return cls(encoder)

    def to(self, device) -> LLM2Vec:
        device = resolve_device(device)
        if self.encoder.model.embed_tokens.weight.device != device:
            self.encoder.model.to(device)
        return self

    def eval(self) -> LLM2Vec:
        return self  # encoding always runs in eval mode

    def encode(
        self,
        sentences,
        batch_size: int = 32,
        show_progress_bar: bool = True,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        device=None,
    ):
        """Strings and [instruction, text] pairs -> float32 [N, dim], a CPU tensor (numpy with
        convert_to_numpy=True unless convert_to_tensor=True). device: where the model runs (default: CUDA
        when available, as upstream; the model moves there). batch_size: at most batch_size x max_length
        tokens per forward pass; the embeddings do not depend on it."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(sentences, np.ndarray):  # of strings, or of [instruction, text] rows
            sentences = sentences.tolist()
        if isinstance(sentences, str):
            sentences = [sentences]
        if sentences is None or isinstance(sentences, (bytes, dict)) or not hasattr(sentences, "__iter__"):
            raise TypeError(
                "sentences: expected a list of strings and/or [instruction, text] pairs, "
                f"got {type(sentences).__name__}"
            )
        sentences = list(sentences)
        if sentences and isinstance(sentences[0], str) and isinstance(sentences[-1], int):
            sentences = [sentences]  # upstream's MEDI form: one [instruction, text, id]
        # upstream read an item by its first two elements
        inputs = [tuple(s[:2]) if isinstance(s, (list, tuple)) else s for s in sentences]
        self.to(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        on = self.encoder.model.embed_tokens.weight.device
        budget = min(batch_size * self.encoder.max_length, default_batch_tokens(on))
        emb = self.encoder.encode(inputs, max_batch_tokens=budget, show_progress=show_progress_bar)
        emb = torch.from_numpy(emb)
        return emb.numpy() if convert_to_numpy and not convert_to_tensor else emb
