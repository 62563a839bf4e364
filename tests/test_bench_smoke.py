"""Smoke test of bench/: the l2v side of every bench script on a tiny random model (no peer venv).

Checks that the scripts run and report what the drivers parse; it measures nothing.
"""
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import DATA, REFERENCE, ROOT

sys.path.insert(0, str(ROOT / "bench"))

import bench_efficiency  # noqa: E402
import bench_encode  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402

TOKENIZER = REFERENCE / "smollm2-135m-instruct"
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=32,
            intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=100000.0,
            tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    if not (TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("../shared/reference/smollm2-135m-instruct not present")
    from l2v.checkpoint import save_model
    from l2v.model import ModelConfig, Transformer
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.from_hf(TINY)), folder, dtype=torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def result(capsys) -> dict:
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def test_stsb_reader_and_masking(tmp_path):
    tsv = tmp_path / "sts.csv"
    tsv.write_text('g\tf\t2012\t1\t2.5\tA "quoted" one.\tB two.\n'
                   'g\tf\t2012\t2\t3.0\tC three.\tD four.\textra\tfield\n')
    assert common.read_stsb_sentences(tsv) == ['A "quoted" one.', "B two.", "C three.", "D four."]
    if (DATA / "stsbenchmark" / "sts-test.csv").is_file():
        assert len(common.read_stsb_sentences()) == 2758
    ids = np.arange(2 * 11).reshape(2, 11) + 100
    masked, labels = common.masked_batch(ids, seed=0)
    assert ((labels != -100).sum(1) == 2).all() and (labels[:, 0] == -100).all()
    assert (masked[labels != -100] == common.MASK_ID).all() and (masked[labels == -100] == ids[labels == -100]).all()
    again, _ = common.masked_batch(ids, seed=0)
    assert (again == masked).all()


def test_encode_side(tiny_model, tmp_path, capsys):
    tsv = tmp_path / "sts.csv"
    tsv.write_text("".join(f"g\tf\t2012\t{i}\t1.0\tSentence number {i}.\tAnother one, {i}!\n" for i in range(5)))
    import l2v_encode
    l2v_encode.main(tiny_model, "float32", 0, 2, tmp_path / "a.npy", tsv)
    r = result(capsys)
    assert r["n"] == 10 and r["tokens"] > 10 and r["encode_s"] > 0 and r["peak_rss_mb"] > 0
    emb = np.load(tmp_path / "a.npy")
    assert emb.shape == (10, 32)
    assert bench_encode.cosines(emb, emb).min() > 0.9999


@pytest.mark.parametrize("objective,variant,ckpt", [("mntp", "fp32", 1), ("mntp", "bf16w", 0),
                                                     ("simcse", "autocast", 0)])
def test_train_side(tiny_model, tmp_path, capsys, objective, variant, ckpt):
    if not (DATA / "stsbenchmark" / "sts-test.csv").is_file():
        pytest.skip("../shared/data not present")
    batch = bench_train.make_batches(tmp_path, tiny_model, mntp_shape=(2, 32), simcse_shape=(4, 16))
    assert batch["mntp_masked"] == 2 * round(0.2 * 31)
    import l2v_train
    l2v_train.main(objective, variant, ckpt, 1, 1, tmp_path / f"{objective}.npz", tiny_model)
    r = result(capsys)
    assert len(r["step_s"]) == 1 and len(r["losses"]) == 2 and all(np.isfinite(r["losses"]))


def test_load_and_matmul_and_flops(tiny_model, capsys):
    import l2v_load
    import matmul_peak
    l2v_load.main(tiny_model)
    r = result(capsys)
    assert r["load_s"] > 0 and r["weights_mb"] > 0
    matmul_peak.main(64, 2)
    r = result(capsys)
    assert r["float32"]["median_gflops"] > 0 and r["bfloat16"]["median_gflops"] > 0
    f = bench_efficiency.mntp_step_flops(TINY, B=2, T=32, M=12)
    assert f["total"] == f["fwd"] + f["bwd"] and f["bwd"] > f["linear_fwd"]
    assert "ratio" in common.line("x", 2.0, 1.0, "u") and "ratio" not in common.line("x", 2.0, None, "u")
