"""Every test runs in a working folder of its own (tests/conftest.py): the project's files are
reachable by their relative paths, the checkout's outputs/ and data/ are not."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_config
from tests.conftest import ROOT


@pytest.mark.parametrize("turn", [1, 2])  # the second turn would see the first's writes in a shared folder
def test_a_test_sees_no_stage_outputs_and_keeps_its_writes_to_itself(turn: int) -> None:
    assert Path.cwd().resolve() != ROOT
    assert not Path("outputs").exists() and not Path("data").exists()
    Path("outputs").mkdir()
    Path("outputs/ensemble_fit.json").write_text("{}")
    assert Path("outputs").resolve() != ROOT / "outputs"


def test_relative_paths_to_the_project_files_resolve_into_the_checkout() -> None:
    assert Path("configs/data.yaml").resolve() == ROOT / "configs" / "data.yaml"
    assert Path("train.py").resolve() == ROOT / "train.py"
    cfg = load_config(["configs/data.yaml"])
    # The configured places resolve inside the working folder, not the checkout.
    assert Path(cfg["paths"]["outputs"]).resolve() == Path.cwd().resolve() / "outputs"
    assert Path(cfg["data"]["demo_dir"]).resolve().is_relative_to(Path.cwd().resolve())


def test_the_users_cache_is_a_folder_of_the_session() -> None:
    from data_prep.faces import cache_dir

    home_cache = Path.home() / ".cache"
    assert not cache_dir().resolve().is_relative_to(home_cache.resolve())
    assert not cache_dir().resolve().is_relative_to(ROOT)
