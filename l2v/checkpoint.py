"""HF model folder <-> `l2v.model.Transformer`, with `safetensors` only (no transformers, no pickles).
Module names are HF's minus `model.`; q/k weights load verbatim because `model.py` uses HF's
`rotate_half` RoPE layout (HF's conversion already applied its "permute for sliced rotary")."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .files import atomic_write, folder_write, write_text
from .model import ModelConfig, Transformer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype) -> torch.dtype:
    # a torch.dtype too, but only one of these: float64 or integer weights are not what the model runs in
    if dtype not in DTYPES.values() and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES.get(dtype, dtype)


def resolve_device(device="auto") -> torch.device:
    """ "auto": the current CUDA device when there is one, else the CPU."""
    if device == "auto" or device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # meta holds no numbers; l2v is not tested on mps, xpu, ...
        raise ValueError(f"device {device}: not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available here")
    return device


def resolve_autocast(autocast, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for "auto" | "none" | a dtype name on this device; None = off. "auto" is bf16
    where bf16 matmuls beat float32: GPUs, and CPUs with AVX512-BF16 or AMX; on others (AVX2) oneDNN
    falls back to a reference kernel hundreds of times slower."""
    if autocast in (None, "none"):
        return None
    if autocast != "auto":
        if autocast not in DTYPES and not isinstance(autocast, torch.dtype):
            raise ValueError(f"unknown autocast {autocast!r}; use auto, none, bfloat16 or float16")
        return resolve_dtype(autocast)
    fast = device.type != "cpu" or any(
        getattr(torch.cpu, f, lambda: False)()
        for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return torch.bfloat16 if fast else None


def read_json(path: str | os.PathLike) -> dict:
    """json.load with an error that names the file (and the line) instead of a bare JSONDecodeError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    raw = path.read_bytes()
    try:  # JSON may legally be UTF-8 (with or without a BOM), UTF-16 or UTF-32: json detects which
        return json.loads(raw.removeprefix(b"\xef\xbb\xbf"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8, UTF-16 or UTF-32 JSON ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
GEMMA3 = ("gemma3_text", "gemma3")  # "gemma3": multimodal, of which l2v runs the language model
GEMMA_2_3 = ("gemma2", *GEMMA3)
# What transformers' Gemma3TextConfig assumes for a key that a file leaves out: multimodal Gemma 3 files
# hold their text_config as the difference from these defaults (often just the sizes that differ).
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=131_072,
)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(hf: dict, key: str, default, source: str):
    """hf[key] (or `default` when absent) as a finite positive number or None."""
    value = hf.get(key, default)
    if value is not None and not (_is_number(value) and value > 0):
        raise ValueError(f"{source}: {key} must be a positive number or null, got {value!r}")
    return value


REQUIRED = object()
MAX_INT = 2**31 - 1  # beyond any real size; a larger one fails inside torch with a C++ stack dump


def _integer(hf: dict, key: str, source: str, default=REQUIRED, minimum: int = 1):
    """hf[key] as an integer in [minimum, MAX_INT] (a bool is not one); `default` when absent or null, if it
    has one."""
    value = hf.get(key)
    if value is None and default is not REQUIRED:
        return default
    if key not in hf:
        raise ValueError(f"{source}: missing required key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
    if value > MAX_INT:
        raise ValueError(f"{source}: {key} must be at most 2**31 - 1, got {value!r}")
    return value


def _real(hf: dict, key: str, source: str, default: float, ok=lambda v: v > 0, what="> 0") -> float:
    """hf[key] (`default` when absent or null) as a finite number with `ok(value)`."""
    value = hf.get(key)
    if value is None:
        return default
    if not (_is_number(value) and ok(value)):
        raise ValueError(f"{source}: {key} must be a finite number {what}, got {value!r}")
    return float(value)


def _flag(hf: dict, key: str, source: str, default: bool = False) -> bool:
    value = hf.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true, false or null, got {value!r}")
    return default if value is None else value


ROPE_KEYS = {  # what each scaling reads, and what each value must be
    "linear": {"factor": "> 0"},
    "llama3": {
        "factor": "> 0",
        "low_freq_factor": "> 0",
        "high_freq_factor": "> low_freq_factor",
        "original_max_position_embeddings": "an integer >= 1",
    },
}


def _check_rope_scaling(rope: dict, key: str, source: str) -> None:
    """The keys a scaling type needs, each a finite positive number (llama3: high_freq_factor above
    low_freq_factor, as transformers asks; the blend between them divides by their difference)."""
    for k, want in ROPE_KEYS.get(rope["rope_type"], {}).items():
        v = rope.get(k)
        ok = _is_number(v) and v > 0
        if want.startswith("an integer"):
            ok = ok and isinstance(v, int)
        elif want == "> low_freq_factor":
            ok = ok and v > rope["low_freq_factor"]
        if not ok:
            raise ValueError(
                f"{source}: {key}.{k} must be {'a finite number ' * (not want.startswith('an'))}"
                f"{want} for rope_type {rope['rope_type']!r}, got {v!r}"
            )


def _rope(hf: dict, source: str, default_theta: float) -> tuple[float, dict | None, float | None]:
    """(theta, scaling or None, local layers' theta or None) from the flat keys of transformers 4
    (rope_theta, rope_scaling; Gemma 3's rope_local_base_freq) or transformers 5's `rope_parameters`
    (one dict, or for Gemma 3 one per layer type). Scaling applies to global layers only. Where a file
    has both, each value is taken as transformers 5 takes it: a dict's own rope_theta before the flat
    keys, and rope_scaling in place of a flat rope_parameters (for Gemma 3, merged into the global one)."""
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ValueError(f"{source}: {key} must be an object or null, got {hf[key]!r}")
    params, local = dict(hf.get("rope_parameters") or {}), None
    if "full_attention" in params or "sliding_attention" in params:
        local, params = dict(params.get("sliding_attention") or {}), dict(params.get("full_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ValueError(
                f"{source}: unsupported rope_parameters.sliding_attention type "
                f"{local['rope_type']!r}; l2v scales the global layers' RoPE only"
            )
    nested = local is not None
    if hf.get("rope_scaling"):
        params = {**params, **hf["rope_scaling"]} if nested else dict(hf["rope_scaling"])
    if params.get("rope_theta") is not None:
        dict_key = "rope_scaling" if "rope_theta" in (hf.get("rope_scaling") or {}) else "rope_parameters"
        key = f"{dict_key}{'.full_attention' * nested}.rope_theta"
        theta = _real({key: params["rope_theta"]}, key, source, default_theta)
    else:
        theta = _real(hf, "rope_theta", source, default_theta)
    rope = {k: v for k, v in params.items() if k != "rope_theta"}
    kind = rope.get("rope_type", rope.get("type", "default"))
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: unsupported {key} type {kind!r}; l2v supports {SUPPORTED_ROPE_TYPES}")
    rope = {**rope, "rope_type": kind}
    _check_rope_scaling(rope, key, source)
    local_theta = None
    if hf.get("model_type") in GEMMA3:
        if (local or {}).get("rope_theta") is not None:
            key = "rope_parameters.sliding_attention.rope_theta"
            local_theta = _real({key: local["rope_theta"]}, key, source, 10000.0)
        else:
            local_theta = _real(hf, "rope_local_base_freq", source, 10000.0)
    return theta, None if kind == "default" else rope, local_theta


def _layer_types(hf: dict, mt: str, n_layers: int, source: str) -> list[str] | None:
    """Which layers are local (sliding window): the file's `layer_types`, else the family's rule as
    transformers derives it; None = every layer (Mistral)."""
    types = hf.get("layer_types")
    if types is None:
        if mt == "gemma2":  # even layers local
            return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        if mt in GEMMA3:  # every pattern-th layer global
            pattern = hf.get("sliding_window_pattern", 6)
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
                raise ValueError(
                    f"{source}: sliding_window_pattern must be a positive integer, got {pattern!r}"
                )
            return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        if mt in ("qwen2", "qwen3"):  # the layers from max_window_layers on
            first = _integer(hf, "max_window_layers", source, 28, minimum=0)
            return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        return None
    if not isinstance(types, list) or len(types) != n_layers:
        raise ValueError(f"{source}: layer_types must be a list of num_hidden_layers ({n_layers}) entries")
    unknown = sorted({t for t in types if t not in LAYER_TYPES}, key=str)
    if unknown:
        raise ValueError(f"{source}: unsupported layer_types entries {unknown}; l2v supports {LAYER_TYPES}")
    return list(types)


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Map an HF config.json, as the hub and transformers 4 or 5 write it, to a ModelConfig; what l2v
    cannot run faithfully is one ValueError naming the file and the key."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: unsupported model_type {mt!r}; l2v supports {SUPPORTED_MODEL_TYPES}")
    if mt == "gemma3":
        if not isinstance(hf.get("text_config"), dict):
            raise ValueError(f"{source}: model_type 'gemma3' needs a text_config object (the language model)")
        # The LM head is tied (or not) by the outer model's key, as transformers' multimodal Gemma 3 ties it.
        tied = hf.get("tie_word_embeddings", True)
        hf = {**GEMMA3_TEXT_DEFAULTS, **hf["text_config"], "model_type": mt, "tie_word_embeddings": tied}
        source = f"{source}: text_config"
    gemma = mt.startswith("gemma")
    if mt in GEMMA_2_3:
        act_key, act = "hidden_activation", hf.get("hidden_activation") or "gelu_pytorch_tanh"
    elif gemma:  # the first releases say "gelu" and mean the tanh form (so transformers reads it)
        act_key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
        act = hf.get(act_key) or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    else:
        act_key, act = "hidden_act", hf.get("hidden_act", "silu")
    supported = "gelu_pytorch_tanh" if gemma else "silu"  # what each family's checkpoints were trained with
    if act != supported:
        raise ValueError(f"{source}: unsupported {act_key} {act!r}; l2v runs {mt} with {supported!r}")
    cfg = ModelConfig(
        **_sizes(hf, source, gemma or mt == "qwen3"),
        act=act,
        model_type=mt,
        extra=dict(hf),
        norm_eps=_real(hf, "rms_norm_eps", source, 1e-6),
        tie_word_embeddings=_flag(hf, "tie_word_embeddings", source, gemma),
        attention_dropout=_real(hf, "attention_dropout", source, 0.0, lambda v: 0 <= v < 1, "in [0, 1)"),
    )
    n_layers = cfg.n_layers
    cfg.rope_theta, cfg.rope_scaling, cfg.local_rope_theta = _rope(hf, source, 1e6 if mt in GEMMA3 else 1e4)
    if mt == "qwen2":
        cfg.qkv_bias = True
    else:
        cfg.qkv_bias = cfg.o_bias = _flag(hf, "attention_bias", source)
        cfg.mlp_bias = _flag(hf, "mlp_bias", source)
    # Windows: Mistral's on every layer; Qwen's only with use_sliding_window; Gemma 2/3's on local layers.
    if mt == "mistral" or (mt in ("qwen2", "qwen3") and _flag(hf, "use_sliding_window", source)):
        cfg.sliding_window = _integer(hf, "sliding_window", source, None)
    elif mt in GEMMA_2_3:
        cfg.sliding_window = _integer(hf, "sliding_window", source, 4096)
    if mt != "mistral":  # transformers' Mistral has one kind of layer, whatever the file says
        cfg.layer_types = _layer_types(hf, mt, n_layers, source)
    cfg.qk_norm = mt in ("qwen3", *GEMMA3)
    if gemma:
        cfg.embed_scale = cfg.norm_offset = True
        cfg.is_causal = not _flag(hf, "use_bidirectional_attention", source)  # EmbeddingGemma sets it
    if mt in GEMMA_2_3:
        cfg.sandwich_norms = cfg.bidirectional_window = True
        cfg.query_pre_attn_scalar = _positive(hf, "query_pre_attn_scalar", 256, source)
        cfg.final_softcap = _positive(hf, "final_logit_softcapping", 30.0 if mt == "gemma2" else None, source)
    if mt == "gemma2":  # transformers' Gemma 3 reads attn_logit_softcapping but never applies it
        cfg.attn_softcap = _positive(hf, "attn_logit_softcapping", 50.0, source)
    return cfg


def _sizes(hf: dict, source: str, needs_head_dim: bool) -> dict:
    """The sizes of config.json as ModelConfig's fields: positive integers; the query heads a multiple of the
    key/value heads (each of these serves a group); an even head dim (RoPE rotates its two halves)."""
    dim, n_heads = _integer(hf, "hidden_size", source), _integer(hf, "num_attention_heads", source)
    n_kv_heads = _integer(hf, "num_key_value_heads", source, n_heads)
    if n_heads % n_kv_heads:
        raise ValueError(
            f"{source}: num_key_value_heads {n_kv_heads} does not divide num_attention_heads {n_heads}"
        )
    if needs_head_dim and hf.get("head_dim") is None:
        raise ValueError(
            f"{source}: missing head_dim ({hf['model_type']}: not hidden_size / num_attention_heads)"
        )
    head_dim = _integer(hf, "head_dim", source, dim // n_heads)
    if head_dim % 2:
        raise ValueError(f"{source}: head_dim must be even (RoPE rotates two halves), got {head_dim}")
    return dict(
        vocab_size=_integer(hf, "vocab_size", source),
        dim=dim,
        n_layers=_integer(hf, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        intermediate_size=_integer(hf, "intermediate_size", source),
        max_position_embeddings=_integer(hf, "max_position_embeddings", source, 4096),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """An HF config.json dict: the original keys, updated with ours, that transformers and `config_from_hf`
    read back to the same model. RoPE goes in the flat keys that every transformers version reads; a
    multimodal Gemma 3 is written as its language model alone (`gemma3_text`)."""
    hf = {k: v for k, v in cfg.extra.items() if k != "rope_parameters"}
    mt = "gemma3_text" if cfg.model_type == "gemma3" else cfg.model_type
    hf.update(
        model_type=mt,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    hf["hidden_activation" if mt in GEMMA_2_3 else "hidden_act"] = cfg.act
    hf.setdefault("architectures", [ARCHITECTURES[mt]])
    if mt == "llama":
        hf.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
    if mt in ("mistral", "qwen2", "qwen3") or mt in GEMMA_2_3:
        hf["sliding_window"] = cfg.sliding_window
    if mt in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = cfg.sliding_window is not None
    if cfg.layer_types is not None:
        hf["layer_types"] = cfg.layer_types
    if mt in GEMMA_2_3:
        hf.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar, final_logit_softcapping=cfg.final_softcap)
    if mt == "gemma2":
        hf["attn_logit_softcapping"] = cfg.attn_softcap
    if cfg.local_rope_theta is not None:
        hf["rope_local_base_freq"] = cfg.local_rope_theta
    return hf


def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / "config.json"
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(hf).__name__}")
    return config_from_hf(hf, source=str(path))


def l2v_key_to_hf(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


# Multimodal Gemma 3 files keep the language model under one of two prefixes (transformers writes the first,
# its modules are named by the second); l2v does not read the vision tower and its projector.
TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def hf_name_to_l2v(name: str, model_type: str) -> str | None:
    """An HF tensor or module name -> l2v's (HF's minus `model.`); None: multimodal Gemma 3's vision part."""
    if model_type == "gemma3":
        if name.startswith(VISION_PREFIXES):
            return None
        name = next((name[len(p) :] for p in TEXT_PREFIXES if name.startswith(p)), name)
        name = name.removeprefix("language_model.")  # language_model.lm_head.weight
    return name.removeprefix("model.")


def consecutive_groups(items: list, size, limit: int) -> list[list]:
    """Items in order, in groups of at most `limit` total size (a bigger item makes a group alone)."""
    groups, total = [[]], 0
    for x in items:
        if groups[-1] and total + size(x) > limit:
            groups.append([])
            total = 0
        groups[-1].append(x)
        total += size(x)
    return groups


GROUP_ELEMENTS = 16_000_000  # tensors read per file opening: bounds the mapped pages held at once


def _read_group(path: Path, names: list[str], dtype: torch.dtype) -> list[torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return [t.to(dtype) if t.is_floating_point() else t for t in map(f.get_tensor, names)]


def read_safetensors(path: Path, dtype: torch.dtype):
    """Yield (name, tensor cast to `dtype`) from a .safetensors file; integer tensors keep theirs.

    The file is opened once per group of tensors rather than once: its mapped pages count towards the
    process's memory until it is closed, so casting a whole mapped bf16 file to float32 held both
    copies. Two threads overlap one group's reads with another's casts (docs/performance.md)."""
    try:
        with safe_open(path, framework="pt") as f:
            groups = consecutive_groups(
                list(f.keys()), lambda n: math.prod(f.get_slice(n).get_shape()), GROUP_ELEMENTS
            )
        with ThreadPoolExecutor(2) as pool:
            for group, tensors in zip(groups, pool.map(lambda g: _read_group(path, g, dtype), groups)):
                yield from zip(group, tensors)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder: one `model.safetensors` or the shards of an index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file() and (folder / "model.safetensors").is_file():
        # transformers would load the single file, an index reader the shards: one of them is stale
        raise ValueError(
            f"{folder}: both model.safetensors and model.safetensors.index.json; remove the one that is stale"
        )
    if index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or Path(v).name != v), None)
        if bad is not None:
            raise ValueError(
                f"{index}: weight_map[{bad!r}] must be a file name in the folder, got {weight_map[bad]!r}"
            )
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: shard file(s) missing from {folder}: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise ValueError(
            f"{folder}: only pickle weights (.bin/.pth) found; l2v loads safetensors only "
            "(convert with `safetensors` once, in an environment you trust)"
        )
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


@contextlib.contextmanager
def _skip_init():
    """Random init is wasted work when every tensor is about to be replaced; on `meta` its first call
    also pulls in torch's meta-tensor decompositions (seconds of start-up). Skip it while building."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model's modules without weights or init work: for building, and for checking shapes."""
    with torch.device("meta"), _skip_init():
        return Transformer(cfg)


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, safetensors dtype)} from a file's header alone (no tensor is read); a truncated
    file fails here (the header must cover the whole file)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def check_weights(folder: str | os.PathLike, model: Transformer) -> dict[str, str]:
    """The weight files of `folder` checked against `model` (a meta model will do) from their headers: every
    tensor it needs once, of its shape and a floating dtype, nothing else. Returns {l2v key: the file's
    own name for it}. Untied files without lm_head.weight are a base model saved alone (Qwen3-Embedding's
    Qwen3Model, as transformers saves it): `model.config.has_lm_head` becomes False."""
    folder, cfg = Path(folder), model.config
    expected, names, origin = model.state_dict(), {}, {}
    for path in weight_files(folder):
        for hf_key, (shape, dtype) in _headers(path).items():
            key = hf_name_to_l2v(hf_key, cfg.model_type)
            if key is None or (key == "lm_head.weight" and cfg.tie_word_embeddings) or _derived(key):
                continue  # a vision tower, a tied checkpoint's copy of the embedding, RoPE's frequencies
            if key in names:
                raise ValueError(f"{path}: tensor {hf_key!r} also in {origin[key]}")
            if key in expected and shape != tuple(expected[key].shape):
                raise ValueError(
                    f"{path}: tensor {hf_key!r} has shape {shape}, "
                    f"config.json implies {tuple(expected[key].shape)}"
                )
            if key in expected and not dtype.startswith(("F", "BF")):  # F64 F32 F16 BF16 F8_*
                raise ValueError(
                    f"{path}: tensor {hf_key!r} has dtype {DTYPE_NAMES.get(dtype, dtype)}; "
                    "model weights are floating point"
                )
            names[key], origin[key] = hf_key, path.name
    if "lm_head.weight" in expected and "lm_head.weight" not in names:
        cfg.has_lm_head = False
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:

        def show(keys):
            shown = [names.get(k, l2v_key_to_hf(k)) for k in keys]  # the file's own names where known
            return ", ".join(shown[:20]) + (" ..." if len(shown) > 20 else "")

        raise ValueError(
            f"{folder}: weights do not match config.json: {len(missing)} missing "
            f"[{show(missing)}]; {len(unexpected)} unexpected [{show(unexpected)}]"
        )
    return names


