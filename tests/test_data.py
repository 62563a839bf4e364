"""Readers, MNTP blocks and masking statistics, rank-aware batching."""

import json

import pytest
import torch
from conftest import DATA

from l2v.data import (
    PAIR_FIELDS,
    batches,
    mask_token_id,
    mask_tokens,
    micro_batch_positions,
    mntp_blocks,
    read_examples,
    read_texts,
)


@pytest.fixture(scope="module")
def tokenizer(tok):
    return tok


# -----------------------------------------------------------------------------
# Readers


def test_read_txt_keeps_headings_and_leading_spaces_skips_blanks(tmp_path):
    p = tmp_path / "wiki.raw"
    p.write_bytes(b" \n = Title = \n\n The text , with @-@ markers .\r\n\t\nlast line without newline")
    assert read_texts(p) == [" = Title = ", " The text , with @-@ markers .", "last line without newline"]


def test_read_json_list_and_jsonl(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(["first", {"text": "second", "id": 3}]))
    assert read_texts(p) == ["first", "second"]
    p.write_text(json.dumps(["first", "  "]))
    with pytest.raises(ValueError, match=rf"{p}\[1\]: the text is empty"):
        read_texts(p)
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "one"}\n\n"two"\n{"text": "three", "x": 1}\n')
    assert read_texts(p) == ["one", "two", "three"]


def test_read_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=rf"{p}:3: malformed JSON"):
        read_texts(p)
    p.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=rf"{p}:2: .*no \"text\""):
        read_texts(p)
    p = tmp_path / "bad.json"
    p.write_text('[\n "a",\n "b"\n "c"]')
    with pytest.raises(ValueError, match=rf"{p}:4: malformed JSON"):
        read_texts(p)
    p = tmp_path / "bad.txt"
    p.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=rf"{p}:2: not valid UTF-8"):
        read_texts(p)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_texts(tmp_path / "nope.txt")
    p = tmp_path / "empty.txt"
    p.write_text("\n \n")
    with pytest.raises(ValueError, match=rf"{p}: no texts"):
        read_texts(p)


