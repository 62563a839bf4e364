"""l2v vs upstream llm2vec, side by side: the one driver of bench/ (modes and commands: bench/README.md).
Each side runs in its own process (l2v_side.py, peer_side.py) on the same model folder and inputs: on a CPU
one per figure (so peak RSS is per figure), sides alternating; on a GPU one per side (peak memory per figure
from the CUDA allocator). A side or figure that fails is recorded, not fatal."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
from l2v.cli import DEMO_MODEL, SHARED  # noqa: E402

TOKENIZER_DIRS = (DEMO_MODEL, SHARED / "reference" / "smollm2-135m-instruct")  # after --data
DATA_FILES = {
    "sts": ("sts-test.csv", "stsbenchmark/sts-test.csv"),  # a flat name, or ../shared/data's layout
    "wiki": ("wiki1m.txt", "wiki1m_subset/wiki1m_for_simcse.head11914.txt"),
    "msmarco": ("msmarco-corpus.jsonl", "retrieval/agentset_msmarco_subset/corpus.jsonl"),
}
# The report's targets (issues #9, #11). "ratio" = l2v / upstream in the row's unit (so time and memory
# targets are upper bounds), for --against this checkout / the other; "l2v" = l2v's own value.
TARGETS = {
    "cuda": {
        "encode_sts": "ratio >= 3",
        "encode_msmarco": "ratio >= 1.5",
        "mntp": "ratio >= 1.5",
        "mntp_mfu": "l2v >= 0.45",
        "simcse": "ratio >= 2.5",
        "mntp_mem": "ratio <= 0.7",
        "simcse_mem": "ratio <= 0.7",
    },
    "cpu": {
        "encode_sts": "ratio >= 1.3",
        "cosine": "l2v >= 0.9999",
        "mntp": "ratio >= 1.5",
        "mntp_mfu": "l2v >= 0.5",
        "mntp_mem": "ratio <= 0.6",
        "load": "ratio <= 0.5",
    },
    "against": {"simcse": "ratio >= 1.5"},
    # issue #28: the cached step's memory near the plain micro-batch's, its time near the plain big batch's
    "cached": {"simcse_cached_mem": "ratio <= 1.2", "simcse_cached_time": "ratio <= 1.4"},
}
SIZES = {  # texts per figure (0 = all), MNTP (rows, tokens), training steps after warmup, encode passes
    "cuda": dict(
        sts=0, msmarco=1000, simcse=128, wiki=0, mntp=(16, 512), warmup=2, steps=4, repeats=1, matmul_n=8192
    ),
    "cpu": dict(
        sts=0, msmarco=200, simcse=32, wiki=0, mntp=(4, 512), warmup=1, steps=3, repeats=1, matmul_n=4096
    ),
    "dry": dict(
        sts=24, msmarco=6, simcse=4, wiki=200, mntp=(2, 32), warmup=0, steps=2, repeats=1, matmul_n=64
    ),
    # --cached: SimCSE batch 256 in micro-batches of 32 (cached) vs plain 32 and plain 256
    "cached": dict(
        sts=8,
        msmarco=1,
        simcse=256,
        wiki=0,
        mntp=(1, 8),
        warmup=0,  # a step at batch 256 takes minutes on 2 cores: time the first two
        steps=2,
        repeats=1,
        matmul_n=64,
        cached=[(256, 32), (96, 32)],
    ),
    "cached-dry": dict(
        sts=8,
        msmarco=1,
        simcse=8,
        wiki=200,
        mntp=(1, 8),
        warmup=0,
        steps=1,
        repeats=1,
        matmul_n=64,
        cached=[(8, 2)],
    ),
}
FIGURES = {
    "cuda": ["matmul", "encode_sts", "encode_msmarco", "simcse", "mntp_ckpt", "mntp"],  # OOM-prone last
    "cpu": ["encode_sts", "encode_msmarco", "mntp", "mntp_ckpt", "simcse", "matmul"],
}
SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    "tiny": dict(
        vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128
    ),
}


def make_model(folder: Path, shape: dict, tokenizer: Path, device="cpu", max_shard_bytes=None) -> Path:
    """A random-weight bf16 HF folder with the demo tokenizer's files (its ids fit every vocab_size here)."""
    import torch

    from l2v.checkpoint import save_model
    from l2v.model import ModelConfig, Transformer

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # 8B parameters built in float32 would take 32 GB
    with torch.device(device):
        model = Transformer(ModelConfig(**shape, norm_eps=1e-5))
    torch.set_default_dtype(torch.float32)
    save_model(model, folder, dtype=torch.bfloat16, max_shard_bytes=max_shard_bytes)
    del model
    torch.cuda.empty_cache()  # the worker processes need the GPU's memory
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer / name, folder / name)
    return folder


