"""Evaluation on local STS and retrieval files: readers, metrics and the task table (`eval.py` is its
command line; `train.py` scores STS-B dev during training with `evaluate_sts`).

Readers follow the format notes of the data's README (`../shared/data/README.md`):
- STS-B:    tab-separated, no header: genre file year id score s1 s2 [extra fields]; split on tabs only.
- SICK:     tab-separated with a header; columns sentence_A, sentence_B, relatedness_score.
- STS12-16: `STS.input.<set>.txt` (2 columns; STS16's `STS2016.input.*` has 4, we use the first 2) aligned
            line by line with `STS.gs.<set>.txt`; a blank gold line means unscored and the pair is dropped.
            All sets of a year are concatenated and scored with one Spearman (MTEB / SimCSE "all").
- BEIR:     corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv with or without
            a header line. Document text is `title + " " + text`.
- Cranfield: SMART format. Queries are numbered 1..225 by position in cran.qry (not by their .I ids).
            Relevance codes 1 (complete answer) .. 4 (minimum interest) are relevant, -1 is not. Graded
            gain = 5 - code (1 -> 4, ..., 4 -> 1), -1 -> 0; `graded=False` gives binary gains instead.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import read_lines, read_records

STS_INSTRUCTION = "Retrieve semantically similar text."
WEB_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query:"
DBPEDIA_INSTRUCTION = "Given a query, retrieve relevant entity descriptions from DBPedia:"
CRANFIELD_INSTRUCTION = "Given a scientific question, retrieve relevant aeronautics abstracts:"

# ----------------------------------------------------------------------------- readers


def number(value: str, where: str, what: str) -> float:
    try:
        if "_" in value:  # float() reads "4_5" as 45: Python's digit separator, no data file's
            raise ValueError
        x = float(value)
    except ValueError:
        raise ValueError(f"{where}: {what} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: {what} {value!r} is not a finite number")
    return x


def sentence(text: str, where: str) -> str:
    if not text.strip():
        raise ValueError(f"{where}: a sentence is empty")
    return text.strip()  # some sentences carry a trailing space


def sts_set(path, s1: list[str], s2: list[str], gold: list[float]) -> tuple[list[str], list[str], np.ndarray]:
    """A set's pairs, refused when Spearman could not be computed on it: no pairs, or one gold score only."""
    if not gold:
        raise ValueError(f"{path}: no scored pairs")
    if min(gold) == max(gold):
        raise ValueError(f"{path}: every gold score is {gold[0]}: Spearman is undefined")
    return s1, s2, np.asarray(gold, dtype=np.float64)


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
        s1.append(sentence(fields[5], f"{path}:{i}"))
        s2.append(sentence(fields[6], f"{path}:{i}"))
    return sts_set(path, s1, s2, gold)


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


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def with_instruction(texts: list[str], instruction: str | None) -> list:
    return [(instruction, t) for t in texts] if instruction else list(texts)


def evaluate_sts(
    encoder,
    s1: list[str],
    s2: list[str],
    gold,
    instruction: str | None = None,
    show_progress: bool = True,
    **encode_kw,
) -> float:
    """Spearman x100 between cosine(s1_i, s2_i) and gold. Each distinct sentence is encoded once; the
    instruction (if any) goes on both sides, as STS is symmetric."""
    if not (len(s1) == len(s2) == len(gold)):
        raise ValueError(f"s1, s2, gold lengths differ: {len(s1)}, {len(s2)}, {len(gold)}")
    unique = list(dict.fromkeys(list(s1) + list(s2)))
    index = {s: i for i, s in enumerate(unique)}
    emb = l2_normalize(
        encoder.encode(with_instruction(unique, instruction), show_progress=show_progress, **encode_kw)
    ).astype(np.float64)
    a, b = emb[[index[s] for s in s1]], emb[[index[s] for s in s2]]  # (n_pairs, D) each
    rho = spearman((a * b).sum(-1), gold)
    if math.isnan(rho):  # a number here would be a made-up one
        raise ValueError("Spearman is undefined: the encoder gives every pair the same similarity")
    return rho


