"""train.py end to end on a tiny random model with the real tokenizer: DDP equivalence, resume, configs."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DATA, ROOT, needs_data
from safetensors.torch import load_file

import train
from l2v.checkpoint import load_model
from l2v.config import parse_config
from l2v.encoder import Encoder


def common_args(model, out, objective, data_dir):
    train_file = data_dir / {"supervised": "triples.jsonl", "cosent": "pairs.jsonl"}.get(
        objective, "sents.txt"
    )
    return [
        "--objective",
        objective,
        "--model",
        str(model),
        "--train_file",
        str(train_file),
        "--output_dir",
        str(out),
        "--max_seq_length",
        "32",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--autocast",
        "none",
        "--progress",
        "false",
        "--log_every",
        "1",
        "--lr",
        "1e-3",
    ]


def run(args, nproc=1, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "train.py"),
            *args,
        ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def losses(out):
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("objective", ["mntp", "simcse", "cosent"])
def test_two_process_ddp_equals_one_process(tiny_dir, text_files, tmp_path, objective):
    # No dropout: the two runs must draw identical computations, only split differently. One process
    # does 2 micro-batches of 4 (accumulation); two processes do 1 micro-batch of 2, twice, each.
    extra = ["--max_steps", "3", "--batch_size", "8", "--lora_dropout", "0", "--attention_dropout", "0"]
    run(common_args(tiny_dir, tmp_path / "one", objective, text_files) + extra + ["--micro_batch_size", "4"])
    two = run(
        common_args(tiny_dir, tmp_path / "two", objective, text_files) + extra + ["--micro_batch_size", "2"],
        nproc=2,
    )
    assert '"world_size": 2' in two.stdout and '"accum": 2' in two.stdout
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 3
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-5, (l1, l2)
    a1, a2 = adapter(tmp_path / "one" / "final"), adapter(tmp_path / "two" / "final")
    assert a1.keys() == a2.keys()
    diff = max((a1[k] - a2[k]).abs().max().item() for k in a1)
    assert diff <= 1e-5, diff
    moved = max(a1[k].abs().max().item() for k in a1 if "lora_B" in k)
    assert moved > 0  # the adapters really trained


def test_resume_after_kill_is_bitwise_identical(tiny_dir, text_files, tmp_path):
    base = common_args(tiny_dir, tmp_path / "full", "mntp", text_files) + [
        "--max_steps",
        "6",
        "--batch_size",
        "4",
        "--save_every",
        "3",
        "--lora_dropout",
        "0.1",
    ]
    run(base)
    # The interrupted run stops after step 4; the last checkpoint is step 3, so step 4 is redone.
    cut = common_args(tiny_dir, tmp_path / "cut", "mntp", text_files) + [
        "--max_steps",
        "6",
        "--batch_size",
        "4",
        "--save_every",
        "3",
        "--lora_dropout",
        "0.1",
    ]
    run(cut + ["--stop_after_n_steps", "4"])
    assert (tmp_path / "cut" / "checkpoint-000003" / "trainer_state.pt").is_file()
    assert not list((tmp_path / "cut").glob(".tmp-*"))
    shutil.rmtree(tmp_path / "cut" / "final")
    res = run(cut + ["--resume", "true"])
    assert "resumed from" in res.stdout
    a, b = adapter(tmp_path / "full" / "final"), adapter(tmp_path / "cut" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full")[-1] == losses(tmp_path / "cut")[-1]


def test_resume_after_sigkill_is_bitwise_identical(tiny_dir, text_files, tmp_path):
    """A real SIGKILL at an arbitrary moment (possibly mid-save), then --resume true."""
    import signal
    import time

    args = ["--max_steps", "8", "--batch_size", "4", "--save_every", "2", "--lora_dropout", "0.1"]
    run(common_args(tiny_dir, tmp_path / "full", "mntp", text_files) + args)
    killed = common_args(tiny_dir, tmp_path / "killed", "mntp", text_files) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *killed],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while (
        not list((tmp_path / "killed").glob("checkpoint-*"))
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it could be killed"
    run(killed + ["--resume", "true"])
    a, b = adapter(tmp_path / "full" / "final"), adapter(tmp_path / "killed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_supervised_objective_and_merge_out(tiny_dir, text_files, tmp_path):
    out = tmp_path / "sup"
    run(
        common_args(tiny_dir, out, "supervised", text_files)
        + [
            "--max_steps",
            "2",
            "--batch_size",
            "4",
            "--warmup_steps",
            "1",
            "--merge_out",
            str(tmp_path / "merged"),
            "--is_causal",
            "true",
            "--pooling",
            "last_token",
            "--prompt",
            'In one word, "{text}" means:',
            "--save_every",
            "1",
        ]
    )
    cfg = json.loads((out / "final" / "train_config.json").read_text())
    assert cfg["objective"] == "supervised" and cfg["scale"] == 50.0 and cfg["lr"] == 1e-3
    assert json.loads((out / "final" / "llm2vec_config.json").read_text())["pooling_mode"] == "last_token"
    for folder, adapters in (
        (tiny_dir, [out / "final"]),
        (tiny_dir, [out / "checkpoint-000001"]),
        (tmp_path / "merged", []),
    ):  # encodes as it trained; a checkpoint too
        enc = Encoder.from_pretrained(folder, adapters=adapters)
        assert (enc.prompt, enc.pooling, enc.model.config.is_causal) == (
            'In one word, "{text}" means:',
            "last_token",
            True,
        )
    merged = load_model(tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    for name in ("llm2vec_config.json", "train_config.json"):  # the encoding settings travel with it
        assert (tmp_path / "merged" / name).read_text() == (out / "final" / name).read_text()
    # The merged folder equals base + adapter applied by l2v's loader.
    from l2v.adapters import load_adapter

    base = load_model(tiny_dir)
    load_adapter(base, out / "final", merge=True)
    ids = torch.randint(20, 1000, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), base(ids), atol=1e-5, rtol=0)


def test_cosent_stage_after_a_supervised_adapter(tiny_dir, text_files, tmp_path):
    """CoSENT as a last stage: the supervised run's adapter merged first, graded pairs, its eval loss."""
    run(
        common_args(tiny_dir, tmp_path / "sup", "supervised", text_files)
        + ["--max_steps", "1", "--batch_size", "4"]
    )
    out = tmp_path / "cos"
    run(
        common_args(tiny_dir, out, "cosent", text_files)
        + [
            "--max_steps",
            "2",
            "--batch_size",
            "8",
            "--init_adapter",
            str(tmp_path / "sup" / "final"),
            "--eval_file",
            str(text_files / "pairs.jsonl"),
            "--eval_sts_file",
            str(text_files / "sts-dev.csv"),
            "--eval_every",
            "2",
            "--instruction",
            "Retrieve semantically similar text:",
        ]
    )
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ev = [r for r in recs if "eval_loss" in r]
    assert len(ev) == 1 and ev[0]["step"] == 2 and ev[0]["eval_loss"] > 0 and "eval_sts_spearman" in ev[0]
    cfg = json.loads((out / "final" / "train_config.json").read_text())
    assert (cfg["objective"], cfg["scale"], cfg["init_adapter"]) == (
        "cosent",
        20.0,
        [str(tmp_path / "sup" / "final")],
    )
    assert max(t.abs().max().item() for k, t in adapter(out / "final").items() if "lora_B" in k) > 0


