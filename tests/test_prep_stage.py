"""The data stage end to end on a small demo sample: manifest, provenance, resume, workers, messages."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from core.config import load_config
from core.data.folds import split_groups
from core.data.labels import read_labels
from core.data.sources import resolve_data
from core.imaging import decode_image
from data_prep import __main__ as cli
from data_prep import diffusion as sd
from data_prep import stage, stage_edits, stage_faces, stage_jobs, stage_manifest, stage_originals, steps
from data_prep.demo import build_demo

EDIT_COUNTS = {"background": 3, "faceswap": 2, "swap": 4, "degrade": 3}
SD_COUNTS = {"inpaint": 2, "img2img": 2, "txt2img": 4}  # txt2img: two batches of two


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo") / "d", seed=0, n_real=6, n_test=2, size=128, progress=False)


def make_cfg(demo_dir: Path, out: Path, model: str | None = None, **prep: object) -> dict:
    """The project's data config pointed at the small demo, with small counts."""
    cfg = load_config(["configs/data.yaml"])
    cfg["data"].update(train_labels=None, manifest=None, demo_dir=str(demo_dir))
    # Two donor pools: six reals in sixteen pools would leave most swaps without a donor.
    settings = {"out": str(out), "workers": 1, "progress": False, "counts": dict(EDIT_COUNTS), "donor_pools": 2}
    cfg["prep"].update({**settings, **prep})
    cfg["diffusion"].update(
        model=model,
        inpaint_model=None,
        device="cpu",
        local_files_only=True,
        counts=dict(SD_COUNTS),
        steps=2,
        batch_size=2,
        max_side=64,
        txt2img_size=64,
        crop_txt2img=False,
    )
    return cfg


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def tiny_cpu() -> Iterator[None]:
    from tests.test_diffusion import fast_tiny_cpu

    yield from fast_tiny_cpu()


@pytest.fixture(scope="module")
def prepared(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory, tiny_cpu: None
) -> tuple[Path, dict, pd.DataFrame]:
    from tests.test_diffusion import build_tiny_sd

    root = tmp_path_factory.mktemp("prep")
    model = build_tiny_sd(root / "tiny_sd")
    out = root / "prepared"
    summary = stage.prepare(make_cfg(demo_dir, out, model=str(model)))
    prov = pd.read_csv(out / "provenance.csv", dtype=str, keep_default_na=False)
    # The model folder rides along in the summary's config record, for the rerun test.
    summary["model"] = str(model)
    return out, summary, prov


def test_outputs_are_valid_label_files(prepared: tuple) -> None:
    out, summary, prov = prepared
    labels = read_labels(out / "train_labels.csv", out)  # every listed image exists under out
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(manifest.columns) == stage_manifest.MANIFEST_COLUMNS
    assert labels.img_name.tolist() == manifest.img_name.tolist() == prov.img_name.tolist()
    n_reencoded = int((manifest.method == stage_edits.REENCODE).sum())
    assert n_reencoded > 0
    assert summary["images"] == len(manifest) == 12 + sum(EDIT_COUNTS.values()) + sum(SD_COUNTS.values()) + n_reencoded
    assert (out / "DONE").is_file()
    data = yaml.safe_load((out / "data.yaml").read_text())["data"]
    assert Path(data["train_root"]) == out and Path(data["manifest"]) == out / "manifest.csv"


def test_originals_are_hard_links_with_their_provenance(prepared: tuple, demo_dir: Path) -> None:
    out, summary, prov = prepared
    src = pd.read_csv(demo_dir / "manifest.csv", dtype=str, keep_default_na=False)
    orig = prov[prov.img_name.str.startswith("orig/")]
    assert len(orig) == len(src) == 12
    assert summary["originals_linked"]["linked"] == 12
    for row, s in zip(orig.itertuples(), src.itertuples(), strict=True):
        assert row.img_name == f"orig/{s.img_name}" and row.parent == f"orig/{s.parent}"
        assert (row.target, row.method, row.region) == (s.target, s.method, s.region)
        assert os.path.samefile(out / row.img_name, demo_dir / "train" / s.img_name)


