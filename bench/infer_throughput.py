"""Inference throughput: the released one-image-at-a-time loop against infer.py's batched path.

  python -m bench.infer_throughput                   # EfficientNet-B4 expert at 512 px
  python -m bench.infer_throughput --out infer.json  # also write the JSON to a file
  python -m bench.infer_throughput --quick           # tiny model at 128 px: a smoke test

Prints one JSON object. The photographs are JPEGs made in a temporary folder from the
photographs that scikit-image and matplotlib ship (nothing is downloaded), at 512 to 1024 px,
the competition's sizes. The model is a real expert architecture with random weights.

What is measured, every contender on the same photographs:
- `naive`: the released inference reproduced: one image at a time, decoded with PIL,
  normalised at full size, then resized, forward at batch 1 in NCHW fp32, softmax.
- `infer_path`: `infer.Scorer.score` at infer.py's defaults for the device.
- `loader_*` (the sweep): `core.train.prediction.predict_loader` over a fresh loader, as Scorer.score
  runs it, for batch size x network x decode workers.
- `pure_forward_*`: the network alone on decoded, resized, normalised tensors already on the
  device, for batch size x network.
- `pure_forward_eager`: the PyTorch network as built, at infer's batch size in NCHW: what
  `models.scoring.prepare_network` gains.

The networks are the expert as `models.scoring.prepare_network` readies it: `onnx` (exported to ONNX
Runtime; CPU only), `channels_last` (PyTorch, BatchNorm folded, weights in channels_last) and
`nchw` (the same folded network in NCHW). The naive loop uses the expert as the released code
did. The expert's random weights are saved once, and the ONNX export is made and timed once,
in a process of its own (`onnx_export` in the output); the measuring processes load that export
from its cache, as a second `python infer.py` run does.

The machine may be shared and noisy, so all contenders run in one process, in rounds of
alternating order (forward, then reversed); each run records how much CPU time other
processes took meanwhile, runs they disturbed are set aside and redone in extra rounds, and
the headline figures come from the undisturbed runs (see `setup.timing_method` in the
output). Peak memory is measured separately, one configuration per fresh process (see
`setup.memory_method`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import timm
import torch
from PIL import Image

import infer
from core.checkpoint import load_weights, save_weights
from core.data.datasets import ImageDataset, make_loader
from core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from core.device import autocast, pick_device
from core.imaging import decode_image
from core.infer.ensemble import Ensemble
from core.train.prediction import fake_probability, predict_loader
from models import build_model
from models.onnx_export import OnnxNetwork
from models.scoring import prepare_network
from models.zoo import TrainedModel

SPEEDUP_TARGET = {"cpu": 1.5, "cuda": 10.0}
END_TO_END_TARGET = 0.85
PHOTO_SIDES = (512, 768, 1024)
JPEG_QUALITY = 95
DEFAULT_IMAGES = {"cpu": 8, "cuda": 256}
NETWORKS = {"cpu": ("onnx", "channels_last", "nchw"), "cuda": ("channels_last", "nchw")}
PRELOAD = [
    "torch",
    "timm",
    "albumentations",
    "cv2",
    "PIL.Image",
    "onnxruntime",
    "infer",
    "models",
    "core.train.prediction",
]

MEMORY_METHOD = (
    "Each sweep configuration runs in its own process, forked from a multiprocessing forkserver "
    "that has only imported the libraries (no model, no tensors, no torch threads started). "
    "peak_rss_mb is that process's getrusage(RUSAGE_SELF).ru_maxrss: libraries, model, "
    "activations and batches, as a fresh `python infer.py` would hold them. "
    "model_rss_mb is the same counter right after the model was built and moved to the device. "
    "For the onnx network the export is already cached, so the peak is that of scoring; the "
    "export's own peak is onnx_export.peak_rss_mb. "
    "workers_peak_rss_mb is getrusage(RUSAGE_CHILDREN).ru_maxrss: the largest decode worker, "
    "read after the loader joined it; a worker is a fork and shares most pages with its parent, "
    "so the two are not to be added. On CUDA, cuda_peak_mb is torch.cuda.max_memory_allocated."
)
TIMING_METHOD = (
    "Wall clock (time.perf_counter) around scoring the image list, after a warm-up on one batch; "
    "for infer's path and the loader sweep this includes building the loader and starting its "
    "workers, as every `python infer.py` call does. All contenders run in one process, in rounds "
    "of alternating order. During each run, other processes' share of the machine's CPU time is "
    "read from /proc/stat (machine busy time minus this process's and its workers' CPU time); "
    "a run above the threshold is disturbed. Each contender's images/s is the median of its "
    "undisturbed runs (of all runs where none was undisturbed); contenders short of undisturbed "
    "runs run again in extra rounds. Headline ratios are ratios of those medians; per-round "
    "ratios of back-to-back runs are listed beside them."
)
NAIVE_RECIPE = (
    "PIL decode -> float32 /255 -> (x - ImageNet mean) / std at full size -> cv2.resize to "
    "size x size (bilinear) -> batch of 1, NCHW, fp32 (no autocast) -> softmax, under torch.no_grad()"
)


# --------------------------------------------------------------------------- inputs


def source_photos() -> dict[str, np.ndarray]:
    """Real photographs shipped inside installed packages, as RGB uint8 arrays."""
    import matplotlib.cbook
    import skimage.data

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as img:
        hopper = np.asarray(img.convert("RGB"))
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": hopper}


def make_photos(folder: Path, count: int, sides: Sequence[int] = PHOTO_SIDES) -> list[Path]:
    """`count` JPEG files cycling through every source photograph at every longer side."""
    variants = []
    for name, array in source_photos().items():
        img = Image.fromarray(array)
        for side in sides:
            scale = side / max(img.size)
            size = (round(img.width * scale), round(img.height * scale))
            variants.append((f"{name}_{side}", img.resize(size, Image.LANCZOS)))
    paths = []
    for i in range(count):
        name, img = variants[i % len(variants)]
        path = folder / f"{i:04d}_{name}.jpg"
        img.save(path, quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def photo_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "opencv": cv2.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------- measuring


def maxrss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (Linux reports KiB)."""
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_expert(arch: str, device: torch.device, weights: str | None = None) -> torch.nn.Module:
    """The expert with random weights, or with those saved in `weights` by `export_task`."""
    model = build_model({"name": "mff_expert", "backbone": arch, "pretrained": False})
    if weights:
        model.load_state_dict(load_weights(weights), strict=True)
    return model.to(device).eval()


