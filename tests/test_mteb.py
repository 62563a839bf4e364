"""l2v.mteb (mteb 2.x's encoder protocol) and `eval.py --mteb`, offline: mteb's task objects get their data
from ../shared/data (the dataset set on the task, marked loaded), so mteb's scores can be held against
eval.py's on the same texts and settings. The tiny random model: the scores' agreement does not depend on
the encoder's quality."""

import json
import sys

import numpy as np
import pytest
from conftest import DATA

import eval as eval_cli
import l2v.mteb as l2v_mteb
from l2v.evaluation import read_beir, read_sick, read_stsb

mteb = pytest.importorskip("mteb")
datasets = pytest.importorskip("datasets")

STS_INSTRUCTION = "Retrieve semantically similar text:"  # upstream's MTEB table for every STS task
DBPEDIA_INSTRUCTION = "Given a query, retrieve relevant entity descriptions from DBPedia:"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")


def sts_task(name, s1, s2, gold):
    task = mteb.get_task(name)
    task.dataset = {
        task.metadata.eval_splits[0]: datasets.Dataset.from_dict(
            {"sentence1": s1, "sentence2": s2, "score": [float(g) for g in gold]}
        )
    }
    task.data_loaded = True
    return task


def retrieval_task(name, folder):
    corpus, queries, qrels = read_beir(folder)
    rows = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines() if line.strip()]
    task = mteb.get_task(name)
    task.dataset = {
        "default": {
            task.metadata.eval_splits[0]: {
                "corpus": datasets.Dataset.from_dict(
                    {
                        "id": [str(r["_id"]) for r in rows],
                        "title": [r.get("title") or "" for r in rows],
                        "text": [r["text"] for r in rows],
                    }
                ),
                "queries": datasets.Dataset.from_dict({"id": list(queries), "text": list(queries.values())}),
                "relevant_docs": qrels,
                "top_ranked": None,
            }
        }
    }
    task.data_loaded = True
    return task


