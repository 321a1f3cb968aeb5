"""infer.py under torchrun: two processes score half the inputs each and write the one CSV (and
the same stdout) that one process writes; shards of other runs are never merged, a finished one
of the same run is taken as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import infer
from core.infer.sharded import Part, shard_path
from tests.test_infer_fast import member_fold
from tests.test_infer_video import write_video


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """Two members (exported by the first test that scores), seven images of unequal sizes, a corrupt
    one and two videos with a face (one for each of two processes)."""
    tmp_path = tmp_path_factory.mktemp("sharded")
    weights = [member_fold(tmp_path / "outputs", "alpha"), member_fold(tmp_path / "outputs", "beta")]
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        pixels = rng.integers(0, 255, (40 + 3 * i, 36, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    face = skdata.astronaut()[:256, 96:352]
    for v in range(2):
        write_video(folder / f"v{v}.avi", [np.roll(face, (3 + v) * i, axis=1) for i in range(6)])
    args = [str(folder), *[a for w in weights for a in ("--weights", str(w))], "--device", "cpu", "--json"]
    args += ["--frames", "3"]
    return {"args": args, "folder": folder}


def as_rank(monkeypatch, rank: int, world: int = 2) -> None:
    for name, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world}.items():
        monkeypatch.setenv(name, str(value))


def test_two_torchrun_processes_write_what_one_process_writes(project, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    sharded = subprocess.run(  # the first run in this module: both processes make the exports
        [*torchrun, "infer.py", *project["args"], "--out", str(tmp_path / "sharded.csv")]
        + ["--per-frame", str(tmp_path / "sharded_frames.csv")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    one = subprocess.run(
        [sys.executable, "infer.py", *project["args"], "--out", str(tmp_path / "one.csv")]
        + ["--per-frame", str(tmp_path / "one_frames.csv")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 1, one.stderr[-3000:]  # the corrupt image is reported, the rest scored
    assert sharded.returncode != 0, sharded.stderr[-3000:]  # torchrun: a process ended with status 1
    assert "broken.jpg" in sharded.stderr
    assert (tmp_path / "sharded.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert len((tmp_path / "one.csv").read_text().splitlines()) == 10  # header, seven images, two videos
    frames = (tmp_path / "one_frames.csv").read_text().splitlines()
    assert {Path(row.split(",")[0]).name for row in frames[1:]} == {"v0.avi", "v1.avi"}  # one from each process
    assert (tmp_path / "sharded_frames.csv").read_text().splitlines() == frames
    lines = [json.loads(line) for line in sharded.stdout.splitlines() if line.startswith("{")]
    assert lines == [json.loads(line) for line in one.stdout.splitlines()]
    names = ["broken.jpg", *[f"img{i}.png" for i in range(7)], "v0.avi", "v1.avi"]
    assert [Path(x["path"]).name for x in lines] == names
    assert lines[0]["skipped"] and lines[0]["probability"] is None
    assert not list(tmp_path.glob("*.rank*"))  # shards removed once merged


def test_shards_of_another_run_are_ignored_and_a_finished_one_is_taken(project, tmp_path, monkeypatch, capsys):
    out = tmp_path / "preds.csv"
    args = [*project["args"], "--out", str(out)]
    assert infer.main(args) == 1
    expected = out.read_bytes()
    out.unlink()
    stale = {"key": "another run", "part": vars(Part([1, 3], [[0.5, 0.5, 0.5]] * 2, [None] * 2, [], []))}
    shard_path(out, 0, 2).write_text(json.dumps(stale))
    as_rank(monkeypatch, 1)
    assert infer.main(args) == 0  # process 1 writes its shard and leaves the merge to process 0
    assert not out.exists() and shard_path(out, 1, 2).is_file()
    as_rank(monkeypatch, 0)
    assert infer.main(args) == 1
    assert out.read_bytes() == expected
    assert not shard_path(out, 0, 2).exists() and not shard_path(out, 1, 2).exists()

    # a run that died before its merge: the shard it left is taken, not scored again
    as_rank(monkeypatch, 1)
    assert infer.main(args) == 0
    finished = json.loads(shard_path(out, 1, 2).read_text())
    finished["part"]["rows"] = [[0.25] * 3 for _ in finished["part"]["rows"]]  # marks it as taken
    shard_path(out, 1, 2).write_text(json.dumps(finished))
    capsys.readouterr()
    assert infer.main(args) == 0
    assert "already scored" in capsys.readouterr().err
    as_rank(monkeypatch, 0)
    assert infer.main(args) == 1
    odd = [line.split(",")[1] for line in out.read_text().splitlines()[1:]][0::2]
    assert odd and all(float(p) == 0.25 for p in odd)


def test_torchrun_needs_out(project, monkeypatch, capsys):
    as_rank(monkeypatch, 0)
    assert infer.main(project["args"]) == 2
    assert "--out" in capsys.readouterr().err


def test_process_0_names_the_ranks_it_still_waits_for(tmp_path, monkeypatch, capfd):
    import threading

    from core.infer import sharded
    from core.ranks import DistInfo

    monkeypatch.setattr(sharded, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(sharded, "WAIT_NOTE_SECONDS", 0.05)
    out, info = tmp_path / "preds.csv", DistInfo(rank=0, world=3)
    for rank in (0, 2):
        sharded.write_part(out, DistInfo(rank=rank, world=3), "key", Part([rank], [[0.5]], [None], [], []))
    late = threading.Timer(
        0.3, lambda: sharded.write_part(out, DistInfo(1, 3), "key", Part([1], [[0.1]], [None], [], []))
    )
    late.start()
    parts = sharded.gather_parts(out, info, "key")
    late.join()
    assert [p.indices for p in parts] == [[0], [1], [2]]
    notes = [line for line in capfd.readouterr().err.splitlines() if "waited" in line]
    assert notes and all("rank(s) 1 (preds.csv.rank1-of-3.json)" in line for line in notes)
