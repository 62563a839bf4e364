"""Training objectives: the losses as small pure functions, and one class per objective that `train.py`
runs without knowing its name. An objective has its defaults, its data reader, its micro-batch maker and
its loss; registering one is one entry in `OBJECTIVES` (docs/ablations.md walks through it):

    objective = OBJECTIVES[cfg.objective](cfg, tokenizer)  # checks only: nothing is written
    examples = objective.read(cfg.train_file)
    objective.attach(model, encoder, amp)                     # once the model is loaded
    micro = objective.micro_batches(examples, global_batch, positions, step)
    loss = objective.backward(forward, micro)                 # one step's gradients

Conventions are llm2vec's. MNTP: the token at t is predicted from the output at t-1 (the causal-LM shift,
kept although attention is bidirectional). Contrastive: cosine x scale (20 SimCSE, 50 supervised),
cross-entropy with the positive on the diagonal, every other gathered document (and hard negative) a
negative. CoSENT (not in llm2vec): graded pairs, for a last supervised stage on similarity scores.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .data import PAIR_FIELDS, mask_token_id, mask_tokens, mntp_blocks, read_examples, read_texts
from .distributed import all_gather_with_grad, all_sum, is_distributed

# ----------------------------------------------------------------------------- losses


def num_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of tokens MNTP scores in this batch: labels at positions 1.. (position 0 has no t-1)."""
    return (labels[:, 1:] != -100).sum()


def mntp_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head_weight: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Masked next-token prediction: sum of float32 cross-entropies / normalizer. hidden (B, T, D),
    labels (B, T) = the original id where masked, else -100; head_weight (V, D). The head runs only on
    the ~20% of positions that predict a masked token (full logits would outweigh the rest of the step).
    normalizer: default the scored tokens of THIS batch; with accumulation or DDP, the GLOBAL count over
    micro-batches and ranks / world size (DDP averages gradients), so every masked token weighs the same.
    logit_softcap: the final-logit soft-capping the head was trained with (Gemma 2), cap * tanh(logits /
    cap)."""
    targets = labels[:, 1:]  # (B, T-1): the label predicted by each output position 0..T-2
    sel = targets != -100
    logits = F.linear(hidden[:, :-1][sel], head_weight).float()  # (N, V), N = number of scored tokens
    if logit_softcap is not None:
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    loss = F.cross_entropy(logits, targets[sel], reduction="sum")
    if normalizer is None:
        normalizer = sel.sum().clamp(min=1)
    return loss / normalizer


def contrastive_loss(
    q: torch.Tensor, d: torch.Tensor, hard_negatives: torch.Tensor | None = None, scale: float = 20.0
) -> torch.Tensor:
    """InfoNCE over cosine similarities. q, d (B, D): d[i] is the positive of q[i]; hard_negatives (H, D).

    Candidates for every query: all of d, then all hard negatives; target of q[i] is candidate i.
    L2-normalisation and scores in float32 (bf16 cosines x 50 lose the ranking signal).
    """
    cand = d if hard_negatives is None else torch.cat([d, hard_negatives])  # (B + H, D)
    q = F.normalize(q.float(), dim=-1)
    cand = F.normalize(cand.float(), dim=-1)
    scores = scale * q @ cand.T  # (B, B + H)
    return F.cross_entropy(scores, torch.arange(q.shape[0], device=q.device))


def cosent_loss(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """CoSENT (Su 2022) on graded pairs: a, b (B, D), gold scores (B,). Every two pairs whose gold scores
    differ are a ranking problem: log(1 + sum over score_i > score_j of exp(scale (cos_j - cos_i))).
    Only the order of the scores counts (SICK's 1-5 and STS-B's 0-5 alike); ties add nothing."""
    cos = scale * F.cosine_similarity(a.float(), b.float(), dim=-1)  # (B,)
    scores = scores.to(cos.device)
    diff = (cos[None, :] - cos[:, None]).masked_fill(scores[:, None] <= scores[None, :], float("-inf"))
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), dim=0)


# ----------------------------------------------------------------------------- the interface


class MicroBatch(NamedTuple):
    inputs: object  # what the objective's `loss` takes
    terms: int  # loss terms it holds (MNTP: scored tokens; contrastive: 1), for the step's normaliser
    tokens: int  # tokens it runs, for the throughput figure


def sync_unless(forward, last: bool):
    """DDP's all-reduce on the last micro-batch of a step only (`no_sync` before it)."""
    return (
        forward.no_sync()
        if not last and is_distributed() and hasattr(forward, "no_sync")
        else contextlib.nullcontext()
    )


