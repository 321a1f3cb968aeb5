"""ensemble.py end to end on members' fold outputs made on the fly: the report with every method's
nested figures, files written atomically, the submission equal to what infer.py's Ensemble
computes from the fit file, and test answers that change nothing but the reported test score."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import ensemble
from core import io as core_io
from core.blend.applied import FIT_FILE, read_fitted_blend, sigmoid
from core.infer.ensemble import Ensemble
from core.trained import ModelFile, meta_stamp

MEMBERS = ("sharp", "vague")
N_FOLDS, PER_FOLD, N_TEST = 3, 40, 24
OUTPUTS = ["submission.csv", "oof_scores.csv", "oof_blend.csv", FIT_FILE, "ensemble_report.md"]
FIGURES = ["ensemble_roc.png", "ensemble_correlation.png", "ensemble_reliability.png"]


def member_scores(rng: np.random.Generator, target: np.ndarray, strength: float) -> np.ndarray:
    return sigmoid(strength * (target - 0.5) + rng.normal(0, 1.0, len(target)))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """Two members with every fold finished (a sharp one and a vague one), a test list with answers."""
    rng = np.random.default_rng(0)
    outputs = tmp_path / "outputs"
    (tmp_path / "test").mkdir()
    test_names = [f"t{i:02d}.png" for i in range(N_TEST)]
    for name in test_names:
        (tmp_path / "test" / name).write_bytes(b"")
    test_target = np.arange(N_TEST) % 2
    pd.DataFrame({"img_name": test_names}).to_csv(tmp_path / "test_list.csv", index=False)
    pd.DataFrame({"img_name": test_names, "target": test_target}).to_csv(tmp_path / "test_labels.csv", index=False)
    names = [f"f{k}_{i:02d}.png" for k in range(N_FOLDS) for i in range(PER_FOLD)]
    target = rng.integers(0, 2, len(names))
    folds = np.repeat(np.arange(N_FOLDS), PER_FOLD)
    train = pd.DataFrame({"img_name": names, "target": target})
    train.to_csv(tmp_path / "train.csv", index=False)
    train.assign(cluster=0, fold=folds).to_csv(tmp_path / "folds.csv", index=False)
    for member, strength in zip(MEMBERS, (3.0, 0.8), strict=True):
        oof = member_scores(rng, target, strength)
        for k in range(N_FOLDS):
            d = outputs / member / f"fold{k}"
            d.mkdir(parents=True)
            train[folds == k].assign(y_pred=oof[folds == k]).to_csv(d / "oof.csv", index=False)
            test = pd.DataFrame({"img_name": test_names, "y_pred": member_scores(rng, test_target, strength)})
            test.to_csv(d / "test.csv", index=False)
            (d / "meta.json").write_text(json.dumps({"complete": True}))
    data = {
        "data": {
            "train_labels": str(tmp_path / "train.csv"),
            "train_root": str(tmp_path),
            "test_list": str(tmp_path / "test_list.csv"),
            "test_root": str(tmp_path / "test"),
            "test_labels": str(tmp_path / "test_labels.csv"),
            "use_prepared": False,
        },
        "paths": {"outputs": str(outputs), "folds": str(tmp_path / "folds.csv")},
    }
    cfg = yaml.safe_load(Path("configs/ensemble.yaml").read_text())
    cfg.update(members=list(MEMBERS), submission=str(outputs / "submission.csv"))
    cfg["ensemble"]["weight_generations"] = 10
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def trained(outputs: Path, member: str, fold: int) -> ModelFile:
    """The fold as infer.py reads it: its member and the stamp of its meta.json."""
    return ModelFile(
        member, Path(member) / f"fold{fold}", {}, meta_stamp(outputs / member / f"fold{fold}" / "meta.json")
    )


def run(project: Path, *extra: str) -> int:
    return ensemble.main(
        ["--config", str(project / "ensemble.yaml"), "--data-config", str(project / "data.yaml"), *extra]
    )


def test_forced_weights_writes_the_report_with_that_method_and_the_mean_out_of_fold(project, capsys):
    assert run(project, "ensemble.method=weights") == 0
    out = project / "outputs"
    for name in OUTPUTS + FIGURES:
        assert (out / name).is_file(), name
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "ensemble_report.md").read_text()
    methods = report.split("## Blend methods, nested out of fold")[1].split("## Per fold")[0]
    rows = {line.split("|")[1].strip().strip("*") for line in methods.splitlines() if line.startswith("| ")}
    assert {"mean", "weights"} <= rows and not {"rank_mean", "stack"} & rows  # a forced method costs its fit only
    assert "ensemble.method=auto measures every method" in methods
    assert "- method: **weights** (forced by ensemble.method=weights" in report
    assert "weights: sharp " in report and "## Test answers (reported only)" in report
    fit = json.loads((out / FIT_FILE).read_text())
    assert fit["method"] == "weights" and fit["members"] == list(MEMBERS)
    oof_blend = pd.read_csv(out / "oof_blend.csv")
    assert list(oof_blend.columns) == ["img_name", "target", "fold", *MEMBERS, "blend", "y_pred"]
    assert len(oof_blend) == N_FOLDS * PER_FOLD and oof_blend["y_pred"].between(0, 1).all()
    printed = capsys.readouterr().out
    assert "blend: weights (forced by ensemble.method=weights" in printed and "  mean " in printed
    assert "The blend row: ensemble.method=weights, fixed before the folds were looked at; nested" in printed
    assert "The blend row: ensemble.method=weights, fixed before" in report


def test_a_forced_method_that_loses_to_the_mean_says_so(project):
    cfg = yaml.safe_load((project / "ensemble.yaml").read_text())
    cfg["weights"] = {"sharp": 0.0, "vague": 1.0}  # fixed: the vague member alone
    (project / "ensemble.yaml").write_text(yaml.safe_dump(cfg))
    assert run(project, "ensemble.method=weights") == 0
    report = (project / "outputs" / "ensemble_report.md").read_text()
    assert "it loses to the plain mean out of fold" in report and "**weights** (fixed in the config)" in report


@pytest.mark.parametrize("method", ["rank_mean", "stack"])  # the others are weighted means (test_ensemble_fit)
def test_the_submission_is_what_infer_computes_from_the_fit_file(project, method):
    assert run(project, f"ensemble.method={method}") == 0
    out = project / "outputs"
    fit = read_fitted_blend(out / FIT_FILE)
    assert fit.method == method
    # infer.py's Ensemble scores one image at a time, folds per member as columns
    models = [trained(out, m, k) for m in MEMBERS for k in range(N_FOLDS)]
    ens = Ensemble(models, fit=fit)
    tests = {
        m: [pd.read_csv(out / m / f"fold{k}" / "test.csv")["y_pred"].to_numpy() for k in range(N_FOLDS)]
        for m in MEMBERS
    }
    sub = pd.read_csv(out / "submission.csv")
    for i in range(N_TEST):
        row = np.array([[tests[m][k][i] for m in MEMBERS for k in range(N_FOLDS)]])
        assert ens.blend(row)[0] == pytest.approx(sub["y_pred"][i], abs=1e-12)


def test_every_output_is_written_atomically(project, monkeypatch):
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(core_io.os, "replace", recording_replace)
    assert run(project) == 0
    out = project / "outputs"
    targets = {dst: src for src, dst in replaced}
    for name in OUTPUTS + FIGURES:
        src = targets[out / name]  # moved into place, not written there
        assert src.parent == out and src.name.startswith(f".{name}.") and not src.exists()
    assert not list(out.glob(".*.tmp"))


def test_test_answers_change_no_written_file_but_the_reported_test_score(project):
    out = project / "outputs"
    assert run(project) == 0
    first = {name: (out / name).read_bytes() for name in OUTPUTS + FIGURES}
    labels = pd.read_csv(project / "test_labels.csv")
    labels["target"] = np.random.default_rng(5).permutation(labels["target"].to_numpy())
    labels.to_csv(project / "test_labels.csv", index=False)
    assert run(project) == 0
    second = {name: (out / name).read_bytes() for name in OUTPUTS + FIGURES}
    assert [n for n in first if first[n] != second[n]] == ["ensemble_report.md"]

    def split(report: bytes) -> tuple[str, str]:
        text = report.decode()
        head, _, test = text.partition("## Test answers (reported only)")
        return head, test

    assert split(first["ensemble_report.md"])[0] == split(second["ensemble_report.md"])[0]
    assert split(first["ensemble_report.md"])[1] != split(second["ensemble_report.md"])[1]


def test_a_bad_method_is_one_line(project, capsys):
    assert run(project, "ensemble.method=median") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: ensemble.method='median': expected one of auto, mean, rank_mean, weights, stack"]


def test_a_fit_is_not_applied_once_a_member_is_trained_again(project):
    assert run(project, "ensemble.method=weights") == 0
    out = project / "outputs"
    fit = read_fitted_blend(out / FIT_FILE)
    assert fit.method == "weights" and fit.params["weights"] != [0.5, 0.5]
    assert Ensemble([trained(out, m, k) for m in MEMBERS for k in range(N_FOLDS)], fit=fit).fit is not None
    (out / MEMBERS[1] / "fold2" / "meta.json").write_text(json.dumps({"complete": True, "retrained": 1}))
    ens = Ensemble([trained(out, m, k) for m in MEMBERS for k in range(N_FOLDS)], fit=fit)
    assert ens.fit is None and ens.fit_refused == "a member was trained again since it was fitted"
    row = np.full((1, len(MEMBERS) * N_FOLDS), 0.2)
    row[0, N_FOLDS:] = 0.6  # the second member's folds
    assert ens.blend(row)[0] == pytest.approx(0.4)  # the plain mean
