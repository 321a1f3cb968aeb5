"""train.py resumes only under the config it started with, and says which expert each fold trains."""

from __future__ import annotations

import logging

import pytest
import yaml

import cv_split
import train
from core.checkpoint import load_state, save_state
from core.train.trainer import STATE_FILE


@pytest.fixture
def train_log(caplog):
    """caplog receiving the project's log, which does not propagate to the root logger."""
    project = logging.getLogger("ffdi")
    project.addHandler(caplog.handler)
    with caplog.at_level("INFO", logger="ffdi.train"):
        yield caplog
    project.removeHandler(caplog.handler)


def test_resume_only_under_the_config_the_state_was_saved_with(tiny_project, train_log, capsys):
    p = tiny_project
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    args = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "0", "train.epochs=1"]
    assert train.main(args) == 0
    fold = p["outputs"] / "tiny" / "fold0"
    # A run stopped after saving its last state and before its outputs (meta.json marks a fold finished).
    (fold / "meta.json").unlink()
    config_before = (fold / "config.yaml").read_text()
    capsys.readouterr()

    # A changed config: one line naming the changed keys, nothing written.
    assert train.main([*args, "train.lr=0.005", "loss.nce=0.2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line[:2].isdigit()]  # minus log lines
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {fold / STATE_FILE}: the config changed since this training state was saved")
    assert "(loss.nce: 0.1 -> 0.2, train.lr: 0.002 -> 0.005)" in err[0] and "--force" in err[0]
    assert (fold / "config.yaml").read_text() == config_before  # not replaced by the refused config
    assert not (fold / "meta.json").exists()

    # A state saved before configs were recorded cannot be checked, so it is refused too.
    saved = (fold / STATE_FILE).read_bytes()
    state = load_state(fold / STATE_FILE)
    del state["config_hash"], state["config"]
    save_state(state, fold / STATE_FILE)
    assert train.main(args) == 2
    assert "this training state records no config" in capsys.readouterr().err
    (fold / STATE_FILE).write_bytes(saved)

    # Keys that cannot change the result do not block the resume.
    train_log.clear()
    assert train.main([*args, "train.num_workers=1", "train.eval_batch_size=3"]) == 0
    assert any(r.getMessage().startswith(f"resumed from {fold / STATE_FILE}") for r in train_log.records)
    assert (fold / "meta.json").is_file()

    # --force starts over under the new config.
    assert train.main([*args, "train.lr=0.005", "--force"]) == 0
    assert yaml.safe_load((fold / "config.yaml").read_text())["train"]["lr"] == 0.005

    # A finished fold is skipped, and a changed config is pointed out rather than ignored.
    train_log.clear()
    assert train.main(args) == 0
    warnings = [r.getMessage() for r in train_log.records if r.levelno == logging.WARNING]
    assert warnings == [f"{fold} was trained under another config (train.lr: 0.005 -> 0.002); --force retrains it"]


def experts_cfg(n_experts: int) -> dict:
    experts = [{"backbone": f"net{i}"} for i in range(n_experts)]
    return {"name": "m", "experts": experts, "paths": {"folds": "folds.csv"}}


def test_more_experts_than_folds_names_the_unused(train_log):
    train.report_experts(experts_cfg(7), [0, 1, 2, 3, 4])
    (record,) = train_log.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "m: 5 folds in folds.csv but 7 experts; fold 0 -> expert 0 (net0), fold 1 -> expert 1 (net1), "
        "fold 2 -> expert 2 (net2), fold 3 -> expert 3 (net3), fold 4 -> expert 4 (net4); "
        "unused: expert 5 (net5), expert 6 (net6)"
    )


def test_fewer_experts_than_folds_shows_the_reuse_and_one_expert_is_no_warning(train_log):
    train.report_experts(experts_cfg(2), [0, 1, 2])
    train.report_experts(experts_cfg(1), [0, 1, 2])
    train.report_experts(experts_cfg(3), [0, 1, 2])  # one expert per fold: nothing to say
    assert [(r.levelno, r.getMessage()) for r in train_log.records] == [
        (
            logging.WARNING,
            "m: 3 folds in folds.csv but 2 experts; fold 0 -> expert 0 (net0), "
            "fold 1 -> expert 1 (net1), fold 2 -> expert 0 (net0)",
        ),
        (logging.INFO, "m: 3 folds in folds.csv, all trained by expert 0 (net0)"),
    ]


def test_train_reports_experts_against_the_folds_file(tiny_project, train_log):
    p = tiny_project
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0  # 2 folds
    three = "experts=[{backbone: test_resnet.r160_in1k}, {backbone: test_resnet.r160_in1k}, {backbone: x}]"
    args = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "5", three]
    assert train.main(args) == 2  # fold 5 does not exist: the warning still comes first
    (warning,) = [r.getMessage() for r in train_log.records if r.levelno == logging.WARNING]
    assert warning.startswith("tiny: 2 folds in ") and warning.endswith(
        "but 3 experts; fold 0 -> expert 0 "
        "(test_resnet.r160_in1k), fold 1 -> expert 1 (test_resnet.r160_in1k); unused: expert 2 (x)"
    )
