"""Unit tests for scripts/build_demo_model.py that need no network, no wheel and no `gguf` package."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_model.py"
spec = importlib.util.spec_from_file_location("build_demo_model", SCRIPT)
bdm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bdm)


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The HF -> GGUF direction (interleave each head's two row halves), written out for the test."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("n_head,head_dim", [(9, 64), (3, 64), (2, 8)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim):
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, 5)).astype(np.float32)
    assert np.array_equal(bdm.unpermute_rows(gguf_permute(w, n_head), n_head), w)


def test_unpermute_restores_rotate_half_order():
    # One head of size 4: HF rows [r0, r1 | r2, r3] are stored by llama.cpp as pairs (r0, r2), (r1, r3).
    stored = np.array([[0.0], [2.0], [1.0], [3.0]])
    assert bdm.unpermute_rows(stored, 1)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_tensor_names():
    assert bdm.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert bdm.hf_name("output_norm.weight") == "model.norm.weight"
    assert bdm.hf_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert bdm.hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    with pytest.raises(ValueError):
        bdm.hf_name("blk.0.attn_qkv.weight")


def test_float32_metadata_is_written_as_the_intended_decimal():
    assert bdm.float32_value(float(np.float32(1e-5))) == 1e-05
    assert bdm.float32_value(100000.0) == 100000.0


def tiny_meta() -> dict:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "1", "Ġ", "Ġab"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * 6,
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.chat_template": "{{ x }}",
        "llama.context_length": 128,
        "llama.vocab_size": 9,
        "llama.embedding_length": 16,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "llama.feed_forward_length": 32,
        "llama.block_count": 2,
        "llama.rope.dimension_count": 8,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": float(np.float32(1e-5)),
    }


def test_tokenizer_special_tokens_digits_and_no_bos():
    from tokenizers import Tokenizer

    text = bdm.build_tokenizer(tiny_meta())
    assert json.loads(text)["model"]["merges"] == ["a b", "Ġ ab"]  # legacy string form
    tok = Tokenizer.from_str(text)
    assert tok.encode("<|im_start|>ab ab<|im_end|>").ids == [1, 5, 8, 2]
    assert tok.encode("11").ids == [6, 6]  # digits are split one by one
    assert tok.encode("ab").ids == [5]  # nothing added around the text
    assert tok.decode([1, 5, 8], skip_special_tokens=True) == "ab ab"


def test_config_from_metadata():
    cfg = bdm.hf_config(tiny_meta(), tied=True)
    assert cfg["head_dim"] == 8 and cfg["num_key_value_heads"] == 1 and cfg["rms_norm_eps"] == 1e-05
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"] == 10000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    files = bdm.tokenizer_files(tiny_meta())
    assert files["tokenizer_config.json"]["bos_token"] == "<|im_start|>"
    assert files["special_tokens_map.json"]["unk_token"]["content"] == "<|endoftext|>"


def test_incomplete_folder_is_not_already_built(tmp_path):
    assert not bdm.already_built(tmp_path)
    for name in bdm.OUTPUT_FILES:
        (tmp_path / name).write_text("{}")
    assert not bdm.already_built(tmp_path)  # a model.safetensors that is not a safetensors file


def test_complete_folder_is_already_built(tmp_path):
    import torch
    from safetensors.torch import save_file

    cfg = bdm.hf_config(tiny_meta(), tied=True) | {"num_hidden_layers": 1}
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.0.{m}.weight" for m in bdm.LAYER_NAMES.values()
    ]
    tensors = {n: torch.zeros(9, 16, dtype=torch.bfloat16) for n in names}
    for name in bdm.OUTPUT_FILES[:-1]:
        (tmp_path / name).write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert bdm.already_built(tmp_path)
    with open(tmp_path / "model.safetensors", "ab") as f:
        f.write(b"\0")  # a size that disagrees with the header means a damaged file
    assert not bdm.already_built(tmp_path)
