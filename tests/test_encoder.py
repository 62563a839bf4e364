"""l2v.encoder: pooling, upstream's string/ids/embed-mask preparation, batching invariance, options.

The preparation tests need only the tokenizer; model tests use a tiny random model (real vocabulary,
so the real tokenizer drives it) and, when built, the demo model.
"""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ORACLE, REFERENCE
from l2v.checkpoint import save_model
from l2v.encoder import CONFIG_FILE, Encoder, pool, shorten_by_words
from l2v.model import ModelConfig, Transformer
from l2v.tokenizer import Tokenizer

REF_TOKENIZER = REFERENCE / "smollm2-135m-instruct"
MODES = ("mean", "weighted_mean", "eos_token", "last_token")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(REF_TOKENIZER)


@pytest.fixture(scope="module")
def records():
    return json.loads((ORACLE / "embeddings.json").read_text(encoding="utf-8"))["inputs"]


def tiny_model(is_causal=False, seed=0):
    cfg = ModelConfig(vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      intermediate_size=128, norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                      is_causal=is_causal)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def tiny(tok):
    return Encoder(tiny_model(), tok)


SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the river bank on a sunny afternoon.",
    "Hi",
    "Vaccines train the immune system to recognise a pathogen without causing the disease itself.",
    "naïve café résumé",
    "Stocks fell.",
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen.",
]
PAIRS = [("Retrieve semantically similar text:", s) for s in SENTENCES[:4]] + [("", SENTENCES[4])]


# ---- pooling on hand-built tensors ----

H = torch.tensor([[[1., 2.], [3., 4.], [5., 6.], [7., 8.]],
                  [[1., 2.], [3., 4.], [5., 6.], [7., 8.]]])  # (B=2, T=4, D=2)
ATTN = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # row 0 right-padded, row 1 left-padded
EMBED = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])


def close(a, b):
    torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float32), rtol=0, atol=1e-6)


def test_pool_mean():
    close(pool(H, ATTN, EMBED, "mean"), [[4., 5.], [6., 7.]])
    close(pool(H, ATTN, None, "mean"), [[3., 4.], [5., 6.]])  # no embed mask: every real token


def test_pool_weighted_mean():
    # weights 1, 2 on the two pooled positions, divided by 3
    close(pool(H, ATTN, EMBED, "weighted_mean"), [[13 / 3, 16 / 3], [19 / 3, 22 / 3]])
    # all three real tokens: weights 1/6, 2/6, 3/6
    close(pool(H, ATTN, None, "weighted_mean"), [[22 / 6, 28 / 6], [34 / 6, 40 / 6]])


@pytest.mark.parametrize("mode", ["eos_token", "last_token"])
def test_pool_last(mode):
    # the last REAL token, whatever the embed mask and the padding side
    close(pool(H, ATTN, EMBED, mode), [[5., 6.], [7., 8.]])
    close(pool(H, ATTN, torch.zeros_like(EMBED), mode), [[5., 6.], [7., 8.]])


def test_pool_bos():
    ids = torch.tensor([[1, 9, 1, 1], [1, 1, 9, 9]])  # a pad holding id 1 must not count
    close(pool(H, ATTN, EMBED, "bos_token", input_ids=ids, bos_id=1), [[3., 4.], [3., 4.]])
    with pytest.raises(ValueError, match="BOS"):
        pool(H, ATTN, EMBED, "bos_token", input_ids=torch.full((2, 4), 9), bos_id=1)
    with pytest.raises(ValueError, match="bos_id"):
        pool(H, ATTN, EMBED, "bos_token")


def test_pool_dtype_and_errors():
    out = pool(H.bfloat16(), ATTN, EMBED, "mean")
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(H, ATTN, EMBED, "max")
    with pytest.raises(ValueError, match="no position"):
        pool(H, ATTN, torch.zeros_like(EMBED), "mean")


# ---- preparation: exactly what llm2vec fed the model ----

@pytest.mark.parametrize("key", ["standard.pairs", "standard.docs", "eos_token.pairs", "eos_token.docs"])
def test_prepare_matches_llm2vec(tok, records, key):
    enc = Encoder(None, tok, pooling="eos_token" if key.startswith("eos") else "mean")
    recs = records[key]
    assert len(recs) == 12
    for r in recs:
        item = (r["instruction"], r["text"]) if r["kind"] == "pair" else r["text"]
        (ids, mask), = enc.prepare_inputs([item])
        assert ids == r["input_ids"], (key, r["index"])
        assert mask == r["embed_mask"], (key, r["index"])
        text = r["text"]
        assert shorten_by_words(text, enc.count_tokens, 400) == r["text_after_doc_max_length"]


def test_prepare_string_layout(tok):
    enc = Encoder(None, tok)
    ids, mask = enc.prepare("  Find it:  ", "Hello world")
    assert ids == tok.encode("Find it: Hello world") and mask == [0, 0, 0, 1, 1]
    ids, mask = enc.prepare("", " Hello world")  # empty instruction: the text alone, not stripped
    assert ids == tok.encode(" Hello world")
    enc = Encoder(None, tok, skip_instruction=False)
    assert enc.prepare("Find it:", "Hello world")[1] == [1] * 5


