"""l2v.encoder: pooling, upstream's string/ids/embed-mask preparation, batching invariance, options.

The preparation tests need only the tokenizer; model tests use a tiny random model (real vocabulary,
so the real tokenizer drives it) and, when built, the demo model.
"""

import json

import numpy as np
import pytest
import torch
from conftest import ORACLE, save_tiny, tiny_model

from l2v.encoder import Encoder, pack, pool, pool_weights, shorten_by_words
from l2v.settings import UPSTREAM_FILE as CONFIG_FILE

MODES = ("mean", "weighted_mean", "eos_token", "last_token")


@pytest.fixture(scope="module")
def records(oracle_dir):
    return json.loads((ORACLE / "embeddings.json").read_text(encoding="utf-8"))["inputs"]


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


# ---- pooling: weights per text, then weighted sums over a packed layout ----


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b, dtype=np.float32), rtol=0, atol=1e-6)


def test_pool_weights():
    embed = [0, 1, 1, 1]  # an instruction token, then three text tokens
    close(pool_weights("mean", embed), [0, 1 / 3, 1 / 3, 1 / 3])
    close(pool_weights("weighted_mean", embed), [0, 1 / 6, 2 / 6, 3 / 6])  # later tokens weigh more
    for mode in ("eos_token", "last_token"):  # the last token, whatever the embed mask says
        close(pool_weights(mode, embed), [0, 0, 0, 1])
        close(pool_weights(mode, [0, 0, 0, 0]), [0, 0, 0, 1])
    close(pool_weights("bos_token", embed, input_ids=[1, 9, 1, 9], bos_id=1), [0.5, 0, 0.5, 0])
    with pytest.raises(ValueError, match="BOS"):
        pool_weights("bos_token", embed, input_ids=[9, 9, 9, 9], bos_id=1)
    with pytest.raises(ValueError, match="BOS id"):
        pool_weights("bos_token", embed)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_weights("max", embed)
    with pytest.raises(ValueError, match="no position"):
        pool_weights("mean", [0, 0])


def test_pool_on_packed_rows():
    H = torch.arange(12.0).view(1, 6, 2)  # one row: text 1 at positions 0-2, text 0 at 3-4, padding at 5
    weights = torch.tensor([[0.5, 0.5, 0, 0.25, 0.75, 0]])
    index = torch.tensor([[1, 1, 1, 0, 0, 0]])
    close(pool(H, weights, index, 2), [[0.25 * 6 + 0.75 * 8, 0.25 * 7 + 0.75 * 9], [1, 2]])
    out = pool(H.bfloat16(), weights, index, 2)
    assert out.dtype == torch.float32


def test_pack_fills_rows():
    lengths = [10, 3, 7, 2, 9, 1, 12]
    rows = pack(lengths, 12)
    assert sorted(i for r in rows for i in r) == list(range(7))  # every text once
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows)
    assert len(rows) == 4  # 44 tokens in rows of 12: the fewest possible
    assert pack([30, 5], 12) == [[0], [1]]  # a text longer than a row gets one of its own


# ---- preparation: exactly what llm2vec fed the model ----


@pytest.mark.parametrize("key", ["standard.pairs", "standard.docs", "eos_token.pairs", "eos_token.docs"])
def test_prepare_matches_llm2vec(tok, records, key):
    enc = Encoder(None, tok, pooling="eos_token" if key.startswith("eos") else "mean")
    recs = records[key]
    assert len(recs) == 12
    for r in recs:
        item = (r["instruction"], r["text"]) if r["kind"] == "pair" else r["text"]
        ids, mask = enc.prepare(*(item if isinstance(item, tuple) else ("", item)))
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