def _derived(key: str) -> bool:
    """RoPE's inverse frequencies, which older Llama checkpoints saved as tensors: computed from config.json,
    and ignored by transformers too."""
    return key.endswith("rotary_emb.inv_freq")


DTYPE_NAMES = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def load_model(
    folder: str | os.PathLike,
    dtype="float32",
    device="cpu",
    is_causal: bool | None = None,
    attention_dropout: float | None = None,
) -> Transformer:
    """Build on `meta`, check the files' headers against it, then assign tensors read shard by shard: peak
    memory ~ one copy of weights."""
    folder = Path(folder)
    dtype = resolve_dtype(dtype)
    cfg = load_config(folder)
    if is_causal is not None:
        cfg.is_causal = is_causal
    if attention_dropout is not None:
        cfg.attention_dropout = attention_dropout
    model = meta_model(cfg)
    names = check_weights(folder, model)
    if not cfg.has_lm_head:
        model.lm_head = None
    state = {}
    for path in weight_files(folder):
        for hf_key, t in read_safetensors(path, dtype):
            key = hf_name_to_l2v(hf_key, cfg.model_type)
            if key in names:
                state[key] = t.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    for name, buf in model.named_buffers(recurse=False):  # RoPE's inverse frequencies, built on the CPU
        setattr(model, name, buf.to(device))
    return model.eval()


