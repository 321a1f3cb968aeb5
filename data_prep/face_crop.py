"""The face crops a network takes when its recorded preprocessing says `face_crop` (`sbi_fed`,
whose config records SBI's test crop, and an imported SBI network): in validation and the
predictions train.py writes, and in infer.py.

Every face dlib finds in the image, largest first, cut as SBI's test crop
(`data_prep.blending.sbi_test_crop`: the face box widened by `margin` times its width and height
on each side, each margin times `margin_scale`) and resized to the network's input size. SBI's
own inference finds faces with RetinaFace; dlib's boxes sit differently on the face, so the
crops, and the scores, are close to the published pipeline's but not the same.

Training scores the same validation images every epoch and the same test images every fold:
with a `cache_dir`, the face boxes of an image are kept there, keyed by its pixels and the
detector's settings, so each image is searched once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from core.config import ConfigError
from core.io import write_json
from core.preprocess import FaceCrop, Preprocessing
from data_prep.blending import load_sbi_config, sbi_test_crop
from data_prep.faces import FaceAnalyzer, FaceModelError


class FaceCropper:
    """`cropper(image) -> [crop, ...]`: RGB uint8 (H, W, 3) -> one (size, size, 3) uint8 crop per face."""

    def __init__(
        self,
        crop: FaceCrop,
        size: int,
        analyzer: FaceAnalyzer | None = None,
        cache_dir: str | Path | None = None,
    ):
        if crop.kind != "sbi_test":
            raise ValueError(f"face crop {crop.kind!r}: only 'sbi_test' is known")
        self.cfg = load_sbi_config(crop_margin=crop.margin, test_margin_scale=crop.margin_scale, output_size=size)
        # Built now: a missing dlib model file stops the run before any image is read.
        self.analyzer = analyzer or FaceAnalyzer(embed=False)
        self.settings = self.analyzer.settings()
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def __getstate__(self) -> dict:
        # dlib's models do not pickle; a loader worker started by spawn loads its own.
        return {**self.__dict__, "analyzer": None}

    def boxes(self, image: np.ndarray) -> list[tuple[int, int, int, int]]:
        """The boxes of the faces in `image`, largest first (from the cache where it has them)."""
        cache = None
        if self.cache_dir is not None:
            digest = hashlib.sha1(f"{image.shape}{self.settings}".encode() + image.tobytes()).hexdigest()
            cache = self.cache_dir / digest[:2] / f"{digest}.json"
            if cache.is_file():
                return [tuple(box) for box in json.loads(cache.read_text())["boxes"]]
        if self.analyzer is None:
            self.analyzer = FaceAnalyzer(embed=False)
        found = self.analyzer.boxes(image)
        if cache is not None:
            write_json({"settings": self.settings, "boxes": [list(box) for box in found]}, cache)
        return found

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        return [sbi_test_crop(image, box, self.cfg) for box in self.boxes(image)]


def face_cropper(preprocessing: Preprocessing, cache_dir: str | Path | None = None) -> FaceCropper | None:
    """The cropper of a network whose recorded preprocessing asks for face crops, else None."""
    if preprocessing.face_crop is None:
        return None
    try:
        return FaceCropper(preprocessing.face_crop, preprocessing.size, cache_dir=cache_dir)
    except FaceModelError as err:
        raise ConfigError(f"{err}; networks that take face crops need it") from None


def member_face_cropper(cfg: dict) -> FaceCropper | None:
    """`face_cropper` of a member config: its validation and predictions are scored on the crops
    its `data.face_crop` records, as infer.py scores it; boxes cached under `prep.out`."""
    out = (cfg.get("prep") or {}).get("out")
    return face_cropper(Preprocessing.from_config(cfg), Path(out) / "face_boxes" if out else None)
