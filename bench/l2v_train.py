"""l2v side of the train-step figures: MNTP (4 x 512) or SimCSE (64 x 64) steps with LoRA r=16.

    python bench/l2v_train.py {mntp|simcse} {fp32|autocast|bf16w} CKPT(0|1) WARMUP STEPS BATCH.npz [MODEL_DIR]

fp32: fp32 weights and math. autocast: fp32 weights under torch.autocast("cpu", bfloat16).
bf16w: bf16 base weights (LoRA weights stay fp32), also under autocast. AdamW over the LoRA weights.
"""
import contextlib
import sys
import time

import numpy as np
import torch

from common import DEMO_MODEL, emit, pin_threads, timed_steps


def main(objective, variant, ckpt, warmup, steps, batch_file, model_dir=DEMO_MODEL):
    pin_threads()
    torch.manual_seed(0)
    from l2v.checkpoint import load_model
    from l2v.encoder import pool
    from l2v.lora import add_lora, lora_parameters
    from l2v.objectives import mntp_loss, simcse_loss
    batch = {k: torch.from_numpy(v) for k, v in np.load(batch_file).items()}
    t0 = time.perf_counter()
    model = load_model(model_dir, dtype="bfloat16" if variant == "bf16w" else "float32", is_causal=False,
                       attention_dropout=0.3 if objective == "simcse" else None)
    add_lora(model, r=16, alpha=32, dropout=0.05)
    load_s = time.perf_counter() - t0
    model.train()
    model.gradient_checkpointing = bool(int(ckpt))
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if variant != "fp32" else contextlib.nullcontext()

    def loss_fn():
        if objective == "mntp":
            return mntp_loss(model, batch["masked"], batch["labels"])
        ids, mask = batch["ids"], batch["attention_mask"]
        views = [pool(model(ids, mask), mask, None, "mean") for _ in range(2)]  # two dropout views
        return simcse_loss(*views, scale=20.0)

    times, losses = timed_steps(loss_fn, opt, int(warmup), int(steps), amp)
    emit(dict(side="l2v", objective=objective, variant=variant, ckpt=int(ckpt), load_s=load_s,
              step_s=times, losses=losses))


if __name__ == "__main__":
    main(*sys.argv[1:])
