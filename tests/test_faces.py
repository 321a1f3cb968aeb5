"""dlib faces on real bundled photographs: detection, landmarks, embeddings, cache, alignment."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from skimage import data

from data_prep import faces as F
from data_prep.faces import (
    FLIP_68,
    REGIONS,
    Face,
    FaceAnalyzer,
    FaceModelError,
    align_crop,
    align_landmarks,
    alignment_matrix,
    estimate_similarity,
    eye_centers,
    flip_landmarks,
    transform_points,
)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="module")
def grace() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as fh, Image.open(fh) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer()


@pytest.fixture(scope="module")
def astro_face(analyzer: FaceAnalyzer, astronaut: np.ndarray) -> Face:
    face = analyzer.largest(astronaut)
    assert face is not None
    return face


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path)
    return path


def test_regions_partition_the_68_points() -> None:
    indices = sorted(i for idx in REGIONS.values() for i in idx)
    assert indices == list(range(68))
    assert REGIONS["right_eye"] == tuple(range(36, 42))
    assert REGIONS["mouth"][0] == 48 and REGIONS["mouth"][-1] == 67


def test_flip_permutation_is_an_involution() -> None:
    assert sorted(FLIP_68) == list(range(68))
    assert all(FLIP_68[FLIP_68[i]] == i for i in range(68))
    assert FLIP_68[36] == 45 and FLIP_68[48] == 54 and FLIP_68[30] == 30


def test_default_models_dir_has_the_files() -> None:
    folder = F.default_models_dir()
    for name in (F.LANDMARKS_FILE, F.EMBEDDING_FILE, F.CNN_DETECTOR_FILE):
        assert (folder / name).is_file(), name


def test_missing_models_dir_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FaceModelError, match=F.LANDMARKS_FILE):
        FaceAnalyzer(models_dir=tmp_path)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="detector"):
        FaceAnalyzer(detector="mtcnn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pick"):
        FaceAnalyzer(pick="first")  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["astronaut", "grace"])
def test_face_found_with_plausible_geometry(which: str, analyzer: FaceAnalyzer, request: pytest.FixtureRequest) -> None:
    rgb = request.getfixturevalue(which)
    face = analyzer.largest(rgb)
    assert face is not None
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = face.box
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
    eyes = face.landmarks[36:48]
    assert np.all((eyes[:, 0] >= x0) & (eyes[:, 0] < x1) & (eyes[:, 1] >= y0) & (eyes[:, 1] < y1))
    # The subject's right eye is on the image's left in an unmirrored photograph.
    right, left = face.eye_centers()
    assert right[0] < left[0]
    assert 0.25 <= face.inter_ocular() / face.width <= 0.6
    # Eyes above nose tip above mouth.
    assert right[1] < face.landmarks[33, 1] < face.landmarks[62, 1]
    assert face.embedding is not None and face.embedding.shape == (128,) and face.embedding.dtype == np.float32
    assert face.score > 0


def test_faces_sorted_largest_first(analyzer: FaceAnalyzer, astronaut: np.ndarray) -> None:
    # Two copies of the photograph side by side, one at half size: two faces of different size.
    small = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    canvas = np.full((512, 768, 3), 128, np.uint8)
    canvas[:, :512] = astronaut
    canvas[:256, 512:] = small
    faces = [f for f in analyzer.detect(canvas) if f.score > 0.5]
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].box[2] <= 512 and faces[1].box[0] >= 512


def test_embeddings_separate_people(analyzer: FaceAnalyzer, astronaut: np.ndarray, grace: np.ndarray) -> None:
    a = analyzer.largest(astronaut)
    a_flip = analyzer.largest(astronaut[:, ::-1])
    g = analyzer.largest(grace)
    assert a is not None and a_flip is not None and g is not None
    same = np.linalg.norm(a.embedding - a_flip.embedding)
    other = np.linalg.norm(a.embedding - g.embedding)
    # dlib's usual same-person threshold is 0.6.
    assert same < 0.6 < other


def test_flip_landmarks_matches_detection_on_mirror(
    analyzer: FaceAnalyzer, astronaut: np.ndarray, astro_face: Face
) -> None:
    mirrored = analyzer.largest(astronaut[:, ::-1])
    assert mirrored is not None
    expected = flip_landmarks(astro_face.landmarks, astronaut.shape[1])
    err = np.linalg.norm(mirrored.landmarks - expected, axis=1)
    assert err.mean() < 2.0
    # Without the re-indexing, the eyes would be swapped and far off.
    naive = astro_face.landmarks.copy()
    naive[:, 0] = astronaut.shape[1] - 1 - naive[:, 0]
    assert np.linalg.norm(mirrored.landmarks[36:48] - naive[36:48], axis=1).mean() > 20


@pytest.mark.parametrize("name", ["grey", "coffee"])
def test_no_face_gives_none(analyzer: FaceAnalyzer, name: str) -> None:
    rgb = np.full((256, 256, 3), 128, np.uint8) if name == "grey" else data.coffee()
    assert analyzer.largest(rgb) is None
    assert analyzer.primary(rgb) is None
    assert analyzer.detect(rgb) == []


def test_grayscale_input_accepted(analyzer: FaceAnalyzer, astronaut: np.ndarray) -> None:
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    face = analyzer.largest(grey)
    assert face is not None and face.inter_ocular() > 20


def test_cnn_detector_finds_face(grace: np.ndarray) -> None:
    small = cv2.resize(grace, (256, 300), interpolation=cv2.INTER_AREA)
    face = FaceAnalyzer(detector="cnn", upsample=0, embed=False).largest(small)
    assert face is not None and face.embedding is None
    assert 0.25 <= face.inter_ocular() / face.width <= 0.6


def test_pick_score_prefers_the_confident_face(astronaut: np.ndarray) -> None:
    analyzer = FaceAnalyzer(embed=False, pick="score")
    faces = analyzer.detect(astronaut)
    best = analyzer.primary(astronaut)
    assert best is not None and best.score == max(f.score for f in faces)
    assert 0.25 <= best.inter_ocular() / best.width <= 0.6
    # min_score drops weak detections.
    strict = FaceAnalyzer(embed=False, min_score=best.score + 1.0)
    assert strict.detect(astronaut) == []


def test_analyze_files_caches_faces_no_faces_and_reports_corrupt(
    tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    paths = [
        _write_png(img_dir / "astro.png", astronaut),
        _write_png(img_dir / "grey.png", np.full((128, 128, 3), 128, np.uint8)),
        img_dir / "broken.jpg",
    ]
    paths[2].write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    names = ["sub/astro.png", "grey.png", "broken.jpg"]
    cache = tmp_path / "cache"
    analyzer = FaceAnalyzer(embed=True)

    first = analyzer.analyze_files(paths, names, cache, progress=False)
    assert first.computed == 2 and first.cached == 0
    assert isinstance(first.faces["sub/astro.png"], Face)
    assert first.faces["grey.png"] is None
    assert "broken.jpg" not in first.faces
    assert list(first.errors) == ["broken.jpg"] and "broken.jpg" in first.errors["broken.jpg"]
    assert (cache / "sub" / "astro.png.npz").is_file()
    with np.load(cache / "grey.png.npz", allow_pickle=False) as stored:
        assert not bool(stored["found"])
    assert not (cache / "broken.jpg.npz").exists()

    def no_detect(self: FaceAnalyzer, rgb: np.ndarray) -> list[Face]:
        raise AssertionError("detection ran despite a valid cache entry")

    monkeypatch.setattr(FaceAnalyzer, "detect", no_detect)
    second = analyzer.analyze_files(paths, names, cache, progress=False)
    assert second.cached == 2 and second.computed == 0
    assert second.faces["grey.png"] is None
    got, want = second.faces["sub/astro.png"], first.faces["sub/astro.png"]
    assert got.box == want.box and got.score == pytest.approx(want.score)
    np.testing.assert_array_equal(got.landmarks, want.landmarks)
    np.testing.assert_array_equal(got.embedding, want.embedding)
    monkeypatch.undo()

    # A changed image (new size and mtime) is recomputed, not served from the cache.
    _write_png(paths[1], np.full((128, 160, 3), 90, np.uint8))
    st = paths[1].stat()
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = analyzer.analyze_files(paths, names, cache, progress=False)
    assert third.computed == 1 and third.cached == 1

    # Other analyzer settings do not reuse this cache either.
    other = FaceAnalyzer(embed=False).analyze_files(paths[:1], names[:1], cache, progress=False)
    assert other.computed == 1 and other.faces["sub/astro.png"].embedding is None


def test_corrupt_cache_file_is_recomputed(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = _write_png(tmp_path / "a.png", astronaut)
    analyzer = FaceAnalyzer(embed=False)
    analyzer.analyze_files([path], ["a.png"], tmp_path / "cache", progress=False)
    (tmp_path / "cache" / "a.png.npz").write_bytes(b"garbage")
    again = analyzer.analyze_files([path], ["a.png"], tmp_path / "cache", progress=False)
    assert again.computed == 1 and isinstance(again.faces["a.png"], Face)


def test_cache_name_may_not_escape(tmp_path: Path, astronaut: np.ndarray) -> None:
    path = _write_png(tmp_path / "a.png", astronaut)
    res = FaceAnalyzer(embed=False).analyze_files([path], ["../escape.png"], tmp_path / "cache", progress=False)
    assert "../escape.png" in res.errors and not (tmp_path / "escape.png.npz").exists()


def test_estimate_similarity_recovers_a_known_transform() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (68, 2))
    angle, scale, shift = np.deg2rad(17.0), 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    mat = estimate_similarity(src, dst)
    np.testing.assert_allclose(mat[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(mat[:, 2], shift, atol=1e-7)
    np.testing.assert_allclose(transform_points(src, mat), dst, atol=1e-3)


def test_align_crop_is_upright_and_centred(analyzer: FaceAnalyzer, astronaut: np.ndarray) -> None:
    # Rotate the photograph 20 degrees so alignment has something to undo.
    h, w = astronaut.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), 20.0, 1.0)
    tilted = cv2.warpAffine(astronaut, rot, (w, h), borderMode=cv2.BORDER_REFLECT_101)
    face = analyzer.largest(tilted)
    assert face is not None
    right, left = face.eye_centers()
    assert abs(np.degrees(np.arctan2(left[1] - right[1], left[0] - right[0]))) > 10

    size = 224
    crop = align_crop(tilted, face, size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    pts = align_landmarks(face, size)
    right, left = eye_centers(pts)
    assert abs(left[1] - right[1]) < 1e-3
    assert abs((right[0] + left[0]) / 2 - (size - 1) / 2) < 0.15 * size
    # Landmarks fill 1 / (1 + 2 * margin) of the crop along their longer side.
    extent = np.ptp(pts, axis=0).max()
    assert extent == pytest.approx(size / 1.6, rel=1e-3)

    # The mapped landmarks agree with a fresh detection on the crop.
    again = analyzer.largest(crop)
    assert again is not None
    assert np.linalg.norm(again.landmarks - pts, axis=1).mean() < 4.0


def test_alignment_matrix_accepts_landmarks_array(astro_face: Face) -> None:
    np.testing.assert_allclose(alignment_matrix(astro_face.landmarks, 128, 0.2), alignment_matrix(astro_face, 128, 0.2))
    with pytest.raises(ValueError):
        alignment_matrix(np.zeros((5, 2)), 128)


def test_analyzer_pickles_without_models(analyzer: FaceAnalyzer, astronaut: np.ndarray) -> None:
    import pickle

    # Loader workers receive the analyzer by pickling; the dlib models stay per process.
    analyzer.largest(astronaut)
    clone = pickle.loads(pickle.dumps(analyzer))
    assert clone.settings() == analyzer.settings()


@pytest.fixture
def canvas(astronaut: np.ndarray, grace: np.ndarray) -> np.ndarray:
    """Two people, the smaller face the more confident detection: the pick rules disagree."""
    small = cv2.resize(grace, (230, 270), interpolation=cv2.INTER_AREA)
    out = np.full((512, 800, 3), 128, np.uint8)
    out[:, :512] = astronaut
    out[:270, 540:770] = small
    return out


@pytest.mark.parametrize("pick", ["largest", "score"])
def test_boxes_are_detect_boxes_without_the_landmark_model(
    canvas: np.ndarray, pick: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    analyzer = FaceAnalyzer(embed=False, pick=pick)
    faces = analyzer.detect(canvas)
    assert len(faces) >= 2
    primary = analyzer.primary(canvas)
    loaded: list[str] = []
    real_load = F._load_model
    monkeypatch.setattr(F, "_MODELS", {})  # nothing loaded or searched yet, as in a fresh infer.py
    monkeypatch.setattr(F, "_RECENT", F.OrderedDict())

    def load(kind: str, path: Path):
        loaded.append(kind)
        return real_load(kind, path)

    monkeypatch.setattr(F, "_load_model", load)
    assert analyzer.boxes(canvas) == [f.box for f in faces]
    assert analyzer.primary_box(canvas) == primary.box
    assert loaded and "landmarks" not in loaded
    assert analyzer.boxes(np.full((64, 64, 3), 128, np.uint8)) == []
    assert analyzer.primary_box(np.full((64, 64, 3), 128, np.uint8)) is None


def test_face_detector_saved_once_then_read_back(
    tmp_path: Path, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import dlib

    built = dlib.get_frontal_face_detector()
    expected = built.run(astronaut, 1, 0.0)
    monkeypatch.setenv("FFDI_CACHE_DIR", str(tmp_path / "cache"))
    first = F._frontal_detector()
    saved = list((tmp_path / "cache").iterdir())
    assert [p.name for p in saved] == [f"dlib-{dlib.__version__}-frontal_face_detector.svm"]

    def refuse():
        raise AssertionError("built again although a saved copy exists")

    monkeypatch.setattr(dlib, "get_frontal_face_detector", refuse)
    again = F._frontal_detector()
    for detector in (first, again):
        rects, scores, _ = detector.run(astronaut, 1, 0.0)
        assert [(r.left(), r.top(), r.right(), r.bottom()) for r in rects] == [
            (r.left(), r.top(), r.right(), r.bottom()) for r in expected[0]
        ]
        assert scores == pytest.approx(expected[1])
    monkeypatch.undo()

    # A damaged copy is replaced; an unwritable cache only costs the saving.
    saved[0].write_bytes(b"not a detector")
    monkeypatch.setenv("FFDI_CACHE_DIR", str(tmp_path / "cache"))
    assert len(F._frontal_detector().run(astronaut, 1, 0.0)[0]) == len(expected[0])
    assert "unreadable saved face detector" in capfd.readouterr().err
    assert dlib.fhog_object_detector(str(saved[0])) is not None
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FFDI_CACHE_DIR", str(tmp_path / "file" / "cache"))
    assert len(F._frontal_detector().run(astronaut, 1, 0.0)[0]) == len(expected[0])


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FFDI_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert F.cache_dir() == tmp_path / "xdg" / "ffdi"
    monkeypatch.setenv("FFDI_CACHE_DIR", str(tmp_path / "own"))
    assert F.cache_dir() == tmp_path / "own"


def test_a_frame_searched_recently_is_not_searched_again(canvas: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    searched = []
    real = FaceAnalyzer._detect_rects
    monkeypatch.setattr(F, "_RECENT", F.OrderedDict())
    monkeypatch.setattr(FaceAnalyzer, "_detect_rects", lambda self, img: searched.append(img.shape) or real(self, img))
    aligned = FaceAnalyzer(embed=False).detect(canvas)  # infer.py's aligned crops of a video frame
    assert FaceAnalyzer(embed=False).boxes(canvas.copy()) == [f.box for f in aligned]  # the SBI crop's search
    assert len(searched) == 1
    FaceAnalyzer(embed=False, upsample=0).boxes(canvas)  # other settings: searched
    FaceAnalyzer(embed=False).boxes(canvas[:, ::-1])  # other pixels: searched
    assert len(searched) == 3
    for k in range(F.RECENT_SEARCHES):  # the memory is bounded: the oldest frame is searched again
        FaceAnalyzer(embed=False).boxes(np.full((32, 32, 3), k, np.uint8))
    assert len(F._RECENT) == F.RECENT_SEARCHES
    FaceAnalyzer(embed=False).boxes(canvas)
    assert len(searched) == 4 + F.RECENT_SEARCHES
