"""Evaluate an l2v / LLM2Vec encoder on local STS and retrieval files (readers, metrics and the task table:
`l2v/evaluation.py`).

Examples:
    python eval.py --tasks stsb-dev                                # the demo model with its own settings
    python eval.py --adapter runs/mntp-smollm2/final --adapter runs/simcse-smollm2/final --tasks sts
    python eval.py --causal --pooling last_token --prompt 'This sentence : "{text}" means in one word:"' \\
        --sts-instruction '' --tasks dev
    python eval.py --adapter runs/supervised-smollm2/final --sts-instruction '' --tasks dev
        # an adapter trained through a prompt: prompt, attention and pooling come from its folder
    python eval.py --model DIR --no-causal --pooling mean --prompt '' --tasks dev,cranfield --out out/dev.json
    python eval.py --model McGill-NLP/LLM2Vec-Sheared-LLaMA-mntp \\
        --adapter McGill-NLP/LLM2Vec-Sheared-LLaMA-mntp-unsup-simcse --no-causal --pooling mean --prompt '' \\
        --mteb STSBenchmark,SICK-R --tasks stsb-test,sick-r-test
        # hub ids; MTEB tasks through mteb 2.x (pip install mteb), scores beside the local ones

Tasks: stsb-dev stsb-test sick-r-trial sick-r-test sts12..sts16 cranfield msmarco-subset dbpedia-subset;
groups: sts (test sets + average), dev (stsb-dev, sick-r-trial), retrieval. Use dev sets for choices.
Data comes from --data-dir (default: ../shared/data beside the repository; its README lists the files).
--mteb runs MTEB tasks with mteb 2.x (`l2v/mteb.py`: upstream llm2vec's per-task instructions, not
--sts-instruction); their scores (x100, named as mteb names them) join the results, and mteb's own result
files go to a folder beside --out (<out>-mteb/).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from l2v.cli import (
    DATA_DIR,
    USER_ERRORS,
    UserError,
    add_encoder_args,
    check_out_file,
    default_formatter,
    encoder_from_args,
    fail,
    settings_line,
)
from l2v.evaluation import GROUPS, STS_INSTRUCTION, TASKS, resolve_tasks, run_task
from l2v.files import write_json


def finite(x):
    """NaN / inf -> None, so the JSON stays valid (a constant score has no Spearman)."""
    return x if not isinstance(x, float) or math.isfinite(x) else None


def reported(r: dict) -> dict:
    """A task's result with JSON-safe scores, printed as one line."""
    r["scores"] = {m: finite(v) for m, v in r["scores"].items()}
    scores = ", ".join(f"{m} {v:.2f}" if v is not None else f"{m} undefined" for m, v in r["scores"].items())
    print(f"{r['task']}: {scores} ({r['seconds']:.0f}s)", flush=True)
    return r


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="eval.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples") :],
        formatter_class=default_formatter,
    )
    add_encoder_args(p)
    p.add_argument(
        "--tasks",
        help=f"comma-separated tasks or groups ({', '.join(GROUPS)}); default: dev, or none with --mteb",
    )
    p.add_argument("--mteb", help="comma-separated MTEB task names (e.g. STSBenchmark,SICK-R), via mteb 2.x")
    p.add_argument(
        "--sts-instruction", default=STS_INSTRUCTION, help="instruction on both sides of STS; '' for none"
    )
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="the data folder")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out") / time.strftime("eval-%Y%m%d-%H%M%S.json"),
        help="JSON results (a new file per run by default; out/ is git-ignored)",
    )
    p.error = lambda message: fail("eval.py", f"{message} (see --help)")  # one line, no usage block
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        return evaluate(args)
    except USER_ERRORS as e:
        if "no room for the text" in str(e):  # from check_inputs: name the flags, not an input number
            e = UserError("--sts-instruction / --prompt / --max-length: " + str(e).split(": ", 1)[1])
        fail("eval.py", e, args.debug)


def mteb_tasks(spec: str | None) -> list:
    """The --mteb tasks with their data, fetched before the model loads; mteb is needed only here."""
    if spec is None:
        return []
    from l2v import mteb

    try:
        tasks = mteb.get_tasks(spec)
    except ImportError as e:
        raise UserError(f"--mteb: {e}") from None
    for task in tasks:
        mteb.load_data(task)
    return tasks


def evaluate(args):
    if args.tasks is None:  # the local dev sets, unless only MTEB tasks were asked for
        args.tasks = "" if args.mteb else "dev"
    tasks = resolve_tasks(args.tasks) if args.tasks or not args.mteb else []
    if tasks and not args.data_dir.is_dir():
        raise UserError(f"--data-dir {args.data_dir}: folder not found")
    data = {name: TASKS[name].load(args.data_dir) for name in tasks}  # every file read before the model loads
    on_mteb = mteb_tasks(args.mteb)
    reads = [
        ("--model", args.model),
        *(("--adapter", a) for a in args.adapter),
        ("--data-dir", args.data_dir),
    ]
    check_out_file(args.out, "--out", ".json", reads)
    t0 = time.perf_counter()
    # Each task's instruction must leave room for a text within max_length: checked before the weights load.
    instructions = {args.sts_instruction if TASKS[n].kind == "sts" else TASKS[n].instruction for n in tasks}
    if on_mteb:
        from l2v.mteb import instruction_for

        instructions |= {instruction_for(t.metadata) for t in on_mteb}
    encoder = encoder_from_args(args, check_inputs=[(i or "", "text") for i in instructions])
    # The settings in force (some may come from the folders) go into the printout and the JSON.
    args.causal, args.pooling, args.prompt = encoder.model.config.is_causal, encoder.pooling, encoder.prompt
    print(
        f"loaded {args.model} (+{len(args.adapter)} adapters) in {time.perf_counter() - t0:.1f}s; "
        f"{settings_line(encoder)}",
        flush=True,
    )

    results = []
    for name in tasks:
        r = run_task(
            encoder,
            name,
            data[name],
            sts_instruction=args.sts_instruction or None,
            max_batch_tokens=args.max_batch_tokens,
        )
        results.append(reported(r))
    if on_mteb:
        from l2v.mteb import MTEBModel, run

        model = MTEBModel(encoder, max_batch_tokens=args.max_batch_tokens)
        folder = args.out.with_name(args.out.stem + "-mteb")  # mteb's own result files
        results += [reported(r) for r in run(model, on_mteb, output_folder=folder)]
    # The results table's "STS avg": over the STS test sets that ran; the dev sets stay out of it.
    sts = [
        r["scores"]["spearman"]
        for r in results
        if r["task"] in GROUPS["sts"] and r["scores"]["spearman"] is not None
    ]
    if len(sts) > 1:
        results.append(
            {
                "task": "sts-avg",
                "kind": "average",
                "n": len(sts),
                "seconds": 0.0,
                "scores": {"spearman": sum(sts) / len(sts)},
            }
        )

    w = max([16] + [len(r["task"]) + 2 for r in results])
    print(f"\n{'task':<{w}}{'metric':<16}{'score':>8}{'n':>8}{'seconds':>9}")
    for r in results:
        for metric, score in r["scores"].items():
            shown = f"{score:>8.2f}" if score is not None else f"{'-':>8}"
            print(f"{r['task']:<{w}}{metric:<16}{shown}{r['n']:>8}{r['seconds']:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        args.out,
        {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": results,
        },
    )
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
