"""Convert published checkpoints into this project's: safetensors + meta.json, scored by infer.py.

  python -m models.import_published deepfakedefenders DIR    # DIR holds weight.pth and ema.state
  python -m models.import_published sbi FFc23.tar            # or FFraw.tar

Where to download them (neither can be fetched by this command):
  deepfakedefenders  the multi-FFDI image track's winning solution (JTGroup): its README
                     (github.com/HighwayWu/DeepFakeDefenders) links a download of weights/ with
                     weight.pth (seven experts) and ema.state (their EMA weights). Licence:
                     CC BY-NC 4.0, non-commercial use only.
  sbi                Self-Blended Images (Shiohara and Yamasaki, CVPR 2022): its README
                     (github.com/mapooon/SelfBlendedImages) links the EfficientNet-B4 trained on
                     FF++ raw (FFraw.tar) and c23 (FFc23.tar). Free for research; commercial use
                     needs a licence agreement with the authors.

What it writes (the member folder is outputs/<member>, or --out):
  deepfakedefenders  <member>/fold<k>/ for expert k = 0..6 (member `mff_published`): each an
                     `mff_expert` network with the EMA weights swapped in, as the released
                     inference does; infer.py averages the folds, which is the published plain mean
                     of the experts' fake probabilities. Preprocessing recorded: RGB / 255,
                     ImageNet mean/std, then resized to 512x512 with torchvision's antialiased
                     bilinear (the released order).
  sbi                <member>/fold0/ (member `sbi_published`): an `sbi_fed` network without
                     guidance heads. Preprocessing recorded: each face's SBI test crop (found with
                     dlib; SBI used RetinaFace), 380x380, / 255 with no mean/std; the highest score
                     over the faces of an image; 32 frames a video. The facial-embedding extension's
                     release (B4 -> BatchNorm -> FC(2)) imports the same way with model.head=bn_fc.
Each fold gets model.safetensors and meta.json (source files and their SHA-256, licence note,
preprocessing). Existing files are refused unless --force. Files are read only with
torch.load(weights_only=True). Score with the imported models:
  python infer.py face.jpg --weights outputs/mff_published --weights outputs/sbi_published

Exit status: 0 written; 2 a missing or unreadable file, a layout that does not fit, existing outputs.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from core.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointError, save_weights
from core.config import ConfigError, apply_override, deep_merge, load_config
from core.io import file_sha256, write_json
from core.log import get_logger
from core.preprocess import IMAGENET_MEAN, IMAGENET_STD
from core.report import versions
from models.published import convert_sbi, convert_winner

log = get_logger("import_published")

# The published recipes, recorded in meta.json as `data` (core.preprocess reads them).
WINNER_DATA = {
    "image_size": 512,
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "resize": "bilinear_antialias",  # torchvision Resize((512, 512), antialias=True) on the tensor
    "normalize_first": True,  # ToTensor, Normalize, then Resize
}
SBI_DATA = {
    "image_size": 380,
    "mean": [0.0, 0.0, 0.0],  # the network takes pixels / 255
    "std": [1.0, 1.0, 1.0],
    "resize": "linear",  # the crop is resized to 380 with OpenCV's bilinear before this
    "face_crop": {"kind": "sbi_test", "margin": 0.25, "margin_scale": 0.5},  # box +- w/4, h/4, each x0.5
    "video_frames": 32,  # SBI's test: 32 frames a video
}
SOURCES = {
    "deepfakedefenders": {
        "member": "mff_published",
        "config": "configs/members/mff.yaml",
        "data": WINNER_DATA,
        "source": "the multi-FFDI image track's winning solution (JTGroup), github.com/HighwayWu/DeepFakeDefenders",
        "licence": "CC BY-NC 4.0 (the release's README): attribution, non-commercial use only",
        "preprocessing": "RGB, / 255, ImageNet mean/std, then resized to 512x512 by torchvision's antialiased "
        "bilinear resize (the released inference's order); softmax[:, 1] per expert, plain mean over experts",
    },
    "sbi": {
        "member": "sbi_published",
        "config": "configs/members/sbi_fed.yaml",
        "data": SBI_DATA,
        "source": "Self-Blended Images (Shiohara and Yamasaki, CVPR 2022), github.com/mapooon/SelfBlendedImages",
        "licence": "free for research purposes; commercial use needs a licence agreement with the authors "
        "(the release's README and LICENSE)",
        "preprocessing": "each face's SBI test crop (the face box widened by w/4 and h/4 per side, each x0.5), "
        "resized to 380x380 (OpenCV bilinear), / 255 with no mean/std; softmax[:, 1], the highest over the "
        "faces. Faces are found with dlib here, with RetinaFace in the published code",
    },
}
VERIFIED = (
    "the conversion was checked on replicas of the published layouts (the same networks with random "
    "weights, saved the same way), not on the released files"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m models.import_published",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("kind", choices=sorted(SOURCES), help="which release")
    p.add_argument(
        "source", help="deepfakedefenders: the folder with weight.pth and ema.state; sbi: FFraw.tar or FFc23.tar"
    )
    p.add_argument("--member", help="member name (default: mff_published / sbi_published)")
    p.add_argument(
        "--config", help="member config giving the architecture (default: configs/members/mff.yaml / sbi_fed.yaml)"
    )
    p.add_argument(
        "--data-config", default="configs/data.yaml", help="where outputs go: paths.outputs (default: %(default)s)"
    )
    p.add_argument("--out", help="the member folder to write fold<k>/ into (default: <paths.outputs>/<member>)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides of the recorded config, e.g. data.image_size=448"
    )
    return p.parse_intermixed_args(argv)


def recorded_config(kind: str, args: argparse.Namespace) -> dict:
    """The config each imported fold records: the member config's `model` (and `experts`), the
    published `data` recipe, the member name, then the command line's overrides."""
    spec = SOURCES[kind]
    base = load_config([args.config or spec["config"]])
    cfg = {"name": args.member or spec["member"], "model": base["model"], "data": copy.deepcopy(spec["data"])}
    if kind == "deepfakedefenders":
        cfg["experts"] = base.get("experts") or []
    for override in args.overrides:
        apply_override(cfg, override)
    cfg["model"].update(pretrained=False, weights=None)
    return cfg


