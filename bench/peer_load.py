"""Upstream side of the load figure (bench/.peer-venv): transformers 4.44.2 AutoModel.from_pretrained, fp32.

    bench/.peer-venv/bin/python bench/peer_load.py [MODEL_DIR]
"""
import sys
import time

from common import DEMO_MODEL, emit, peak_rss_mb, pin_threads


def main(model_dir=DEMO_MODEL):
    pin_threads()
    import torch
    from transformers import AutoModel
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    load_s = time.perf_counter() - t0
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emit(dict(side="peer", load_s=load_s, rss_after_import_mb=rss0, weights_mb=n_bytes / 2**20))


if __name__ == "__main__":
    main(*sys.argv[1:])
