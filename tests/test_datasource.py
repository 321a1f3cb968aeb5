import pytest

from core.datasource import PreparedDataMissing, resolve_data


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