@pytest.fixture
def data_dir(tmp_path):
    """STS-B as it is; for time, SICK's first 2,000 test pairs and the DBpedia subset cut to 6 of its
    queries, the documents judged for them and 300 others."""
    d = tmp_path / "data"
    (d / "retrieval" / "agentset_dbpedia_subset" / "qrels").mkdir(parents=True)
    (d / "stsbenchmark").symlink_to(DATA / "stsbenchmark")
    (d / "sick").mkdir()
    sick = (DATA / "sick" / "SICK_test_annotated.txt").read_text().splitlines()
    (d / "sick" / "SICK_test_annotated.txt").write_text("\n".join(sick[:2001]) + "\n")
    src, dst = DATA / "retrieval" / "agentset_dbpedia_subset", d / "retrieval" / "agentset_dbpedia_subset"
    qrels = (src / "qrels" / "test.tsv").read_text().splitlines()
    qids = list(dict.fromkeys(ln.split("\t")[0] for ln in qrels[1:]))[:6]
    qrels = qrels[:1] + [ln for ln in qrels[1:] if ln.split("\t")[0] in qids]
    judged = {ln.split("\t")[1] for ln in qrels[1:]}
    lines = [ln for ln in (src / "corpus.jsonl").read_text().splitlines() if ln.strip()]
    keep = [ln for i, ln in enumerate(lines) if i < 300 or str(json.loads(ln)["_id"]) in judged]
    (dst / "corpus.jsonl").write_text("\n".join(keep) + "\n")
    (dst / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    (dst / "queries.jsonl").write_text((src / "queries.jsonl").read_text())
    return d


@needs_data
def test_eval_py_mteb_matches_local_scores(tiny_dir, data_dir, tmp_path, monkeypatch):
    def task(name):
        if name == "STSBenchmark":
            return sts_task(name, *read_stsb(data_dir / "stsbenchmark" / "sts-test.csv"))
        if name == "SICK-R":
            return sts_task(name, *read_sick(data_dir / "sick" / "SICK_test_annotated.txt"))
        return retrieval_task(name, data_dir / "retrieval" / "agentset_dbpedia_subset")

    def injected(names):  # eval.py's task look-up, with the data put in instead of downloaded
        return [task(n) for n in names.split(",")]

    monkeypatch.setattr(l2v_mteb, "get_tasks", injected)
    out = tmp_path / "out" / "r.json"
    eval_cli.main(
        [
            "--model",
            str(tiny_dir),
            "--autocast",
            "none",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--tasks",
            "stsb-test,sick-r-test,dbpedia-subset",
            "--mteb",
            "STSBenchmark,SICK-R,DBPedia",
            "--sts-instruction",
            STS_INSTRUCTION,
        ]
    )
    res = {r["task"]: r for r in json.loads(out.read_text())["results"]}
    pairs = [
        ("stsb-test", "mteb/STSBenchmark", "spearman", "cosine_spearman"),
        ("sick-r-test", "mteb/SICK-R", "spearman", "cosine_spearman"),
        ("dbpedia-subset", "mteb/DBPedia", "ndcg@10", "ndcg_at_10"),
    ]
    for local, remote, m_local, m_mteb in pairs:
        a, b = res[local]["scores"][m_local], res[remote]["scores"][m_mteb]
        assert res[local]["n"] == res[remote]["n"]
        # x100, as eval.py reports: 1e-4 (float rounding: mteb encodes each side, eval.py each sentence
        # once); mteb rounds nDCG to 5 decimals of its 0-1 scale, so there up to 5e-4
        assert abs(a - b) <= (5.1e-4 if m_mteb.startswith("ndcg") else 1e-4), (local, a, b)
    assert res["mteb/STSBenchmark"]["instructions"] == {"both": STS_INSTRUCTION}
    assert res["mteb/SICK-R"]["instructions"] == {"both": STS_INSTRUCTION}
    assert res["mteb/DBPedia"]["instructions"] == {"query": DBPEDIA_INSTRUCTION, "document": ""}
    written = (tmp_path / "out" / "r-mteb").rglob("*.json")  # mteb's own result files
    assert sorted(p.name for p in written if p.name != "model_meta.json") == [
        "DBPedia.json",
        "SICK-R.json",
        "STSBenchmark.json",
    ]


def test_instruction_rule():
    """Upstream's table; else the task's own query prompt ending in ':'; never on a retrieval corpus."""
    from mteb.types import PromptType

    names = (
        "STSBenchmark",
        "DBPedia",
        "NanoDBPediaRetrieval",
        "STS22.v2",
        "AmazonCounterfactualClassification",
    )
    meta = {n: mteb.get_task(n).metadata for n in names}
    rule = l2v_mteb.instruction_for
    assert rule(meta["STSBenchmark"]) == rule(meta["STS22.v2"]) == STS_INSTRUCTION
    assert rule(meta["DBPedia"], PromptType.query) == DBPEDIA_INSTRUCTION
    assert rule(meta["NanoDBPediaRetrieval"], "query") == DBPEDIA_INSTRUCTION  # not in the table: its prompt
    assert rule(meta["DBPedia"], PromptType.document) == ""
    amazon = "Classify a given Amazon customer review text as either counterfactual or notcounterfactual:"
    assert rule(meta["AmazonCounterfactualClassification"]) == amazon  # the table's, not mteb's spelling
    assert rule(meta["STSBenchmark"], None, {"STSBenchmark": "Mine:"}) == "Mine:"
    assert l2v_mteb.llm2vec_instruction("Retrieve it.") == "Retrieve it:"
    assert l2v_mteb.llm2vec_instruction("") == ""


def test_protocol(tiny_dir):
    from mteb.models.models_protocols import EncoderProtocol

    model = l2v_mteb.MTEBModel(tiny_dir, autocast="none", pooling="mean")
    assert isinstance(model, EncoderProtocol)
    assert (model.mteb_model_meta.name, model.mteb_model_meta.embed_dim) == (f"l2v/{tiny_dir.name}", 64)
    task = mteb.get_task("DBPedia")
    batches = [{"text": ["a cat", ""]}, {"text": ["summit define"]}]
    docs = model.encode(
        batches, task_metadata=task.metadata, hf_split="test", hf_subset="default", prompt_type="document"
    )
    assert docs.shape == (3, 64) and docs.dtype == np.float32 and not docs[1].any()  # an empty document: 0s
    want = model.encoder.encode(["a cat", "summit define"])
    np.testing.assert_allclose(docs[[0, 2]], want, rtol=0, atol=1e-6)
    assert model.calls[-1] == {"task": "DBPedia", "prompt_type": "document", "instruction": "", "n": 3}
    assert float(model.similarity(docs[:1], docs[:1])[0, 0]) == pytest.approx(1.0, abs=1e-6)


def test_errors(tiny_dir, tmp_path, monkeypatch, capsys):
    base = ["--model", str(tiny_dir), "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit):
        eval_cli.main(base + ["--mteb", "NoSuchTask"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval.py: error: --mteb: ") and "NoSuchTask" in err and "\n" not in err
    monkeypatch.setitem(sys.modules, "mteb", None)  # not installed
    with pytest.raises(SystemExit):
        eval_cli.main(base + ["--mteb", "STSBenchmark"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval.py: error: --mteb: ") and "pip install" in err and "\n" not in err
    with pytest.raises(ImportError, match="pip install"):
        l2v_mteb.MTEBModel(tiny_dir)
