"""Text -> vector, with upstream LLM2Vec's encoding semantics (llm2vec 0.2.3 `LLM2Vec.encode`).

What one input goes through (see ../shared/reference/oracle/README.md §4 for the reference recipe):
  1. an input is a plain string or an (instruction, text) pair; a string is the pair ("", text);
  2. the text is shortened *by words* until it has at most `doc_max_length` tokens (upstream's loop);
  3. the model sees `instruction.strip() + " " + text` (just `text` when the instruction is empty),
     cut to `max_length` tokens from the right;
  4. the embed mask is the LAST n positions of the row, n = the token count of the text tokenized on
     its own (skip_instruction=True): the model attends to the instruction, pooling skips it;
  5. pooling over the embed mask: mean | weighted_mean | eos_token | last_token | bos_token.

Deliberate differences from upstream, none of which changes a `batch_size=1` embedding:
  - rows are padded on the RIGHT and positions count real tokens (the model's default), so padding
    does not move RoPE positions (upstream's left padding does, and its results change with the
    batch size). Rounding still differs with the padded length: float32 GEMM and attention kernels
    accumulate in a shape-dependent order, and 30 layers amplify 1e-7 into 1e-4. So a batch holds
    only rows of one length (rounded up to `pad_multiple`, default 1: no padding at all): a row then
    goes through the same kernel shapes alone or in any batch (measured on CPU: bs1 and bs32 are
    bit-identical; unbucketed right padding differed by up to 1.3e-4). On STS-B, rounding to 8 would
    add 27% padded tokens and cost 15% of the encode speed; exact lengths still fill batches of 32;
  - batches are sorted by token count (upstream: character count) before batching;
  - an empty text is an error (upstream silently pooled the whole padded row);
  - a chat template is chosen explicitly (`chat_template=`), not by matching the model's hub name, and
    its tokens always stay outside the embed mask.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model, read_json, resolve_dtype
from .tokenizer import Tokenizer

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
CONFIG_FILE = "llm2vec_config.json"
CONFIG_KEYS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
# (before, after) the user turn; upstream applied these by hub name (Meta-Llama-3-8B-Instruct, Qwen2-*-Instruct).
CHAT_TEMPLATES = {
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "chatml": ("<|im_start|>user\n", "<|im_end|>"),  # Qwen2, SmolLM2
}
TEMPLATE_TOKENS = {"llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                   "chatml": ("<|im_start|>", "<|im_end|>")}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, embed_mask: torch.Tensor | None = None,
         mode: str = "mean", input_ids: torch.Tensor | None = None, bos_id: int | None = None) -> torch.Tensor:
    """Pool hidden (B, T, D) into (B, D) float32. Masks are (B, T), 1 = real token / pooled token.

    mean / weighted_mean use embed_mask (all real tokens when None); weighted_mean weighs the pooled
    positions 1, 2, ..., n from first to last, normalised to sum 1 (later tokens have seen more under
    causal attention). eos_token / last_token take the last real token, whatever the embed mask says
    (upstream does the same). bos_token averages the real positions holding `bos_id`.
    Works for either padding side; sums are float32 even for bf16 hidden states.
    """
    h = hidden.float()
    real = attention_mask.to(h.device).bool()  # (B, T)
    B, T = real.shape
    if mode in ("eos_token", "last_token"):
        pos = torch.arange(T, device=h.device)
        last = torch.where(real, pos, -1).max(dim=-1).values  # (B,) index of the last real token
        if bool((last < 0).any()):
            raise ValueError("pool: a row has no real token")
        return h[torch.arange(B, device=h.device), last]
    if mode in ("mean", "weighted_mean"):
        w = real if embed_mask is None else real & embed_mask.to(h.device).bool()
        w = w.float()
        if mode == "weighted_mean":
            w = w.cumsum(-1) * w  # 1..n over the pooled positions, 0 elsewhere
    elif mode == "bos_token":
        if input_ids is None or bos_id is None:
            raise ValueError("bos_token pooling needs input_ids and bos_id (this tokenizer may have no BOS)")
        w = (real & (input_ids.to(h.device) == bos_id)).float()
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {POOLING_MODES}")
    total = w.sum(-1, keepdim=True)  # (B, 1)
    if bool((total == 0).any()):
        raise ValueError(f"{mode} pooling: a row has no position to pool"
                         + (f" (no token with the BOS id {bos_id})" if mode == "bos_token" else ""))
    w = w / total  # normalise the weights first, then one weighted sum (as upstream)
    return (h * w[..., None]).sum(dim=1)  # (B, D)


def shorten_by_words(text: str, count_tokens, doc_max_length: int) -> str:
    """Upstream's loop: while the text has more than doc_max_length tokens, keep the first
    int(words * doc_max_length / tokens) whitespace-separated words, joined by single spaces."""
    n = count_tokens(text)
    while n > doc_max_length:
        words = text.split()
        keep = int(len(words) * (doc_max_length / n))  # same float expression as upstream
        if keep == 0:
            # A single word longer than the limit: upstream would empty the text; we keep it and
            # let the max_length cut apply.
            break
        text = " ".join(words[:keep])
        n = count_tokens(text)
    return text


def read_llm2vec_config(*folders) -> dict:
    """Settings from `llm2vec_config.json` in each folder that has one; later folders win."""
    out = {}
    for folder in folders:
        path = Path(folder) / CONFIG_FILE
        if path.is_file():
            cfg = read_json(path)
            out.update({k: cfg[k] for k in CONFIG_KEYS if k in cfg})
    return out


def detect_chat_template(tokenizer: Tokenizer) -> str | None:
    """The template whose special tokens this vocabulary has (for chat_template="auto"), or None."""
    for name, tokens in TEMPLATE_TOKENS.items():
        if all(tokenizer.token_id(t) is not None for t in tokens):
            return name
    return None


def eos_suffix_for(model_type: str, tokenizer: Tokenizer) -> str:
    """What eos_token pooling appends. Upstream appends the literal " </s>" for every Llama/Mistral
    config -- in vocabularies without `</s>` (Llama 3, SmolLM2) that is just three ordinary tokens, but
    it is what the published models were evaluated with. Qwen2 gets its <|endoftext|>, and Llama-3
    base (upstream matched it by name) its <|end_of_text|>."""
    if model_type == "qwen2":
        return "<|endoftext|>"
    if tokenizer.eos_token == "<|end_of_text|>":
        return "<|end_of_text|>"
    return " </s>"


class Encoder:
    """A model + tokenizer + pooling settings. `encode` for inference, `embed_batch` for training."""

    def __init__(self, model, tokenizer: Tokenizer, pooling: str = "mean", max_length: int = 512,
                 doc_max_length: int = 400, skip_instruction: bool = True, chat_template: str | None = None,
                 eos_suffix: str = " </s>", pad_multiple: int = 1, autocast=None):
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {pooling!r}; choose one of {POOLING_MODES}")
        if chat_template == "auto":
            chat_template = detect_chat_template(tokenizer)
        if chat_template is not None:
            if chat_template not in CHAT_TEMPLATES:
                raise ValueError(f"unknown chat template {chat_template!r}; choose one of {sorted(CHAT_TEMPLATES)}")
            missing = [t for t in TEMPLATE_TOKENS[chat_template] if tokenizer.token_id(t) is None]
            if missing:
                raise ValueError(f"chat template {chat_template!r}: tokens {missing} are not in this vocabulary")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.max_length, self.doc_max_length = pooling, max_length, doc_max_length
        self.skip_instruction, self.chat_template, self.eos_suffix = skip_instruction, chat_template, eos_suffix
        self.pad_multiple = max(1, pad_multiple)
        # bf16 matmuls over float32 weights (the residual stream stays float32); None = off.
        self.autocast = None if autocast is None else resolve_dtype(autocast)

    @classmethod
    def from_pretrained(cls, model_dir, adapters=(), is_causal: bool = False, dtype="float32",
                        pooling: str | None = None, max_length: int | None = None,
                        doc_max_length: int | None = None, skip_instruction: bool | None = None,
                        chat_template: str | None = None, device="cpu", autocast=None) -> "Encoder":
        """Base model, then each PEFT-format adapter merged in order (MNTP, then SimCSE/supervised).

        Settings: explicit arguments, else `llm2vec_config.json` (last adapter wins over the model
        folder), else upstream's defaults (mean, 512, 400, skip_instruction=True).
        dtype="bfloat16" stores bf16 weights (upstream's choice; half the memory); autocast="bfloat16"
        keeps float32 weights and residual stream and runs the matmuls in bf16 (closer to float32:
        on the demo model, STS-B cosines to float32 averaged 0.998 vs 0.995 for bf16 weights).
        """
        adapters = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
        cfg = read_llm2vec_config(model_dir, *adapters)
        dtype = resolve_dtype(dtype)
        # Merge adapters in float32 and cast afterwards: B @ A added to bf16 weights would lose most of it.
        model = load_model(model_dir, dtype=torch.float32 if adapters else dtype, device=device, is_causal=is_causal)
        if adapters:
            from .lora import load_adapter  # written separately; only needed here
            for folder in adapters:
                load_adapter(model, folder, merge=True)
            for p in model.parameters():  # parameters only: the RoPE inv_freq buffer stays float32
                p.data = p.data.to(dtype)
        model.requires_grad_(False)
        tok = Tokenizer(model_dir)
        return cls(model, tok,
                   pooling=pooling or cfg.get("pooling_mode", "mean"),
                   max_length=max_length or cfg.get("max_length", 512),
                   doc_max_length=doc_max_length or cfg.get("doc_max_length", 400),
                   skip_instruction=cfg.get("skip_instruction", True) if skip_instruction is None else skip_instruction,
                   chat_template=chat_template,
                   eos_suffix=eos_suffix_for(model.config.model_type, tok), autocast=autocast)

    # ---- preparation: strings -> ids + embed mask (needs only the tokenizer) ----

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False, max_length=self.max_length))

    def prepare(self, instruction: str, text: str, index: int = 0) -> tuple[list[int], list[int]]:
        """One (instruction, text) -> (input_ids, embed_mask), both lists of the row's length."""
        if not isinstance(instruction, str) or not isinstance(text, str):
            raise TypeError(f"input {index}: expected a string or an (instruction, text) pair of strings")
        if self.count_tokens(text) == 0:
            # Upstream would pool the whole padded row here; an error is more useful.
            raise ValueError(f"input {index}: the text is empty (nothing to embed)")
        text = shorten_by_words(text, self.count_tokens, self.doc_max_length)
        head = instruction.strip() + " " if instruction else ""  # `if instruction`, exactly as upstream
        before, after = CHAT_TEMPLATES[self.chat_template] if self.chat_template else ("", "")
        eos = self.pooling == "eos_token"
        if eos or self.chat_template:
            # Upstream strips its whole "head + separator + text" string before templating or
            # appending EOS: the head loses leading, the text trailing whitespace.
            head, text = head.lstrip(), text.rstrip()
        if eos and not self.chat_template:
            # Upstream appends the EOS string to the text part, so it is counted in the embed mask
            # (it does not matter for the embedding: eos_token pooling ignores the mask).
            text, after = text + self.eos_suffix, ""
        elif eos:
            after = after + self.eos_suffix
        n = self.count_tokens(text)
        tail = self.tokenizer.encode(after, add_special_tokens=False) if after else []
        ids = self.tokenizer.encode(before + head + text, add_special_tokens=True)
        ids = ids[:self.max_length - len(tail)]  # cut from the right; a template's closing tokens survive
        # The embed mask is a COUNT from the end, not an alignment (upstream, and how the published
        # LLM2Vec models got their numbers): when the text tokenizes differently inside the string, or
        # the cut above removed its end, the window shifts onto the instruction's last tokens.
        n_head = len(self.tokenizer.encode(before, add_special_tokens=True)) if before else 0
        n = min(n, len(ids) - n_head)
        if not self.skip_instruction:
            n = len(ids)
        mask = [0] * (len(ids) - n) + [1] * n + [0] * len(tail)
        return ids + tail, mask

    def prepare_inputs(self, inputs) -> list[tuple[list[int], list[int]]]:
        out = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                out.append(self.prepare("", item, i))
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                out.append(self.prepare(item[0], item[1], i))
            else:
                raise TypeError(f"input {i}: expected a string or an (instruction, text) pair, got {type(item).__name__}"
                                + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
        return out

    def padded_length(self, n: int) -> int:
        return -(-n // self.pad_multiple) * self.pad_multiple

    def collate(self, rows: list[tuple[list[int], list[int]]]):
        """Right-pad prepared rows to the longest (rounded up to pad_multiple) -> input_ids, attention_mask,
        embed_mask, each (B, T) int64."""
        T = self.padded_length(max(len(r[0]) for r in rows))
        ids, attn = self.tokenizer.pad([r[0] for r in rows], side="right", pad_to=T)
        embed = torch.zeros_like(attn)
        for i, (_, m) in enumerate(rows):
            embed[i, :len(m)] = torch.tensor(m, dtype=torch.long)
        return ids, attn, embed

    # ---- model side ----

    def embed_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    embed_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) tensors -> (B, D) float32 embeddings, differentiable (for training)."""
        device = self.model.embed_tokens.weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self.model(input_ids, attention_mask)  # (B, T, D); causal or not per model.config
        return pool(hidden, attention_mask, embed_mask.to(device), self.pooling,
                    input_ids=input_ids, bos_id=self.tokenizer.bos_id)

    def encode(self, inputs, batch_size: int = 32, normalize: bool = False,
               show_progress: bool = False) -> np.ndarray:
        """Inputs (strings and/or (instruction, text) pairs) -> float32 array [N, D] in input order."""
        if isinstance(inputs, str):
            inputs = [inputs]
        rows = self.prepare_inputs(inputs)
        dim = self.model.config.dim
        out = np.zeros((len(rows), dim), dtype=np.float32)
        # Longest first; a batch never mixes padded lengths (see the module docstring), so a row's
        # embedding is the same whatever else is encoded with it. Results go back by index.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        batches, padded = [], None
        for i in order:
            T = self.padded_length(len(rows[i][0]))
            if batches and T == padded and len(batches[-1]) < batch_size:
                batches[-1].append(i)
            else:
                batches.append([i])
                padded = T
        if show_progress:
            from tqdm import tqdm
            batches = tqdm(batches, unit="batch", desc="encode")
        was_training = self.model.training
        self.model.eval()
        device = self.model.embed_tokens.weight.device
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=self.autocast or torch.bfloat16,
                                                        enabled=self.autocast is not None):
                for idx in batches:
                    emb = self.embed_batch(*self.collate([rows[i] for i in idx]))
                    if normalize:
                        emb = torch.nn.functional.normalize(emb, dim=-1)
                    out[idx] = emb.cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    def save_config(self, folder) -> Path:
        """Write llm2vec_config.json (upstream's keys) so `from_pretrained` restores these settings."""
        path = Path(folder) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = dict(pooling_mode=self.pooling, max_length=self.max_length,
                   doc_max_length=self.doc_max_length, skip_instruction=self.skip_instruction)
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        return path
