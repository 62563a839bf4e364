"""l2v side of the load figure: `load_model(dir, dtype="float32")` in a fresh process.

    python bench/l2v_load.py [MODEL_DIR]
"""
import sys
import time

from common import DEMO_MODEL, emit, peak_rss_mb, pin_threads


def main(model_dir=DEMO_MODEL):
    pin_threads()
    from l2v.checkpoint import load_model
    rss0 = peak_rss_mb()  # after imports: the interpreter + torch, not the weights
    t0 = time.perf_counter()
    model = load_model(model_dir, dtype="float32")
    load_s = time.perf_counter() - t0
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emit(dict(side="l2v", load_s=load_s, rss_after_import_mb=rss0, weights_mb=n_bytes / 2**20))


if __name__ == "__main__":
    main(*sys.argv[1:])
