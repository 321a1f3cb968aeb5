"""k-means over image embeddings, deterministic for a seed and linear in the number of images.

torch_kmeans runs k-means++ initialisation with several restarts and Lloyd's iterations on
a sample of the data. It materialises a (restarts x N x K x D) tensor to compute distances,
so it is given only as many points as fit in `fit_memory` (all of them for small data).
Its centres then seed full-data Lloyd's iterations that stream the features in chunks,
with distances from one matrix product per chunk: memory is O(chunk x K), time per
iteration O(N x K x D). Clusters are numbered by decreasing size, so cluster 0 is the
largest whatever the initialisation order.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

with warnings.catch_warnings():
    # torch_kmeans decorates helpers with torch.jit.script, which warns as deprecated on import.
    warnings.simplefilter("ignore", FutureWarning)
    from torch_kmeans import KMeans

from core.data.features import finite_rows
from core.report import pyplot, save_figure

# torch_kmeans peaks at about four tensors of restarts x N x K x D floats (measured); one spare.
_TORCH_KMEANS_COPIES = 5


@dataclass
class KMeansResult:
    labels: np.ndarray  # (N,) cluster per row, 0 = largest cluster
    centers: np.ndarray  # (K, D) in label order
    inertia: float  # sum of squared distances to the assigned centre
    n_iter: int  # full-data Lloyd iterations run
    fit_size: int  # points torch_kmeans initialised on
    init_seconds: float  # torch_kmeans on the sample
    iter_seconds: float  # all full-data iterations together

    @property
    def sizes(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.centers)).tolist()


def fit_sample_size(n: int, k: int, d: int, n_init: int, fit_memory: int) -> int:
    """How many points torch_kmeans may see within `fit_memory` bytes (at least 20 per cluster)."""
    per_point = _TORCH_KMEANS_COPIES * n_init * k * d * 4
    return int(min(n, max(20 * k, fit_memory // per_point)))


def _row_sq_norms(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    # Computed once per run: |x|^2 only enters the distances, never the argmin.
    return torch.cat(
        [torch.linalg.vector_norm(x[s : s + chunk_size], dim=1) ** 2 for s in range(0, len(x), chunk_size)]
    )


def _assign_pass(
    x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, chunk_size: int, accumulate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Nearest centre and squared distance per row; with `accumulate`, per-cluster sums and counts."""
    k, d = centers.shape
    c_sq = (centers * centers).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=centers.device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=centers.device)
    sums = torch.zeros(k, d, dtype=torch.float32, device=centers.device) if accumulate else None
    counts = torch.zeros(k, dtype=torch.float32, device=centers.device) if accumulate else None
    for start in range(0, x.shape[0], chunk_size):
        xc = x[start : start + chunk_size].to(centers.device, non_blocking=True)
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; the argmin needs only the last two terms.
        partial = torch.addmm(c_sq[None, :], xc, centers.T, alpha=-2.0)
        best, idx = partial.min(dim=1)
        labels[start : start + len(xc)] = idx
        dist[start : start + len(xc)] = (best + x_sq[start : start + len(xc)].to(best.device)).clamp_min_(0)
        if accumulate:
            # A one-hot product instead of index_add_: same sums, but deterministic on GPU too.
            onehot = torch.nn.functional.one_hot(idx, k).to(xc.dtype)
            sums += onehot.T @ xc
            counts += onehot.sum(0)
    return labels, dist, sums, counts


