"""The demo model through l2v vs the reference outputs of transformers / llm2vec / peft
(../shared/reference/oracle).

Needs the demo model (`python scripts/build_demo_model.py`); skipped otherwise. The model is loaded once
per module, and each distinct batch is run once (the forward is memoised), because several pooling
configurations share the same hidden states. To keep the file fast, only the bidirectional standard
preparation (mean, weighted_mean, last_token) runs every input, including the long ones that exercise
doc_max_length and the 512 cut; the other configurations and the adapter use the inputs of at most
120 tokens. L2V_ORACLE_FULL=1 runs every input everywhere.
"""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from l2v.checkpoint import load_model
from l2v.encoder import Encoder
from l2v.tokenizer import Tokenizer

CONFIGS = [
    "bidir.mean",
    "bidir.weighted_mean",
    "bidir.eos_token",
    "bidir.last_token",
    "causal.mean",
    "causal.weighted_mean",
]
MIN_COS, MAX_ABS = 0.99999, 1e-3  # the README's suggested tolerances against the bs1 arrays
FULL = os.environ.get("L2V_ORACLE_FULL", "") not in ("", "0")
ALL_INPUTS = ("bidir.mean", "bidir.weighted_mean", "bidir.last_token")  # share one forward per part


def memoise_forward(model):
    """Replace model.forward by a cached one: same inputs and causality -> same hidden states."""
    forward, cache = model.forward, {}

    def cached(input_ids, attention_mask=None, is_causal=None):
        causal = model.config.is_causal if is_causal is None else is_causal
        key = (
            causal,
            tuple(input_ids.shape),
            input_ids.numpy().tobytes(),
            None if attention_mask is None else attention_mask.numpy().tobytes(),
        )
        if key not in cache:
            cache[key] = forward(input_ids, attention_mask, is_causal)
        return cache[key]

    model.forward = cached
    return model


@pytest.fixture(scope="module")
def model(demo_model_dir):
    return memoise_forward(load_model(demo_model_dir))


@pytest.fixture(scope="module")
def tok(demo_model_dir):
    return Tokenizer(demo_model_dir)


@pytest.fixture(scope="module")
def inputs(oracle_dir):
    """{part: (inputs as llm2vec got them, indices of the short ones)}; ids are pinned in test_encoder.py."""
    recs = json.loads((oracle_dir / "embeddings.json").read_text(encoding="utf-8"))["inputs"]
    out = {}
    for part in ("pairs", "docs"):
        rs = recs[f"standard.{part}"]
        items = [(r["instruction"], r["text"]) if r["kind"] == "pair" else r["text"] for r in rs]
        short = [i for i, r in enumerate(rs) if FULL or r["seq_len"] <= 120]
        out[part] = items, short
    return out


def compare(ours, ref, what):
    assert ours.shape == ref.shape and ours.dtype == np.float32, what
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    diff = np.abs(ours - ref).max()
    assert cos.min() >= MIN_COS and diff <= MAX_ABS, (
        f"{what}: min cosine {cos.min():.8f}, max abs diff {diff:.3g}"
    )


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("part", ["pairs", "docs"])
def test_llm2vec_embeddings(model, tok, inputs, oracle_dir, cfg, part):
    family, mode = cfg.split(".")
    model.config.is_causal = family == "causal"
    enc = Encoder(model, tok, pooling=mode)
    ref = load_file(oracle_dir / "embeddings.safetensors")[f"{cfg}.{part}.bs1"]
    items, short = inputs[part]
    idx = list(range(len(items))) if cfg in ALL_INPUTS else short
    compare(enc.encode([items[i] for i in idx]), ref[idx], f"{cfg}.{part}")


def test_causal_lm_and_full_attention(model, oracle_dir):
    ref = load_file(oracle_dir / "causal_logits.safetensors")
    n = len({k.split(".")[0] for k in ref})
    assert n == 3
    with torch.inference_mode():
        for i in range(n):
            ids = torch.from_numpy(ref[f"p{i}.input_ids"])[None]  # (1, T)
            causal = model(ids, is_causal=True)[0]
            full = model(ids, is_causal=False)[0]
            # float32 sums in another order (thread count, kernels) move large values by a few ulps: rtol too
            close = dict(rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(causal.numpy(), ref[f"p{i}.hidden_final_causal"], **close)
            np.testing.assert_allclose(full.numpy(), ref[f"p{i}.hidden_final_full"], **close)
            logits = causal[-1] @ model.lm_head_weight.T
            np.testing.assert_allclose(logits.numpy(), ref[f"p{i}.logits_last"], **close)
            assert logits.argmax().item() == int(np.argmax(ref[f"p{i}.logits_last"]))


def test_layer_outputs_causal(model, oracle_dir):
    ref = load_file(oracle_dir / "causal_logits.safetensors")
    ids = torch.from_numpy(ref["p0.input_ids"])[None]
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outs.append(out[0])) for layer in model.layers]
    try:
        with torch.inference_mode():
            assert torch.equal(model.embed_tokens(ids)[0], torch.from_numpy(ref["p0.embeddings"]))
            type(model).forward(model, ids, is_causal=True)  # the class's forward: the hooks need a real run
    finally:
        for h in hooks:
            h.remove()
    assert len(outs) == 30
    # the residual stream carries a few huge activations (~3e3): compare relatively there
    np.testing.assert_allclose(
        torch.stack(outs).numpy(), ref["p0.layer_outputs_causal"], rtol=1e-5, atol=1e-3
    )


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_peft_adapter(demo_model_dir, tok, inputs, oracle_dir, merge):
    from l2v.adapters import load_adapter

    model = load_model(demo_model_dir, is_causal=False)
    load_adapter(model, oracle_dir / "peft_adapter", merge=merge)
    enc = Encoder(model, tok, pooling="mean")
    ref = load_file(oracle_dir / "peft_embeddings.safetensors")
    name = "merged" if merge else "unmerged"
    for part in ("pairs", "docs"):
        items, idx = inputs[part]
        compare(enc.encode([items[i] for i in idx]), ref[f"{name}.{part}.bs1"][idx], f"peft {name}.{part}")
