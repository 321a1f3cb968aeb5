"""Build validation folds that never split images sharing pixels (or a person) across folds.

  python cv_split.py                          # mode from configs/data.yaml (split.mode)
  python cv_split.py --mode clusters          # hold out whole k-means clusters of image embeddings
  python cv_split.py --mode stratified        # label-stratified random parent groups
  python cv_split.py --sweep 4 12             # inertia and silhouette for K = 4..12, no folds written
  python cv_split.py split.k=8 split.n_folds=4 --force   # overrides as key=value

Groups: images linked by the manifest's `parent` and `sources` (every image that gave
another pixels), transitively; with split.group_by identity (or auto, where it leaves at
least n_folds groups), also every face of one person (the data stage's face embeddings,
joined within split.identity_distance). No group spans two folds, in either mode.

Cluster mode embeds every train image with split.encoder (keys under split.demo replace
those of split on the demo sample), caches the features under <outputs>/features/, clusters them with k-means
(K = split.k), moves each group whole into its majority cluster, and holds out
whole clusters as folds (K == n_folds: fold i is cluster i).

Writes folds.csv (img_name,target,cluster,fold), its resolved config, folds_report.md and
folds_report.json (counts per fold by label, method, group and identity, the largest
group's share, cluster sizes) and, in cluster mode, folds_clusters.png (2-D projection
coloured by cluster and by label).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import ConfigError, load_config, read_yaml, save_config
from core.data.clustering import kmeans, plot_projection, sweep
from core.data.features import FeatureError, cached_features, finite_rows
from core.data.folds import (
    FOLD_COLUMNS,
    FoldError,
    check_folds,
    cluster_folds,
    fold_summary,
    identity_labels,
    largest_group,
    split_groups,
    stratified_group_folds,
    summary_markdown,
)
from core.data.labels import LabelError
from core.data.sources import DataPaths, read_train_table, resolve_data
from core.data.transforms import build_transform
from core.device import pick_device
from core.io import write_csv, write_json, write_text
from core.log import get_logger
from models.encoders import EncoderError, build_encoder, encoder_key

log = get_logger("cv_split")

MODES = ("clusters", "stratified")
GROUP_BY = ("auto", "parent", "identity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument("--mode", choices=MODES, help="split mode (default: split.mode in the config)")
    p.add_argument("--out", help="folds CSV to write (default: paths.folds in the config)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folds file exists")
    p.add_argument(
        "--sweep", nargs=2, type=int, metavar=("KMIN", "KMAX"), help="report inertia and silhouette for each K"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    # Intermixed: overrides may come before and after options (`split.k=8 --force split.n_folds=4`).
    return p.parse_intermixed_args(argv)


def report_paths(folds_csv: Path) -> dict[str, Path]:
    """Where the report of a folds file goes: beside it, named after it."""
    stem = folds_csv.with_suffix("")
    return {
        "md": Path(f"{stem}_report.md"),
        "json": Path(f"{stem}_report.json"),
        "png": Path(f"{stem}_clusters.png"),
    }


def resolve_split(cfg: dict, data: DataPaths) -> dict:
    """The config with the keys of `split.demo` replacing those of `split` on the demo sample
    (whole values: a demo encoder shares nothing with the real one), `split.demo` dropped."""
    split = dict(cfg["split"])
    demo = split.pop("demo", None) or {}
    if not isinstance(demo, dict):
        raise ConfigError("split.demo must be a mapping of split keys")
    return {**cfg, "split": {**split, **demo} if data.is_demo else split}


def encoder_cfg(cfg: dict) -> dict:
    """`split.encoder` of a resolved config (see `resolve_split`)."""
    chosen = cfg["split"].get("encoder")
    if not chosen:
        raise ConfigError("split.encoder is not set; cluster mode needs an encoder config")
    return dict(chosen)


def image_features(cfg: dict, df: pd.DataFrame) -> np.ndarray:
    """L2-normalised embedding per train image (NaN rows for undecodable files), cached."""
    split = cfg["split"]
    enc_cfg = encoder_cfg(cfg)

    def build():
        encoder = build_encoder(enc_cfg)
        return encoder.module, build_transform(encoder.transform_cfg(), train=False)

    feats, stats = cached_features(
        df["img_name"].tolist(),
        df["path"].tolist(),
        Path(cfg["paths"]["outputs"]) / "features",
        encoder_key(enc_cfg),
        build,
        pick_device(split.get("device", "auto")),
        batch_size=int(split.get("batch_size", 64)),
        num_workers=int(split.get("num_workers", 0)),
        progress=bool(split.get("progress", True)),
    )
    log.info(
        "features %s: %d reused, %d computed, %d failed", feats.shape, stats.reused, stats.computed, len(stats.failed)
    )
    return feats


def kmeans_options(cfg: dict) -> dict:
    opts = dict(cfg["split"].get("kmeans") or {})
    out = {k: opts[k] for k in ("n_init", "max_iter", "tol") if k in opts}
    if "fit_memory_mb" in opts:
        out["fit_memory"] = int(opts["fit_memory_mb"]) << 20
    out["device"] = pick_device(cfg["split"].get("device", "auto"))
    return out


def cluster_labels(cfg: dict, feats: np.ndarray) -> np.ndarray:
    """k-means cluster per row; -1 for rows without features."""
    split = cfg["split"]
    k = int(split.get("k") or split["n_folds"])
    ok = finite_rows(feats)
    if ok.sum() <= k:
        raise FoldError(f"only {int(ok.sum())} image(s) with features for k={k} clusters")
    rows = feats if ok.all() else feats[ok]  # the memory-mapped features themselves where all are there
    res = kmeans(rows, k, seed=int(split["seed"]), **kmeans_options(cfg))
    log.info(
        "k-means K=%d: sizes %s, inertia %.3f (torch_kmeans on %d images, then %d full-data iteration(s))",
        k,
        res.sizes,
        res.inertia,
        res.fit_size,
        res.n_iter,
    )
    labels = np.full(len(feats), -1, dtype=np.int64)
    labels[ok] = res.labels
    return labels


def attach_identities(cfg: dict, data: DataPaths, df: pd.DataFrame) -> pd.DataFrame:
    """The table with an `identity` column: a person label per original image with a face
    ("" elsewhere), from the data stage's face embeddings, faces within
    `split.identity_distance` joined. Without embeddings the column is all "".
    """
    df = df.assign(identity="")
    path = data.face_embeddings
    if path is None or not path.is_file():
        return df
    try:
        with np.load(path, allow_pickle=False) as stored:
            names, embeddings = stored["names"], stored["embeddings"]
    except (OSError, ValueError, KeyError) as err:
        raise FoldError(f"{path}: cannot read the face embeddings ({err}); rerun python -m data_prep") from None
    labels = identity_labels(embeddings.astype(np.float32), float(cfg["split"].get("identity_distance", 0.6)))
    person = {str(n): f"person{k}" for n, k in zip(names, labels, strict=True) if k >= 0}
    df["identity"] = df["img_name"].map(person).fillna("")
    return df


def use_identity(cfg: dict, df: pd.DataFrame) -> tuple[bool, str]:
    """Whether the folds group by identity too (`split.group_by`), and the line that says why."""
    split = cfg["split"]
    choice = split.get("group_by", "auto")
    if choice not in GROUP_BY:
        raise ConfigError(f"split.group_by must be one of {list(GROUP_BY)}, got {choice!r}")
    if choice == "parent":
        return False, "group_by parent: images joined by parent and sources"
    known = df["identity"] != "" if "identity" in df.columns else pd.Series(False, index=df.index)
    if not known.any():
        if choice == "identity":
            raise FoldError(
                "split.group_by identity needs the face embeddings the data stage writes "
                "(python -m data_prep, with data.use_prepared: true)"
            )
        return False, "group_by auto: identity off, no face embeddings (the data stage writes them)"
    n_people = df.loc[known, "identity"].nunique()
    groups = split_groups(df, identity=True)
    n_groups = int(groups.max()) + 1
    share = largest_group(groups)[1]
    if choice == "identity":
        return True, f"group_by identity: {n_people} people, {n_groups} groups"
    n_folds = int(split["n_folds"])
    if n_groups < n_folds:
        return (
            False,
            f"group_by auto: identity off, it would leave {n_groups} group(s) ({n_people} people) for {n_folds} folds",
        )
    if share > 0.5:
        # Single linkage can chain look-alikes into one group; folds around it would be one big fold.
        return False, f"group_by auto: identity off, its largest group would hold {100 * share:.0f}% of the images"
    return True, f"group_by auto: identity on, {n_people} people, {n_groups} groups"


def build_folds(cfg: dict, df: pd.DataFrame, mode: str) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The train table with `cluster`, `fold` and `group` columns, and the features (cluster mode only).

    Identity grouping follows `split.group_by` and the table's `identity` column (`attach_identities`).
    """
    split = cfg["split"]
    n_folds = int(split["n_folds"])
    identity, why = use_identity(cfg, df)
    log.info("%s", why)
    df = df.copy()
    df["group"] = split_groups(df, identity)
    n_big, share = largest_group(df["group"].to_numpy())
    log.info(
        "%d groups never split across folds; the largest holds %d images (%.1f%%)",
        df["group"].nunique(),
        n_big,
        100 * share,
    )
    if mode == "stratified":
        df["fold"] = stratified_group_folds(df, n_folds, int(split["seed"]), identity)
        df["cluster"] = -1
        feats = None
    elif mode == "clusters":
        feats = image_features(cfg, df)
        df["kmeans_cluster"] = cluster_labels(cfg, feats)
        df["cluster"], df["fold"] = cluster_folds(df, df["kmeans_cluster"].to_numpy(), n_folds, identity)
    else:
        raise ConfigError(f"split.mode must be one of {list(MODES)}, got {mode!r}")
    check_folds(df, identity)
    return df, feats