def test_shorten_by_words():
    two_per_word = lambda t: 2 * len(t.split())  # noqa: E731
    text = " ".join(f"w{i}" for i in range(10))
    assert shorten_by_words(text, two_per_word, 7) == "w0 w1 w2"  # int(10 * 7/20) = 3 words
    assert shorten_by_words(text, two_per_word, 20) == text  # short enough: untouched
    overhead = lambda t: len(t.split()) + 5  # noqa: E731
    # 15 > 8 -> 5 words (10) -> 4 words (9) -> 3 words (8): the loop runs until it fits
    assert shorten_by_words(text, overhead, 8) == "w0 w1 w2"
    # shortening collapses whitespace, only when it happens
    assert shorten_by_words("a\n\nb   c d", two_per_word, 4) == "a b"
    assert shorten_by_words("a\n\nb", two_per_word, 4) == "a\n\nb"
    # one word longer than the limit cannot be shortened by words (upstream would empty it)
    assert shorten_by_words("word", lambda t: 10 * len(t.split()), 4) == "word"


def test_empty_text_is_an_error(tok):
    enc = Encoder(None, tok)
    with pytest.raises(ValueError, match="input 2: the text is empty"):
        enc.prepare_inputs(["a", ("Query:", "b"), ("Query:", "")])
    with pytest.raises(ValueError, match="input 0"):
        enc.prepare_inputs([""])
    with pytest.raises(TypeError, match="input 1"):
        enc.prepare_inputs(["a", ("x", "y", "z")])


def test_long_text_truncated(tok):
    text = " ".join(["word"] * 2000)
    ids, mask = Encoder(None, tok).prepare("Represent this:", text)
    assert len(ids) == len(mask) <= 512 and sum(mask) == 400  # doc_max_length by words first
    ids, mask = Encoder(None, tok, doc_max_length=10_000).prepare("Represent this:", text)
    assert len(ids) == 512 and sum(mask) == 512  # then max_length cuts; the count window covers it all
    ids, mask = Encoder(None, tok, max_length=16, doc_max_length=10).prepare("Represent this:", text)
    assert len(ids) == 13 and sum(mask) == 10  # 3 instruction tokens + 10 words


def test_chat_template_outside_embed_mask(tok):
    enc = Encoder(None, tok, chat_template="chatml")
    ids, mask = enc.prepare(" Find it:", "Hello world \n")  # upstream strips the whole string
    assert ids == tok.encode("<|im_start|>user\nFind it: Hello world<|im_end|>")
    assert [i for i, m in zip(ids, mask) if m] == tok.encode(" Hello world")
    assert mask[-1] == 0 and ids[-1] == tok.token_id("<|im_end|>")
    assert Encoder(None, tok, chat_template="auto").chat_template == "chatml"
    with pytest.raises(ValueError, match="not in this vocabulary"):
        Encoder(None, tok, chat_template="llama3")
    # the template's closing token survives the max_length cut
    ids, mask = Encoder(None, tok, chat_template="chatml", max_length=8).prepare("", "one two three four five six seven")
    assert len(ids) == 8 and ids[-1] == tok.token_id("<|im_end|>") and sum(mask) <= 8 - 4


# ---- encoding with a model ----

@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_batch_size_invariance_tiny(tok, mode, is_causal):
    enc = Encoder(tiny_model(is_causal=is_causal), tok, pooling=mode)
    inputs = SENTENCES + PAIRS
    ref = enc.encode(inputs, batch_size=1)
    assert ref.dtype == np.float32 and ref.shape == (len(inputs), 64)
    for bs in (3, 32):
        assert np.abs(enc.encode(inputs, batch_size=bs) - ref).max() <= 1e-5


def test_input_order_restored(tiny):
    inputs = SENTENCES + PAIRS
    emb = tiny.encode(inputs, batch_size=4)
    rev = tiny.encode(inputs[::-1], batch_size=4)
    np.testing.assert_allclose(rev[::-1], emb, rtol=0, atol=1e-5)
    for i in (0, 2, len(inputs) - 1):  # each row is that input's own embedding
        np.testing.assert_allclose(tiny.encode([inputs[i]])[0], emb[i], rtol=0, atol=1e-5)
    assert tiny.encode("Hi").shape == (1, 64)
    assert tiny.encode([]).shape == (0, 64)


