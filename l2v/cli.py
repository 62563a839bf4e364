"""What the command lines share: where the demo model and the data live, the one-line error, flag types,
output-file checks, and the encoder flags of `encode.py` and `eval.py` with building an `Encoder` from
them."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "models" / "smollm2-135m-instruct"
# The project's data folder beside the checkout; L2V_SHARED points elsewhere (CI hides it this way).
SHARED = Path(os.environ.get("L2V_SHARED", REPO.parent / "shared"))
DATA_DIR = SHARED / "data"
# What a user's mistake can raise, wherever it is found: reported as one line (tracebacks with --debug).
USER_ERRORS = (ValueError, OSError, TypeError)


class UserError(ValueError):
    """A mistake in the command line, a config or a file: one line, no traceback."""


class default_formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows every flag's default (where it has one to show)."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default == []
        return action.help if unset else super()._get_help_string(action)


def fail(script: str, error, debug: bool = False) -> None:
    """A user's mistake: one line `<script>: error: ...` (from rank 0 only under torchrun) and exit status 2;
    --debug re-raises."""
    if debug and isinstance(error, BaseException):
        raise error
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"{script}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def positive_int(raw: str) -> int:
    if not raw.strip().lstrip("-").isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {raw!r}")
    return int(raw)


def check_out_file(path: Path, flag: str, suffix: str, reads=()) -> None:
    """Refuse an output path that cannot be written, or that would replace a file of a folder the run reads
    (`reads`: (flag, folder) pairs; a model's config.json is a .json file too), before any work is done."""
    if path.suffix != suffix:
        raise UserError(f"{flag} {path}: expected a {suffix} file name")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder")
    if path.exists() or path.is_symlink():  # a new file beside the inputs harms nothing
        where = path.parent.resolve()
        for read_flag, folder in reads:
            if Path(folder).is_dir() and where.is_relative_to(Path(folder).resolve()):
                raise UserError(f"{flag} {path}: would replace a file in {read_flag} {folder}, which is read")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    try:  # a real write: permission bits say nothing for root or read-only file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError:
        raise UserError(f"{flag} {path}: {parent} is not a writable folder") from None


# ----------------------------------------------------------------------------- encoder flags


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    """The flags that choose a model, its adapters and the encoding settings (encode.py, eval.py)."""
    from .encoder import CHAT_TEMPLATES, POOLING_MODES

    p.add_argument(
        "--model",
        default=str(DEMO_MODEL),
        help="HF model folder or hub id (default: the demo model, which `make setup` builds)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="PEFT adapter folder or hub id, merged in the order given (repeatable)",
    )
    p.add_argument("--pooling", choices=POOLING_MODES, help="default: the folders' settings, else mean")
    p.add_argument(
        "--prompt",
        help="template around each text with one {text} slot (e.g. PromptEOL); '' for "
        "none (default: the folders' settings)",
    )
    p.add_argument(
        "--causal",
        action=argparse.BooleanOptionalAction,
        help="causal attention (default: the folders' settings, else bidirectional)",
    )
    p.add_argument("--max-length", type=positive_int, help="token limit of instruction + text (default: 512)")
    p.add_argument(
        "--chat-template", choices=sorted(CHAT_TEMPLATES) + ["auto"], help="wrap inputs in a chat turn"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    p.add_argument(
        "--autocast",
        default="auto",
        choices=["auto", "bfloat16", "none"],
        help="bf16 matmuls over the weights; auto: where bf16 is fast (GPUs, AVX512-BF16/AMX CPUs)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        help="tokens per forward pass; texts are packed (default: 2048 on CPU, 16384 on GPU)",
    )
    p.add_argument(
        "--check-adapters",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refuse adapters given without (or out of the order of) the adapters they were trained on",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def encoder_from_args(args, check_inputs=None):
    """An Encoder from add_encoder_args' flags; every file and `check_inputs` checked before weights load."""
    from .encoder import Encoder

    return Encoder.from_pretrained(
        args.model,
        adapters=args.adapter,
        is_causal=args.causal,
        dtype=args.dtype,
        pooling=args.pooling,
        max_length=args.max_length,
        prompt=args.prompt,
        chat_template=args.chat_template,
        device=args.device,
        autocast=args.autocast,
        check_inputs=check_inputs,
        check_adapters=args.check_adapters,
    )


def settings_line(enc) -> str:
    """The settings in force, in one line, and where the ones not given as flags came from."""
    attn = "causal" if enc.model.config.is_causal else "bidirectional"
    dtype = str(next(enc.model.parameters()).dtype).removeprefix("torch.")
    parts = [
        f"{attn} attention",
        f"{enc.pooling} pooling",
        f"prompt {enc.prompt!r}" if enc.prompt else "no prompt",
        f"{dtype} weights" + (" + bf16 autocast" if enc.autocast else ""),
        f"dim {enc.model.config.dim}",
    ]
    src = (
        f" (from {', '.join(enc.settings_sources)}; flags override)"
        if enc.settings_sources
        else " (upstream's defaults; flags override)"
    )
    return "settings: " + ", ".join(parts) + src
