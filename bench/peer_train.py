"""Upstream side of the train-step figures (runs in bench/.peer-venv): llm2vec's bidirectional Llama
from transformers 4.44.2 + peft LoRA, fp32, the same batches and loss definitions as l2v_train.py.

    bench/.peer-venv/bin/python bench/peer_train.py {mntp|simcse} CKPT(0|1) WARMUP STEPS BATCH.npz

MNTP: LlamaBiForMNTP with peft on its inner LlamaBiModel (as llm2vec's run_mntp.py does); the loss is
transformers' own labels path: cross-entropy of the full (B, T, 49152) logits[:, :-1] vs labels[:, 1:].
SimCSE: LlamaBiModel + peft, attention dropout 0.3, mean pooling over real tokens, cos x 20 InfoNCE.
"""
import importlib
import sys
import time

import numpy as np
import torch

from common import DEMO_MODEL, emit, pin_threads, timed_steps


def main(objective, ckpt, warmup, steps, batch_file, model_dir=DEMO_MODEL):
    pin_threads()
    torch.manual_seed(0)
    importlib.import_module("torch.distributed.tensor")  # peft 0.21.2 on torch 2.13 needs it imported first
    import torch.nn.functional as F
    from llm2vec.models.bidirectional_llama import LlamaBiForMNTP, LlamaBiModel
    from peft import LoraConfig, get_peft_model
    batch = {k: torch.from_numpy(v) for k, v in np.load(batch_file).items()}
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type=None,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    t0 = time.perf_counter()
    if objective == "mntp":
        model = LlamaBiForMNTP.from_pretrained(model_dir, torch_dtype=torch.float32)
        model.set_model_for_peft(get_peft_model(model.get_model_for_peft(), cfg))
    else:
        model = get_peft_model(LlamaBiModel.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                            attention_dropout=0.3), cfg)
    load_s = time.perf_counter() - t0
    model.train()
    if int(ckpt):
        # use_reentrant=False as l2v does: the frozen embedding output has no grad, which the
        # reentrant variant would need (enable_input_require_grads) to reach the LoRA weights.
        (model if objective == "mntp" else model.base_model.model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss_fn():
        if objective == "mntp":
            ids = batch["masked"]
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=batch["labels"]).loss
        ids, mask = batch["ids"], batch["attention_mask"]
        views = []
        for _ in range(2):
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            w = mask.float() / mask.sum(1, keepdim=True)
            views.append((h * w[..., None]).sum(1))
        q, d = (F.normalize(v, dim=-1) for v in views)
        return F.cross_entropy(20.0 * q @ d.T, torch.arange(q.shape[0]))

    times, losses = timed_steps(loss_fn, opt, int(warmup), int(steps))
    emit(dict(side="peer", objective=objective, variant="fp32", ckpt=int(ckpt), load_s=load_s,
              step_s=times, losses=losses))


if __name__ == "__main__":
    main(*sys.argv[1:])
