"""Variants of one train.py config, side by side, chosen on a dev set by a rule fixed before the run.

    python scripts/sweep.py scripts/sweeps/supervised-sick.json --out runs/sweeps/supervised-sick  # repo root

Each variant is `train.py --config CONFIG` plus its own keys; it scores the dev file (STS-B style) every
`eval_every` steps and keeps a checkpoint at each. The best (variant, step) on dev is evaluated with
eval.py (`eval_tasks`, e.g. the test sets) only if it beats the reference (a variant's step, e.g. the
recipe's own) by at least `bar`; otherwise no test set is read. The variants run `parallel` at a time
(on one GPU the small demo model leaves the card idle between kernels); none starts after `budget_s`.
Writes OUT/sweep.json (dev curves, the choice, what was skipped) and OUT/best.json (eval.py's output).
The sweep file's keys: config, dev, variants [{name, eval_every, stop, set: {key: value}}], reference
{variant, step}, bar, eval_tasks, eval_args, parallel, budget_s, train_args.
"""

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from l2v.cli import UserError, fail  # noqa: E402
from l2v.config import DEFAULTS, parse_config  # noqa: E402

REQUIRED = ("config", "dev", "variants", "reference", "bar", "eval_tasks")


def flags(v: dict) -> list[str]:
    return [
        x
        for key, value in v.get("set", {}).items()
        for x in (f"--{key}", json.dumps(value) if isinstance(value, (list, bool)) else str(value))
    ]


def read_spec(path: Path) -> dict:
    """The sweep file, every variant's config checked by train.py's own rules before anything runs."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None
    missing = [k for k in REQUIRED if k not in spec] if isinstance(spec, dict) else list(REQUIRED)
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}")
    if not (
        isinstance(spec["variants"], list)
        and spec["variants"]
        and isinstance(spec["reference"], dict)
        and all(isinstance(v, dict) for v in spec["variants"])
    ):
        raise UserError(f"{path}: variants must be a non-empty list of objects, reference an object")
    for f in (spec["config"], spec["dev"]):
        if not Path(f).is_file():
            raise UserError(f"{path}: {f}: file not found")
    names = [v.get("name") for v in spec["variants"]]
    if len(set(names)) != len(names) or spec["reference"].get("variant") not in names:
        raise UserError(f"{path}: variant names must be unique and include the reference {spec['reference']}")
    for v in spec["variants"]:
        if not all(isinstance(v.get(k), int) and v[k] >= 1 for k in ("eval_every", "stop")):
            raise UserError(f"{path}: variant {v['name']}: eval_every and stop must be integers >= 1")
        unknown = sorted(set(v.get("set", {})) - set(DEFAULTS))
        if unknown:
            raise UserError(f"{path}: variant {v['name']}: unknown config key(s) {unknown}")
        try:
            parse_config(["--config", spec["config"], *spec.get("train_args", []), *flags(v)])
        except ValueError as e:  # every mistake parse_config finds (UserError is one)
            raise UserError(f"{path}: variant {v['name']}: {e}") from None
    return spec


def train(spec: dict, v: dict, out: Path, t0: float) -> str:
    if time.time() - t0 > spec.get("budget_s", float("inf")):
        return "skipped (budget)"
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        spec["config"],
        "--output_dir",
        str(out / v["name"]),
        "--eval_sts_file",
        spec["dev"],
        "--eval_every",
        str(v["eval_every"]),
        "--save_every",
        str(v["eval_every"]),
        "--keep_checkpoints",
        "100000",
        "--stop_after_n_steps",
        str(v["stop"]),
        "--progress",
        "false",
        *spec.get("train_args", []),
        *flags(v),
    ]
    res = subprocess.run(args, capture_output=True, text=True)
    (out / v["name"]).mkdir(parents=True, exist_ok=True)
    (out / v["name"] / "train.out").write_text(res.stdout + res.stderr)
    return (
        "ok"
        if res.returncode == 0
        else f"failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()[-300:]}"
    )


def curve(folder: Path) -> dict[int, float]:
    log = folder / "log.jsonl"
    recs = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return {r["step"]: r["eval_sts_spearman"] for r in recs if "eval_sts_spearman" in r}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="the sweep's JSON file")
    p.add_argument(
        "--out", type=Path, required=True, help="a new or empty folder: runs, sweep.json, best.json"
    )
    args = p.parse_args(argv)
    try:
        spec = read_spec(args.sweep)
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise UserError(
                f"--out {args.out}: not an empty folder (a sweep never overwrites an earlier one)"
            )
    except UserError as e:
        fail("sweep.py", e)
    names, ref = [v["name"] for v in spec["variants"]], spec["reference"]
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    with ThreadPoolExecutor(spec.get("parallel", 1)) as pool:
        status = dict(zip(names, pool.map(lambda v: train(spec, v, args.out, t0), spec["variants"])))
    curves = {n: curve(args.out / n) for n in names}
    for n in names:
        print(f"{n:16s} {status[n]:10.10s} " + " ".join(f"{s}:{x:.2f}" for s, x in sorted(curves[n].items())))
    reference = curves[ref["variant"]].get(ref["step"])
    best = max(((x, n, s) for n in names for s, x in curves[n].items()), default=None)
    summary = {
        "sweep": str(args.sweep),
        "status": status,
        "curves": curves,
        "reference": reference,
        "best": best and {"variant": best[1], "step": best[2], "dev": best[0]},
        "bar": spec["bar"],
        "evaluated": None,
        "seconds": round(time.time() - t0),
    }
    if reference is None or best is None or best[0] < reference + spec["bar"]:
        print(f"best {best} is not {spec['bar']} above the reference {reference}: no test set read")
    else:
        _, name, step = best
        ckpt = args.out / name / f"checkpoint-{step:06d}"
        ckpt = ckpt if ckpt.is_dir() else args.out / name / "final"  # the last step has no checkpoint
        model = json.loads((ckpt / "train_config.json").read_text())["model"]
        cmd = [
            sys.executable,
            str(ROOT / "eval.py"),
            "--model",
            model,
            "--adapter",
            str(ckpt),
            "--tasks",
            spec["eval_tasks"],
            "--out",
            str(args.out / "best.json"),
            *spec.get("eval_args", []),
        ]
        res = subprocess.run(cmd, text=True)
        summary["evaluated"] = {"adapter": str(ckpt), "exit": res.returncode}
    (args.out / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out / 'sweep.json'} ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
