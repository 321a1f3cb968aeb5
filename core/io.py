"""Atomic file writes: a reader never sees a half-written output."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only named in a signature: importing pandas costs infer.py's fast path ~0.5 s
    import pandas as pd

# The process's umask, read once at import (os.umask can only be read by setting it): a file made
# by mkstemp is private (0600), so each output gets the mode a plain open() would have given it.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_with(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Call `writer(tmp)` and move the result to `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    return write_with(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(obj: object, path: str | Path) -> Path:
    return write_with(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_text(text: str, path: str | Path) -> Path:
    return write_with(path, lambda tmp: Path(tmp).write_text(text))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (weights files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
