"""Encode texts into vectors with an l2v / LLM2Vec model.

Usage:
    python encode.py                                   # seed example: 2 instructed queries x 2 documents
    python encode.py --text "A man plays guitar." --text "Someone is playing an instrument."
    python encode.py --text "summit define" \\
        --instruction "Given a web search query, retrieve relevant passages that answer the query:"
    python encode.py --file texts.txt --out emb.npy    # .txt: one text per line (see --keep-blank-lines)
    python encode.py --file inputs.jsonl --out emb.npy # .jsonl: {"text": ..., "instruction": ...} per line
    python encode.py --model DIR --adapter MNTP_DIR --adapter SIMCSE_DIR --pooling mean --normalize --text ...

Without --model: the demo model, with the settings `make setup` wrote into its folder (PromptEOL prompt,
causal attention, last-token pooling: the best it does untrained). Adapters (PEFT format) are merged in
the order given. Settings not given as flags come from the model and adapter folders (llm2vec_config.json,
encoder_config.json), else upstream's defaults (bidirectional, mean pooling, max length 512, documents
shortened to 400 tokens); the output says which are in force.

Up to 16 texts: prints their cosine-similarity matrix (and writes --out if given). More texts need
--out: a float32 [N, dim] .npy in input order. --instruction applies to every text that has none of its
own; the instruction is attended to but not pooled.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from l2v.cli import (
    USER_ERRORS,
    UserError,
    add_encoder_args,
    check_out_file,
    default_formatter,
    encoder_from_args,
    fail,
    settings_line,
)
from l2v.data import field, read_lines, read_records, valid_unicode
from l2v.files import save_npy

MAX_PRINTED = 16
SEED_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query:"
SEED_QUERIES = ["how much protein should a female eat", "summit define"]
SEED_DOCUMENTS = [
    "The CDC's general guideline is that women aged 19 to 70 need about 46 grams of protein a day. "
    "More is advised during pregnancy or breastfeeding, or when training for endurance sports.",
    "summit (noun): 1. the highest point of a hill or mountain. 2. the highest level that can be reached. "
    "3. a meeting between the heads of two or more governments.",
]


def read_inputs(path: Path, instruction: str) -> list[tuple[str, tuple | None]]:
    """.txt: one text per line, a blank line None; .jsonl: one {"text", optional "instruction"} object per
    line. Returns (where, (instruction, text) or None) per line ("file:line")."""
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f"--file {path}: expected a .txt or .jsonl file")
    if path.suffix == ".txt":
        return [
            (f"{path}:{n}", (instruction, line) if line.strip() else None) for n, line in read_lines(path)
        ]
    return [
        (where, (field(item, where, "instruction", instruction), field(item, where, "text")))
        for where, item in read_records(path)
    ]


def name_input(message: str, wheres: list[str] | None) -> str:
    """An encoder's "input k: ..." with k replaced by where input k came from (--text #i, file:line); an
    instruction that leaves no room also names the flags that decide the room."""
    m = re.match(r"input (\d+): (.*)", message)
    if m is None or wheres is None:
        return message
    flags = " (--instruction, --prompt, --max-length)" if "no room for the text" in message else ""
    return f"{wheres[int(m[1])]}: {m[2]}{flags}"


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # a kept blank line is a zero row
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def print_matrix(sim: np.ndarray, rows: list[str], cols: list[str], row_name="text", col_name="text"):
    def short(s, n=70):
        return s if len(s) <= n else s[: n - 3] + "..."

    for i, t in enumerate(rows):
        print(f"  {row_name} {i}: {short(t)}")
    if cols is not rows:
        for j, t in enumerate(cols):
            print(f"  {col_name} {j}: {short(t)}")
    width = max(len(f"{col_name} {len(cols) - 1}"), 7)
    print(" " * (len(row_name) + 4) + "".join(f"{f'{col_name} {j}':>{width + 1}}" for j in range(len(cols))))
    for i in range(len(rows)):
        print(f"{row_name} {i:<3}" + "".join(f"{sim[i, j]:>{width + 1}.4f}" for j in range(len(cols))))


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="encode.py",
        description=__doc__.split("\n")[0],
        epilog=__doc__[__doc__.index("Usage") :],
        formatter_class=default_formatter,
    )
    p.add_argument("--text", action="append", default=[], help="a text to encode (repeatable)")
    p.add_argument(
        "--file", type=Path, help=".txt (one text per line) or .jsonl ({'text', 'instruction'} per line)"
    )
    p.add_argument("--instruction", default="", help="instruction for every text without its own")
    p.add_argument(
        "--keep-blank-lines",
        action="store_true",
        help="a .txt file's blank lines get zero rows, so row i of --out is line i (default: dropped)",
    )
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--out", type=Path, help="write a float32 [N, dim] .npy here (input order)")
    add_encoder_args(p)
    p.error = lambda message: fail("encode.py", f"{message} (see --help)")  # one line, no usage block
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as e:
        fail("encode.py", e, args.debug)


def run(args):
    seed, blank = not args.text and args.file is None, 0
    if seed:
        inputs = [(SEED_INSTRUCTION, q) for q in SEED_QUERIES] + list(SEED_DOCUMENTS)
    else:
        items = [(f"--text #{i + 1}", (args.instruction, t)) for i, t in enumerate(args.text)]
        items += read_inputs(args.file, args.instruction) if args.file is not None else []
        blank = sum(x is None for _, x in items)  # a .txt file's blank lines
        items = items if args.keep_blank_lines else [(w, x) for w, x in items if x is not None]
        if all(x is None for _, x in items):
            raise UserError(f"--file {args.file}: no texts (the file is empty or holds only blank lines)")
        valid_unicode(args.instruction, "--instruction", "the instruction")
        for where, x in items:
            if x is not None and not valid_unicode(x[1], where).strip():
                raise UserError(f"{where}: the text is empty")
        inputs = [x if x is None or x[0] else x[1] for _, x in items]  # None: a kept blank line
    if len(inputs) > MAX_PRINTED and args.out is None:
        raise UserError(
            f"--out: {len(inputs)} texts are too many to print a similarity matrix; pass --out FILE.npy"
        )
    if args.out is not None:
        check_out_file(
            args.out, "--out", ".npy", [("--model", args.model), *(("--adapter", a) for a in args.adapter)]
        )
    keep = [i for i, x in enumerate(inputs) if x is not None]
    try:
        enc = encoder_from_args(args, check_inputs=[inputs[i] for i in keep])
    except ValueError as e:  # "input k: ...": name the flag or file line it came from
        raise UserError(name_input(str(e), [items[i][0] for i in keep] if not seed else None)) from None
    for folder in args.adapter:
        print(f"merged adapter {folder}")
    print(settings_line(enc), flush=True)
    emb = np.zeros((len(inputs), enc.model.config.dim), dtype=np.float32)
    emb[keep] = enc.encode(
        [inputs[i] for i in keep],
        max_batch_tokens=args.max_batch_tokens,
        normalize=args.normalize,
        show_progress=len(inputs) > MAX_PRINTED,
    )
    if blank:
        print(
            f"{args.file}: {blank} blank line(s) "
            + (
                "kept as zero rows: row i is line i"
                if args.keep_blank_lines
                else "skipped: rows follow the non-blank lines (--keep-blank-lines keeps row i = line i)"
            )
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_npy(args.out, emb)
        print(f"wrote {args.out}: float32 {list(emb.shape)}")
    if len(inputs) > MAX_PRINTED:
        return emb
    texts = ["" if x is None else x if isinstance(x, str) else x[1] for x in inputs]
    print(f"model {args.model}")
    if seed:
        print(
            f"seed example: queries with the instruction {SEED_INSTRUCTION!r} vs documents; cosine similarity"
        )
        print_matrix(cosine_matrix(emb[:2], emb[2:]), texts[:2], texts[2:], "query", "doc")
    else:
        print("cosine similarity")
        print_matrix(cosine_matrix(emb, emb), texts, texts)
    return emb


if __name__ == "__main__":
    main()
