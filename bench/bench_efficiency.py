"""Efficiency figure: achieved FLOP/s of l2v's MNTP train step / measured matmul peak in the same dtype.

    python bench/bench_efficiency.py        (reads bench/results/train_step.json; run bench_train.py first)

Useful ("model") FLOPs of one MNTP step with a frozen base and LoRA, counted analytically (recomputation
under gradient checkpointing is NOT counted: it is overhead, not useful work):
  P     = matmul weights per layer x layers (q, k, v, o, gate, up, down; no embedding)
  fwd   = 2*P*N  +  4*L*B*T^2*H*hd (QK^T and AV)  +  2*M*D*V (LM head on the M masked positions only)
          + 2*N*r*sum(in+out) over the 7L LoRA modules
  bwd   = 2*P*N (activation grads only: the base is frozen)  +  2 x attention  +  2*M*D*V (head: dX only,
          the tied embedding is frozen)  +  2 x LoRA (dX and dW)
  total = fwd + bwd  ~= 2 x fwd for the base matmuls, 3 x fwd for attention and LoRA.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEMO_MODEL, RESULTS, run_worker, save_results  # noqa: E402


def mntp_step_flops(cfg: dict, B: int, T: int, M: int, r: int = 16) -> dict:
    D, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or D // H
    F_ = cfg["intermediate_size"]
    shapes = [(D, H * hd), (D, K * hd), (D, K * hd), (H * hd, D), (D, F_), (D, F_), (F_, D)]  # (in, out)
    P = L * sum(i * o for i, o in shapes)
    N = B * T
    lin = 2 * P * N
    attn = 4 * L * B * T * T * H * hd
    head = 2 * M * D * V
    lora = 2 * N * r * L * sum(i + o for i, o in shapes)
    fwd = lin + attn + head + lora
    bwd = lin + 2 * attn + head + 2 * lora
    return dict(params_matmul=P, fwd=fwd, bwd=bwd, total=fwd + bwd, linear_fwd=lin, attention_fwd=attn,
                head_fwd=head, lora_fwd=lora)


def main():
    path = RESULTS / "train_step.json"
    train = json.loads((path if path.is_file() else RESULTS / "train_step.partial.json").read_text())
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    B, T = train["batch"]["mntp_shape"]
    flops = mntp_step_flops(cfg, B, T, train["batch"]["mntp_masked"])
    peak = run_worker(sys.executable, "matmul_peak.py", 4096, 5)
    lines, rows = [], {}
    for name, r in train["runs"].items():
        if not name.startswith("mntp_"):
            continue
        dtype = "float32" if name.split("_")[2] == "fp32" else "bfloat16"
        achieved = flops["total"] / r["median_step_s"] / 1e9
        frac = achieved / peak[dtype]["median_gflops"]
        rows[name] = dict(gflops=achieved, peak_gflops=peak[dtype]["median_gflops"], fraction=frac)
        lines.append(f"{'efficiency ' + name:<44} {achieved:8.1f} GFLOP/s of {peak[dtype]['median_gflops']:7.1f} "
                     f"({dtype} 4096^3 mm) = {100 * frac:5.1f}%")
    lines.append(f"{'MNTP step useful FLOPs':<44} {flops['total'] / 1e12:.3f} TFLOP "
                 f"(fwd {flops['fwd'] / 1e12:.3f}, bwd {flops['bwd'] / 1e12:.3f})")
    print("\n".join(lines))
    print("wrote", save_results("efficiency", dict(flops=flops, matmul_peak=peak, runs=rows, lines=lines)))


if __name__ == "__main__":
    main()
