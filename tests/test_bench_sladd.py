"""Smoke test of bench.sladd_throughput: every rate is measured and the worker counts follow from them."""

from __future__ import annotations

import pytest

from bench import sladd_throughput

pytest.importorskip("dlib")


def test_throughput_reports_every_rate_and_the_cores_they_imply() -> None:
    result = sladd_throughput.run(n=4, cpu_step=False, batch_items=4, overlap_rounds=1)
    assert result["size"] == 256 and result["cpu_step"] is None
    assert set(result["forge_pairs_per_cpu_s"]) == {"uniform", "alpha", "poisson", "copy"}
    loader = result["loader_items_per_cpu_s"]
    for rate in (loader["target"], loader["other"], *result["forge_pairs_per_cpu_s"].values()):
        assert rate["per_cpu_s"] > 0 and rate["cpu_ms_each"] == pytest.approx(1000 / rate["per_cpu_s"], rel=0.05)
    assert loader["target"]["cpu_ms_each"] > loader["other"]["cpu_ms_each"]  # a target decodes its source too
    assert [p["threads"] for p in result["prepare"]] == [1, 2]
    overlap = result["overlap"]
    assert overlap["steps_each"] == 3 and overlap["targets_per_batch"] == 2  # a run's first step is not timed
    assert overlap["sequential_s_per_step"] > 0 and overlap["overlapped_s_per_step"] > 0
    assert overlap["speedup"] == pytest.approx(
        overlap["sequential_s_per_step"] / overlap["overlapped_s_per_step"], rel=0.01
    )
    # Half the images are targets, each three images' work for the GPU: 2400 / 2 training images a second.
    assert result["target_share"] == 0.5 and result["gpu_training_images_per_s"] == 1200
    workers = result["workers"]
    loader_cpu = 0.5 / loader["target"]["per_cpu_s"] + 0.5 / loader["other"]["per_cpu_s"]
    assert workers["loader_workers"] == pytest.approx(1200 * loader_cpu, abs=0.06)
    uniform = result["forge_pairs_per_cpu_s"]["uniform"]["per_cpu_s"]
    assert workers["forge_threads"] == pytest.approx(600 / uniform, abs=0.06)


@pytest.mark.slow  # six short trainings: about a minute and a half
def test_ablation_trains_every_setting_per_seed_and_plots_the_synthesizer(tmp_path, capsys) -> None:
    import json

    import yaml

    from bench import sladd_ablation
    from tests.sladd_project import face_project

    p = face_project(tmp_path)
    work, out, png = tmp_path / "work", tmp_path / "ablation.json", tmp_path / "synth.png"
    argv = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--seeds", "0", "1"]
    argv += ["--folds", "0", "--keep", str(work), "--out", str(out), "--plot", str(png)]
    assert sladd_ablation.main(argv) == 0
    result = json.loads(out.read_text())
    assert [(r["setting"], r["seed"]) for r in result["rows"]] == [
        ("random", 0),
        ("random", 1),
        ("learned", 0),
        ("learned", 1),
        ("image_reward", 0),
        ("image_reward", 1),
    ]
    assert all(r["n_oof"] > 0 and 0 <= r["oof_auc"] <= 1 for r in result["rows"])
    resolved = yaml.safe_load((work / "random-seed1" / "sladd_demo" / "fold0" / "config.yaml").read_text())
    assert resolved["synthesizer"]["mode"] == "random" and resolved["train"]["seed"] == 1
    resolved = yaml.safe_load((work / "image_reward-seed0" / "sladd_demo" / "fold0" / "config.yaml").read_text())
    assert resolved["synthesizer"]["reward"] == "image" and resolved["synthesizer"]["baseline_momentum"] == 0.9
    trajectory = result["synthesizer_by_epoch"]
    # the member config trains 2 epochs
    assert [(row["setting"], row["epoch"]) for row in trajectory] == [
        ("image_reward", 1),
        ("image_reward", 2),
        ("learned", 1),
        ("learned", 2),
    ]
    blends = sum(trajectory[0][f"synth_p_{b}"] for b in ("alpha", "poisson", "copy", "none"))
    assert blends == pytest.approx(1.0) and png.stat().st_size > 10_000
    assert "| learned | 2 |" in capsys.readouterr().out
    assert not p["outputs"].exists()
