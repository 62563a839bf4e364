"""Training data: file readers (UTF-8; errors name the file and line), MNTP blocks and masking as
upstream's run_mntp.py (HF's run_mlm.py), global batches that do not depend on the world size."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------- readers


TEXT_SUFFIXES = (".txt", ".raw", ".text", ".tsv")
MAX_LINE_BYTES = 64 << 20  # far beyond any text an encoder reads; a longer line is refused, not loaded


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line without its line ending) of a UTF-8 file; a bad byte names its line. Line
    endings are \\n, \\r\\n and a bare \\r (old Mac files: one line each, not one text)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{lineno + 1}: a line of more than {MAX_LINE_BYTES >> 20} MiB")
            parts = raw.removesuffix(b"\n").removesuffix(b"\r").split(b"\r")
            for part in parts:
                lineno += 1
                try:
                    line = part.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(
                        f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})"
                    ) from None
                if "\0" in line:  # valid UTF-8, but no text file holds one: UTF-16 without a BOM, or binary
                    raise ValueError(
                        f"{path}:{lineno}: a NUL byte at character {line.index(chr(0))} "
                        "(UTF-16 without a byte order mark, or not a text file?)"
                    )
                # Only the line ending goes: leading spaces are part of WikiText's raw format
                # (` = Title = `, ` The game ...`) and tokenize differently without them.
                yield lineno, line


def parse_json(text: str | bytes, where: str, whole_file: bool = False):
    """json.loads with errors that name the file and line (`where` is the file, or already its line); nesting
    too deep for Python is one of them."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{where}:{e.lineno}" if whole_file else where
        raise ValueError(f"{at}: malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None


def read_records(path: str | os.PathLike) -> list[tuple[str, object]]:
    """("file:line" or "file[i]", record) for every record of a file: a non-blank line of a text file
    (.txt, .raw), a parsed line of .jsonl, an element of a .json list."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + (".json", ".jsonl"):
        raise ValueError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; expected .txt, .raw, .jsonl or .json"
        )
    if suffix == ".json":
        data = parse_json("\n".join(line for _, line in read_lines(path)), str(path), whole_file=True)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return [(f"{path}[{i}]", item) for i, item in enumerate(data)]
    out = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        if suffix != ".jsonl":
            out.append((f"{path}:{lineno}", line))
            continue
        out.append((f"{path}:{lineno}", parse_json(line, f"{path}:{lineno}")))
    return out


def field(item, where: str, key: str, default=None) -> str:
    """A string field of a record (a bare string is its own "text"), with an error naming the record."""
    if isinstance(item, str) and (key == "text" or default is not None):
        return field({"text": item}, where, "text") if key == "text" else default
    if not isinstance(item, dict):
        got = "null" if item is None else type(item).__name__
        raise ValueError(f'{where}: expected an object with "{key}", got {got}')
    value = item.get(key)
    if value is None and default is not None:  # null for an optional field: as if left out, as in config.json
        return default
    if value is None and key in item:
        raise ValueError(f'{where}: "{key}" is null')
    if value is None:
        raise ValueError(f'{where}: object has no "{key}" field (keys: {sorted(item)[:10]})')
    if not isinstance(value, str):
        raise ValueError(f'{where}: "{key}" must be a string, got {repr(value)[:80]}')
    return valid_unicode(value, where, f'"{key}"')


def valid_unicode(text: str, where: str, what: str = "the text") -> str:
    """`text`, unless it holds a lone surrogate (a JSON escape like "\\ud800", or bytes that were not UTF-8
    on a command line): no tokenizer can read it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where}: {what} is not valid Unicode ({e.reason} at character {e.start})"
        ) from None
    return text


def read_texts(path: str | os.PathLike) -> list[str]:
    """Texts from a text file (one per line; blank lines skipped) or .json / .jsonl (strings or
    objects with "text"). A blank text is an error: it has no tokens to embed or mask."""
    texts = []
    for where, item in read_records(path):
        text = field(item, where, "text")
        if not text.strip():
            raise ValueError(f"{where}: the text is empty")
        texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no texts (the file is empty or holds only blank lines)")
    return texts


TRIPLE_FIELDS = ("query", "positive", "negative")
PAIR_FIELDS = ("sentence1", "sentence2")  # with a numeric "score": graded pairs, as MTEB's STS sets


def read_examples(path: str | os.PathLike, fields=TRIPLE_FIELDS) -> list[dict]:
    """Records with non-empty string `fields` and "instruction" ("" if absent); PAIR_FIELDS records also
    need a finite number "score". Other fields (e.g. "dataset", to group batches by) pass through."""
    out = []
    for where, item in read_records(path):
        rec = dict(item) if isinstance(item, dict) else {}
        for k in fields:
            rec[k] = field(item, where, k)
            if not rec[k].strip():
                raise ValueError(f'{where}: "{k}" is empty')
        rec["instruction"] = field(item, where, "instruction", "")
        if fields == PAIR_FIELDS and not (
            type(rec.get("score")) in (int, float) and math.isfinite(rec["score"])
        ):
            raise ValueError(f'{where}: "score" must be a number, got {rec.get("score")!r}')
        if "dataset" in rec:  # global batches are grouped by it
            field(item, where, "dataset")
        out.append(rec)
    if not out:
        raise ValueError(f"{path}: no records (the file is empty)")
    if fields == PAIR_FIELDS and len({r["score"] for r in out}) == 1:  # the loss would be 0 at every step
        raise ValueError(f'{path}: every "score" is {out[0]["score"]}: no two pairs to rank')
    return out


# ----------------------------------------------------------------------------- mntp


