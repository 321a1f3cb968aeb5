"""Probability that an image (or video) is a deepfake, from the trained ensemble.

  python infer.py face.jpg                    # one line: <probability>\\t<path>
  python infer.py a.jpg b.png folder/ clip.mp4 --out results.csv
  python infer.py face.jpg --weights outputs/mff_demo/fold0/model.safetensors
  python infer.py --weights fold0/model.safetensors --weights fold1/model.safetensors face.jpg

Models: exactly what ensemble.py blends for the configured data (the demo members on the demo
sample, the real ones otherwise; every fold of the split, finished; folds averaged, then
members blended), named on stderr; or the files given with --weights (safetensors only,
each with the meta.json that train.py wrote beside it).
Folders are searched recursively for videos and for every file the decoder can open (any
image format, by its name or its header); other files are counted in one line. A video is scored from
--frames frames spread evenly over its length: the faces in each frame are cropped, the
frame's score is the highest face score and the video's the mean over frames. Still images
are scored as they are (competition images are face crops), or face-cropped with --crop-faces.

On a CPU the networks run in ONNX Runtime (exported once per checkpoint and cached beside its
weights as model.onnx; each export is checked against PyTorch before use); on a GPU in PyTorch
with bf16 autocast. --runtime torch uses PyTorch on the CPU as well.

Exit status: 0 every input scored; 1 some inputs could not be read (each reported on
stderr, the rest scored); 2 bad arguments, or nothing could be scored; 3 no trained model.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import models  # noqa: F401  (registers the members)
from core.blend import SubmissionError, blend_members, expected_folds, finished_folds, member_folds
from core.checkpoint import WEIGHTS_FILE, CheckpointError
from core.config import ConfigError, load_config
from core.dataset import ImageDataset, make_loader
from core.datasource import resolve_data
from core.device import pick_device
from core.imaging import ImageDecodeError, decode_image, is_image, is_video, opens_as_image, sample_video_frames
from core.io import write_csv
from core.labels import LabelError
from core.predict import predict_arrays, predict_loader
from core.transforms import build_transform
from models.fusion import fold_batchnorm
from models.onnx_export import onnx_network
from models.zoo import Ensemble, load_trained

NO_MODEL = 3

# Measured with bench/infer_throughput.py (README): on a 2-core CPU, ONNX Runtime one image at
# a time, decoded in the main process, was fastest (larger batches ran slower per image, and a
# decode worker takes a core from the forward pass); on a GPU, PyTorch with large batches and
# decode workers.
DEVICE_DEFAULTS = {
    "cpu": {"batch_size": 1, "workers": 0, "runtime": "onnx"},
    "cuda": {"batch_size": 64, "workers": 8, "runtime": "torch"},
}
RUNTIMES = ("auto", "onnx", "torch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="images, videos or folders")
    p.add_argument(
        "--weights",
        action="append",
        metavar="FILE",
        help="a model.safetensors file to use instead of the outputs folder; repeat for several",
    )
    p.add_argument("--config", default="configs/ensemble.yaml", help="ensemble config (default: %(default)s)")
    p.add_argument(
        "--data-config",
        default="configs/data.yaml",
        help="data config: whether the demo or the real members are blended, and the split (default: %(default)s)",
    )
    p.add_argument("--outputs", help="where train.py wrote the members (default: paths.outputs of the data config)")
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="use a member whose folds are not all finished (default: refuse it, as ensemble.py does)",
    )
    p.add_argument("--out", help="also write img_name,y_pred to this CSV")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="default: 1 on CPU, 64 on GPU (measured, see README)")
    p.add_argument("--workers", type=int, help="decoding processes (default: 0 on CPU, 8 on GPU)")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs the networks: onnx (ONNX Runtime, CPU only) or torch (default: onnx on CPU, torch on GPU)",
    )
    p.add_argument("--frames", type=int, default=16, help="frames sampled per video (default: %(default)s)")
    p.add_argument("--crop-faces", action="store_true", help="detect and crop the face of still images too")
    return p.parse_args(argv)


def scan_folder(folder: Path) -> tuple[list[Path], Counter[str]]:
    """Every file under `folder` (recursively, sorted) that is a video or an image: named as one
    (a corrupt one is then reported when it is decoded) or recognised by the decoder from its
    header (a GIF, an image without an extension). Also the count of other files per extension."""
    found: list[Path] = []
    ignored: Counter[str] = Counter()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if is_image(path) or is_video(path) or opens_as_image(path):
            found.append(path)
        else:
            ignored[path.suffix.lower() or "(no extension)"] += 1
    return found, ignored


def expand_inputs(inputs: list[str], report: Callable[[str], None]) -> list[Path]:
    """Files as given; folders scanned with `scan_folder`. Files in folders that are neither
    images nor videos are left out with one summary line on stderr, not reported as skipped."""
    found: list[Path] = []
    ignored: Counter[str] = Counter()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files, others = scan_folder(path)
            found += files
            ignored += others
        elif path.is_file():
            found.append(path)
        else:
            report(f"{path}: no such file or folder")
    if ignored:
        kinds = ", ".join(f"{ext} {n}" for ext, n in sorted(ignored.items()))
        print(f"ignored {ignored.total()} file(s) that are not images or videos: {kinds}", file=sys.stderr)
    return found


def blended_weights(cfg: dict, args: argparse.Namespace) -> list[Path]:
    """The weights files ensemble.py blends for the configured data: the members it names for
    the demo or the real data, each with every fold of the split finished (or, with
    --allow-partial, the folds it has). Says on stderr which members and folds are in use."""
    outputs = Path(args.outputs or cfg["paths"]["outputs"])
    members = blend_members(cfg, resolve_data(cfg, prepared=False).is_demo)
    if not any(finished_folds(outputs, m) for m in members):
        raise FileNotFoundError(
            f"no trained model of {', '.join(members)} under {outputs}/: run `bash run_all.sh` (or train.py for a "
            "member), or give --weights outputs/<member>/fold<k>/model.safetensors"
        )
    expected = expected_folds(cfg["paths"]["folds"])
    paths = []
    for member in members:
        folds = member_folds(outputs, member, expected, args.allow_partial)
        print(f"using {member}: fold(s) {','.join(map(str, folds))}", file=sys.stderr)
        paths += [outputs / member / f"fold{k}" / WEIGHTS_FILE for k in folds]
    return paths


def load_ensemble(args: argparse.Namespace) -> Ensemble:
    cfg = load_config([args.data_config, args.config])
    paths = [Path(w) for w in args.weights] if args.weights else blended_weights(cfg, args)
    return Ensemble([load_trained(p) for p in paths], cfg.get("weights"))


def face_crops(frame: np.ndarray, analyzer, size: int = 512) -> list[np.ndarray]:
    from data_prep.faces import align_crop

    return [align_crop(frame, face, size) for face in analyzer.detect(frame)]


def prepare_network(
    model: torch.nn.Module, size: int, device: torch.device, runtime: str, weights: Path | None = None
) -> torch.nn.Module:
    """The network as scored, in eval mode. `onnx` (CPU): exported to ONNX Runtime, the export
    cached beside `weights`. `torch`: BatchNorm folded into the convolutions and weights in
    channels_last. Either rewrite is checked to give `model`'s outputs on a random image of the
    input size; where the ONNX export fails that check, the `torch` preparation is used (logged).
    May return a new module; drop the old one."""
    model = model.to(device).eval()
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    if runtime == "onnx":
        network = onnx_network(model, example, weights)
        if network is not model:
            return network
    return fold_batchnorm(model, example).to(memory_format=torch.channels_last)


def pick_runtime(requested: str, device: torch.device) -> str:
    kind = "cuda" if device.type == "cuda" else "cpu"
    if requested == "auto":
        return DEVICE_DEFAULTS[kind]["runtime"]
    if requested == "onnx" and kind != "cpu":
        raise ValueError(f"--runtime onnx runs on the CPU only, not on {device}")
    return requested


class Scorer:
    def __init__(self, ensemble: Ensemble, args: argparse.Namespace, report: Callable[[str], None]):
        self.ensemble = ensemble
        self.device = pick_device(args.device)
        defaults = DEVICE_DEFAULTS["cuda" if self.device.type == "cuda" else "cpu"]
        self.batch_size = args.batch_size or defaults["batch_size"]
        self.workers = defaults["workers"] if args.workers is None else args.workers
        self.runtime = pick_runtime(args.runtime, self.device)
        # PyTorch runs these convnets faster in channels_last on CPU and GPU alike (README);
        # ONNX Runtime takes NCHW.
        self.channels_last = self.runtime == "torch"
        self.frames = args.frames
        self.crop_faces = args.crop_faces
        self.report = report
        self._analyzer = None
        self.groups = []
        for idx in ensemble.groups().values():
            data_cfg = ensemble.trained[idx[0]].config["data"]
            size = int(data_cfg["image_size"])
            for i in idx:  # replaced, not copied: one network per model in memory
                trained = ensemble.trained[i]
                trained.model = prepare_network(trained.model, size, self.device, self.runtime, trained.weights)
            networks = [ensemble.trained[i].model for i in idx]
            self.groups.append((build_transform(data_cfg, train=False), networks, idx))

    @property
    def analyzer(self):
        if self._analyzer is None:
            from data_prep.faces import FaceAnalyzer

            self._analyzer = FaceAnalyzer(embed=False)
        return self._analyzer

    def score_files(self, paths: list[Path]) -> np.ndarray:
        probs = np.full((len(paths), len(self.ensemble.trained)), np.nan)
        for transform, group_models, idx in self.groups:
            loader = make_loader(
                ImageDataset([str(p) for p in paths], transform=transform), self.batch_size, self.workers
            )
            probs[:, idx] = predict_loader(
                group_models,
                loader,
                self.device,
                channels_last=self.channels_last,
                progress=len(paths) > self.batch_size,
                on_error=self.report,
            )
        return self.ensemble.blend(probs)

    def score_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        probs = np.full((len(arrays), len(self.ensemble.trained)), np.nan)
        for transform, group_models, idx in self.groups:
            probs[:, idx] = predict_arrays(
                group_models,
                arrays,
                transform,
                self.device,
                batch_size=self.batch_size,
                channels_last=self.channels_last,
            )
        return self.ensemble.blend(probs)

    def score_faces(self, path: Path, frames: list[np.ndarray]) -> float:
        """Max over the faces of a frame, mean over frames; NaN (reported) when no face."""
        crops, owner = [], []
        for f, frame in enumerate(frames):
            for crop in face_crops(frame, self.analyzer):
                crops.append(crop)
                owner.append(f)
        if not crops:
            self.report(f"{path}: no face found in {len(frames)} frame(s)")
            return float("nan")
        scores = pd.Series(self.score_arrays(crops)).groupby(owner).max()
        return float(scores.mean())

    def score(self, paths: list[Path]) -> np.ndarray:
        out = np.full(len(paths), np.nan)
        stills = [i for i, p in enumerate(paths) if not is_video(p)]
        if stills and not self.crop_faces:
            out[stills] = self.score_files([paths[i] for i in stills])
        for i, p in enumerate(paths):
            try:
                if is_video(p):
                    out[i] = self.score_faces(p, sample_video_frames(p, self.frames))
                elif self.crop_faces:
                    out[i] = self.score_faces(p, [decode_image(p)])
            except ImageDecodeError as err:
                self.report(str(err))
        return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems: list[str] = []

    def report(message: str) -> None:
        problems.append(message)
        print(f"skipped: {message}", file=sys.stderr)

    try:  # bad --device / --runtime: fail before loading any model
        pick_runtime(args.runtime, pick_device(args.device))
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        ensemble = load_ensemble(args)
    except FileNotFoundError as err:
        print(str(err), file=sys.stderr)
        return NO_MODEL
    except (ConfigError, CheckpointError, LabelError, SubmissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = expand_inputs(args.inputs, report)
    if not paths:
        print("error: no image or video to score", file=sys.stderr)
        return 2
    probs = Scorer(ensemble, args, report).score(paths)
    for path, p in zip(paths, probs, strict=True):
        if not np.isnan(p):
            print(f"{p:.4f}\t{path}")
    if args.out:
        write_csv(pd.DataFrame({"img_name": [str(p) for p in paths], "y_pred": probs}).dropna(), args.out)
    if np.isnan(probs).all():
        return 2
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
