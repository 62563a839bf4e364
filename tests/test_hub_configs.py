"""config.json files laid out as the hub has them for each new family (the original releases' legacy keys
and later files' layer_types; transformers 5's own layout is test_model_parity's path), with sizes shrunk:
l2v reads each one as transformers does (the oracle reads the same folder)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from l2v.checkpoint import load_model  # noqa: E402

TOL = 1e-4
SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, vocab_size=128)
GEMMA_COMMON = dict(
    attention_bias=False,
    attention_dropout=0.0,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
    initializer_range=0.02,
    rms_norm_eps=1e-06,
    use_cache=True,
    **SMALL,
)
GEMMA3_COMMON = dict(
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    head_dim=24,
    hidden_activation="gelu_pytorch_tanh",
    model_type="gemma3_text",
    num_key_value_heads=1,
    query_pre_attn_scalar=24,
    rope_local_base_freq=10000.0,
    rope_scaling=None,
    rope_theta=1000000.0,
    **GEMMA_COMMON,
)
HUB = {
    # Qwen3-8B: head_dim 128 of 4096 / 32, untied, rope_scaling null, no window on any layer
    "qwen3-8b": dict(
        architectures=["Qwen3ForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=151645,
        head_dim=24,
        hidden_act="silu",
        initializer_range=0.02,
        max_position_embeddings=40960,
        max_window_layers=2,
        model_type="qwen3",
        num_hidden_layers=2,
        num_key_value_heads=2,
        rms_norm_eps=1e-06,
        rope_scaling=None,
        rope_theta=1000000,
        sliding_window=None,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        transformers_version="4.51.0",
        use_cache=True,
        use_sliding_window=False,
        **SMALL,
    ),
    # gemma-7b: "gelu" meaning the tanh form, no tie_word_embeddings key (tied), head_dim 256 of 3072 / 16
    "gemma-7b": dict(
        architectures=["GemmaForCausalLM"],
        head_dim=24,
        hidden_act="gelu",
        max_position_embeddings=8192,
        model_type="gemma",
        num_hidden_layers=2,
        num_key_value_heads=4,
        rope_scaling=None,
        rope_theta=10000.0,
        torch_dtype="bfloat16",
        transformers_version="4.38.0.dev0",
        **GEMMA_COMMON,
    ),
    # gemma-2-9b: both activation keys, soft-caps, query_pre_attn_scalar, the hybrid cache's window keys
    "gemma-2-9b": dict(
        architectures=["Gemma2ForCausalLM"],
        attn_logit_softcapping=0.05,
        cache_implementation="hybrid",
        final_logit_softcapping=0.2,
        head_dim=24,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        model_type="gemma2",
        num_hidden_layers=2,
        num_key_value_heads=2,
        query_pre_attn_scalar=20,
        rope_theta=10000.0,
        sliding_window=4,
        sliding_window_size=4,
        torch_dtype="float32",
        transformers_version="4.42.0.dev0",
        **GEMMA_COMMON,
    ),
    # gemma-3-1b-it: sliding_window_pattern, rope_local_base_freq, null soft-caps
    "gemma-3-1b": dict(
        GEMMA3_COMMON,
        architectures=["Gemma3ForCausalLM"],
        cache_implementation="hybrid",
        eos_token_id=[1, 106],
        max_position_embeddings=32768,
        num_hidden_layers=3,
        rope_local_base_freq=10000,
        rope_theta=1000000,
        sliding_window=4,
        sliding_window_pattern=3,
        torch_dtype="bfloat16",
        transformers_version="4.50.0.dev0",
    ),
    # gemma-3-270m: layer_types (and the private _sliding_window_pattern), the bidirectional flag off
    "gemma-3-270m": dict(
        GEMMA3_COMMON,
        _sliding_window_pattern=6,
        architectures=["Gemma3ForCausalLM"],
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=32768,
        num_hidden_layers=3,
        sliding_window=4,
        torch_dtype="bfloat16",
        transformers_version="4.55.0.dev0",
        use_bidirectional_attention=False,
    ),
    # embeddinggemma-300m: a bidirectional Gemma 3 saved from the bare model (tensor names without `model.`)
    "embeddinggemma-300m": dict(
        GEMMA3_COMMON,
        architectures=["Gemma3TextModel"],
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=2048,
        num_hidden_layers=2,
        sliding_window=6,
        torch_dtype="float32",
        transformers_version="4.57.0.dev0",
        use_bidirectional_attention=True,
    ),
    # gemma-3-4b: multimodal; text_config holds only what differs from Gemma3TextConfig's defaults (8 heads,
    # 4 KV heads, pattern 6, the RoPE bases, ...), RoPE scaling for the global layers
    "gemma-3-4b": dict(
        architectures=["Gemma3ForConditionalGeneration"],
        boi_token_index=255999,
        eoi_token_index=256000,
        eos_token_id=[1, 106],
        image_token_index=262144,
        initializer_range=0.02,
        mm_tokens_per_image=4,
        model_type="gemma3",
        torch_dtype="bfloat16",
        transformers_version="4.50.0.dev0",
        text_config=dict(
            head_dim=16,
            hidden_size=64,
            intermediate_size=96,
            model_type="gemma3_text",
            num_hidden_layers=6,
            rope_scaling={"factor": 8.0, "rope_type": "linear"},
            sliding_window=4,
            vocab_size=128,
        ),
        vision_config=dict(
            hidden_size=32,
            image_size=28,
            intermediate_size=37,
            num_attention_heads=2,
            model_type="siglip_vision_model",
            num_hidden_layers=1,
            patch_size=14,
            vision_use_head=False,
        ),
    ),
}
HUB["gemma-1.1-7b"] = {**HUB["gemma-7b"], "hidden_activation": "gelu_pytorch_tanh"}  # updated files: both
# Qwen3-Embedding-8B: Qwen3-8B's file with a window size beside use_sliding_window false, weights saved from
# the bare Qwen3Model (no `model.` prefix) in shards: untied, so no LM head at all; 0.6B: the same, tied
HUB["qwen3-embedding-8b"] = {
    **HUB["qwen3-8b"],
    "max_window_layers": 1,
    "sliding_window": 4,
    "transformers_version": "4.51.3",
}
HUB["qwen3-embedding-0.6b"] = {**HUB["qwen3-embedding-8b"], "tie_word_embeddings": True}
# The class the weights were saved from and the shard size, where not architectures[0] and one file
SAVED_AS = {"qwen3-embedding-8b": ("Qwen3Model", "20KB"), "qwen3-embedding-0.6b": ("Qwen3Model", None)}
# Files holding RoPE in both transformers 4's flat keys and 5's rope_parameters, values differing: each is
# read as transformers 5 reads it (a dict's own rope_theta first; rope_scaling merged into the global dict)
HUB["rope-both-qwen3"] = {**HUB["qwen3-8b"], "rope_parameters": {"rope_type": "default", "rope_theta": 5e3}}
HUB["rope-both-gemma3"] = {
    **HUB["gemma-3-270m"],
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 5e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
    },
    "rope_scaling": {"rope_type": "linear", "factor": 4.0},
}
UNTIED = ("qwen3-8b", "qwen3-embedding-8b", "rope-both-qwen3")


def hub_folder(tmp_path, hub: dict, saved_as=None, shard_size=None):
    """`hub` as config.json beside random weights that transformers writes for the model it describes."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hub))
    cfg = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = getattr(transformers, saved_as or hub["architectures"][0])(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, max_shard_size=shard_size or "10GB")
    if shard_size:
        assert (folder / "model.safetensors.index.json").is_file()
    (folder / "config.json").write_text(json.dumps(hub))  # as the hub has it, not as transformers 5 writes it
    return folder