def prepare_inputs(work: Path, data, model, sizes: dict) -> dict:
    """Both sides' inputs, written once: texts (+ wiki.txt, sts.txt for train.py, encode.py), the MNTP
    batch."""
    from l2v.data import mask_token_id
    from l2v.tokenizer import Tokenizer

    path = {
        k: next((Path(data) / n for n in names if data and (Path(data) / n).is_file()), None)
        for k, names in DATA_FILES.items()
    }
    lines = {
        k: [x.strip() for x in open(p, encoding="utf-8") if x.strip()] if p else [] for k, p in path.items()
    }
    words = "the a river city song cat old green runs sings over under quickly small bright night".split()
    made_up = [
        " ".join(words[(i * 7 + j * (i % 5 + 1)) % 16] for j in range(8 + i % 40)) + f" {i}."
        for i in range(3000)
    ]
    sts = [s for x in lines["sts"] for s in x.split("\t")[5:7]] or made_up  # tab-split: the text holds quotes
    wiki = (lines["wiki"] or made_up)[: sizes["wiki"] or None]
    msmarco = [json.loads(x)["text"] for x in lines["msmarco"]] or made_up[::-1]
    texts = {
        "sts": sts[: sizes["sts"] or None],
        "msmarco": msmarco[: sizes["msmarco"]],
        "simcse": wiki[: sizes["simcse"]],
    }
    (work / "inputs.json").write_text(json.dumps(texts))
    (work / "wiki.txt").write_text("\n".join(wiki) + "\n")
    (work / "sts.txt").write_text("\n".join(texts["sts"]) + "\n")
    tok, (B, T), k = Tokenizer(model), sizes["mntp"], round(0.2 * (sizes["mntp"][1] - 1))
    # consecutive tokens (run_mntp.py's group_texts); 20% of positions 1..T-1 per row become '_'
    # (upstream's mask)
    ids = np.array([i for x in tok.encode_batch(wiki, add_special_tokens=False) for i in x][: B * T]).reshape(
        B, T
    )
    pos = (np.arange(B)[:, None], 1 + np.argsort(np.random.default_rng(0).random((B, T - 1)), axis=1)[:, :k])
    masked, labels = ids.copy(), np.full_like(ids, -100)
    labels[pos], masked[pos] = ids[pos], mask_token_id(tok)
    np.savez(work / "mntp.npz", ids=masked, labels=labels)
    return dict(
        files={k: str(p or "made up") for k, p in path.items()},
        counts={k: len(v) for k, v in texts.items()},
        mntp=[B, T],
        mntp_masked=B * k,
    )


def run(argv: list, threads: int, pythonpath=(), cwd=None) -> tuple[str, str | None]:
    """A child process with pinned threads: (stdout, None), or (stdout, its error's last line) if it
    failed."""
    # PASSIVE: OpenMP's default spin-waiting made threads fight on a busy machine (an encode ran 7x slower).
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OMP_WAIT_POLICY="PASSIVE",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(map(str, pythonpath)),
    )
    p = subprocess.run(list(map(str, argv)), capture_output=True, text=True, cwd=cwd, env=env)
    tail = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
    return p.stdout, f"rc {p.returncode}: {tail[:300]}" if p.returncode else None


def run_side(script: str, spec: dict, python, pythonpath, tag: str) -> dict:
    """One worker process: its figures, or {"error": ...} for each of them when the process fails."""
    (path := Path(f"{spec['out']}-{tag}.json")).write_text(json.dumps(spec))
    out, err = run([python, BENCH / script, path], spec["threads"], pythonpath)
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if err or not lines:
        print(f"  {spec['side']} {tag}: FAILED {err}", flush=True)
        return {f: {"error": err or "no RESULT line"} for f in spec["figures"]}
    return json.loads(lines[-1][len("RESULT ") :])


def pool(
    into: dict, fig: str, out: dict
) -> None:  # rounds pool their timed steps, the rest is the first round's
    if "times" in out and "times" in into.get(fig, {}):
        return into[fig]["times"].extend(out["times"])
    into.setdefault(fig, out)


