"""Encode texts into vectors with an l2v / LLM2Vec model (bidirectional by default).

Usage:
    python encode.py                                   # seed example: 2 instructed queries x 2 documents
    python encode.py --text "A man plays guitar." --text "Someone is playing an instrument."
    python encode.py --instruction "Given a web search query, retrieve relevant passages that answer the query:" \\
        --text "summit define"
    python encode.py --file texts.txt --out emb.npy    # .txt: one text per line (blank lines skipped)
    python encode.py --file inputs.jsonl --out emb.npy # .jsonl: {"text": ..., "instruction": ...} per line
    python encode.py --model DIR --adapter MNTP_DIR --adapter SIMCSE_DIR --pooling mean --normalize --text ...

Without --model the demo model <repo>/models/smollm2-135m-instruct is used (build it once with
`python scripts/build_demo_model.py`). Adapters (PEFT format) are merged in the order given. Settings
not given on the command line come from llm2vec_config.json in the model or adapter folders (and, for
an adapter that train.py wrote, its prompt and attention from train_config.json), else upstream's
defaults (bidirectional, mean pooling, max length 512, documents shortened to 400 tokens).

Up to 16 texts: prints their cosine-similarity matrix (and writes --out if given). More texts need
--out: a float32 [N, dim] .npy in input order, with a progress bar. --instruction applies to every
text that has none of its own; the instruction is attended to but not pooled.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from eval import check_out_file, fail, positive_int
from l2v.data import field, read_records
from l2v.encoder import CHAT_TEMPLATES, POOLING_MODES, Encoder

REPO = Path(__file__).resolve().parent
DEMO_MODEL = REPO / "models" / "smollm2-135m-instruct"
MAX_PRINTED = 16

SEED_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query:"
SEED_QUERIES = ["how much protein should a female eat", "summit define"]
SEED_DOCUMENTS = [
    "The CDC's general guideline is that women aged 19 to 70 need about 46 grams of protein a day. "
    "More is advised during pregnancy or breastfeeding, or when training for endurance sports.",
    "summit (noun): 1. the highest point of a hill or mountain. 2. the highest level that can be reached. "
    "3. a meeting between the heads of two or more governments.",
]


def read_inputs(path: Path, instruction: str) -> tuple[list, list[str]]:
    """.txt: one text per line; .jsonl: one {"text", optional "instruction"} object per line.
    Returns the (instruction, text) pairs and where each comes from ("file:line")."""
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--file {path}: expected a .txt or .jsonl file")
    records = read_records(path)
    if not records:
        raise ValueError(f"--file {path}: no texts (the file is empty or holds only blank lines)")
    return ([(field(item, where, "instruction", instruction), field(item, where, "text")) for where, item in records],
            [where for where, _ in records])


def as_input(instruction: str, text: str):
    return (instruction, text) if instruction else text


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def print_matrix(sim: np.ndarray, rows: list[str], cols: list[str], row_name="text", col_name="text"):
    def short(s, n=70):
        return s if len(s) <= n else s[:n - 3] + "..."
    for i, t in enumerate(rows):
        print(f"  {row_name} {i}: {short(t)}")
    if cols is not rows:
        for j, t in enumerate(cols):
            print(f"  {col_name} {j}: {short(t)}")
    width = max(len(f"{col_name} {len(cols) - 1}"), 7)
    print(" " * (len(row_name) + 4) + "".join(f"{f'{col_name} {j}':>{width + 1}}" for j in range(len(cols))))
    for i in range(len(rows)):
        print(f"{row_name} {i:<3}" + "".join(f"{sim[i, j]:>{width + 1}.4f}" for j in range(len(cols))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__[__doc__.index("Usage"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", action="append", default=[], help="a text to encode (repeatable)")
    p.add_argument("--file", type=Path,
                   help=".txt (one text per line) or .jsonl ({'text', 'instruction'} per line)")
    p.add_argument("--instruction", default="", help="instruction for every text without its own")
    p.add_argument("--model", type=Path, help=f"HF-layout model folder (default: {DEMO_MODEL.relative_to(REPO)})")
    p.add_argument("--adapter", type=Path, action="append", default=[],
                   help="PEFT adapter folder, merged in order (repeatable)")
    p.add_argument("--pooling", choices=POOLING_MODES, help="default: llm2vec_config.json, else mean")
    p.add_argument("--prompt", help="template around each text with one {text} slot (e.g. PromptEOL; "
                   "default: the adapter's training prompt)")
    p.add_argument("--max-length", type=positive_int, help="token limit of instruction + text (default 512)")
    p.add_argument("--chat-template", choices=sorted(CHAT_TEMPLATES) + ["auto"],
                   help="wrap inputs in a chat turn (off by default)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction,
                   help="keep causal attention (default: the adapter's training setting, else bidirectional)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    p.add_argument("--autocast", default="auto", choices=["auto", "bfloat16", "none"],
                   help="bf16 matmuls over float32 weights; auto: where bf16 is fast (GPUs, AVX512-BF16/AMX CPUs)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--max-batch-tokens", type=positive_int,
                   help="tokens per forward pass; texts are packed (default: 2048 on CPU, 16384 on GPU)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--out", type=Path, help="write a float32 [N, dim] .npy here (input order)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.error = lambda message: fail("encode.py", f"{message} (see --help)")  # one line, no usage block
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError, TypeError) as e:
        fail("encode.py", e, args.debug)


def run(args):
    seed = not args.text and args.file is None
    if seed:
        inputs = [(SEED_INSTRUCTION, q) for q in SEED_QUERIES] + list(SEED_DOCUMENTS)
    else:
        pairs, sources = [(args.instruction, t) for t in args.text], [f"--text #{i + 1}" for i in range(len(args.text))]
        if args.file is not None:
            more, where = read_inputs(args.file, args.instruction)
            pairs, sources = pairs + more, sources + where
        for (_, text), source in zip(pairs, sources):
            if not text.strip():
                raise ValueError(f"{source}: the text is empty")
        inputs = [as_input(i, t) for i, t in pairs]
    if len(inputs) > MAX_PRINTED and args.out is None:
        raise ValueError(f"--out: {len(inputs)} texts are too many to print a similarity matrix; pass --out FILE.npy")
    if args.out is not None:
        check_out_file(args.out, "--out", ".npy")
    model_dir = args.model or DEMO_MODEL
    if args.model is None and not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: no demo model (build it with `python scripts/build_demo_model.py`)")
    enc = Encoder.from_pretrained(model_dir, adapters=args.adapter, is_causal=args.causal, dtype=args.dtype,
                                  pooling=args.pooling, max_length=args.max_length, prompt=args.prompt,
                                  chat_template=args.chat_template, device=args.device, autocast=args.autocast,
                                  check_inputs=inputs)
    for folder in args.adapter:
        print(f"merged adapter {folder}")
    emb = enc.encode(inputs, max_batch_tokens=args.max_batch_tokens, normalize=args.normalize,
                     show_progress=len(inputs) > MAX_PRINTED)

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, emb)
        print(f"wrote {args.out}: float32 {list(emb.shape)}")
    if len(inputs) > MAX_PRINTED:
        return emb
    texts = [x if isinstance(x, str) else x[1] for x in inputs]
    attn = "causal" if enc.model.config.is_causal else "bidirectional"
    precision = args.dtype + (" + bf16 autocast" if enc.autocast else "")
    print(f"model {model_dir} ({attn}, {enc.pooling} pooling, {precision}), dim {emb.shape[1]}")
    if enc.prompt:
        print(f"prompt {enc.prompt!r}")
    if seed:
        print(f"seed example: queries with the instruction {SEED_INSTRUCTION!r} vs documents; cosine similarity")
        print_matrix(cosine_matrix(emb[:2], emb[2:]), texts[:2], texts[2:], "query", "doc")
    else:
        print("cosine similarity")
        print_matrix(cosine_matrix(emb, emb), texts, texts)
    return emb


if __name__ == "__main__":
    main()
