"""The data stage's resumable step engine: per-step bookkeeping, a worker pool, and the run of a
step's jobs, skipping finished outputs and sharing the rest among torchrun's processes.

A step is a list of jobs, each writing one output file named by its `name` (relative to the
stage's output folder) and yielding a `Result`. Resumable at two levels:

- every output is written atomically by its job and skipped when it exists, so a killed run
  loses only the outputs in flight;
- a step whose inputs fingerprint matches the stored one and whose done marker exists is not
  run at all; a changed fingerprint clears the step's outputs, logs and marker.

Under `torchrun --nproc_per_node K -m data_prep` (several processes, GPUs or nodes sharing the
output folder) every process plans the same jobs, takes every K-th unit of the missing ones
(a unit: one job, or a batch of jobs that must run together), writes their outputs and logs
their results in a log of its own; after a barrier every process reads all the logs. A unit's
output does not depend on which process runs it, so the result is the one of one process; a
process that dies leaves the outputs and log lines it finished for the rerun, whatever its
number of processes.

Bookkeeping, under `out/steps/`: `<step>.json` the inputs fingerprint, `<step>.jsonl` (one
process) or `<step>.rank<r>.jsonl` (process r) a line per finished output, `<step>.done` the
done marker with its counts.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from core.distributed import DistInfo, barrier, shard
from core.io import write_json
from core.log import get_logger
from core.progress import progress_bar

log = get_logger("data_prep")


class HasName(Protocol):
    name: str  # the output file, relative to the stage's output folder


J = TypeVar("J", bound=HasName)


@dataclass
class Result:
    name: str
    ok: bool
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class Steps:
    """Fingerprints, per-output logs and done markers under `out/steps/`, for the processes of `dist`.

    Only the first process changes the fingerprints and markers; each process appends to its own log.
    """

    def __init__(self, out: Path, dist: DistInfo | None = None) -> None:
        self.dir = out / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dist = dist or DistInfo()

    def _file(self, step: str, suffix: str) -> Path:
        return self.dir / f"{step.replace(':', '_')}.{suffix}"

    def _logs(self, step: str) -> list[Path]:
        """Every log of `step`: one process's, then each rank's (of this run and earlier ones)."""
        single = self._file(step, "jsonl")
        ranks = sorted(self.dir.glob(f"{single.stem}.rank*.jsonl"), key=lambda p: p.name)
        return [single, *ranks]

    def _own_log(self, step: str) -> Path:
        return self._file(step, f"rank{self.dist.rank}.jsonl" if self.dist.enabled else "jsonl")

    def begin(self, step: str, fingerprint: dict, outputs: Path | None) -> bool:
        """Start `step`; True if it is already done for this fingerprint.

        A fingerprint different from the stored one clears the step's outputs, logs and marker.
        Every process calls it; they return after the first has checked (and cleared).
        """
        if self.dist.is_main:
            self._check(step, fingerprint, outputs)
        barrier(self.dist)
        return self._file(step, "done").is_file()

    def _check(self, step: str, fingerprint: dict, outputs: Path | None) -> None:
        fp_file = self._file(step, "json")
        try:
            stored = json.loads(fp_file.read_text())
        except (OSError, ValueError):
            stored = None
        if stored == fingerprint:
            return
        if stored is not None:
            log.info("%s: inputs changed since the last run; rebuilding it", step)
        self._file(step, "done").unlink(missing_ok=True)
        for path in self._logs(step):
            path.unlink(missing_ok=True)
        if outputs is not None and outputs.is_dir():
            shutil.rmtree(outputs)
        write_json(fingerprint, fp_file)

    def finish(self, step: str, summary: dict) -> None:
        if self.dist.is_main:
            write_json(summary, self._file(step, "done"))

    def results(self, step: str) -> dict[str, Result]:
        """The logged result per output name: the last in its log and, across logs, a success
        over a failure (an output that failed in one run and was made in another). A torn last
        line from a kill is ignored."""
        found: dict[str, Result] = {}
        for path in self._logs(step):
            if not path.is_file():
                continue
            last: dict[str, Result] = {}
            for line in path.read_text().splitlines():
                try:
                    res = Result(**json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue
                last[res.name] = res
            for name, res in last.items():
                if name not in found or res.ok or not found[name].ok:
                    found[name] = res
        return found

    def appender(self, step: str) -> Callable[[Result], None]:
        path = self._own_log(step)
        # A run killed mid-line leaves a torn last line; end it, so the next record parses.
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as fh:
                fh.write("\n")

        def append(res: Result) -> None:
            with open(path, "a") as fh:
                fh.write(json.dumps(asdict(res), default=str) + "\n")

        return append


class Workers:
    """A spawn pool started on first use and shared by the faces and edits steps.

    spawn, not fork: the parent may hold torch or dlib threads, which fork can deadlock.
    Starting the pool once saves each step the workers' imports and model loading.
    """

    def __init__(self, n: int) -> None:
        self.n = max(1, int(n))
        self._pool: Any = None

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str, progress: bool) -> Iterable[Any]:
        """fn over items, in the pool when there are several workers; results in completion order."""
        bar = progress_bar(total=len(items), desc=desc, unit="img", disable=not progress)
        try:
            if self.n == 1 or len(items) <= 1:
                for item in items:
                    yield fn(item)
                    bar.update(1)
                return
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(self.n)
            chunk = max(1, min(16, len(items) // (4 * self.n)))
            for res in self._pool.imap_unordered(fn, items, chunksize=chunk):
                yield res
                bar.update(1)
        finally:
            bar.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


def one_each(jobs: list[J]) -> list[list[J]]:
    """Units of one job: jobs that run alone (an image edit)."""
    return [[job] for job in jobs]


def my_share(items: Sequence[Any], dist: DistInfo) -> list[Any]:
    """This process's share of `items`: every world-th, from its rank on."""
    return [items[i] for i in shard(len(items), dist)]


def run_step(
    step: str,
    jobs: list[J],
    out: Path,
    steps: Steps,
    runner: Callable[[list[list[J]]], Iterable[Result]],
    units: Callable[[list[J]], list[list[J]]] = one_each,
) -> dict[str, Result]:
    """Run this process's share of the units that miss an output, log each result as it
    arrives, and, once every process has finished its share, return every job's result.

    `units` groups the jobs into the units a process takes whole, the same in every process
    and on every run (they are made from the whole plan): a batch runs as it would have in one
    uninterrupted process. `runner` runs a list of units, yielding a result for each job whose
    output was missing.
    """
    missing = {job.name for job in jobs if not (out / job.name).is_file()}
    if len(missing) < len(jobs):
        log.info("%s: %d of %d outputs exist; skipping them", step, len(jobs) - len(missing), len(jobs))
    todo = [unit for unit in units(jobs) if any(job.name in missing for job in unit)]
    barrier(steps.dist)  # every process has listed the missing outputs before any is made: the same list
    append = steps.appender(step)
    for res in runner(my_share(todo, steps.dist)):
        append(res)
    barrier(steps.dist)
    logged = steps.results(step)
    results: dict[str, Result] = {}
    for job in jobs:
        res = logged.get(job.name)
        if (out / job.name).is_file():
            results[job.name] = res if res is not None and res.ok else Result(job.name, True)
        elif res is not None and not res.ok:
            results[job.name] = res
    return results
