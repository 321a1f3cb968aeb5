"""outputs/ensemble_report.md and its figures: what each member and each blend method is worth
out of fold, which blend was chosen and why, and how well its probabilities are calibrated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.blend.fitting import EnsembleFit, MethodResult, blend_row_note, evaluate, fold_metrics, gain_over_mean
from core.io import write_text
from core.metrics import TIE_BREAK_FPR, reliability_bins
from core.report import pyplot, save_figure

REPORT_FILE = "ensemble_report.md"
ROC_FILE = "ensemble_roc.png"
CORRELATION_FILE = "ensemble_correlation.png"
RELIABILITY_FILE = "ensemble_reliability.png"
# The log-scale ROC starts here, a decade left of the tie-break FPR, so that point is visible.
MIN_FPR = TIE_BREAK_FPR / 10


def _spread(values: np.ndarray) -> str:
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if not len(v):
        return "-"
    return f"{v.mean():.4f} +- {v.std(ddof=0):.4f} ({v.min():.4f}..{v.max():.4f})"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def members_section(oof: pd.DataFrame, members: list[str]) -> list[str]:
    target, folds = oof["target"].to_numpy(), oof["fold"].to_numpy()
    rows = []
    for m in members:
        r = evaluate(m, oof[m].to_numpy(dtype=float), target, folds)
        rows.append(_method_row(m, r))
    head = ["member", "pooled AUC", "pooled TPR@1e-3", "per-fold AUC mean +- std (min..max)", "per-fold TPR@1e-3"]
    return ["## Members, out of fold", "", *_table(head, rows), ""]


def _method_row(name: str, r: MethodResult) -> list[str]:
    return [
        name,
        f"{r.pooled['auc']:.4f}",
        f"{r.pooled['tpr@fpr1e-3']:.4f}",
        _spread(r.fold_values("auc")),
        _spread(r.fold_values("tpr@fpr1e-3")),
    ]


def methods_section(fit: EnsembleFit) -> list[str]:
    base = fit.results["mean"]
    rows, notes = [], []
    for name, r in fit.results.items():
        if r.error:
            notes.append(f"- {name}: not available ({r.error})")
            continue
        g = gain_over_mean(r, base)
        gain = "-" if name == "mean" else f"{g.mean:+.4f} +- {g.spread:.4f}"
        label = f"**{name}**" if name == fit.method else name
        if name == "weights" and fit.fixed_weights:
            label += " (fixed in the config)"
        rows.append([label, *_method_row(name, r)[1:], gain])
    head = [
        "method",
        "pooled AUC",
        "pooled TPR@1e-3",
        "per-fold AUC mean +- std (min..max)",
        "per-fold TPR@1e-3",
        "per-fold AUC gain over mean",
    ]
    intro = (
        "Nested cross-validation over the members' folds: for each fold, a method is fitted on the "
        "other folds' out-of-fold predictions only and scores the held-out fold. Spreads are the "
        "population std over folds; the gain is the per-fold AUC minus the plain mean's on the same fold."
    )
    if fit.requested != "auto":
        notes.append(
            f"- ensemble.method={fit.requested}: only it and the plain mean were fitted; "
            "ensemble.method=auto measures every method"
        )
    return ["## Blend methods, nested out of fold", "", intro, "", *_table(head, rows), *notes, ""]


def per_fold_section(fit: EnsembleFit, oof: pd.DataFrame) -> list[str]:
    target, folds = oof["target"].to_numpy(), oof["fold"].to_numpy()
    columns = {m: fold_metrics(oof[m].to_numpy(dtype=float), target, folds) for m in fit.members}
    columns.update({n: r.fold_metrics for n, r in fit.results.items() if r.error is None})
    out = ["## Per fold", ""]
    for key, title in (("auc", "AUC"), ("tpr@fpr1e-3", "TPR at FPR = 1e-3")):
        rows = []
        for k in sorted(np.unique(folds)):
            held = folds == k
            counts = [str(int(held.sum())), str(int(target[held].sum()))]
            rows.append([str(k), *counts, *(f"{columns[c][int(k)][key]:.4f}" for c in columns)])
        out += [f"{title}:", "", *_table(["fold", "images", "fakes", *columns], rows), ""]
    return out


def _describe_params(fit: EnsembleFit) -> str:
    f = fit.fitted
    if f.method == "weights":
        return "weights: " + ", ".join(f"{m} {w:.4f}" for m, w in zip(f.members, f.params["weights"], strict=True))
    if f.method == "stack":
        coefs = ", ".join(f"{m} {c:+.4f}" for m, c in zip(f.members, f.params["coef"], strict=True))
        return (
            f"logistic regression on the members' logits: coefficients {coefs}, intercept {f.params['intercept']:+.4f}"
        )
    if f.method == "rank_mean":
        return "mean of each member's rank within its own out-of-fold scores (infer.py ranks one image against them)"
    return "equal weights: " + ", ".join(f.members)


def chosen_section(fit: EnsembleFit) -> list[str]:
    return [
        "## Chosen blend",
        "",
        f"- method: **{fit.method}** ({fit.reason})",
        f"- {_describe_params(fit)}",
        f"- calibration: **{fit.calibration.applied}** ({fit.calibration.reason})",
        f"- {blend_row_note(fit)}",
        "- fitted on every out-of-fold prediction; written to `ensemble_fit.json`, which infer.py applies",
        "",
    ]


def calibration_section(fit: EnsembleFit) -> list[str]:
    cal = fit.calibration
    rows = [["none (the blend as it is)", f"{cal.before['ece']:.4f}", f"{cal.before['brier']:.4f}"]]
    for kind, m in cal.after.items():
        label = f"**{kind}**" if kind == cal.applied else kind
        rows.append([label, "-", m["error"]] if "error" in m else [label, f"{m['ece']:.4f}", f"{m['brier']:.4f}"])
    temperature = fit.fitted.calibration
    detail = []
    if temperature["method"] == "temperature":
        detail = [
            f"Fitted on all folds: temperature {temperature['temperature']:.4f}, shift {temperature['shift']:+.4f} "
            "(p = sigmoid(logit(s) / T + shift)). One strictly increasing map: the submission's AUC and TPR are "
            "the uncalibrated blend's, and so is every per-fold figure above; only the pooled out-of-fold AUC of "
            "the calibrated scores can move, each fold being calibrated by its own out-of-fold fit.",
            "",
        ]
    elif temperature["method"] == "isotonic":
        detail = [
            "Isotonic regression merges neighbouring scores into steps: tied scores can move an AUC a little.",
            "",
        ]
    intro = (
        f"Expected calibration error (ECE, {cal.bins} equal-width bins) and Brier score of the "
        "chosen blend's nested out-of-fold scores, uncalibrated and calibrated out of fold (each fold by a "
        "calibration fitted on the other folds' scores)."
    )
    return [
        "## Calibration, out of fold",
        "",
        intro,
        "",
        *_table(["calibration", "ECE", "Brier"], rows),
        "",
        *detail,
        f"![reliability]({RELIABILITY_FILE})",
        "",
    ]


def correlation(oof: pd.DataFrame, members: list[str]) -> pd.DataFrame:
    """Spearman correlation of the members' OOF probabilities: ranks are what an AUC and the
    rank blend see."""
    return oof[members].corr(method="spearman")


def figures_section(oof: pd.DataFrame, members: list[str]) -> list[str]:
    corr = correlation(oof, members)
    rows = [[m, *(f"{corr.loc[m, n]:.3f}" for n in members)] for m in members]
    return [
        "## Figures",
        "",
        f"![ROC curves]({ROC_FILE})",
        "",
        "Spearman correlation of the members' out-of-fold probabilities:",
        "",
        *_table(["", *members], rows),
        "",
        f"![correlation]({CORRELATION_FILE})",
        "",
    ]


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """ROC curves with FPR on a log axis from MIN_FPR, the tie-break FPR marked."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, (target, score) in curves.items():
        ok = ~np.isnan(score)
        fpr, tpr, _ = roc_curve(target[ok], score[ok], drop_intermediate=False)
        ax.step(np.maximum(fpr, MIN_FPR), tpr, where="post", label=name)
    ax.axvline(TIE_BREAK_FPR, color="grey", linestyle=":", label="FPR = 1e-3")
    ax.set(xscale="log", xlim=(MIN_FPR, 1.0), ylim=(0, 1.01), xlabel="false positive rate (log)", ylabel="TPR")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path, "ROC, out of fold (blends nested)")