def test_bad_config_key_and_value(tiny_dir, text_files, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"objective": "mntp", "learning_rate": 1}))
    res = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode != 0 and "unknown config key" in res.stderr and "learning_rate" in res.stderr
    bad.write_text("{not json")
    res = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode != 0 and "bad.json" in res.stderr and "malformed JSON" in res.stderr
    res = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--objective", "mntp", "--max_steps", "ten"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode != 0 and "--max_steps" in res.stderr


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").rglob("*.json")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_committed_configs_are_valid(path):
    """Every preset passes train.py's own checks (keys, types, ranges), and its objective is its folder's."""
    cfg = parse_config(["--config", str(path)]).to_dict()
    assert cfg["objective"] == path.parent.name or path.parent.name == "ablation"
    assert not cfg["stop_after_n_steps"] or cfg["stop_after_n_steps"] <= cfg["max_steps"]


@needs_data
@pytest.mark.parametrize("objective", ["mntp", "simcse"])
def test_demo_config_loss_decreases(demo_model_dir, objective, tmp_path):
    """The committed demo preset, shortened, trains the real demo model and its loss goes down."""
    cfg = ROOT / "configs" / objective / "smollm2-135m.json"
    train_file = DATA / (
        "wikitext-2-raw/wiki.valid.raw"
        if objective == "mntp"
        else "wiki1m_subset/wiki1m_for_simcse.head11914.txt"
    )
    # A small fixed pool of examples revisited every step, so the loss trend is not drowned by new data.
    small = tmp_path / "small.txt"
    lines = [ln for ln in train_file.read_text().splitlines() if len(ln.split()) > 8][:40]
    small.write_text("\n".join(lines) + "\n")
    run(
        [
            "--config",
            str(cfg),
            "--model",
            str(demo_model_dir),
            "--train_file",
            str(small),
            "--eval_file",
            "",
            "--eval_sts_file",
            "",
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "6",
            "--batch_size",
            "4",
            "--max_seq_length",
            "64",
            "--save_every",
            "0",
            "--eval_every",
            "0",
            "--progress",
            "false",
            "--log_every",
            "1",
            "--lr",
            "1e-3",
            "--init_adapter",
            "[]",
        ],
        env_extra={"OMP_NUM_THREADS": "2"},
    )
    ls = losses(tmp_path / "out")
    assert len(ls) == 6
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2, ls