@pytest.mark.parametrize("name", list(HUB))
def test_hub_config_reads_as_transformers_reads_it(tmp_path, name):
    hub = HUB[name]
    saved_as, shard_size = SAVED_AS.get(name, (None, None))
    folder = hub_folder(tmp_path, hub, saved_as, shard_size)
    arch = saved_as or hub["architectures"][0]
    ref_model = (
        getattr(transformers, arch)
        .from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        .eval()
    )
    if not arch.endswith("Model"):  # the text model inside: *ForCausalLM's, or the multimodal one's
        ref_model = ref_model.model
    if arch == "Gemma3ForConditionalGeneration":
        ref_model = ref_model.language_model
    ours = load_model(folder)  # bidirectional by default where the file says so, as transformers
    cfg = ours.config
    assert cfg.is_causal == (name != "embeddinggemma-300m")
    assert cfg.tie_word_embeddings == (name not in UNTIED)
    headless = saved_as is not None and not cfg.tie_word_embeddings  # encodes; MNTP is refused
    assert cfg.has_lm_head != headless and (ours.lm_head is None) == (cfg.tie_word_embeddings or headless)
    if headless:
        with pytest.raises(ValueError, match="no LM head"):
            _ = ours.lm_head_weight
    assert cfg.act == ("silu" if cfg.model_type == "qwen3" else "gelu_pytorch_tanh")
    if name.startswith("gemma-3"):
        assert cfg.local_rope_theta == 10000.0 and cfg.rope_theta == 1e6
        assert "full_attention" in cfg.layer_types and "sliding_attention" in cfg.layer_types
    if name == "rope-both-gemma3":
        assert (cfg.rope_theta, cfg.local_rope_theta, cfg.rope_scaling["factor"]) == (5e5, 500.0, 4.0)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - ref_model(ids).last_hidden_state).abs().max().item()
    assert diff <= TOL, diff