def plot_correlation(corr: pd.DataFrame, path: Path) -> Path:
    plt = pyplot()
    n = len(corr)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 2))
    im = ax.imshow(corr.to_numpy(), vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(n), corr.columns, rotation=30, ha="right")
    ax.set_yticks(range(n), corr.index)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{corr.iloc[i, j]:.2f}", ha="center", va="center")
    fig.colorbar(im, ax=ax)
    return save_figure(fig, path, "members' OOF Spearman correlation")


def plot_reliability(target: np.ndarray, curves: dict[str, np.ndarray], bins: int, path: Path) -> Path:
    """Share of fakes against mean probability per bin, for each curve; bins' image counts below."""
    plt = pyplot()
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    width = 1.0 / bins / (len(curves) + 1)
    for i, (name, score) in enumerate(curves.items()):
        ok = ~np.isnan(score)
        b = [x for x in reliability_bins(target[ok], score[ok], bins) if x["n"]]
        ax.plot([x["mean_prob"] for x in b], [x["fake_rate"] for x in b], marker="o", label=name)
        ax_n.bar([x["lo"] + (i + 0.5) * width for x in b], [x["n"] for x in b], width=width, label=name)
    ax.set(ylabel="share of fakes", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    ax_n.set(xlabel="predicted probability", ylabel="images")
    return save_figure(fig, path, "reliability, out of fold")


def test_section(test_scores: dict[str, float] | None) -> list[str]:
    if test_scores is None:
        return []
    return [
        "## Test answers (reported only)",
        "",
        "Nothing above read them: no member, weight, calibration or threshold was chosen with them.",
        "",
        f"- submission: AUC {test_scores['auc']:.4f}, TPR at FPR = 1e-3 {test_scores['tpr@fpr1e-3']:.4f}",
        "",
    ]


def write_report(
    fit: EnsembleFit, oof: pd.DataFrame, out_dir: str | Path, test_scores: dict[str, float] | None = None
) -> list[Path]:
    """The report and its three figures under `out_dir` (each written atomically); `oof` is the
    member matrix (img_name, target, fold, one column per member). Returns the paths written."""
    out_dir = Path(out_dir)
    target = oof["target"].to_numpy()
    mean, chosen = fit.results["mean"].scores, fit.results[fit.method].scores
    curves = {m: (target, oof[m].to_numpy(dtype=float)) for m in fit.members}
    curves["blend: mean"] = (target, mean)
    if fit.method != "mean":
        curves[f"blend: {fit.method}"] = (target, chosen)
    reliability = {"uncalibrated": fit.calibration.uncalibrated}
    if fit.calibration.applied != "none":
        reliability[fit.calibration.applied] = fit.calibration.calibrated
    n_folds = oof["fold"].nunique()
    lines = [
        "# Ensemble report",
        "",
        f"Members: {', '.join(fit.members)}; {len(oof)} out-of-fold images in {n_folds} folds. Every figure "
        "comes from out-of-fold predictions; blends and calibrations are fitted on them and measured by "
        "nested cross-validation. The test answers are never read here.",
        "",
        *chosen_section(fit),
        *members_section(oof, fit.members),
        *methods_section(fit),
        *per_fold_section(fit, oof),
        *calibration_section(fit),
        *figures_section(oof, fit.members),
        *test_section(test_scores),
    ]
    return [
        plot_roc(curves, out_dir / ROC_FILE),
        plot_correlation(correlation(oof, fit.members), out_dir / CORRELATION_FILE),
        plot_reliability(target, reliability, fit.calibration.bins, out_dir / RELIABILITY_FILE),
        write_text("\n".join(lines) + "\n", out_dir / REPORT_FILE),
    ]
