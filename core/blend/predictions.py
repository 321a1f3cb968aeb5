"""Blending members' predictions and writing a submission that is checked before it lands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.blend.applied import nan_weighted_mean
from core.io import write_csv
from core.metrics import score_report
from core.trained import SubmissionError, is_imported


def _read_fold_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SubmissionError(f"{path}: missing, although the fold's meta.json says complete")
    df = pd.read_csv(path, dtype={"img_name": str})
    dupes = df["img_name"][df["img_name"].duplicated()].unique()
    if len(dupes):
        raise SubmissionError(f"{path}: duplicate img_name, e.g. {list(dupes[:3])}")
    return df


def member_predictions(outputs: str | Path, member: str, folds: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """OOF predictions of `folds` (concatenated, with their `fold`) and test predictions
    averaged over them, matched by img_name (NaN where a fold could not score an image)."""
    if folds and is_imported(outputs, member, folds[0]):
        raise SubmissionError(
            f"{member}: imported from a published release, so it has no out-of-fold or test predictions on "
            "this data to blend; infer.py scores with it (--weights outputs/<member>)"
        )
    dirs = {k: Path(outputs) / member / f"fold{k}" for k in folds}
    oof = pd.concat([_read_fold_csv(d / "oof.csv").assign(fold=k) for k, d in dirs.items()], ignore_index=True)
    dupes = oof["img_name"][oof["img_name"].duplicated()].unique()
    if len(dupes):
        raise SubmissionError(f"{member}: images validated in more than one fold, e.g. {list(dupes[:3])}")
    tests = {k: _read_fold_csv(d / "test.csv") for k, d in dirs.items()}
    first = next(iter(tests.values()))
    names = set(first["img_name"])
    for k, t in tests.items():
        if set(t["img_name"]) != names:
            odd = sorted(names.symmetric_difference(t["img_name"]))
            raise SubmissionError(
                f"{dirs[k] / 'test.csv'}: other test images than fold {folds[0]}'s, e.g. {odd[:3]}; "
                "were the folds scored on different test lists? retrain with --force"
            )
    test = first.drop(columns="y_pred")
    by_name = [t.set_index("img_name")["y_pred"].reindex(test["img_name"]).to_numpy() for t in tests.values()]
    test["y_pred"] = nan_weighted_mean(np.stack(by_name, axis=1))
    return oof, test


def member_matrix(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The images every member scored, one row each: `img_name` (with `target` and `fold` where
    the first member's table has them) and one column of `y_pred` per member, named after it."""
    names = list(frames)
    keys = [c for c in ("img_name", "target", "fold") if c in frames[names[0]].columns]
    merged = frames[names[0]][keys].copy()
    for n in names:
        merged = merged.merge(frames[n][["img_name", "y_pred"]].rename(columns={"y_pred": n}), on="img_name")
    return merged


SCORES_NOTE = (
    "pooled: every train image scored once, by the model whose fold held it out, and the metric taken over "
    "all of them together;\nper fold: the metric within each validation fold, mean +- std over the folds "
    "(population std) and (min..max), "
    "as papers quote it.\nThe submission averages the models of every fold, which neither measures exactly."
)


def _scores(df: pd.DataFrame) -> dict:
    ok = df["y_pred"].notna()
    return score_report(df["target"][ok], df["y_pred"][ok])


def metrics_table(oofs: dict[str, pd.DataFrame], blend: pd.DataFrame) -> pd.DataFrame:
    """Per member and for the blend: pooled OOF AUC and TPR@1e-3, and the per-fold AUC spread
    (folds from each frame's `fold` column; see SCORES_NOTE for which is which)."""
    rows = []
    for name, df in {**oofs, "blend": blend}.items():
        row = {"member": name, "n": int(df["y_pred"].notna().sum())}
        row.update({f"pooled_{k}": v for k, v in _scores(df).items()})
        per_fold = pd.DataFrame([_scores(part) for _, part in df.groupby("fold")]) if "fold" in df else None
        if per_fold is not None and len(per_fold):
            auc = per_fold["auc"]
            row.update(
                folds=len(per_fold),
                fold_auc_mean=auc.mean(),
                fold_auc_std=auc.std(ddof=0),
                fold_auc_min=auc.min(),
                fold_auc_max=auc.max(),
                **{
                    "fold_tpr@fpr1e-3_mean": per_fold["tpr@fpr1e-3"].mean(),
                    "fold_tpr@fpr1e-3_std": per_fold["tpr@fpr1e-3"].std(ddof=0),
                },
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _spread(row: dict) -> str:
    if pd.isna(row.get("folds")):  # this row's predictions carried no fold column
        return "-"
    return (
        f"{row['fold_auc_mean']:.4f} +- {row['fold_auc_std']:.4f} "
        f"({row['fold_auc_min']:.4f}..{row['fold_auc_max']:.4f}, {int(row['folds'])} folds)"
    )


def format_table(table: pd.DataFrame) -> str:
    """The metrics table as printed: pooled scores, then the per-fold AUC spread."""
    lines = [f"{'member':<16} {'images':>7} {'pooled AUC':>11} {'pooled TPR@1e-3':>16}  per-fold AUC"]
    for r in table.to_dict("records"):
        pooled = f"{r['pooled_auc']:>11.4f} {r['pooled_tpr@fpr1e-3']:>16.4f}"
        lines.append(f"{r['member']:<16} {r['n']:>7} {pooled}  {_spread(r)}")
    return "\n".join(lines)


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