def test_every_kind_has_rows_with_the_right_label_region_and_parent(prepared: tuple) -> None:
    out, summary, prov = prepared
    by_name = prov.set_index("img_name")
    reals = set(prov[(prov.method == "real")].img_name)
    new = prov[~prov.img_name.str.startswith("orig/")]
    counts = new.method.value_counts().to_dict()
    n_reencoded = counts.pop(stage_edits.REENCODE)
    assert counts == {f"edit:{k}": n for k, n in EDIT_COUNTS.items()} | {f"sd:{k}": n for k, n in SD_COUNTS.items()}
    assert n_reencoded > 0
    for row in new.itertuples():
        assert (out / row.img_name).is_file()
        assert row.seed.isdigit()
        kind = row.method.split(":")[1]
        if row.method == "sd:txt2img":
            assert (row.target, row.region, row.parent, row.source, row.sources) == (
                "1",
                "synthesis",
                row.img_name,
                "",
                "",
            )
            continue
        source = by_name.loc[row.source]
        # The parent of anything derived is the real the source came from.
        assert row.parent == source.parent and row.parent in reals
        # sources: every image that gave pixels, the edited one first, then a donor from the set.
        donor_in_set = [row.donor] if row.donor in by_name.index else []
        assert row.sources.split(";") == [row.source, *donor_in_set]
        if donor_in_set:
            assert by_name.loc[row.donor].donor_pool == row.donor_pool == source.donor_pool
        if kind == "reencode":
            # A copy of an original of the same label written again: same pixels up to JPEG.
            assert row.source.startswith("orig/") and row.target == source.target
            assert (row.region, row.donor) == (source.region, "")
            again = decode_image(out / row.img_name).astype(int)
            assert np.abs(again - decode_image(out / row.source).astype(int)).mean() < 6  # q75-100 at 128 px
            continue
        if kind in ("background", "degrade"):
            assert row.target == source.target  # label-keeping
            want = stage_jobs.join_region(source.region, "background") if kind == "background" else source.region
            assert row.region == want
        else:
            assert row.target == "1" and source.target == "0"
            if kind == "faceswap":
                assert row.region == "face"
            elif kind in ("swap", "inpaint"):
                assert row.region in ("eyes", "eyebrows", "nose", "mouth")
            else:
                assert row.region == "global"
        if kind in ("faceswap", "swap"):
            donor = by_name.loc[row.donor]
            assert donor.target == "0" and donor.parent != row.parent
    # Label-keeping edits touched reals and fakes alike.
    for kind in ("edit:background", "edit:degrade"):
        assert set(new[new.method == kind].target) == {"0", "1"}, kind
    # Swaps take the face of the other photograph (another identity): recorded in the details.
    details = [json.loads(d) for d in new[new.method == "sd:img2img"].details]
    assert all(0.15 <= d["strength"] <= 0.35 and d["steps"] == 2 for d in details)


