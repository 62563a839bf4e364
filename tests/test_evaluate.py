"""eval.py: metrics against hand-computed values (and scipy), readers on tiny fixtures (the format
pitfalls of ../shared/data/README.md), end-to-end scoring with a fake encoder, counts on the real files."""

import json
import math
import types
import zlib

import numpy as np
import pytest
import torch
from conftest import DATA

import eval as eval_cli
from l2v import evaluation as harness


class HashEncoder:
    """Deterministic bag-of-hashed-words embedder with the Encoder.encode signature; records its calls."""

    def __init__(self, dim=1024):
        self.dim, self.calls = dim, []

    def encode(self, inputs, show_progress=False, **kw):
        self.calls.append(list(inputs))
        out = np.zeros((len(inputs), self.dim), dtype=np.float32)
        for i, x in enumerate(inputs):
            text = x[1] if isinstance(x, tuple) else x  # the instruction is not pooled
            for w in text.lower().split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        return out


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


# ---------------------------------------------------------------- metrics


def test_rankdata_average_ties():
    assert harness.rankdata([10, 20, 20, 5, 20]).tolist() == [2, 4, 4, 1, 4]
    assert harness.rankdata([3.0, 1.0, 2.0]).tolist() == [3, 1, 2]


def test_spearman_hand_computed():
    assert harness.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(100.0)
    assert harness.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-100.0)
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred dot 4.5, norms^2 4.5 and 5 -> sqrt(0.9)
    assert harness.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(100 * math.sqrt(0.9))
    assert math.isnan(harness.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        harness.spearman([1, 2], [1, 2, 3])


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.integers(0, 6, 200), rng.normal(size=200).round(1)  # many ties on both sides
        assert harness.spearman(x, y) == pytest.approx(100 * stats.spearmanr(x, y).statistic, abs=1e-9)


def test_ndcg_and_recall_hand_computed():
    qrel = {"a": 2, "b": 1, "c": 0, "z": -1}
    ranking = ["c", "a", "x", "b", "z"]
    dcg = 2 / math.log2(3) + 1 / math.log2(5)  # a at rank 2, b at rank 4; c/x/z gain nothing
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert harness.ndcg_at_k(ranking, qrel, 10) == pytest.approx(dcg / idcg)
    assert harness.ndcg_at_k(["a", "b"], qrel, 10) == pytest.approx(1.0)
    assert harness.ndcg_at_k(ranking, qrel, 1) == 0.0
    assert harness.ndcg_at_k(["a"] + ranking, qrel, 1) == pytest.approx(1.0)  # ideal cut at k too
    assert harness.recall_at_k(ranking, qrel, 2) == 0.5
    assert harness.recall_at_k(ranking, qrel, 100) == 1.0
    assert (
        harness.ndcg_at_k(ranking, {"c": 0}, 10) == 0.0 and harness.recall_at_k(ranking, {"c": 0}, 10) == 0.0
    )


def test_top_k_chunked_matches_full_sort():
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(7, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    full = np.argsort(-(q @ d.T), axis=1)
    assert (harness.top_k(q, d, 12, chunk=5) == full[:, :12]).all()
    assert (harness.top_k(q, d, 100, chunk=8) == full).all()  # k > N: every doc, sorted


# ---------------------------------------------------------------- readers


def test_read_stsb_tabs_quotes_extra_fields(tmp_path):
    p = write(
        tmp_path / "sts.csv",
        'main-captions\tMSRvid\t2012test\t0024\t2.500\tA girl is "styling" her hair.\tA girl brushes.\n'
        'main-forums\tanswer-answer\t2016\t0008\t3\tOne "quote only.\tTwo. \tsrc A\tsrc B\r\n'
        "\n",
    )
    s1, s2, gold = harness.read_stsb(p)
    assert s1 == ['A girl is "styling" her hair.', 'One "quote only.']
    assert s2 == ["A girl brushes.", "Two."]
    assert gold.tolist() == [2.5, 3.0]


def test_read_stsb_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        harness.read_stsb(tmp_path / "nope.csv")
    p = write(tmp_path / "bad.csv", "g\tf\ty\t1\t2.0\ta\tb\ng\tf\ty\t2\t3.0\tonly one\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: expected >= 7"):
        harness.read_stsb(p)
    p = write(tmp_path / "bad2.csv", "g\tf\ty\t1\tfive\ta\tb\n")
    with pytest.raises(ValueError, match=r"bad2.csv:1: score 'five'"):
        harness.read_stsb(p)


def test_read_sick(tmp_path):
    p = write(
        tmp_path / "SICK_trial.txt",
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\r\n"
        "4\tThe boys play\tNo boy plays\t3.6\tCONTRADICTION\r\n"
        "24\tA person rides\tA skilled person rides\t4.5\tNEUTRAL\r\n",
    )
    s1, s2, gold = harness.read_sick(p)
    assert s1 == ["The boys play", "A person rides"] and s2[1] == "A skilled person rides"
    assert gold.tolist() == [3.6, 4.5]
    with pytest.raises(ValueError, match=r"x.txt:1: header lacks column\(s\) \['relatedness_score'\]"):
        harness.read_sick(write(tmp_path / "x.txt", "pair_ID\tsentence_A\tsentence_B\n1\ta\tb\n"))
    with pytest.raises(ValueError, match=r"y.txt:3: relatedness_score"):
        harness.read_sick(
            write(tmp_path / "y.txt", "sentence_A\tsentence_B\trelatedness_score\na\tb\t1\na\tb\t?\n")
        )


def test_read_sts_year_drops_unscored_and_reads_sts16(tmp_path):
    d = tmp_path / "STS12-en-test"
    write(d / "STS.input.b.txt", "b1\tb2\nb3\tb4\nb5\tb6\n")
    write(d / "STS.gs.b.txt", "4.2\n\n1\n")  # the middle pair is unscored
    write(d / "STS.input.a.txt", "a1\ta2\n")
    write(d / "STS.gs.a.txt", "5.000\n")
    write(d / "00-readme.txt", "not data\n")
    s1, s2, gold = harness.read_sts_year(d)
    assert s1 == ["a1", "b1", "b5"] and s2 == ["a2", "b2", "b6"] and gold.tolist() == [5.0, 4.2, 1.0]

    d16 = tmp_path / "STS16-en-test"
    write(d16 / "STS2016.input.headlines.txt", "h1\th2\tsource 1\tsource 2\nh3\th4\tsrc\tsrc\nh5\th6\ts\ts\n")
    write(d16 / "STS2016.gs.headlines.txt", "\n3\n1\n")
    assert harness.read_sts_year(d16) == (["h3", "h5"], ["h4", "h6"], pytest.approx(np.array([3.0, 1.0])))


def test_read_sts_year_errors(tmp_path):
    d = tmp_path / "y"
    with pytest.raises(FileNotFoundError, match="folder not found"):
        harness.read_sts_year(d)
    write(d / "STS.gs.a.txt", "1\n2\n")
    with pytest.raises(FileNotFoundError, match="STS.input.a.txt"):
        harness.read_sts_year(d)
    write(d / "STS.input.a.txt", "x\ty\n")
    with pytest.raises(ValueError, match="has 1 lines but .*STS.gs.a.txt has 2"):
        harness.read_sts_year(d)
    write(d / "STS.input.a.txt", "x\ty\nno tab here\n")
    with pytest.raises(ValueError, match=r"STS.input.a.txt:2: expected >= 2"):
        harness.read_sts_year(d)


def beir_folder(root, header):
    write(
        root / "corpus.jsonl",
        '{"_id": "d1", "title": "Paris", "text": "capital of France"}\n'
        '{"_id": "d2", "title": "", "text": "a page on bread"}\n'
        '{"_id": "d3", "text": "no title key"}\n',
    )
    write(root / "queries.jsonl", '{"_id": "q1", "text": "french capital"}\n{"_id": "q2", "text": "bread"}\n')
    write(
        root / "qrels" / "test.tsv",
        ("query-id\tcorpus-id\tscore\n" if header else "") + "q1\td1\t2\nq1\td3\t0\nq2\td2\t1\n",
    )
    return root


@pytest.mark.parametrize("header", [True, False])
def test_read_beir(tmp_path, header):
    corpus, queries, qrels = harness.read_beir(beir_folder(tmp_path, header))
    assert corpus == {"d1": "Paris capital of France", "d2": "a page on bread", "d3": "no title key"}
    assert queries == {"q1": "french capital", "q2": "bread"}
    assert qrels == {"q1": {"d1": 2, "d3": 0}, "q2": {"d2": 1}}


def test_read_beir_errors(tmp_path):
    root = beir_folder(tmp_path, header=True)
    write(root / "queries.jsonl", '{"_id": "q1", "text": "ok"}\n{"_id": "q2", "text": \n')
    with pytest.raises(ValueError, match=r"queries.jsonl:2: malformed JSON"):
        harness.read_beir(root)
    write(root / "queries.jsonl", '{"id": "q1", "text": "ok"}\n')
    with pytest.raises(ValueError, match=r"queries.jsonl:1: expected an object with '_id'"):
        harness.read_beir(root)
    write(root / "queries.jsonl", '{"_id": "q1", "text": "ok"}\n')
    write(root / "qrels" / "test.tsv", "q1\td1\t1\nq1\td2\tx\n")  # a non-integer score past line 1
    with pytest.raises(ValueError, match=r"test.tsv:2: score 'x'"):
        harness.read_beir(root)
    write(root / "qrels" / "test.tsv", "q1 d1 1\n")
    with pytest.raises(ValueError, match=r"test.tsv:1: expected 3 tab-separated"):
        harness.read_beir(root)
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        harness.read_beir(root, split="dev")


CRAN_DOCS = """.I 1
.T
flow over a wing .
.A
smith
.B
j. ae. 1958
.W
flow over a wing .
  lift and drag of a wing
in a slipstream .
.I 2
.T
.A
.B
.W
.I 3
.T
heat transfer .
.A
jones
.B
naca
.W
heat transfer .
the heat flux at the wall .
.A
stray marker: this line is still abstract text .
"""
CRAN_QRY = """.I 001
.W
wing lift in a slipstream
.I 004
.W
heat flux at
a wall
"""


def test_read_cranfield_positional_queries_and_codes(tmp_path):
    write(tmp_path / "cran.all.1400", CRAN_DOCS)
    write(tmp_path / "cran.qry", CRAN_QRY)
    write(tmp_path / "cranqrel", "1 1 2\n1 3 -1\n2 3 1 \n2 1 4\n")  # query 2 = the one with .I 004
    corpus, queries, qrels = harness.read_cranfield(tmp_path)
    assert corpus == {
        "1": "flow over a wing . lift and drag of a wing in a slipstream .",
        "2": "",
        "3": "heat transfer . the heat flux at the wall . stray marker: this line is still abstract text .",
    }
    assert queries == {"1": "wing lift in a slipstream", "2": "heat flux at a wall"}
    assert qrels == {"1": {"1": 3, "3": 0}, "2": {"3": 4, "1": 1}}  # gain = 5 - code, -1 -> 0
    assert harness.read_cranfield(tmp_path, graded=False)[2] == {"1": {"1": 1, "3": 0}, "2": {"3": 1, "1": 1}}

    write(tmp_path / "cranqrel", "1 1 2\n3 1 1\n")
    with pytest.raises(ValueError, match=r"cranqrel:2: query number 3 outside 1..2"):
        harness.read_cranfield(tmp_path)
    write(tmp_path / "cranqrel", "1 1 7\n")
    with pytest.raises(ValueError, match=r"cranqrel:1: unknown Cranfield relevance code 7"):
        harness.read_cranfield(tmp_path)
    write(tmp_path / "cranqrel", "1 1\n")
    with pytest.raises(ValueError, match=r"cranqrel:1: expected 3 integers"):
        harness.read_cranfield(tmp_path)
    write(tmp_path / "cran.qry", "wing lift\n.I 1\n.W\nx\n")
    with pytest.raises(ValueError, match=r"cran.qry:1: text outside"):
        harness.read_cranfield(tmp_path)
    write(tmp_path / "cran.qry", ".I\n.W\nx\n")
    with pytest.raises(ValueError, match=r"cran.qry:1: malformed record header"):
        harness.read_cranfield(tmp_path)


# ---------------------------------------------------------------- end to end with a fake encoder


def test_evaluate_sts_dedupes_and_instructs():
    s2 = ["a b c d", "a b c x", "a b y x", "a z y x", "w z y x"]  # overlap with "a b c d": 4..0 words
    enc = HashEncoder()
    score = harness.evaluate_sts(
        enc, ["a b c d"] * 5, s2, [5, 4, 3, 2, 1], instruction="Retrieve similar text."
    )
    assert score == pytest.approx(100.0)
    assert len(enc.calls) == 1 and len(enc.calls[0]) == 5  # "a b c d" encoded once
    assert all(x == ("Retrieve similar text.", x[1]) for x in enc.calls[0])
    enc = HashEncoder()
    assert harness.evaluate_sts(enc, ["a b c d"] * 5, s2, [1, 2, 3, 4, 5]) == pytest.approx(-100.0)
    assert all(isinstance(x, str) for x in enc.calls[0])
    with pytest.raises(ValueError, match="lengths differ"):
        harness.evaluate_sts(enc, ["a"], ["b", "c"], [1.0])


def test_evaluate_retrieval_end_to_end():
    corpus = {f"d{i}": f"topic{i} word{i} filler" for i in range(30)}
    corpus["empty"] = "   "  # never encoded: zero vector
    queries = {"q1": "topic3 word3", "q2": "topic7", "q3": "topic9 word9 topic10", "q_unjudged": "topic1"}
    qrels = {"q1": {"d3": 2, "d4": 0}, "q2": {"d7": 1}, "q3": {"d9": 1, "d10": 2}}
    enc = HashEncoder()
    r = harness.evaluate_retrieval(enc, corpus, queries, qrels, query_instruction="Find it:")
    assert r["n"] == 3  # q_unjudged has no relevant doc: skipped
    assert enc.calls[0] == [
        ("Find it:", "topic3 word3"),
        ("Find it:", "topic7"),
        ("Find it:", "topic9 word9 topic10"),
    ]
    assert len(enc.calls[1]) == 30 and all(isinstance(x, str) for x in enc.calls[1])
    # q1, q2 rank their doc first (nDCG 1); q3 ranks d9 (2 words shared) above the better d10 (1 word)
    ndcg_q3 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert r["ndcg@10"] == pytest.approx(100 * (2 + ndcg_q3) / 3)
    assert r["recall@100"] == pytest.approx(100.0)


def test_run_task_and_registry(tmp_path):
    write(
        tmp_path / "stsbenchmark" / "sts-dev.csv",
        "".join(
            f"g\tf\ty\t{i}\t{5 - i}\ta b c d\t{s}\n"
            for i, s in enumerate(["a b c d", "a b c x", "a b y x", "a z y x", "w z y x"])
        ),
    )
    r = harness.run_task(HashEncoder(), "stsb-dev", harness.TASKS["stsb-dev"].load(tmp_path))
    assert r["task"] == "stsb-dev" and r["n"] == 5 and r["scores"]["spearman"] == pytest.approx(100.0)
    assert harness.resolve_tasks("dev, stsb-dev,cranfield") == ["stsb-dev", "sick-r-trial", "cranfield"]
    assert harness.resolve_tasks("sts") == [
        "stsb-test",
        "sick-r-test",
        "sts12",
        "sts13",
        "sts14",
        "sts15",
        "sts16",
    ]
    with pytest.raises(ValueError, match="unknown task 'stsb'"):
        harness.resolve_tasks("stsb")
    with pytest.raises(ValueError, match="unknown task ''"):
        harness.resolve_tasks("")
    with pytest.raises(FileNotFoundError, match="sick"):
        harness.TASKS["sick-r-trial"].load(tmp_path)


def test_eval_cli_with_fake_encoder(tmp_path, monkeypatch, capsys):
    import l2v.encoder

    write(
        tmp_path / "data" / "stsbenchmark" / "sts-dev.csv",
        "g\tf\ty\t0\t5\ta b\ta b\ng\tf\ty\t1\t0\ta b\tc d\n",
    )
    # test sets scoring -100 (gold inverted) and +100: their average is 0, with the dev set's 100 it
    # would be 33.3
    write(
        tmp_path / "data" / "stsbenchmark" / "sts-test.csv",
        "g\tf\ty\t0\t0\ta b\ta b\ng\tf\ty\t1\t5\ta b\tc d\n",
    )
    write(
        tmp_path / "data" / "sick" / "SICK_test_annotated.txt",
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\n1\ta b\ta b\t5\n2\ta b\tc d\t1\n",
    )
    beir_folder(tmp_path / "data" / "retrieval" / "agentset_msmarco_subset", header=False)
    calls = {}

    class FakeEncoder(HashEncoder):
        pooling, autocast, prompt, settings_sources = "mean", None, None, []
        model = types.SimpleNamespace(
            config=types.SimpleNamespace(is_causal=True, dim=8), parameters=lambda: iter([torch.zeros(1)])
        )

        @classmethod
        def from_pretrained(cls, model_dir, **kw):
            calls.update(kw, model_dir=model_dir)
            return cls()

    monkeypatch.setattr(l2v.encoder, "Encoder", FakeEncoder)
    out = tmp_path / "res" / "r.json"
    eval_cli.main(
        [
            "--model",
            "M",
            "--causal",
            "--adapter",
            "A1",
            "--adapter",
            "A2",
            "--tasks",
            "stsb-dev,msmarco-subset,stsb-test,sick-r-test",
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--dtype",
            "bfloat16",
        ]
    )
    assert calls["model_dir"] == "M" and calls["adapters"] == ["A1", "A2"] and calls["is_causal"] is True
    assert calls["dtype"] == "bfloat16"
    saved = json.loads(out.read_text())
    assert (saved["args"]["causal"], saved["args"]["pooling"], saved["args"]["prompt"]) == (
        True,
        "mean",
        None,
    )
    results = saved["results"]
    assert [r["task"] for r in results] == [
        "stsb-dev",
        "msmarco-subset",
        "stsb-test",
        "sick-r-test",
        "sts-avg",
    ]
    assert [r["scores"]["spearman"] for r in results[2:]] == [
        pytest.approx(-100.0),
        pytest.approx(100.0),
        pytest.approx(0.0),
    ]
    assert results[4]["n"] == 2
    assert results[0]["scores"]["spearman"] == pytest.approx(100.0)
    assert results[1]["scores"]["recall@100"] == pytest.approx(100.0)
    table = capsys.readouterr().out
    assert "stsb-dev" in table and "ndcg@10" in table


# ---------------------------------------------------------------- the real files, when present

real = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")


@real
@pytest.mark.parametrize(
    "task,n",
    [
        ("stsb-dev", 1500),
        ("stsb-test", 1379),
        ("sick-r-trial", 500),
        ("sick-r-test", 4927),
        ("sts12", 3108),
        ("sts13", 1500),
        ("sts14", 3750),
        ("sts15", 3000),
        ("sts16", 1186),
    ],
)
def test_real_sts_counts(task, n):
    s1, s2, gold = harness.TASKS[task].load(DATA)
    assert len(s1) == len(s2) == len(gold) == n
    assert all(s1) and all(s2) and np.isfinite(gold).all()


@real
def test_real_retrieval_counts():
    corpus, queries, qrels = harness.TASKS["cranfield"].load(DATA)
    assert len(corpus) == 1400 and len(queries) == 225 and len(qrels) == 225
    assert sum(len(v) for v in qrels.values()) == 1837
    assert all(any(g > 0 for g in v.values()) for v in qrels.values())
    assert queries["3"].startswith("what problems of heat conduction")  # .I 004 is the 3rd query
    for name, n_judged in [("msmarco-subset", 43), ("dbpedia-subset", 40)]:
        corpus, queries, qrels = harness.TASKS[name].load(DATA)
        assert len(corpus) == 5000 and len(queries) == 50 and len(qrels) == n_judged


@pytest.mark.parametrize(
    "content,words",
    [
        ("g\tf\ty\t0\t5\ta b\t  \ng\tf\ty\t1\t1\tc\td\n", ["sts-dev.csv:1", "sentence is empty"]),
        ("g\tf\ty\t0\tnan\ta\tb\ng\tf\ty\t1\t1\tc\td\n", ["sts-dev.csv:1", "not a finite number"]),
        ("\n\n", ["sts-dev.csv", "no scored pairs"]),
        ("g\tf\ty\t0\t2\ta\tb\ng\tf\ty\t1\t2\tc\td\n", ["every gold score is 2.0", "undefined"]),
    ],
)
def test_sts_sets_whose_metric_cannot_be_computed_are_refused(tmp_path, content, words):
    path = write(tmp_path / "sts-dev.csv", content)
    with pytest.raises(ValueError) as e:
        harness.read_stsb(path)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_judgments_must_name_known_documents_and_queries(tmp_path):
    root = beir_folder(tmp_path, header=True)
    qrels = root / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + "q1\tnope\t1\n")
    with pytest.raises(ValueError, match=r"test.tsv:\d+: document 'nope' is not in .*corpus.jsonl"):
        harness.read_beir(root)
    qrels.write_text("query-id\tcorpus-id\tscore\nq9\td1\t1\n")
    with pytest.raises(ValueError, match=r"test.tsv:2: query 'q9' is not in .*queries.jsonl"):
        harness.read_beir(root)
