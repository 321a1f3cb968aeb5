"""Label CSVs: every malformation gets one clear error naming the file and the reason."""

from __future__ import annotations

import pytest
from PIL import Image

from core.data.labels import LabelError, read_labels


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 20)).save(tmp_path / "img" / name)
    return tmp_path


def write(root, text):
    path = root / "labels.csv"
    path.write_text(text)
    return path


def test_valid_file(root):
    df = read_labels(write(root, "img_name,target\na.png,0\nb.png,1\n"), root / "img")
    assert df["target"].tolist() == [0, 1] and df["path"].str.endswith("a.png").iloc[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("name,label\na.png,0\n", r"missing column\(s\) \['img_name', 'target'\]"),
        ("img_name,target\na.png,0\na.png,1\n", "duplicate img_name a.png"),
        ("img_name,target\na.png,0\nb.png,2\n", "target must be 0 or 1, not for b.png"),
        ("img_name,target\na.png,0\nb.png,fake\n", "target must be 0 or 1"),
        ("img_name,target\na.png,0\nc.png,1\n", r"1 image\(s\) not found .*c.png"),
        ("img_name,target\n../secret.png,0\n", "escapes the image root"),
        ("img_name,target\n/etc/passwd,0\n", "escapes the image root"),
        ("img_name,target\n", "no rows"),
        ("", "not a readable CSV"),
    ],
)
def test_malformed(root, text, message):
    with pytest.raises(LabelError, match=rf"labels.csv: .*{message}"):
        read_labels(write(root, text), root / "img")


def test_test_list_needs_no_target(root):
    df = read_labels(write(root, "img_name\na.png\n"), root / "img", require_target=False)
    assert list(df["img_name"]) == ["a.png"]


def test_missing_label_file(root):
    with pytest.raises(LabelError, match="none.csv: no such label file"):
        read_labels(root / "none.csv", root)


@pytest.mark.parametrize(
    "text",
    [
        "img_name, target\na.png, 0\nb.png, 1\n",  # spaces after the commas
        "img_name\ttarget\na.png\t0\nb.png\t1\n",  # tab-separated, as spreadsheets export text
        "img_name;target\na.png;0\nb.png;1\n",  # semicolons, as European-locale spreadsheets write CSV
        "\ufeffimg_name,target\r\na.png,0\r\nb.png,1\r\n",  # byte-order mark and CRLF line ends
        " img_name , target \n a.png , 0 \n b.png , 1 \n",  # padded names and values
    ],
)
def test_spreadsheet_exports_are_read(root, text):
    df = read_labels(write(root, text), root / "img")
    assert df["img_name"].tolist() == ["a.png", "b.png"]
    assert df["target"].tolist() == [0, 1]
    assert df["path"].map(lambda p: p.endswith(("a.png", "b.png"))).all()


def test_unknown_separator_says_what_was_found_and_expected(root):
    with pytest.raises(
        LabelError, match=r"labels.csv: missing column.*header 'img_name\|target'.*expected img_name,target"
    ):
        read_labels(write(root, "img_name|target\na.png|0\n"), root / "img")


def test_latin1_file_is_refused_with_its_encoding(root):
    (root / "img" / "caf\u00e9.png").write_bytes((root / "img" / "a.png").read_bytes())
    path = root / "labels.csv"
    path.write_bytes("img_name,target\ncaf\u00e9.png,0\n".encode("latin-1"))
    with pytest.raises(LabelError, match=r"labels.csv: not UTF-8 \(byte 0xe9 at offset 19\); it looks Latin-1") as err:
        read_labels(path, root / "img")
    assert "\n" not in str(err.value)
    path.write_bytes("img_name,target\ncaf\u00e9.png,0\n".encode())  # the same file saved as UTF-8 reads
    assert read_labels(path, root / "img")["img_name"].tolist() == ["caf\u00e9.png"]