def compare(
    model: Path,
    device: str,
    sizes: dict,
    work: Path,
    data,
    threads: int,
    peer_python,
    peer_path=(),
    rounds: int = 1,
    per_figure: bool = True,
) -> dict:
    info = prepare_inputs(work, data, model, sizes)
    base = dict(
        sizes,
        model=str(model),
        device=device,
        threads=threads,
        inputs=str(work / "inputs.json"),
        mntp=str(work / "mntp.npz"),
        weights_dtype="bfloat16" if device == "cuda" else "float32",
        autocast="bfloat16" if device == "cuda" else None,
    )
    sides = {"l2v": ("l2v_side.py", sys.executable, [ROOT])}
    check = (
        "import importlib.util as u, sys; "
        "sys.exit(not all(map(u.find_spec, ('llm2vec', 'peft', 'transformers'))))"
    )
    if peer_python != "none" and run([peer_python, "-c", check], 1, peer_path)[1] is None:
        sides["upstream"] = ("peer_side.py", peer_python, list(peer_path))
    groups = [[f] for f in FIGURES[device]] if per_figure else [FIGURES[device]]
    res = {side: {} for side in sides}
    for r in range(rounds):
        for group in groups:
            for side, (script, python, path) in sides.items():
                figs = [f for f in group if side == "l2v" or f != "matmul"]
                for fig, out in (
                    run_side(
                        script,
                        dict(base, side=side, figures=figs, out=str(work / side)),
                        python,
                        path,
                        f"{r}-{figs[0]}",
                    )
                    if figs
                    else {}
                ).items():
                    pool(res[side], fig, out)
    res.setdefault(
        "upstream", {"not_run": f"--peer-python {peer_python} (PYTHONPATH {peer_path}): no llm2vec"}
    )
    cfg = json.loads((Path(model) / "config.json").read_text())
    return dict(
        device=device,
        model=str(model),
        inputs=info,
        sizes=sizes,
        results=res,
        rows=rows(res, TARGETS[device], cfg, info, work),
    )


def mntp_step_flops(cfg: dict, B: int, T: int, M: int, r: int = 16) -> float:
    """Useful FLOPs of an MNTP step (recomputation not counted): forward = linears, attention, LM head on
    the M
    masked positions, LoRA; backward = 1x that of the frozen linears and head, 2x attention and LoRA."""
    D, L, V, F = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or D // H
    shapes = [(D, H * hd), (D, K * hd), (D, K * hd), (H * hd, D), (D, F), (D, F), (F, D)]
    lin, attn = 2 * B * T * L * sum(i * o for i, o in shapes), 4 * L * B * T * T * H * hd
    return 2 * (lin + 2 * M * D * V) + 3 * (attn + 2 * B * T * r * L * sum(i + o for i, o in shapes))


def row(fig, label, unit, sides, fn, target) -> dict:
    """One table row from the two sides' results; a failed or missing figure shows as such."""

    def value(r):
        try:
            return fn(r)
        except (KeyError, TypeError, ZeroDivisionError, statistics.StatisticsError):
            return f"failed: {r[fig]['error'][:120]}" if "error" in r.get(fig, {}) else "-"

    a, b = map(value, sides)
    ratio = a / b if all(isinstance(v, (int, float)) for v in (a, b)) and b else None
    what, op, x = (target or "- - 0").split()
    v = ratio if what == "ratio" else a
    met = (v >= float(x) if op == ">=" else v <= float(x)) if target and isinstance(v, (int, float)) else None
    return dict(fig=fig, figure=label, unit=unit, l2v=a, upstream=b, ratio=ratio, target=target, met=met)


