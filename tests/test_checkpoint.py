"""Loader errors: every bad folder names the file and the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from l2v.checkpoint import load_config, load_model, save_model
from l2v.model import ModelConfig, Transformer

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48)


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig(**TINY)), tmp_path / "m")
    return tmp_path / "m"


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_round_trip(folder):
    model = load_model(folder)
    assert model.config.n_kv_heads == 2 and model.lm_head is not None
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert load_model(folder, dtype="bfloat16").embed_tokens.weight.dtype == torch.bfloat16


def test_unknown_model_type(folder):
    edit_config(folder, model_type="gpt_neox")
    with pytest.raises(ValueError, match=r"config\.json.*unsupported model_type 'gpt_neox'"):
        load_model(folder)


def test_unknown_rope_scaling(folder):
    edit_config(folder, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        load_config(folder)


def test_unsupported_activation_and_missing_key(folder):
    edit_config(folder, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        load_config(folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    cfg["hidden_act"] = "silu"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        load_config(folder)


def test_malformed_config_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config\.json: malformed JSON at line 1"):
        load_model(folder)


def test_missing_folder_and_weights(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="config.json: file not found"):
        load_model(tmp_path / "nowhere")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="only pickle weights"):
        load_model(folder)


def test_missing_shard(tmp_path):
    torch.manual_seed(0)
    out = save_model(Transformer(ModelConfig(**TINY)), tmp_path / "s", max_shard_bytes=20_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"index\.json: shard file\(s\) missing .*{shards[1].name}"):
        load_model(out)


def test_wrong_shape(folder):
    t = load_file(folder / "model.safetensors")
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(t, folder / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
        r"has shape \(8, 32\), config\.json implies \(16, 32\)",
    ):
        load_model(folder)


def test_missing_and_unexpected_keys(folder):
    t = load_file(folder / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.2.mlp.up_proj.weight"] = torch.zeros(48, 32)
    save_file(t, folder / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "1 missing [model.layers.1.mlp.up_proj.weight]" in msg
    assert "1 unexpected [model.layers.2.mlp.up_proj.weight]" in msg
    assert str(folder) in msg


def test_tied_checkpoint_with_redundant_head_loads(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, tie_word_embeddings=True))
    out = save_model(model, tmp_path / "t")
    t = load_file(out / "model.safetensors")
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, out / "model.safetensors")
    loaded = load_model(out)
    assert loaded.lm_head is None
    torch.testing.assert_close(loaded.lm_head_weight, model.embed_tokens.weight)


@pytest.mark.parametrize("group", [1, 16_000_000])
def test_cast_while_reading_is_exact(tmp_path, monkeypatch, group):
    """bf16 file -> float32 model (and back) through the grouped, threaded reader: exactly what
    safetensors' load_file gives, whatever the group size (1: one file opening per tensor)."""
    import l2v.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "GROUP_ELEMENTS", group)
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig(**TINY)), tmp_path / "m", dtype=torch.bfloat16)
    ref = load_file(tmp_path / "m" / "model.safetensors")
    for dtype in (torch.float32, torch.bfloat16):
        got = load_model(tmp_path / "m", dtype=dtype).state_dict()
        for k, v in ref.items():
            assert got[k.removeprefix("model.")].dtype == dtype
            assert torch.equal(got[k.removeprefix("model.")], v.to(dtype)), k


def test_truncated_and_garbage_weight_files(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(folder)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(folder)


GEMMA2 = dict(
    model_type="gemma2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=4,
)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(hidden_activation="relu"), r"unsupported hidden_activation 'relu'"),
        (
            dict(hidden_activation="gelu"),
            r"unsupported hidden_activation 'gelu'",
        ),  # exact GELU: not Gemma 2's
        (dict(head_dim=None), r"missing head_dim"),
        (dict(model_type="qwen3", head_dim=None), r"missing head_dim"),
        (
            dict(layer_types=["sliding_attention", "chunked_attention"]),
            r"unsupported layer_types entries \['chunked",
        ),
        (dict(layer_types=["full_attention"]), r"layer_types must be a list of num_hidden_layers \(2\)"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"unsupported rope_scaling type 'yarn'"),
        (
            dict(model_type="qwen3", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
            r"unsupported rope_parameters type 'yarn'",
        ),  # transformers 5's layout
        (
            dict(
                model_type="gemma3_text",
                rope_parameters={
                    "full_attention": {"rope_type": "default"},
                    "sliding_attention": {"rope_type": "linear"},
                },
            ),
            r"unsupported rope_parameters.sliding_attention type 'linear'",
        ),
        (
            dict(model_type="gemma3_text", sliding_window_pattern=0),
            r"sliding_window_pattern must be a positive",
        ),
        (dict(attn_logit_softcapping="50"), r"attn_logit_softcapping must be a positive number"),
        (dict(sliding_window=-1), r"sliding_window must be an integer >= 1"),
        (dict(model_type="gemma3"), r"model_type 'gemma3' needs a text_config"),
        (
            dict(model_type="gemma3", text_config=dict(hidden_activation="silu")),
            r"text_config: unsupported hidden_activation 'silu'",
        ),
    ],
)
def test_bad_values_of_the_new_keys(tmp_path, changes, match):
    """One ValueError naming config.json and the key, for each value l2v cannot run faithfully."""
    (tmp_path / "config.json").write_text(json.dumps({**GEMMA2, **changes}))
    with pytest.raises(ValueError, match=r"config\.json: " + match):
        load_config(tmp_path)
