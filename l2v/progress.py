"""Progress for long work: a tqdm bar in a terminal; elsewhere (a log file, a pipe, a batch job) one line
every `every_s` seconds, so that a job's log shows it is alive, and nothing at all for short work."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


def progress(
    items: Iterable,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    every_s: float = 30.0,
    enabled: bool = True,
) -> Iterator:
    if not enabled:
        yield from items
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        return
    t0 = last = time.monotonic()
    done = 0
    for x in items:
        yield x
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of = f"/{total} ({100 * done / total:.0f}%)" if total else ""
            print(f"{desc}: {done}{of} {unit}, {now - t0:.0f}s", file=sys.stderr, flush=True)
    if last > t0:  # only long work printed anything: close it with a last line
        print(f"{desc}: {done} {unit} in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
