"""Parity with HF transformers (test-only oracle) on tiny random configs, through l2v's own loader."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from l2v.checkpoint import load_model, save_model  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)

CASES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32))),
    "gqa_tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama_attn_bias": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
}


def hf_model(name, seed=0):
    cfg_cls, model_cls, extra = CASES[name]
    cfg = getattr(transformers, cfg_cls)(**BASE, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so every tensor matters.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def full_mask(T):
    # A 4D additive float mask of zeros: every token sees every token (a bool all-False mask would not).
    return torch.zeros(1, 1, T, T)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shard", [False, True])
def test_causal_and_bidirectional_match_hf(tmp_path, name, shard):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "10GB", safe_serialization=True)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        h = ours(ids, is_causal=True)
        torch.testing.assert_close(h, out.hidden_states[-1], atol=TOL, rtol=0)
        torch.testing.assert_close(h @ ours.lm_head_weight.T, out.logits, atol=TOL, rtol=0)
        hb = ours(ids, is_causal=False)
        hf_full = torch.cat([hf.model(ids[i:i + 1], attention_mask=full_mask(11)).last_hidden_state for i in range(2)])
        torch.testing.assert_close(hb, hf_full, atol=TOL, rtol=0)


def test_bidirectional_sees_the_future(tmp_path):
    hf_model("llama2").save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 128
    with torch.no_grad():
        causal = model(ids, is_causal=True)[0, 0] - model(changed, is_causal=True)[0, 0]
        bi = model(ids, is_causal=False)[0, 0] - model(changed, is_causal=False)[0, 0]
    assert causal.abs().max() == 0  # the first token cannot see the last one ...
    assert bi.abs().max() > 1e-3  # ... unless attention is bidirectional


def test_config_flag_is_the_default(tmp_path):
    hf_model("llama2").save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        bi = load_model(tmp_path, is_causal=False)
        torch.testing.assert_close(bi(ids), bi(ids, is_causal=False), atol=0, rtol=0)
        assert (bi(ids) - bi(ids, is_causal=True)).abs().max() > 1e-3


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_tokens(tmp_path, is_causal, side):
    hf_model("qwen2_bias").save_pretrained(tmp_path)
    model = load_model(tmp_path)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, 128, (1, 9), generator=g), torch.randint(3, 128, (1, 5), generator=g)
    pad = torch.zeros(1, 4, dtype=torch.long)
    b_pad = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    mask = torch.ones(2, 9, dtype=torch.long)
    if side == "left":
        mask[1, :4] = 0
    else:
        mask[1, 5:] = 0
    with torch.no_grad():
        batch = model(torch.cat([a, b_pad]), attention_mask=mask, is_causal=is_causal)
        alone = model(b, is_causal=is_causal)[0]
    real = batch[1][mask[1].bool()]
    torch.testing.assert_close(real, alone, atol=TOL, rtol=0)
    assert torch.isfinite(batch).all()


def test_padded_causal_batch_matches_hf(tmp_path):
    hf = hf_model("llama3_rope")
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding: HF positions are 0..T-1, the same as ours for real tokens
    with torch.no_grad():
        ref = hf.model(ids, attention_mask=mask).last_hidden_state
        ours = model(ids, attention_mask=mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=TOL, rtol=0)


def test_mistral_sliding_window_when_causal(tmp_path):
    cfg_cls, model_cls, extra = CASES["mistral"]
    cfg = transformers.MistralConfig(**BASE, **{**extra, "sliding_window": 4})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf.model(ids).last_hidden_state
        ours = model(ids, is_causal=True)
        torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)
        # Without the window the outputs past position 4 differ: the window really is applied.
        model.config.sliding_window = None
        assert (model(ids, is_causal=True) - ours).abs().max() > 1e-4


def test_save_model_round_trip_loads_in_transformers(tmp_path):
    hf = hf_model("gqa_tied")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=TOL, rtol=0)
    save_model(ours, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "sharded")(ids), ours(ids), atol=0, rtol=0)
