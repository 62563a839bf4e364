"""Markdown table for docs/performance.md from bench/results/{encode,train_step,load,efficiency}.json.

    python bench/report.py
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402


def load(name):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def row(figure, l2v, peer, unit, target, ratio=None, met=None, fmt="{:.1f}"):
    l = fmt.format(l2v) if isinstance(l2v, (int, float)) else l2v
    p = fmt.format(peer) if isinstance(peer, (int, float)) else peer
    r = f"{ratio:.2f}x" if ratio is not None else "-"
    m = "-" if met is None else ("yes" if met else "**no**")
    return f"| {figure} | {l} {unit} | {p} | {r} | {target} | {m} |"


def main():
    rows = ["| figure | l2v (CPU, 2 threads) | upstream llm2vec 0.2.3 | ratio | target | met? |",
            "|---|---|---|---|---|---|"]
    enc = load("encode")
    if enc and "median" in enc:
        s, t, m = enc["median"]["sentences_per_s"], enc["median"]["tokens_per_s"], enc["median"]["peak_rss_mb"]
        n = enc["limit"]
        ra = s["l2v_fp32"] / s["peer_fp32"]
        rows.append(row(f"encode fp32, sentences/s (first {n}, median of {enc['repeats']})", s["l2v_fp32"], s["peer_fp32"],
                        "", ">= 1.3x", ra, ra >= 1.3))
        rows.append(row("encode fp32, tokens/s", t["l2v_fp32"], t["peer_fp32"], "", "", t["l2v_fp32"] / t["peer_fp32"]))
        rb = s["l2v_bf16"] / s["peer_fp32"]
        rows.append(row("encode l2v bf16 vs upstream fp32, sentences/s", s["l2v_bf16"], s["peer_fp32"], "", ">= 4x", rb, rb >= 4))
        rows.append(row("encode fp32 peak RSS (MB)", m["l2v_fp32"], m["peer_fp32"], "", "", m["peer_fp32"] / m["l2v_fp32"], fmt="{:.0f}"))
    if enc and "full" in enc:
        f = enc["full"]
        for k, lab in (("encode_s", "encode-only"), ("process_wall_s", "whole process (load incl.)")):
            a, b = f["l2v_fp32"]["n"] / f["l2v_fp32"][k], f["peer_fp32"]["n"] / f["peer_fp32"][k]
            rows.append(row(f"encode fp32 full 2,758, {lab}, sentences/s", a, b, "", ">= 1.3x", a / b, a / b >= 1.3))
            c = f["l2v_bf16"]["n"] / f["l2v_bf16"][k]
            rows.append(row(f"encode l2v bf16 full 2,758, {lab}, sentences/s", c, b, "", ">= 4x", c / b, c / b >= 4))
        c1, c2 = enc["cosine_l2v_vs_upstream_fp32"]["min"], enc["cosine_l2v_bf16_vs_l2v_fp32"]["min"]
        rows.append(row("cosine l2v fp32 vs upstream fp32 (min over 2,758)", f"{c1:.6f}", "-", "", ">= 0.9999", None, c1 >= 0.9999))
        rows.append(row("cosine l2v bf16 vs l2v fp32 (min over 2,758)", f"{c2:.6f}", "-", "", ">= 0.999", None, c2 >= 0.999))
    tr = load("train_step") or load("train_step.partial")
    if tr:
        b, runs = tr["batch"], tr["runs"]
        for obj, ntok in (("mntp", b["mntp_tokens"]), ("simcse", 2 * b["simcse_real_tokens"])):
            for ck in ("", "_ckpt"):
                peer = runs.get(f"{obj}_peer_fp32{ck}")
                ptok = peer and ntok / peer["median_step_s"]
                for variant, target in (("fp32", 1.5), ("autocast", 5), ("bf16w", 5)):
                    r = runs.get(f"{obj}_l2v_{variant}{ck}")
                    if not r:
                        continue
                    tok = ntok / r["median_step_s"]
                    ratio = tok / ptok if ptok else None
                    tgt = f">= {target}x" if obj == "mntp" else ""
                    met = (ratio >= target) if (ratio and obj == "mntp") else None
                    name = {"fp32": "fp32", "autocast": "bf16 autocast, fp32 weights", "bf16w": "bf16 weights + autocast"}[variant]
                    rows.append(row(f"{obj} step{' +ckpt' if ck else ''} {name}: tokens/s (s/step)",
                                    f"{tok:.0f} ({r['median_step_s']:.1f} s)",
                                    f"{ptok:.0f} ({peer['median_step_s']:.1f} s)" if peer else "-", "", tgt, ratio, met))
                    if True:
                        pr = peer and peer["peak_rss_mb"] / r["peak_rss_mb"]
                        rows.append(row(f"{obj} step{' +ckpt' if ck else ''} {name}: peak RSS (MB)", r["peak_rss_mb"],
                                        peer["peak_rss_mb"] if peer else "-", "", "<= 0.6x" if obj == "mntp" else "",
                                        pr, (r["peak_rss_mb"] <= 0.6 * peer["peak_rss_mb"]) if (peer and obj == "mntp") else None,
                                        fmt="{:.0f}"))
        for name, why in tr.get("failed", {}).items():  # e.g. a side killed for memory
            rows.append(f"| {name}: failed | - | {why[:120]} | - | | - |")
    ld = load("load")
    if ld:
        m = ld["median"]
        rows.append(row("load fp32: time (s)", m["l2v"]["load_s"], m["peer"]["load_s"], "", "<= 0.5x",
                        m["peer"]["load_s"] / m["l2v"]["load_s"], m["l2v"]["load_s"] <= 0.5 * m["peer"]["load_s"], fmt="{:.2f}"))
        w = m["l2v"]["weights_mb"]
        rows.append(row("load fp32: peak RSS over imports (MB; fp32 weights 513 MiB)", m["l2v"]["rss_over_imports_mb"],
                        m["peer"]["rss_over_imports_mb"], "", "<= 1.1x weights",
                        m["peer"]["rss_over_imports_mb"] / m["l2v"]["rss_over_imports_mb"],
                        m["l2v"]["rss_over_imports_mb"] <= 1.1 * w, fmt="{:.0f}"))
        rows.append(row("load fp32: peak RSS, whole process (MB)", m["l2v"]["peak_rss_mb"], m["peer"]["peak_rss_mb"], "", "",
                        m["peer"]["peak_rss_mb"] / m["l2v"]["peak_rss_mb"], fmt="{:.0f}"))
    ef = load("efficiency")
    if ef:
        for name, r in ef["runs"].items():
            if name.startswith("mntp_peer"):  # upstream, credited with l2v's useful FLOPs: context only
                rows.append(f"| efficiency {name.removeprefix('mntp_')} (upstream; same useful FLOPs) | - | "
                            f"{r['gflops']:.1f} / {r['peak_gflops']:.0f} GFLOP/s | {100 * r['fraction']:.0f}% | | - |")
                continue
            rows.append(row(f"efficiency {name.removeprefix('mntp_')}: GFLOP/s / matmul peak", f"{r['gflops']:.1f} / {r['peak_gflops']:.0f}",
                            "-", "", ">= 50%", None, r["fraction"] >= 0.5) .replace("| - | >=", f"| {100 * r['fraction']:.0f}% | >="))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
