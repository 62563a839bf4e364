"""Writing files so that nothing a user had is lost: every file goes to a temporary name in its own folder
and is renamed into place only once complete, so a crash, a kill or a full disk leaves the earlier file
intact; a full disk is one error naming the file (or the folder being written)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError


def disk_full(e: BaseException) -> bool:
    """A full disk or quota, as Python reports it, or as safetensors' writer does (its own error type, with
    the OS's message: "No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    codes = (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, SafetensorError) and any(f"(os error {n})" in str(e) for n in codes)


def no_space(path, earlier: str = "the earlier file, if any, is intact") -> OSError:
    return OSError(errno.ENOSPC, f"{path}: no space left on the device ({earlier})")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes the whole content, then tmp replaces `path` (same folder: an atomic rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        if disk_full(e):
            raise no_space(path) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextlib.contextmanager
def folder_write(final: str | os.PathLike, tmp: str | os.PathLike):
    """Around writing the temporary folder `tmp` that will become `final`: on any failure `tmp` goes, and a
    full disk is one error naming `final` (whose earlier version, if any, is untouched)."""
    try:
        yield Path(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise no_space(final, f"while writing it in {tmp}; the earlier files are intact") from None
        raise


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """A safetensors file, atomically; a full disk is the usual one error (not safetensors' own)."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_torch(path: str | os.PathLike, obj) -> Path:
    """torch.save, atomically. Serialised in memory first: torch reports a failed write of its own file
    as an unrelated RuntimeError ("unexpected pos ..."), Python's write as the OSError it is."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buf.getvalue()))


def append_line(path: str | os.PathLike, line: str) -> None:
    """One line appended to a log (a log grows: no temporary file); a full disk names the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        if disk_full(e):
            raise no_space(path, "the lines before this one are intact") from None
        raise


def check_writable_folder(path: str | os.PathLike, flag: str) -> None:
    """A folder to be written later: it must not be a file, and its nearest existing parent must be a
    folder this process can write in (tried for real: permission bits say nothing for root)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError:
        raise ValueError(f"{flag} {path}: {parent} is not a writable folder") from None


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """Strict JSON (NaN and infinities are refused, as JSON has none)."""
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_npy(path: str | os.PathLike, array) -> Path:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
