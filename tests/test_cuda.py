"""CUDA checks, skipped without a GPU: CPU vs CUDA parity of the shared tiny model (float32), packed vs
one text
per batch on CUDA, and one train.py step on CUDA against the same step on the CPU.

A GPU machine may not have ../shared: the tokenizer files also come from the demo model or bench/.inputs
(bench/pack_inputs.sh), so these tests run wherever one of them is.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DEMO_MODEL, REF_TOKENIZER, ROOT, TOKENIZER_FILES, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
TEXTS = [
    "A man is playing a guitar.",
    "Someone plays music on a small stage tonight, loudly.",
    "Cats.",
    "The river runs under the old bridge and past the city walls toward the sea.",
    "Two dogs run.",
]


@pytest.fixture(scope="module")
def tokenizer_dir():
    found = next(
        (
            d
            for d in (REF_TOKENIZER, DEMO_MODEL, ROOT / "bench" / ".inputs")
            if (d / "tokenizer.json").is_file()
        ),
        None,
    )
    if found is None:
        pytest.skip("no tokenizer files (../shared/reference, the demo model or bench/.inputs)")
    return found


@pytest.fixture(autouse=True)
def exact_float32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = (
        False  # TF32 would round CUDA's float32 matmuls to 10-bit mantissas
    )
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def encoders(tokenizer_dir):
    from l2v.encoder import Encoder
    from l2v.tokenizer import Tokenizer

    model, tok = tiny_model(), Tokenizer(tokenizer_dir)
    return Encoder(model, tok), Encoder(copy.deepcopy(model).cuda(), tok)


def test_forward_parity_cpu_vs_cuda(tokenizer_dir):
    cpu, gpu = encoders(tokenizer_dir)
    (batch,) = cpu.batches(cpu.prepare_inputs(TEXTS))  # several texts packed per row: masked GQA on CUDA
    assert int(batch.segments.max()) > 1
    with torch.no_grad():
        h_cpu = cpu.model(batch.input_ids, batch.segments)
        h_gpu = gpu.model(batch.input_ids.cuda(), batch.segments.cuda()).cpu()
        real = batch.segments > 0
        assert (h_cpu[real] - h_gpu[real]).abs().max().item() < 1e-4
        h_cpu, h_gpu = (
            cpu.model(batch.input_ids),
            gpu.model(batch.input_ids.cuda()).cpu(),
        )  # the unmasked path
        assert (h_cpu - h_gpu).abs().max().item() < 1e-4
    a, b = cpu.encode(TEXTS), gpu.encode(TEXTS)
    assert np.abs(a - b).max() < 1e-4


def test_packed_equals_one_text_per_batch_on_cuda(tokenizer_dir):
    _, gpu = encoders(tokenizer_dir)
    packed = gpu.encode(TEXTS)
    alone = np.stack([gpu.encode([t])[0] for t in TEXTS])
    cos = (packed * alone).sum(1) / np.linalg.norm(packed, axis=1) / np.linalg.norm(alone, axis=1)
    assert np.abs(packed - alone).max() < 1e-4 and cos.min() > 0.99999


def test_train_step_on_cuda_matches_cpu(tokenizer_dir, text_files, tmp_path):
    from l2v.checkpoint import save_model

    model_dir = tmp_path / "tiny"
    save_model(tiny_model(), model_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, model_dir / name)
    losses = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        # No dropout and LoRA's B starting at zero: the first step's loss is the base model's on both devices.
        args = [
            "--objective",
            "mntp",
            "--model",
            model_dir,
            "--train_file",
            text_files / "sents.txt",
            "--output_dir",
            out,
            "--max_steps",
            1,
            "--batch_size",
            4,
            "--max_seq_length",
            32,
            "--lora_dropout",
            0,
            "--device",
            device,
            "--autocast",
            "none",
            "--progress",
            "false",
            "--log_every",
            1,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        res = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        assert (
            any(r.get("event") == "end" for r in log)
            and (out / "final" / "adapter_model.safetensors").is_file()
        )
        losses[device] = next(r["loss"] for r in log if "loss" in r)
    assert np.isfinite(losses["cuda"]) and losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4), losses


# Issue #26's families as ModelConfig switches (no transformers needed on the GPU machine).
GEMMA = dict(
    act="gelu_pytorch_tanh",
    norm_offset=True,
    embed_scale=True,
    sandwich_norms=True,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
    bidirectional_window=True,
    query_pre_attn_scalar=20,
)
FAMILIES = {
    "qwen3": dict(qk_norm=True),
    "gemma2": dict(GEMMA, attn_softcap=0.05, final_softcap=0.2),
    "gemma3": dict(
        GEMMA,
        qk_norm=True,
        rope_theta=1e6,
        local_rope_theta=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_cpu_vs_cuda(family):
    """Qwen3's and Gemma 2/3's switches compute on CUDA what they compute on the CPU: Gemma 2's soft-capped
    math path, local windows on packed rows, causal and bidirectional."""
    model = tiny_model(**FAMILIES[family])
    gpu = copy.deepcopy(model).cuda()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (2, 21), generator=g)
    segments = torch.tensor([[1] * 9 + [2] * 5 + [3] * 7, [0] * 3 + [1] * 8 + [0] * 10])
    with torch.no_grad():
        for is_causal in (True, False):
            for seg in (None, segments):
                a = model(ids, seg, is_causal=is_causal)
                b = gpu(ids.cuda(), None if seg is None else seg.cuda(), is_causal=is_causal).cpu()
                real = torch.ones_like(ids, dtype=torch.bool) if seg is None else seg > 0
                assert (a[real] - b[real]).abs().max().item() < 1e-4, (family, is_causal, seg is None)
