"""l2v.lora: LoRA math on tiny random Llamas, PEFT format round trips (peft is a test-only oracle), errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

transformers = pytest.importorskip("transformers")

from l2v.adapters import load_adapter, lora_state_dict, save_adapter
from l2v.checkpoint import load_model  # noqa: E402
from l2v.lora import LoRALinear, add_lora, lora_modules, lora_parameters, merge_lora

TOL = 1e-4
CFG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
N_TARGETS = 7 * CFG["num_hidden_layers"]


def hf_llama(seed=0):
    cfg = transformers.LlamaConfig(**CFG)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def base_dir(tmp_path):
    hf_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def ids(T=9, B=2, seed=1):
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize(model, std=0.05, seed=2):
    g = torch.Generator().manual_seed(seed)
    for p in lora_parameters(model):
        p.copy_(torch.randn(p.shape, generator=g) * std)


def test_zero_B_is_the_base_model_even_with_dropout(base_dir):
    base = load_model(base_dir)
    model = load_model(base_dir)
    paths = add_lora(model, r=4, alpha=8, dropout=0.5)
    assert len(paths) == N_TARGETS and all(isinstance(m, LoRALinear) for m in lora_modules(model).values())
    assert set(model.state_dict()) - set(base.state_dict()) == {
        k for p in paths for k in (f"{p}.lora_A.weight", f"{p}.lora_B.weight")
    }
    x = ids()
    with torch.no_grad():
        ref = base(x)
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
        model.train()  # dropout 0.5 is active, but only on the LoRA branch, which B = 0 silences
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
        randomize(model)
        assert (model(x) - model(x)).abs().max() > 0  # ... and it really is active on that branch


def test_merge_unmerge_and_merge_lora(base_dir):
    model = load_model(base_dir)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, r=4, alpha=8)
    randomize(model)
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - load_model(base_dir)(x)).abs().max() > 1e-3
        for m in lora_modules(model).values():
            m.merge()
        model.eval()  # must not change anything: merging is explicit only
        assert all(m.merged for m in lora_modules(model).values())
        diff = (model(x) - unmerged).abs().max().item()
        assert diff <= 1e-5, diff
        for m in lora_modules(model).values():
            m.merge(-1)
        wdiff = max((model.state_dict()[k] - v).abs().max().item() for k, v in base_sd.items())
        assert wdiff <= 1e-6, wdiff  # float32 rounding of W + D - D
        assert (model(x) - unmerged).abs().max().item() <= 1e-5
        merge_lora(model)
        assert not lora_modules(model) and set(model.state_dict()) == set(base_sd)
        assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)
        diff2 = (model(x) - unmerged).abs().max().item()
        assert diff2 <= 1e-5, diff2
    print(f"merged vs unmerged {diff:.2e}; unmerge weight error {wdiff:.2e}; merge_lora {diff2:.2e}")


def test_only_lora_parameters_train(base_dir):
    model = load_model(base_dir).train()
    add_lora(model, r=4, alpha=8, dropout=0.1)
    randomize(model)
    model(ids()).pow(2).mean().backward()
    lora = {id(p) for p in lora_parameters(model)}
    assert len(lora) == 2 * N_TARGETS
    for name, p in model.named_parameters():
        if id(p) in lora:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    with pytest.raises(ValueError, match="match no linear layer"):
        add_lora(load_model(base_dir), targets=("nope",))


def test_bf16_base_with_fp32_lora(base_dir):
    model = load_model(base_dir, dtype="bfloat16").train()
    add_lora(model, r=4, alpha=8, dropout=0.0)
    randomize(model)
    m = model.layers[0].self_attn.q_proj
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(ids())
    assert h.dtype == torch.bfloat16
    h.float().pow(2).mean().backward()
    assert m.lora_A.weight.grad.dtype == torch.float32 and m.lora_B.weight.grad.abs().sum() > 0
    with torch.no_grad():
        plain = model(ids())  # bf16 input, no autocast: the LoRA path computes in bf16
        merge_lora(model)
        assert (model(ids()).float() - plain.float()).abs().max() < 0.1  # bf16 rounding of the merge


def test_l2v_adapter_loads_in_peft_and_back(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    import torch.distributed.tensor  # noqa: F401  (peft 0.21.2 on torch 2.13 needs it imported first)

    model = load_model(base_dir)
    paths = add_lora(model, r=4, alpha=12, dropout=0.05, targets=("q_proj", "v_proj", "down_proj"))
    randomize(model)
    folder = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (
        cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
        and cfg["r"] == 4
        and cfg["lora_alpha"] == 12
    )
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert keys == set(lora_state_dict(model))
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    x = ids()
    with torch.no_grad():
        ours = merge_lora(model)(x, is_causal=True)
        # peft on the bare LlamaModel, as llm2vec wraps it
        theirs = peft.PeftModel.from_pretrained(hf_llama().model, folder).eval()
        diff = (theirs(input_ids=x).last_hidden_state - ours).abs().max().item()
        assert diff <= TOL, diff
        again = load_model(base_dir)
        assert load_adapter(again, folder) == sorted(paths)
        torch.testing.assert_close(again(x, is_causal=True), ours, atol=1e-6, rtol=0)
    print(f"l2v adapter -> peft: max diff {diff:.2e}")


@pytest.mark.parametrize("wrap", ["causal_lm", "bare", "rslora_patterns"])
def test_peft_adapter_loads_in_l2v(base_dir, tmp_path, wrap):
    peft = pytest.importorskip("peft")
    import torch.distributed.tensor  # noqa: F401

    hf = hf_llama()
    kw = dict(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    if wrap == "rslora_patterns":
        kw.update(
            use_rslora=True,
            rank_pattern={"layers.1.mlp.up_proj": 2, "o_proj": 4},
            alpha_pattern={"k_proj": 3.0},
        )
    pm = peft.get_peft_model(hf.model if wrap == "bare" else hf, peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(tmp_path / "peft")
    prefix = "base_model.model.layers." if wrap == "bare" else "base_model.model.model.layers."
    assert all(k.startswith(prefix) for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    x = ids()
    with torch.no_grad():
        ref = (
            pm(input_ids=x) if wrap == "bare" else pm.base_model.model.model(input_ids=x)
        ).last_hidden_state
        for merge in (True, False):
            model = load_model(base_dir)
            assert len(load_adapter(model, tmp_path / "peft", merge=merge)) == N_TARGETS
            assert bool(lora_modules(model)) is not merge
            diff = (model(x, is_causal=True) - ref).abs().max().item()
            assert diff <= TOL, (merge, diff)
            print(f"peft ({wrap}) -> l2v merge={merge}: max diff {diff:.2e}")
        if wrap == "rslora_patterns":
            m = model.layers[1].mlp.up_proj
            assert m.r == 2 and m.scaling == pytest.approx(16 / 2**0.5)
            assert model.layers[0].self_attn.k_proj.scaling == pytest.approx(3 / 8**0.5)


def test_oracle_adapter_loads_onto_demo_model(demo_model_dir, oracle_dir):
    folder = oracle_dir / "peft_adapter"
    tensors = load_file(folder / "adapter_model.safetensors")
    assert len(tensors) == 420
    x = torch.tensor([[1, 504, 3458, 314, 2023, 30, 2]])
    with torch.no_grad():
        merged = load_model(demo_model_dir, is_causal=False)
        unmerged = copy.deepcopy(merged)  # cheaper than reading the checkpoint twice
        w0 = merged.layers[3].mlp.down_proj.weight.clone()
        paths = load_adapter(merged, folder, merge=True)
        assert not lora_modules(merged)
        # every file tensor consumed: 2 per adapted module, each under the key we derive for it
        assert {f"base_model.model.{p}.lora_{ab}.weight" for p in paths for ab in "AB"} == set(tensors)
        B, A = (
            tensors["base_model.model.layers.3.mlp.down_proj.lora_B.weight"],
            tensors["base_model.model.layers.3.mlp.down_proj.lora_A.weight"],
        )
        torch.testing.assert_close(merged.layers[3].mlp.down_proj.weight, w0 + 2.0 * B @ A, atol=1e-6, rtol=0)
        load_adapter(unmerged, folder, merge=False)
        mods = lora_modules(unmerged)
        assert len(mods) == 210 and all(m.scaling == 2.0 and m.r == 8 for m in mods.values())
        sd = lora_state_dict(unmerged)
        assert set(sd) == set(tensors) and all(torch.equal(sd[k], tensors[k]) for k in tensors)
        diff = (merged(x) - unmerged(x)).abs().max().item()
        assert diff <= 1e-3, diff
    print(f"oracle adapter merged vs unmerged on demo model: max diff {diff:.2e}")


# ---- errors: each names the offending file ---------------------------------------------------------


@pytest.fixture
def adapter_dir(base_dir, tmp_path):
    model = load_model(base_dir)
    add_lora(model, r=4, alpha=8)
    return save_adapter(model, tmp_path / "adapter")


def rewrite(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)
    return path


def test_missing_or_bad_config(base_dir, adapter_dir):
    cfg = adapter_dir / "adapter_config.json"
    text = cfg.read_text()
    cfg.write_text(text[:-5])
    with pytest.raises(ValueError, match="adapter_config.json: malformed JSON"):
        load_adapter(load_model(base_dir), adapter_dir)
    cfg.write_text(json.dumps({**json.loads(text), "use_dora": True}))
    with pytest.raises(ValueError, match=r"adapter_config.json: unsupported LoRA option.*use_dora"):
        load_adapter(load_model(base_dir), adapter_dir)
    cfg.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json: file not found"):
        load_adapter(load_model(base_dir), adapter_dir)
    cfg.write_text(text)
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: file not found"):
        load_adapter(load_model(base_dir), adapter_dir)


def test_unexpected_key(base_dir, adapter_dir):
    def extra_layer(t):
        for ab in "AB":
            t[f"base_model.model.layers.7.self_attn.q_proj.lora_{ab}.weight"] = t[
                f"base_model.model.layers.0.self_attn.q_proj.lora_{ab}.weight"
            ].clone()

    rewrite(adapter_dir, extra_layer)
    model = load_model(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: 2 key\(s\) match no linear.*layers\.7"):
        load_adapter(model, adapter_dir)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched on failure


def test_shape_mismatch_and_missing_half(base_dir, adapter_dir):
    key = "base_model.model.layers.1.mlp.down_proj.lora_A.weight"
    rewrite(adapter_dir, lambda t: t.update({key: torch.zeros(4, 64)}))  # down_proj's input is 96 wide
    with pytest.raises(
        ValueError, match=r"adapter_model.safetensors: shape mismatch for layers\.1\.mlp\.down"
    ):
        load_adapter(load_model(base_dir), adapter_dir)
    rewrite(adapter_dir, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: module\(s\) with only one of"):
        load_adapter(load_model(base_dir), adapter_dir, merge=False)


def test_keep_mask_statistics_and_seed():
    """LoRA dropout's mask: keep rate 1 - p (p rounded to 1/65536), every 16-bit lane of a draw uniform,
    a function of the seed alone; LoRALinear scales the kept values by the exact 1 / keep rate."""
    from l2v.lora import keep_mask

    x = torch.ones(1001, 999)  # odd sizes: the mask is cut from 64-bit words
    keep = keep_mask(x, 0.05, seed=7)
    n, rate = keep.numel(), keep.float().mean().item()
    assert keep.shape == x.shape and keep.dtype == torch.bool
    assert abs(rate - (1 - 3277 / 65536)) < 4 * (0.05 * 0.95 / n) ** 0.5  # within 4 standard errors
    lanes = keep.flatten()[: n - n % 4].view(-1, 4).float().mean(0)
    assert (lanes - rate).abs().max() < 5 * (0.05 * 0.95 / (n / 4)) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(keep_mask(x, 0.05, seed=7), keep) and not torch.equal(keep_mask(x, 0.05, seed=8), keep)
    assert LoRALinear(nn.Linear(4, 4), r=2, alpha=4, dropout=0.05).keep_scale == 65536 / (65536 - 3277)
    with pytest.raises(ValueError, match="dropout probability"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=4, dropout=1.0)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
        ),
    ],
)
@pytest.mark.parametrize(
    "dtype,autocast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)]
)
def test_dropped_linear_is_exactly_the_masked_linear(dtype, autocast, device):
    """The backward draws the mask again from the seed: output and both gradients equal autograd's on
    F.linear(x * mask, a), bit for bit on the CPU, also under bf16 autocast (fp32 inputs, bf16 matmuls)."""
    from l2v.lora import DroppedLinear, keep_mask

    torch.manual_seed(0)
    x, a, g = (torch.randn(*s, dtype=dtype, device=device) for s in ((3, 7, 33), (5, 33), (3, 7, 5)))
    grads = []
    for fn in (
        lambda x, a: DroppedLinear.apply(x, a, 0.3, 123),
        lambda x, a: F.linear(x * keep_mask(x, 0.3, 123), a),
    ):
        xi, ai = x.clone().requires_grad_(), a.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            y = fn(xi, ai)
        grads.append((y, *torch.autograd.grad(y, (xi, ai), g.to(y.dtype))))
    for mine, ref in zip(*grads):
        assert mine.dtype == ref.dtype
        assert (
            torch.equal(mine, ref)
            if device == "cpu"
            else torch.allclose(mine.float(), ref.float(), rtol=1e-2, atol=1e-2)
        )
    assert (
        grads[0][1].dtype == dtype and (grads[0][1] == 0).float().mean() > 0.2
    )  # the mask reached x's gradient


def test_lora_dropout_keeps_no_extra_activations(base_dir):
    """What the backward keeps: with LoRA dropout on, no more bytes than with it off (no masked copy of
    each projection's input, no mask): the projections that share an input share one saved tensor."""

    def saved_bytes(dropout: float) -> tuple[int, float]:
        torch.manual_seed(0)
        model = load_model(base_dir).train()
        add_lora(model, r=4, alpha=8, dropout=dropout)
        with torch.no_grad():
            randomize(model)
        params, seen = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids()).pow(2).mean()
        loss.backward()
        assert all(p.grad.abs().sum() > 0 for p in lora_parameters(model))
        return sum(seen.values()), loss.item()

    (dropped, loss), (plain, plain_loss) = saved_bytes(0.1), saved_bytes(0.0)
    assert dropped == plain and loss != plain_loss  # the same bytes, though dropout acted


