"""Upstream side of the encode figure (runs in bench/.peer-venv): llm2vec 0.2.3 LLM2Vec.encode.

    bench/.peer-venv/bin/python bench/peer_encode.py MODEL_DIR LIMIT WARMUP OUT.npy
"""
import sys
import time

import numpy as np

from common import emit, pin_threads, read_stsb_sentences


def main(model_dir, limit, warmup, out):
    pin_threads()
    import torch
    from llm2vec import LLM2Vec
    sentences = read_stsb_sentences(limit=int(limit) or None)
    t0 = time.perf_counter()
    enc = LLM2Vec.from_pretrained(model_dir, enable_bidirectional=True, pooling_mode="mean", max_length=512,
                                  torch_dtype=torch.float32)
    load_s = time.perf_counter() - t0
    if int(warmup):
        enc.encode(sentences[:int(warmup)], batch_size=32, show_progress_bar=False)
    t0 = time.perf_counter()
    emb = enc.encode(sentences, batch_size=32, show_progress_bar=False)
    encode_s = time.perf_counter() - t0
    tokens = sum(len(enc.tokenizer(s, truncation=True, max_length=512)["input_ids"]) for s in sentences)
    np.save(out, np.asarray(emb, dtype=np.float32))
    emit(dict(side="peer", dtype="float32", n=len(sentences), tokens=tokens, load_s=load_s, encode_s=encode_s))


if __name__ == "__main__":
    main(*sys.argv[1:])
