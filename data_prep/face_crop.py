"""The face crops a checkpoint takes when its meta.json says `face_crop` (an imported SBI network).

Every face dlib finds in the image, largest first, cut as SBI's test crop
(`data_prep.blending.sbi_test_crop`: the face box widened by `margin` times its width and height
on each side, each margin times `margin_scale`) and resized to the network's input size. SBI's
own inference finds faces with RetinaFace; dlib's boxes sit differently on the face, so the
crops, and the scores, are close to the published pipeline's but not the same.
"""

from __future__ import annotations

import numpy as np

from core.preprocess import FaceCrop
from data_prep.blending import load_sbi_config, sbi_test_crop
from data_prep.faces import FaceAnalyzer


class FaceCropper:
    """`cropper(image) -> [crop, ...]`: RGB uint8 (H, W, 3) -> one (size, size, 3) uint8 crop per face."""

    def __init__(self, crop: FaceCrop, size: int, analyzer: FaceAnalyzer | None = None):
        if crop.kind != "sbi_test":
            raise ValueError(f"face crop {crop.kind!r}: only 'sbi_test' is known")
        self.cfg = load_sbi_config(crop_margin=crop.margin, test_margin_scale=crop.margin_scale, output_size=size)
        # Built now: a missing dlib model file stops the run before any image is read.
        self.analyzer = analyzer or FaceAnalyzer(embed=False)

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        return [sbi_test_crop(image, face.box, self.cfg) for face in self.analyzer.detect(image)]
