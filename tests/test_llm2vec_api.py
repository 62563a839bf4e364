"""`from l2v import LLM2Vec`: upstream llm2vec's API over Encoder (l2v/llm2vec.py).

The pinned matrices are upstream's own output: llm2vec 0.2.3 with transformers 4.44.2 (bench/.peer-venv,
`bash bench/setup_peer.sh`), float32 on CPU, the demo model folder, the snippet of upstream's README with
`device_map="cpu", torch_dtype=torch.float32`.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_model
from safetensors.numpy import load_file

from l2v import LLM2Vec
from l2v.encoder import Encoder

INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query:"
QUERIES = [[INSTRUCTION, "how much protein should a female eat"], [INSTRUCTION, "summit define"]]
DOCUMENTS = [  # upstream README's two documents
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams "
    "per day. But, as you can see from this chart, you'll need to increase that if you're expecting or "
    "training for a marathon. Check out the chart below to see how much protein you should be eating each "
    "day.",
    "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a "
    "mountain. : 2  the highest level. : 3  a meeting or series of meetings between the leaders of two or "
    "more governments.",
]
# Upstream on the demo folder as it is: its llm2vec_config.json says last_token; bidirectional; no prompt.
UPSTREAM_SEED = [[0.52689838, 0.54088438], [0.19517592, 0.43807772]]
UPSTREAM_SEED_MEAN = [[0.66732895, 0.42432165], [0.58207363, 0.67264533]]  # pooling_mode="mean"
# The oracle's PEFT adapter in an MNTP-style repository folder (adapter + config.json + tokenizer,
# base_model_name_or_path = the demo model, llm2vec_config.json mean) given as the base model.
UPSTREAM_SEED_ADAPTER_REPO = [[0.66851079, 0.43723437], [0.58234715, 0.67162794]]
# The demo folder with config.json's _name_or_path = "Qwen/Qwen2-7B-Instruct": upstream's ChatML template.
UPSTREAM_SEED_QWEN_NAME = {
    "mean": [[0.66894293, 0.51455557], [0.66705161, 0.76652551]],
    "eos_token": [[0.94715393, 0.94476449], [0.87493533, 0.86854297]],
}


def seed_matrix(l2v):
    """Upstream README's snippet, unchanged but for the import."""
    q_reps = l2v.encode(QUERIES)
    d_reps = l2v.encode(DOCUMENTS)
    q_reps_norm = torch.nn.functional.normalize(q_reps, p=2, dim=1)
    d_reps_norm = torch.nn.functional.normalize(d_reps, p=2, dim=1)
    return torch.mm(q_reps_norm, d_reps_norm.transpose(0, 1))


def copy_model(src, dst, config_edit=None):
    """A model folder: weights linked, small files copied (and config.json edited)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f.resolve())
        else:
            shutil.copy(f, dst / f.name)
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config_edit}))
    return dst


def test_import_stays_light():
    code = (
        "import sys, l2v; assert 'torch' not in sys.modules; from l2v import LLM2Vec; "
        "assert not {'mteb', 'huggingface_hub', 'transformers', 'peft'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    return LLM2Vec.from_pretrained(demo_model_dir, device_map="cpu", torch_dtype=torch.float32)


def test_seed_snippet_matches_upstream(demo):
    assert (demo.pooling_mode, demo.model.config.is_causal) == ("last_token", False)
    assert demo.encoder.prompt is None
    sim = seed_matrix(demo)
    assert sim.dtype == torch.float32 and sim.shape == (2, 2)
    np.testing.assert_allclose(sim.numpy(), UPSTREAM_SEED, atol=2e-5)
    demo.pooling_mode = "mean"  # upstream's attribute, settable
    try:
        np.testing.assert_allclose(seed_matrix(demo).numpy(), UPSTREAM_SEED_MEAN, atol=2e-5)
    finally:
        demo.pooling_mode = "last_token"


def test_oracle_embeddings(demo_model_dir, oracle_dir):
    """Upstream's LLM2Vec.encode outputs (../shared/reference/oracle), a few short inputs per setting."""
    recs = json.loads((oracle_dir / "embeddings.json").read_text(encoding="utf-8"))
    recs = recs["inputs"]["standard.pairs"]
    idx = [i for i, r in enumerate(recs) if r["seq_len"] <= 40][:6]
    pairs = [[recs[i]["instruction"], recs[i]["text"]] for i in idx]
    ref = load_file(oracle_dir / "embeddings.safetensors")
    l2v = LLM2Vec.from_pretrained(demo_model_dir, pooling_mode="mean")
    for bidirectional, mode in [(True, "mean"), (False, "weighted_mean")]:
        if not bidirectional:  # what enable_bidirectional=False builds, without loading the model again
            l2v.model.config.is_causal, l2v.pooling_mode = True, mode
        ours = l2v.encode(pairs, batch_size=8, show_progress_bar=False, convert_to_numpy=True)
        want = ref[f"{'bidir' if bidirectional else 'causal'}.{mode}.pairs.bs1"][idx]
        cos = (ours * want).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() >= 0.99999, (bidirectional, mode, cos)


