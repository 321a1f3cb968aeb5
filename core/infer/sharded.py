"""infer.py under torchrun, without a process group (so without torch on the CPU path): every
process scores every world-th input and writes what it found to a shard file beside the output;
process 0 waits for every shard, merges them in input order and writes the one output.

A shard is named `<out>.rank<r>-of-<world>.json` and carries a key: the hash of the arguments,
the inputs (path, size, modification time) and the weights and blend files they are scored
with. Process 0 takes only shards of its own key, so a shard left by an earlier run of other
inputs or models is never merged; one of the same key (a run that died before merging) holds
what this run would compute, and its process takes it instead of scoring again. Process 0
deletes the shards once the merged output is written.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from core.io import write_json
from core.log import get_logger
from core.ranks import DistInfo

POLL_SECONDS = 0.2
WAIT_NOTE_SECONDS = 60.0
log = get_logger("infer")


@dataclass
class Part:
    """What one process scored: the inputs' places in the full list, a row of the score table per
    input (NaN as None), the attributes per input, the video frames' rows and the problems reported."""

    indices: list[int]
    rows: list[list[float | None]]
    attributes: list[dict | None]
    per_frame: list[list]
    problems: list[str]


def run_key(arguments: dict, inputs: Iterable[Path], models: Iterable[Path]) -> str:
    """The hash of what a run's result depends on: its arguments and the stamps of its input and model files."""
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode())
    for path in [*inputs, None, *models]:  # None: inputs and models never run together
        if path is None:
            digest.update(b"\0")
            continue
        try:
            stat = path.stat()
            stamp = f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n"
        except OSError:
            stamp = f"{path}|absent\n"
        digest.update(stamp.encode())
    return digest.hexdigest()


def shard_path(out: str | Path, rank: int, world: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}-of-{world}.json")


def _read(path: Path, key: str) -> Part | None:
    """The part in `path` if it is a complete shard of this run's key, else None."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("key") != key:
        return None
    return Part(**found["part"])


def finished_part(out: str | Path, info: DistInfo, key: str) -> Part | None:
    """This process's shard as an earlier run of the same key left it, if there is one."""
    return _read(shard_path(out, info.rank, info.world), key)


def write_part(out: str | Path, info: DistInfo, key: str, part: Part) -> None:
    write_json({"key": key, "part": asdict(part)}, shard_path(out, info.rank, info.world))


def gather_parts(out: str | Path, info: DistInfo, key: str) -> list[Part]:
    """Every process's part, waited for (process 0 only). torchrun stops every process when one
    fails, so a shard that never comes does not leave this one waiting; processes started some
    other way (by hand, by a scheduler) are not watched, so every `WAIT_NOTE_SECONDS` a line names
    the ranks still awaited and the files they write."""
    parts: dict[int, Part] = {}
    started = noted = time.monotonic()
    while len(parts) < info.world:
        for rank in range(info.world):
            if rank not in parts and (part := _read(shard_path(out, rank, info.world), key)) is not None:
                parts[rank] = part
        if len(parts) == info.world:
            break
        if time.monotonic() - noted >= WAIT_NOTE_SECONDS:
            noted = time.monotonic()
            missing = [r for r in range(info.world) if r not in parts]
            log.info(
                "waited %.0f s for the shards of rank(s) %s (%s); a rank that died must be run again",
                noted - started,
                ", ".join(map(str, missing)),
                ", ".join(shard_path(out, r, info.world).name for r in missing),
            )
        time.sleep(POLL_SECONDS)
    return [parts[r] for r in range(info.world)]


def remove_shards(out: str | Path, info: DistInfo) -> None:
    for rank in range(info.world):
        shard_path(out, rank, info.world).unlink(missing_ok=True)
