"""Where every pretrained part came from: the hub (name, file and revision) or a local file (its path
and SHA-256), one log line per part, and the same records for meta.json.

Loaders call `record(...)`. train.py wraps each build in `recording(stage, sources)` and writes the
collected `Source`s to meta.json; outside a recording (inference, which reads no pretrained source)
a part built without pretrained weights is not logged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path

from core.io import file_sha256
from core.log import get_logger

log = get_logger("pretrained")

HUB, FILE, NONE = "hub", "file", "none"
_RECORDINGS: ContextVar[tuple[tuple[str, list], ...]] = ContextVar("pretrained_recordings", default=())
_SHA256: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> digest: experts often share a file


@dataclass(frozen=True)
class Source:
    """One pretrained part as loaded. `what`: the network (e.g. `timm legacy_xception`); `origin`:
    hub, file, package or none (random initialisation); `location`: the hub repository and file,
    or the local path; `revision`: the hub's commit; `sha256`: a local file's digest; `layout`: the
    foreign layout it was converted from; `stage`: the build it belongs to (model, recipe, loss)."""

    what: str
    origin: str
    location: str = ""
    revision: str | None = None
    sha256: str | None = None
    layout: str | None = None
    stage: str = ""

    def describe(self) -> str:
        if self.origin == NONE:
            return f"{self.what}: random initialisation (no pretrained weights configured)"
        if self.origin == HUB:
            version = f"revision {self.revision}" if self.revision else f"sha256 {self.sha256 or 'unknown'}"
            where = f"the hub ({self.location}, {version})"
        else:
            where = f"{self.location} (sha256 {self.sha256})"
        converted = f", converted from {self.layout}" if self.layout else ""
        return f"{self.what} from {where}{converted}"

    def as_dict(self) -> dict:
        return asdict(self)


def sha256_of(path: str | Path) -> str:
    """A file's SHA-256, computed once per process for an unchanged file."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]


def local_source(what: str, path: str | Path, layout: str | None = None) -> Source:
    return Source(what, FILE, str(path), sha256=sha256_of(path), layout=layout)


def hub_cache_revision(path: str | Path) -> str | None:
    """The commit of a file in the Hugging Face cache (`.../snapshots/<commit>/<file>`), else None."""
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def record(source: Source) -> None:
    """Log where a part came from and add it to every open recording (with the innermost stage)."""
    frames = _RECORDINGS.get()
    if source.origin == NONE and not frames:
        return  # rebuilt for a trained checkpoint: nothing pretrained is asked for
    stage = frames[-1][0] if frames else ""
    source = Source(**{**source.as_dict(), "stage": stage})
    log.info("pretrained %s%s", f"{stage}: " if stage else "", source.describe())
    for _, sources in frames:
        sources.append(source)


@contextlib.contextmanager
def recording(stage: str, sources: list[Source]) -> Iterator[list[Source]]:
    """Collect into `sources` every part loaded inside the block, labelled `stage`."""
    token = _RECORDINGS.set((*_RECORDINGS.get(), (stage, sources)))
    try:
        yield sources
    finally:
        _RECORDINGS.reset(token)