def test_adapter_repository_as_base(demo_model_dir, oracle_dir, tmp_path):
    """The published `...-mntp` repos are adapters: the base model comes from their adapter_config.json."""
    repo = tmp_path / "mntp-like"
    repo.mkdir()
    shutil.copy(oracle_dir / "peft_adapter" / "adapter_model.safetensors", repo)
    cfg = json.loads((oracle_dir / "peft_adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(demo_model_dir)
    (repo / "adapter_config.json").write_text(json.dumps(cfg))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(demo_model_dir / f, repo)
    (repo / "llm2vec_config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    l2v = LLM2Vec.from_pretrained(str(repo), device_map="cpu", torch_dtype=torch.float32)
    assert l2v.pooling_mode == "mean"  # the repository's llm2vec_config.json
    np.testing.assert_allclose(seed_matrix(l2v).numpy(), UPSTREAM_SEED_ADAPTER_REPO, atol=2e-5)


def test_chat_template_as_upstream(demo):
    """What LLM2Vec builds for a base model named Qwen/Qwen2-7B-Instruct (test_chat_template_by_hub_name),
    on the demo model's weights."""
    enc = demo.encoder
    named = LLM2Vec(Encoder(enc.model, enc.tokenizer, chat_template="chatml", upstream_template=True))
    for mode in ("mean", "eos_token"):
        named.pooling_mode = mode
        np.testing.assert_allclose(seed_matrix(named).numpy(), UPSTREAM_SEED_QWEN_NAME[mode], atol=2e-5)


@pytest.mark.parametrize(
    "name,template",
    [
        ("Qwen/Qwen2-7B-Instruct", "chatml"),
        ("Qwen/Qwen2-7B", None),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
    ],
)
def test_chat_template_by_hub_name(tiny_dir, tmp_path, name, template):
    folder = copy_model(tiny_dir, tmp_path / "named", {"_name_or_path": name})
    assert LLM2Vec.from_pretrained(folder).encoder.chat_template == template


# ---- on the tiny model: semantics and arguments


@pytest.fixture(scope="module")
def tiny_l2v_dir(tmp_path_factory, tiny_dir):
    """The tiny model with l2v's own settings (causal, a prompt) and upstream's (weighted_mean)."""
    folder = copy_model(tiny_dir, tmp_path_factory.mktemp("tiny-settings") / "m")
    (folder / "encoder_config.json").write_text(json.dumps({"is_causal": True, "prompt": 'Say "{text}"'}))
    (folder / "llm2vec_config.json").write_text(
        json.dumps({"pooling_mode": "weighted_mean", "max_length": 64})
    )
    return folder


def test_upstream_settings_only(tiny_l2v_dir):
    l2v = LLM2Vec.from_pretrained(tiny_l2v_dir)
    enc = l2v.encoder
    assert (enc.pooling, enc.max_length, enc.doc_max_length, enc.skip_instruction) == (
        "weighted_mean",
        64,
        400,
        True,
    )
    assert (enc.model.config.is_causal, enc.prompt, enc.autocast, enc.chat_template) == (
        False,
        None,
        None,
        None,
    )
    assert next(enc.model.parameters()).dtype == torch.float32
    l2v = LLM2Vec.from_pretrained(
        tiny_l2v_dir,
        enable_bidirectional=False,
        pooling_mode="mean",
        max_length=None,
        torch_dtype="auto",
        attn_implementation="flash_attention_2",
    )
    assert (l2v.pooling_mode, l2v.max_length, l2v.model.config.is_causal) == ("mean", 64, True)
    assert next(l2v.model.parameters()).dtype == torch.float32  # save_model wrote float32: "auto" reads it
    assert (
        next(LLM2Vec.from_pretrained(tiny_l2v_dir, torch_dtype=torch.bfloat16).model.parameters()).dtype
        == torch.bfloat16
    )


def test_encode_semantics(tiny_l2v_dir):
    l2v = LLM2Vec.from_pretrained(tiny_l2v_dir, device_map="cpu")
    texts = ["A cat sits on the mat.", "Dogs run in the park.", "summit define", "A cat sits on the mat."]
    out = l2v.encode(texts, show_progress_bar=False)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (4, 64)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out[0], out[3], rtol=0, atol=1e-5)
    assert isinstance(l2v.encode(texts, convert_to_numpy=True), np.ndarray)
    assert isinstance(l2v.encode(texts, convert_to_numpy=True, convert_to_tensor=True), torch.Tensor)
    for bs in (1, 3):  # a memory bound only: packing keeps the embeddings
        torch.testing.assert_close(l2v.encode(texts, batch_size=bs), out, rtol=0, atol=1e-5)
    pairs = [["Retrieve it:", t] for t in texts]
    mixed = l2v.encode([pairs[0], texts[1], ("Retrieve it:", texts[2]), ["Retrieve it:", texts[3], 7]])
    torch.testing.assert_close(
        mixed,
        torch.stack([l2v.encode(pairs)[0], out[1], l2v.encode(pairs)[2], l2v.encode(pairs)[3]]),
        rtol=0,
        atol=1e-5,
    )
    torch.testing.assert_close(l2v.encode("summit define"), out[2:3], rtol=0, atol=1e-5)
    medi = ["Retrieve it:", "summit define", 0]  # upstream's MEDI form: one item
    torch.testing.assert_close(l2v.encode(medi), l2v.encode(pairs[2:3]))
    assert l2v.encode([]).shape == (0, 64)
    with pytest.raises(ValueError, match="batch_size"):
        l2v.encode(texts, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        l2v.encode(["", "a"])
    with pytest.raises(TypeError, match="from_pretrained"):
        LLM2Vec(torch.nn.Linear(2, 2))
    assert LLM2Vec(Encoder(tiny_model(), l2v.tokenizer)).to("cpu").eval().pooling_mode == "mean"


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(load_in_4bit=True), ["load_in_4bit", "quantized"]),
        (dict(quantization_config={"bits": 4}), ["quantization_config"]),
        (dict(attn_implementation="flex_attention"), ["attn_implementation"]),
        (dict(device_map={"layers.0": "cpu", "layers.1": "cuda:0"}), ["device_map", "one"]),
        (dict(device_map="balanced"), ["device_map", "balanced"]),
        (dict(token="hf_x"), ["token", "HF_TOKEN"]),
        (dict(output_hidden_states=True), ["output_hidden_states"]),
        (dict(torch_dtype="int8"), ["int8"]),
    ],
)
def test_unsupported_arguments(tiny_l2v_dir, kwargs, words):
    with pytest.raises(ValueError) as e:
        LLM2Vec.from_pretrained(tiny_l2v_dir, **kwargs)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)


def test_extra_adapters_in_order(tiny_dir, tmp_path):
    from l2v.adapters import save_adapter
    from l2v.lora import add_lora, merge_lora

    model, folders = tiny_model(), []
    for k in range(2):
        add_lora(model, r=4, targets=("q_proj", "v_proj"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(k))
        folders.append(save_adapter(model, tmp_path / f"a{k}"))
        merge_lora(model)
    texts = ["A cat sits on the mat.", "summit define"]
    want = Encoder.from_pretrained(
        tiny_dir, adapters=folders, autocast="none", pooling="mean", is_causal=False, prompt=""
    ).encode(texts)
    for extra in ([str(folders[1])], str(folders[1])):
        got = LLM2Vec.from_pretrained(
            tiny_dir, peft_model_name_or_path=str(folders[0]), extra_model_name_or_path=extra
        )
        np.testing.assert_allclose(got.encode(texts, convert_to_numpy=True), want, rtol=0, atol=1e-6)
