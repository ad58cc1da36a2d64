"""Synthetic challenge cases (phantoms with known masks) for tests, benchmarks and training smoke runs.

    python -m tools.phantoms synth --out runs/synth --n2d 6 --n3d 3     # random 2D + 3D phantoms
    python -m tools.phantoms bench-set --out runs/bench_set              # the benchmark set (BENCH_CASES)
    python -m tools.phantoms volumes --out runs/phantoms3d               # small / large 3D objects (PHANTOMS_3D)

Every set is written in challenge layout (`<out>/imgs/<name>.npz`, `<out>/gts/<name>.npz`) through
data.write_challenge_case. Phantoms are deterministic by seed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python tools/phantoms.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

import data

MAX_OBJECTS = 255  # labels are uint8 (label i+1 ↔ box i)
_BODY_MODALITIES = {"CT", "MR", "PET"}  # 3D phantoms get a body outline with dark air around it
_COLOUR_MODALITIES = {"Dermoscopy", "Endoscopy", "Fundus", "Microscopy"}


def _smooth_noise(rng: np.random.Generator, hw: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], float32 H×W: `cells` random values across the long side,
    cubic-upsampled (cheap even at 4032×3024)."""
    h, w = hw
    gh = max(2, int(round(cells * h / max(h, w))))
    gw = max(2, int(round(cells * w / max(h, w))))
    big = cv2.resize(rng.random((gh, gw), dtype=np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(big.min()), float(big.max())
    return (big - lo) / max(hi - lo, 1e-6)


def _texture(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Three octaves of smooth noise: organ-scale shading plus finer tissue texture, float32 [0, 1]."""
    fine = min(64, max(4, max(hw) // 8))
    return 0.6 * _smooth_noise(rng, hw, 4) + 0.3 * _smooth_noise(rng, hw, 16) + 0.1 * _smooth_noise(rng, hw, fine)


def _polygon(obj: dict, scale: float = 1.0) -> np.ndarray:
    """Outline of an object (ellipse = no harmonics, blob = a few random harmonics of the radius),
    scaled about its centre, int32 K×2 (x, y)."""
    theta = np.linspace(0.0, 2 * np.pi, 96, endpoint=False)
    r = np.ones_like(theta)
    for k, (a, phi) in enumerate(obj["harmonics"], start=2):
        r += a * np.cos(k * theta + phi)
    x, y = scale * obj["rx"] * r * np.cos(theta), scale * obj["ry"] * r * np.sin(theta)
    c, s = np.cos(obj["angle"]), np.sin(obj["angle"])
    pts = np.stack([obj["cx"] + c * x - s * y, obj["cy"] + s * x + c * y], axis=1)
    return np.round(pts).astype(np.int32)


def _paint(canvas: np.ndarray, pts: np.ndarray, value: int) -> tuple[int, int, int, int] | None:
    """Fill polygon `pts` with `value` in a uint8 canvas, working on its bounding patch only.
    Returns the painted pixels' box (x0, y0, x1, y1), or None if nothing was painted."""
    x0, y0 = np.maximum(pts.min(axis=0), 0)
    x1 = min(int(pts[:, 0].max()), canvas.shape[1] - 1)
    y1 = min(int(pts[:, 1].max()), canvas.shape[0] - 1)
    if x1 < x0 or y1 < y0:
        return None
    patch = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    cv2.fillPoly(patch, [pts - np.array([x0, y0], np.int32)], 1)
    if not patch.any():
        return None
    canvas[y0:y1 + 1, x0:x1 + 1][patch > 0] = value
    b = data.box_from_mask(patch)
    return int(b[0] + x0), int(b[1] + y0), int(b[2] + x0), int(b[3] + y0)


def _place_objects(rng: np.random.Generator, hw: tuple[int, int], n: int, fill: float = 0.3) -> list[dict]:
    """n non-touching star-shaped footprints (ellipses and blobs, 2 px apart) inside an h×w image,
    together covering about `fill` of it; shrinks the objects if the image gets crowded."""
    h, w = hw
    occupied = np.zeros((h, w), np.uint8)
    base_r = max(2.0, min(np.sqrt(fill * h * w / (n * np.pi)), min(h, w) / 4))
    kernel = np.ones((5, 5), np.uint8)
    objs = []
    for i in range(n):
        for attempt in range(400):
            r = base_r * rng.uniform(0.5, 1.0) * 0.85 ** (attempt // 25)
            blob = rng.random() < 0.5
            harmonics = [(rng.uniform(0.0, 0.12), rng.uniform(0, 2 * np.pi)) for _ in range(3)] if blob else []
            obj = {"rx": max(1.5, r * rng.uniform(0.6, 1.0)), "ry": max(1.5, r * rng.uniform(0.6, 1.0)),
                   "angle": rng.uniform(0, np.pi), "harmonics": harmonics}
            ext = max(obj["rx"], obj["ry"]) * (1 + sum(a for a, _ in harmonics)) + 3
            if 2 * ext >= min(h, w) - 2:
                continue
            obj["cx"], obj["cy"] = rng.uniform(ext, w - 1 - ext), rng.uniform(ext, h - 1 - ext)
            pts = _polygon(obj)
            x0, y0 = pts.min(axis=0) - 2
            x1, y1 = pts.max(axis=0) + 2
            patch = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
            cv2.fillPoly(patch, [pts - np.array([x0, y0], np.int32)], 1)
            grown = cv2.dilate(patch, kernel)
            region = occupied[y0:y1 + 1, x0:x1 + 1]
            if not (region & grown).any():
                region |= grown
                objs.append(obj)
                break
        else:
            raise RuntimeError(f"could not place object {i + 1} of {n} in a {h}×{w} image; use fewer objects")
    return objs


def _object_value(rng: np.random.Generator, background: float, contrast: float | None = None) -> float:
    """Object grey level 45–90 (or ±`contrast`) away from its surroundings: visible from a box,
    not trivially. Mostly brighter on dark and darker on bright backgrounds."""
    if contrast is None:
        sign = 1.0 if (background < 128) ^ (rng.random() < 0.2) else -1.0
        contrast = sign * rng.uniform(45, 90)
    value = background + contrast
    if not 8 <= value <= 247:  # would saturate: go the other way
        value = background - contrast
    return float(np.clip(value, 8, 247))


def make_synthetic_case(kind: str = "2D", shape: Sequence[int] | None = None, n_objects: int = 3,
                        modality: str | None = None, seed: int = 0) -> dict:
    """A challenge-format phantom with known labels.

    2D: shape (H, W) (default 384×512, up to 4032×3024 and beyond) → imgs H×W×3 uint8,
        gts H×W uint8, boxes N×4 int64 (x0, y0, x1, y1), spacing (1.0, 1.0).
    3D: shape (D, H, W) (default 16×128×128) → imgs D×H×W uint8, gts D×H×W uint8,
        boxes N×6 int64 (x0, y0, z0, x1, y1, z1), spacing (1.0, 1.0, 1.0) (isotropic, so the
        axis order of the challenge's spacing does not matter for synthetic cases).
    Objects are ellipses and blobs (random radial harmonics) of varied size and grey level on a
    smooth textured background; in 3D they are star-shaped solids (cross-section shrinking towards
    their ends) whose z-ranges all overlap around the middle slice. Label i+1 ↔ boxes[i], boxes are
    the exact extents of the labels (inclusive pixel coordinates). 1 ≤ n_objects ≤ 255.
    """
    if kind not in ("2D", "3D"):
        raise ValueError(f"kind must be '2D' or '3D', got {kind!r}")
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in [1, {MAX_OBJECTS}], got {n_objects}")
    modality = modality or ("Endoscopy" if kind == "2D" else "CT")
    rng = np.random.default_rng(seed)
    if kind == "2D":
        h, w = (384, 512) if shape is None else (int(shape[0]), int(shape[1]))
        objs = _place_objects(rng, (h, w), n_objects)
        grey = 40 + 120 * _texture(rng, (h, w))
        gts = np.zeros((h, w), np.uint8)
        boxes = np.zeros((n_objects, 4), np.int64)
        detail = _smooth_noise(rng, (h, w), min(128, max(4, max(h, w) // 4)))
        for i, obj in enumerate(objs):
            boxes[i] = _paint(gts, _polygon(obj), i + 1)
            x0, y0, x1, y1 = boxes[i]
            sel = gts[y0:y1 + 1, x0:x1 + 1] == i + 1
            region = grey[y0:y1 + 1, x0:x1 + 1]
            value = _object_value(rng, float(region[sel].mean()))
            region[sel] = value + 25 * (detail[y0:y1 + 1, x0:x1 + 1][sel] - 0.5)
        grey = cv2.GaussianBlur(grey, (0, 0), 1.0)  # soft edges, like a real acquisition
        grey += rng.standard_normal((h, w), dtype=np.float32) * 3.0
        if modality in _COLOUR_MODALITIES:
            tint = rng.uniform(0.7, 1.1, size=3).astype(np.float32)
            img = grey[:, :, None] * tint + rng.uniform(-15, 15, size=3).astype(np.float32)
        else:
            img = np.repeat(grey[:, :, None], 3, axis=2)
        imgs = np.clip(img, 0, 255).astype(np.uint8)
        spacing = np.asarray([1.0, 1.0])
    else:
        d, h, w = (16, 128, 128) if shape is None else (int(shape[0]), int(shape[1]), int(shape[2]))
        objs = _place_objects(rng, (h, w), n_objects, fill=0.2)
        n_keys = max(2, d // 12 + 1)
        keys = [_texture(rng, (h, w)) for _ in range(n_keys)]
        body = None
        if modality in _BODY_MODALITIES:  # an elliptic body with dark air around it
            body = np.zeros((h, w), np.uint8)
            cv2.ellipse(body, (w // 2, h // 2), (int(w * 0.48), int(h * 0.47)), 0, 0, 360, 1, -1)
        gts = np.zeros((d, h, w), np.uint8)
        imgs = np.zeros((d, h, w), np.uint8)
        boxes = np.full((n_objects, 6), -1, np.int64)
        for obj in objs:
            obj["zc"] = d / 2 + rng.uniform(-d / 8, d / 8)
            obj["hz"] = rng.uniform(d / 5, d / 2.5) + 0.5
        contrasts = None
        for z in range(d):
            t = z / max(d - 1, 1) * (n_keys - 1)
            k = min(int(t), n_keys - 2)
            grey = (1 - (t - k)) * keys[k] + (t - k) * keys[k + 1]
            grey = 50 + 110 * grey
            if body is not None:
                grey = np.where(body > 0, grey, 6.0).astype(np.float32)
            if contrasts is None:  # per-object contrast to the local background, fixed across slices
                contrasts = [(1.0 if rng.random() < 0.6 else -1.0) * rng.uniform(45, 90) for _ in objs]
            lab = gts[z]
            for i, obj in enumerate(objs):
                u = (z - obj["zc"]) / obj["hz"]
                s = np.sqrt(max(0.0, 1.0 - u * u))
                if s * min(obj["rx"], obj["ry"]) < 0.75:
                    continue
                b = _paint(lab, _polygon(obj, s), i + 1)
                if b is None:
                    continue
                if boxes[i, 0] < 0:
                    boxes[i] = (b[0], b[1], z, b[2], b[3], z)
                else:
                    boxes[i, :3] = np.minimum(boxes[i, :3], (b[0], b[1], z))
                    boxes[i, 3:] = np.maximum(boxes[i, 3:], (b[2], b[3], z))
            for i in range(n_objects):
                sel = lab == i + 1
                if sel.any():
                    value = _object_value(rng, float(grey[sel].mean()), contrasts[i])
                    grey[sel] = value + 20 * (keys[-1][sel] - 0.5)
            grey = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), 0.8)
            grey += rng.standard_normal((h, w), dtype=np.float32) * 3.0
            imgs[z] = np.clip(grey, 0, 255).astype(np.uint8)
        if (boxes[:, 0] < 0).any():
            raise RuntimeError(f"synthetic 3D case: an object was never painted (shape {d}×{h}×{w}); "
                               "use a larger shape")
        spacing = np.asarray([1.0, 1.0, 1.0])
    return {"imgs": imgs, "boxes": boxes, "gts": gts, "spacing": spacing}



def case_name(kind: str, modality: str, number: int, tag: str = "synth") -> str:
    """`2DBox_<Modality>_<tag>_XXXX.npz` / `3DBox_…` (the modality must not contain '_')."""
    if "_" in modality:
        raise ValueError(f"modality name {modality!r} must not contain '_' (it delimits the file name)")
    return f"{kind}Box_{modality}_{tag}_{number:04d}.npz"



def write_synthetic_set(out_dir: str | os.PathLike, n2d: int = 6, n3d: int = 3, seed: int = 0,
                        modalities_2d: Sequence[str] = ("Endoscopy", "X-Ray", "Dermoscopy", "Microscopy"),
                        modalities_3d: Sequence[str] = ("CT", "MR", "PET"), tag: str = "synth",
                        progress: bool = False) -> list[Path]:
    """n2d 2D + n3d 3D random phantoms (sizes 192–512 px, 8–24 slices, 1–8 objects) in challenge
    layout; modalities cycle through the given lists. Deterministic by seed. Returns imgs paths."""
    rng = np.random.default_rng(seed)
    written = []
    for i in range(n2d + n3d):
        kind = "2D" if i < n2d else "3D"
        mods = modalities_2d if kind == "2D" else modalities_3d
        mod = mods[(i if kind == "2D" else i - n2d) % len(mods)]
        if kind == "2D":
            shape = (int(rng.integers(192, 513)), int(rng.integers(192, 513)))
            n_obj = int(rng.integers(1, 9))
        else:
            side = int(rng.integers(96, 161))
            shape = (int(rng.integers(8, 25)), side, side)
            n_obj = int(rng.integers(2, 6))
        case = make_synthetic_case(kind, shape, n_obj, mod, seed=int(rng.integers(2**31)))
        written.append(data.write_challenge_case(out_dir, case_name(kind, mod, i, tag), case))
        if progress:
            print(f"wrote {written[-1].name} {case['imgs'].shape} {n_obj} objects", file=sys.stderr)
    return written


# (kind, modality, shape, n_objects): the benchmark set, named <kind>Box_<Modality>_bench_XXXX.npz
BENCH_CASES = (
    ("3D", "CT", (64, 512, 512), 6),         # CT-like volume, 6 objects with overlapping z-ranges
    ("2D", "Microscopy", (1024, 1024), 128),  # many boxes: 120+ prompts on one image
    ("2D", "Endoscopy", (3024, 4032), 3),     # the largest challenge image size
    ("2D", "X-Ray", (512, 512), 4),
    ("3D", "MR", (24, 256, 224), 4),
)


def write_bench_set(out_dir: str | os.PathLike, seed: int = 0, progress: bool = False) -> list[Path]:
    """The benchmark set (BENCH_CASES) in challenge layout. Returns imgs paths."""
    written = []
    for i, (kind, mod, shape, n_obj) in enumerate(BENCH_CASES):
        case = make_synthetic_case(kind, shape, n_obj, mod, seed=seed * 1000 + i)
        written.append(data.write_challenge_case(out_dir, case_name(kind, mod, i, "bench"), case))
        if progress:
            print(f"wrote {written[-1].name} {case['imgs'].shape} {n_obj} objects", file=sys.stderr)
    return written


# 3D phantoms for pipeline variants: (modality tag, shape D×H×W, objects per volume); many objects → small ones
PHANTOMS_3D = (("PhantomSmall", (20, 128, 128), 16), ("PhantomLarge", (24, 128, 128), 1))


def write_phantom_volumes(out_dir: str | Path, n_per_kind: int = 3, seed: int = 0) -> list[Path]:
    """n_per_kind volumes of each PHANTOMS_3D kind in challenge layout, named 3DBox_<tag>_synth_XXXX.npz.
    Returns the imgs paths."""
    written = []
    for k, (tag, shape, n_objects) in enumerate(PHANTOMS_3D):
        for i in range(n_per_kind):
            case = make_synthetic_case("3D", shape, n_objects, "CT", seed=seed * 100 + k * 10 + i)
            written.append(data.write_challenge_case(out_dir, case_name("3D", tag, k * 10 + i), case))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write synthetic challenge cases (phantoms with known masks).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="random 2D and 3D phantoms in challenge layout (<out>/imgs, <out>/gts)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n2d", type=int, default=6, help="number of 2D cases")
    s.add_argument("--n3d", type=int, default=3, help="number of 3D cases")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed → same files)")
    b = sub.add_parser("bench-set", help="the benchmark set: 64×512×512 CT-like, 1024² with 128 boxes, 4032×3024, …",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--seed", type=int, default=0, help="random seed")
    v = sub.add_parser("volumes", help="3D phantoms with many small or one large object (PHANTOMS_3D)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--n-per-kind", type=int, default=3, help="volumes per kind")
    v.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    if a.cmd == "synth":
        paths = write_synthetic_set(a.out, a.n2d, a.n3d, a.seed, progress=True)
    elif a.cmd == "bench-set":
        paths = write_bench_set(a.out, a.seed, progress=True)
    else:
        paths = write_phantom_volumes(a.out, a.n_per_kind, a.seed)
    print(f"{len(paths)} cases in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
