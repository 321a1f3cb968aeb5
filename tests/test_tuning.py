import optuna
import yaml

import cv_split
import train


def test_tune_resumes_and_writes_an_override_train_accepts(tiny_project):
    p = tiny_project
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    base = [
        "--config",
        str(p["member_cfg"]),
        "--data-config",
        str(p["data_cfg"]),
        "--fold",
        "0",
        "train.epochs=2",
        "+tune={train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}, loss.kl: {low: 0.0, high: 1.0}}",
    ]
    assert train.main([*base, "--tune", "2"]) == 0
    study_dir = p["outputs"] / "tiny" / "tune" / "fold0"
    storage = f"sqlite:///{study_dir / 'study.db'}"
    assert len(optuna.load_study(study_name="tiny-fold0", storage=storage).trials) == 2
    assert train.main([*base, "--tune", "3"]) == 0  # resumes: one more trial, not three
    study = optuna.load_study(study_name="tiny-fold0", storage=storage)
    assert len(study.trials) == 3
    best = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert best == {"train": {"lr": study.best_params["train.lr"]}, "loss": {"kl": study.best_params["loss.kl"]}}
    run = [
        "--config",
        str(p["member_cfg"]),
        "--config",
        str(study_dir / "best.yaml"),
        "--data-config",
        str(p["data_cfg"]),
        "--fold",
        "1",
        "train.epochs=1",
    ]
    assert train.main(run) == 0
    saved = yaml.safe_load((p["outputs"] / "tiny" / "fold1" / "config.yaml").read_text())
    assert saved["train"]["lr"] == best["train"]["lr"] and saved["loss"]["kl"] == best["loss"]["kl"]
