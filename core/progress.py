"""Progress bars on a terminal, one line per stage in a log file.

A tqdm bar redraws itself with carriage returns; written to a file or a CI log, every
redraw stays, and a demo run left a log of several megabytes. `progress_bar` gives a tqdm
bar when stderr is a terminal and otherwise a quiet stand-in with the same methods that
writes one summary line when it closes (`leave=True` bars: a stage's total), or nothing
(`leave=False` bars: an epoch or a prediction pass, whose caller logs its own line).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

from core.log import get_logger

log = get_logger("progress")


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class LineProgress:
    """The part of tqdm's interface the pipeline uses, logging at most one line, on close."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, unit: str, leave: bool) -> None:
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else _length(iterable)
        self.unit = unit
        self.leave = leave
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.start = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                self.n += 1
                yield item
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.leave:
            return
        seconds = time.perf_counter() - self.start
        of = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        log.info("%s: %d%s %s in %.1fs%s", self.desc, self.n, of, self.unit, seconds, extra)


def _length(iterable: Iterable | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str = "",
    total: int | None = None,
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
) -> Any:
    """A tqdm bar on a terminal; elsewhere a `LineProgress` (see the module docstring).

    `disable=True` gives a silent tqdm in both cases, so callers keep one code path.
    """
    if disable or stderr_is_terminal():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=leave)
    return LineProgress(iterable, desc, total, unit, leave)