def kmeans(
    features: np.ndarray | torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 4,
    max_iter: int = 100,
    tol: float = 1e-4,
    device: torch.device | str = "cpu",
    chunk_size: int = 65536,
    fit_memory: int = 512 << 20,
) -> KMeansResult:
    """Cluster the rows of `features` into `k` clusters; the same input and seed give the same labels.

    `tol` is the relative change of the centres (Frobenius norm) below which the iterations
    stop; `tol=0` runs exactly `max_iter` full-data iterations (what a timing wants).
    """
    device = torch.device(device)
    if isinstance(features, np.ndarray):
        with warnings.catch_warnings():
            # A read-only memory map (cached features) is shared, not copied, and never written here.
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            x = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
    else:
        x = features
    x = x.float()
    n, d = x.shape
    if not 2 <= k < n:
        raise ValueError(f"k must be between 2 and the number of images - 1 ({n - 1}), got {k}")
    # Chunked: torch.isfinite on the whole of 1e6 x 512 briefly takes 3 GB.
    if not all(torch.isfinite(x[s : s + chunk_size]).all() for s in range(0, n, chunk_size)):
        raise ValueError("features contain NaN or inf; drop those rows first")

    t0 = time.perf_counter()
    fit_size = fit_sample_size(n, k, d, n_init, fit_memory)
    if fit_size < n:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=fit_size, replace=False))
        sample = x[torch.from_numpy(rows)]
    else:
        sample = x
    # torch_kmeans asserts more points than restarts.
    restarts = max(1, min(n_init, fit_size - 1))
    model = KMeans(init_method="k-means++", num_init=restarts, max_iter=max_iter, tol=tol, seed=seed, verbose=False)
    centers = model(sample.to(device)[None], k=k).centers[0].float()
    init_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    x_sq = _row_sq_norms(x, chunk_size)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        _, dist, sums, counts = _assign_pass(x, x_sq, centers, chunk_size, accumulate=True)
        new = sums / counts.clamp_min(1)[:, None]
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # Re-seed an empty cluster with the points worst served by their centres.
            far = torch.topk(dist, len(empty)).indices
            new[empty] = x[far.cpu()].to(new.device)
        shift = float((new - centers).norm() / centers.norm().clamp_min(1e-12))
        centers = new
        if tol > 0 and shift < tol:
            break
    labels, dist, _, _ = _assign_pass(x, x_sq, centers, chunk_size, accumulate=False)
    iter_seconds = time.perf_counter() - t1

    labels_np = labels.cpu().numpy()
    counts_np = np.bincount(labels_np, minlength=k)
    first_seen = np.array([np.argmax(labels_np == c) if counts_np[c] else n for c in range(k)])
    order = np.lexsort((first_seen, -counts_np))  # largest first; ties by first appearance
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return KMeansResult(
        labels=rank[labels_np],
        centers=centers.cpu().numpy()[order],
        inertia=float(dist.double().sum()),
        n_iter=n_iter,
        fit_size=fit_size,
        init_seconds=init_seconds,
        iter_seconds=iter_seconds,
    )


def sweep(
    features: np.ndarray,
    ks: list[int],
    *,
    seed: int = 0,
    silhouette_sample: int = 5000,
    **kmeans_kwargs,
) -> list[dict]:
    """Inertia and silhouette (on a fixed random sample of rows, for speed) for each K."""
    from sklearn.metrics import silhouette_score

    rows = []
    for k in ks:
        res = kmeans(features, k, seed=seed, **kmeans_kwargs)
        sample = min(len(features), silhouette_sample)
        sil = silhouette_score(features, res.labels, sample_size=sample, random_state=seed)
        sizes = res.sizes
        rows.append(
            {
                "k": k,
                "inertia": round(res.inertia, 4),
                "silhouette": round(float(sil), 4),
                "smallest": min(sizes),
                "largest": max(sizes),
                "iterations": res.n_iter,
                "seconds": round(res.init_seconds + res.iter_seconds, 3),
            }
        )
    return rows


def plot_projection(
    features: np.ndarray,
    clusters: np.ndarray,
    targets: np.ndarray,
    path: str | Path,
    *,
    seed: int = 0,
    tsne_max: int = 2000,
    max_points: int = 20000,
    title: str = "",
) -> Path:
    """2-D PCA of the features coloured by cluster and by label; a t-SNE row too when N <= `tsne_max`.

    Rows without features (NaN) are left out; above `max_points` a fixed random subset is drawn.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    keep = np.flatnonzero(finite_rows(features))
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_points, replace=False))
    x, c, t = features[keep], np.asarray(clusters)[keep], np.asarray(targets)[keep]
    views = [("PCA", PCA(n_components=2, random_state=seed).fit_transform(x))]
    if len(x) <= tsne_max:
        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        views.append(("t-SNE", TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)))
    plt = pyplot()
    fig, axes = plt.subplots(len(views), 2, figsize=(10, 4.6 * len(views)), squeeze=False)
    cmap = plt.get_cmap("tab20" if c.max(initial=0) >= 10 else "tab10")
    for row, (name, xy) in zip(axes, views, strict=True):
        for k in np.unique(c):
            sel = c == k
            row[0].scatter(xy[sel, 0], xy[sel, 1], s=8, color=cmap(int(k) % cmap.N), label=f"cluster {k}")
        for label, colour, text in ((0, "tab:blue", "real"), (1, "tab:red", "fake")):
            sel = t == label
            row[1].scatter(xy[sel, 0], xy[sel, 1], s=8, color=colour, alpha=0.6, label=text)
        row[0].set_title(f"{name}, coloured by cluster")
        row[1].set_title(f"{name}, coloured by label")
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return save_figure(fig, path, title)
