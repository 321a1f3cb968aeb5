"""Hyper-parameter search with optuna: a resumable SQLite study, median pruning per epoch.

The search space lives in the member config under `tune`, one entry per dotted key:
`train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}`. Each trial trains the fold with those
values and reports validation AUC after every epoch; the median pruner stops trials
falling behind the others at the same epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import optuna

from core.config import ConfigError, apply_override, save_config
from core.log import get_logger

log = get_logger("tune")

# Called as train(cfg, report) -> validation AUC; report(epoch, metrics) may raise TrialPruned.
TrainFn = Callable[[dict, Callable[[int, dict], None]], float]


def nested(flat: dict[str, object]) -> dict:
    """{'train.lr': 1e-4} -> {'train': {'lr': 1e-4}}: the shape a config override file has."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def suggest(trial: optuna.Trial, space: dict) -> dict[str, float]:
    params = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec):
            raise ConfigError(f"tune.{key}: expected {{low: ..., high: ..., log: bool}}, got {spec!r}")
        params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return params


def tune(cfg: dict, n_trials: int, study_dir: Path, study_name: str, train: TrainFn) -> Path:
    """Run trials until `n_trials` have finished (counting earlier runs of the same study);
    write the best parameters as a YAML override file and return its path."""
    space = cfg.get("tune")
    if not space:
        raise ConfigError("the member config has no `tune` section describing the search space")
    study_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("train", {}).get("seed", 0))
    study = optuna.create_study(
        storage=f"sqlite:///{study_dir / 'study.db'}",
        study_name=study_name,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        load_if_exists=True,
    )
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = sum(t.state in finished for t in study.trials)
    if done:
        log.info("study %s: %d trial(s) already finished, running %d more", study_name, done, max(0, n_trials - done))

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        trial_cfg = {k: v for k, v in cfg.items() if k != "tune"}
        for key, value in params.items():
            apply_override(trial_cfg, f"{key}={value!r}")
        trial_cfg["paths"] = {**cfg["paths"], "outputs": str(study_dir / f"trial{trial.number}")}

        def report(epoch: int, metrics: dict) -> None:
            trial.report(0.0 if math.isnan(metrics["auc"]) else metrics["auc"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        auc = train(trial_cfg, report)
        return 0.0 if math.isnan(auc) else auc

    if n_trials > done:
        study.optimize(objective, n_trials=n_trials - done)
    best = study.best_trial
    out = study_dir / "best.yaml"
    save_config(nested(best.params), out)
    log.info("best trial %d: val auc %.4f with %s -> %s", best.number, best.value, best.params, out)
    log.info("train with it: python train.py --config <member config> --config %s --fold <k>", out)
    return out