def fold_table(df: pd.DataFrame) -> pd.DataFrame:
    """Images, reals, fakes, groups and (where known) people per fold: the log's summary."""
    per = df.groupby("fold").agg(
        images=("target", "size"), real=("target", lambda t: int((t == 0).sum())), fake=("target", "sum")
    )
    per["groups"] = df.groupby("fold")["group"].nunique()
    known = df[df["identity"] != ""] if "identity" in df.columns else df.iloc[:0]
    if len(known):
        per["people"] = known.groupby("fold")["identity"].nunique().reindex(per.index, fill_value=0)
    return per


def write_report(cfg: dict, df: pd.DataFrame, feats: np.ndarray | None, out: Path, mode: str) -> dict[str, Path]:
    paths = report_paths(out)
    summary = fold_summary(df, df["group"].to_numpy())
    summary["mode"] = mode
    summary["grouping"] = use_identity(cfg, df)[1]
    if "kmeans_cluster" in df:
        summary["kmeans_sizes"] = df["kmeans_cluster"].value_counts().sort_index().to_dict()
    title = f"Validation folds ({mode} mode)"
    text = summary_markdown(summary, title)
    written = {"md": paths["md"], "json": paths["json"]}
    if feats is not None:
        plot_projection(
            feats,
            df["cluster"].to_numpy(),
            df["target"].to_numpy(),
            paths["png"],
            seed=int(cfg["split"]["seed"]),
            tsne_max=int(cfg["split"].get("tsne_max", 2000)),
            title=f"{len(df)} train images, {df['cluster'].nunique()} clusters, {df['fold'].nunique()} folds",
        )
        text += f"\n![projection of the features]({paths['png'].name})\n"
        written["png"] = paths["png"]
    write_text(text, paths["md"])
    write_json(summary, paths["json"])
    return written


