"""Model and adapter folders by name: a local folder wins; anything else shaped like a Hugging Face hub id
(`org/name`, optionally `org/name@revision`) is fetched with `huggingface_hub.snapshot_download`, or
found in its local cache when HF_HUB_OFFLINE=1. `huggingface_hub` is an optional dependency, imported
here only when an id has to be resolved.

Only what l2v reads is fetched: JSON files (configs, tokenizer.json) and safetensors weights named as
transformers and peft write them. Never pickles; never Mistral's `consolidated.safetensors`, a second
copy of the same weights in another layout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .checkpoint import read_json

PATTERNS = ["*.json", "model*.safetensors", "adapter_model.safetensors"]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment variable


def offline() -> bool:
    return any(os.environ.get(v, "").upper() in TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> Path:
    """The hub cache as huggingface_hub finds it, read from the environment now: huggingface_hub reads it
    once, at import, so a caller that sets HF_HOME afterwards (a notebook, a test) would get the old one."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def is_hub_id(name) -> bool:
    """`org/name[@revision]` that is not a local path: nothing by that name exists, and its first part is
    not a local folder (so a mistyped `runs/x` stays a missing folder, not a hub look-up)."""
    text = str(name)
    return (
        REPO_ID.fullmatch(text) is not None
        and not Path(text).exists()
        and not Path(text.split("/")[0]).is_dir()
    )


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def resolve(name_or_path, what: str = "model") -> Path:
    """A local folder as it is; a hub id -> its snapshot folder in the hub cache (downloaded if needed)."""
    if not is_hub_id(name_or_path):
        return Path(name_or_path)
    name = str(name_or_path)
    repo_id, _, revision = name.partition("@")
    hub = _hub()
    if hub is None:
        raise OSError(
            f"{name}: no such folder; to load the {what} of that name from the Hugging Face hub, "
            "install huggingface_hub (pip install huggingface_hub)"
        )
    try:
        folder = hub.snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=PATTERNS,
            cache_dir=cache_dir(),
            local_files_only=offline(),
        )
    except Exception as e:  # the hub's error classes moved between versions: classify by name
        raise OSError(hub_error(name, what, e)) from None
    return Path(folder)


def hub_error(name: str, what: str, e: Exception) -> str:
    kind = type(e).__name__
    if offline():
        return (
            f"{name}: no such folder, and not in the Hugging Face hub cache {cache_dir()} "
            "(HF_HUB_OFFLINE=1: nothing is downloaded; unset it to download)"
        )
    if kind in ("RepositoryNotFoundError", "GatedRepoError"):
        return (
            f"{name}: no such folder, and no {what} of that name on the Hugging Face hub that this "
            "machine may read (private or gated? log in with `hf auth login`)"
        )
    if kind == "RevisionNotFoundError":
        return f"{name}: the hub repository has no such revision"
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (
        f"{name}: no such folder, and not in the hub cache {cache_dir()}; the Hugging Face hub could not "
        f"be reached ({kind}: {detail[:200]})"
    )


def is_adapter_only(folder: Path) -> bool:
    """A PEFT adapter without model weights: upstream's published `...-mntp` repositories (adapter,
    config.json, tokenizer) and l2v's own adapter folders."""
    return (folder / "adapter_config.json").is_file() and not any(
        (folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")
    )


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder names (`base_model_name_or_path`, a folder or a hub id)."""
    path = folder / "adapter_config.json"
    cfg = read_json(path)
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path}: no base_model_name_or_path; give the base model, {folder} as an adapter")
    return base


def resolve_model(model, adapters=()) -> tuple[Path, list[Path], Path]:
    """(base model folder, adapter folders in merge order, tokenizer folder) for a model and its adapters,
    each a folder or a hub id. A model that is itself an adapter (upstream's MNTP repositories) stands for
    its base model with itself merged first, and keeps its own tokenizer when it has one (as upstream)."""
    base = resolve(model, "model")
    adapters = [resolve(a, "adapter") for a in adapters]
    tokenizer = base
    if is_adapter_only(base):
        adapters.insert(0, base)
        tokenizer, base = base, resolve(adapter_base(base), "model")
        if is_adapter_only(base):
            raise ValueError(
                f"{adapters[0]}: its base model {base} is an adapter too; pass the base model "
                "and the adapters in order instead"
            )
        if not (tokenizer / "tokenizer.json").is_file():
            tokenizer = base
    return base, adapters, tokenizer
