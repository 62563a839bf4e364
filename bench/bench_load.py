"""Load figure: time and peak RSS to load the demo model folder in fp32, each side in a fresh process.

    python bench/bench_load.py [--repeats 3]

l2v `load_model(dir, dtype="float32")` vs transformers 4.44.2 `AutoModel.from_pretrained(dir,
torch_dtype=torch.float32)`, alternating. "RSS over imports" = peak RSS minus the peak after importing
torch (+ transformers): the memory the load itself costs, to compare with the weights' size.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEMO_MODEL, PEER_PYTHON, line, median, run_worker, save_results  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs = {"l2v": [], "peer": []}
    for _ in range(args.repeats):
        runs["l2v"].append(run_worker(sys.executable, "l2v_load.py", DEMO_MODEL))
        runs["peer"].append(run_worker(PEER_PYTHON, "peer_load.py", DEMO_MODEL))
    m = {side: {k: median([r[k] for r in rs]) for k in ("load_s", "peak_rss_mb", "rss_after_import_mb",
                                                           "weights_mb", "process_wall_s")}
         for side, rs in runs.items()}
    for v in m.values():
        v["rss_over_imports_mb"] = v["peak_rss_mb"] - v["rss_after_import_mb"]
    file_mb = (DEMO_MODEL / "model.safetensors").stat().st_size / 2**20
    lines = [line("load fp32: time", m["l2v"]["load_s"], m["peer"]["load_s"], "s", higher_is_better=False),
             line("load fp32: whole process", m["l2v"]["process_wall_s"], m["peer"]["process_wall_s"], "s",
                  higher_is_better=False),
             line("load fp32: peak RSS", m["l2v"]["peak_rss_mb"], m["peer"]["peak_rss_mb"], "MB", higher_is_better=False),
             line("load fp32: peak RSS over imports", m["l2v"]["rss_over_imports_mb"], m["peer"]["rss_over_imports_mb"],
                  "MB", higher_is_better=False),
             f"{'weights: bf16 file / fp32 in memory':<44} {file_mb:.0f} MB / {m['l2v']['weights_mb']:.0f} MB; "
             f"l2v RSS over imports = {m['l2v']['rss_over_imports_mb'] / m['l2v']['weights_mb']:.2f}x fp32 weights"]
    print("\n".join(lines))
    print("wrote", save_results("load", dict(runs=runs, median=m, file_mb=file_mb, lines=lines)))


if __name__ == "__main__":
    main()