def read_sick(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """SICK `SICK_{train,trial,test_annotated}.txt` -> (s1, s2, relatedness). Columns found by header name."""
    s1, s2, gold = [], [], []
    cols = None
    for i, line in read_lines(path):
        fields = line.split("\t")
        if cols is None:  # header row
            need = ("sentence_A", "sentence_B", "relatedness_score")
            missing = [c for c in need if c not in fields]
            if missing:
                raise ValueError(f"{path}:{i}: header lacks column(s) {missing}: {line!r}")
            cols = [fields.index(c) for c in need]
            continue
        if not line.strip():
            continue
        if len(fields) <= max(cols):
            raise ValueError(
                f"{path}:{i}: expected >= {max(cols) + 1} tab-separated fields, got {len(fields)}"
            )
        a, b, score = (fields[c] for c in cols)
        s1.append(sentence(a, f"{path}:{i}"))
        s2.append(sentence(b, f"{path}:{i}"))
        gold.append(number(score, f"{path}:{i}", "relatedness_score"))
    if cols is None:
        raise ValueError(f"{path}: empty file (no header row)")
    return sts_set(path, s1, s2, gold)


def read_sts_pair_files(input_path, gold_path) -> tuple[list[str], list[str], np.ndarray]:
    """One SemEval STS set: input lines (s1 \\t s2 [\\t more]) aligned with gold lines; blank gold = drop."""
    inputs = list(read_lines(input_path))
    golds = list(read_lines(gold_path))
    if len(inputs) != len(golds):
        raise ValueError(
            f"{input_path} has {len(inputs)} lines but {gold_path} has {len(golds)}; "
            "they must align line by line"
        )
    s1, s2, gold = [], [], []
    for (i, line), (_, g) in zip(inputs, golds):
        if not g.strip():  # unscored pair (the official gold leaves the line blank)
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{input_path}:{i}: expected >= 2 tab-separated sentences, got {len(fields)}")
        s1.append(sentence(fields[0], f"{input_path}:{i}"))
        s2.append(sentence(fields[1], f"{input_path}:{i}"))
        gold.append(number(g.strip(), f"{gold_path}:{i}", "gold score"))
    return s1, s2, gold


def read_sts_year(folder: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """A SemEval STS year folder (e.g. STS12-en-test): every `*.gs.<set>.txt` with its `*.input.<set>.txt`,
    concatenated in sorted set order. STS12-15 name them `STS.gs.*`, STS16 `STS2016.gs.*`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    gold_files = sorted(folder.glob("STS*.gs.*.txt"))
    if not gold_files:
        raise FileNotFoundError(f"{folder}: no STS*.gs.*.txt gold files")
    s1, s2, gold = [], [], []
    for gold_path in gold_files:
        input_path = gold_path.with_name(gold_path.name.replace(".gs.", ".input.", 1))
        a, b, g = read_sts_pair_files(input_path, gold_path)
        s1, s2, gold = s1 + a, s2 + b, gold + g
    return sts_set(folder, s1, s2, gold)


def read_jsonl_docs(path) -> list[tuple[str, dict]]:
    """BEIR's corpus or queries: objects with an '_id' (unique) and a string 'text'."""
    rows, seen = [], {}
    for where, row in read_records(path):
        if not isinstance(row, dict) or "_id" not in row or not isinstance(row.get("text"), str):
            raise ValueError(f"{where}: expected an object with '_id' and a string 'text'")
        if isinstance(row["_id"], bool) or not isinstance(row["_id"], (str, int)):
            raise ValueError(f"{where}: '_id' must be a string or an integer, got {row['_id']!r}")
        if not isinstance(row.get("title") or "", str):
            raise ValueError(f"{where}: 'title' must be a string or null, got {row['title']!r}")
        if str(row["_id"]) in seen:
            raise ValueError(f"{where}: _id {str(row['_id'])!r} again (first at {seen[str(row['_id'])]})")
        seen[str(row["_id"])] = where
        rows.append((where, row))
    return rows


def check_qrels(
    qrels: dict, where: dict, corpus: dict, queries: dict, corpus_file, queries_file, qrels_file
) -> dict:
    """Every judgment must name a known query and document: one that does not is a mismatched file."""
    for (qid, did), at in where.items():
        if did not in corpus:
            raise ValueError(f"{at}: document {did!r} is not in {corpus_file}")
        if qid not in queries:
            raise ValueError(f"{at}: query {qid!r} is not in {queries_file}")
    if not any(g > 0 for q in qrels.values() for g in q.values()):
        raise ValueError(f"{qrels_file}: no relevant document in the judgments")
    if not any(text.strip() for text in corpus.values()):
        raise ValueError(f"{corpus_file}: no document has any text")
    return qrels


def read_qrels_tsv(path) -> tuple[dict[str, dict[str, int]], dict]:
    """BEIR qrels: `query-id \\t corpus-id \\t score`, with or without a header line -> (qrels, where each
    judgment was read)."""
    qrels: dict[str, dict[str, int]] = {}
    where = {}
    for i, line in read_lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(
                f"{path}:{i}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(fields)}"
            )
        qid, did, score = (f.strip() for f in fields)
        try:
            rel = int(score)
        except ValueError:
            # a header ("query-id corpus-id score"), not a score that is no integer ("1.0")
            if i == 1 and not re.fullmatch(r"[-+]?[\d.eE+-]+", score):
                continue
            raise ValueError(f"{path}:{i}: score {score!r} is not an integer") from None
        qrels.setdefault(qid, {})[did] = rel
        where[qid, did] = f"{path}:{i}"
    return qrels, where


def read_beir(folder: str | os.PathLike, split: str = "test"):
    """A BEIR-format folder -> (corpus {id: "title text"}, queries {id: text}, qrels {qid: {did: grade}})."""
    folder = Path(folder)
    corpus = {}
    for _, row in read_jsonl_docs(folder / "corpus.jsonl"):
        title = row.get("title") or ""
        corpus[str(row["_id"])] = (title + " " + row["text"]).strip()
    queries = {str(r["_id"]): sentence(r["text"], w) for w, r in read_jsonl_docs(folder / "queries.jsonl")}
    qrels, where = read_qrels_tsv(folder / "qrels" / f"{split}.tsv")
    check_qrels(
        qrels,
        where,
        corpus,
        queries,
        folder / "corpus.jsonl",
        folder / "queries.jsonl",
        folder / "qrels" / f"{split}.tsv",
    )
    return corpus, queries, qrels


SMART_FIELDS = (".T", ".A", ".B", ".W")


def read_smart(path) -> list[tuple[str, dict[str, str]]]:
    """SMART records (`.I id` then `.T/.A/.B/.W` fields) -> [(id, {"T": text, ...})] in file order.
    .W is always the last field, so a marker line after it is stray and skipped, keeping the abstract whole
    (cran.all.1400 docs 240/576/578 have such lines). Whitespace, line breaks included, collapses to one
    space."""
    records: list[tuple[str, dict[str, list[str]]]] = []
    field = None
    for i, line in read_lines(path):
        if line.startswith(".I"):
            parts = line.split()
            if len(parts) != 2 or parts[0] != ".I":
                raise ValueError(f"{path}:{i}: malformed record header {line!r} (expected '.I <id>')")
            records.append((parts[1], {}))
            field = None
        elif line.strip() in SMART_FIELDS:
            if not records:
                raise ValueError(f"{path}:{i}: field {line.strip()} before the first '.I' record")
            if field == "W":  # .W is a record's last field: a marker after it is a stray line, skip it
                continue
            field = line.strip()[1]
            records[-1][1].setdefault(field, [])
        elif line.strip():
            if field is None:
                raise ValueError(f"{path}:{i}: text outside a .T/.A/.B/.W field: {line[:60]!r}")
            records[-1][1][field].append(line)
    return [(rid, {k: " ".join(" ".join(v).split()) for k, v in f.items()}) for rid, f in records]


def cranfield_gain(code: int, graded: bool = True) -> int:
    """Cleverdon's codes: 1 complete answer .. 4 minimum interest; -1 is a not-relevant judgment."""
    if code == -1:
        return 0
    if code not in (1, 2, 3, 4):
        raise ValueError(f"unknown Cranfield relevance code {code}")
    return 5 - code if graded else 1


def read_cranfield(folder: str | os.PathLike, graded: bool = True):
    """Cranfield (cran.all.1400, cran.qry, cranqrel) -> (corpus, queries, qrels) like `read_beir`.
    Query ids are "1".."225" by position in cran.qry, which is how cranqrel numbers them. A document's
    text is its abstract (.W), which already starts with the title; two docs are empty in the source."""
    folder = Path(folder)
    corpus = {rid: f.get("W") or f.get("T", "") for rid, f in read_smart(folder / "cran.all.1400")}
    queries = {str(pos): f.get("W", "") for pos, (_, f) in enumerate(read_smart(folder / "cran.qry"), 1)}
    qrels: dict[str, dict[str, int]] = {}
    path, where = folder / "cranqrel", {}
    for i, line in read_lines(path):
        if not line.strip():
            continue
        fields = line.split()
        try:
            qnum, did, code = (int(x) for x in fields)
        except ValueError:
            raise ValueError(f"{path}:{i}: expected 3 integers 'query doc code', got {line!r}") from None
        if str(qnum) not in queries:
            raise ValueError(
                f"{path}:{i}: query number {qnum} outside 1..{len(queries)} (cran.qry positions)"
            )
        try:
            qrels.setdefault(str(qnum), {})[str(did)] = cranfield_gain(code, graded)
        except ValueError as e:
            raise ValueError(f"{path}:{i}: {e}") from None
        where[str(qnum), str(did)] = f"{path}:{i}"
    check_qrels(qrels, where, corpus, queries, folder / "cran.all.1400", folder / "cran.qry", path)
    return corpus, queries, qrels


@dataclass(frozen=True)
class Task:
    kind: str  # "sts" | "retrieval"
    load: Callable[[Path], tuple]  # data_dir -> reader output
    instruction: str | None = None  # query instruction (retrieval); STS uses the caller's instruction


def _sts_year(year: int) -> Task:
    return Task("sts", lambda root: read_sts_year(root / "sts12-16" / "original" / f"STS{year}-en-test"))


TASKS: dict[str, Task] = {
    "stsb-dev": Task("sts", lambda root: read_stsb(root / "stsbenchmark" / "sts-dev.csv")),
    "stsb-test": Task("sts", lambda root: read_stsb(root / "stsbenchmark" / "sts-test.csv")),
    "sick-r-trial": Task("sts", lambda root: read_sick(root / "sick" / "SICK_trial.txt")),
    "sick-r-test": Task("sts", lambda root: read_sick(root / "sick" / "SICK_test_annotated.txt")),
    **{f"sts{y}": _sts_year(y) for y in (12, 13, 14, 15, 16)},
    "cranfield": Task(
        "retrieval", lambda root: read_cranfield(root / "retrieval" / "cranfield"), CRANFIELD_INSTRUCTION
    ),
    "msmarco-subset": Task(
        "retrieval",
        lambda root: read_beir(root / "retrieval" / "agentset_msmarco_subset"),
        WEB_QUERY_INSTRUCTION,
    ),
    "dbpedia-subset": Task(
        "retrieval",
        lambda root: read_beir(root / "retrieval" / "agentset_dbpedia_subset"),
        DBPEDIA_INSTRUCTION,
    ),
}

GROUPS: dict[str, list[str]] = {
    "sts": ["stsb-test", "sick-r-test", "sts12", "sts13", "sts14", "sts15", "sts16"],
    "dev": ["stsb-dev", "sick-r-trial"],
    "retrieval": ["cranfield", "msmarco-subset", "dbpedia-subset"],
}


def resolve_tasks(spec: str) -> list[str]:
    """ "sts,cranfield" -> task names, groups expanded, duplicates removed, order kept."""
    names = []
    for item in (s.strip() for s in spec.split(",")):
        if item not in TASKS and item not in GROUPS:
            raise ValueError(
                f"--tasks: unknown task {item!r}; tasks: {', '.join(TASKS)}; groups: {', '.join(GROUPS)}"
            )
        names += GROUPS.get(item, [item])
    return list(dict.fromkeys(names))


def run_task(
    encoder,
    name: str,
    data,
    sts_instruction: str | None = STS_INSTRUCTION,
    show_progress: bool = True,
    **encode_kw,
) -> dict:
    """Score one registered task on its data (`TASKS[name].load(data_dir)`) ->
    {"task", "kind", "n", "seconds", "scores": {metric: value}}."""
    task = TASKS[name]
    t0 = time.perf_counter()
    if task.kind == "sts":
        s1, s2, gold = data
        try:
            rho = evaluate_sts(encoder, s1, s2, gold, sts_instruction, show_progress, **encode_kw)
        except ValueError as e:  # a metric that cannot be computed: say which task
            raise ValueError(f"{name}: {e}") from None
        scores, n = {"spearman": rho}, len(gold)
    else:
        corpus, queries, qrels = data
        scores = evaluate_retrieval(
            encoder, corpus, queries, qrels, task.instruction, show_progress=show_progress, **encode_kw
        )
        n = scores.pop("n")
    return {"task": name, "kind": task.kind, "n": n, "seconds": time.perf_counter() - t0, "scores": scores}


# ----------------------------------------------------------------------------- retrieval
# BEIR's conventions (pytrec_eval): nDCG gain = relevance grade with a log2(rank + 1) discount, ideal
# DCG from all judged documents; recall counts documents with grade > 0; queries with no relevant
# document are skipped.


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


def top_k(queries: np.ndarray, docs: np.ndarray, k: int, chunk: int = 8192) -> np.ndarray:
    """Exact top-k doc indices by dot product, [Q, min(k, N)], best first. Both query and doc axes are
    scanned in chunks so the full (Q, N) score matrix never has to fit in memory."""
    q, d = torch.from_numpy(np.ascontiguousarray(queries)), torch.from_numpy(np.ascontiguousarray(docs))
    k = min(k, d.shape[0])
    out = []
    for qs in range(0, q.shape[0], chunk):
        qc = q[qs : qs + chunk]
        best_s = qc.new_empty((qc.shape[0], 0))
        best_i = torch.empty((qc.shape[0], 0), dtype=torch.long)
        for ds in range(0, d.shape[0], chunk):
            s = qc @ d[ds : ds + chunk].T  # (q_chunk, d_chunk)
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            # merge this chunk's candidates with the running best and keep k
            best_s, best_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + ds], 1)
            best_s, j = best_s.topk(k, dim=1) if best_s.shape[1] > k else best_s.sort(1, descending=True)
            best_i = best_i.gather(1, j)
        out.append(best_i)
    return torch.cat(out).numpy()


