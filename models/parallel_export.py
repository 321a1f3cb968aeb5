"""The ONNX exports of several trained networks at once, one process each.

torch.export traces a network in Python, on one core, whatever torch's thread count, so the
first CPU run of an ensemble of many folds exports them one after the other on one core unless
they are exported side by side. Each process loads its network from the weights file, exports
and checks it and records it in the cache beside the weights (`core.infer.onnx_cache`); the
caller then reads the cache. torch is imported in those processes only, so infer.py's process
stays torch-free when every export succeeds.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from core.infer.onnx_cache import lookup
from core.log import get_logger
from core.ranks import usable_cores

log = get_logger("onnx")


def export_one(weights: str, size: int, threads: int | None = None) -> None:
    """Export and check the network of `weights` at `size` px into its cache, unless another process
    (a torchrun peer) has done so meanwhile. `threads`: torch's thread count for the check's
    forward passes (None: left as it is)."""
    import torch

    from models.onnx_export import export_and_check
    from models.zoo import load_trained

    if threads is not None:
        torch.set_num_threads(threads)
    cached = lookup(Path(weights), size, threads or 0)
    if cached.state != "stale":
        return
    export_and_check(load_trained(weights).model.eval(), size, weights, cached)


def export_all(jobs: list[tuple[Path, int]], processes: int) -> None:
    """Export every (weights, size) of `jobs`, in this order, in up to `processes` spawned processes
    (torch is not fork-safe once its threads run), or in this one where one process is all there is
    to use. A job that fails in a spawned process is left to the caller, which exports in its own
    process what the cache still lacks and reports its error."""
    processes = min(processes, len(jobs))
    if processes <= 1:
        for weights, size in jobs:
            export_one(str(weights), size)
        return
    log.info("exporting %d networks to ONNX in %d processes (once per checkpoint)", len(jobs), processes)
    threads = max(1, usable_cores() // processes)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(export_one, str(weights), size, threads): weights for weights, size in jobs}
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 (redone, and reported, by the caller)
                log.warning("%s: export process failed (%s)", futures[future], str(err).strip().splitlines()[0])