def test_bad_inputs_are_errors(tok):
    enc = Encoder(None, tok)
    with pytest.raises(ValueError, match="input 2: the text is empty"):
        enc.prepare_inputs(["a", ("Query:", "b"), ("Query:", "")])
    with pytest.raises(ValueError, match="input 1: the text is empty"):
        enc.prepare_inputs(["a", "  \n "])
    with pytest.raises(TypeError, match="input 1"):
        enc.prepare_inputs(["a", ("x", "y", "z")])
    with pytest.raises(TypeError, match="bare tuple"):
        enc.prepare_inputs(("a", "b"))
    with pytest.raises(ValueError, match="no room for the text"):
        Encoder(None, tok, max_length=4).prepare_inputs([("one two three four five six", "text")])
    with pytest.raises(ValueError, match="max_length"):
        Encoder(None, tok, max_length=0)
    with pytest.raises(ValueError, match="slot"):
        Encoder(None, tok, prompt="no slot here")


def test_prompt_wraps_the_text(tok):
    enc = Encoder(None, tok, prompt='This sentence : "{text}" means in one word:"', pooling="last_token")
    ids, mask = enc.prepare("", "A cat.")
    assert ids == tok.encode('This sentence : "A cat." means in one word:"')
    assert sum(mask) == len(ids)  # the prompt's words count as the text's


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
    ids, mask = Encoder(None, tok, chat_template="chatml", max_length=8).prepare(
        "", "one two three four five six seven"
    )
    assert len(ids) == 8 and ids[-1] == tok.token_id("<|im_end|>") and sum(mask) <= 8 - 4


def test_chat_template_as_upstream(tok):
    """upstream_template: the template's closing tokens belong to the text (pooled, cut first), as upstream
    split its templated string at the separator; eos_token pooling appends after them, except Llama-3's."""
    enc = Encoder(None, tok, chat_template="chatml", upstream_template=True)
    ids, mask = enc.prepare(" Find it:", "Hello world \n")
    assert ids == tok.encode("<|im_start|>user\nFind it: Hello world<|im_end|>")
    assert [i for i, m in zip(ids, mask) if m] == tok.encode(" Hello world<|im_end|>")
    ids, mask = Encoder(None, tok, chat_template="chatml", upstream_template=True, max_length=8).prepare(
        "", "one two three four five six seven"
    )
    assert ids == tok.encode("<|im_start|>user\none two three four five six seven")[:8] and sum(mask) == 8
    enc = Encoder(None, tok, chat_template="mistral", upstream_template=True, pooling="eos_token")
    ids, _ = enc.prepare("", "Hi")
    assert ids == tok.encode("[INST] Hi [/INST] </s>")
    assert Encoder(None, tok, chat_template="mistral").prepare("", "Hi")[0] == tok.encode("[INST] Hi [/INST]")
    assert Encoder(None, tok, chat_template="auto").chat_template == "chatml"  # never the plain-text one


# ---- encoding with a model ----


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_packing_invariance_tiny(tok, mode, is_causal):
    """A text's embedding is the same alone (one row each) or packed with others, in any budget."""
    enc = Encoder(tiny_model(is_causal=is_causal), tok, pooling=mode, row_tokens=1)
    inputs = SENTENCES + PAIRS
    ref = enc.encode(inputs, max_batch_tokens=1)  # one text per forward pass
    assert ref.dtype == np.float32 and ref.shape == (len(inputs), 64)
    for row_tokens, budget in ((64, 64), (128, 8192), (1, 8192)):
        enc.row_tokens = row_tokens
        assert np.abs(enc.encode(inputs, max_batch_tokens=budget) - ref).max() <= 1e-5


def test_packed_equals_padded_and_unmasked(tok):
    """Packed rows give what a lone unpadded text gives (SDPA's unmasked path), also for Mistral's
    sliding window and causal attention."""
    for kw in ({}, {"sliding_window": 3}):
        model = tiny_model(is_causal=True, **kw)
        model.config.sliding_window = kw.get("sliding_window")
        enc = Encoder(model, tok, pooling="mean")
        prepared = enc.prepare_inputs(SENTENCES)
        with torch.no_grad():
            alone = torch.cat([enc.embed(b) for p in prepared for b in enc.batches([p])])
            packed = enc.embed(enc.batches(prepared)[0])
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_input_order_restored(tiny):
    inputs = SENTENCES + PAIRS
    emb = tiny.encode(inputs, max_batch_tokens=40)
    rev = tiny.encode(inputs[::-1], max_batch_tokens=40)
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


