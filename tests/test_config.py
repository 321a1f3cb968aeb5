import pytest

from core.config import ConfigError, load_config


def test_merge_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {lr: 0.1, epochs: 2}\nname: a\n")
    (tmp_path / "b.yaml").write_text("train: {epochs: 5}\n")
    cfg = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"], ["train.lr=3e-4", "+extra.k=[1, 2]"])
    assert cfg["train"] == {"lr": 3e-4, "epochs": 5} and cfg["extra"]["k"] == [1, 2]


@pytest.mark.parametrize("override, message", [("train.lrr=1", "no key 'train.lrr'"), ("train", "key=value")])
def test_bad_override(tmp_path, override, message):
    (tmp_path / "a.yaml").write_text("train: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=message):
        load_config([tmp_path / "a.yaml"], [override])


def test_exponent_floats_are_floats(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 1e-4\nwd: -2E3\nname: 1e\nv: 1.5\nn: 7\n")
    cfg = load_config([tmp_path / "a.yaml"])
    assert cfg == {"lr": 1e-4, "wd": -2e3, "name": "1e", "v": 1.5, "n": 7}


def test_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="a.yaml: invalid YAML"):
        load_config([tmp_path / "a.yaml"])