class Objective:
    """The base: plain gradient accumulation over micro-batches. Subclasses set `defaults` and implement
    `read`, `micro_batches` and `loss`; `__init__` may check the config (raise ValueError), never write."""

    defaults: dict = {}  # over train.py's defaults; a --config file and flags override them
    group_field: str | None = None  # examples with equal values of this field form each global batch
    needs_lm_head: bool = False  # predicts tokens: a base model saved without its LM head cannot train

    def __init__(self, cfg: dict, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.model = self.encoder = None
        self.amp = contextlib.nullcontext

    def attach(self, model, encoder, amp) -> None:
        """The loaded model (unwrapped), the training `Encoder` on it, and the autocast context factory."""
        self.model, self.encoder, self.amp = model, encoder, amp

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self, world: int) -> dict:
        """Fields for the log's start record."""
        return {}

    def read(self, path) -> list:
        raise NotImplementedError

    def check(self, examples, path) -> None:
        """Whatever of the examples would fail only in training (once the model has loaded): refuse it
        now, naming `path`."""

    def load(self, path) -> list:
        """The examples of a file, read and checked."""
        examples = self.read(path)
        self.check(examples, path)
        return examples

    def micro_batches(
        self, examples, batch: list[int], positions: list[list[int]], step: int
    ) -> list[MicroBatch]:
        """This rank's micro-batches of one global batch: `batch` = indices into `examples`, `positions` =
        positions in `batch` per micro-batch (`data.micro_batch_positions`)."""
        raise NotImplementedError

    def loss(self, forward, inputs, gather: bool) -> torch.Tensor:
        """One micro-batch's loss; `forward` is the model to call (DDP / compiled wrapper); `gather`:
        over ranks."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_loss(self, examples, micro_batch_size: int, max_batches: int) -> float:
        """The loss on the first micro-batches of held-out examples (step -1: the same MNTP masks every
        time), on one rank, per loss term."""
        total, count, mb = 0.0, 0, micro_batch_size
        for k in range(min(len(examples) // mb, max_batches)):
            (m,) = self.micro_batches(examples, list(range(k * mb, (k + 1) * mb)), [list(range(mb))], -1)
            with self.amp():
                total += self.loss(self.model, m.inputs, gather=False).item()
            count += m.terms
        return total / max(count, 1)

    def backward(self, forward, micro: list[MicroBatch]) -> torch.Tensor:
        """One step's gradients: forward and backward per micro-batch, DDP syncing on the last only. Each
        loss is divided by the terms of the whole global batch (summed over ranks, / world: DDP averages),
        so the gradient is that of the mean over every term whatever the split. Returns the loss summed
        over this rank's micro-batches (summed over ranks / world = the step's loss)."""
        world = torch.distributed.get_world_size() if is_distributed() else 1
        # A step with no loss term (MNTP on short blocks may mask nothing) has a zero loss, not 0 / 0.
        terms = all_sum(sum(m.terms for m in micro), self.device, item=False)
        norm = terms.clamp(min=1) / world
        total = torch.zeros((), device=self.device)
        for i, m in enumerate(micro):
            with sync_unless(forward, last=i == len(micro) - 1):
                with self.amp():
                    loss = self.loss(forward, m.inputs, gather=True) / norm
                loss.backward()
            total += loss.detach()
        return total


# ----------------------------------------------------------------------------- MNTP


class MNTP(Objective):
    """Masked next-token prediction on blocks of `max_seq_length` tokens of running text."""

    defaults = dict(lr=5e-5, max_seq_length=512, batch_size=32)
    needs_lm_head = True

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.mask_id = mask_token_id(tokenizer, cfg.mask_token)

    def read(self, path):
        try:
            return mntp_blocks(self.tokenizer, read_texts(path), self.cfg.max_seq_length)
        except ValueError as e:
            if "not enough for one block" not in str(e):
                raise
            raise ValueError(f"{path}: {str(e).replace(' of ', ' of --max_seq_length ')}") from None

    def micro_batches(self, examples, batch, positions, step):
        """Mask the whole global batch with a generator seeded by (seed, step), then take this rank's rows:
        any world size or accumulation split sees the masks one process would, and resume is exact."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        ids, labels = mask_tokens(
            examples[batch],
            mask_id=self.mask_id,
            special_ids=self.tokenizer.special_ids,
            vocab_size=self.tokenizer.vocab_size,
            probability=self.cfg.mask_probability,
            mode=self.cfg.mask_mode,
            generator=g,
        )
        return [
            MicroBatch((ids[p], labels[p]), int(num_targets(labels[p])), ids[p].numel()) for p in positions
        ]

    def loss(self, forward, inputs, gather):
        ids, labels = (t.to(self.device) for t in inputs)
        head, cap = self.model.lm_head_weight, self.model.config.final_softcap
        return mntp_loss(forward(ids), labels, head, normalizer=1.0, logit_softcap=cap)


