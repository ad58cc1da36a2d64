"""Data: preprocessing (and its inverse), challenge npz reading, the 3D slice index, the balanced
modality sampler, synthetic cases.

numpy + opencv only (no torch at import time): infer.py uses the preprocessing below, and training
uses exactly the same function (§2.1), so the two can never drift apart.
"""
from __future__ import annotations

import cv2
import numpy as np

IMAGE_SIZE = 256  # the model's input side (LiteMedSAM: 256×256 → 64×64 embedding)

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
                  "nearest": cv2.INTER_NEAREST}


def resized_shape(hw: tuple[int, int], size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(h, w) after scaling the longest side to `size`, aspect kept (rounded like the baseline)."""
    h, w = int(hw[0]), int(hw[1])
    scale = size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def preprocess_image(img: np.ndarray, size: int = IMAGE_SIZE, interp: str = "area",
                     norm_then_pad: bool = True) -> np.ndarray:
    """One 2D image (H×W grey, or H×W×C with C = 1, 3 or 4) → float32 3×size×size model input.

    Resize the longest side to `size` (aspect kept), pad bottom/right to size×size, min-max
    normalise to [0, 1]. `norm_then_pad=True` (default) normalises the resized image and pads with 0,
    so padding sits at the image minimum, as in the challenge baseline; False pads the raw values
    with 0 first and normalises the padded square.
    """
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 4:  # RGBA: drop alpha
        img = img[:, :, :3]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"expected an H×W or H×W×3 image, got shape {img.shape}")
    img = img.astype(np.float32, copy=False)
    nh, nw = resized_shape(img.shape[:2], size)
    small = cv2.resize(img, (nw, nh), interpolation=INTERPOLATIONS[interp])
    if small.ndim == 2:
        small = np.repeat(small[:, :, None], 3, axis=2)  # grey → 3 channels after the resize: cheaper

    def minmax(a):
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / max(hi - lo, 1e-8)

    out = np.zeros((size, size, 3), np.float32)
    if norm_then_pad:
        out[:nh, :nw] = minmax(small)
    else:
        out[:nh, :nw] = small
        out = minmax(out)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def boxes_to_256(boxes: np.ndarray, hw: tuple[int, int], size: int = IMAGE_SIZE) -> np.ndarray:
    """Boxes N×4 (x0, y0, x1, y1) in original pixels → float32 N×4 in the size×size model space."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = size / max(int(hw[0]), int(hw[1]))
    return boxes * np.float32(scale)


def postprocess_logits(low_res_logits: np.ndarray, hw: tuple[int, int], size: int = IMAGE_SIZE,
                       interp: str = "linear") -> np.ndarray:
    """Inverse of preprocess_image for one mask: size×size logits (or probabilities centred at 0)
    → bool H×W mask. Crop the padding, resize to the original size, binarise at 0."""
    logits = np.asarray(low_res_logits, dtype=np.float32).reshape(low_res_logits.shape[-2:])
    nh, nw = resized_shape(hw, size)
    if logits.shape != (size, size):
        logits = cv2.resize(logits, (size, size), interpolation=cv2.INTER_LINEAR)
    crop = np.ascontiguousarray(logits[:nh, :nw])
    full = cv2.resize(crop, (int(hw[1]), int(hw[0])), interpolation=INTERPOLATIONS[interp])
    return full > 0


def preprocess_mask(mask: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """A 2D label/bool mask H×W → uint8 size×size in model space (nearest resize, zero padding),
    aligned with preprocess_image's output."""
    mask = np.asarray(mask)
    nh, nw = resized_shape(mask.shape[:2], size)
    small = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST)
    out = np.zeros((size, size), np.uint8)
    out[:nh, :nw] = small
    return out
