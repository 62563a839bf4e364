"""Text -> vector, with upstream LLM2Vec's encoding semantics (llm2vec 0.2.3 `LLM2Vec.encode`).

An input is a string or an (instruction, text) pair. The text is shortened *by words* to at most
`doc_max_length` tokens (upstream's loop); the model sees `instruction.strip() + " " + text`, cut to
`max_length` tokens; pooling (mean | weighted_mean | eos_token | last_token | bos_token) covers the
LAST n positions, n = the text's own token count, so the model attends to the instruction but does
not pool it. Deliberate differences from upstream, none of which changes a single text's embedding:
  - texts are packed: rows of up to `row_tokens` tokens hold several texts that attend only within
    themselves and whose RoPE positions start at 0 (`Transformer.forward`), so no work goes to padding
    and an embedding does not depend on its neighbours, up to rounding (upstream left-pads, which moves
    positions: its results change with the batch size);
  - an empty text, or an instruction that leaves it no room, is an error (upstream pooled padding);
  - `prompt` (e.g. PromptEOL's 'This sentence : "{text}" means in one word:"') wraps each text;
  - a chat template is chosen explicitly, not by the model's hub name, and stays outside the pooling
    (`upstream_template=True`: inside, as upstream, which counts its closing tokens as the text's).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import load_config, load_model, meta_model, resolve_autocast, resolve_device, resolve_dtype
from .data import valid_unicode
from .hub import resolve_model
from .progress import progress
from .settings import DEFAULTS, check_chain, check_prompt, read_settings
from .tokenizer import Tokenizer

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
# (before, after) the user turn; upstream applied these by hub name (Meta-Llama-3-8B-Instruct,
# Qwen2-*-Instruct; "mistral": Mistral-7B-Instruct-v0.2 and Llama-2-7b-chat-hf).
CHAT_TEMPLATES = {
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "chatml": ("<|im_start|>user\n", "<|im_end|>"),  # Qwen2, SmolLM2
    "mistral": ("[INST] ", " [/INST]"),  # plain text: "auto" cannot tell whether a model knows it
    "gemma": ("<bos><start_of_turn>user\n", "<end_of_turn>"),  # upstream's literal <bos>, after the BOS
}
TEMPLATE_TOKEN = r"<\|?\w+\|?>"  # a chat template's special tokens: <|im_start|>, <start_of_turn>


def default_batch_tokens(device: torch.device) -> int:
    """Tokens per forward pass: on CPUs a bigger batch's activations leave the cache and encoding gets
    slower (docs/performance.md); GPUs want big batches."""
    return 2048 if device.type == "cpu" else 16384


def pool_weights(mode: str, embed_mask, input_ids=None, bos_id: int | None = None) -> np.ndarray:
    """One text's pooling as weights over its tokens (float32, summing to 1); 1 in embed_mask = pooled.

    mean: equal weights over the embed mask. weighted_mean: 1, 2, ..., n from first to last pooled token,
    normalised (later tokens have seen more under causal attention). eos_token / last_token: the last
    token, whatever the embed mask says (as upstream). bos_token: the positions holding `bos_id`.
    """
    m = np.asarray(embed_mask, dtype=np.float32)
    if mode == "mean":
        w = m
    elif mode == "weighted_mean":
        w = np.cumsum(m) * m
    elif mode in ("eos_token", "last_token"):
        w = np.zeros_like(m)
        w[-1:] = 1
    elif mode == "bos_token":
        if input_ids is None or bos_id is None:
            raise ValueError(
                "bos_token pooling needs the input ids and a BOS id (this tokenizer may have no BOS)"
            )
        w = (np.asarray(input_ids) == bos_id).astype(np.float32)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {POOLING_MODES}")
    if w.sum() == 0:
        raise ValueError(
            f"{mode} pooling: no position to pool" + (" (no BOS token)" if mode == "bos_token" else "")
        )
    return w / w.sum()  # normalise the weights first, then one weighted sum (as upstream)


def pool(hidden: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Weighted sums of token states into text vectors: hidden (R, T, D), weights (R, T) (0 on padding),
    index (R, T) = the text each token belongs to -> (n, D) float32, even for bf16 hidden states."""
    h = hidden.flatten(0, 1).float() * weights.flatten().to(hidden.device, torch.float32)[:, None]
    return h.new_zeros(n, h.shape[1]).index_add_(0, index.flatten().to(hidden.device), h)


