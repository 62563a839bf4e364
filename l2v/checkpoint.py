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

from .model import ModelConfig, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES.get(dtype, dtype)


def resolve_device(device="auto") -> torch.device:
    """"auto": the current CUDA device when there is one, else the CPU."""
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
        return resolve_dtype(autocast)
    fast = device.type != "cpu" or any(getattr(torch.cpu, f, lambda: False)() for f in
                                       ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
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


def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / "config.json"
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(hf).__name__}")
    return ModelConfig.from_hf(hf, source=str(path))


def l2v_key_to_hf(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


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
            groups = consecutive_groups(list(f.keys()), lambda n: math.prod(f.get_slice(n).get_shape()), GROUP_ELEMENTS)
        with ThreadPoolExecutor(2) as pool:
            for group, tensors in zip(groups, pool.map(lambda g: _read_group(path, g, dtype), groups)):
                yield from zip(group, tensors)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder: one `model.safetensors` or the shards of an index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: shard file(s) missing from {folder}: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
        raise ValueError(f"{folder}: only pickle weights (.bin/.pth) found; l2v loads safetensors only "
                         "(convert with `safetensors` once, in an environment you trust)")
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


def load_model(folder: str | os.PathLike, dtype="float32", device="cpu", is_causal: bool | None = None,
               attention_dropout: float | None = None) -> Transformer:
    """Build on `meta`, then assign tensors read shard by shard: peak memory ~ one copy of weights."""
    folder = Path(folder)
    dtype = resolve_dtype(dtype)
    cfg = load_config(folder)
    if is_causal is not None:
        cfg.is_causal = is_causal
    if attention_dropout is not None:
        cfg.attention_dropout = attention_dropout
    model = meta_model(cfg)
    expected = model.state_dict()
    state, origin = {}, {}
    for path in weight_files(folder):
        for hf_key, t in read_safetensors(path, dtype):
            key = hf_key.removeprefix("model.")  # HF names minus `model.`
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints store a redundant copy of the embedding
            if key in state:
                raise ValueError(f"{path}: tensor {hf_key!r} also in {origin[key]}")
            if key in expected and t.shape != expected[key].shape:
                raise ValueError(f"{path}: tensor {hf_key!r} has shape {tuple(t.shape)}, "
                                 f"config.json implies {tuple(expected[key].shape)}")
            state[key] = t.to(device)
            origin[key] = path.name
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        def show(keys):
            return ", ".join(l2v_key_to_hf(k) for k in keys[:20]) + (" ..." if len(keys) > 20 else "")
        raise ValueError(f"{folder}: weights do not match config.json: "
                         f"{len(missing)} missing [{show(missing)}]; {len(unexpected)} unexpected [{show(unexpected)}]")
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = model.inv_freq.to(device)
    return model.eval()


def save_model_with(model: Transformer, dest: str | os.PathLike, files=(), dtype=None) -> Path:
    """save_model, plus `files` copied in (a tokenizer, encoder settings), into a temporary folder beside
    `dest` that is then renamed into place: an empty `dest` is replaced, never a half-written one left."""
    dest = Path(dest)
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, dtype=dtype)
    for f in map(Path, files):
        if f.is_file():
            shutil.copy(f, tmp / f.name)
    if dest.exists():
        dest.rmdir()  # only an empty folder: rmdir refuses anything else
    os.replace(tmp, dest)
    return dest


def save_model(model: Transformer, folder: str | os.PathLike, dtype=None, max_shard_bytes: int | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index if `max_shard_bytes` is set) in HF layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(dtype) if dtype is not None else None
    tensors = {l2v_key_to_hf(k): (v.to(dtype) if dtype else v).detach().contiguous().cpu()
               for k, v in model.state_dict().items()}
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    with open(folder / "config.json", "w") as f:
        json.dump(hf, f, indent=2)
    if max_shard_bytes is None:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    shards = consecutive_groups(list(tensors), lambda k: tensors[k].numel() * tensors[k].element_size(), max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in shard}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return folder
