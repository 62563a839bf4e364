"""A thin wrapper over `tokenizers.Tokenizer` that reads an HF folder's tokenizer files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .checkpoint import read_json

SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


def _content(tok) -> str | None:
    # special_tokens_map / tokenizer_config store a token as a string or as {"content": ...}.
    return tok.get("content") if isinstance(tok, dict) else tok


def _special_tokens(path: Path) -> dict:
    """The special tokens a file names ({} when there is no file); each a string, {"content": string} or
    null, else one error naming the file and the key."""
    if not path.is_file():
        return {}
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(cfg).__name__}")
    for key in SPECIAL:
        if cfg.get(key) is not None and not isinstance(_content(cfg[key]), str):
            raise ValueError(f'{path}: {key} must be a string or {{"content": string}}, got {cfg[key]!r}')
    return {key: _content(cfg.get(key)) for key in SPECIAL}


def _read(path: Path) -> HFTokenizer:
    """tokenizer.json in any encoding JSON may have (UTF-8 with or without a BOM, UTF-16, UTF-32)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (l2v needs a fast-tokenizer tokenizer.json)")
    raw = path.read_bytes()
    try:
        text = raw.decode(json.detect_encoding(raw))
        return HFTokenizer.from_str(text.removeprefix("\ufeff"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8, UTF-16 or UTF-32 JSON ({e.reason} at byte {e.start})") from None
    except Exception as e:  # tokenizers raises its own (Rust) exception types for a file it cannot parse
        raise ValueError(f"{path}: cannot be read by `tokenizers`: {e}") from None


class Tokenizer:
    def __init__(self, folder: str | os.PathLike, vocab_size: int | None = None):
        """vocab_size: the model's (config.json); a tokenizer with more ids than the model has embeddings
        is refused (its extra ids would index past the embedding table)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        self.tok = _read(path)
        self.tok.no_truncation()
        self.tok.no_padding()
        files = ("tokenizer_config.json", "special_tokens_map.json")
        cfg, smap = (_special_tokens(folder / f) for f in files)
        names = {n: smap.get(n) or cfg.get(n) for n in SPECIAL}
        self.bos_token, self.eos_token = names["bos_token"], names["eos_token"]
        self.bos_id, self.eos_id = self.token_id(self.bos_token), self.token_id(self.eos_token)
        self.unk_id, self.mask_id = self.token_id(names["unk_token"]), self.token_id(names["mask_token"])
        # No pad token (Llama, Mistral): pad with EOS, as upstream llm2vec does. Pads are masked anyway.
        self.pad_id = self.token_id(names["pad_token"])
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        added = self.tok.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids = sorted(
            {i for i, t in added.items() if t.special}
            | {i for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id) if i is not None}
        )
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        top = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if vocab_size is not None and top >= vocab_size:
            raise ValueError(
                f"{path}: token ids up to {top}, but {folder / 'config.json'}'s vocab_size is "
                f"{vocab_size} (this tokenizer is not the model's)"
            )

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        return ids[:max_length] if max_length is not None else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