def test_swiglu_keeps_gate_and_up_only():
    """In training the MLP keeps g = gate(x) and u = up(x) for the backward, not silu(g) as well (one
    activation of intermediate size less per layer); output and gradients are the plain expression's."""
    import torch.nn.functional as F
    from conftest import tiny_model

    from l2v.lora import add_lora, lora_parameters

    model = tiny_model()
    add_lora(model, r=4, alpha=8, dropout=0.0)
    mlp = model.layers[0].mlp.train()
    with torch.no_grad():
        for p in lora_parameters(mlp):
            p.normal_(0, 0.1)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))

    def run(f):
        seen = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = f(x)
        grads = torch.autograd.grad(y.pow(2).sum(), lora_parameters(mlp))
        return y, grads, sum(seen.values())

    y, grads, kept = run(mlp)
    y0, grads0, kept0 = run(lambda x: mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    assert kept0 - kept == 2 * 7 * 128 * 4  # one float32 (B, T, intermediate_size) tensor
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    for a, b in zip(grads, grads0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradient_checkpointing_replays_dropout_and_keeps_gradients(monkeypatch):
    """--gradient_checkpointing (the batch-256 supervised row trains with it): each layer is recomputed in
    the backward under the forward's RNG state, so with attention and LoRA dropout on, packed rows and
    LoRA on the upper layer only, the loss and every LoRA gradient equal those of the plain run."""
    from conftest import tiny_model

    import l2v.model
    from l2v.lora import add_lora, lora_parameters

    calls, real = [], l2v.model.checkpoint
    monkeypatch.setattr(
        l2v.model,
        "checkpoint",  # count whole layers (SwiGLU recomputes itself anyway)
        lambda f, *a, **k: calls.append(isinstance(f, l2v.model.Block)) or real(f, *a, **k),
    )

    def step(checkpointing, seed=1):
        model = tiny_model(attention_dropout=0.3)
        add_lora(model, r=4, alpha=8, dropout=0.1, layers=[1])
        with torch.no_grad():  # B = 0 at init would leave A's gradients zero
            for p in lora_parameters(model):
                p.normal_(0, 0.1)
        model.train()
        model.gradient_checkpointing = checkpointing
        ids = torch.randint(0, 49152, (3, 12), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(seed)  # the dropout draws
        segments = torch.tensor([[1] * 5 + [2] * 7, [1] * 12, [1] * 8 + [0] * 4])  # packed, padded
        loss = model(ids, segments).pow(2).mean()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in lora_parameters(model)]

    plain_loss, plain = step(False)
    assert not any(calls)
    ckpt_loss, ckpt = step(True)
    assert sum(calls) == 2  # every layer went through torch.utils.checkpoint
    assert ckpt_loss == plain_loss
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in plain)
    other_loss, _ = step(False, seed=2)  # the dropout draws matter: another seed, another loss
    assert other_loss != plain_loss


@pytest.mark.parametrize("name", ["qwen3", "gemma", "gemma2", "gemma3"])
def test_one_mntp_and_one_simcse_step_per_family(tmp_path, text_files, monkeypatch, name):
    """train.py (in-process) on a tiny random model of each new family with the demo tokenizer: one MNTP
    step (soft-capping its logits where the config says so) and one SimCSE step, each moving the adapter."""
    from conftest import TOKENIZER_DIR, TOKENIZER_FILES
    from test_model_parity import CASES, hf_model

    import l2v.objectives

    base = tmp_path / "base"
    hf_model(name, vocab_size=49152).save_pretrained(base)
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / f, base / f)
    caps, real = [], l2v.objectives.mntp_loss
    monkeypatch.setattr(
        l2v.objectives, "mntp_loss", lambda *a, **k: caps.append(k["logit_softcap"]) or real(*a, **k)
    )
    for objective in ("mntp", "simcse"):
        out = tmp_path / objective
        train.main(common_args(base, out, objective, text_files) + ["--max_steps", "1", "--batch_size", "4"])
        (loss,) = losses(out)
        assert math.isfinite(loss) and loss > 0
        assert max(t.abs().max().item() for k, t in adapter(out / "final").items() if "lora_B" in k) > 0
    assert caps == [CASES[name][2].get("final_logit_softcapping")]
