"""Probability that an image (or video) is a deepfake, from the trained ensemble.

  python infer.py face.jpg                    # one line: <probability>\\t<path>
  python infer.py a.jpg b.png folder/ clip.mp4 --out results.csv
  python infer.py face.jpg --weights outputs/mff_demo/fold0/model.safetensors
  python infer.py --weights fold0/model.safetensors --weights fold1/model.safetensors face.jpg
  python infer.py face.jpg --weights outputs/mff_published     # every finished fold of a member

Models: exactly what ensemble.py blends for the configured data (the demo members on the demo
sample, the real ones otherwise; every fold of the split, finished; folds averaged, then
members blended), named on stderr; or the files given with --weights (safetensors only,
each with the meta.json that train.py or models.import_published wrote beside it; a member's
folder stands for its finished folds). Each network is fed as its meta.json records; a
checkpoint that takes face crops (sbi_fed, imported SBI) scores each face's crop and keeps the highest,
and an image where it finds no face is reported and scored by the other members only.
Members are blended as ensemble.py fitted them (method and calibration, read from
outputs/ensemble_fit.json, said on stderr) when that file was fitted for exactly these members
and these trained folds, else by the plain mean (and stderr says why).
Folders are searched recursively for videos and for every file the decoder can open (any
image format, by its name or its header); other files are counted in one line. A video is scored from
--frames frames spread evenly over its length (default: the most any member's meta.json records,
else 16): the faces in each frame are cropped, the frame's score is the highest face score and
the video's the mean over the frames with a face. Still images
are scored as they are (competition images are face crops), or face-cropped with --crop-faces.
A member whose network takes clips (`sta`) scores an input as its validation did: a video as
the mean over the clips of its window, a still as its `clip.still` says (core/infer/clip_scoring.py).

On a CPU the networks run in ONNX Runtime: each is exported once per checkpoint, checked
against PyTorch then, and cached beside its weights as model.onnx with the verdict in
model.onnx.json; later runs load it without importing torch. A network whose export failed or
disagreed is scored with PyTorch (one line on stderr) and not exported again until its weights,
torch or ONNX Runtime change. On a GPU the networks run in PyTorch with bf16 autocast.
--runtime torch uses PyTorch on the CPU as well.

Under torchrun (`torchrun --nproc_per_node K infer.py FOLDER --out preds.csv`), each process
scores every K-th input and writes its shard beside --out; process 0 merges the shards and
writes what one process would (core/infer/sharded.py). --out is required there.

--serve runs an HTTP service instead (models loaded once, uploads scored in micro-batches):
POST /predict with a multipart file field `file`, GET /health, and an upload page at /; see
core/infer/service.py. --host, --port, --max-upload-mb and --batch-window-ms set it up.

--explain DIR writes, per still image scored, a Grad-CAM overlay for each member (its folds
averaged) and one for the blend, captioned with the probability (models/explain.py); the
networks run in PyTorch for it, on the CPU too.

--tta flip scores each image and its mirror, --tta 6view the image, its three rotations and both
mirrors (`core.data.tta`), averaging the probabilities: as many forward passes per image as views.

--json prints one JSON object per input instead of the tab-separated line: {"path", "probability"
(the blend; null when skipped), "members" (each member's probability), "skipped" (the reason, or
null)}.

--attributes adds, per still image (not with --crop-faces), what each member that explains its
score says was altered, from the same forward pass as its score: after the path,
"member: p(fake) 0.87 | if fake: identity 0.82 eye 0.80 ... | untrained: expression". p(fake) is
the member's own probability (its folds averaged; the line's first number is the blend). Each
attribute is given fake: the probability that it was altered if the image is fake (the member's
joint probability of fake and altered, over its p(fake)), so read it beside p(fake). "untrained":
attributes with no altered example in the member's training data (recorded per fold in its
meta.json); they are not evidence and get no number. An attribute means what the member's
training labels made it mean (docs/members/): a fake's replaced background, for instance, is
labelled altered, but a real pasted into new surroundings is labelled real, so a high
"background" says a fake's surroundings were replaced, never that a real's were. --json:
"attributes" {member: {"fake": p, "given_fake": {attribute: p}, "untrained": [attribute]}}.
Members without attributes add nothing.

Exit status: 0 every input scored; 1 some inputs could not be read (each reported on
stderr, the rest scored); 2 bad arguments, or nothing could be scored; 3 no trained model.
With --serve: 0 once stopped by SIGINT or SIGTERM, 1 when the service could not start.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.blend.applied import FIT_FILE, BlendFileError, read_fitted_blend
from core.clip_reading import ClipSettings
from core.config import ConfigError, load_config
from core.data.labels import LabelError
from core.data.sources import resolve_data
from core.data.tta import TTA_MODES
from core.device import gpu_may_be_present
from core.imaging import ImageDecodeError, decode_image, indexed_video_frames, is_image, is_video, opens_as_image

# Only light modules here: on a CPU whose networks all have a verified ONNX export, scoring
# imports neither torch nor timm (seconds of a one-image run); the PyTorch side is imported
# where it is needed (`--runtime torch`, a GPU, an export to make).
from core.infer.attributes import POSITIVES_KEY, Explained, explain_member, format_attributes
from core.infer.clip_scoring import ClipGroup, ClipScorer
from core.infer.ensemble import Ensemble
from core.infer.onnx_cache import VERIFIED, lookup, needs_export
from core.infer.scoring import ArrayScorer, Crop, Group, Network
from core.infer.sharded import Part, finished_part, gather_parts, remove_shards, run_key, write_part
from core.io import write_csv
from core.preprocess import Preprocessing
from core.ranks import DistInfo, rank_info, usable_cores
from core.trained import (
    WEIGHTS_FILE,
    CheckpointError,
    ModelFile,
    SubmissionError,
    blend_members,
    expected_folds,
    finished_folds,
    member_folds,
    read_model_file,
    training_record,
    weights_files,
)

NO_MODEL = 3

# Measured with bench/infer_throughput.py (docs/benchmarks.md): on a 2-core CPU, ONNX Runtime one image at
# a time, decoded in the main process, was fastest (larger batches ran slower per image, and a
# decode worker takes a core from the forward pass); on a GPU, PyTorch with large batches and
# decode workers.
DEVICE_DEFAULTS = {
    "cpu": {"batch_size": 1, "workers": 0, "runtime": "onnx"},
    "cuda": {"batch_size": 64, "workers": 8, "runtime": "torch"},
}
RUNTIMES = ("auto", "onnx", "torch")
# Frames a video is scored on where no member's recorded preprocessing says (`video_frames`).
DEFAULT_FRAMES = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="images, videos or folders")
    p.add_argument(
        "--weights",
        action="append",
        metavar="FILE",
        help="a model.safetensors file, or a member's folder (all its finished folds), to use instead of the "
        "outputs folder; repeat for several",
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
    p.add_argument("--json", action="store_true", help="print one JSON object per input (JSON lines)")
    p.add_argument(
        "--per-frame",
        metavar="CSV",
        help="also write each scored video frame's member probabilities here: path,frame,member,probability "
        "(image members, max over the frame's faces; a clip member scores the whole clip, so it has no rows)",
    )
    p.add_argument(
        "--attributes", action="store_true", help="also print what was altered (attribute probabilities) per image"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="default: 1 on CPU, 64 on GPU (measured, see docs/benchmarks.md)")
    p.add_argument(
        "--workers",
        type=int,
        help="decoding processes with PyTorch, threads with ONNX Runtime (default: 0 on CPU, 8 on GPU)",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs the networks: onnx (ONNX Runtime, CPU only) or torch (default: onnx on CPU, torch on GPU)",
    )
    p.add_argument(
        "--tta",
        choices=list(TTA_MODES),
        default="none",
        help="test-time augmentation: none, flip (2 views) or 6view (rotations and mirrors) (default: %(default)s)",
    )
    p.add_argument(
        "--frames",
        type=int,
        help=f"frames sampled per video (default: the most any scored member's preprocessing records, e.g. "
        f"sbi_fed's 32; {DEFAULT_FRAMES} where none does)",
    )
    p.add_argument("--crop-faces", action="store_true", help="detect and crop the face of still images too")
    p.add_argument(
        "--explain",
        metavar="DIR",
        help="write Grad-CAM overlays of each still image to DIR: <stem>__<member>.png and <stem>__blend.png",
    )
    serving = p.add_argument_group("HTTP service (--serve; see core/infer/service.py)")
    serving.add_argument("--serve", action="store_true", help="load the models once and score uploads over HTTP")
    serving.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serving.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    serving.add_argument(
        "--max-upload-mb", type=float, default=50.0, help="larger uploads get 413 (default: %(default)s)"
    )
    serving.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="how long an upload waits for others to be scored with it (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.serve and args.inputs:
        p.error("--serve takes no inputs: upload them to the service")
    if not args.serve and not args.inputs:
        p.error("the following arguments are required: inputs")
    if args.explain and args.crop_faces:
        p.error("--explain shows whole images; it does not combine with --crop-faces")
    if args.explain and args.serve:
        p.error("--explain writes files for the inputs given; it does not combine with --serve")
    return args


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
    """The models to score with, read from their meta.json files (no network is built here)."""
    cfg = load_config([args.data_config, args.config])
    paths = [p for w in args.weights for p in weights_files(w)] if args.weights else blended_weights(cfg, args)
    fit_file = Path(args.outputs or cfg["paths"]["outputs"]) / FIT_FILE
    ensemble = Ensemble([read_model_file(p) for p in paths], cfg.get("weights"), read_fitted_blend(fit_file))
    if ensemble.fit is not None:
        print(f"blend: {ensemble.fit.describe()}, as fitted in {fit_file}", file=sys.stderr)
    elif ensemble.fit_refused:
        print(
            f"blend: plain mean; {fit_file} is not applied: {ensemble.fit_refused} (rerun ensemble.py)", file=sys.stderr
        )
    return ensemble


def face_crops(frame: np.ndarray, analyzer, size: int = 512) -> list[np.ndarray]:
    from data_prep.faces import align_crop

    return [align_crop(frame, face, size) for face in analyzer.detect(frame)]


def resolve_device(name: str) -> str:
    """The device to score on; torch is asked only where a GPU may be present."""
    if name == "cpu" or (name == "auto" and not gpu_may_be_present()):
        return "cpu"
    from core.device import pick_device

    device = str(pick_device(name))
    info = rank_info()
    # under torchrun, each process of a machine takes its own GPU, as train.py's do
    return f"cuda:{info.local_rank}" if device == "cuda" and info.enabled else device


def pick_runtime(requested: str, device: object) -> str:
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if requested == "auto":
        return DEVICE_DEFAULTS[kind]["runtime"]
    if requested == "onnx" and kind != "cpu":
        raise ValueError(f"--runtime onnx runs on the CPU only, not on {device}")
    return requested


def cpu_network(trained: ModelFile, size: int, frames: int | None = None) -> Network:
    """ONNX Runtime's network for `trained` (a clip network's with `frames`, its longest clip): its
    verified cached export, read without torch; else (no export yet, or a failed one) torch is
    imported to export or to score it."""
    cached = lookup(trained.weights, size)
    if cached.state == VERIFIED:
        return cached.network
    from models.scoring import cpu_network as export_or_fallback

    return export_or_fallback(trained, size, cached, frames)


def face_cropper(preprocessing: Preprocessing) -> Crop | None:
    """The face crops of checkpoints whose meta.json asks for them (`sbi_fed`, an imported SBI network)."""
    if preprocessing.face_crop is None:
        return None
    from data_prep.face_crop import face_cropper as cropper  # dlib: only where a checkpoint needs it

    return cropper(preprocessing)


def export_missing(ensemble: Ensemble) -> None:
    """Export side by side, on every core, the networks without a usable export in their cache
    (`models.parallel_export`). Under torchrun the cores are shared among a machine's processes,
    and each process starts on other networks, taking those its peers have finished as done."""
    jobs = []
    for idx in ensemble.groups().values():
        size = Preprocessing.from_config(ensemble.trained[idx[0]].config).size
        jobs += [(ensemble.trained[i].weights, size) for i in idx if needs_export(ensemble.trained[i].weights, size)]
    info = rank_info()
    if not jobs or (len(jobs) == 1 and not info.enabled):  # one export: made where it is needed, as before
        return
    from models.parallel_export import export_all

    start = info.rank * len(jobs) // info.world
    export_all(jobs[start:] + jobs[:start], max(1, usable_cores() // info.local_world))


def onnx_scorer(
    ensemble: Ensemble, batch_size: int, workers: int, tta: str = "none", explain: bool = False
) -> ArrayScorer:
    export_missing(ensemble)
    groups = []
    for idx in ensemble.groups().values():
        preprocessing = Preprocessing.from_config(ensemble.trained[idx[0]].config)
        networks = [cpu_network(ensemble.trained[i], preprocessing.size) for i in idx]
        label = ", ".join(sorted({ensemble.trained[i].member for i in idx}))
        groups.append(Group(preprocessing, networks, idx, face_cropper(preprocessing), label))
    return ArrayScorer(groups, len(ensemble.trained), batch_size, workers, tta, explain)


def clip_scorer(ensemble: Ensemble, runtime: str, device: str) -> ClipScorer:
    """The clip members' scorer: ONNX Runtime on a CPU (the same cached, checked exports as image
    members), PyTorch on a GPU or with --runtime torch."""
    groups = []
    for idx in ensemble.clip_groups().values():
        cfg = ensemble.trained[idx[0]].config
        settings, preprocessing = ClipSettings.from_cfg(cfg), Preprocessing.from_config(cfg)
        if runtime == "onnx":
            networks = [cpu_network(ensemble.trained[i], preprocessing.size, settings.frames) for i in idx]
        else:
            from models.scoring import clip_network

            networks = [clip_network(ensemble.trained[i], device) for i in idx]
        crop = None
        if settings.face_crop:  # dlib only where a member crops faces
            from data_prep.clip_faces import clip_cropper

            crop = clip_cropper(cfg)
        groups.append(ClipGroup(settings, preprocessing, networks, idx, crop))
    return ClipScorer(groups, len(ensemble.trained))


class Scorer:
    """Scores inputs with `ensemble`: per row, the blend, then each member's probability (its
    folds averaged), in the order of `ensemble.members`; NaN where the input was not scored."""

    def __init__(self, ensemble: Ensemble, args: argparse.Namespace, report: Callable[[str], None]):
        self.ensemble = ensemble
        self.device = resolve_device(args.device)
        defaults = DEVICE_DEFAULTS["cuda" if self.device.startswith("cuda") else "cpu"]
        self.batch_size = args.batch_size or defaults["batch_size"]
        self.workers = defaults["workers"] if args.workers is None else args.workers
        self.runtime = pick_runtime(args.runtime, self.device)
        recorded = [Preprocessing.from_config(ensemble.trained[idx[0]].config) for idx in ensemble.groups().values()]
        self.frames = args.frames or max((p.video_frames or 0 for p in recorded), default=0) or DEFAULT_FRAMES
        self.face_cropping = any(p.face_crop for p in recorded)  # networks that cut their own face crops
        self.whole = any(p.face_crop is None for p in recorded)  # networks fed the aligned face crops
        self.crop_faces = args.crop_faces
        self.report = report
        self._analyzer = None
        self.per_frame: list[tuple[str, int, str, float]] = []  # video frames' member scores (--per-frame)
        self.explained: dict[int, dict[str, Explained]] = {}  # --attributes: input index -> member -> explanation
        if self.runtime == "onnx":
            self.engine = onnx_scorer(ensemble, self.batch_size, self.workers, args.tta, args.attributes)
        else:
            from models.scoring import TorchScorer, array_groups

            self.engine = TorchScorer(ensemble, self.device, self.batch_size, self.workers, face_cropper, args.tta)
            if args.attributes:  # the same networks behind the NumPy interface: one pass gives scores and attributes
                n = len(ensemble.trained)
                groups = array_groups(self.engine, ensemble)
                self.engine = ArrayScorer(groups, n, self.batch_size, self.workers, args.tta, explain=True)
        self.clips = clip_scorer(ensemble, self.runtime, self.device) if ensemble.clip_models() else None

    @property
    def columns(self) -> list[str]:
        return ["blend", *self.ensemble.members]

    @property
    def analyzer(self):
        if self._analyzer is None:
            from data_prep.faces import FaceAnalyzer

            self._analyzer = FaceAnalyzer(embed=False)
        return self._analyzer

    def _table(self, probs: np.ndarray) -> np.ndarray:
        return np.column_stack([self.ensemble.blend(probs), self.ensemble.member_probs(probs)])

    def _explain(self, stills: list[int], probs: np.ndarray) -> dict[int, dict[str, Explained]]:
        """Per still image the engine explained, each explaining member's p(fake) and attributes
        (`core.infer.attributes.explain_member`) from its folds' outputs of the scoring pass."""
        found: dict[int, dict[int, dict[str, float]]] = getattr(self.engine, "attributes", {})
        trained = self.ensemble.trained
        columns_explained = {c for one in found.values() for c in one}
        positives = {c: training_record(trained[c].weights).get(POSITIVES_KEY) for c in columns_explained}
        out = {}
        for j, columns in found.items():
            i, by_member = stills[j], {}
            for c in columns:
                by_member.setdefault(trained[c].member, []).append(c)
            out[i] = {
                m: explain_member([columns[c] for c in cs], [probs[i, c] for c in cs], [positives[c] for c in cs])
                for m, cs in by_member.items()
            }
        return out

    def score_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Rows of `columns` for decoded still images (the service's uploads), clip members included."""
        probs = np.asarray(self.engine.score_arrays(arrays), dtype=float).reshape(len(arrays), -1)
        if self.clips is not None:
            self.clips.score_arrays(arrays, probs)
        return self._table(probs)

    def score_faces(self, path: Path, frames: list[np.ndarray]) -> np.ndarray | None:
        """The row of `columns` for a face-cropped still: its faces (`pool_faces`) and the clip
        members on the image; None (reported) when no face."""
        pooled = self.pool_faces(path, frames)
        if pooled is None:
            return None
        if self.clips is not None:
            self.clips.score_arrays(frames[:1], pooled[None])
        return self._table(pooled[None])[0]

    def video_probs(self, path: Path) -> np.ndarray:
        """(n_models,) probabilities of the video at `path`: image members on the faces of its
        --frames frames (NaN, reported, where none has a face), clip members on its clips.
        ImageDecodeError when it cannot be read."""
        indexed = indexed_video_frames(path, self.frames)
        pooled = self.pool_faces(path, [frame for _, frame in indexed], [k for k, _ in indexed])
        probs = np.full(len(self.ensemble.trained), np.nan) if pooled is None else pooled
        if self.clips is None:
            return probs
        try:
            clip_probs = self.clips.score_file(path)
        except ImageDecodeError as err:  # the image members' frames were read: keep their scores
            self.report(str(err))
            return probs
        return np.where(np.isnan(clip_probs), probs, clip_probs)

    def score_video(self, path: Path) -> np.ndarray | None:
        """The row of `columns` for the video at `path` (the service's upload), as `score` gives it;
        None when no member could score it."""
        row = self._table(self.video_probs(path)[None])[0]
        return None if np.isnan(row[0]) else row

    def pool_faces(self, path: Path, frames: list[np.ndarray], indices: list[int] | None = None) -> np.ndarray | None:
        """Per image model, max over the faces of a frame, mean over the frames where it found one;
        None (reported) when no face. Networks that take face crops cut each frame themselves (as
        their recorded preprocessing says); the others score the aligned crops of `face_crops`.
        With `indices` (the frames' places in the video), each frame's member scores are kept in
        `per_frame`."""
        per_frame = np.full((len(frames), len(self.ensemble.trained)), np.nan)
        if self.whole:
            crops, owner = [], []
            for f, frame in enumerate(frames):
                for crop in face_crops(frame, self.analyzer):
                    crops.append(crop)
                    owner.append(f)
            if crops:
                scores = np.asarray(self.engine.score_arrays(crops, face_crops=False), dtype=float)
                owner = np.asarray(owner)
                # fmax skips the NaN columns of models that do not score these crops
                for f in np.unique(owner):
                    per_frame[f] = np.fmax.reduce(scores.reshape(len(crops), -1)[owner == f], axis=0)
        if self.face_cropping:  # NaN where a network found no face; its columns are NaN above
            per_frame = np.fmax(per_frame, self.engine.score_arrays(frames, face_crops=True))
        found = ~np.isnan(per_frame).all(axis=1)
        if not found.any():
            self.report(f"{path}: no face found in {len(frames)} frame(s)")
            return None
        if indices is not None:
            self.keep_frames(path, {indices[f]: per_frame[f] for f in np.flatnonzero(found)})
        scored = ~np.isnan(per_frame[found])
        total = np.where(scored, per_frame[found], 0.0).sum(axis=0)
        return np.where(scored.any(axis=0), total / np.maximum(scored.sum(axis=0), 1), np.nan)

    def keep_frames(self, path: Path, frames: dict[int, np.ndarray]) -> None:
        """Rows (path, frame, member, probability) of each image member's score of each frame."""
        for frame, probs in frames.items():
            for member, p in zip(self.ensemble.members, self.ensemble.member_probs(probs[None])[0], strict=True):
                if not np.isnan(p):  # a clip member scores the whole clip, not frames
                    self.per_frame.append((str(path), frame, member, float(p)))

    def score(self, paths: list[Path]) -> np.ndarray:
        """Per input: the blend, then each member's probability; image models score frames and
        crops, clip models (`models.clip_scoring`) the whole clip, and the blend takes them all."""
        probs = np.full((len(paths), len(self.ensemble.trained)), np.nan)
        stills = [i for i, p in enumerate(paths) if not is_video(p)]
        if stills and not self.crop_faces:
            probs[stills] = self.engine.score_files([paths[i] for i in stills], self.report)
            self.explained = self._explain(stills, probs)
        unreadable = set()
        for i, p in enumerate(paths):
            try:
                if is_video(p):
                    probs[i] = self.video_probs(p)
                    continue
                if not self.crop_faces:
                    continue
                pooled = self.pool_faces(p, [decode_image(p)])
            except ImageDecodeError as err:
                self.report(str(err))
                unreadable.add(i)
                continue
            if pooled is not None:
                probs[i] = pooled
        if self.clips is not None:
            still = [i for i in range(len(paths)) if i not in unreadable and not is_video(paths[i])]
            clip_probs = probs[still]
            self.clips.score([paths[i] for i in still], clip_probs, self.report)
            probs[still] = clip_probs
        return self._table(probs)


def skip_reason(path: str, problems: list[str]) -> str | None:
    """The last problem reported for `path` (messages start with the path), without the path."""
    prefix = f"{path}: "
    found = [m.removeprefix(prefix) for m in problems if m.startswith(prefix)]
    return found[-1] if found else None


def json_line(
    path: str, row: np.ndarray | None, columns: list[str], problems: list[str], attributes: dict | None = None
) -> str:
    def value(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    scored = row is not None and not np.isnan(row[0])
    members = {} if row is None else {m: value(x) for m, x in zip(columns[1:], row[1:], strict=True)}
    reason = None if scored else skip_reason(path, problems) or "no member could score it"
    obj = {"path": path, "probability": value(row[0]) if scored else None, "members": members, "skipped": reason}
    if attributes is not None:
        obj["attributes"] = attributes
    return json.dumps(obj)


def make_scorer(ensemble: Ensemble, args: argparse.Namespace, report: Callable[[str], None]) -> Scorer | None:
    """The scorer, or None once the reason it cannot be built is on stderr: weights that do not
    fit their meta.json, or a recipe (or the face models it needs) unknown here."""
    try:
        return Scorer(ensemble, args, report)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def serve(ensemble: Ensemble, args: argparse.Namespace, report: Callable[[str], None]) -> int:
    """Runs the HTTP service until it is told to stop (starlette and uvicorn only imported here)."""
    from core.infer.service import ServedModel, run_server

    scorer = make_scorer(ensemble, args, report)
    if scorer is None:
        return 2
    model = ServedModel(scorer.columns, scorer.score_arrays, scorer.score_faces, scorer.score_video, scorer.crop_faces)
    return run_server(model, args.host, args.port, args.max_upload_mb, args.batch_window_ms)


@dataclass
class Scored:
    """What scoring some inputs gave: a row of `columns` per input, the attributes per input
    (--attributes) and the scored video frames' rows (path, frame, member, probability)."""

    table: np.ndarray
    attributes: list[dict | None]
    per_frame: list[tuple]


def score_inputs(ensemble: Ensemble, args: argparse.Namespace, paths: list[Path], report) -> Scored | None:
    """`paths` scored (none: an empty table); None once the reason no scorer could be built is on stderr."""
    columns = ["blend", *ensemble.members]
    if not paths:
        return Scored(np.empty((0, len(columns))), [], [])
    scorer = make_scorer(ensemble, args, report)
    if scorer is None:
        return None
    table = scorer.score(paths)
    attributes = [scorer.explained.get(i, {}) for i in range(len(paths))] if args.attributes else [None] * len(paths)
    return Scored(table, attributes, scorer.per_frame)


def emit(paths: list[Path], scored: Scored, columns: list[str], problems: list[str], args: argparse.Namespace) -> None:
    """Print a line per input (text or --json) and write --out and --per-frame."""
    for path, row, attributes in zip(paths, scored.table, scored.attributes, strict=True):
        if args.json:
            print(json_line(str(path), row, columns, problems, attributes))
        elif not np.isnan(row[0]):
            print(f"{row[0]:.4f}\t{path}{format_attributes(attributes or {})}")
    if args.out:
        import pandas as pd

        probs = scored.table[:, 0]
        write_csv(pd.DataFrame({"img_name": [str(p) for p in paths], "y_pred": probs}).dropna(), args.out)
    if args.per_frame:
        import pandas as pd

        write_csv(pd.DataFrame(scored.per_frame, columns=["path", "frame", "member", "probability"]), args.per_frame)


def explain(ensemble: Ensemble, paths: list[Path], table: np.ndarray, args: argparse.Namespace, report) -> bool:
    """Write the --explain overlays of `paths`; False once the reason it could not is on stderr."""
    from models.explain import ExplainError, write_explanations

    try:
        write_explanations(ensemble, paths, table, args.explain, resolve_device(args.device), report)
    except ExplainError as err:
        print(f"error: {err}", file=sys.stderr)
        return False
    return True


def exit_status(table: np.ndarray, problems: list[str]) -> int:
    if len(table) == 0 or np.isnan(table[:, 0]).all():
        return 2
    return 1 if problems else 0


def frame_owners(paths: list[Path], per_frame: list[tuple]) -> list[int]:
    """The place in `paths` of each frame row: rows come in the order their videos were scored,
    which is the order of `paths` (the rows of a video given twice all go to its first place)."""
    owners, place = [], 0
    for row in per_frame:
        while str(paths[place]) != row[0]:
            place += 1
        owners.append(place)
    return owners


def score_shard(
    ensemble: Ensemble, args: argparse.Namespace, paths: list[Path], info: DistInfo, key: str
) -> Part | None:
    """This process's share of `paths` (every world-th), scored and written to its shard file, or
    taken from the shard an earlier run of the same key left; None once stderr says why it failed."""
    done = finished_part(args.out, info, key)
    if done is not None:
        print(f"rank {info.rank}: its shard of this run is already scored; taking it", file=sys.stderr)
        return done
    indices = list(range(info.rank, len(paths), info.world))
    mine = [paths[i] for i in indices]
    problems: list[str] = []

    def shard_report(message: str) -> None:  # kept in the shard: process 0 counts every process's problems
        problems.append(message)
        print(f"skipped: {message}", file=sys.stderr)

    scored = score_inputs(ensemble, args, mine, shard_report)
    if scored is None:
        return None
    owners = frame_owners(mine, scored.per_frame)
    part = Part(
        indices=indices,
        rows=[[None if np.isnan(x) else float(x) for x in row] for row in scored.table],
        attributes=scored.attributes,
        per_frame=[[indices[o], *row] for o, row in zip(owners, scored.per_frame, strict=True)],
        problems=problems,
    )
    write_part(args.out, info, key, part)
    return part


def merge(parts: list[Part], n: int, columns: list[str]) -> Scored:
    """The processes' parts as one process would have scored all `n` inputs."""
    table = np.full((n, len(columns)), np.nan)
    attributes: list[dict | None] = [None] * n
    frames = []
    for part in parts:
        if part.indices:
            table[part.indices] = np.array(part.rows, dtype=float)
        for i, found in zip(part.indices, part.attributes, strict=True):
            attributes[i] = found
        frames += part.per_frame
    frames.sort(key=lambda row: row[0])  # stable: a video's frames keep their order
    return Scored(table, attributes, [tuple(row[1:]) for row in frames])


def run_sharded(ensemble: Ensemble, args: argparse.Namespace, paths: list[Path], problems: list[str], report) -> int:
    """Under torchrun: score this process's share into its shard; process 0 then merges every
    shard and writes what one process would have (`core.infer.sharded`)."""
    info = rank_info()
    fit_file = Path(args.outputs or load_config([args.data_config, args.config])["paths"]["outputs"]) / FIT_FILE
    key = run_key({**vars(args), "world": info.world}, paths, [*(t.weights for t in ensemble.trained), fit_file])
    part = score_shard(ensemble, args, paths, info, key)
    if part is None:
        return 2
    ok = True
    if args.explain:
        mine = [paths[i] for i in part.indices]
        ok = explain(ensemble, mine, np.array(part.rows, dtype=float).reshape(len(mine), -1), args, report)
    if not info.is_main:
        return 0 if ok else 2
    parts = gather_parts(args.out, info, key)
    for each in parts:
        problems += each.problems
    columns = ["blend", *ensemble.members]
    scored = merge(parts, len(paths), columns)
    emit(paths, scored, columns, problems, args)
    remove_shards(args.out, info)
    return exit_status(scored.table, problems) if ok else 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems: list[str] = []
    info = rank_info()

    def report(message: str) -> None:
        problems.append(message)
        print(f"skipped: {message}", file=sys.stderr)

    if info.enabled and (args.serve or not args.out):
        print(
            "error: under torchrun, give --out (the processes' shards meet beside it); --serve runs in one process",
            file=sys.stderr,
        )
        return 2
    try:  # bad --device / --runtime: fail before loading any model
        pick_runtime(args.runtime, resolve_device(args.device))
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        ensemble = load_ensemble(args)
    except FileNotFoundError as err:
        print(str(err), file=sys.stderr)
        return NO_MODEL
    except (ConfigError, CheckpointError, LabelError, SubmissionError, BlendFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.serve:
        return serve(ensemble, args, report)
    paths = expand_inputs(args.inputs, report)
    if args.json and info.is_main:  # inputs that are not there get their object too
        for raw in args.inputs:
            if not Path(raw).exists():
                print(json_line(str(Path(raw)), None, [], problems))
    if not paths:
        print("error: no image or video to score", file=sys.stderr)
        return 2
    if info.enabled:
        return run_sharded(ensemble, args, paths, problems, report)
    scored = score_inputs(ensemble, args, paths, report)
    if scored is None:
        return 2
    emit(paths, scored, ["blend", *ensemble.members], problems, args)
    if args.explain and not explain(ensemble, paths, scored.table, args, report):
        return 2
    return exit_status(scored.table, problems)


if __name__ == "__main__":
    sys.exit(main())