# ---- issue #26's families: PEFT adapters interchangeable both ways --------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(model, folder, seed=3):
    """A PEFT LoRA on `model` (the seven projections, random A and B), saved to `folder`."""
    peft = pytest.importorskip("peft")
    import torch.distributed.tensor  # noqa: F401  (peft 0.21.2 on torch 2.13 needs it imported first)

    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(folder)
    return pm.eval()


@pytest.mark.parametrize("name", ["qwen3", "gemma", "gemma2", "gemma3", "gemma3_multimodal"])
def test_peft_round_trip_new_families(tmp_path, name):
    """An adapter peft trains on the transformers model loads in l2v with equal outputs (merged or not), and
    an l2v adapter loads in peft (on the bare model, as llm2vec's) with equal outputs. Multimodal Gemma 3:
    peft also adapts the vision tower's q/k/v, which l2v skips with the tower; the text part is equal."""
    peft = pytest.importorskip("peft")
    from test_model_parity import hf_gemma3_multimodal, hf_model

    hf = hf_gemma3_multimodal() if name == "gemma3_multimodal" else hf_model(name)
    hf.save_pretrained(tmp_path / "base")
    text_model = (lambda m: m.model.language_model) if name == "gemma3_multimodal" else (lambda m: m.model)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    pm = peft_adapter(hf, tmp_path / "peft")
    keys = set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert (name != "gemma3_multimodal") or any("vision" in k for k in keys)
    with torch.no_grad():
        ref = text_model(pm.base_model.model)(input_ids=x).last_hidden_state
        for merge in (True, False):
            model = load_model(tmp_path / "base")
            assert len(load_adapter(model, tmp_path / "peft", merge=merge)) == N_TARGETS
            diff = (model(x, is_causal=True) - ref).abs().max().item()
            assert diff <= TOL, (merge, diff)
    print(f"peft -> l2v ({name}): max diff {diff:.2e}")

    model = load_model(tmp_path / "base")
    add_lora(model, r=4, alpha=12, dropout=0.05)
    randomize(model)
    folder = save_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny")
    base = hf_gemma3_multimodal() if name == "gemma3_multimodal" else hf_model(name)
    with torch.no_grad():
        ours = merge_lora(model)(x, is_causal=True)
        theirs = peft.PeftModel.from_pretrained(text_model(base), folder).eval()
        diff = (theirs(input_ids=x).last_hidden_state - ours).abs().max().item()
    assert diff <= TOL, diff
    print(f"l2v -> peft ({name}): max diff {diff:.2e}")
