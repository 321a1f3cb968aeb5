"""Benches cannot rot: each bench's command runs end to end at its smallest settings and prints the
JSON keys behind the figures its documentation quotes. Benches that train members or read trained
folds have their smoke tests in tests/test_bench_<name>.py; the last test here checks that every
bench has one somewhere."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# module -> (smallest arguments, key paths that must be in its JSON: "a.b" is result["a"]["b"],
# "a[].b" every item of the list result["a"]).
CASES: dict[str, tuple[list[str], list[str]]] = {
    "blend_scale": (
        ["--rows", "300", "--members", "3", "--folds", "3", "--test-rows", "10", "--methods", "weights"],
        ["runs[].rows", "runs[].method", "runs[].chosen", "runs[].wall_s", "runs[].cpu_s", "runs[].peak_rss_mb"]
        + ["runs[].blend_nested_auc", "runs[].blend_fold_auc_mean", "machine.cpus"],
    ),
    "kmeans_scaling": (
        ["--sizes", "200", "400", "--dim", "16", "--k", "2", "--iters", "2", "--direct-max", "400"],
        ["rows[].n", "rows[].seconds_per_iter", "rows[].init_seconds", "rows[].peak_rss_mb", "rows[].data_mb"]
        + ["rows[].torch_kmeans_direct_seconds_per_iter", "growth[].per_iter_ratio_per_10x", "linear_enough"],
    ),
    "prep_sbi": (
        ["--n", "2"],
        ["sbi.astronaut_380.pairs.per_s", "sbi.face_crop_380.pairs.per_s", "sbi.sample_from_photo_512.per_s"]
        + ["sladd.forge_alpha.per_s", "sladd.forge_poisson.per_s", "sladd.region_mask.per_s"],
    ),
    "prep_throughput": (
        ["--n", "1", "--faces-n", "1", "--sbi-n", "1"],
        ["faces.astronaut_crop512_512x512_up0.per_cpu_s", "faces.astronaut_crop512_512x512_up1.per_cpu_s"]
        + [
            f"edits.{kind}_{size}_with_jpeg.per_cpu_s"
            for kind in ("faceswap", "swap", "background", "degrade")
            for size in (256, 512)
        ]  # fmt: skip
        + ["decode.jpeg_512.per_cpu_s", "sbi.sbi.astronaut_380.pairs.per_s", "feed_b4.target_img_per_s"]
        + ["feed_b4.faces_512_crop_up0", "feed_b4.decode_jpeg_512", "feed_b4.sbi_380_pairs_plus_decode"],
    ),
    "sbi_faithfulness": (
        ["--n", "2", "--sizes", "380"],
        ["reference.edge_width_px", "reference.eroded_share"]
        + [f"sizes.380.all.{frame}.{m}.p50" for frame in ("input", "output") for m in ("edge_width_px", "coverage")]
        + ["sizes.380.all.input.eroded_share.p50"],
    ),
    "sbi_loader_throughput": (
        ["--n", "2", "--size", "64"],
        [
            f"modes.{m}.{k}"
            for m in ("off", "dlib_cached", "dlib_online", "torch")
            for k in ("cpu_ms_per_pair", "images_per_cpu_s")
        ]  # fmt: skip
        + ["cores_to_feed.off.adamw_step", "cores_to_feed.off.sam_step", "dlib_descriptor_cpu_ms"],
    ),
    "sta_memory": (
        ["--configs", "configs/members/sta_demo.yaml", "--frames", "2", "--device", "cpu"],
        ["members[].config", "members[].trainable_params", "members[].total_params", "members[].train_peak_mb"]
        + ["members[].infer_peak_mb"],
    ),
    "scale": (  # the split and the blend; train and infer stages: tests/test_bench_scale.py
        ["--n", "60", "120", "--stages", "split", "blend"],
        ["rows[].n", "rows[].split.seconds", "rows[].split.cpu_seconds", "rows[].split.peak_rss_mb"]
        + ["rows[].blend.cpu_seconds", "growth[].cpu_per_4x", "growth[].time_per_4x", "growth[].memory_per_4x"]
        + ["growth[].meets_target", "all_meet_target", "machine.load_average"],
    ),
    "serve_load": (
        ["--requests", "2", "--clients", "1"],
        ["levels[].clients", "levels[].requests_per_s", "levels[].p50_ms", "levels[].p95_ms"]
        + ["levels[].mean_batch", "machine.shared"],
    ),
    "infer_throughput": (
        ["--quick", "--rounds", "1", "--device", "cpu", "--batch-sizes", "1", "--workers", "0", "--no-memory"]
        + ["--images", "2"],
        ["naive_ips", "infer_path_ips", "best_pure_forward_ips", "speedup_vs_naive", "end_to_end_vs_pure_forward"]
        + ["sweep[].ips", "sweep[].batch_size", "sweep[].network", "infer_defaults.batch_size"]
        + ["onnx_export.first_load_s", "onnx_export.cached_load_s", "machine.cpu_model"],
    ),
}


def lookup(obj: object, path: str) -> list[object]:
    """The values at `path` ("a.b", "a[].b": every item of list a), or an AssertionError naming the step."""
    values = [obj]
    for part in path.split("."):
        many = part.endswith("[]")
        key = part.removesuffix("[]")
        nxt = []
        for v in values:
            assert isinstance(v, dict) and key in v, f"no {key!r} on the way to {path}"
            nxt += list(v[key]) if many else [v[key]]
        assert nxt, f"{path}: empty"
        values = nxt
    return values


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_bench_prints_the_keys_its_figures_quote(name: str, tmp_path: Path) -> None:
    argv, keys = CASES[name]
    out = tmp_path / f"{name}.json"
    if name in ("sbi_faithfulness", "sta_memory", "serve_load", "infer_throughput"):
        argv = [*argv, "--out", str(out)]
    # A process of its own: some benches pin every library to one thread before they import them.
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, _ = json.JSONDecoder().raw_decode(proc.stdout.lstrip())
    if out.exists():
        assert json.loads(out.read_text()) == result
    for key in keys:
        for value in lookup(result, key):
            assert value is not None, key


def bench_modules() -> list[str]:
    """Every bench's dotted name under bench/ (modules with a main), studies included."""
    found = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        if re.search(r"^def main\(", path.read_text(), re.MULTILINE):
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def test_every_bench_has_a_smoke_test() -> None:
    """A bench is smoke-tested here (CASES) or by a test that imports it or runs it."""
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name)
    missing = []
    for dotted in bench_modules():
        module, name = dotted.rsplit(".", 1)
        imported = re.search(rf"from {re.escape(module)} import [^\n]*\b{name}\b", tests)
        run = f'"-m", "{dotted}"' in tests or f"{dotted} import" in tests
        if name not in CASES and not imported and not run:
            missing.append(dotted)
    assert not missing, f"benches without a smoke test: {missing}"
    assert len(bench_modules()) > len(CASES)  # the finder sees the benches tested elsewhere too