def test_embed_has_gradient(tok):
    model = tiny_model()
    enc = Encoder(model, tok)
    emb = enc.embed(enc.batches(enc.prepare_inputs(SENTENCES[:3]))[0])
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
    save_tiny(tmp_path)
    enc = Encoder.from_pretrained(tmp_path)
    assert (enc.pooling, enc.max_length, enc.doc_max_length, enc.skip_instruction) == ("mean", 512, 400, True)
    assert enc.model.config.is_causal is False and enc.eos_suffix == " </s>"
    (tmp_path / CONFIG_FILE).write_text(
        json.dumps(
            dict(pooling_mode="weighted_mean", max_length=128, doc_max_length=100, skip_instruction=False)
        )
    )
    enc = Encoder.from_pretrained(tmp_path, is_causal=True)
    assert (enc.pooling, enc.max_length, enc.doc_max_length, enc.skip_instruction) == (
        "weighted_mean",
        128,
        100,
        False,
    )
    assert enc.model.config.is_causal is True
    enc = Encoder.from_pretrained(tmp_path, pooling="last_token", dtype="bfloat16")  # arguments win
    assert enc.pooling == "last_token" and enc.model.embed_tokens.weight.dtype == torch.bfloat16
    assert enc.encode(["Hi there"]).dtype == np.float32
    with pytest.raises(ValueError, match="input 0: the text is empty"):  # checked before the weights load
        Encoder.from_pretrained(tmp_path, check_inputs=[" "])


def test_from_pretrained_takes_prompt_and_attention_from_the_adapters_run(tmp_path, tiny_dir, capsys):
    """An adapter trained through a prompt with causal attention encodes through them unless told
    otherwise: upstream's llm2vec_config.json cannot hold either, train.py's train_config.json does."""
    import encode
    from l2v.adapters import save_adapter
    from l2v.lora import add_lora

    model = tiny_model()
    add_lora(model, r=2, alpha=4.0, dropout=0.0)
    for p in model.parameters():  # a trained adapter: B is no longer zero
        p.data.add_(0.05) if p.requires_grad else None
    run = tmp_path / "run"
    save_adapter(model, run, base_model_name_or_path=str(tiny_dir))
    prompt = 'This sentence : "{text}" means in one word:"'
    (run / CONFIG_FILE).write_text(json.dumps(dict(pooling_mode="last_token")))
    (run / "train_config.json").write_text(json.dumps(dict(prompt=prompt, is_causal=True, lr=1e-4)))
    enc = Encoder.from_pretrained(tiny_dir, adapters=[run])
    assert (enc.prompt, enc.pooling, enc.model.config.is_causal) == (prompt, "last_token", True)
    told = Encoder.from_pretrained(
        tiny_dir, adapters=[run], is_causal=True, pooling="last_token", prompt=prompt
    )
    np.testing.assert_array_equal(enc.encode(SENTENCES), told.encode(SENTENCES))
    plain = Encoder.from_pretrained(tiny_dir, adapters=[run], is_causal=False, prompt="")  # arguments win
    assert (plain.prompt, plain.model.config.is_causal) == (None, False)
    assert np.abs(plain.encode(SENTENCES) - enc.encode(SENTENCES)).max() > 1e-3
    encode.main(["--model", str(tiny_dir), "--adapter", str(run), "--text", "a cat", "--text", "a dog"])
    out = capsys.readouterr().out
    assert "settings: causal attention, last_token pooling" in out and f"prompt {prompt!r}" in out
    encode.main(
        ["--model", str(tiny_dir), "--adapter", str(run), "--no-causal", "--text", "a cat", "--text", "a dog"]
    )
    assert "settings: bidirectional attention, last_token pooling" in capsys.readouterr().out
    for name, bad in (
        ("train_config.json", dict(prompt="no slot")),
        ("train_config.json", dict(is_causal="yes")),
        (CONFIG_FILE, dict(pooling_mode=3)),
    ):  # a bad value names its file, before any weights load
        (run / name).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"{name}: {next(iter(bad))}: unusable value"):
            Encoder.from_pretrained(tiny_dir, adapters=[run])