# ----------------------------------------------------------------------------- contrastive


def rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Contrastive(Objective):
    """Each example gives `views` texts; a micro-batch's texts are packed into one `Batch` and embedded by
    the encoder (pooling, prompt, instructions as in evaluation); the loss compares the views' embeddings
    gathered over ranks. Subclasses give the texts (`texts`, view-major), what the loss needs besides the
    embeddings (`targets`), and the loss (`view_loss`).

    With several micro-batches per step, `contrastive_batch: global` (the default) caches gradients
    (Gao et al. 2021, GradCache): every micro-batch but the last is embedded without keeping activations,
    the last with them, the loss runs over the whole global batch, and the others run again with gradients,
    their embeddings receiving the loss's gradient. Every example then has the whole global batch as
    negatives at micro-batch memory, for one extra forward per micro-batch but one. `micro` keeps each
    micro-batch its own contrastive problem (upstream's)."""

    views = 2

    def texts(self, rows) -> list:
        raise NotImplementedError

    def targets(self, rows):
        return None

    def view_loss(self, views: list[torch.Tensor], targets) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, rows) -> list:
        return self.encoder.prepare_inputs(self.texts(rows))

    def check(self, examples, path):
        """Every instruction of the examples (with the prompt) must leave room for a text within
        max_seq_length; otherwise training would stop at the first batch that holds it."""
        from .encoder import Encoder

        enc = Encoder(None, self.tokenizer, self.cfg.pooling, self.cfg.max_seq_length, prompt=self.cfg.prompt)
        for instruction in dict.fromkeys(t[0] for t in self.texts(examples) if isinstance(t, tuple)):
            try:
                enc.prepare(instruction, "text")
            except ValueError as e:
                why = str(e).split(": ", 1)[1]
                raise ValueError(
                    f"{path}: the instruction {instruction[:60]!r}: {why} (--instruction, "
                    f"--prompt, --max_seq_length {self.cfg.max_seq_length})"
                ) from None

    def contrastive_size(self, world: int) -> int:
        accumulating = self.cfg.batch_size > self.cfg.micro_batch_size * world
        return (
            self.cfg.micro_batch_size * world
            if accumulating and self.cfg.contrastive_batch == "micro"
            else self.cfg.batch_size
        )

    def describe(self, world):
        n = self.contrastive_size(world)
        return {
            "contrastive_batch": self.cfg.contrastive_batch,
            "contrastive_examples": n,
            "negatives_per_example": n * (self.views - 1) - 1,
        }

    def micro_batches(self, examples, batch, positions, step):
        out = []
        for pos in positions:
            rows = [examples[batch[p]] for p in pos]
            (packed,) = self.encoder.batches(self.prepare(rows))
            out.append(MicroBatch((packed, self.targets(rows)), 1, int((packed.segments > 0).sum())))
        return out

    def gathered_loss(self, views, targets, gather: bool) -> torch.Tensor:
        if gather:
            views = [all_gather_with_grad(v) for v in views]
            targets = None if targets is None else all_gather_with_grad(targets.to(views[0].device))
        return self.view_loss(views, targets)

    def loss(self, forward, inputs, gather):
        packed, targets = inputs
        return self.gathered_loss(self.encoder.embed(packed, forward).chunk(self.views), targets, gather)

    def backward(self, forward, micro):
        if len(micro) == 1 or self.cfg.contrastive_batch == "micro":
            return super().backward(forward, micro)
        device, states, parts = self.device, [], []
        with torch.no_grad(), self.amp():  # 1. embeddings only; each micro-batch's RNG state kept for 3.
            for m in micro[:-1]:
                states.append(rng_state(device))
                emb = self.encoder.embed(m.inputs[0], forward)
                parts.append([v.detach().requires_grad_() for v in emb.chunk(self.views)])
        # The last keeps its graph: it runs once (a frozen model's backward costs about one forward).
        with sync_unless(forward, last=False):
            with self.amp():
                last = self.encoder.embed(micro[-1].inputs[0], forward).chunk(self.views)
            after = rng_state(device)
            # 2. The loss over the global batch; its backward gives every cached embedding its gradient.
            views = [torch.cat([*(p[j] for p in parts), last[j]]) for j in range(self.views)]
            targets = None if micro[0].inputs[1] is None else torch.cat([m.inputs[1] for m in micro])
            loss = self.gathered_loss(views, targets, gather=True)
            loss.backward()
        # 3. The other micro-batches again, with gradients and the same dropout masks, fed their gradient.
        for i, m in enumerate(micro[:-1]):
            set_rng_state(states[i], device)
            with sync_unless(forward, last=i == len(micro) - 2):
                with self.amp():
                    emb = self.encoder.embed(m.inputs[0], forward)
                emb.backward(torch.cat([v.grad for v in parts[i]]))
        set_rng_state(after, device)  # the stream as if every micro-batch had run once, in order
        return loss.detach()


