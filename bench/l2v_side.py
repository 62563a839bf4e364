"""l2v side: `python bench/l2v_side.py SPEC.json`, started by run.py. It imports the l2v that PYTHONPATH
names, so `run.py --against` times another checkout with this same code."""

import contextlib
import inspect
import math

import numpy as np
import torch
from common import matmul_tflops, run_worker, timed, train


def load(spec, device):
    from l2v.checkpoint import load_model
    from l2v.encoder import Encoder
    from l2v.tokenizer import Tokenizer

    return Encoder(
        load_model(spec["model"], dtype=spec["weights_dtype"], device=device, is_causal=False),
        Tokenizer(spec["model"]),
    )


def encode(enc, spec, device, key):
    texts, out = spec["data"][key], {}
    kw = (
        {} if "max_batch_tokens" in inspect.signature(enc.encode).parameters else {"batch_size": 32}
    )  # older API
    enc.encode(texts[:64], **kw)
    times = timed(lambda: out.update(emb=enc.encode(texts, **kw)), 0, spec["repeats"], device)
    np.save(f"{spec['out']}_{key}.npy", out["emb"])
    return dict(times=times, n=len(texts))


def fresh_lora(model, attention_dropout: float):
    """A new LoRA for each training figure (added once, then re-initialised) and its attention dropout."""
    from l2v.lora import add_lora, lora_modules, lora_parameters

    if not lora_modules(model):
        add_lora(model, r=16, alpha=32, dropout=0.05)
    for m in lora_modules(model).values():
        torch.nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(m.lora_B.weight)
    for layer in model.layers:
        layer.self_attn.dropout = attention_dropout
    return lora_parameters(model.train())


def mntp(enc, spec, device, ckpt):
    from l2v.objectives import mntp_loss

    model, batch = enc.model, np.load(spec["mntp"])
    params, model.gradient_checkpointing = fresh_lora(model, 0.0), ckpt
    ids, labels = (torch.from_numpy(batch[k]).to(device) for k in ("ids", "labels"))
    return train(lambda: mntp_loss(model(ids), labels, model.lm_head_weight), params, spec, device)


def simcse(enc, spec, device, batch=None, micro=None, negatives="global"):
    """train.py's own SimCSE step (`l2v.objectives.SimCSE`): both views of every sentence packed, mean
    pooling,
    cos x 20 InfoNCE; with micro-batches, the cached step (the whole batch as negatives). Checkouts that
    predate the objective classes get the same computation written out."""
    from l2v.encoder import Encoder

    params, enc.model.gradient_checkpointing = fresh_lora(enc.model, 0.3), False
    senc, texts = Encoder(enc.model, enc.tokenizer, max_length=128), spec["data"]["simcse"]
    n = batch or len(texts)
    texts = (texts * (n // len(texts) + 1))[:n]
    try:
        from l2v.objectives import SimCSE
    except ImportError:
        from l2v.objectives import contrastive_loss

        (packed,) = senc.batches(senc.prepare_inputs(texts * 2))
        out = train(lambda: contrastive_loss(*senc.embed(packed).chunk(2), scale=20.0), params, spec, device)
        return dict(out, n=n)
    from l2v.config import TrainConfig

    cfg = TrainConfig(
        objective="simcse",
        batch_size=n,
        micro_batch_size=micro or n,
        max_seq_length=128,
        scale=20.0,
        contrastive_batch=negatives,
    )
    objective = SimCSE(cfg, enc.tokenizer)
    objective.attach(enc.model, senc, contextlib.nullcontext)  # common.train sets the autocast
    positions = [list(range(i, i + (micro or n))) for i in range(0, n, micro or n)]
    step = objective.micro_batches(texts, list(range(n)), positions, 0)
    out = train(lambda: objective.backward(enc.model, step), params, spec, device, backward=False)
    return dict(out, n=n)


FIGURES = {
    "encode_sts": lambda e, s, d: encode(e, s, d, "sts"),
    "encode_msmarco": lambda e, s, d: encode(e, s, d, "msmarco"),
    "mntp": lambda e, s, d: mntp(e, s, d, False),
    "mntp_ckpt": lambda e, s, d: mntp(e, s, d, True),
    "simcse": simcse,
    # --cached: a plain step at the micro-batch size; the big batch in micro-batches, each its own
    # contrastive problem (upstream's accumulation) and cached; the plain big batch
    "simcse_small": lambda e, s, d: simcse(e, s, d, s["cached"][1]),
    "simcse_micro": lambda e, s, d: simcse(e, s, d, *s["cached"], negatives="micro"),
    "simcse_cached": lambda e, s, d: simcse(e, s, d, *s["cached"]),
    "simcse_large": lambda e, s, d: simcse(e, s, d, s["cached"][0]),
    "matmul": lambda e, s, d: {
        "tflops": matmul_tflops(d, getattr(torch, s["autocast"] or s["weights_dtype"]), s["matmul_n"])
    },
}

if __name__ == "__main__":
    run_worker(load, FIGURES)
