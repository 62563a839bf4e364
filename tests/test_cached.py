"""Cached contrastive steps (`Contrastive.backward` with several micro-batches): the whole global batch is the
contrastive batch at micro-batch memory. With dropout off a cached step equals the plain full-batch step;
with dropout on, both passes of a micro-batch draw the same masks; through train.py, over two processes,
and across a resume."""

import json
import shutil

import pytest
import torch
from conftest import tiny_model
from test_train import adapter, common_args, losses, run

from l2v.config import TrainConfig
from l2v.data import micro_batch_positions
from l2v.encoder import Encoder
from l2v.lora import add_lora, lora_parameters
from l2v.objectives import OBJECTIVES

BATCH = 16


def setup(objective, tok, text_files, micro, dropout=0.0, contrastive_batch="global"):
    """A fresh tiny model with a non-zero LoRA, the objective attached, one global batch in `micro` pieces."""
    ours = dict(
        objective=objective,
        batch_size=BATCH,
        micro_batch_size=micro,
        max_seq_length=32,
        contrastive_batch=contrastive_batch,
        lora_dropout=dropout,
        attention_dropout=dropout,
    )
    cfg = TrainConfig(**OBJECTIVES[objective].defaults | ours)
    model = tiny_model(attention_dropout=dropout)
    add_lora(model, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    model.train()
    obj = OBJECTIVES[objective](cfg, tok)
    obj.attach(model, Encoder(model, tok, max_length=32), lambda: torch.autocast("cpu", enabled=False))
    name = {"simcse": "sents.txt", "supervised": "triples.jsonl", "cosent": "pairs.jsonl"}[objective]
    data = obj.read(text_files / name)
    micro_batches = obj.micro_batches(data, list(range(BATCH)), micro_batch_positions(BATCH, micro, 0, 1), 0)
    return model, obj, micro_batches


def step(objective, tok, text_files, micro, **kw):
    model, obj, mbs = setup(objective, tok, text_files, micro, **kw)
    torch.manual_seed(0)
    loss = obj.backward(model, mbs)
    return loss.item(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("objective", ["simcse", "supervised", "cosent"])
def test_cached_step_equals_the_full_batch_step(objective, tok, text_files):
    full_loss, full = step(objective, tok, text_files, BATCH)  # one micro-batch: the plain step
    for micro in (1, 4):
        loss, grads = step(objective, tok, text_files, micro)
        assert loss == pytest.approx(full_loss, abs=1e-5)
        for a, b in zip(grads, full):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in full)
    # Per-micro-batch negatives (upstream's) are another loss: the mean of four smaller problems.
    micro_loss, _ = step(objective, tok, text_files, 4, contrastive_batch="micro")
    assert abs(micro_loss - full_loss) > 1e-3


def test_both_passes_draw_the_same_dropout_masks(tok, text_files, monkeypatch):
    """Every micro-batch's embeddings in the no-grad pass equal those of its gradient pass, bit for bit,
    with attention and LoRA dropout on; without the RNG replay they would not. The last micro-batch runs
    once (its graph is kept), and the step leaves the RNG where one pass over the micro-batches would."""
    import l2v.objectives

    def embeddings(replay=True):
        model, obj, mbs = setup("simcse", tok, text_files, 4, dropout=0.3)
        seen, real_embed = [], obj.encoder.embed
        record = lambda e: seen.append(e.detach().clone()) or e
        monkeypatch.setattr(obj.encoder, "embed", lambda *a: record(real_embed(*a)))
        if not replay:
            monkeypatch.setattr(l2v.objectives, "set_rng_state", lambda *a: None)
        torch.manual_seed(0)
        obj.backward(model, mbs)
        monkeypatch.undo()
        assert len(seen) == 4 + 3
        return seen[:4], seen[4:]

    first, again = embeddings()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    after_step = torch.rand(3)
    # one pass over the four micro-batches from the same seed, gradients off: where the RNG must end
    model, obj, mbs = setup("simcse", tok, text_files, 4, dropout=0.3)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in mbs:
            obj.encoder.embed(m.inputs[0], model)
    assert torch.equal(after_step, torch.rand(3))
    first, again = embeddings(replay=False)
    assert not any(torch.equal(a, b) for a, b in zip(first, again))


EXTRA = ["--batch_size", "16", "--lora_dropout", "0", "--attention_dropout", "0", "--max_steps", "2"]


@pytest.mark.parametrize("objective", ["simcse", "supervised"])
def test_train_py_cached_equals_full_batch_and_two_processes(objective, tiny_dir, text_files, tmp_path):
    run(
        common_args(tiny_dir, tmp_path / "full", objective, text_files) + EXTRA + ["--micro_batch_size", "16"]
    )
    cached = run(
        common_args(tiny_dir, tmp_path / "cached", objective, text_files)
        + EXTRA
        + ["--micro_batch_size", "4"]
    )
    start = json.loads(next(x for x in cached.stdout.splitlines() if '"event": "start"' in x))
    logged = [json.loads(x) for x in (tmp_path / "cached" / "log.jsonl").read_text().splitlines()]
    assert logged[0] == start  # the log file's first record too
    views = 3 if objective == "supervised" else 2
    assert (start["accum"], start["contrastive_batch"], start["negatives_per_example"]) == (
        4,
        "global",
        16 * (views - 1) - 1,
    )
    run(
        common_args(tiny_dir, tmp_path / "two", objective, text_files) + EXTRA + ["--micro_batch_size", "2"],
        nproc=2,
    )
    a = adapter(tmp_path / "full" / "final")
    for other in ("cached", "two"):
        b = adapter(tmp_path / other / "final")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5, other
        assert max(abs(x - y) for x, y in zip(losses(tmp_path / "full"), losses(tmp_path / other))) <= 1e-5


def test_cached_resume_is_bitwise_identical(tiny_dir, text_files, tmp_path):
    args = [
        "--batch_size",
        "16",
        "--micro_batch_size",
        "4",
        "--lora_dropout",
        "0.1",
        "--attention_dropout",
        "0.1",
        "--max_steps",
        "4",
        "--save_every",
        "2",
    ]
    run(common_args(tiny_dir, tmp_path / "full", "simcse", text_files) + args)
    cut = common_args(tiny_dir, tmp_path / "cut", "simcse", text_files) + args
    run(cut + ["--stop_after_n_steps", "3"])
    shutil.rmtree(tmp_path / "cut" / "final")
    run(cut + ["--resume", "true"])
    a, b = adapter(tmp_path / "full" / "final"), adapter(tmp_path / "cut" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    # every (re)start's record stays, the interrupted run's end record does not; steps 1-4 once each
    assert [r["resumed_at"] for r in log if r.get("event") == "start"] == [0, 2]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4] and log[-1]["event"] == "end"
