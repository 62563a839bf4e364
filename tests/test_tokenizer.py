"""l2v.tokenizer against the reference ids (tokenization.json) and its error behaviour."""

import json
import shutil

import pytest
from conftest import DEMO_MODEL, ORACLE, REFERENCE, TOKENIZER_DIR, needs_oracle

from l2v.tokenizer import Tokenizer

REF_TOKENIZER = REFERENCE / "smollm2-135m-instruct"


def tokenizer_dirs():
    # The demo model's tokenizer once built; the reference copy always (they must be identical).
    dirs = [REF_TOKENIZER] if REF_TOKENIZER.is_dir() else []
    if (DEMO_MODEL / "tokenizer.json").is_file():
        dirs.append(DEMO_MODEL)
    return dirs


@needs_oracle
@pytest.mark.parametrize("folder", tokenizer_dirs(), ids=lambda p: p.parent.name + "/" + p.name)
def test_ids_match_reference(folder):
    items = json.loads((ORACLE / "tokenization.json").read_text(encoding="utf-8"))["items"]
    assert len(items) == 26
    t = Tokenizer(folder)
    for it in items:
        assert t.encode(it["text"]) == it["ids"], it["name"]
        assert t.encode(it["text"], add_special_tokens=False) == it["ids"], it["name"]
        assert t.decode(it["ids"]) == it["decoded"], it["name"]
        assert t.decode(it["ids"], skip_special_tokens=False) == it["decoded_keep_special"], it["name"]


def test_demo_tokenizer_identical_to_reference():
    if not (DEMO_MODEL / "tokenizer.json").is_file() or not REF_TOKENIZER.is_dir():
        pytest.skip("needs both the demo model (make setup) and ../shared/reference")
    a, b = Tokenizer(DEMO_MODEL), Tokenizer(REF_TOKENIZER)
    assert a.tok.get_vocab() == b.tok.get_vocab()
    assert (a.bos_id, a.eos_id, a.pad_id, a.unk_id, a.special_ids) == (
        b.bos_id,
        b.eos_id,
        b.pad_id,
        b.unk_id,
        b.special_ids,
    )


def test_empty_and_special_ids(tok):
    assert tok.encode("") == []
    assert tok.encode_batch(["", "Hello world"]) == [[], [19556, 905]]
    # SmolLM2: BOS <|im_start|>=1, EOS = PAD <|im_end|>=2, UNK <|endoftext|>=0; nothing is added to text.
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.special_ids[:3] == [0, 1, 2] and len(tok.special_ids) == 17
    assert tok.vocab_size == 49152
    assert tok.token_id("<|im_end|>") == 2 and tok.token_id("not-a-token-xyz") is None
    assert tok.encode("Hello world", max_length=1) == [19556]


def test_missing_tokenizer_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def test_malformed_tokenizer_names_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer(tmp_path)


def test_malformed_tokenizer_config_names_file(tmp_path, tok):
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer(tmp_path)
