"""The data stage's manifest: the originals and every new image with their provenance, written as
the label files the rest of the pipeline reads, and the summary the stage prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.data.labels import read_labels
from core.io import write_csv
from data_prep.stage_originals import INPUT_MANIFEST_COLUMNS

MANIFEST_COLUMNS = [*INPUT_MANIFEST_COLUMNS, "sources"]
PROVENANCE_COLUMNS = [*MANIFEST_COLUMNS, "source", "donor", "donor_pool", "seed", "details"]


# The summary flags re-encoded shares per label further apart than this (percentage points).
REENCODE_TOLERANCE = 5.0


def write_manifest(table: pd.DataFrame, new_rows: list[dict], out: Path) -> pd.DataFrame:
    """provenance.csv, manifest.csv and train_labels.csv under `out` for the originals (`table`)
    and the new images' provenance rows; returns the provenance table."""
    orig_rows = table.assign(source=table["img_name"], donor="", seed="", details="")
    new = pd.DataFrame(new_rows, columns=PROVENANCE_COLUMNS)
    provenance = pd.concat([orig_rows[PROVENANCE_COLUMNS], new], ignore_index=True)
    provenance["target"] = provenance["target"].astype(int)
    write_csv(provenance, out / "provenance.csv")
    write_csv(provenance[MANIFEST_COLUMNS], out / "manifest.csv")
    write_csv(provenance[["img_name", "target"]], out / "train_labels.csv")
    read_labels(out / "train_labels.csv", out)  # what the rest of the pipeline will read is valid
    return provenance


def reencoded_shares(provenance: pd.DataFrame, n_orig: int) -> dict:
    """Per label: images the stage wrote (every row after the first `n_orig`, the originals) and
    their share; and how many percentage points the two shares lie apart."""
    written = np.arange(len(provenance)) >= n_orig
    out: dict = {}
    for label, name in ((0, "real"), (1, "fake")):
        of_label = (provenance["target"] == label).to_numpy()
        n = int(of_label.sum())
        k = int((written & of_label).sum())
        out[name] = {"reencoded": k, "images": n, "share": round(k / n, 4) if n else 0.0}
    points = 100.0 * abs(out["real"]["share"] - out["fake"]["share"])
    out["points_apart"] = round(points, 1)
    out["within_limit"] = bool(points <= REENCODE_TOLERANCE)
    return out


def summary_table(manifest: pd.DataFrame, n_orig: int) -> pd.DataFrame:
    """Counts per (origin, method) and label."""
    df = manifest.assign(origin=np.where(np.arange(len(manifest)) < n_orig, "input", "new"))
    table = pd.crosstab([df["origin"], df["method"]], df["target"]).reindex(columns=[0, 1], fill_value=0)
    table.columns = ["real", "fake"]
    return table.reset_index()


def print_summary(summary: dict, table_counts: pd.DataFrame) -> None:
    print(
        f"\nprepared {summary['out']}: {summary['images']} images ({summary['originals']} input, {summary['new']} new)"
    )
    print(table_counts.to_string(index=False))
    print(f"no face: {summary['no_face']} of {summary['originals']} input images; unreadable: {summary['unreadable']}")
    g = summary["groups"]
    print(
        f"groups of images sharing pixels (linked by parent and sources): {g['n']}; the largest holds "
        f"{g['largest']} images ({100 * g['largest_share']:.1f}%); donors drawn within {g['donor_pools']} pools"
    )
    enc = summary["reencoded"]
    shares = ", ".join(
        f"{k} {100 * enc[k]['share']:.1f}% ({enc[k]['reencoded']} of {enc[k]['images']})" for k in ("real", "fake")
    )
    verdict = "ok" if enc["within_limit"] else f"MORE THAN {REENCODE_TOLERANCE:g}: re-encoding predicts the label"
    print(f"written (re-encoded) by the data stage: {shares}; {enc['points_apart']} points apart ({verdict})")
    fails = summary["failures"]
    print(f"failures: {sum(f['n'] for f in fails)}")
    for f in fails:
        print(f"  {f['method']}: {f['reason']} ({f['n']})")
    print(f"diffusion: {summary['diffusion']}")
    print(f"done in {summary['seconds']}s")