def rows(res: dict, targets: dict, cfg: dict, info: dict, work: Path) -> list[dict]:
    l2v, up, out, (B, T) = res["l2v"], res["upstream"], [], info["mntp"]
    med = lambda r, fig: statistics.median(r[fig]["times"])  # noqa: E731

    def add(fig, label, unit, fn, target=None):
        out.append(row(fig, label, unit, (l2v, up), fn, targets.get(target or fig)))

    add("load", "load time", "s", lambda r: r["load"]["s"])
    add("load", "load peak memory", "MB", lambda r: r["load"]["peak_mem_mb"], "load_mem")
    for fig, label in (("encode_sts", "encode STS-B test"), ("encode_msmarco", "encode MS MARCO passages")):
        label = f"{label} ({info['counts'][fig[7:]]} texts)"
        add(fig, label, "texts/s", lambda r: r[fig]["n"] / med(r, fig))
        add(fig, label + ": peak memory", "MB", lambda r: r[fig]["peak_mem_mb"], "encode_mem")
    if (work / "upstream_sts.npy").is_file():
        a, b = (np.load(work / f"{side}_sts.npy") for side in ("l2v", "upstream"))
        cos = float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
        add("cosine", "cosine l2v vs upstream, STS-B test (min)", "", lambda r: cos if r is l2v else "-")
    flops = mntp_step_flops(cfg, B, T, info["mntp_masked"])
    for fig in ("mntp", "mntp_ckpt"):
        label = f"MNTP step {B} x {T}" + (" +checkpointing" if fig == "mntp_ckpt" else "")
        add(fig, label, "tokens/s", lambda r: B * T / med(r, fig), "mntp")
        add(
            fig,
            label + ": MFU",
            "",
            lambda r: flops / med(r, fig) / 1e12 / l2v["matmul"]["tflops"],
            "mntp_mfu",
        )
        add(fig, label + ": peak memory", "MB", lambda r: r[fig]["peak_mem_mb"], "mntp_mem")
    label = f"SimCSE step, {info['counts']['simcse']} sentences x 2 views"
    add("simcse", label, "sent/s", lambda r: r["simcse"]["n"] / med(r, "simcse"))
    add("simcse", label + ": peak memory", "MB", lambda r: r["simcse"]["peak_mem_mb"], "simcse_mem")
    add("matmul", "matmul peak (MFU's denominator)", "TFLOP/s", lambda r: r["matmul"]["tflops"])
    return out


def cached(model: Path, work: Path, data, sizes: dict, threads: int) -> dict:
    """Issue #28: l2v's SimCSE step, each figure in its own process (peak RSS per figure), float32, for each
    (batch, micro-batch) size: plain at the micro-batch size, the batch in micro-batches with per-micro-batch
    negatives (upstream's accumulation) and cached (the whole batch as negatives), and plain at the batch."""
    info = prepare_inputs(work, data, model, sizes)
    spec = dict(
        sizes,
        model=str(model),
        device="cpu",
        threads=threads,
        inputs=str(work / "inputs.json"),
        mntp=str(work / "mntp.npz"),
        weights_dtype="float32",
        autocast=None,
        side="l2v",
    )
    res, out = {}, []
    for big, micro in sizes["cached"]:
        labels = {
            "simcse_small": f"plain SimCSE step, {micro} sentences x 2",
            "simcse_micro": f"{big} sentences x 2 in micro-batches of {micro}, per-micro-batch negatives",
            "simcse_cached": f"{big} sentences x 2 in micro-batches of {micro}, cached",
            "simcse_large": f"plain SimCSE step, {big} sentences x 2",
        }
        got = res[f"{big}x{micro}"] = {}
        for fig in labels:
            tag = f"{fig}-{big}x{micro}"
            s = dict(spec, figures=[fig], out=str(work / tag), cached=[big, micro])
            got.update(run_side("l2v_side.py", s, sys.executable, [ROOT], tag))

        def value(fig, what, got=got):
            try:
                return statistics.median(got[fig]["times"]) if what == "time" else got[fig]["peak_mem_mb"]
            except (KeyError, statistics.StatisticsError):
                return f"failed: {got.get(fig, {}).get('error', '-')[:120]}"

        out += [
            dict(
                fig=f,
                figure=f"{label}: {what}",
                unit="s/step" if what == "time" else "MB",
                l2v=value(f, what),
                upstream=None,
                ratio=None,
                target=None,
                met=None,
            )
            for f, label in labels.items()
            for what in ("time", "peak memory")
        ]
        for key, what, ref in (
            ("simcse_cached_mem", "peak memory", "simcse_small"),
            ("simcse_cached_mem", "peak memory", "simcse_micro"),
            ("simcse_cached_time", "time", "simcse_large"),
            ("simcse_cached_time", "time", "simcse_micro"),
        ):
            a, b = value("simcse_cached", what), value(ref, what)
            ratio = a / b if all(isinstance(v, float) for v in (a, b)) and b else None
            target = TARGETS["cached"][key]
            out.append(
                dict(
                    fig=key,
                    figure=f"cached / ({labels[ref]}): {what}",
                    unit="",
                    l2v=ratio,
                    upstream=None,
                    ratio=ratio,
                    target=target,
                    met=None if ratio is None else ratio <= float(target.split()[2]),
                )
            )
    return dict(model=str(model), inputs=info, sizes=sizes, results={"l2v": res}, rows=out)


