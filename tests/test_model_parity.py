"""Parity with HF transformers (test-only oracle) on tiny random configs, through l2v's own loader."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from l2v.checkpoint import load_model, save_model  # noqa: E402
from l2v.objectives import mntp_loss  # noqa: E402

TOL = 1e-4
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
# Head dims that are not hidden_size / heads; windows shorter than the 11-token texts; soft-caps small
# enough to bite on tiny random weights; local and global layers in every two-layer Gemma 2/3.
GEMMA = dict(num_key_value_heads=2, head_dim=24, sliding_window=4, query_pre_attn_scalar=20)

CASES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama3_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "gqa_tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama_attn_bias": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=24, rope_theta=1e6)),
    "qwen3_window": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(  # layer 1 only: max_window_layers
            num_key_value_heads=2, head_dim=24, use_sliding_window=True, sliding_window=4, max_window_layers=1
        ),
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=24, hidden_act="gelu")),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(**GEMMA, attn_logit_softcapping=0.05, final_logit_softcapping=0.2),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            **GEMMA,
            sliding_window_pattern=2,
            rope_scaling=dict(rope_type="linear", factor=8.0),
            final_logit_softcapping=0.2,
        ),
    ),
}
NEW_FAMILIES = ["qwen3", "qwen3_window", "gemma", "gemma2", "gemma3"]


def hf_model(name, seed=0, **overrides):
    cfg_cls, model_cls, extra = CASES[name]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    # Random init leaves norms at 1 (Gemma: 0, for 1 + w), biases at 0: perturb them so every tensor matters.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def full_mask(T):
    # A 4D additive float mask of zeros: every token sees every token (a bool all-False mask would not).
    return torch.zeros(1, 1, T, T)


def hf_bidirectional(name, hf, ids):
    """HF's last hidden states with bidirectional attention. Gemma 3: transformers' own switch
    (`use_bidirectional_attention`, EmbeddingGemma's). Else a 4D additive mask of zeros (every token sees
    every token), and for Gemma 2's local layers the same symmetric window, spelled out:
    |i - j| <= window // 2."""
    if name.startswith("gemma3"):
        bi = hf_model(name, use_bidirectional_attention=True)
        bi.load_state_dict(hf.state_dict())
        return bi.model(ids).last_hidden_state
    T = ids.shape[1]
    mask = torch.zeros(1, 1, T, T)
    if name == "gemma2":
        i = torch.arange(T)
        local = (i[:, None] - i[None, :]).abs() <= hf.config.sliding_window // 2
        mask = {"full_attention": mask, "sliding_attention": mask.masked_fill(~local, float("-inf"))}
    return torch.cat(
        [hf.model(ids[i : i + 1], attention_mask=mask).last_hidden_state for i in range(len(ids))]
    )


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shard", [False, True])
def test_causal_and_bidirectional_match_hf(tmp_path, name, shard):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "10GB", safe_serialization=True)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 11), generator=g)
    labels = torch.where(torch.rand(2, 11, generator=g) < 0.4, ids, -100)
    with torch.no_grad():
        out = hf(ids, labels=labels, output_hidden_states=True)
        h = ours(ids, is_causal=True)
        torch.testing.assert_close(h, out.hidden_states[-1], atol=TOL, rtol=0)
        # MNTP's loss is HF's causal-LM loss (the same shift), with Gemma 2's final-logit soft-capping
        loss = mntp_loss(h, labels, ours.lm_head_weight, logit_softcap=ours.config.final_softcap)
        torch.testing.assert_close(loss, out.loss, atol=TOL, rtol=0)
        hb = ours(ids, is_causal=False)
        ref = hf_bidirectional(name, hf, ids)
        torch.testing.assert_close(hb, ref, atol=TOL, rtol=0)
    kind = "sharded" if shard else "single"
    print(
        f"parity {name} {kind}: causal {(h - out.hidden_states[-1]).abs().max():.1e}"
        f" bidirectional {(hb - ref).abs().max():.1e} mntp loss {(loss - out.loss).abs():.1e}"
    )


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


