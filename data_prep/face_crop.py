"""The face crops a network takes when its recorded preprocessing says `face_crop` (`sbi_fed`,
whose config records SBI's test crop, and an imported SBI network): in validation and the
predictions train.py writes, and in infer.py.

Every face dlib finds in the image, largest first, cut as SBI's test crop
(`data_prep.blending.sbi_test_crop`: the face box widened by `margin` times its width and height
on each side, each margin times `margin_scale`) and resized to the network's input size. SBI's
own inference finds faces with RetinaFace; dlib's boxes sit differently on the face, so the
crops, and the scores, are close to the published pipeline's but not the same.
"""

from __future__ import annotations

import numpy as np

from core.config import ConfigError
from core.preprocess import FaceCrop, Preprocessing
from data_prep.blending import load_sbi_config, sbi_test_crop
from data_prep.faces import FaceAnalyzer, FaceModelError


class FaceCropper:
    """`cropper(image) -> [crop, ...]`: RGB uint8 (H, W, 3) -> one (size, size, 3) uint8 crop per face."""

    def __init__(self, crop: FaceCrop, size: int, analyzer: FaceAnalyzer | None = None):
        if crop.kind != "sbi_test":
            raise ValueError(f"face crop {crop.kind!r}: only 'sbi_test' is known")
        self.cfg = load_sbi_config(crop_margin=crop.margin, test_margin_scale=crop.margin_scale, output_size=size)
        # Built now: a missing dlib model file stops the run before any image is read.
        self.analyzer = analyzer or FaceAnalyzer(embed=False)

    def __getstate__(self) -> dict:
        # dlib's models do not pickle; a loader worker started by spawn loads its own.
        return {**self.__dict__, "analyzer": None}

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        if self.analyzer is None:
            self.analyzer = FaceAnalyzer(embed=False)
        return [sbi_test_crop(image, face.box, self.cfg) for face in self.analyzer.detect(image)]


def face_cropper(preprocessing: Preprocessing) -> FaceCropper | None:
    """The cropper of a network whose recorded preprocessing asks for face crops, else None."""
    if preprocessing.face_crop is None:
        return None
    try:
        return FaceCropper(preprocessing.face_crop, preprocessing.size)
    except FaceModelError as err:
        raise ConfigError(f"{err}; networks that take face crops need it") from None


def member_face_cropper(cfg: dict) -> FaceCropper | None:
    """`face_cropper` of a member config: its validation and predictions are scored on the crops
    its `data.face_crop` records, as infer.py scores it."""
    return face_cropper(Preprocessing.from_config(cfg))