def mntp_blocks(tokenizer, texts: Sequence[str], block_size: int, chunk: int = 10_000) -> torch.Tensor:
    """Tokenize each text (with the tokenizer's own special tokens), concatenate, cut into (N, block_size)
    blocks across line boundaries, drop the remainder: run_mntp.py's `group_texts`, except that upstream
    drops a remainder per batch of 1000 lines and l2v once."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    parts = []
    for i in range(0, len(texts), chunk):  # chunks bound the memory of the Python id lists
        ids = tokenizer.encode_batch(list(texts[i : i + chunk]))
        parts.extend(np.asarray(x, dtype=np.int64) for x in ids if len(x))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = len(flat) // block_size
    if n == 0:
        raise ValueError(f"{len(flat)} tokens in total: not enough for one block of {block_size}")
    return torch.from_numpy(flat[: n * block_size].reshape(n, block_size).copy())  # (N, block_size)


def mask_token_id(tokenizer, kind: str = "auto") -> int:
    """The token that replaces masked inputs. "auto": upstream's rule, the tokenizer's own mask token when it
    has one (declared in its files, or the `<mask>` of Gemma's vocabulary, which transformers declares for
    it), else "blank"; "blank" = the existing "_" (upstream's default for Llama, Mistral, Qwen); "eos".
    Upstream can also add a new "<mask>" row to the embeddings; l2v does not: it would be untrained,
    unsaved by a LoRA-only adapter, and change the published base model's vocabulary."""
    if kind == "auto":
        tid = tokenizer.mask_id if tokenizer.mask_id is not None else tokenizer.token_id("<mask>")
        return tid if tid is not None else mask_token_id(tokenizer, "blank")
    if kind == "blank":
        tid = tokenizer.token_id("_")
        if tid is None:
            raise ValueError('mask token "blank": this vocabulary has no "_" token; use kind="eos"')
        return tid
    if kind == "eos":
        if tokenizer.eos_id is None:
            raise ValueError('mask token "eos": this tokenizer has no EOS token; use kind="blank"')
        return tokenizer.eos_id
    raise ValueError(f"unknown mask token kind {kind!r}: expected auto, blank or eos")


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    special_ids: Sequence[int],
    vocab_size: int,
    probability: float = 0.2,
    mode: str = "80_10_10",
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM-style masking for MNTP. Returns (masked input_ids, labels), both (B, T) int64.

    Each eligible token is selected with `probability` (independent draws, as HF's collator). Of the
    selected: mode "80_10_10" -> 80% mask_id, 10% a random id uniform over [0, vocab_size), 10% unchanged;
    mode "all_mask" -> all mask_id. labels = original id at selected positions, -100 elsewhere.

    Never selected: special tokens, padding (attention_mask == 0), and any token whose left neighbour is
    not a real token, in particular position 0. MNTP predicts token t from the output at t-1, so such a
    token can never be scored: upstream masks it anyway (a corrupted input with no loss); we don't.
    All draws come from `generator` (on its device; default: torch's global CPU generator).
    """
    if mode not in ("80_10_10", "all_mask"):
        raise ValueError(f"unknown masking mode {mode!r}: expected 80_10_10 or all_mask")
    ids = input_ids.long()
    eligible = ~torch.isin(ids, torch.as_tensor(list(special_ids), dtype=torch.long, device=ids.device))
    if attention_mask is not None:
        real = attention_mask.bool().to(ids.device)
        eligible &= real
        eligible[:, 1:] &= real[:, :-1]  # the predicting position t-1 must be a real token too
    eligible[:, 0] = False

    dev = generator.device if generator is not None else torch.device("cpu")  # draws happen there

    def rand():
        return torch.rand(ids.shape, generator=generator, device=dev).to(ids.device)

    selected = eligible & (rand() < probability)
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    if mode == "all_mask":
        return torch.where(selected, torch.full_like(ids, mask_id), ids), labels
    # One uniform draw per token splits the selected ones 80 / 10 / 10.
    u = rand()
    to_mask = selected & (u < 0.8)
    to_random = selected & (u >= 0.8) & (u < 0.9)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=dev).to(ids.device)
    masked = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


# ----------------------------------------------------------------------------- batching


def batches(
    n: int, batch_size: int, *, seed: int, epoch: int = 0, groups: Sequence | None = None
) -> list[list[int]]:
    """One epoch of GLOBAL batches of indices into n items, deterministic in (seed, epoch) and
    independent of the world size; the remainder is dropped. `groups` (one label per item, e.g. the
    source dataset of supervised triples): each batch draws from one group, and the batches' order is
    shuffled across groups (llm2vec's supervised recipe)."""
    rng = np.random.default_rng([seed, epoch])  # independent streams per (seed, epoch)
    pools = [np.arange(n)]
    if groups is not None:
        by_label = {}
        for i, g in enumerate(groups):
            by_label.setdefault(g, []).append(i)
        pools = [np.asarray(v) for v in by_label.values()]  # first-appearance order: deterministic
    out = []
    for pool in pools:
        order = rng.permutation(pool)
        out += [order[i : i + batch_size].tolist() for i in range(0, len(order) - batch_size + 1, batch_size)]
    return [out[i] for i in rng.permutation(len(out))] if groups is not None else out


def micro_batch_positions(batch_size: int, micro: int, rank: int, world: int) -> list[list[int]]:
    """Positions in the global batch of each of this rank's micro-batches. Accumulation step i covers
    the contiguous group [i*G, (i+1)*G), G = micro * world, and rank r takes its r-th slice: gathered
    over ranks, a contrastive micro-batch is then the same group of examples (the same in-batch
    negatives) whatever the world size, and the union over ranks is the 1-rank global batch."""
    G = micro * world
    return [list(range(i * G + rank * micro, i * G + (rank + 1) * micro)) for i in range(batch_size // G)]