def table(result: dict, cols=("l2v", "upstream")) -> str:
    """The report table; for the GPU check also its rows in docs/performance.md's columns."""
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"| figure | {cols[0]} | {cols[1]} | ratio | target | met |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['figure']} | {fmt(r['l2v'])} {r['unit']}".rstrip()
            + f" | {fmt(r['upstream'])} | {fmt(r['ratio'])} | "
            f"{r['target'] or ''} | {({None: '-', True: 'yes', False: '**no**'})[r['met']]} |"
        )
    if result["mode"] == "gpu":
        by = {r["figure"]: r for r in result["rows"]}
        pair = lambda r: f"{fmt(r['l2v'])} / {fmt(r['upstream'])}" if r else "-"  # noqa: E731
        lines += [
            "",
            "| figure | l2v | upstream | ratio | MFU | peak memory | card |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['figure']} | {fmt(r['l2v'])} {r['unit']} | {fmt(r['upstream'])} | {fmt(r['ratio'])} | "
            f"{pair(by.get(r['figure'] + ': MFU'))} | {pair(by.get(r['figure'] + ': peak memory'))} MB | "
            f"{result['card']} |"
            for r in result["rows"]
            if r["unit"] in ("texts/s", "tokens/s", "sent/s")
        ]
    return "\n".join(lines)


def train_py(checkout: Path, args: dict, threads: int) -> dict:
    """One train.py run; with log_every 1 log record k holds the mean s/step so far: k x s_per_step
    elapsed."""
    _, err = run(
        [sys.executable, checkout / "train.py", *(x for k, v in args.items() for x in (f"--{k}", v))],
        threads,
        cwd=checkout,
    )
    if err:
        return {"error": err}
    log = [json.loads(x) for x in open(Path(args["output_dir"]) / "log.jsonl") if '"s_per_step"' in x]
    return dict(
        times=np.diff([0.0] + [r["s_per_step"] * r["step"] for r in log]).tolist(),
        losses=[r["loss"] for r in log],
    )


def against(other: Path, work: Path, model: Path, data, sizes: dict, threads: int, rounds: int) -> dict:
    """Issue #9's CPU figures vs `other` (e.g. a worktree of an older commit), same settings, alternating."""
    info, res = prepare_inputs(work, data, model, sizes), {"this": {}, "other": {}}
    spec = dict(
        sizes,
        model=str(model),
        device="cpu",
        threads=threads,
        inputs=str(work / "inputs.json"),
        weights_dtype="float32",
        autocast=None,
        figures=["encode_sts"],
    )
    for r in range(rounds):
        for name in ("other", "this") if r % 2 == 0 else ("this", "other"):
            checkout, out = (ROOT if name == "this" else other.resolve()), work / f"{name}-{r}"
            t = train_py(
                checkout,
                dict(
                    objective="simcse",
                    model=model,
                    train_file=work / "wiki.txt",
                    output_dir=out,
                    max_steps=sizes["warmup"] + sizes["steps"],
                    batch_size=sizes["simcse"],
                    max_seq_length=128,
                    autocast="none",
                    progress="false",
                    log_every=1,
                    seed=0,
                ),
                threads,
            )
            pool(res[name], "simcse", dict(t, times=t.get("times", [])[sizes["warmup"] :]))
            e = run_side(
                "l2v_side.py", dict(spec, side=name, out=str(out)), sys.executable, [checkout], "encode"
            )
            pool(res[name], "encode_sts", e["encode_sts"])
    out, n = [], info["counts"]["sts"]
    for fig, label, unit, k in (
        ("simcse", f"train.py SimCSE step, batch {sizes['simcse']} x 128", "steps/s", 1),
        ("encode_sts", f"encode STS-B test ({n} texts)", "texts/s", n),
    ):
        out.append(
            row(
                fig,
                label,
                unit,
                (res["this"], res["other"]),
                lambda r: k / statistics.median(r[fig]["times"]),
                TARGETS["against"].get(fig),
            )
        )
    return dict(other=str(other), model=str(model), inputs=info, sizes=sizes, results=res, rows=out)


