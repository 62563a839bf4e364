"""The encoder settings a model or adapter folder carries, written and read here only.

- `llm2vec_config.json`: upstream's file, its four keys only (upstream passes every key it finds to
  `LLM2Vec(...)`, so an extra key would break it): pooling_mode, max_length, doc_max_length,
  skip_instruction.
- `encoder_config.json`: what upstream's file cannot hold: is_causal, prompt, and the adapters this one was
  trained on top of (their weights' sha256, in order), so an encoder can refuse a wrong chain.
- `train_config.json` (train.py's resolved run config) is read for is_causal and prompt where an older
  folder has no encoder_config.json.
Later folders win: base model < first adapter < ... < last adapter < the caller's arguments.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import read_json
from .files import sha256_file, write_json

UPSTREAM_FILE, L2V_FILE, TRAIN_FILE = "llm2vec_config.json", "encoder_config.json", "train_config.json"
SETTINGS_FILES = (UPSTREAM_FILE, L2V_FILE, TRAIN_FILE)
# Upstream's defaults (bidirectional, mean pooling), for a folder that says nothing.
DEFAULTS = {
    "pooling_mode": "mean",
    "max_length": 512,
    "doc_max_length": 400,
    "skip_instruction": True,
    "is_causal": False,
    "prompt": None,
}
UPSTREAM_KEYS = {"pooling_mode": str, "max_length": int, "doc_max_length": int, "skip_instruction": bool}
L2V_KEYS = {"is_causal": bool, "prompt": (str, type(None))}


def check_prompt(prompt: str | None, where: str) -> str | None:
    """A prompt template wraps each text: exactly one {text} slot. "" and None are no prompt."""
    if prompt and prompt.count("{text}") != 1:
        raise ValueError(f"{where}: {prompt!r} needs exactly one {{text}} slot")
    return prompt or None


def adapter_sha256(folder: str | os.PathLike) -> str:
    """The identity of an adapter: the sha256 of its weights file (moving or renaming it keeps it)."""
    return sha256_file(Path(folder) / "adapter_model.safetensors")


def write_settings(
    folder: str | os.PathLike,
    pooling_mode: str,
    is_causal: bool,
    prompt: str | None,
    *,
    max_length: int = DEFAULTS["max_length"],
    doc_max_length: int = DEFAULTS["doc_max_length"],
    skip_instruction: bool = True,
    trained_on: list | None = None,
) -> None:
    """Both files into `folder`. trained_on: the adapter folders merged before this one was trained."""
    folder = Path(folder)
    upstream = {
        "pooling_mode": pooling_mode,
        "max_length": max_length,
        "doc_max_length": doc_max_length,
        "skip_instruction": skip_instruction,
    }
    ours = {"is_causal": is_causal, "prompt": prompt or None}
    if trained_on is not None:
        ours["trained_on"] = [{"path": str(a), "sha256": adapter_sha256(a)} for a in trained_on]
    for name, obj in ((UPSTREAM_FILE, upstream), (L2V_FILE, ours)):
        write_json(folder / name, obj)


def _checked(path: Path, keys: dict) -> dict:
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(cfg).__name__}")
    out = {}
    for k in set(keys) & set(cfg):
        if not isinstance(cfg[k], keys[k]) or (keys[k] is int and (isinstance(cfg[k], bool) or cfg[k] < 1)):
            raise ValueError(f"{path}: {k}: unusable value {cfg[k]!r}")
        out[k] = check_prompt(cfg[k], f"{path}: prompt: unusable value") if k == "prompt" else cfg[k]
    return out


def read_settings(*folders) -> tuple[dict, list[str]]:
    """(settings found in the folders, later folders winning; the files they came from)."""
    out, sources = {}, []
    for folder in folders:
        folder = Path(folder)
        ours = folder / L2V_FILE
        files = [
            (folder / UPSTREAM_FILE, UPSTREAM_KEYS),
            (ours if ours.is_file() else folder / TRAIN_FILE, L2V_KEYS),
        ]
        for path, keys in files:
            if path.is_file():
                found = _checked(path, keys)
                out.update({k: (v or None) if k == "prompt" else v for k, v in found.items()})
                sources += [str(path)] if found else []
    return out, sources


def check_chain(adapters: list) -> None:
    """Each adapter that recorded what it was trained on top of must come right after exactly those
    adapters, in that order: a SimCSE adapter without its MNTP adapter (or after it in reverse) encodes
    garbage without a word otherwise. Adapters that recorded nothing (upstream's) are not checked."""
    shas: list[str] = []
    for k, folder in enumerate(adapters):
        path = Path(folder) / L2V_FILE
        recorded = read_json(path).get("trained_on") if path.is_file() else None
        if isinstance(recorded, list):
            want = [r.get("sha256") if isinstance(r, dict) else None for r in recorded]
            if want != shas[:k]:
                names = (
                    ", ".join(str(r.get("path")) if isinstance(r, dict) else "?" for r in recorded)
                    or "the base alone"
                )
                given = ", ".join(map(str, adapters[:k])) or "nothing"
                raise ValueError(
                    f"{folder}: trained on top of [{names}] ({path}), but given after [{given}]; "
                    "pass the adapters in the order they were trained (or skip this check)"
                )
        shas.append(adapter_sha256(folder))
