"""Same-process A/B of the MNTP train step (4 x 512, LoRA r=16, fp32): l2v vs upstream, alternating.

    bench/.peer-venv/bin/python bench/ab_train.py [CKPT(0|1)] [STEPS]

Both models (each with its own LoRA and AdamW) live in one process; steps alternate l2v / upstream so
machine load hits both alike. The load-robust check of bench_train.py's process-level MNTP ratio.
"""
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import DEMO_MODEL, RESULTS, pin_threads  # noqa: E402


def main(ckpt=1, steps=3):
    ckpt, steps = int(ckpt), int(steps)
    pin_threads()
    torch.manual_seed(0)
    importlib.import_module("torch.distributed.tensor")  # peft 0.21.2 on torch 2.13
    from bench_train import make_batches
    from l2v.checkpoint import load_model
    from l2v.lora import add_lora, lora_parameters
    from l2v.objectives import mntp_loss
    from llm2vec.models.bidirectional_llama import LlamaBiForMNTP
    from peft import LoraConfig, get_peft_model
    with tempfile.TemporaryDirectory() as tmp:
        make_batches(tmp)
        b = {k: torch.from_numpy(v) for k, v in np.load(f"{tmp}/mntp.npz").items()}
    a = load_model(DEMO_MODEL, is_causal=False)
    add_lora(a, r=16, alpha=32, dropout=0.05)
    a.train()
    a.gradient_checkpointing = bool(ckpt)
    p = LlamaBiForMNTP.from_pretrained(DEMO_MODEL, torch_dtype=torch.float32)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type=None,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    p.set_model_for_peft(get_peft_model(p.get_model_for_peft(), cfg))
    p.train()
    if ckpt:
        p.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt_a = torch.optim.AdamW(lora_parameters(a), lr=1e-4)
    opt_p = torch.optim.AdamW([q for q in p.parameters() if q.requires_grad], lr=1e-4)
    sides = {
        "l2v": (lambda: mntp_loss(a, b["masked"], b["labels"]), opt_a),
        "peer": (lambda: p(input_ids=b["masked"], attention_mask=torch.ones_like(b["masked"]),
                           labels=b["labels"]).loss, opt_p),
    }
    ts = {k: [] for k in sides}
    for i in range(steps + 1):
        for k, (loss_fn, opt) in sides.items():
            t0 = time.perf_counter()
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                ts[k].append(time.perf_counter() - t0)
            print(f"step {i} {k}: {time.perf_counter() - t0:.1f} s loss {loss.item():.5f}", flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in ts.items()}
    print(f"MNTP ckpt={ckpt}: l2v {med['l2v']:.1f} s/step, upstream {med['peer']:.1f} s/step, "
          f"ratio {med['peer'] / med['l2v']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ab_train_ckpt{ckpt}.json").write_text(json.dumps(dict(step_s=ts, median=med), indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
