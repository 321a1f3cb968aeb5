"""Blending members' predictions and writing a submission that is checked before it lands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.io import write_csv
from core.metrics import score_report


class SubmissionError(ValueError):
    """Predictions are missing, duplicated or out of range; the message says which."""


def member_predictions(outputs: str | Path, member: str) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """OOF predictions of all folds (concatenated) and test predictions averaged over folds."""
    fold_dirs = sorted(p for p in (Path(outputs) / member).glob("fold*") if (p / "oof.csv").is_file())
    if not fold_dirs:
        raise SubmissionError(f"{Path(outputs) / member}: no finished fold (run train.py for this member first)")
    oof = pd.concat([pd.read_csv(d / "oof.csv", dtype={"img_name": str}) for d in fold_dirs], ignore_index=True)
    dupes = oof["img_name"][oof["img_name"].duplicated()].unique()
    if len(dupes):
        raise SubmissionError(f"{member}: images validated in more than one fold, e.g. {list(dupes[:3])}")
    tests = [pd.read_csv(d / "test.csv", dtype={"img_name": str}) for d in fold_dirs]
    test = tests[0].drop(columns="y_pred").copy()
    test["y_pred"] = nan_weighted_mean(np.stack([t["y_pred"].to_numpy() for t in tests], axis=1))
    return oof, test, len(fold_dirs)


def nan_weighted_mean(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Row-wise weighted mean of (N, M) `values` over the columns that are not NaN; NaN
    where a row has none. A member that could not score an image does not pull it to 0."""
    values = np.asarray(values, dtype=float)
    w = np.ones(values.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    ok = ~np.isnan(values)
    den = ok @ w
    num = np.where(ok, values, 0.0) @ w
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_mean(frames: dict[str, pd.DataFrame], weights: dict[str, float] | None) -> pd.DataFrame:
    """Mean of `y_pred` over members on the images they all scored (the winning solution's blend)."""
    names = list(frames)
    w = np.array([1.0 if not weights else float(weights.get(n, 0.0)) for n in names])
    if w.sum() <= 0:
        raise SubmissionError(f"ensemble weights {weights} give no member a positive weight")
    keys = [c for c in ("img_name", "target") if c in frames[names[0]].columns]
    merged = frames[names[0]][keys].copy()
    for n in names:
        merged = merged.merge(frames[n][["img_name", "y_pred"]].rename(columns={"y_pred": n}), on="img_name")
    merged["y_pred"] = nan_weighted_mean(merged[names].to_numpy(), w)
    return merged


def metrics_table(oofs: dict[str, pd.DataFrame], blend: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name, df in {**oofs, "blend": blend}.items():
        ok = df["y_pred"].notna()
        rows.append({"member": name, "n": int(ok.sum()), **score_report(df["target"][ok], df["y_pred"][ok])})
    return pd.DataFrame(rows)


def check_submission(sub: pd.DataFrame, test_names: list[str], fill_missing: float | None) -> pd.DataFrame:
    """Every test image exactly once, in test order, with a finite probability in [0, 1]."""
    if sub["img_name"].duplicated().any():
        raise SubmissionError(f"duplicate rows for {sub['img_name'][sub['img_name'].duplicated()].tolist()[:5]}")
    sub = pd.DataFrame({"img_name": test_names}).merge(sub[["img_name", "y_pred"]], on="img_name", how="left")
    missing = sub["img_name"][~np.isfinite(sub["y_pred"].astype(float))].tolist()
    if missing and fill_missing is None:
        raise SubmissionError(
            f"{len(missing)} test image(s) have no prediction, e.g. {missing[:5]} "
            "(unreadable for every member?); set fill_missing in the ensemble config to submit anyway"
        )
    sub["y_pred"] = sub["y_pred"].astype(float).fillna(fill_missing if missing else 0.0)
    if ((sub["y_pred"] < 0) | (sub["y_pred"] > 1)).any():
        raise SubmissionError("probabilities outside [0, 1]")
    return sub


def write_submission(sub: pd.DataFrame, path: str | Path) -> Path:
    return write_csv(sub[["img_name", "y_pred"]], path)
