"""Evaluate any encoder: STS (Spearman x100) and retrieval (nDCG@10, Recall@100, x100).

The encoder is anything with `encode(inputs, show_progress=...) -> float32 [N, D]`, where an input is
a string or an (instruction, text) pair (see `l2v.encoder.Encoder`). Metrics are plain functions of
arrays, tested without a model; BEIR conventions (pytrec_eval): nDCG gain = relevance grade with a
log2(rank + 1) discount, ideal DCG from all judged documents; recall counts documents with grade > 0;
queries with no relevant document are skipped. The readers of each data set are in `eval.py`, but for
STS-B's, which training uses for its dev score.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .data import read_lines


def number(value: str, where: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{where}: {what} {value!r} is not a number") from None


def read_stsb(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """STS Benchmark `sts-{train,dev,test}.csv` -> (s1, s2, gold). Split on tabs only: no CSV quoting."""
    s1, s2, gold = [], [], []
    for i, line in read_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")  # genre file year id score s1 s2 [extra source fields]
        if len(fields) < 7:
            raise ValueError(f"{path}:{i}: expected >= 7 tab-separated fields, got {len(fields)}")
        gold.append(number(fields[4], f"{path}:{i}", "score"))
        s1.append(fields[5].strip())  # some sentences carry a trailing space
        s2.append(fields[6].strip())
    return s1, s2, np.asarray(gold, dtype=np.float64)


def rankdata(x) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span (scipy's 'average' method)."""
    x = np.asarray(x)
    n = len(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # a run of equal sorted values spans ranks start+1 .. end; each gets their mean (start + end + 1) / 2
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation x100: Pearson correlation of average ranks. nan if either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of equal length, got {x.shape} and {y.shape}")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float(100.0 * (rx * ry).sum() / denom) if denom > 0 else float("nan")


def ndcg_at_k(ranking, qrel: dict[str, int], k: int = 10) -> float:
    """nDCG@k in [0, 1]: gain = relevance grade, discount log2(rank + 1); ideal from all judged docs."""
    gains = np.array([max(qrel.get(d, 0), 0) for d in ranking[:k]], dtype=np.float64)
    ideal = np.sort(np.array([g for g in qrel.values() if g > 0], dtype=np.float64))[::-1][:k]
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # rank 1 -> 1/log2(2)
    idcg = (ideal * discount[: len(ideal)]).sum()
    return float((gains * discount[: len(gains)]).sum() / idcg) if idcg > 0 else 0.0


def recall_at_k(ranking, qrel: dict[str, int], k: int = 100) -> float:
    """Fraction of the relevant (grade > 0) documents found in the top k."""
    relevant = {d for d, g in qrel.items() if g > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def top_k(queries: np.ndarray, docs: np.ndarray, k: int, chunk: int = 8192) -> np.ndarray:
    """Exact top-k doc indices by dot product, [Q, min(k, N)], best first. Both query and doc axes are
    scanned in chunks so the full (Q, N) score matrix never has to fit in memory."""
    q, d = torch.from_numpy(np.ascontiguousarray(queries)), torch.from_numpy(np.ascontiguousarray(docs))
    k = min(k, d.shape[0])
    out = []
    for qs in range(0, q.shape[0], chunk):
        qc = q[qs:qs + chunk]
        best_s = qc.new_empty((qc.shape[0], 0))
        best_i = torch.empty((qc.shape[0], 0), dtype=torch.long)
        for ds in range(0, d.shape[0], chunk):
            s = qc @ d[ds:ds + chunk].T  # (q_chunk, d_chunk)
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            # merge this chunk's candidates with the running best and keep k
            best_s, best_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + ds], 1)
            best_s, j = best_s.topk(k, dim=1) if best_s.shape[1] > k else best_s.sort(1, descending=True)
            best_i = best_i.gather(1, j)
        out.append(best_i)
    return torch.cat(out).numpy()


def _with_instruction(texts: list[str], instruction: str | None) -> list:
    return [(instruction, t) for t in texts] if instruction else list(texts)


def evaluate_sts(encoder, s1: list[str], s2: list[str], gold, instruction: str | None = None,
                 show_progress: bool = True, **encode_kw) -> float:
    """Spearman x100 between cosine(s1_i, s2_i) and gold. Each distinct sentence is encoded once; the
    instruction (if any) goes on both sides, as STS is symmetric."""
    if not (len(s1) == len(s2) == len(gold)):
        raise ValueError(f"s1, s2, gold lengths differ: {len(s1)}, {len(s2)}, {len(gold)}")
    unique = list(dict.fromkeys(list(s1) + list(s2)))
    index = {s: i for i, s in enumerate(unique)}
    emb = l2_normalize(encoder.encode(_with_instruction(unique, instruction), show_progress=show_progress,
                                      **encode_kw)).astype(np.float64)
    a, b = emb[[index[s] for s in s1]], emb[[index[s] for s in s2]]  # (n_pairs, D) each
    return spearman((a * b).sum(-1), gold)


def evaluate_retrieval(encoder, corpus: dict[str, str], queries: dict[str, str], qrels: dict[str, dict[str, int]],
                       query_instruction: str | None = None, ndcg_k: int = 10,
                       recall_k: int = 100, show_progress: bool = True, **encode_kw) -> dict:
    """Dense retrieval over the whole corpus: queries carry the instruction, documents don't; exact
    cosine search. Returns {"ndcg@10": x100, "recall@100": x100, "n": queries scored}."""
    qids = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    if not qids:
        raise ValueError("no query has a relevant document in qrels")
    dids = list(corpus)
    q_emb = l2_normalize(encoder.encode(_with_instruction([queries[q] for q in qids], query_instruction),
                                        show_progress=show_progress, **encode_kw))
    # an empty document has no tokens to pool: give it a zero vector (score 0) instead of encoding it
    nonempty = [i for i, d in enumerate(dids) if corpus[d].strip()]
    d_emb = np.zeros((len(dids), q_emb.shape[1]), dtype=np.float32)
    d_emb[nonempty] = l2_normalize(encoder.encode([corpus[dids[i]] for i in nonempty],
                                                  show_progress=show_progress, **encode_kw))
    top = top_k(q_emb, d_emb, max(ndcg_k, recall_k))
    ndcg, recall = [], []
    for qid, row in zip(qids, top):
        ranking = [dids[i] for i in row]
        ndcg.append(ndcg_at_k(ranking, qrels[qid], ndcg_k))
        recall.append(recall_at_k(ranking, qrels[qid], recall_k))
    return {f"ndcg@{ndcg_k}": 100.0 * float(np.mean(ndcg)), f"recall@{recall_k}": 100.0 * float(np.mean(recall)),
            "n": len(qids)}

