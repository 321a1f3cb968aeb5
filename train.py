"""Train members on folds: train on the other folds, select on this one.

  python train.py --fold 0        # every member ensemble.py blends (the demo members on the demo sample)
  python train.py --fold all      # ... on every fold in folds.csv, one member after the other
  python train.py --config configs/members/mff_demo.yaml --fold 0     # one member
  python train.py --config configs/members/mff_demo.yaml --fold all   # every fold in folds.csv
  python train.py --config configs/members/mff_demo.yaml --fold 0 train.epochs=2 train.lr=3e-4
  python train.py --config configs/members/mff_demo.yaml --fold 0 --tune 20     # optuna search
  python train.py --config configs/members/mff_demo.yaml \
                  --config outputs/mff_demo/tune/fold0/best.yaml --fold all     # train with the result

Writes outputs/<member>/fold<k>/: model.safetensors (EMA weights of the best validation
epoch), meta.json, oof.csv, test.csv, metrics.csv, curve.png, config.yaml. Rerunning a
finished fold does nothing (--force redoes it); an interrupted run resumes from its last
epoch and reaches the same result, and refuses to resume under a changed config (the
error names the changed keys; --force starts over).

The best epoch is selected on the validation fold as the network scores it; oof.csv and
test.csv then hold the selected weights' predictions under `predict.tta` (none, flip or
6view: test-time augmentation, core/data/tta.py). A finished fold whose config changed only
there is scored again, not trained again.

Several GPUs (or CPU processes) with PyTorch DDP; batch_size stays the global batch:
  torchrun --nproc_per_node 8 train.py --config configs/members/mff.yaml --fold all
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import models
from core.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointError, load_weights
from core.config import ConfigError, deep_merge, load_config, save_config
from core.data.clips import eval_dataset, with_videos
from core.data.datasets import make_loader
from core.data.folds import FoldError, read_folds
from core.data.labels import LabelError
from core.data.sources import read_test_table, read_train_table, resolve_data
from core.data.transforms import build_transform
from core.data.tta import tta_mode
from core.device import pick_device
from core.distributed import DistInfo, barrier, gather_rows, init_distributed, shard, shutdown
from core.io import write_csv, write_json
from core.log import get_logger
from core.metrics import score_report
from core.report import plot_history, versions
from core.train.prediction import predict_loader
from core.train.trainer import STATE_FILE, Trainer, TrainSettings, config_fingerprint, describe_changes
from core.train.tuning import tune
from core.trained import blend_members
from data_prep.clip_faces import clip_cropper
from data_prep.face_crop import member_face_cropper
from models.provenance import Source, recording

log = get_logger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        action="append",
        help="member config, e.g. configs/members/mff_demo.yaml; repeat to merge more (e.g. a tuned best.yaml); "
        "without it, every member the ensemble config blends, from --member-configs",
    )
    p.add_argument("--fold", required=True, help="validation fold k (train on the others), or 'all'")
    p.add_argument("--data-config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument(
        "--ensemble-config",
        default="configs/ensemble.yaml",
        help="without --config: the members to train, as ensemble.py blends them (default: %(default)s)",
    )
    p.add_argument(
        "--member-configs",
        default="configs/members",
        help="without --config: the folder of <member>.yaml files (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="retrain from scratch even if the fold is finished")
    p.add_argument(
        "--tune",
        type=int,
        metavar="N",
        help="search the config's `tune` space with N optuna trials on --fold (resumable, SQLite under "
        "outputs/<member>/tune/); writes best.yaml there, to pass as a second --config",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    return p.parse_args(argv)


def fold_dir(cfg: dict, fold: int) -> Path:
    return Path(cfg["paths"]["outputs"]) / cfg["name"] / f"fold{fold}"


def is_finished(out_dir: Path) -> bool:
    meta = out_dir / META_FILE
    return meta.is_file() and json.loads(meta.read_text()).get("complete", False)


def finished_config_changes(cfg: dict, fold: int, out_dir: Path) -> str:
    """How the config differs from the one a finished fold was trained with ('' if it does not)."""
    trained = json.loads((out_dir / META_FILE).read_text()).get("config", {})
    return describe_changes(config_fingerprint(trained), config_fingerprint(expert_config(cfg, fold)))


def prediction_change(cfg: dict, fold: int, out_dir: Path) -> str:
    """For a finished fold trained under this config, how its prediction settings differ ('' if
    they do not, or if its training state is gone): it is then scored again by resuming that
    complete state, which trains nothing."""
    trained = json.loads((out_dir / META_FILE).read_text()).get("config", {})
    old, new = tta_mode(trained), tta_mode(cfg)
    if old == new or finished_config_changes(cfg, fold, out_dir) or not (out_dir / STATE_FILE).is_file():
        return ""
    return f"predict.tta: {old} -> {new}"


def report_experts(cfg: dict, folds: list[int]) -> None:
    """Say which expert each fold trains when the experts do not match the folds one to one:
    with 5 folds, 7 experts lose their last two; with 7 folds, 5 experts train twice."""
    experts = cfg.get("experts") or []
    if not experts or len(experts) == len(folds):
        return
    n = len(experts)

    def named(i: int) -> str:
        return f"expert {i} ({experts[i].get('backbone', experts[i])})"

    where = f"{cfg['name']}: {len(folds)} folds in {cfg['paths']['folds']}"
    if n == 1:  # one expert meant for every fold (the demo member): said, not warned
        log.info("%s, all trained by %s", where, named(0))
        return
    uses = ", ".join(f"fold {k} -> {named(k % n)}" for k in folds)
    unused = [named(i) for i in range(n) if i not in {k % n for k in folds}]
    message = f"{where} but {n} experts; {uses}"
    if unused:
        message += f"; unused: {', '.join(unused)}"
    log.warning("%s", message)


def expert_config(cfg: dict, fold: int) -> dict:
    """The config of the expert trained on `fold`: `experts[fold % len(experts)]` merged
    into `model` (a `data` key inside an expert overrides the data section)."""
    experts = cfg.get("experts")
    if not experts:
        return cfg
    expert = dict(experts[fold % len(experts)])
    data = expert.pop("data", {})
    return deep_merge(cfg, {"model": expert, "data": data, "expert": fold % len(experts)})


def train_fold(cfg: dict, fold: int, dist: DistInfo | None = None, on_epoch=None) -> dict:
    """Train, select on fold `fold`, write every output; return the best validation metrics.

    Under torchrun every process trains; only rank 0 writes. `on_epoch(epoch, metrics)` is
    called after each validation (hyper-parameter search uses it to prune).
    """
    dist = dist or DistInfo()
    cfg = expert_config(cfg, fold)
    tta = tta_mode(cfg)  # a bad value fails here, before training
    out_dir = fold_dir(cfg, fold)
    data = resolve_data(cfg)
    table = with_videos(cfg, data, read_folds(cfg["paths"]["folds"], read_train_table(data)))
    if fold not in set(table["fold"]):
        raise FoldError(f"fold {fold} not in {cfg['paths']['folds']} (folds: {sorted(set(table['fold']))})")
    train_df, val_df = table[table["fold"] != fold], table[table["fold"] == fold]
    settings = TrainSettings.from_cfg(cfg["train"])
    torch.manual_seed(settings.seed)
    log.info(
        "%s fold %d: %d train / %d validation images -> %s", cfg["name"], fold, len(train_df), len(val_df), out_dir
    )

    models.check_train_data(cfg, table)  # every data setting, before a network is built or downloaded
    device = pick_device(cfg.get("device", "auto"))
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    pretrained: list[Source] = []  # each part's origin, logged as it loads and kept in meta.json
    with recording("model", pretrained):
        model = models.build_model(cfg["model"])
    crop = clip_cropper(cfg)
    with recording("recipe", pretrained):
        train_data = models.build_train_data(cfg, train_df, build_transform(cfg["data"], train=True), settings.seed)
    eval_transform = build_transform(cfg["data"], train=False)
    val_ds = eval_dataset(cfg, val_df["path"], val_df["target"], eval_transform, crop, member_face_cropper(cfg))
    with recording("loss", pretrained):
        criterion = models.build_criterion(cfg)
    trainer = Trainer(
        model,
        criterion,
        train_data.dataset,
        val_ds,
        settings,
        out_dir,
        device,
        dist,
        on_epoch,
        config=cfg,
        collate=train_data.collate,
        auxiliary=train_data.auxiliary,
    )
    trainer.resume_if_possible()  # before config.yaml is replaced: a changed config is refused here
    if dist.is_main:
        save_config(cfg, out_dir / "config.yaml")
    result = trainer.fit()
    test = read_test_table(data)

    def score(paths: list[str]) -> np.ndarray:
        return score_selected(trainer.module, paths, out_dir, cfg, settings, device, dist, tta)

    test["y_pred"] = score(test["path"].tolist())
    val_probs = result.val_probs if tta == "none" else score(val_df["path"].tolist())
    if not dist.is_main:
        barrier(dist)  # rank 0 is writing the fold's outputs
        return result.best_metrics

    oof = val_df[["img_name", "target"]].assign(y_pred=val_probs)
    write_csv(oof, out_dir / "oof.csv")
    write_csv(test[[c for c in ("img_name", "target", "y_pred") if c in test.columns]], out_dir / "test.csv")
    plot_history(result.history, out_dir / "curve.png", f"{cfg['name']} fold {fold}")
    test_metrics = scored_report(test) if "target" in test.columns else {}
    oof_metrics = scored_report(oof)
    if tta != "none":
        log.info("oof.csv under tta %s: auc %.4f, tpr@fpr1e-3 %.4f", tta, *oof_metrics.values())
    write_json(
        {
            "complete": True,
            "member": cfg["name"],
            "fold": fold,
            "best_epoch": result.best_epoch,
            "val": result.best_metrics,  # as selected: without test-time augmentation
            "oof": {"tta": tta, **oof_metrics},  # oof.csv as written
            "test_if_labelled": test_metrics,  # reported, never used for selection
            "history": result.history,
            "pretrained": [source.as_dict() for source in pretrained],  # where each part's starting weights came from
            "training_data": train_data.record,  # what the recipe recorded about its images (read by infer.py)
            "config": cfg,
            "versions": versions(),
        },
        out_dir / META_FILE,
    )
    barrier(dist)
    return result.best_metrics


def scored_report(df: pd.DataFrame) -> dict[str, float]:
    ok = df["y_pred"].notna()
    return score_report(df["target"][ok], df["y_pred"][ok])


def score_selected(
    model: torch.nn.Module,
    paths: list[str],
    out_dir: Path,
    cfg: dict,
    settings: TrainSettings,
    device: torch.device,
    dist: DistInfo,
    tta: str = "none",
) -> np.ndarray:
    """Fake probabilities of the selected weights for `paths` (the test list, or the validation
    fold under test-time augmentation), averaged over the views of `tta`. Under torchrun each
    process scores its shard and all gather, as in validation: a large test set scored by
    rank 0 alone would keep the others waiting past the collective timeout."""
    model.load_state_dict(load_weights(out_dir / WEIGHTS_FILE))  # rank 0 wrote it before fit's last barrier
    idx = shard(len(paths), dist)
    transform = build_transform(cfg["data"], train=False)
    dataset = eval_dataset(cfg, [paths[i] for i in idx], None, transform, clip_cropper(cfg), member_face_cropper(cfg))
    local = predict_loader(
        [model],
        make_loader(dataset, settings.eval_batch_size, settings.num_workers),
        device,
        channels_last=settings.channels_last,
        amp=settings.amp,
        progress=settings.progress and dist.is_main,
        tta=tta,
    )[:, 0]
    return gather_rows(local, idx, len(paths), dist)


def folds_in_file(cfg: dict) -> list[int]:
    path = Path(cfg["paths"]["folds"])
    if not path.is_file():
        raise FoldError(f"{path}: no folds file; run cv_split.py first")
    return sorted(pd.read_csv(path, usecols=["fold"])["fold"].unique().tolist())


def folds_to_train(cfg: dict, fold: str) -> list[int]:
    if fold != "all":
        try:
            return [int(fold)]
        except ValueError:
            raise ConfigError(f"--fold must be an integer or 'all', not {fold!r}") from None
    return folds_in_file(cfg)


def run_tuning(cfg: dict, fold: str, n_trials: int, dist: DistInfo) -> int:
    if dist.enabled:
        raise ConfigError("--tune runs trials one after another in one process; start it without torchrun")
    if fold == "all":
        raise ConfigError("--tune searches on one fold: give --fold k")
    (k,) = folds_to_train(cfg, fold)
    study_dir = Path(cfg["paths"]["outputs"]) / cfg["name"] / "tune" / f"fold{k}"
    tune(cfg, n_trials, study_dir, f"{cfg['name']}-fold{k}", lambda c, report: train_fold(c, k, on_epoch=report)["auc"])
    return 0


def member_configs(args: argparse.Namespace) -> list[list[str]]:
    """The config files of each member to train: those given with --config (one member), or,
    without it, one file per member ensemble.py blends for the configured data, and says which."""
    if args.config:
        return [args.config]
    ensemble_cfg = load_config([args.data_config, args.ensemble_config])
    is_demo = resolve_data(ensemble_cfg, prepared=False).is_demo
    members = blend_members(ensemble_cfg, is_demo)
    files = [str(Path(args.member_configs) / f"{member}.yaml") for member in members]
    if missing := [f for f in files if not Path(f).is_file()]:
        raise ConfigError(f"no member config {', '.join(missing)} for the members of {args.ensemble_config}")
    data = "the demo sample" if is_demo else "the configured data"
    log.info(
        "no --config: training the %d members %s blends on %s, one after the other: %s",
        len(members),
        args.ensemble_config,
        data,
        ", ".join(members),
    )
    return [[f] for f in files]


def train_member(cfg: dict, args: argparse.Namespace, dist: DistInfo) -> None:
    """Train `cfg`'s member on each fold of --fold, skipping finished folds unless --force."""
    for fold in folds_to_train(cfg, args.fold):
        out_dir = fold_dir(cfg, fold)
        rescore = is_finished(out_dir) and not args.force and prediction_change(cfg, fold, out_dir)
        if rescore:
            log.info("%s is finished; scoring it again (%s)", out_dir, rescore)
        elif is_finished(out_dir) and not args.force:
            log.info("%s is finished; skipping (use --force to retrain)", out_dir)
            changes = finished_config_changes(cfg, fold, out_dir)
            if changes:
                log.warning("%s was trained under another config (%s); --force retrains it", out_dir, changes)
            continue
        if args.force and out_dir.exists() and dist.is_main:
            shutil.rmtree(out_dir)
        barrier(dist)
        metrics = train_fold(cfg, fold, dist)
        log.info("done: val auc %.4f, tpr@fpr1e-3 %.4f -> %s", metrics["auc"], metrics["tpr@fpr1e-3"], out_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist = init_distributed()
    if not dist.is_main:
        log.setLevel(logging.WARNING)
    try:
        if args.tune and not args.config:
            raise ConfigError("--tune searches one member's settings: give its --config")
        configs = member_configs(args)
        for i, files in enumerate(configs):
            cfg = load_config([args.data_config, *files], args.overrides)
            if len(configs) > 1:
                log.info("member %d of %d: %s (%s)", i + 1, len(configs), cfg["name"], ", ".join(files))
            if Path(cfg["paths"]["folds"]).is_file():
                report_experts(cfg, folds_in_file(cfg))
            if args.tune:
                return run_tuning(cfg, args.fold, args.tune, dist)
            train_member(cfg, args, dist)
    except (ConfigError, LabelError, FoldError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