def parity(device: str) -> dict:
    """Tiny random model, float32, CPU vs `device`: hidden states of a packed batch, an MNTP loss, LoRA
    grads."""
    import copy

    import torch

    from l2v.lora import add_lora, lora_modules, lora_parameters
    from l2v.model import ModelConfig, Transformer
    from l2v.objectives import mntp_loss

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    cpu = Transformer(ModelConfig(**SHAPES["tiny"], is_causal=False))
    add_lora(cpu, dropout=0.0)
    for m in lora_modules(cpu).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)  # B = 0 would leave A without a gradient
    ids, seg = (
        torch.randint(0, 49152, (2, 24)),
        torch.tensor([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4]),
    )  # packed; padded
    labels, got = torch.where((torch.rand(2, 24) < 0.3) & (seg > 0), ids, -100), []
    for model, dev in ((cpu, "cpu"), (copy.deepcopy(cpu).to(device), device)):
        h = model.train()(ids.to(dev), seg.to(dev))
        (loss := mntp_loss(h, labels.to(dev), model.lm_head_weight)).backward()
        got.append(
            (
                h.detach().cpu()[seg > 0],
                loss.item(),
                torch.cat([p.grad.cpu().flatten() for p in lora_parameters(model)]),
            )
        )
    (h0, l0, g0), (h1, l1, g1) = got
    out = dict(
        hidden_max_diff=(h0 - h1).abs().max().item(),
        loss=[l0, l1],
        grad_rel_diff=((g0 - g1).norm() / g0.norm()).item(),
    )
    return dict(
        out,
        ok=out["hidden_max_diff"] < 1e-3 and abs(l0 - l1) <= 1e-4 * abs(l0) and out["grad_rel_diff"] < 1e-3,
    )


