"""How k-means time and memory grow with the number of images; prints JSON.

    python -m bench.kmeans_scaling                              # 1e4, 1e5, 1e6 x 512-d, K = 8
    python -m bench.kmeans_scaling --sizes 10000 100000 --iters 5

Each size runs in its own process (so its peak memory is its own) on synthetic float32
features: K well-separated directions plus noise, L2-normalised like the real embeddings.
`core.data.clustering.kmeans` runs with tol = 0, so every size does exactly `--iters` full-data
iterations and the time per iteration is comparable across sizes; torch_kmeans's
initialisation on a memory-capped sample is timed apart (it does not grow with N).
For reference, torch_kmeans alone on all the data is timed where it fits (`--direct-max`);
it materialises restarts x N x K x D floats per distance step, which at 1e6 x 512 x 8 is
16 GB per copy.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def synthetic(n: int, dim: int, k: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """Unit rows around k random directions, filled in chunks so the only big array is the result."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim), dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        part = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32) * 0.5
        part += centres[rng.integers(0, k, len(part))]
        x[start : start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(n: int, dim: int, k: int, iters: int, seed: int, direct: bool) -> dict:
    from core.data.clustering import kmeans

    x = synthetic(n, dim, k, seed)
    rss_before = peak_rss_mb()  # torch, the data and generation scratch: what k-means adds comes on top
    t0 = time.perf_counter()
    res = kmeans(x, k, seed=seed, max_iter=iters, tol=0.0)
    row = {
        "n": n,
        "dim": dim,
        "k": k,
        "data_mb": round(x.nbytes / 2**20, 1),
        "seconds": round(time.perf_counter() - t0, 3),
        "init_seconds": round(res.init_seconds, 3),
        "init_points": res.fit_size,
        "iterations": res.n_iter,
        "iter_seconds": round(res.iter_seconds, 3),
        "seconds_per_iter": round(res.iter_seconds / res.n_iter, 4),
        "peak_rss_mb_before": round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if direct:
        from core.data.clustering import KMeans  # torch_kmeans, imported there without its warning

        t1 = time.perf_counter()
        KMeans(init_method="rnd", num_init=1, max_iter=iters, tol=0.0, seed=seed, verbose=False)(
            torch.from_numpy(x)[None], k=k
        )
        row["torch_kmeans_direct_seconds_per_iter"] = round((time.perf_counter() - t1) / iters, 4)
        row["peak_rss_mb_with_direct"] = round(peak_rss_mb(), 1)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--iters", type=int, default=10, help="full-data iterations per size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--direct-max", type=int, default=10_000, help="also time plain torch_kmeans up to this N")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    args = p.parse_args(argv)

    if args.one is not None:
        row = run_one(args.one, args.dim, args.k, args.iters, args.seed, args.one <= args.direct_max)
        print(json.dumps(row))
        return 0

    rows = []
    for n in args.sizes:
        cmd = [sys.executable, "-m", "bench.kmeans_scaling", "--one", str(n), "--dim", str(args.dim)]
        cmd += ["--k", str(args.k), "--iters", str(args.iters), "--seed", str(args.seed)]
        cmd += ["--direct-max", str(args.direct_max)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"size {n} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"n={n}: {rows[-1]}", file=sys.stderr)
    growth = []
    for a, b in zip(rows, rows[1:], strict=False):
        per_10x = np.log(10) / np.log(b["n"] / a["n"])  # normalise the ratio to a 10x step
        growth.append(
            {
                "from": a["n"],
                "to": b["n"],
                "per_iter_ratio_per_10x": round((b["seconds_per_iter"] / a["seconds_per_iter"]) ** per_10x, 2),
                "total_ratio_per_10x": round((b["seconds"] / a["seconds"]) ** per_10x, 2),
            }
        )
    out = {
        "benchmark": "kmeans_scaling",
        "host": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "rows": rows,
        "growth": growth,
        "linear_enough": all(g["per_iter_ratio_per_10x"] <= 15 for g in growth),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
