"""MNTP loss (i-1 shift, oracle parity), contrastive and CoSENT losses by hand, all_gather_with_grad over
2 processes."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from l2v.objectives import all_gather_with_grad, contrastive_loss, cosent_loss, mntp_loss, num_targets

# -----------------------------------------------------------------------------
# MNTP


def test_mntp_shift_by_hand():
    g = torch.Generator().manual_seed(0)
    B, T, D, V = 2, 6, 4, 5
    hidden, W = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    labels = torch.full((B, T), -100)
    labels[0, 0] = 3  # position 0 cannot be predicted (no t-1): must be ignored
    labels[0, 2], labels[0, 5], labels[1, 1] = 1, 4, 0
    loss = mntp_loss(hidden, labels, W)

    # Independent computation: token (b, t) is scored by the logits of hidden[b, t-1].
    terms = []
    for b, t in [(0, 2), (0, 5), (1, 1)]:
        logits = [sum(hidden[b, t - 1, k].item() * W[v, k].item() for k in range(D)) for v in range(V)]
        lse = math.log(sum(math.exp(x) for x in logits))
        terms.append(lse - logits[labels[b, t].item()])
    assert loss.item() == pytest.approx(sum(terms) / 3, abs=1e-5)
    assert num_targets(labels).item() == 3
    # a caller-provided normalizer (global masked-token count) replaces the local count
    assert mntp_loss(hidden, labels, W, normalizer=10).item() == pytest.approx(sum(terms) / 10, abs=1e-5)
    # no scored token: zero loss, no NaN
    assert mntp_loss(hidden, torch.full((B, T), -100), W).item() == 0.0


@pytest.fixture(scope="module")
def mntp_ref(oracle_dir):
    return json.loads((oracle_dir / "mntp_loss.json").read_text())


@pytest.mark.parametrize("family,is_causal", [("bidirectional", False), ("causal", True)])
def test_mntp_loss_matches_oracle(demo_model_dir, mntp_ref, family, is_causal):
    from l2v.checkpoint import load_model

    model = load_model(demo_model_dir, is_causal=is_causal).eval()
    ids, labels = torch.tensor(mntp_ref["input_ids"]), torch.tensor(mntp_ref["labels"])
    with torch.no_grad():
        loss = mntp_loss(model(ids), labels, model.lm_head_weight)
    assert num_targets(labels).item() == mntp_ref["n_labelled"] == 26
    assert abs(loss.item() - mntp_ref[family]["loss"]) < 1e-4, (loss.item(), mntp_ref[family]["loss"])


# -----------------------------------------------------------------------------
# Contrastive


def expected_infonce(q, cands, scale):
    """Mean over queries of logsumexp_j(scale*cos(q_i, c_j)) - scale*cos(q_i, c_i), in plain Python."""

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    total = 0.0
    for i, qi in enumerate(q):
        s = [scale * cos(qi, c) for c in cands]
        total += math.log(sum(math.exp(x) for x in s)) - s[i]
    return total / len(q)


def test_contrastive_loss_by_hand():
    q = [[1.0, 2.0, 0.5], [-1.0, 0.3, 2.0], [0.2, -0.7, 1.1]]
    d = [[0.9, 1.5, 0.0], [-0.5, 0.1, 1.0], [1.0, 1.0, 1.0]]
    n = [[0.0, 1.0, -1.0], [2.0, -1.0, 0.3]]
    got = contrastive_loss(torch.tensor(q), torch.tensor(d), scale=20.0)
    assert got.item() == pytest.approx(expected_infonce(q, d, 20.0), rel=1e-5)
    got = contrastive_loss(torch.tensor(q), torch.tensor(d), torch.tensor(n), scale=50.0)
    assert got.item() == pytest.approx(expected_infonce(q, d + n, 50.0), rel=1e-5)
    # cosine: the scale of the vectors does not matter; bf16 inputs are scored in float32
    assert contrastive_loss(7 * torch.tensor(q), 0.1 * torch.tensor(d)).item() == pytest.approx(
        expected_infonce(q, d, 20.0), rel=1e-5
    )
    assert contrastive_loss(torch.tensor(q).bfloat16(), torch.tensor(d).bfloat16()).dtype == torch.float32


def test_contrastive_identical_views_and_hard_negatives():
    e = 3 * torch.eye(4)
    loss = contrastive_loss(e, e, scale=20.0)
    assert loss.item() == pytest.approx(math.log(1 + 3 * math.exp(-20)), abs=1e-7) and loss.item() < 1e-7
    # a hard negative equal to the positive doubles the top term: loss -> log 2
    loss = contrastive_loss(e, e, hard_negatives=e, scale=20.0)
    assert loss.item() == pytest.approx(math.log(2 + 6 * math.exp(-20)), rel=1e-6)
    # an orthogonal hard negative adds exp(0) to each denominator
    hn = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]])
    loss = contrastive_loss(torch.cat([e, torch.zeros(4, 1)], 1), torch.cat([e, torch.zeros(4, 1)], 1), hn)
    assert loss.item() == pytest.approx(math.log(1 + 4 * math.exp(-20)), abs=1e-7)


def test_cosent_by_hand():
    # cos = 1, 0, 1/sqrt(2); gold order 0 > 2 > 1: three ordered pairs, each adds exp(scale (cos_low -
    # cos_high))
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    for scale in (1.0, 20.0):
        want = math.log(1 + math.exp(scale * (0 - 1)) + math.exp(scale * (c - 1)) + math.exp(scale * (0 - c)))
        assert cosent_loss(a, b, torch.tensor([3.0, 1.0, 2.0]), scale=scale).item() == pytest.approx(
            want, rel=1e-5
        )
    # only the order of the gold scores counts: any increasing map gives the same loss
    assert cosent_loss(a, b, torch.tensor([5.0, 0.0, 4.9])).item() == pytest.approx(
        cosent_loss(a, b, torch.tensor([3.0, 1.0, 2.0])).item()
    )
    # ties add nothing: equal gold scores leave log(1) = 0 and no gradient
    x = a.clone().requires_grad_()
    loss = cosent_loss(x, b, torch.tensor([2.0, 2.0, 2.0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    # a wrong order costs more than the right one
    assert cosent_loss(a, b, torch.tensor([1.0, 3.0, 2.0])) > cosent_loss(a, b, torch.tensor([3.0, 1.0, 2.0]))


def test_all_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    y = all_gather_with_grad(x)
    assert y is x
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 4))


def _gather_worker(rank, world_size, init_file):
    """Each rank holds half of the global batch; after DDP-style gradient averaging the gradient must equal
    the single-process gradient on the full batch (loss over the gathered pool of negatives)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        g = torch.Generator().manual_seed(0)
        X, noise, neg = (
            torch.randn(8, 6, generator=g),
            torch.randn(8, 6, generator=g),
            torch.randn(8, 6, generator=g),
        )
        W0, gold = torch.randn(6, 5, generator=g), torch.rand(8, generator=g)
        for fn in ("simcse", "supervised", "cosent"):

            def loss_fn(
                W, rows, gather
            ):  # train.py's way: gather every view (and cosent's scores), then the loss
                views = [X[rows] @ W, (X[rows] + 0.3 * noise[rows]) @ W, neg[rows] @ W, gold[rows]]
                q, d, n, s = (all_gather_with_grad(v) for v in views) if gather else views
                if fn == "cosent":
                    return cosent_loss(q, n, s)
                return (
                    contrastive_loss(q, d, scale=20.0)
                    if fn == "simcse"
                    else contrastive_loss(q, d, n, scale=50.0)
                )

            W_full = W0.clone().requires_grad_()
            ref = loss_fn(W_full, slice(0, 8), gather=False)
            ref.backward()
            W = W0.clone().requires_grad_()
            n_local = 8 // world_size
            loss = loss_fn(W, slice(rank * n_local, (rank + 1) * n_local), gather=True)
            loss.backward()
            grad = W.grad.clone()
            dist.all_reduce(grad)
            grad /= world_size  # what DDP does
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad, W_full.grad, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_all_gather_with_grad_two_processes(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "pg_init")), nprocs=2, join=True)