def evaluate_retrieval(
    encoder,
    corpus: dict[str, str],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    query_instruction: str | None = None,
    ndcg_k: int = 10,
    recall_k: int = 100,
    show_progress: bool = True,
    **encode_kw,
) -> dict:
    """Dense retrieval over the whole corpus: queries carry the instruction, documents don't; exact
    cosine search. Returns {"ndcg@10": x100, "recall@100": x100, "n": queries scored}."""
    qids = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    if not qids:
        raise ValueError("no query has a relevant document in qrels")
    dids = list(corpus)
    q_emb = l2_normalize(
        encoder.encode(
            with_instruction([queries[q] for q in qids], query_instruction),
            show_progress=show_progress,
            **encode_kw,
        )
    )
    # an empty document has no tokens to pool: give it a zero vector (score 0) instead of encoding it
    nonempty = [i for i, d in enumerate(dids) if corpus[d].strip()]
    d_emb = np.zeros((len(dids), q_emb.shape[1]), dtype=np.float32)
    d_emb[nonempty] = l2_normalize(
        encoder.encode([corpus[dids[i]] for i in nonempty], show_progress=show_progress, **encode_kw)
    )
    top = top_k(q_emb, d_emb, max(ndcg_k, recall_k))
    ndcg, recall = [], []
    for qid, row in zip(qids, top):
        ranking = [dids[i] for i in row]
        ndcg.append(ndcg_at_k(ranking, qrels[qid], ndcg_k))
        recall.append(recall_at_k(ranking, qrels[qid], recall_k))
    return {
        f"ndcg@{ndcg_k}": 100.0 * float(np.mean(ndcg)),
        f"recall@{recall_k}": 100.0 * float(np.mean(recall)),
        "n": len(qids),
    }