class SimCSE(Contrastive):
    """Unsupervised SimCSE: every sentence twice, dropout makes the copies differ; the rest of the batch
    are the negatives."""

    defaults = dict(lr=3e-5, max_seq_length=128, batch_size=128, attention_dropout=0.3, scale=20.0)

    def read(self, path):
        return read_texts(path)

    def texts(self, rows):
        return [(self.cfg.instruction, t) for t in rows] * 2

    def prepare(self, rows):  # the two views are the same texts: tokenize them once
        return self.encoder.prepare_inputs([(self.cfg.instruction, t) for t in rows]) * 2

    def view_loss(self, views, targets):
        return contrastive_loss(*views, scale=self.cfg.scale)


class Supervised(Contrastive):
    """Query / positive / hard-negative triples (llm2vec's supervised stage); each global batch comes from
    one `dataset`. Upstream: the instruction goes with the query only, and pooling skips its tokens."""

    defaults = dict(lr=2e-4, max_seq_length=512, batch_size=64, warmup_steps=300, scale=50.0)
    views = 3
    group_field = "dataset"

    def read(self, path):
        return read_examples(path)

    def texts(self, rows):
        return (
            [(r["instruction"], r["query"]) for r in rows]
            + [r["positive"] for r in rows]
            + [r["negative"] for r in rows]
        )

    def view_loss(self, views, targets):
        return contrastive_loss(*views, scale=self.cfg.scale)


class CoSENT(Contrastive):
    """Graded pairs (sentence1, sentence2, score): every two pairs are ranked by their cosines. A symmetric
    task: both sides get the instruction, as in evaluation."""

    defaults = dict(lr=5e-5, max_seq_length=512, batch_size=32, scale=20.0)

    def read(self, path):
        return read_examples(path, PAIR_FIELDS)

    def texts(self, rows):
        return [(r["instruction"] or self.cfg.instruction, r[k]) for k in PAIR_FIELDS for r in rows]

    def targets(self, rows):
        return torch.tensor([float(r["score"]) for r in rows])

    def view_loss(self, views, targets):
        return cosent_loss(*views, targets, scale=self.cfg.scale)


OBJECTIVES: dict[str, type[Objective]] = {
    "mntp": MNTP,
    "simcse": SimCSE,
    "supervised": Supervised,
    "cosent": CoSENT,
}
