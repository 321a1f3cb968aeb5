"""Every kind of bad or unusual image gets RGB pixels or a clear error naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core import imaging
from core.imaging import ImageDecodeError, decode_image


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "mode, suffix",
    [("L", ".png"), ("RGBA", ".png"), ("P", ".png"), ("I;16", ".png"), ("CMYK", ".jpg"), ("LA", ".png")],
)
def test_unusual_modes_become_rgb_uint8(tmp_path, photo, mode, suffix):
    img = photo.convert("RGBA" if mode == "LA" else mode) if mode != "I;16" else photo.convert("L")
    if mode == "I;16":
        arr = (np.asarray(img).astype(np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(arr)
    elif mode == "LA":
        img = img.convert("LA")
    out = decode_image(save(img, tmp_path / f"x{suffix}"))
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)


def test_16bit_keeps_full_range(tmp_path):
    arr = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (32, 1))
    out = decode_image(save(Image.fromarray(arr), tmp_path / "deep.png"))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255


def test_rgba_transparent_is_composited_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)  # fully transparent black
    out = decode_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert (out == 255).all()


def test_exif_orientation_is_applied(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(save(photo, tmp_path / "rot.jpg", exif=exif))
    assert out.shape == (60, 40, 3)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image at all" * 10, "not an image"),
    ],
)
def test_bad_bytes_raise_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=rf"{name}: .*{reason}"):
        decode_image(path)


def test_truncated_jpeg(tmp_path, photo):
    path = save(photo.resize((200, 200)), tmp_path / "full.jpg", quality=95)
    data = path.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        decode_image(cut)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="nope.png: no such file"):
        decode_image(tmp_path / "nope.png")


def test_tiny_image(tmp_path):
    path = save(Image.new("RGB", (8, 8)), tmp_path / "tiny.png")
    with pytest.raises(ImageDecodeError, match="tiny.png: 8x8 is smaller than"):
        decode_image(path)


def test_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (300, 300)), tmp_path / "huge.png")
    monkeypatch.setattr(imaging, "MAX_PIXELS", 300 * 299)
    with pytest.raises(ImageDecodeError, match="huge.png: 300x300 pixels exceeds the limit"):
        decode_image(path)


def test_video_frames_are_spread_over_the_whole_video(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for i in range(50):
        writer.write(np.full((32, 32, 3), i * 5, dtype=np.uint8))  # brightness encodes the index
    writer.release()
    frames = imaging.sample_video_frames(path, 5)
    levels = [int(round(f.mean() / 5)) for f in frames]
    assert len(frames) == 5 and levels[0] == 0 and levels[-1] >= 48  # first and last, not the first five
    indexed = imaging.indexed_video_frames(path, 5)
    assert [i for i, _ in indexed] == [0, 12, 24, 37, 49]  # np.linspace(0, 49, 5), rounded
    assert all(abs(int(round(f.mean() / 5)) - i) <= 1 for i, f in indexed)  # each index names its frame


def test_an_upload_in_memory_decodes_as_its_file_does(tmp_path, photo):
    path = save(photo.convert("RGBA"), tmp_path / "x.png")
    assert np.array_equal(imaging.decode_image_bytes(path.read_bytes(), "upload.png"), decode_image(path))
    with pytest.raises(ImageDecodeError, match=r"^upload\.jpg: not an image or unsupported format$"):
        imaging.decode_image_bytes(b"not a picture", "upload.jpg")
    with pytest.raises(ImageDecodeError, match=r"^upload\.png: empty file$"):
        imaging.decode_image_bytes(b"", "upload.png")
