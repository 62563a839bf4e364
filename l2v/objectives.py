"""Training objectives as small pure functions, with llm2vec's conventions. MNTP: the token at t is
predicted from the output at t-1 (the causal-LM shift, kept although attention is bidirectional).
Contrastive: cosine x scale (20 SimCSE, 50 supervised), cross-entropy with the positive on the
diagonal, every other gathered document (and hard negative) a negative. CoSENT (not in llm2vec):
graded pairs, for a last supervised stage on similarity scores."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- mntp


def num_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of tokens MNTP scores in this batch: labels at positions 1.. (position 0 has no t-1)."""
    return (labels[:, 1:] != -100).sum()


def mntp_loss(hidden: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor,
              normalizer: float | torch.Tensor | None = None,
              logit_softcap: float | None = None) -> torch.Tensor:
    """Masked next-token prediction: sum of float32 cross-entropies / normalizer. hidden (B, T, D),
    labels (B, T) = the original id where masked, else -100; head_weight (V, D). The head runs only on
    the ~20% of positions that predict a masked token (full logits would outweigh the rest of the step).
    normalizer: default the scored tokens of THIS batch; with accumulation or DDP, the GLOBAL count over
    micro-batches and ranks / world size (DDP averages gradients), so every masked token weighs the same.
    logit_softcap: the model's final-logit soft-capping (Gemma 2: `ModelConfig.final_softcap`), cap * tanh(
    logits / cap), which its LM head was trained with."""
    targets = labels[:, 1:]  # (B, T-1): the label predicted by each output position 0..T-2
    sel = targets != -100
    logits = F.linear(hidden[:, :-1][sel], head_weight).float()  # (N, V), N = number of scored tokens
    if logit_softcap is not None:
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    loss = F.cross_entropy(logits, targets[sel], reduction="sum")
    if normalizer is None:
        normalizer = sel.sum().clamp(min=1)
    return loss / normalizer


# ----------------------------------------------------------------------------- contrastive


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (n, ...) from all ranks in rank order -> (world_size * n, ...); identity when not
    distributed; every rank passes the same n. Without it each rank would contrast against its own
    slice only: DDP would shrink the pool of in-batch negatives. Every rank computes the same global
    loss L; torch.distributed.nn's all_gather sums all ranks' gradients for slice r onto rank r
    (world_size x dL/dslice_r), which DDP's averaging divides back: the exact gradient of L."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x))


def contrastive_loss(q: torch.Tensor, d: torch.Tensor, hard_negatives: torch.Tensor | None = None,
                     scale: float = 20.0) -> torch.Tensor:
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
