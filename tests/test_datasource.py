import numpy as np
import pandas as pd
import pytest
import yaml

from core.data.sources import PreparedDataMissing, read_train_table, resolve_data


def cfg(tmp_path, use_prepared):
    return {
        "data": {"train_labels": None, "demo_dir": str(tmp_path / "demo"), "use_prepared": use_prepared},
        "prep": {"out": str(tmp_path / "prepared")},
    }


def test_demo_without_prepared(tmp_path):
    paths = resolve_data(cfg(tmp_path, False))
    assert paths.is_demo and paths.train_labels == tmp_path / "demo" / "train_labels.csv"


def test_prepared_data_is_used_once_the_stage_finished(tmp_path):
    c = cfg(tmp_path, True)
    with pytest.raises(
        PreparedDataMissing, match="prepared: the data stage has not finished; run `python -m data_prep`"
    ):
        resolve_data(c)
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "DONE").write_text("{}")
    paths = resolve_data(c)
    assert paths.train_labels == tmp_path / "prepared" / "train_labels.csv"
    assert paths.manifest == tmp_path / "prepared" / "manifest.csv"
    assert paths.test_list == tmp_path / "demo" / "test_list.csv"  # the test list is never prepared
    assert resolve_data(c, prepared=False).train_labels == tmp_path / "demo" / "train_labels.csv"
    assert paths.face_embeddings == tmp_path / "prepared" / "face_embeddings.npz"
    assert resolve_data(c, prepared=False).face_embeddings is None


def test_train_table_exposes_sources_and_works_without_them(tiny_project):
    paths = resolve_data(yaml.safe_load(tiny_project["data_cfg"].read_text()))
    table = read_train_table(paths)  # the fixture's manifest has no sources column
    assert (table["sources"] == "").all() and len(table) == 24
    manifest = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
    manifest["sources"] = np.where(manifest["img_name"] == "fake_000.png", "real_001.png;real_002.png", "")
    manifest.to_csv(paths.manifest, index=False)
    table = read_train_table(paths).set_index("img_name")
    assert table.loc["fake_000.png", "sources"] == "real_001.png;real_002.png"
    assert table.loc["fake_001.png", "sources"] == "" and table.loc["fake_000.png", "parent"] == "real_000.png"