def test_normalize(tiny):
    emb = tiny.encode(SENTENCES, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    raw = tiny.encode(SENTENCES)
    np.testing.assert_allclose(emb, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


def test_instruction_attended_not_pooled(tiny):
    a, b = tiny.encode([("Query:", "Hello world"), ("Passage:", "Hello world")])
    assert np.abs(a - b).max() > 1e-4  # bidirectional: the text tokens see the instruction


def test_embed_batch_has_gradient(tok):
    model = tiny_model()
    enc = Encoder(model, tok)
    emb = enc.embed_batch(*enc.collate(enc.prepare_inputs(SENTENCES[:3])))
    assert emb.shape == (3, 64) and emb.requires_grad
    emb.sum().backward()
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.training is False


def test_bf16_close_to_fp32(tok):
    model = tiny_model()
    ref = Encoder(model, tok).encode(SENTENCES)
    emb = Encoder(model.to(torch.bfloat16), tok).encode(SENTENCES)
    assert emb.dtype == np.float32
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99


def test_from_pretrained_reads_llm2vec_config(tmp_path, tok):
    save_model(tiny_model(), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(REF_TOKENIZER / name, tmp_path / name)
    enc = Encoder.from_pretrained(tmp_path)
    assert (enc.pooling, enc.max_length, enc.doc_max_length, enc.skip_instruction) == ("mean", 512, 400, True)
    assert enc.model.config.is_causal is False and enc.eos_suffix == " </s>"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(
        dict(pooling_mode="weighted_mean", max_length=128, doc_max_length=100, skip_instruction=False)))
    enc = Encoder.from_pretrained(tmp_path, is_causal=True)
    assert (enc.pooling, enc.max_length, enc.doc_max_length, enc.skip_instruction) == ("weighted_mean", 128, 100, False)
    assert enc.model.config.is_causal is True
    enc = Encoder.from_pretrained(tmp_path, pooling="last_token", dtype="bfloat16")  # arguments win
    assert enc.pooling == "last_token" and enc.model.embed_tokens.weight.dtype == torch.bfloat16
    assert enc.encode(["Hi there"]).dtype == np.float32
    enc.save_config(tmp_path / "out")
    assert json.loads((tmp_path / "out" / CONFIG_FILE).read_text())["pooling_mode"] == "last_token"


def test_batch_size_invariance_demo(demo_model_dir):
    enc = Encoder.from_pretrained(demo_model_dir)
    inputs = SENTENCES + PAIRS
    ref = enc.encode(inputs, batch_size=1)
    assert np.abs(enc.encode(inputs, batch_size=32) - ref).max() <= 1e-4


def test_autocast_close_to_fp32(tok):
    model = tiny_model()
    ref = Encoder(model, tok).encode(SENTENCES)
    emb = Encoder(model, tok, autocast="bfloat16").encode(SENTENCES)
    assert emb.dtype == np.float32 and model.embed_tokens.weight.dtype == torch.float32
    assert 0 < np.abs(emb - ref).max()  # it did run in bf16 ...
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99  # ... and stayed close


# ---- encode.py (the CLI) on a tiny model folder ----

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_model(tiny_model(), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(REF_TOKENIZER / name, folder / name)
    return folder


def test_cli_texts_files_and_order(tiny_dir, tmp_path, capsys):
    import encode

    txt = tmp_path / "t.txt"
    txt.write_text("first text\n\nsecond text\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "third text"}\n\n{"text": "fourth text", "instruction": "Own instruction:"}\n')
    out = tmp_path / "e.npy"
    emb = encode.main(["--model", str(tiny_dir), "--text", "zeroth text", "--file", str(txt),
                       "--instruction", "Query:", "--out", str(out), "--normalize"])
    assert "cosine similarity" in capsys.readouterr().out
    saved = np.load(out)
    assert saved.dtype == np.float32 and saved.shape == (3, 64)
    np.testing.assert_array_equal(saved, emb)
    enc = Encoder.from_pretrained(tiny_dir)
    want = enc.encode([("Query:", "zeroth text"), ("Query:", "first text"), ("Query:", "second text")], normalize=True)
    np.testing.assert_allclose(saved, want, atol=1e-6)
    emb = encode.main(["--model", str(tiny_dir), "--file", str(jsonl), "--instruction", "Query:"])
    want = enc.encode([("Query:", "third text"), ("Own instruction:", "fourth text")])
    np.testing.assert_allclose(emb, want, atol=1e-6)


def test_cli_errors(tiny_dir, tmp_path, capsys):
    import encode

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(SystemExit, match=f"{bad}:2"):
        encode.main(["--model", str(tiny_dir), "--file", str(bad)])
    bad.write_text('{"text": "ok"}\n["not", "an", "object"]\n')
    with pytest.raises(SystemExit, match=f"{bad}:2"):
        encode.main(["--model", str(tiny_dir), "--file", str(bad)])
    many = tmp_path / "many.txt"
    many.write_text("".join(f"text {i}\n" for i in range(17)))
    with pytest.raises(SystemExit):
        encode.main(["--model", str(tiny_dir), "--file", str(many)])  # > 16 texts need --out
    assert "--out" in capsys.readouterr().err
    emb = encode.main(["--model", str(tiny_dir), "--file", str(many), "--out", str(tmp_path / "m.npy")])
    assert emb.shape == (17, 64)
    with pytest.raises(SystemExit, match="no model at"):
        encode.main(["--model", str(tmp_path / "missing"), "--text", "a"])
    with pytest.raises(SystemExit, match="input 1: the text is empty"):
        encode.main(["--model", str(tiny_dir), "--text", "a", "--text", ""])


def test_cli_seed_example(tiny_dir, capsys):
    import encode

    emb = encode.main(["--model", str(tiny_dir)])
    assert emb.shape == (4, 64)
    out = capsys.readouterr().out
    assert "summit define" in out and "query 1" in out and "doc 1" in out
