"""Quality perturbations of a training image: SJEDD's training augmentation (METHODS.md section 4).

With probability p (published: 0.3) one of five perturbations, drawn uniformly, at one of two
strengths, drawn 50/50, is applied to the decoded image before the network's resize and
normalisation. The five and their published strengths:

| kind | what | strength 1 / 2 |
|---|---|---|
| `blocks` | grey (128) 8x8 squares at random places; (shorter side // 256) x n squares | n = 16 / 32 |
| `color_noise` | Gaussian noise on Y, Cb and Cr (values in [0, 1]) | variance 0.001 / 0.002 |
| `blur` | Gaussian blur, kernel k, sigma k / 6 | k = 7 / 9 |
| `pixelate` | down by a factor, back up (bilinear) | 2 / 3 |
| `jpeg` | a real JPEG round trip | quality 75, 80 or 90 |

As published, an image under 256 px on its shorter side gets no blocks (the count rounds to 0).
Every draw comes from the generator passed in, so a seed repeats the perturbation exactly.
"""

from __future__ import annotations

import cv2
import numpy as np

from data_prep.edits import encode_jpeg

KINDS = ("blocks", "color_noise", "blur", "pixelate", "jpeg")
BLOCK = 8
BLOCK_COUNTS = (16, 32)
NOISE_VARIANCES = (0.001, 0.002)
BLUR_KERNELS = (7, 9)
PIXELATE_FACTORS = (2, 3)
JPEG_QUALITIES = (75, 80, 90)


def _blocks(rgb: np.ndarray, strength: int, rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    out = rgb.copy()
    for _ in range(min(h, w) // 256 * BLOCK_COUNTS[strength]):
        y, x = int(rng.integers(0, h - BLOCK)), int(rng.integers(0, w - BLOCK))
        out[y : y + BLOCK, x : x + BLOCK] = 128
    return out


def _color_noise(rgb: np.ndarray, strength: int, rng: np.random.Generator) -> np.ndarray:
    ycc = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2YCrCb)
    ycc += rng.normal(0.0, np.sqrt(NOISE_VARIANCES[strength]), size=ycc.shape).astype(np.float32)
    back = cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)
    return np.clip(np.rint(back * 255.0), 0, 255).astype(np.uint8)


def _blur(rgb: np.ndarray, strength: int, rng: np.random.Generator) -> np.ndarray:
    k = BLUR_KERNELS[strength]
    return cv2.GaussianBlur(rgb, (k, k), k / 6.0)


def _pixelate(rgb: np.ndarray, strength: int, rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    f = PIXELATE_FACTORS[strength]
    small = cv2.resize(rgb, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _jpeg(rgb: np.ndarray, strength: int, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.choice(JPEG_QUALITIES))
    buf = np.frombuffer(encode_jpeg(rgb, quality), np.uint8)
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


_OPS = {"blocks": _blocks, "color_noise": _color_noise, "blur": _blur, "pixelate": _pixelate, "jpeg": _jpeg}


def perturb(rgb: np.ndarray, rng: np.random.Generator, p: float) -> tuple[np.ndarray, str | None]:
    """With probability `p`, one perturbation of the table above on an RGB uint8 image;
    returns the image and the kind applied (None: left as it was)."""
    if rng.random() >= p:
        return rgb, None
    kind = KINDS[int(rng.integers(len(KINDS)))]
    strength = int(rng.integers(2))
    return _OPS[kind](rgb, strength, rng), kind
