"""A thin wrapper over `tokenizers.Tokenizer` that reads an HF folder's tokenizer files."""
from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .checkpoint import read_json


def _content(tok) -> str | None:
    # special_tokens_map / tokenizer_config store a token as a string or as {"content": ...}.
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found (l2v needs a fast-tokenizer tokenizer.json)")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot be read by `tokenizers`: {e}") from None
        self.tok.no_truncation()
        self.tok.no_padding()
        cfg, smap = ({} if not (folder / f).is_file() else read_json(folder / f)
                     for f in ("tokenizer_config.json", "special_tokens_map.json"))
        names = {n: _content(smap.get(n)) or _content(cfg.get(n))
                 for n in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")}
        self.bos_token, self.eos_token = names["bos_token"], names["eos_token"]
        self.bos_id, self.eos_id = self.token_id(self.bos_token), self.token_id(self.eos_token)
        self.unk_id, self.mask_id = self.token_id(names["unk_token"]), self.token_id(names["mask_token"])
        # No pad token (Llama, Mistral): pad with EOS, as upstream llm2vec does. Pads are masked anyway.
        self.pad_id = self.token_id(names["pad_token"])
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        added = self.tok.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids = sorted({i for i, t in added.items() if t.special} |
                                  {i for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id) if i is not None})
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        return ids[:max_length] if max_length is not None else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