def input_format(network: str) -> torch.memory_format:
    return torch.channels_last if network == "channels_last" else torch.contiguous_format


def prepared(model: torch.nn.Module, network: str, size: int, device: torch.device, weights: str) -> torch.nn.Module:
    """`model` as `models.scoring.prepare_network` readies it for the named network."""
    if network == "onnx":
        net = prepare_network(model, size, device, "onnx", Path(weights))
        if not isinstance(net, OnnxNetwork):
            raise RuntimeError("the ONNX export failed or disagreed with PyTorch (see the log above)")
        return net
    net = prepare_network(model, size, device, "torch")
    return net if network == "channels_last" else net.to(memory_format=torch.contiguous_format)


def naive_scores(model: torch.nn.Module, paths: Sequence[Path], size: int, device: torch.device) -> list[float]:
    """The released competition inference: one image at a time, normalised before resizing."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    scores = []
    with torch.no_grad():
        for path in paths:
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            image = (image - mean) / std
            image = cv2.resize(image, (size, size))
            x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).unsqueeze(0).to(device)
            logits = model(x)["logits"]
            scores.append(float(torch.softmax(logits, dim=1)[0, 1].item()))
    return scores


def preprocessed(paths: Sequence[Path], size: int) -> list[torch.Tensor]:
    transform = build_transform({"image_size": size}, train=False)
    return [transform(decode_image(p), 0) for p in paths]


def make_batches(
    tensors: Sequence[torch.Tensor], batch_size: int, network: str, device: torch.device
) -> list[torch.Tensor]:
    fmt = input_format(network)
    return [
        torch.stack(list(tensors[i : i + batch_size])).to(device).contiguous(memory_format=fmt)
        for i in range(0, len(tensors), batch_size)
    ]


def covering(batches: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The leading batches that hold the first `count` images."""
    return batches[: -(-count // len(batches[0]))]


@torch.inference_mode()
def pure_forward_seconds(model: torch.nn.Module, batches: Sequence[torch.Tensor], device: torch.device) -> float:
    """The model alone (with infer's autocast and softmax) on batches already on the device."""
    sync(device)
    start = time.perf_counter()
    for x in batches:
        with autocast(device):
            fake_probability(model(x))
    sync(device)
    return time.perf_counter() - start


def loader_seconds(
    model: torch.nn.Module,
    paths: Sequence[Path],
    size: int,
    batch_size: int,
    workers: int,
    network: str,
    device: torch.device,
) -> float:
    """What Scorer.score does for one group of images: a fresh loader, then predict_loader."""
    transform = build_transform({"image_size": size}, train=False)
    start = time.perf_counter()
    loader = make_loader(ImageDataset([str(p) for p in paths], transform=transform), batch_size, workers)
    channels_last = network == "channels_last"
    probs = predict_loader([model], loader, device, channels_last=channels_last, progress=False)
    seconds = time.perf_counter() - start
    if np.isnan(probs).any():
        raise RuntimeError("predict_loader left images unscored")
    return seconds


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# --------------------------------------------------------------------------- child processes


def _child(task: Callable[[dict], dict], spec: dict, conn: Connection) -> None:
    mp.set_start_method(spec["start_method"], force=True)
    try:
        conn.send({"ok": task(spec)})
    except Exception as err:  # noqa: BLE001 - any failure goes back to the parent as text
        conn.send({"error": f"{type(err).__name__}: {err}"})
    finally:
        conn.close()


def run_isolated(ctx: mp.context.BaseContext, task: Callable[[dict], dict], spec: dict) -> dict:
    """Run `task(spec)` in a fresh process from the forkserver and return its result."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(task, spec, send))
    proc.start()
    send.close()
    try:
        reply = recv.recv()
    except EOFError:
        reply = {"error": "the process died without a result"}
    proc.join()
    if "error" in reply:
        raise RuntimeError(f"{task.__name__} {spec.get('label', '')}: {reply['error']} (exit code {proc.exitcode})")
    return reply["ok"]


def export_task(spec: dict) -> dict:
    """Save the expert's random weights for every other process; export it to ONNX once (time
    and peak memory of a first `python infer.py` run), then load it from the cache."""
    threads = set_threads(spec["threads"])
    device = pick_device(spec["device"])
    model = build_expert(spec["arch"], device)
    save_weights(model.state_dict(), spec["weights"])
    if "onnx" not in spec["networks"]:
        return {}
    timings = []
    for _ in range(2):  # the first run exports and writes the cache, the second reads it
        start = time.perf_counter()
        prepared(model, "onnx", spec["size"], device, spec["weights"])
        timings.append(round(time.perf_counter() - start, 2))
    return {
        "first_load_s": timings[0],
        "cached_load_s": timings[1],
        "peak_rss_mb": maxrss_mb(),
        "file_mb": round(Path(spec["weights"]).with_suffix(".onnx").stat().st_size / 2**20, 1),
        "torch_threads": threads,
    }


def memory_task(spec: dict) -> dict:
    """Peak memory of one configuration, alone in a fresh process, scoring one batch."""
    threads = set_threads(spec["threads"])
    device = pick_device(spec["device"])
    model = build_expert(spec["arch"], device, spec["weights"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model_rss = maxrss_mb()
    paths = [Path(p) for p in spec["paths"]]
    if spec["naive"]:
        naive_scores(model, paths, spec["size"], device)
    else:
        bs, workers, name = spec["batch_size"], spec["workers"], spec["network"]
        network = prepared(model, name, spec["size"], device, spec["weights"])
        del model  # prepare_network returns a new module: hold one network, as infer.py does
        loader_seconds(network, paths, spec["size"], bs, workers, name, device)
    result = {
        "peak_rss_mb": maxrss_mb(),
        "model_rss_mb": model_rss,
        "workers_peak_rss_mb": maxrss_mb(resource.RUSAGE_CHILDREN) if spec.get("workers") else None,
        "torch_threads": threads,
    }
    if device.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def infer_namespace(device: str) -> argparse.Namespace:
    """The namespace `infer.parse_args` gives for `python infer.py <image> --device <device>`."""
    return infer.parse_args(["image.jpg", "--device", device])


def make_scorer(model: torch.nn.Module, arch: str, size: int, device: str, weights: str) -> infer.Scorer:
    cfg = {
        "name": "mff_expert",
        "model": {"name": "mff_expert", "backbone": arch, "pretrained": False},
        "data": {"image_size": size},
    }
    ensemble = Ensemble([TrainedModel("mff_expert", Path(weights), cfg, "", model)])
    problems: list[str] = []
    return infer.Scorer(ensemble, infer_namespace(device), problems.append)


def score_quietly(scorer: infer.Scorer, paths: list[Path]) -> np.ndarray:
    """`Scorer.score` without its progress bar on stderr; a file it could not score is an error."""
    with contextlib.redirect_stderr(io.StringIO()):
        probs = scorer.score(paths)
    if np.isnan(probs).any():
        raise RuntimeError("infer.Scorer left images unscored")
    return probs


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its reaped children (loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def loader_name(bs: int, network: str, workers: int) -> str:
    return f"loader_bs{bs}_{network}_w{workers}"


def pure_name(bs: int, network: str) -> str:
    return f"pure_forward_bs{bs}_{network}"


def scorer_network(scorer: infer.Scorer) -> str:
    return "onnx" if scorer.runtime == "onnx" else "channels_last"


def throughput_task(spec: dict) -> dict:
    """Every contender in one process, in rounds of alternating order, so that each round
    compares them under the same machine load."""
    threads = set_threads(spec["threads"])
    device = pick_device(spec["device"])
    paths = [Path(p) for p in spec["paths"]]
    size, arch, weights = spec["size"], spec["arch"], spec["weights"]
    model = build_expert(arch, device, weights)
    scorer = make_scorer(copy.deepcopy(model), arch, size, spec["device"], weights)
    network = {n: prepared(copy.deepcopy(model), n, size, device, weights) for n in spec["networks"]}

    # Per-image preprocessing costs, measured serially in this process.
    costs = {}
    start = time.perf_counter()
    decoded = [decode_image(p) for p in paths]
    costs["decode_ms"] = (time.perf_counter() - start) / len(paths) * 1e3
    transform = build_transform({"image_size": size}, train=False)
    start = time.perf_counter()
    tensors = [transform(image, 0) for image in decoded]
    costs["resize_then_normalise_ms"] = (time.perf_counter() - start) / len(paths) * 1e3
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    start = time.perf_counter()
    for image in decoded:
        cv2.resize((image.astype(np.float32) / 255.0 - mean) / std, (size, size))
    costs["naive_normalise_then_resize_ms"] = (time.perf_counter() - start) / len(paths) * 1e3
    del decoded

    # The headline contenders first, so that each round measures them back to back.
    contenders: dict[str, Callable[[list[Path]], object]] = {
        "naive": lambda ps: naive_scores(model, ps, size, device),
        "infer_path": lambda ps: score_quietly(scorer, ps),
    }
    settings = [(bs, n) for bs in spec["batch_sizes"] for n in spec["networks"]]
    for bs, n in settings:
        batches = make_batches(tensors, bs, n, device)
        contenders[pure_name(bs, n)] = lambda ps, b=batches, net=network[n]: pure_forward_seconds(
            net, covering(b, len(ps)), device
        )
    eager_batches = make_batches(tensors, scorer.batch_size, "nchw", device)
    contenders["pure_forward_eager"] = lambda ps: pure_forward_seconds(model, covering(eager_batches, len(ps)), device)
    for bs, n in settings:
        for w in spec["workers"]:
            contenders[loader_name(bs, n, w)] = lambda ps, bs=bs, n=n, w=w: loader_seconds(
                network[n], ps, size, bs, w, n, device
            )

    # Warm-up: every contender once on one batch (kernel selection, oneDNN primitives, page cache).
    for name, fn in contenders.items():
        bs = scorer.batch_size if name in ("infer_path", "pure_forward_eager") else 1
        match = re.search(r"_bs(\d+)_", name)
        fn(paths[: int(match.group(1)) if match else bs])

    # Rounds in alternating order. After `rounds` rounds, a contender whose runs were mostly
    # disturbed by other processes runs again, up to `max_rounds` rounds and `max_minutes`.
    began = time.perf_counter()
    names = list(contenders)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(max(spec["rounds"], spec["max_rounds"])):
        todo = [n for n in names if r < spec["rounds"] or sum(x["clean"] for x in runs[n]) < spec["rounds"]]
        if not todo or (r >= spec["rounds"] and time.perf_counter() - began > spec["max_minutes"] * 60):
            break
        for name in todo if r % 2 == 0 else reversed(todo):
            run = measure(contenders[name], paths, device)
            run["round"] = r
            run["clean"] = run["others_cpu_share"] is None or run["others_cpu_share"] <= spec["clean_threshold"]
            runs[name].append(run)
    return {
        "torch_threads": threads,
        "runs": runs,
        "infer_setting": {
            "batch_size": scorer.batch_size,
            "network": scorer_network(scorer),
            "workers": scorer.workers,
        },
        "costs_ms_per_image": {k: round(v, 2) for k, v in costs.items()},
    }


def machine_busy_seconds() -> float | None:
    """CPU time all processes on the machine have used (Linux /proc/stat; steal counts as
    busy: another machine took the CPU); None where there is no /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def measure(fn: Callable[[list[Path]], object], paths: list[Path], device: torch.device) -> dict:
    """Wall time of `fn(paths)`, this process's CPU time, and the share of the machine's CPU
    time that other processes used meanwhile (the disturbance)."""
    busy0, own0 = machine_busy_seconds(), cpu_seconds()
    sync(device)
    start = time.perf_counter()
    fn(paths)
    sync(device)
    wall = time.perf_counter() - start
    own = cpu_seconds() - own0
    busy1 = machine_busy_seconds()
    others = None
    if busy0 is not None and busy1 is not None:
        others = round(max(0.0, busy1 - busy0 - own) / (wall * (os.cpu_count() or 1)), 3)
    return {"ips": len(paths) / wall, "cpu_ms_per_image": own / len(paths) * 1e3, "others_cpu_share": others}


# --------------------------------------------------------------------------- report


def median(values: Sequence[float]) -> float:
    return round(float(statistics.median(values)), 3)


def chosen(runs: list[dict]) -> list[dict]:
    """The undisturbed runs, or every run where none was undisturbed."""
    return [r for r in runs if r["clean"]] or runs


def contender_summary(runs: list[dict]) -> dict[str, Any]:
    use = chosen(runs)
    return {
        "ips": median([r["ips"] for r in use]),
        "undisturbed_runs": sum(r["clean"] for r in runs),
        "runs": len(runs),
        "cpu_ms_per_image": round(statistics.median([r["cpu_ms_per_image"] for r in use]), 1),
        "ips_runs": [round(r["ips"], 3) for r in runs],
        "others_cpu_share_runs": [r["others_cpu_share"] for r in runs],
    }


def ratio_per_round(num: list[dict], den: list[dict]) -> list[float]:
    """num/den in the rounds that ran both, back to back."""
    by_round = {r["round"]: r["ips"] for r in den}
    return [round(r["ips"] / by_round[r["round"]], 3) for r in num if r["round"] in by_round]


def summarise(measured: dict, device: torch.device) -> dict[str, Any]:
    runs = measured["runs"]
    table = {name: contender_summary(r) for name, r in runs.items()}
    ips = {name: s["ips"] for name, s in table.items()}
    pure_names = [n for n in ips if n.startswith("pure_forward_bs")]
    best_pure = max(pure_names, key=lambda n: ips[n])
    speedup = round(ips["infer_path"] / ips["naive"], 3)
    overlap = round(ips["infer_path"] / ips[best_pure], 3)
    target = SPEEDUP_TARGET["cuda" if device.type == "cuda" else "cpu"]
    setting = measured["infer_setting"]
    at_setting = pure_name(setting["batch_size"], setting["network"])
    headline = ("naive", "infer_path", best_pure)
    return {
        "naive_ips": ips["naive"],
        "infer_path_ips": ips["infer_path"],
        "best_pure_forward_ips": ips[best_pure],
        "best_pure_forward_setting": best_pure.removeprefix("pure_forward_"),
        "pure_forward_at_infer_setting_ips": ips[at_setting],
        "prepared_vs_eager_forward": round(ips[at_setting] / ips["pure_forward_eager"], 3),
        "speedup_vs_naive": speedup,
        "speedup_vs_naive_target": target,
        "speedup_vs_naive_target_met": bool(speedup >= target),
        "end_to_end_vs_pure_forward": overlap,
        "end_to_end_vs_pure_forward_target": END_TO_END_TARGET,
        "end_to_end_vs_pure_forward_target_met": bool(overlap >= END_TO_END_TARGET),
        "headline_from_undisturbed_runs": all(table[n]["undisturbed_runs"] > 0 for n in headline),
        "per_round_ratios": {
            "speedup_vs_naive": ratio_per_round(runs["infer_path"], runs["naive"]),
            "end_to_end_vs_pure_forward": ratio_per_round(runs["infer_path"], runs[best_pure]),
        },
        "contenders": table,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, help=f"photographs per contender per round (default: {DEFAULT_IMAGES})")
    p.add_argument("--size", type=int, help="model input side in px (default: 512; --quick: 128)")
    p.add_argument(
        "--arch", help="timm backbone of the expert (default: tf_efficientnet_b4; --quick: test_efficientnet)"
    )
    p.add_argument("--rounds", type=int, help="rounds every contender runs, order alternating (default: 2)")
    p.add_argument(
        "--max-rounds",
        type=int,
        help="rounds, at most, for a contender until it has --rounds undisturbed runs (default: 3 x --rounds; "
        "--quick: --rounds)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=30.0,
        help="no further extra round after this many minutes of measuring (default: %(default)s)",
    )
    p.add_argument(
        "--disturbed-above",
        type=float,
        default=0.1,
        help="a run is disturbed when other processes used more than this share of the machine's CPU time "
        "(default: %(default)s)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every measuring process (default: torch's)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="sweep batch sizes (default: 1 2 4 8 and infer's)")
    p.add_argument("--workers", type=int, nargs="+", help="sweep decode workers (default: 0 1 and infer's)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration peak memory processes")
    p.add_argument("--quick", action="store_true", help="tiny model at 128 px, 4 images: a smoke test")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    quick = args.quick
    args.arch = args.arch or ("test_efficientnet" if quick else "tf_efficientnet_b4")
    args.size = args.size or (128 if quick else 512)
    args.rounds = args.rounds or 2
    args.max_rounds = args.max_rounds or (args.rounds if quick else 3 * args.rounds)
    for name in ("images", "size", "rounds", "max_rounds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(b < 1 for b in args.batch_sizes or []) or any(w < 0 for w in args.workers or []):
        p.error("batch sizes must be at least 1 and worker counts at least 0")
    return args


def sweep_table(
    measured: dict, memory: dict[str, dict], batch_sizes: list[int], networks: Sequence[str], workers: list[int]
) -> list[dict]:
    table = {name: contender_summary(runs) for name, runs in measured["runs"].items()}
    rows = []
    for bs in batch_sizes:
        for n in networks:
            for w in workers:
                name = loader_name(bs, n, w)
                rows.append(
                    {
                        "batch_size": bs,
                        "network": n,
                        "workers": w,
                        "ips": table[name]["ips"],
                        "undisturbed_runs": table[name]["undisturbed_runs"],
                        "runs": table[name]["runs"],
                        "cpu_ms_per_image": table[name]["cpu_ms_per_image"],
                        "pure_forward_ips": table[pure_name(bs, n)]["ips"],
                        **memory.get(name, {}),
                    }
                )
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    device = pick_device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    defaults = infer.DEVICE_DEFAULTS[kind]
    images = args.images or (4 if args.quick else DEFAULT_IMAGES[kind])
    batch_sizes = sorted({*(args.batch_sizes or [1, 2, 4, 8]), defaults["batch_size"]})
    worker_counts = sorted(set(args.workers or [0, 1, defaults["workers"]]))
    networks = NETWORKS[kind]

    # Loader workers inside the measuring processes start the way they do under
    # `python infer.py` on this platform, not the way the measuring processes themselves do.
    start_method = mp.get_start_method()
    ctx = mp.get_context("forkserver")
    # The forkserver imports the libraries once; every measuring process is a fork of it
    # with nothing else in memory.
    ctx.set_forkserver_preload(PRELOAD)
    base = {
        "device": args.device,
        "arch": args.arch,
        "size": args.size,
        "threads": args.threads,
        "start_method": start_method,
    }

    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        # Enough files for one batch of the largest batch size in the memory runs.
        paths = make_photos(Path(tmp), max(images, max(batch_sizes)))
        image_sizes = sorted({photo_size(p) for p in paths[:images]})
        base.update(weights=str(Path(tmp) / "expert" / "model.safetensors"), networks=networks)
        onnx_export = run_isolated(ctx, export_task, {**base, "label": "export"})
        memory: dict[str, dict] = {}
        if not args.no_memory:
            memory["naive"] = run_isolated(
                ctx, memory_task, {**base, "naive": True, "paths": [str(p) for p in paths[:2]], "label": "naive"}
            )
            for bs in batch_sizes:
                for n in networks:
                    for w in worker_counts:
                        name = loader_name(bs, n, w)
                        spec = {**base, "naive": False, "batch_size": bs, "network": n, "workers": w}
                        spec.update(paths=[str(p) for p in paths[:bs]], label=name)
                        memory[name] = run_isolated(ctx, memory_task, spec)
        spec = {**base, "paths": [str(p) for p in paths[:images]], "batch_sizes": batch_sizes}
        spec.update(workers=worker_counts, rounds=args.rounds, max_rounds=args.max_rounds)
        spec.update(max_minutes=args.max_minutes, clean_threshold=args.disturbed_above)
        measured = run_isolated(ctx, throughput_task, spec)

    result: dict[str, Any] = {"benchmark": "infer_throughput"}
    result.update(summarise(measured, device))
    setting = measured["infer_setting"]
    sweep = sweep_table(measured, memory, batch_sizes, networks, worker_counts)
    best = max(sweep, key=lambda r: r["ips"])
    ranked = sorted(sweep, key=lambda r: -r["ips"])
    default_name = loader_name(setting["batch_size"], setting["network"], setting["workers"])
    default_row = next(r for r in sweep if loader_name(r["batch_size"], r["network"], r["workers"]) == default_name)
    best_name = loader_name(best["batch_size"], best["network"], best["workers"])
    per_round = ratio_per_round(measured["runs"][best_name], measured["runs"][default_name])
    result["sweep_best"] = {k: best[k] for k in ("batch_size", "network", "workers", "ips")}
    result["infer_defaults"] = {**setting, "autocast": "bf16" if kind == "cuda" else "none (fp32)"}
    result["infer_defaults_are_best"] = best is default_row
    result["infer_defaults_rank"] = ranked.index(default_row) + 1
    result["infer_defaults_vs_best"] = round(default_row["ips"] / best["ips"], 3)
    result["best_vs_defaults_per_round"] = per_round
    result["costs_ms_per_image"] = measured["costs_ms_per_image"]
    if onnx_export:
        result["onnx_export"] = onnx_export
    if "naive" in memory:
        result["naive_memory"] = memory["naive"]
    result["sweep"] = sweep
    info = machine_info(device)
    info["torch_threads"] = measured["torch_threads"]
    result["machine"] = info
    result["setup"] = {
        "arch": args.arch,
        "model": "mff_expert (random weights)",
        "input_size": args.size,
        "images_per_contender_per_round": images,
        "image_sizes_wh": [list(s) for s in image_sizes],
        "image_sources": sorted(source_photos()),
        "jpeg_quality": JPEG_QUALITY,
        "rounds": args.rounds,
        "max_rounds": args.max_rounds,
        "disturbed_above_others_cpu_share": args.disturbed_above,
        "naive_recipe": NAIVE_RECIPE,
        "memory_method": MEMORY_METHOD if memory else "skipped (--no-memory)",
        "timing_method": TIMING_METHOD,
    }
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