def save_model_with(model: Transformer, dest: str | os.PathLike, files=(), dtype=None) -> Path:
    """save_model, plus `files` copied in (a tokenizer, encoder settings), into a temporary folder beside
    `dest` that is then renamed into place: an empty `dest` is replaced, never a half-written one left."""
    dest = Path(dest)
    dest = dest.resolve() if dest.is_symlink() else dest  # a link to an empty folder: fill the folder
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with folder_write(dest, tmp):
        save_model(model, tmp, dtype=dtype)
        for f in map(Path, files):
            if f.is_file():
                shutil.copy(f, tmp / f.name)
    if dest.exists():
        dest.rmdir()  # only an empty folder: rmdir refuses anything else
    os.replace(tmp, dest)
    return dest


def save_model(
    model: Transformer, folder: str | os.PathLike, dtype=None, max_shard_bytes: int | None = None
) -> Path:
    """Write config.json + safetensors (sharded with an index if `max_shard_bytes` is set) in HF layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(dtype) if dtype is not None else None
    tensors = {
        l2v_key_to_hf(k): (v.to(dtype) if dtype else v).detach().contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    hf = config_to_hf(model.config)
    hf["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_text(folder / "config.json", json.dumps(hf, indent=2) + "\n")  # as read: NaN kept, if any
    if max_shard_bytes is None:
        _save(folder / "model.safetensors", tensors)
        return folder
    shards = consecutive_groups(
        list(tensors), lambda k: tensors[k].numel() * tensors[k].element_size(), max_shard_bytes
    )
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save(folder / name, {k: tensors[k] for k in shard})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return folder


def _save(path: Path, tensors: dict) -> None:
    # safetensors' writer, through a temporary file: a full disk is one error naming the file
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
