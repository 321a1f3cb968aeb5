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
checkpoint that takes face crops (imported SBI) scores each face's crop and keeps the highest,
and an image where it finds no face is reported and scored by the other members only.
Members are blended as ensemble.py fitted them (method and calibration, read from
outputs/ensemble_fit.json, said on stderr) when that file was fitted for exactly these members
and these trained folds, else by the plain mean (and stderr says why).
Folders are searched recursively for videos and for every file the decoder can open (any
image format, by its name or its header); other files are counted in one line. A video is scored from
--frames frames spread evenly over its length: the faces in each frame are cropped, the
frame's score is the highest face score and the video's the mean over frames. Still images
are scored as they are (competition images are face crops), or face-cropped with --crop-faces.
A member whose network takes clips (`sta`) scores an input as its validation did: a video as
the mean over the clips of its window, a still as its `clip.still` says (core/infer/clip_scoring.py).

On a CPU the networks run in ONNX Runtime: each is exported once per checkpoint, checked
against PyTorch then, and cached beside its weights as model.onnx with the verdict in
model.onnx.json; later runs load it without importing torch. A network whose export failed or
disagreed is scored with PyTorch (one line on stderr) and not exported again until its weights,
torch or ONNX Runtime change. On a GPU the networks run in PyTorch with bf16 autocast.
--runtime torch uses PyTorch on the CPU as well.

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
score says was altered: the probability of each attribute (identity, eye, mouth, ...), after the
path on the text line and as "attributes" {member: {attribute: p}} in --json. Members without
attributes add nothing.

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
from core.infer.attributes import AttributeScorer, format_attributes
from core.infer.clip_scoring import ClipGroup, ClipScorer
from core.infer.ensemble import Ensemble
from core.infer.onnx_cache import VERIFIED, lookup
from core.infer.scoring import ArrayScorer, Crop, Group, Network
from core.io import write_csv
from core.preprocess import Preprocessing
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
    p.add_argument("--frames", type=int, default=16, help="frames sampled per video (default: %(default)s)")
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

    return str(pick_device(name))


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
    """The face crops of checkpoints whose meta.json asks for them (an imported SBI network)."""
    if preprocessing.face_crop is None:
        return None
    from data_prep.face_crop import FaceCropper
    from data_prep.faces import FaceModelError

    try:
        return FaceCropper(preprocessing.face_crop, preprocessing.size)
    except FaceModelError as err:
        raise ConfigError(f"{err}; checkpoints that take face crops need it") from None


def onnx_scorer(ensemble: Ensemble, batch_size: int, workers: int, tta: str = "none") -> ArrayScorer:
    groups = []
    for idx in ensemble.groups().values():
        preprocessing = Preprocessing.from_config(ensemble.trained[idx[0]].config)
        networks = [cpu_network(ensemble.trained[i], preprocessing.size) for i in idx]
        label = ", ".join(sorted({ensemble.trained[i].member for i in idx}))
        groups.append(Group(preprocessing, networks, idx, face_cropper(preprocessing), label))
    return ArrayScorer(groups, len(ensemble.trained), batch_size, workers, tta)


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
        self.frames = args.frames
        self.crop_faces = args.crop_faces
        self.report = report
        self._analyzer = None
        self.per_frame: list[tuple[str, int, str, float]] = []  # video frames' member scores (--per-frame)
        if self.runtime == "onnx":
            self.engine = onnx_scorer(ensemble, self.batch_size, self.workers, args.tta)
        else:
            from models.scoring import TorchScorer

            self.engine = TorchScorer(ensemble, self.device, self.batch_size, self.workers, face_cropper, args.tta)
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
        """Per image model, max over the faces of a frame, mean over frames; None (reported) when no
        face. With `indices` (the frames' places in the video), each frame's member scores are kept
        in `per_frame`."""
        crops, owner = [], []
        for f, frame in enumerate(frames):
            for crop in face_crops(frame, self.analyzer):
                crops.append(crop)
                owner.append(f)
        if not crops:
            self.report(f"{path}: no face found in {len(frames)} frame(s)")
            return None
        scores = np.asarray(self.engine.score_arrays(crops), dtype=float).reshape(len(crops), -1)
        owner = np.asarray(owner)
        # fmax skips the NaN columns of models that do not score crops (clip models)
        per_frame = {f: np.fmax.reduce(scores[owner == f], axis=0) for f in np.unique(owner)}
        if indices is not None:
            self.keep_frames(path, {indices[f]: probs for f, probs in per_frame.items()})
        return np.mean(list(per_frame.values()), axis=0)

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


def attribute_scores(scorer: Scorer, paths: list[Path]) -> list[dict]:
    """Per input, each explaining member's attribute probabilities: still images scored whole (none
    for videos or face crops)."""
    engine = scorer.engine
    if isinstance(engine, ArrayScorer):
        groups = engine.groups
    else:
        from models.scoring import array_groups

        groups = array_groups(engine, scorer.ensemble)
    explainer = AttributeScorer(groups, [t.member for t in scorer.ensemble.trained])
    stills = [] if scorer.crop_faces else [p for p in paths if not is_video(p)]
    found = dict(zip(stills, explainer.score_files(stills), strict=True))
    return [found.get(p, {}) for p in paths]


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems: list[str] = []

    def report(message: str) -> None:
        problems.append(message)
        print(f"skipped: {message}", file=sys.stderr)

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
    if args.json:  # inputs that are not there get their object too
        for raw in args.inputs:
            if not Path(raw).exists():
                print(json_line(str(Path(raw)), None, [], problems))
    if not paths:
        print("error: no image or video to score", file=sys.stderr)
        return 2
    scorer = make_scorer(ensemble, args, report)
    if scorer is None:
        return 2
    table = scorer.score(paths)
    probs = table[:, 0]
    explained = attribute_scores(scorer, paths) if args.attributes else [None] * len(paths)
    for path, row, attributes in zip(paths, table, explained, strict=True):
        if args.json:
            print(json_line(str(path), row, scorer.columns, problems, attributes))
        elif not np.isnan(row[0]):
            print(f"{row[0]:.4f}\t{path}{format_attributes(attributes or {})}")
    if args.out:
        import pandas as pd

        write_csv(pd.DataFrame({"img_name": [str(p) for p in paths], "y_pred": probs}).dropna(), args.out)
    if args.per_frame:
        import pandas as pd

        write_csv(pd.DataFrame(scorer.per_frame, columns=["path", "frame", "member", "probability"]), args.per_frame)
    if args.explain:
        from models.explain import ExplainError, write_explanations

        try:
            write_explanations(ensemble, paths, table, args.explain, scorer.device, report)
        except ExplainError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if np.isnan(probs).all():
        return 2
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