def pack(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Group texts into rows of at most `row_tokens` tokens (a longer text gets a row of its own):
    the longest unplaced text opens a row, the shortest fill what is left. Returns rows of text indices."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows, lo, hi = [], 0, len(order) - 1
    while lo <= hi:
        row, used = [order[lo]], lengths[order[lo]]
        lo += 1
        while lo <= hi and used + lengths[order[hi]] <= row_tokens:
            row.append(order[hi])
            used += lengths[order[hi]]
            hi -= 1
        rows.append(row)
    return rows


@dataclass
class Batch:
    """Packed texts: input_ids, segments (0 = padding, k = the row's k-th text), pooling weights and
    the index of each token's text in `texts` (all (R, T)); `texts` = the texts' input positions, sorted."""

    input_ids: torch.Tensor
    segments: torch.Tensor
    weights: torch.Tensor
    index: torch.Tensor
    texts: list[int]


def collate(rows: list[list[int]], prepared: list[tuple[list[int], np.ndarray]], pad_id: int) -> Batch:
    """Lay out packed rows (lists of indices into `prepared` = [(ids, pooling weights)]) as one Batch."""
    T = max(sum(len(prepared[i][0]) for i in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    seg, index = torch.zeros_like(ids), torch.zeros_like(ids)
    weights = torch.zeros(len(rows), T)
    texts = sorted(i for row in rows for i in row)
    out_pos = {i: j for j, i in enumerate(texts)}  # embeddings come out in input order
    for r, row in enumerate(rows):
        t = 0
        for k, i in enumerate(row, 1):
            x, w = prepared[i]
            ids[r, t : t + len(x)] = torch.tensor(x)
            weights[r, t : t + len(x)] = torch.from_numpy(w)
            seg[r, t : t + len(x)] = k
            index[r, t : t + len(x)] = out_pos[i]
            t += len(x)
    return Batch(ids, seg, weights, index, texts)


def shorten_by_words(text: str, count_tokens, doc_max_length: int) -> str:
    """Upstream's loop: while the text has more than doc_max_length tokens, keep the first
    int(words * doc_max_length / tokens) whitespace-separated words, joined by single spaces."""
    n = count_tokens(text)
    while n > doc_max_length:
        words = text.split()
        keep = int(len(words) * (doc_max_length / n))  # same float expression as upstream
        if keep == 0:  # one word over the limit: upstream would empty the text; max_length cuts it instead
            break
        text = " ".join(words[:keep])
        n = count_tokens(text)
    return text


def missing_template_tokens(name: str, tokenizer: Tokenizer) -> list[str]:
    """The special tokens (<|...|>, <...>) of a chat template that this vocabulary lacks."""
    return [
        t for t in re.findall(TEMPLATE_TOKEN, "".join(CHAT_TEMPLATES[name])) if tokenizer.token_id(t) is None
    ]


def eos_suffix_for(model_type: str, tokenizer: Tokenizer) -> str:
    """What eos_token pooling appends: upstream's literal " </s>" for Llama/Mistral configs (three ordinary
    tokens in vocabularies without `</s>`, e.g. Llama 3 and SmolLM2, but what the published models were
    evaluated with), Qwen2's <|endoftext|>, Gemma's <eos>, Llama-3 base's <|end_of_text|> (upstream matched
    it by name). Qwen3 and Gemma 2/3, which upstream does not know, get their family's."""
    if model_type in ("qwen2", "qwen3"):
        return "<|endoftext|>"
    if model_type.startswith("gemma"):
        return "<eos>"
    if tokenizer.eos_token == "<|end_of_text|>":
        return "<|end_of_text|>"
    return " </s>"


class Encoder:
    """A model + tokenizer + encoding settings. `encode` for inference, `embed` for training."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        pooling: str = "mean",
        max_length: int = 512,
        doc_max_length: int = 400,
        skip_instruction: bool = True,
        chat_template: str | None = None,
        eos_suffix: str = " </s>",
        prompt: str | None = None,
        autocast=None,
        row_tokens: int = 128,
        upstream_template: bool = False,
    ):
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {pooling!r}; choose one of {POOLING_MODES}")
        if chat_template == "auto":  # the template whose special tokens this vocabulary has, if any
            chat_template = next(
                (
                    n
                    for n in CHAT_TEMPLATES
                    if re.search(TEMPLATE_TOKEN, "".join(CHAT_TEMPLATES[n]))
                    and not missing_template_tokens(n, tokenizer)
                ),
                None,
            )
        if chat_template is not None and chat_template not in CHAT_TEMPLATES:
            raise ValueError(
                f"unknown chat template {chat_template!r}; choose one of {sorted(CHAT_TEMPLATES)}"
            )
        missing = missing_template_tokens(chat_template, tokenizer) if chat_template is not None else []
        if missing:
            raise ValueError(f"chat template {chat_template!r}: tokens {missing} are not in this vocabulary")
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string with one {{text}} slot, or None, got {prompt!r}")
        prompt = check_prompt(valid_unicode(prompt, "prompt", "the template") if prompt else None, "prompt")
        for name, value in (
            ("max_length", max_length),
            ("doc_max_length", doc_max_length),
            ("row_tokens", row_tokens),
        ):
            # numpy integers are integers (as for max_batch_tokens); a bool is not a length
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        max_length, doc_max_length, row_tokens = int(max_length), int(doc_max_length), int(row_tokens)
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.max_length, self.doc_max_length = pooling, max_length, doc_max_length
        self.skip_instruction, self.chat_template, self.eos_suffix = (
            skip_instruction,
            chat_template,
            eos_suffix,
        )
        self.prompt, self.row_tokens, self.upstream_template = prompt, row_tokens, upstream_template
        self.settings_sources: list[str] = []  # the files `from_pretrained` took settings from
        self.source = "the model"  # where the weights came from, for messages
        # A dtype for the matmuls (weights and residual stream keep theirs), or None.
        self.autocast = None if autocast in (None, "none") else resolve_dtype(autocast)

    @classmethod
    def from_pretrained(
        cls,
        model_dir,
        adapters=(),
        is_causal: bool | None = None,
        dtype="float32",
        pooling: str | None = None,
        max_length: int | None = None,
        doc_max_length: int | None = None,
        skip_instruction: bool | None = None,
        chat_template: str | None = None,
        prompt: str | None = None,
        device="auto",
        autocast="auto",
        check_inputs=None,
        check_adapters: bool = True,
        upstream_template: bool = False,
    ) -> Encoder:
        """Base model, then each PEFT adapter merged in order (MNTP, then SimCSE/supervised); each a folder or
        a Hugging Face hub id (`l2v.hub`), and a model that is itself an adapter (upstream's `...-mntp`
        repositories) loads the base model its adapter_config.json names, then merges it first. Settings: the
        arguments, else the folders' settings files (`l2v.settings`; the last adapter's first), else
        upstream's defaults (bidirectional, mean). dtype: the weights' (bf16 halves memory); autocast: the
        matmuls' only; device and autocast "auto" as the command lines: CUDA and bf16 where available and
        fast.
        Every file, the adapters' shapes and order (`check_adapters`) and `check_inputs` are checked before
        the weights load."""
        from .adapters import load_adapter, read_adapter  # written separately; only needed here

        path = (str, os.PathLike)
        if not isinstance(model_dir, path):
            raise TypeError(f"model_dir must be a folder path, got {type(model_dir).__name__}")
        for name, value in (("is_causal", is_causal), ("skip_instruction", skip_instruction)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be True, False or None, got {value!r}")
        adapters = [adapters] if isinstance(adapters, path) else adapters
        if not isinstance(adapters, (list, tuple)) or not all(isinstance(a, path) for a in adapters):
            raise TypeError(f"adapters must be a folder or a list of folders, got {adapters!r}")
        model_dir, adapters, tokenizer_dir = resolve_model(model_dir, list(adapters))
        found, sources = read_settings(model_dir, *adapters)
        cfg = {**DEFAULTS, **found}
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        model_cfg = load_config(model_dir)
        tok = Tokenizer(tokenizer_dir, model_cfg.vocab_size)

        def pick(value, key):
            return value if value is not None else cfg[key]

        enc = cls(
            None,
            tok,
            pooling=pick(pooling, "pooling_mode"),
            max_length=pick(max_length, "max_length"),
            doc_max_length=pick(doc_max_length, "doc_max_length"),
            skip_instruction=pick(skip_instruction, "skip_instruction"),
            chat_template=chat_template,
            prompt=pick(prompt, "prompt") or None,
            eos_suffix=eos_suffix_for(model_cfg.model_type, tok),
            autocast=resolve_autocast(autocast, device),
            upstream_template=upstream_template,
        )
        enc.settings_sources, enc.source = sources, " + ".join(map(str, [model_dir, *adapters]))
        meta = meta_model(model_cfg)
        for folder in adapters:
            read_adapter(folder, meta)
        if check_adapters:
            check_chain(adapters)
        if check_inputs is not None:
            enc.prepare_inputs(check_inputs)
        # Merge adapters in float32 and cast afterwards: B @ A added to bf16 weights would lose most of it.
        model = load_model(
            model_dir,
            dtype=torch.float32 if adapters else dtype,
            device=device,
            is_causal=bool(pick(is_causal, "is_causal")),
        )
        for folder in adapters:
            load_adapter(model, folder, merge=True)
        for p in model.parameters():  # parameters only: the RoPE inv_freq buffer stays float32
            p.data = p.data.to(dtype)
        enc.model = model.requires_grad_(False)
        return enc

    # ---- preparation: strings -> ids + embed mask (needs only the tokenizer) ----

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False, max_length=self.max_length))

    def prepare(self, instruction: str, text: str, index: int = 0) -> tuple[list[int], list[int]]:
        """One (instruction, text) -> (input_ids, embed_mask), both lists of the row's length."""
        if not isinstance(instruction, str) or not isinstance(text, str):
            raise TypeError(f"input {index}: expected a string or an (instruction, text) pair of strings")
        valid_unicode(instruction, f"input {index}", "the instruction")
        valid_unicode(text, f"input {index}", "the text")
        if not text.strip():
            # Upstream would pool the whole padded row here; an error is more useful.
            raise ValueError(f"input {index}: the text is empty (nothing to embed)")
        text = shorten_by_words(text, self.count_tokens, self.doc_max_length)
        if self.prompt:
            text = self.prompt.replace("{text}", text)  # the prompt's words are pooled with the text's
        head = instruction.strip() + " " if instruction else ""  # `if instruction`, exactly as upstream
        before, after = CHAT_TEMPLATES[self.chat_template] if self.chat_template else ("", "")
        eos = self.pooling == "eos_token"
        if eos or self.chat_template:
            # Upstream strips its whole "head + separator + text" string before templating or
            # appending EOS: the head loses leading, the text trailing whitespace.
            head, text = head.lstrip(), text.rstrip()
        if self.upstream_template and self.chat_template:
            # Upstream templates the whole string, then splits it at its separator: the closing tokens
            # land in the text's part, so they are counted (pooled) and cut first by max_length.
            # Llama-3's template returned early there: no EOS suffix after it.
            eos_here = eos and self.chat_template != "llama3"
            text, after = text + after + (self.eos_suffix if eos_here else ""), ""
        elif eos and not self.chat_template:
            # Upstream appends the EOS string to the text part, so it is counted in the embed mask
            # (it does not matter for the embedding: eos_token pooling ignores the mask).
            text, after = text + self.eos_suffix, ""
        elif eos:
            after = after + self.eos_suffix
        n = self.count_tokens(text)
        tail = self.tokenizer.encode(after, add_special_tokens=False) if after else []
        ids = self.tokenizer.encode(before + head + text, add_special_tokens=True)
        room = self.max_length - len(tail)
        n_before = len(self.tokenizer.encode(before + head, add_special_tokens=True)) if before or head else 0
        if n_before >= room:
            raise ValueError(
                f"input {index}: the instruction and template take {n_before} of the "
                f"{self.max_length} tokens of max_length: no room for the text"
            )
        ids = ids[:room]  # cut from the right; a template's closing tokens survive
        # The embed mask is a COUNT from the end, not an alignment (upstream, and how the published
        # LLM2Vec models got their numbers): when the text tokenizes differently inside the string, or
        # the cut above removed its end, the window shifts onto the instruction's last tokens.
        # (upstream_template: as upstream's, the window may reach into the template's opening tokens too)
        fixed = before if not self.upstream_template else ""
        n_head = len(self.tokenizer.encode(fixed, add_special_tokens=True)) if fixed else 0
        n = min(n, len(ids) - n_head)
        if not self.skip_instruction:
            n = len(ids)
        mask = [0] * (len(ids) - n) + [1] * n + [0] * len(tail)
        return ids + tail, mask

    def prepare_inputs(self, inputs) -> list[tuple[list[int], np.ndarray]]:
        """Inputs -> [(input_ids, pooling weights)], one per input."""
        if isinstance(inputs, (str, tuple)):
            raise TypeError(
                "inputs: expected a list of strings and/or (instruction, text) pairs, got a "
                f"bare {type(inputs).__name__} (wrap one input in a list)"
            )
        if isinstance(inputs, (bytes, dict)) or not hasattr(inputs, "__iter__"):
            raise TypeError(
                "inputs: expected a list of strings and/or (instruction, text) pairs, got "
                f"{type(inputs).__name__}"
            )
        out = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                item = ("", item)
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(
                    f"input {i}: expected a string or an (instruction, text) pair, got {type(item).__name__}"
                    + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
                )
            ids, mask = self.prepare(item[0], item[1], i)
            out.append((ids, pool_weights(self.pooling, mask, ids, self.tokenizer.bos_id)))
        return out

    def batches(self, prepared, max_batch_tokens: int | None = None) -> list[Batch]:
        """Pack prepared texts into rows of `row_tokens` and the rows into batches of at most
        `max_batch_tokens` (rows x padded length; None = one batch). No work is spent on padding
        beyond the ends of rows, and no text sees another (see `Transformer.forward`)."""
        rows = pack([len(ids) for ids, _ in prepared], self.row_tokens)
        lengths = [sum(len(prepared[i][0]) for i in row) for row in rows]
        groups, T = [[]], 0
        for row, n in zip(rows, lengths):
            T_new = max(T, n)
            if (
                groups[-1]
                and max_batch_tokens is not None
                and T_new * (len(groups[-1]) + 1) > max_batch_tokens
            ):
                groups.append([])
                T_new = n
            groups[-1].append(row)
            T = T_new
        return [collate(g, prepared, self.tokenizer.pad_id) for g in groups]

    # ---- model side ----

    def embed(self, batch: Batch, model=None) -> torch.Tensor:
        """A Batch -> (len(batch.texts), D) float32 embeddings in `batch.texts` order, differentiable.
        `model`: another callable on the same weights (e.g. training's DDP wrapper); default self.model."""
        model = model or self.model
        device = next(model.parameters()).device
        segments = (
            None if bool((batch.segments == 1).all()) else batch.segments.to(device)
        )  # checked on the CPU
        hidden = model(batch.input_ids.to(device), segments)  # (R, T, D)
        return pool(hidden, batch.weights, batch.index, len(batch.texts))

    def encode(
        self,
        inputs,
        max_batch_tokens: int | None = None,
        normalize: bool = False,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Inputs (strings and/or (instruction, text) pairs) -> float32 array [N, D] in input order.
        max_batch_tokens: tokens per forward pass (default: `default_batch_tokens`)."""
        if isinstance(inputs, str):
            inputs = [inputs]
        device = self.model.embed_tokens.weight.device
        integral = isinstance(max_batch_tokens, (int, np.integer)) and not isinstance(max_batch_tokens, bool)
        if max_batch_tokens is not None and (not integral or max_batch_tokens < 1):
            raise ValueError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}")
        for name, value in (("normalize", normalize), ("show_progress", show_progress)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        max_batch_tokens = max_batch_tokens or default_batch_tokens(device)
        prepared = self.prepare_inputs(inputs)
        out = np.zeros((len(prepared), self.model.config.dim), dtype=np.float32)
        batches = self.batches(prepared, max_batch_tokens) if prepared else []
        batches = progress(batches, desc="encode", unit="batches", enabled=show_progress)
        was_training = self.model.training
        self.model.eval()
        try:
            with (
                torch.inference_mode(),
                torch.autocast(
                    device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None
                ),
            ):
                for batch in batches:
                    emb = self.embed(batch)
                    if normalize:
                        emb = torch.nn.functional.normalize(emb, dim=-1)
                    out[batch.texts] = emb.cpu().numpy()
        finally:
            self.model.train(was_training)
        if not np.isfinite(out).all():
            raise ValueError(f"{self.source}: non-finite embeddings (NaN or inf weights?)")
        return out