def sweep_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def run_sweep(cfg: dict, df: pd.DataFrame, k_min: int, k_max: int) -> Path:
    if not 2 <= k_min <= k_max:
        raise ConfigError(f"--sweep needs 2 <= KMIN <= KMAX, got {k_min} {k_max}")
    feats = image_features(cfg, df)
    ok = finite_rows(feats)
    rows = sweep(
        feats if ok.all() else feats[ok],
        list(range(k_min, k_max + 1)),
        seed=int(cfg["split"]["seed"]),
        silhouette_sample=int(cfg["split"].get("silhouette_sample", 5000)),
        **kmeans_options(cfg),
    )
    out = Path(cfg["paths"]["outputs"]) / "kmeans_sweep.json"
    write_json({"n_images": int(ok.sum()), "encoder": encoder_cfg(cfg), "rows": rows}, out)
    print(sweep_table(rows))
    return out


def warn_if_config_changed(cfg: dict, out: Path) -> None:
    saved = out.with_suffix(".config.yaml")
    if saved.is_file():
        try:
            old = read_yaml(saved).get("split")
        except ConfigError:
            return
        if old != cfg["split"]:
            log.warning("%s was built with a different split config; use --force to rebuild it", out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config([args.config], args.overrides)
        data = resolve_data(cfg)
        cfg = resolve_split(cfg, data)
        out = Path(args.out or cfg["paths"]["folds"])
        mode = args.mode or cfg["split"]["mode"]
        if args.sweep is None and out.exists() and not args.force:
            warn_if_config_changed(cfg, out)
            log.info("%s exists; skipping (use --force to rebuild)", out)
            return 0
        df = attach_identities(cfg, data, read_train_table(data))
        log.info(
            "read %d train images (%d fake) from %d parents, %d with a known person",
            len(df),
            df["target"].sum(),
            df["parent"].nunique(),
            int((df["identity"] != "").sum()),
        )
        if args.sweep is not None:
            log.info("wrote %s", run_sweep(cfg, df, *args.sweep))
            return 0
        df, feats = build_folds(cfg, df, mode)
        cfg["split"]["mode"] = mode
        write_csv(df[FOLD_COLUMNS], out)
        save_config(cfg, out.with_suffix(".config.yaml"))
        written = write_report(cfg, df, feats, out, mode)
    except (ConfigError, LabelError, FoldError, EncoderError, FeatureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = fold_table(df)
    log.info("wrote %s (%s mode)\n%s", out, mode, table.to_string())
    log.info("report: %s", ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