# ---- the families of issue #26: Qwen3, Gemma, Gemma 2, Gemma 3 ---------------------------------------


def test_windows_and_softcaps_matter(tmp_path):
    """Each switch the parity above relies on acts on these tiny models (else parity would prove nothing)."""
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(8))
    for name in ("qwen3_window", "gemma2", "gemma3"):
        hf_model(name).save_pretrained(tmp_path / name)
        model = load_model(tmp_path / name)
        with torch.no_grad():
            ref = {c: model(ids, is_causal=c) for c in (True, False)}
            for is_causal in (True, False) if name != "qwen3_window" else (True,):
                model.config.sliding_window = None
                changed = (model(ids, is_causal=is_causal) - ref[is_causal]).abs().max()
                assert changed > 1e-4, (name, is_causal)
                model.config.sliding_window = CASES[name][2]["sliding_window"]
            if name == "gemma2":
                for m in model.modules():
                    if hasattr(m, "softcap"):
                        m.softcap = None
                assert (model(ids) - ref[True]).abs().max() > 1e-4
                labels = ids.clone()
                assert (
                    abs(
                        mntp_loss(ref[True], labels, model.lm_head_weight, logit_softcap=0.2)
                        - mntp_loss(ref[True], labels, model.lm_head_weight)
                    )
                    > 1e-3
                )


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("name", NEW_FAMILIES + ["mistral_window"])
def test_packed_equals_each_text_alone(tmp_path, name, is_causal):
    """Three texts packed in one row and one padded row compute what each text computes alone, windows
    counted within each text (every text is longer than the window)."""
    hf = hf_model("mistral", sliding_window=4) if name == "mistral_window" else hf_model(name)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    g = torch.Generator().manual_seed(9)
    texts = [torch.randint(0, 128, (n,), generator=g) for n in (9, 5, 7, 8)]
    ids = torch.zeros(2, 21, dtype=torch.long)
    ids[0] = torch.cat(texts[:3])
    ids[1, 3:11] = texts[3]  # left and right padding
    segments = torch.tensor([[1] * 9 + [2] * 5 + [3] * 7, [0] * 3 + [1] * 8 + [0] * 10])
    with torch.no_grad():
        packed = model(ids, segments, is_causal=is_causal)
        alone = [model(t[None], is_causal=is_causal)[0] for t in texts]
    got = [packed[0, :9], packed[0, 9:14], packed[0, 14:], packed[1, 3:11]]
    diff = max((a - b).abs().max().item() for a, b in zip(got, alone))
    assert diff <= 1e-5, diff
    assert torch.isfinite(packed).all()


def test_bidirectional_flag_is_the_default_and_save_round_trips(tmp_path):
    """A config with `use_bidirectional_attention` (EmbeddingGemma) encodes bidirectionally by default, and
    `save_model` writes every new family so that transformers and l2v read it back to the same model."""
    hf = hf_model("gemma3", use_bidirectional_attention=True)
    hf.save_pretrained(tmp_path / "bi")
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(10))
    model = load_model(tmp_path / "bi")
    assert model.config.is_causal is False
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf.model(ids).last_hidden_state, atol=TOL, rtol=0)
    for name in NEW_FAMILIES:
        hf = hf_model(name)
        hf.save_pretrained(tmp_path / name)
        ours = load_model(tmp_path / name)
        save_model(ours, tmp_path / f"{name}-out")
        again = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / f"{name}-out", attn_implementation="eager"
        )
        reread = load_model(tmp_path / f"{name}-out")
        assert {**vars(reread.config), "extra": {}} == {**vars(ours.config), "extra": {}}, name
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(ids).logits, hf(ids).logits, atol=TOL, rtol=0)