def test_read_examples(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [
        dict(query="q1", positive="p1", negative="n1", instruction="Find it", dataset="a"),
        dict(query="q2", positive="p2", negative="n2"),
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = read_examples(p)
    assert got[0] == rows[0]
    assert got[1] == dict(rows[1], instruction="")
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(dict(query="q", positive="p")) + "\n")
    with pytest.raises(ValueError, match=rf"{p}:2: object has no \"negative\""):
        read_examples(p)
    p.write_text("")
    with pytest.raises(ValueError, match="no records"):
        read_examples(p)


def test_read_scored_pairs(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(
        '{"sentence1": "a cat", "sentence2": "a dog", "score": 3.5}\n'
        '{"sentence1": "x", "sentence2": "y", "score": 1}\n'
    )
    got = read_examples(p, PAIR_FIELDS)
    assert got == [
        dict(sentence1="a cat", sentence2="a dog", score=3.5, instruction=""),
        dict(sentence1="x", sentence2="y", score=1, instruction=""),
    ]
    for line, err in [
        ('{"sentence1": "a", "sentence2": "b"}', r'"score" must be a number, got None'),
        ('{"sentence1": "a", "sentence2": "b", "score": "4.2"}', r'"score" must be a number, got \'4.2\''),
        ('{"sentence1": "a", "sentence2": "b", "score": true}', r'"score" must be a number, got True'),
        ('{"sentence1": "a", "sentence2": "b", "score": NaN}', r'"score" must be a number, got nan'),
        ('{"sentence1": "a", "sentence2": " ", "score": 2}', r'"sentence2" is empty'),
        ('{"query": "a", "positive": "b", "score": 2}', r'object has no "sentence1"'),
    ]:
        p.write_text(line + "\n")
        with pytest.raises(ValueError, match=rf"{p}:1: {err}"):
            read_examples(p, PAIR_FIELDS)


def test_read_real_wikitext_and_wiki1m():
    path = DATA / "wikitext-2-raw" / "wiki.valid.raw"
    if not path.is_file():
        pytest.skip("shared data not present")
    texts = read_texts(path)
    assert all(t.strip() for t in texts) and " = Homarus gammarus = " in texts[:3]
    assert len(read_texts(DATA / "wiki1m_subset" / "wiki1m_for_simcse.head11914.txt")) > 11000


# -----------------------------------------------------------------------------
# MNTP blocks and mask token


class StubTokenizer:
    def encode_batch(self, texts):
        return [[int(w) for w in t.split()] for t in texts]


def test_mntp_blocks_concatenates_and_drops_remainder():
    blocks = mntp_blocks(StubTokenizer(), ["1 2 3", "", "4 5", "6 7 8 9 10 11"], block_size=4, chunk=2)
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9 10 11 dropped
    with pytest.raises(ValueError, match="not enough for one block"):
        mntp_blocks(StubTokenizer(), ["1 2"], block_size=4)


def test_mntp_blocks_match_oracle_rows(tokenizer, oracle_dir):
    ref = json.loads((oracle_dir / "mntp_loss.json").read_text())
    blocks = mntp_blocks(tokenizer, [ref["paragraph"]], block_size=64)
    assert blocks.shape == (2, 64)  # 147 tokens -> 2 blocks, 19 dropped
    assert blocks.tolist() == ref["input_ids_original"]


def test_mask_token_id(tokenizer):
    assert mask_token_id(tokenizer, "blank") == 79
    assert mask_token_id(tokenizer, "eos") == tokenizer.eos_id
    with pytest.raises(ValueError, match="unknown mask token"):
        mask_token_id(tokenizer, "mask")  # l2v does not add a <mask> row
    with pytest.raises(ValueError):
        mask_token_id(tokenizer, "nonsense")


def test_mask_token_auto(tokenizer, tmp_path):
    """auto, upstream's rule: the tokenizer's own mask token (declared in its files, or Gemma's `<mask>` in
    the vocabulary), else "_" (SmolLM2 as Llama, Mistral, Qwen: no mask token)."""
    import shutil
    from types import SimpleNamespace

    from conftest import TOKENIZER_DIR, TOKENIZER_FILES

    from l2v.tokenizer import Tokenizer

    assert mask_token_id(tokenizer, "auto") == mask_token_id(tokenizer) == 79
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / f, tmp_path / f)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "mask_token": "<|endoftext|>"}))
    assert mask_token_id(Tokenizer(tmp_path), "auto") == 0
    gemma_like = SimpleNamespace(mask_id=None, token_id={"<mask>": 4, "_": 235298}.get)
    assert mask_token_id(gemma_like, "auto") == 4 and mask_token_id(gemma_like, "blank") == 235298


# -----------------------------------------------------------------------------
# Masking statistics

V, MASK, SPECIAL = 1000, 7, [0, 1, 2]


def make_batch(seed=0, B=64, T=512):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    ids[torch.rand(B, T, generator=g) < 0.05] = 1  # sprinkle special ids
    ids[:, 0] = 0  # a BOS-like special at the start
    attn = torch.ones(B, T, dtype=torch.long)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    for b in range(B):
        if b % 2:  # right padding
            attn[b, lengths[b] :] = 0
        else:  # left padding
            attn[b, : T - lengths[b]] = 0
    ids[attn == 0] = 5  # a pad id that is NOT special: only attention_mask can exclude it
    return ids, attn


def run_mask(ids, attn, seed=1, mode="80_10_10"):
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(
        ids,
        mask_id=MASK,
        special_ids=SPECIAL,
        vocab_size=V,
        probability=0.2,
        mode=mode,
        generator=g,
        attention_mask=attn,
    )


def eligible_positions(ids, attn):
    real = attn.bool()
    prev_real = torch.zeros_like(real)
    prev_real[:, 1:] = real[:, :-1]
    return real & prev_real & ~torch.isin(ids, torch.tensor(SPECIAL))