def gpu_check(args, work: Path, device: str, sizes: dict, peer: list) -> dict:
    """Parity; a random Llama-3-8B-shaped model (tiny: dry run); train.py MNTP, SimCSE on it; encode.py;
    compare."""
    t0, checks, wd = time.time(), {}, "bfloat16" if device == "cuda" else "float32"

    def stage(name, ok, **result):
        checks[name] = dict(result, ok=ok, at_s=round(time.time() - t0, 1))
        print(
            f"[{checks[name]['at_s']:6.1f} s] {name}: {json.dumps(checks[name], default=str)[:300]}",
            flush=True,
        )

    stage(f"parity cpu vs {device}", **parity(device))
    shape = SHAPES["tiny" if args.dry_run else "llama3-8b"]
    model = make_model(work / "model", shape, args.tokenizer, device, 1 << 20 if args.dry_run else 4 << 30)
    stage("random model", True, shards=len(list(model.glob("*.safetensors"))))
    prepare_inputs(work, args.data, model, sizes)
    common = dict(
        model=model,
        train_file=work / "wiki.txt",
        max_steps=3,
        save_every=2,
        log_every=1,
        progress="false",
        device=device,
        weights_dtype=wd,
        autocast="bfloat16" if device == "cuda" else "none",
        gradient_checkpointing=str(device == "cuda").lower(),
    )
    for obj, extra in (
        ("mntp", dict(batch_size=sizes["mntp"][0], max_seq_length=sizes["mntp"][1])),
        ("simcse", dict(batch_size=sizes["simcse"], max_seq_length=128, init_adapter=work / "mntp/final")),
    ):
        r = train_py(ROOT, dict(common, objective=obj, output_dir=work / obj, **extra), args.threads)
        ok = (
            "error" not in r
            and (work / obj / "final/adapter_model.safetensors").is_file()
            and any((work / obj).glob("checkpoint-*"))
            and bool(np.isfinite(r["losses"]).all())
        )
        stage(f"train.py {obj}", ok, s_per_step=statistics.median(r.get("times", [0, 0])[1:]), **r)
    argv = [
        "--model",
        model,
        "--adapter",
        work / "mntp/final",
        "--adapter",
        work / "simcse/final",
        "--file",
        work / "sts.txt",
        "--out",
        work / "emb.npy",
        "--dtype",
        wd,
        "--device",
        device,
    ]
    err = run([sys.executable, ROOT / "encode.py", *argv], args.threads)[1]
    emb = np.zeros((0, 0)) if err else np.load(work / "emb.npy")
    stage(
        "encode.py",
        emb.shape[1:] == (shape["dim"],) and bool(np.isfinite(emb).all()),
        shape=emb.shape,
        error=err,
    )
    result = compare(
        model, device, sizes, work, args.data, args.threads, args.peer_python, peer, args.rounds, False
    )
    lead = [
        dict(
            fig="check",
            figure=f"check: {k}",
            unit="",
            l2v="ok" if c["ok"] else f"FAILED {c.get('error', '')}",
            upstream="-",
            ratio=None,
            target=None,
            met=c["ok"],
        )
        for k, c in checks.items()
    ]
    return dict(result, checks=checks, rows=lead + result["rows"], total_s=round(time.time() - t0, 1))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--gpu", action="store_true", help="the GPU check: needs nothing downloaded (bench/README.md)")
    a(
        "--against",
        type=Path,
        help="another checkout: its train.py SimCSE step and encode speed vs this one's",
    )
    a(
        "--cached",
        action="store_true",
        help="l2v's cached SimCSE step: batch 256 in micro-batches of 32 vs plain",
    )
    a("--dry-run", action="store_true", help="a tiny random model and tiny inputs: seconds")
    a("--model", type=Path, default=DEMO_MODEL, help="model folder (plain and --against modes)")
    a(
        "--data",
        type=Path,
        default=ROOT.parent / "shared/data",
        help="folder of DATA_FILES (default: ../shared/data)",
    )
    a("--threads", type=int, default=2, help="CPU threads of every process")
    a("--rounds", type=int, default=1, help="repeat the whole plan; sides keep alternating")
    a(
        "--peer-python",
        help="python of the upstream side, or none (default: bench/.peer-venv's, else this one)",
        default=str(BENCH / ".peer-venv/bin/python") if (BENCH / ".peer-venv").is_dir() else sys.executable,
    )
    a("--peer-path", type=Path, action="append", default=[], help="on the upstream side's PYTHONPATH only")
    a(
        "--peer-wheels",
        type=Path,
        help="folder of upstream's pinned wheels (bench/setup_peer.sh --wheels DIR)",
    )
    a("--out", type=Path, help="JSON file (default: bench/results/<mode>.json; none for a dry run)")
    args = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.gpu and device != "cuda" and not args.dry_run:
        p.error("--gpu: no CUDA device here (--gpu --dry-run runs the same steps on a tiny model)")
    sizes = SIZES[
        ("cached-dry" if args.dry_run else "cached") if args.cached else "dry" if args.dry_run else device
    ]
    with tempfile.TemporaryDirectory(prefix="l2v-bench-") as tmp:
        work, peer, model = Path(tmp), list(args.peer_path), args.model.resolve()
        for whl in sorted(args.peer_wheels.glob("*.whl")) if args.peer_wheels else []:
            zipfile.ZipFile(whl).extractall(
                work / "peer-site"
            )  # a wheel is a zip of site-packages: no pip needed
        peer += [work / "peer-site"] if args.peer_wheels else []
        tokenizers = [d for d in (args.data, *TOKENIZER_DIRS) if d and (d / "tokenizer.json").is_file()]
        if (
            args.dry_run or args.gpu
        ) and not tokenizers:  # a generated model needs the demo tokenizer's files
            p.error("no tokenizer.json in --data, models/smollm2-135m-instruct or ../shared/reference")
        args.tokenizer = tokenizers[0] if tokenizers else None
        if args.dry_run and not args.gpu:
            model = make_model(work / "tiny", SHAPES["tiny"], args.tokenizer, "cpu", 1 << 20)
        if args.cached:
            result = cached(model, work, args.data, sizes, args.threads)
        elif args.against:
            result = against(args.against, work, model, args.data, sizes, args.threads, args.rounds)
        elif args.gpu:
            result = gpu_check(args, work, device, sizes, peer)
        else:
            result = compare(
                model,
                device,
                sizes,
                work,
                args.data,
                args.threads,
                args.peer_python,
                peer,
                args.rounds,
                per_figure=device == "cpu" and not args.dry_run,
            )
    mode = "gpu" if args.gpu else "against" if args.against else "cached" if args.cached else device
    result.update(
        mode=mode,
        dry_run=args.dry_run,
        torch=torch.__version__,
        card=torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads",
    )
    print(table(result, ("this checkout", "other") if args.against else ("l2v", "upstream")))
    out = args.out or (None if args.dry_run else BENCH / "results" / f"{result['mode']}.json")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print("wrote", out)
    return result


if __name__ == "__main__":
    main()