def tiny_vision():
    return dict(
        hidden_size=32,
        image_size=28,
        intermediate_size=37,
        model_type="siglip_vision_model",
        num_attention_heads=2,
        num_hidden_layers=1,
        patch_size=14,
        vision_use_head=False,
    )


def hf_gemma3_multimodal(seed=0):
    text = dict(BASE, **GEMMA, sliding_window_pattern=2, rope_scaling=dict(rope_type="linear", factor=8.0))
    cfg = transformers.Gemma3Config(text_config=text, vision_config=tiny_vision(), mm_tokens_per_image=4)
    cfg._attn_implementation = cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("layout", ["language_model.model.", "model.language_model."])
def test_gemma3_multimodal_reads_the_text_part(tmp_path, layout):
    """model_type "gemma3": text_config and the language model's tensors, under the prefix transformers
    writes or the one of its module names; the vision tower and projector are skipped, nothing else is."""
    from safetensors.torch import load_file, save_file

    hf = hf_gemma3_multimodal()
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    assert any(k.startswith("vision_tower.") for k in tensors) and any(
        k.startswith("language_model.model.") for k in tensors
    )
    if layout == "model.language_model.":  # model.language_model.*, model.vision_tower.*, ...
        tensors = {
            "model." + k.replace("language_model.model.", "language_model.", 1): v for k, v in tensors.items()
        }
        save_file(tensors, path, metadata={"format": "pt"})
    ours = load_model(tmp_path)
    assert ours.config.model_type == "gemma3" and ours.config.local_rope_theta == 10000.0
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = hf.model.language_model(ids).last_hidden_state
        torch.testing.assert_close(ours(ids), ref, atol=TOL, rtol=0)
    save_model(ours, tmp_path / "text")  # the language model alone, as gemma3_text
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager")
    assert again.config.model_type == "gemma3_text"
    with torch.no_grad():
        torch.testing.assert_close(again.eval().model(ids).last_hidden_state, ref, atol=TOL, rtol=0)
    save_file({**tensors, "stray.weight": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 unexpected \[stray\.weight\]"):
        load_model(tmp_path)


def test_gemma_precision_in_bf16(tmp_path):
    """Gemma's bf16 details as transformers': sqrt(D) rounded to the weights' dtype before it scales the
    embeddings (bit-equal), and RMSNorm's (1 + w) applied in float32 before the cast back (Llama casts
    first). l2v's mean square comes from `vector_norm` (saves memory in the backward), which differs from
    HF's in float32 rounding only: at most one bf16 step, on a few elements in 10^5."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from l2v.model import RMSNorm

    hf = hf_model("gemma", hidden_size=96)  # sqrt(96) is not a bf16 number
    hf.save_pretrained(tmp_path)
    ours, hf = load_model(tmp_path, dtype="bfloat16"), hf.to(torch.bfloat16)
    seen = []
    ours.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ours(ids)
        assert torch.equal(seen[0], hf.model.embed_tokens(ids))
        x = (torch.randn(64, 3072, generator=torch.Generator().manual_seed(13)) * 3).to(torch.bfloat16)
        w = torch.randn(3072, generator=torch.Generator().manual_seed(14)) * 0.1
        ref, norm = GemmaRMSNorm(3072, eps=1e-6), RMSNorm(3072, 1e-6, offset=True)
        ref.weight.copy_(w)
        norm.weight.copy_(w)
        ref, norm = ref.to(torch.bfloat16), norm.to(torch.bfloat16)
        a, b = norm(x), ref(x)
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        cast_first = (1 + norm.weight) * normed.to(torch.bfloat16)  # Llama's order
    ulp = 2.0 ** (torch.floor(torch.log2(b.float().abs())) - 7)
    assert ((a.float() - b.float()).abs() <= ulp).all() and (a != b).float().mean() < 1e-4
    assert (cast_first != b).float().mean() > 0.05  # the order is what the test tells apart
