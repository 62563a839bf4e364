"""Writing files so that nothing a user had is lost: every file goes to a temporary name in its own folder
and is renamed into place only once complete, so a crash, a kill or a full disk leaves the earlier file
intact; a full disk is one error naming the file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes the whole content to tmp; then tmp replaces `path` (same folder: an atomic rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                e.errno, f"{path}: no space left on the device (the earlier file, if any, is intact)"
            ) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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
