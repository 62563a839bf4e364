"""HF model folder <-> `l2v.model.Transformer`, with `safetensors` only (no transformers, no pickles).

Our module names are HF's minus the leading `model.`, so the key map is one prefix. q/k weights load
verbatim because `model.py` uses HF's `rotate_half` RoPE layout; HF's conversion script already
applied its "permute for sliced rotary" to Meta's weights, and we must not undo it.
"""
from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import save_file

from .model import ModelConfig, Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device="auto") -> torch.device:
    """"auto": the current CUDA device when there is one, else the CPU."""
    if device == "auto" or device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available here")
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls beat float32 here: on GPUs, and CPUs with AVX512-BF16 or AMX. Without
    them (AVX2-only CPUs) oneDNN falls back to a reference kernel hundreds of times slower."""
    if device.type != "cpu":
        return True
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_autocast(autocast, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for "auto" | "none" | a dtype name on this device; None = off."""
    if autocast in (None, "none"):
        return None
    if autocast == "auto":
        return torch.bfloat16 if fast_bf16(device) else None
    return resolve_dtype(autocast)


def read_json(path: str | os.PathLike) -> dict:
    """json.load with an error that names the file (and the line) instead of a bare JSONDecodeError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / "config.json"
    return ModelConfig.from_hf(read_json(path), source=str(path))


def hf_key_to_l2v(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def l2v_key_to_hf(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                     "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                     "U8": torch.uint8, "BOOL": torch.bool}


CHUNK_BYTES = 8 << 20  # a cast reads through a buffer this small, so it stays in cache and adds no copy


def _read_exact(fd: int, view: memoryview, offset: int) -> int:
    """pread until `view` is full or the file ends; returns the bytes read (no GIL held while reading)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _read_tensor(fd: int, path: Path, name: str, info: dict, start: int, dtype: torch.dtype) -> torch.Tensor:
    src = SAFETENSORS_DTYPES[info["dtype"]]
    a, b = info["data_offsets"]
    out = torch.empty(info["shape"], dtype=dtype if dtype.is_floating_point == src.is_floating_point else src)
    if out.numel() * src.itemsize != b - a:
        raise ValueError(f"{path}: tensor {name!r}: {b - a} bytes for shape {info['shape']} of {info['dtype']}")
    flat = out.view(-1)
    if out.dtype == src:  # same dtype: read straight into the result
        got = _read_exact(fd, memoryview(flat.view(torch.uint8).numpy()), start + a)
    else:  # cast chunk by chunk: never holds a second full-size copy
        buf = torch.empty(min(CHUNK_BYTES, b - a), dtype=torch.uint8)
        view, per, got = memoryview(buf.numpy()), len(buf) // src.itemsize, 0
        for i in range(0, out.numel(), per):
            k = min(per, out.numel() - i)
            n = _read_exact(fd, view[:k * src.itemsize], start + a + got)
            got += n
            if n != k * src.itemsize:
                break
            flat[i:i + k].copy_(buf[:n].view(src))
    if got != b - a:
        raise ValueError(f"{path}: file is truncated (tensor {name!r} ends past the end)")
    return out


def read_safetensors(path: Path, dtype: torch.dtype, threads: int | None = None):
    """Yield (name, tensor cast to `dtype`) from a .safetensors file, in file order.

    Positional reads instead of a memory map: mapped pages count towards the process's resident
    memory until unmapped, so casting a mapped bf16 file to float32 held both copies (1.5x the
    weights). Here the peak is the weights plus one small buffer per reader thread. Reads and casts
    release the GIL, so a few threads overlap them.
    Integer tensors keep their dtype.
    """
    with open(path, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            for name, info in items:
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from None
        start, fd = 8 + n, f.fileno()
        threads = threads or min(4, max(1, torch.get_num_threads()))
        with ThreadPoolExecutor(threads) as pool:
            jobs = [pool.submit(_read_tensor, fd, path, name, info, start, dtype) for name, info in items]
            for (name, _), job in zip(items, jobs):
                yield name, job.result()


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
    with torch.device("meta"), _skip_init():
        model = Transformer(cfg)
    expected = model.state_dict()
    state, origin = {}, {}
    for path in weight_files(folder):
        for hf_key, t in read_safetensors(path, dtype):
            key = hf_key_to_l2v(hf_key)
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
    shards, size = [{}], 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return folder
