import os
import shutil
import sys
from pathlib import Path

# OpenMP's default spin-waiting makes threads fight on a busy 2-core machine (measured 7x slower);
# must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The project's data folder beside the checkout; L2V_SHARED points elsewhere (CI runs the suite once more
# with it hidden, as a plain clone has no ../shared).
SHARED = Path(os.environ.get("L2V_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"
ORACLE = REFERENCE / "oracle"
DATA = SHARED / "data"
DEMO_MODEL = ROOT / "models" / "smollm2-135m-instruct"
REF_TOKENIZER = REFERENCE / "smollm2-135m-instruct"
# The tiny models' tokenizer: the reference copy, else the identical one `make setup` built.
TOKENIZER_DIR = next((d for d in (REF_TOKENIZER, DEMO_MODEL) if (d / "tokenizer.json").is_file()), None)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no data folder at {DATA} (../shared/data)")
needs_oracle = pytest.mark.skipif(
    not ORACLE.is_dir(), reason=f"no oracle outputs at {ORACLE} (../shared/reference)"
)
# The one tiny model of the tests: SmolLM2's real vocabulary (so the real tokenizer drives it), GQA, tied.
TINY = dict(
    vocab_size=49152,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    intermediate_size=128,
    norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def tiny_model(is_causal=False, seed=0, **overrides):
    """A random tiny Transformer in eval mode; norm weights perturbed so no layer is an identity."""
    from l2v.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides}, is_causal=is_causal)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tiny(folder, model=None):
    """The tiny model as an HF folder with the demo tokenizer's files."""
    from l2v.checkpoint import save_model

    save_model(model if model is not None else tiny_model(), folder)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, Path(folder) / name)
    return Path(folder)


@pytest.fixture(scope="session")
def tok():
    from l2v.tokenizer import Tokenizer

    if TOKENIZER_DIR is None:
        pytest.skip("no tokenizer: neither ../shared/reference nor the demo model (make setup) is there")
    return Tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tok):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    sentences = [
        f"Sentence number {i} talks about {w} and the {i % 7} green {w}s."
        for i, w in enumerate(["cats", "dogs", "rivers", "mountains", "planes", "songs", "books", "cars"] * 8)
    ]
    (d / "sents.txt").write_text("\n".join(sentences) + "\n")
    import json

    triples = [
        {
            "query": f"what is {w}?",
            "positive": f"{w} is a thing number {i}.",
            "negative": f"nothing about item {i}.",
            "instruction": "Retrieve the answer:",
        }
        for i, w in enumerate(["cats", "dogs", "rivers", "planes"] * 4)
    ]
    (d / "triples.jsonl").write_text("\n".join(json.dumps(t) for t in triples) + "\n")
    pairs = [
        {"sentence1": a, "sentence2": b, "score": i % 5}
        for i, (a, b) in enumerate(zip(sentences[:16], sentences[16:32]))
    ]
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(t) for t in pairs) + "\n")
    sts = [
        f"main-captions\tMSRvid\t2012test\t{i:04d}\t{i % 6}.0\t{a}\t{b}"
        for i, (a, b) in enumerate(zip(sentences[:12], sentences[12:24]))
    ]
    (d / "sts-dev.csv").write_text("\n".join(sts) + "\n")
    return d


@pytest.fixture(scope="session")
def demo_model_dir():
    if not (DEMO_MODEL / "model.safetensors").is_file():
        pytest.skip("demo model not built: run `python scripts/build_demo_model.py`")
    return DEMO_MODEL


@pytest.fixture(scope="session")
def oracle_dir():
    if not ORACLE.is_dir():
        pytest.skip("../shared/reference/oracle not present")
    return ORACLE