def test_packing_invariance_demo(demo_model_dir):
    enc = Encoder.from_pretrained(demo_model_dir, autocast="none")
    inputs = SENTENCES + PAIRS
    ref = np.concatenate([enc.encode([x]) for x in inputs])  # one text per forward pass, unpadded
    emb = enc.encode(inputs)
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999 and np.abs(emb - ref).max() <= 1e-3, (cos.min(), np.abs(emb - ref).max())


def test_autocast_close_to_fp32(tok):
    model = tiny_model()
    ref = Encoder(model, tok).encode(SENTENCES)
    emb = Encoder(model, tok, autocast="bfloat16").encode(SENTENCES)
    assert emb.dtype == np.float32 and model.embed_tokens.weight.dtype == torch.float32
    assert 0 < np.abs(emb - ref).max()  # it did run in bf16 ...
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99  # ... and stayed close


# ---- encode.py (the CLI) on a tiny model folder ----


def test_cli_texts_files_and_order(tiny_dir, tmp_path, capsys):
    import encode

    txt = tmp_path / "t.txt"
    txt.write_text("first text\n\nsecond text\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "third text"}\n\n{"text": "fourth text", "instruction": "Own instruction:"}\n')
    out = tmp_path / "e.npy"
    emb = encode.main(
        [
            "--model",
            str(tiny_dir),
            "--text",
            "zeroth text",
            "--file",
            str(txt),
            "--instruction",
            "Query:",
            "--out",
            str(out),
            "--normalize",
        ]
    )
    assert "cosine similarity" in capsys.readouterr().out
    saved = np.load(out)
    assert saved.dtype == np.float32 and saved.shape == (3, 64)
    np.testing.assert_array_equal(saved, emb)
    enc = Encoder.from_pretrained(tiny_dir, autocast="auto")  # as encode.py: bf16 matmuls where they are fast
    want = enc.encode(
        [("Query:", "zeroth text"), ("Query:", "first text"), ("Query:", "second text")], normalize=True
    )
    np.testing.assert_allclose(saved, want, atol=1e-6)
    emb = encode.main(["--model", str(tiny_dir), "--file", str(jsonl), "--instruction", "Query:"])
    want = enc.encode([("Query:", "third text"), ("Own instruction:", "fourth text")])
    np.testing.assert_allclose(emb, want, atol=1e-6)


def test_cli_many_texts_need_out(tiny_dir, tmp_path, capsys):
    import encode

    many = tmp_path / "many.txt"
    many.write_text("".join(f"text {i}\n" for i in range(17)))
    with pytest.raises(SystemExit):
        encode.main(["--model", str(tiny_dir), "--file", str(many)])  # > 16 texts need --out
    assert "--out" in capsys.readouterr().err
    emb = encode.main(["--model", str(tiny_dir), "--file", str(many), "--out", str(tmp_path / "m.npy")])
    assert emb.shape == (17, 64)


def test_cli_seed_example(tiny_dir, capsys):
    import encode

    emb = encode.main(["--model", str(tiny_dir)])
    assert emb.shape == (4, 64)
    out = capsys.readouterr().out
    assert "summit define" in out and "query 1" in out and "doc 1" in out


def test_gemma_chat_template_needs_its_tokens(tok):
    """Upstream's gemma-2-9b-it template; on a vocabulary without its tokens it is refused by name, and
    "auto" does not choose it."""
    with pytest.raises(ValueError, match=r"'gemma'.*'<bos>', '<start_of_turn>', '<end_of_turn>'"):
        Encoder(None, tok, chat_template="gemma")
    assert Encoder(None, tok, chat_template="auto").chat_template == "chatml"