def test_mask_statistics_80_10_10():
    ids, attn = make_batch()
    masked, labels = run_mask(ids, attn)
    sel = labels != -100
    elig = eligible_positions(ids, attn)
    assert not (sel & ~elig).any()  # never special, never padding, never after padding
    assert not sel[:, 0].any()
    assert torch.isin(ids[sel], torch.tensor(SPECIAL)).sum() == 0
    assert (labels[sel] == ids[sel]).all()
    assert (masked[~sel] == ids[~sel]).all()  # unselected inputs untouched
    assert abs(sel.sum().item() / elig.sum().item() - 0.2) < 0.01
    n = sel.sum().item()
    to_mask = (masked[sel] == MASK).sum().item() / n
    same = (masked[sel] == ids[sel]).sum().item() / n
    rand = ((masked[sel] != MASK) & (masked[sel] != ids[sel])).sum().item() / n
    assert abs(to_mask - 0.8) < 0.02 and abs(same - 0.1) < 0.015 and abs(rand - 0.1) < 0.015
    # random replacements are uniform over the whole vocabulary (specials included, as HF's collator)
    r = masked[sel & (masked != MASK) & (masked != ids)]
    assert r.min() >= 0 and r.max() < V and r.float().mean().sub(V / 2).abs() < 0.05 * V


def test_mask_all_mask_mode_and_determinism():
    ids, attn = make_batch(seed=3)
    masked, labels = run_mask(ids, attn, seed=5, mode="all_mask")
    sel = labels != -100
    assert (masked[sel] == MASK).all() and (masked[~sel] == ids[~sel]).all()
    assert abs(sel.sum().item() / eligible_positions(ids, attn).sum().item() - 0.2) < 0.01
    m2, l2 = run_mask(ids, attn, seed=5, mode="all_mask")
    assert torch.equal(masked, m2) and torch.equal(labels, l2)
    m3, l3 = run_mask(ids, attn, seed=6)
    assert not torch.equal(labels, l3)
    a, b = run_mask(ids, attn, seed=6)
    assert torch.equal(a, m3) and torch.equal(b, l3)


def test_mask_without_attention_mask_still_skips_position_0():
    ids = torch.randint(3, V, (32, 128), generator=torch.Generator().manual_seed(0))
    masked, labels = mask_tokens(
        ids,
        mask_id=MASK,
        special_ids=SPECIAL,
        vocab_size=V,
        probability=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert (labels[:, 0] == -100).all() and (labels[:, 1:] == ids[:, 1:]).all()
    with pytest.raises(ValueError, match="masking mode"):
        mask_tokens(ids, mask_id=MASK, special_ids=SPECIAL, vocab_size=V, mode="90_10")


# -----------------------------------------------------------------------------
# Batching


def test_batches_are_global_and_deterministic():
    kw = dict(seed=42, epoch=3)
    one = batches(103, 8, **kw)
    assert len(one) == 12 and all(len(b) == 8 for b in one)
    assert len(set(sum(one, []))) == 96  # each index at most once, remainder dropped
    assert one == batches(103, 8, **kw)
    assert one != batches(103, 8, seed=42, epoch=4)
    assert one != batches(103, 8, seed=43, epoch=3)


def test_micro_batches_over_ranks_cover_the_global_batch():
    for batch_size, micro, world in ((8, 4, 1), (8, 2, 2), (8, 1, 4), (12, 2, 2)):
        per_rank = [micro_batch_positions(batch_size, micro, r, world) for r in range(world)]
        assert all(len(p) == batch_size // (micro * world) for p in per_rank)
        # accumulation step i, gathered over ranks in rank order, is the contiguous group i
        for i in range(len(per_rank[0])):
            group = sum((per_rank[r][i] for r in range(world)), [])
            assert group == list(range(i * micro * world, (i + 1) * micro * world))


def test_batches_by_group():
    groups = ["a"] * 10 + ["b"] * 7 + ["a"] * 5
    got = batches(len(groups), 4, seed=1, groups=groups)
    assert len(got) == 3 + 1  # 15 "a" -> 3 batches, 7 "b" -> 1 batch
    for b in got:
        assert len({groups[i] for i in b}) == 1