def fold_configs(kind: str, cfg: dict) -> list[dict]:
    """Per fold, the config of its network. Winning solution: fold k is expert k (`experts[k]`
    merged into `model`), trained by its authors on their split k; the released experts have no
    dropout before the classifier (timm's default). SBI: one network without guidance heads."""
    if kind == "sbi":
        return [deep_merge(cfg, {"model": {"guidance": False}})]
    experts = cfg.pop("experts")
    if not experts:
        raise ConfigError("the member config names no experts (its `experts` list) to map the published ones onto")
    nets = [{k: v for k, v in expert.items() if k != "data"} for expert in experts]  # the recipe is the published one
    return [deep_merge(cfg, {"model": {**m, "drop_rate": 0.0}, "expert": k}) for k, m in enumerate(nets)]


def source_files(kind: str, source: Path) -> dict[str, Path]:
    if kind == "sbi":
        return {"checkpoint": source}
    return {"weight.pth": source / "weight.pth", "ema.state": source / "ema.state"}


def refuse_existing(folders: list[Path]) -> None:
    existing = [f / name for f in folders for name in (WEIGHTS_FILE, META_FILE) if (f / name).exists()]
    if existing:
        raise CheckpointError(f"{existing[0]}: exists ({len(existing)} file(s) in all); pass --force to overwrite")


def meta(kind: str, fold: int, cfg: dict, files: dict[str, Path], digests: dict[str, str]) -> dict:
    spec = SOURCES[kind]
    imported = {
        "release": kind,
        "source": spec["source"],
        "files": {name: {"path": str(path), "sha256": digests[name]} for name, path in files.items()},
        "licence": spec["licence"],
        "preprocessing": spec["preprocessing"],
        "verified": VERIFIED,
    }
    if kind == "deepfakedefenders":
        imported["expert"] = f"expert {fold} of weight.pth with ema.state's shadow_params swapped in"
        imported["fold"] = "the authors' split: this fold is their expert, not a fold of this project's folds.csv"
    return {
        "complete": True,
        "member": cfg["name"],
        "fold": fold,
        "imported": imported,
        "config": cfg,
        "versions": versions(),
    }


def run(args: argparse.Namespace) -> list[Path]:
    cfg = recorded_config(args.kind, args)
    configs = fold_configs(args.kind, cfg)
    outputs = Path(load_config([args.data_config])["paths"]["outputs"]) if not args.out else None
    member_dir = Path(args.out) if args.out else outputs / cfg["name"]
    folders = [member_dir / f"fold{k}" for k in range(len(configs))]
    if not args.force:
        refuse_existing(folders)
    files = source_files(args.kind, Path(args.source))
    if args.kind == "sbi":
        states = [convert_sbi(files["checkpoint"], configs[0]["model"])]
    else:
        states = convert_winner(files["weight.pth"], files["ema.state"], [c["model"] for c in configs])
    digests = {name: file_sha256(path) for name, path in files.items()}
    for k, (folder, fold_cfg, state) in enumerate(zip(folders, configs, states, strict=True)):
        save_weights(state, folder / WEIGHTS_FILE)
        write_json(meta(args.kind, k, fold_cfg, files, digests), folder / META_FILE)  # last: marks the fold complete
        log.info("wrote %s (%s)", folder / WEIGHTS_FILE, fold_cfg["model"]["backbone"])
    return folders


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        folders = run(args)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    member_dir = folders[0].parent
    print(
        f"imported {len(folders)} fold(s) into {member_dir}; score with: python infer.py IMAGE --weights {member_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
