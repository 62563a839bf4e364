"""Upstream side (llm2vec 0.2.3, transformers 4.44.2, peft), `python bench/peer_side.py SPEC.json` from
run.py;
imports only the stdlib, numpy, torch, transformers, peft and llm2vec. Each figure does what upstream does:
`LLM2Vec.encode`; MNTP with `LlamaBiForMNTP`'s labels loss (all logits); SimCSE as run_simcse.py."""

import importlib
from types import SimpleNamespace

import numpy as np
import torch
from common import run_worker, timed, train


def peft_model(model):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # run_mntp.py's
    return get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", target_modules=targets)
    )


def load(spec, device):
    importlib.import_module("torch.distributed.tensor")  # peft 0.21.2 on recent torch needs it imported first
    from llm2vec import LLM2Vec
    from llm2vec.models.bidirectional_llama import LlamaBiForMNTP
    from transformers import AutoTokenizer

    # device_map as llm2vec's README; LLM2Vec.from_pretrained would load this model's inner LlamaBiModel.
    model = LlamaBiForMNTP.from_pretrained(
        spec["model"],
        torch_dtype=getattr(torch, spec["weights_dtype"]),
        device_map=str(device),
        attn_implementation="sdpa",
    )
    tok = AutoTokenizer.from_pretrained(spec["model"])
    tok.pad_token, tok.padding_side = tok.eos_token, "left"  # as LLM2Vec.from_pretrained
    return SimpleNamespace(mntp=model, enc=LLM2Vec(model.model, tok, pooling_mode="mean", max_length=512))


def encode(st, spec, device, key):
    texts, out = spec["data"][key], {}
    run = lambda x: st.enc.encode(x, batch_size=32, show_progress_bar=False, device=str(device))  # noqa: E731
    run(texts[:64])
    times = timed(lambda: out.update(emb=run(texts)), 0, spec["repeats"], device)
    np.save(f"{spec['out']}_{key}.npy", np.asarray(out["emb"], dtype=np.float32))
    return dict(times=times, n=len(texts))


def set_attention_dropout(model, p: float) -> None:
    for m in model.modules():  # each attention module copied the config's value when it was built
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = p


def mntp(st, spec, device, ckpt):
    """peft wraps the whole LlamaBiForMNTP, so that only LoRA trains, as on the l2v side. (run_mntp.py
    wraps `model.model`, which leaves an untied model's LM head trainable: more work than l2v does.)"""
    model = st.mntp
    if ckpt:  # non-reentrant, as l2v: the reentrant one needs a grad on the frozen embedding's output
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    set_attention_dropout(model, 0.0)
    peft = peft_model(model).train()
    batch = np.load(spec["mntp"])
    ids, labels = (torch.from_numpy(batch[k]).to(device) for k in ("ids", "labels"))
    try:
        return train(
            lambda: peft(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss,
            [p for p in peft.parameters() if p.requires_grad],
            spec,
            device,
        )
    finally:
        st.mntp = peft.unload()  # the plain model again, for the next figure


def simcse(st, spec, device):
    from llm2vec import LLM2Vec
    from llm2vec.loss.HardNegativeNLLLoss import HardNegativeNLLLoss

    base, texts = st.enc.model, spec["data"]["simcse"]
    base.gradient_checkpointing_disable()
    set_attention_dropout(base, 0.3)
    # As run_simcse.py: LoRA on LLM2Vec.model, max length 128, plain sentences (no instruction separator)
    # through LLM2Vec.tokenize; LLM2Vec.forward edits the feature dict it gets, so each view gets a copy.
    enc = LLM2Vec(peft_model(base), st.enc.tokenizer, pooling_mode="mean", max_length=128).train()
    feats, loss = {k: v.to(device) for k, v in enc.tokenize(texts).items()}, HardNegativeNLLLoss(scale=20.0)
    try:
        out = train(
            lambda: loss(enc(dict(feats)), enc(dict(feats))),
            [p for p in enc.parameters() if p.requires_grad],
            spec,
            device,
        )
    finally:
        enc.model.unload()  # LoRA out of the shared base model again
    return dict(out, n=len(texts))


FIGURES = {
    "encode_sts": lambda st, s, d: encode(st, s, d, "sts"),
    "encode_msmarco": lambda st, s, d: encode(st, s, d, "msmarco"),
    "mntp": lambda st, s, d: mntp(st, s, d, False),
    "mntp_ckpt": lambda st, s, d: mntp(st, s, d, True),
    "simcse": simcse,
}

if __name__ == "__main__":
    run_worker(load, FIGURES)
