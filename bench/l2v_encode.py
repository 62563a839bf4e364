"""l2v side of the encode figure: load, optional warm-up, timed encode; saves the embeddings (.npy).

    python bench/l2v_encode.py MODEL_DIR DTYPE LIMIT WARMUP OUT.npy [SENTENCES_FILE]
"""
import sys
import time

import numpy as np

from common import emit, pin_threads, read_stsb_sentences, STSB_TEST


def main(model_dir, dtype, limit, warmup, out, sentences_file=STSB_TEST):
    pin_threads()
    from l2v.encoder import Encoder
    sentences = read_stsb_sentences(sentences_file, int(limit) or None)
    t0 = time.perf_counter()
    enc = Encoder.from_pretrained(model_dir, is_causal=False, dtype=dtype, pooling="mean")
    load_s = time.perf_counter() - t0
    if int(warmup):
        enc.encode(sentences[:int(warmup)], batch_size=32)
    t0 = time.perf_counter()
    emb = enc.encode(sentences, batch_size=32)
    encode_s = time.perf_counter() - t0
    tokens = sum(len(ids) for ids, _ in enc.prepare_inputs(sentences))
    np.save(out, emb)
    emit(dict(side="l2v", dtype=dtype, n=len(sentences), tokens=tokens, load_s=load_s, encode_s=encode_s))


if __name__ == "__main__":
    main(*sys.argv[1:])