def test_summary(prepared: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    out, summary, prov = prepared
    assert summary["diffusion"] == "ran" and summary["failures"] == []
    table = pd.DataFrame(summary["counts"])
    new = table[table.origin == "new"].set_index("method")
    assert new.loc["edit:faceswap", "fake"] == 2 and new.loc["edit:faceswap", "real"] == 0
    assert int(table[["real", "fake"]].to_numpy().sum()) == summary["images"]
    stage_manifest.print_summary(summary, table)
    printed = capsys.readouterr().out
    assert "edit:background" in printed and "no face:" in printed and "failures: 0" in printed
    # Re-encoded shares per label, counted from the provenance: everything after the originals.
    new = prov.iloc[12:]
    enc = summary["reencoded"]
    for label, name in (("0", "real"), ("1", "fake")):
        assert enc[name]["reencoded"] == (new.target == label).sum()
        assert enc[name]["images"] == (prov.target == label).sum()
    apart = 100 * abs(enc["real"]["share"] - enc["fake"]["share"])
    assert enc["points_apart"] == round(apart, 1) and enc["within_limit"] == (apart <= 5)
    # Six reals cannot level this set: each is re-encoded once, and the summary flags the gap.
    assert (new.method == stage_edits.REENCODE).sum() == 6 and not enc["within_limit"]
    assert f"{enc['points_apart']} points apart (MORE THAN 5: re-encoding predicts the label)" in printed
    groups = summary["groups"]
    assert groups["n"] == len(set(split_groups(prov))) and groups["donor_pools"] == 2
    assert f"the largest holds {groups['largest']} images" in printed


def test_second_run_redoes_nothing(prepared: tuple, demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, summary, prov = prepared
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("models loaded although every image exists")

    monkeypatch.setattr(sd, "load_models", no_loading)
    again = stage.prepare(make_cfg(demo_dir, out, model=summary["model"]))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == before
    assert pd.read_csv(out / "provenance.csv", dtype=str, keep_default_na=False).equals(prov)
    assert again["images"] == summary["images"]


def test_workers_resume_and_seed(
    prepared: tuple, demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def edits(root: Path) -> dict[str, str]:
        # How many copies edit:reencode makes depends on the diffusion fakes, which differ below.
        kinds = tuple(f"edit/{k}/" for k in EDIT_COUNTS)
        return {k: v for k, v in _digests(root).items() if k.startswith(kinds)}

    want = edits(prepared[0])
    assert len(want) == sum(EDIT_COUNTS.values())

    # Two worker processes give the same bytes as one, and no model gives one clear line.
    out = tmp_path / "p2"
    summary = stage.prepare(make_cfg(demo_dir, out, workers=2))
    assert edits(out) == want
    printed = capsys.readouterr().out
    assert printed.count("no model configured") == 1
    assert summary["diffusion"].startswith("skipped (no model configured")
    assert not (out / "sd").exists()

    # An interrupted step (outputs missing, no done marker, a torn log line) resumes to the same bytes.
    victims = sorted((out / "edit" / "swap").glob("*.jpg"))[:2]
    for v in victims:
        v.unlink()
    (out / "steps" / "edit_swap.done").unlink()
    with open(out / "steps" / "edit_swap.jsonl", "a") as fh:
        fh.write('{"name": "edit/swap/0000')
    stage.prepare(make_cfg(demo_dir, out))
    assert edits(out) == want
    logged = steps.Steps(out).results("edit:swap")
    for v in victims:
        res = logged[str(v.relative_to(out))]
        assert res.ok and res.details["blend"] in ("alpha", "poisson")

    # Another seed rebuilds the edits, with no stale files left.
    stage.prepare(make_cfg(demo_dir, out, seed=1))
    other = edits(out)
    assert set(other) == set(want) and all(other[k] != want[k] for k in want)


def test_unloadable_model_is_one_line(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = make_cfg(demo_dir, tmp_path / "p", model=str(tmp_path / "missing_model"), link="copy")
    cfg["prep"]["counts"] = dict.fromkeys(EDIT_COUNTS, 0)
    summary = stage.prepare(cfg)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "cannot load" in ln]
    assert len(lines) == 1 and "missing_model" in lines[0]
    assert summary["new"] == 0
    # link: copy gives independent files with the same bytes.
    assert summary["originals_linked"]["copied"] == 12
    first = tmp_path / "p" / "orig" / sorted(p.name for p in (demo_dir / "train").iterdir())[0]
    assert not os.path.samefile(first, demo_dir / "train" / first.name)
    assert first.read_bytes() == (demo_dir / "train" / first.name).read_bytes()


def test_read_originals_without_manifest(tmp_path: Path, demo_dir: Path) -> None:
    labels = pd.read_csv(demo_dir / "train_labels.csv")
    labels.to_csv(tmp_path / "labels.csv", index=False)
    paths = resolve_data(
        {
            "data": {
                "train_labels": str(tmp_path / "labels.csv"),
                "train_root": str(demo_dir / "train"),
                "test_list": str(demo_dir / "test_list.csv"),
                "test_root": str(demo_dir / "test"),
            }
        }
    )
    table = stage_originals.read_originals(paths)
    assert set(table[table.target == 1].method) == {"original"}
    assert set(table[table.target == 0].method) == {"real"}
    assert (table.parent == table.img_name).all() and (table.region == "").all()
    assert table.img_name.str.startswith("orig/").all()


def test_refuses_a_foreign_folder(tmp_path: Path, demo_dir: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(stage.PrepError, match="refusing"):
        stage.prepare(make_cfg(demo_dir, tmp_path))
    assert (tmp_path / "precious.txt").read_text() == "keep"


def test_cli_reports_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", "configs/data.yaml", "prep.counts.swap=-1"]) == 2
    assert "counts.swap" in capsys.readouterr().err
    # Overrides may come before options too.
    assert cli.main(["prep.swap_regions=[ears]", "--no-progress", "--config", "configs/data.yaml"]) == 2
    assert "unknown regions" in capsys.readouterr().err


def test_job_seeds_are_independent() -> None:
    assert stage_jobs.job_seed(0, "edit:swap", 3) == stage_jobs.job_seed(0, "edit:swap", 3)
    seeds = {stage_jobs.job_seed(0, m, k) for m in ("edit:swap", "edit:faceswap") for k in range(50)}
    assert len(seeds) == 100
    assert stage_jobs.join_region("mouth", "background") == "mouth+background"
    assert stage_jobs.join_region("", "background") == "background"
    assert stage_jobs.join_region("mouth+background", "background") == "mouth+background"


def test_donors_come_from_the_targets_pool_and_groups_stay_inside_pools(prepared: tuple) -> None:
    out, summary, prov = prepared
    pool = dict(zip(prov.img_name, prov.donor_pool, strict=True))
    assert set(prov[prov.img_name.str.startswith("orig/")].donor_pool) == {"0", "1"}
    swaps = prov[prov.img_name.str.startswith("edit/") & prov.method.isin(["edit:faceswap", "edit:swap"])]
    assert len(swaps) == 6 and (swaps.donor.map(pool) == swaps.donor_pool).all()
    # So every group of images sharing pixels lies inside one pool (txt2img: no pool, its own group).
    groups = split_groups(prov)
    pooled = prov.donor_pool != ""
    assert (prov[pooled].groupby(groups[pooled.to_numpy()])["donor_pool"].nunique() == 1).all()


def test_donor_pools_partition_groups_evenly_and_by_seed() -> None:
    rows = []
    for i in range(40):
        rows += [(f"r{i}", 0, f"r{i}", ""), (f"f{i}", 1, f"r{i}", f"r{(i + 1) % 40}" if i % 10 == 0 else "")]
    table = pd.DataFrame(rows, columns=["img_name", "target", "parent", "sources"])
    pools = stage_faces.donor_pools(table, 8, seed=0)
    groups = split_groups(table)
    assert (pd.Series(pools).groupby(groups).nunique() == 1).all()  # an input group never spans pools
    reals = np.bincount(pools[table.target.to_numpy() == 0], minlength=8)
    assert reals.sum() == 40 and reals.max() - reals.min() <= 2  # the joined groups hold two reals
    assert (stage_faces.donor_pools(table, 8, seed=0) == pools).all()
    assert (stage_faces.donor_pools(table, 8, seed=1) != pools).any()
    # With identity, one person's photographs share a pool too.
    table["identity"] = np.where(table.target == 0, [f"p{i % 12}" for i in range(len(table))], "")
    by_person = stage_faces.donor_pools(table, 8, seed=0, identity=True)
    assert (pd.Series(by_person).groupby(split_groups(table, identity=True)).nunique() == 1).all()
    assert (
        pd.Series(by_person[table.target == 0]).groupby(table.identity[table.target == 0].to_numpy()).nunique() == 1
    ).all()
    assert (
        pd.Series(pools[table.target == 0]).groupby(table.identity[table.target == 0].to_numpy()).nunique() > 1
    ).any()


def test_reencode_count_levels_the_shares() -> None:
    # 100 real and 100 fake originals; the stage wrote 20 reals and 60 fakes: fakes 60/160.
    label, n = stage_edits.reencode_count({0: 100, 1: 100}, {0: 20, 1: 60})
    assert label == 0 and (20 + n) / (120 + n) == pytest.approx(60 / 160, abs=0.005)
    assert stage_edits.reencode_count({0: 100, 1: 100}, {0: 60, 1: 20})[0] == 1  # the other way round
    assert stage_edits.reencode_count({0: 10, 1: 0}, {0: 0, 1: 30}) == (0, 10)  # every fake is new: all reals, once
    assert stage_edits.reencode_count({0: 50, 1: 50}, {0: 5, 1: 5}) == (1, 0)  # already level
    assert stage_edits.reencode_count({0: 0, 1: 50}, {1: 5}) == (0, 0)  # no reals at all


def test_face_embeddings_of_the_real_originals(prepared: tuple) -> None:
    out, summary, prov = prepared
    with np.load(out / "face_embeddings.npz", allow_pickle=False) as stored:
        names, embeddings = stored["names"].tolist(), stored["embeddings"]
    reals = prov[(prov.method == "real")].img_name.tolist()
    assert sorted(names) == sorted(reals) and embeddings.shape == (6, 128)
    # The demo's two photographs: views of one are close, of the other far (dlib's 0.6).
    dist = np.linalg.norm(embeddings[:, None] - embeddings[None], axis=2)
    assert (dist < 0.6).sum() < dist.size


def test_input_sources_are_kept_and_optional(tmp_path: Path, demo_dir: Path) -> None:
    manifest = pd.read_csv(demo_dir / "manifest.csv", dtype=str, keep_default_na=False)
    fake = manifest[manifest.target == "1"].img_name.iloc[0]
    donor = manifest[manifest.target == "0"].img_name.iloc[-1]
    manifest["sources"] = np.where(manifest.img_name == fake, f"{donor};elsewhere.jpg", "")
    manifest.to_csv(tmp_path / "with.csv", index=False)
    manifest.drop(columns="sources").to_csv(tmp_path / "without.csv", index=False)
    data = {
        "train_labels": str(demo_dir / "train_labels.csv"),
        "train_root": str(demo_dir / "train"),
        "test_list": str(demo_dir / "test_list.csv"),
        "test_root": str(demo_dir / "test"),
    }
    table = stage_originals.read_originals(resolve_data({"data": {**data, "manifest": str(tmp_path / "with.csv")}}))
    by_name = table.set_index("img_name")
    assert by_name.loc[f"orig/{fake}", "sources"] == f"orig/{donor};orig/elsewhere.jpg"
    assert (table.sources != "").sum() == 1
    table = stage_originals.read_originals(resolve_data({"data": {**data, "manifest": str(tmp_path / "without.csv")}}))
    assert (table.sources == "").all() and (table.parent != table.img_name).sum() == 6


def test_reencoded_copies_level_the_shares_when_there_are_enough_originals(demo_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(demo_dir, tmp_path / "p", counts={"background": 2, "degrade": 2, "faceswap": 2, "swap": 2})
    summary = stage.prepare(cfg)
    prov = pd.read_csv(tmp_path / "p" / "provenance.csv", dtype=str, keep_default_na=False)
    copies = prov[prov.method == stage_edits.REENCODE]
    assert 0 < len(copies) < 6 and set(copies.target) == {"0"}
    assert copies.source.is_unique  # one copy per original at most
    enc = summary["reencoded"]
    assert enc["within_limit"] and enc["points_apart"] <= 5, enc
    # Without the copies the stage would have written a far larger share of the fakes.
    real_without = (enc["real"]["reencoded"] - len(copies)) / (enc["real"]["images"] - len(copies))
    assert enc["fake"]["share"] - real_without > 0.2


# ---- several processes (torchrun's gloo group, tests/prep_workers.py) --------------------------


def _outputs(root: Path) -> dict[str, str]:
    """Every image and label file the stage writes, by content (not the logs, timings or paths)."""
    names = [*_digests(root), "manifest.csv", "provenance.csv", "train_labels.csv", "face_embeddings.npz"]
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


def _two_processes(tmp_path: Path, cfg: dict, die_after: int | None = None) -> None:
    import socket

    import torch.multiprocessing as mp

    from tests import prep_workers

    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(prep_workers.run_stage, args=(port, str(config), die_after), nprocs=prep_workers.WORLD, join=True)


def test_two_processes_share_the_work_and_write_what_one_writes(prepared: tuple, demo_dir: Path, tmp_path: Path):
    """`torchrun --nproc_per_node 2 -m data_prep`: faces, edits and diffusion batches shared by
    rank, each logged by the process that made it, the manifest written once: the same bytes."""
    one, summary, _ = prepared
    out = tmp_path / "two"
    _two_processes(tmp_path, make_cfg(demo_dir, out, model=summary["model"]))
    assert _outputs(out) == _outputs(one)
    for step in ("edit_swap", "edit_background", "sd_txt2img"):
        logs = [(out / "steps" / f"{step}.rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
        assert all(logs) and not set(logs[0]) & set(logs[1]), step  # each made some, none made twice
    assert not (out / "steps" / "edit_swap.jsonl").exists()
    summary_two = json.loads((out / "summary.json").read_text())
    assert summary_two["images"] == summary["images"] and summary_two["diffusion"] == "ran"


@pytest.mark.slow  # about 100 s on 2 shared cores: two processes start, one dies, then a rerun
def test_a_process_that_dies_leaves_its_images_for_the_rerun(
    prepared: tuple, demo_dir: Path, tmp_path: Path, tiny_cpu: None
):
    """Process 1 dies in edit:swap after one of its two images: what both processes finished
    stays and is not made again by a rerun with one process, which ends with the bytes of an
    uninterrupted run."""
    import torch.multiprocessing as mp

    one, summary, _ = prepared
    out = tmp_path / "killed"
    cfg = make_cfg(demo_dir, out, model=summary["model"])
    with pytest.raises(mp.ProcessExitedException):
        _two_processes(tmp_path, cfg, die_after=1)
    assert not (out / "DONE").exists() and not (out / "steps" / "edit_swap.done").exists()
    by_rank_1 = [
        json.loads(line)["name"] for line in (out / "steps" / "edit_swap.rank1.jsonl").read_text().splitlines()
    ]
    assert len(by_rank_1) == 1
    left = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    assert {out / n for n in by_rank_1} <= set(left)

    stage.prepare(cfg)
    assert _outputs(out) == _outputs(one)
    assert {p: p.stat().st_mtime_ns for p in left} == left  # kept, not made again
