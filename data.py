"""Data: preprocessing (and its inverse), challenge npz reading and writing, the 3D slice index, the
balanced modality sampler, the train/eval split.

numpy + opencv only (no torch at import time): infer.py uses the preprocessing below, and training
uses exactly the same function (§2.1), so the two can never drift apart.

Flow for training: find_cases(root) → SliceIndex (npy headers only: 2D case = 1 sample, 3D case =
D samples; bisect over cumulative counts; decoded cases in an LRU cache) → SegmentationDataset
(one slice, one object, jittered box, flips) ← BalancedSampler (Ns(m) slices per modality per
epoch, DDP-sharded). Decisions, each documented where it is implemented:
  - labels: `gts` in the case file, else `../gts/<name>` next to an `imgs/` folder, else
    `gts/<name>` below the case's folder (find_labels);
  - modality: `2DBox_<M>_`/`3DBox_<M>_` file name, else `<root>/<M>/…`, else a known prefix (modality_of);
  - unlabelled slices: recorded lazily when a case is decoded, replaced by a labelled slice of the
    same file (SliceIndex, SegmentationDataset);
  - DDP: the epoch is padded with its own first items to a multiple of the world size (BalancedSampler).
CLI: `python data.py index ROOT` (slices per modality). Synthetic cases: `python -m tools.phantoms`.
"""
from __future__ import annotations

import ast
import bisect
import csv
import functools
import json
import os
import re
import sys
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
from numpy.lib import format as npformat

IMAGE_SIZE = 256  # the model's input side (LiteMedSAM: 256×256 → 64×64 embedding)

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
                  "nearest": cv2.INTER_NEAREST}


def interpolation(spec: str, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """OpenCV flag for resizing src_hw → dst_hw. `spec` is one name of INTERPOLATIONS, or a scale rule
    "DOWN/UP" (e.g. "area/cubic"): DOWN when the image shrinks, UP when it grows (area averaging is the
    right filter for shrinking, but it degenerates to nearest-neighbour replication when enlarging)."""
    down, _, up = spec.partition("/")
    growing = dst_hw[0] * dst_hw[1] > src_hw[0] * src_hw[1]
    name = (up or down) if growing else down
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {spec!r}: use one of {list(INTERPOLATIONS)} or DOWN/UP")
    return INTERPOLATIONS[name]


def resized_shape(hw: tuple[int, int], size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(h, w) after scaling the longest side to `size`, aspect kept (rounded like the baseline)."""
    h, w = int(hw[0]), int(hw[1])
    scale = size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


# Preprocessing defaults: the one table training and inference both read; per-modality entries override
# the fallback. Chosen on the dev set's tune half, confirmed on its check half (docs/pipeline_variants.md):
# area averaging to shrink, linear to enlarge (small PET and MR slices: +7.7 / +2.8 DSC points over area,
# which replicates pixels when enlarging). No modality's evidence justified an exception.
PREPROCESS_FALLBACK: dict[str, object] = {"interp": "area/linear", "norm_then_pad": True}
PREPROCESS_BY_MODALITY: dict[str, dict[str, object]] = {}
BOX_ROUNDINGS = ("float", "round", "outward")


def preprocess_options(modality: str | None = None) -> tuple[str, bool]:
    """(interp, norm_then_pad) used by preprocess_image for `modality` (None or unknown: the fallback)."""
    opts = {**PREPROCESS_FALLBACK, **PREPROCESS_BY_MODALITY.get(modality or "", {})}
    return str(opts["interp"]), bool(opts["norm_then_pad"])


def preprocess_image(img: np.ndarray, size: int = IMAGE_SIZE, interp: str | None = None,
                     norm_then_pad: bool | None = None, modality: str | None = None) -> np.ndarray:
    """One 2D image (H×W grey, or H×W×C with C = 1, 3 or 4) → float32 3×size×size model input.

    Resize the longest side to `size` (aspect kept), pad bottom/right to size×size, min-max
    normalise to [0, 1]. `norm_then_pad=True` normalises the resized image and pads with 0,
    so padding sits at the image minimum, as in the challenge baseline; False pads the raw values
    with 0 first and normalises the padded square. `interp` / `norm_then_pad` left as None take
    preprocess_options(modality): the shared default table of training and inference.
    """
    default_interp, default_ntp = preprocess_options(modality)
    interp = default_interp if interp is None else interp
    norm_then_pad = default_ntp if norm_then_pad is None else bool(norm_then_pad)
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 4:  # RGBA: drop alpha
        img = img[:, :, :3]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"expected an H×W or H×W×3 image, got shape {img.shape}")
    img = img.astype(np.float32, copy=False)
    nh, nw = resized_shape(img.shape[:2], size)
    small = cv2.resize(img, (nw, nh), interpolation=interpolation(interp, img.shape[:2], (nh, nw)))
    # channels-first view; a grey image stays 1×nh×nw and is broadcast into the 3 channels below
    # (normalising once instead of three times: 2.5 → 0.6 ms per 256² sample)
    small = small[None] if small.ndim == 2 else small.transpose(2, 0, 1)
    lo, hi = float(small.min()), float(small.max())
    if not norm_then_pad and (nh < size or nw < size):  # the zero padding takes part in the min-max
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32(1.0 / max(hi - lo, 1e-8))
    out = np.zeros((3, size, size), np.float32)
    out[:, :nh, :nw] = (small - np.float32(lo)) * scale
    if not norm_then_pad:
        out[:, nh:, :] = (0.0 - lo) * scale
        out[:, :nh, nw:] = (0.0 - lo) * scale
    return out


def boxes_to_256(boxes: np.ndarray, hw: tuple[int, int], size: int = IMAGE_SIZE,
                 rounding: str = "float") -> np.ndarray:
    """Boxes N×4 (x0, y0, x1, y1) in original pixels → float32 N×4 in the size×size model space.

    rounding: "float" keeps the scaled coordinates (the baseline); "round" rounds each to the nearest
    integer; "outward" floors x0, y0 and ceils x1, y1 (the box never shrinks)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = size / max(int(hw[0]), int(hw[1]))
    boxes_256 = boxes * np.float32(scale)
    if rounding == "round":
        boxes_256 = np.round(boxes_256)
    elif rounding == "outward":
        boxes_256 = np.concatenate([np.floor(boxes_256[:, :2]), np.ceil(boxes_256[:, 2:])], axis=1)
    elif rounding != "float":
        raise ValueError(f"box rounding must be one of {BOX_ROUNDINGS}, got {rounding!r}")
    return boxes_256.astype(np.float32, copy=False)


def postprocess_logits(low_res_logits: np.ndarray, hw: tuple[int, int], size: int = IMAGE_SIZE,
                       interp: str = "linear") -> np.ndarray:
    """Inverse of preprocess_image for one mask: size×size logits (or probabilities centred at 0)
    → bool H×W mask. Crop the padding, resize to the original size with `interp` (linear, cubic, or
    nearest = nearest-neighbour upsampling of the binarised mask), binarise at 0."""
    logits = np.asarray(low_res_logits, dtype=np.float32).reshape(low_res_logits.shape[-2:])
    nh, nw = resized_shape(hw, size)
    if logits.shape != (size, size):
        logits = cv2.resize(logits, (size, size), interpolation=cv2.INTER_LINEAR)
    crop = np.ascontiguousarray(logits[:nh, :nw])
    full = cv2.resize(crop, (int(hw[1]), int(hw[0])), interpolation=interpolation(interp, (nh, nw), hw))
    return full > 0


def preprocess_mask(mask: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """A 2D label/bool mask H×W → uint8 size×size in model space (nearest resize, zero padding),
    aligned with preprocess_image's output.

    INTER_NEAREST_EXACT samples pixel centres like the area/linear resizes of the image and the
    logits; plain INTER_NEAREST floors and shifts masks by up to half a source pixel (round-trip IoU
    0.938 → 0.973 on a 700×90 ellipse, 0.987 → 0.995 on 4032×3024)."""
    mask = np.asarray(mask)
    nh, nw = resized_shape(mask.shape[:2], size)
    small = cv2.resize(mask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)
    out = np.zeros((size, size), np.uint8)
    out[:nh, :nw] = small
    return out


# ────────────────────────────────────────────────────────────────────────────────────────────────
# Challenge npz reading
# ────────────────────────────────────────────────────────────────────────────────────────────────

# The challenge's 11 modalities; ids are positions in this tuple so that every dataset (train, eval,
# dev) numbers them the same way. Unknown names get ids after these, in sorted order per index.
CHALLENGE_MODALITIES = ("CT", "MR", "PET", "US", "X-Ray", "Dermoscopy", "Endoscopy", "Fundus",
                        "Mammography", "Microscopy", "OCT")
_MODALITY_ALIASES = {m.lower().replace("-", ""): m for m in CHALLENGE_MODALITIES}
# the challenge's own file names say "Microscope" and "X-Ray"; other spellings seen in public data
_MODALITY_ALIASES.update({"mri": "MR", "xray": "X-Ray", "cxr": "X-Ray", "ultrasound": "US", "microscope": "Microscopy",
                          "endoscope": "Endoscopy", "dermoscope": "Dermoscopy", "mammo": "Mammography",
                          "mammogram": "Mammography", "retina": "Fundus"})
_BOX_NAME = re.compile(r"^(2D|3D)Box_([^_]+)_")
_LABEL_DIRS = {"gts", "segs"}  # label / prediction folders: never cases themselves


def _canonical_modality(name: str) -> str:
    return _MODALITY_ALIASES.get(name.lower().replace("-", "").replace("_", ""), name)


_NPY_HEADER = re.compile(r"^\{'descr': '([^']+)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), \}")


def _read_npy_header_full(fp, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Parse the .npy header at the start of file-like `fp` → (shape, dtype, fortran_order); `fp` is
    left at the first data byte (reads a few hundred bytes).

    The plain-dtype header numpy writes is matched by a regex (ast.literal_eval was 40 % of the
    index build time); anything else goes through numpy's own parser."""
    try:
        start = fp.read(10)
        if len(start) == 10 and start[:6] == npformat.MAGIC_PREFIX and start[6:8] == b"\x01\x00":
            text = fp.read(int.from_bytes(start[8:10], "little")).decode("latin1")
            m = _NPY_HEADER.match(text)
            if m:
                shape = tuple(int(s) for s in m.group(3).replace(" ", "").split(",") if s)
                return shape, np.dtype(m.group(1)), m.group(2) == "True"
            header = ast.literal_eval(text)
        else:
            fp.seek(0)
            major, minor = npformat.read_magic(fp)
            if major not in (1, 2, 3):
                raise ValueError(f"unsupported .npy version {major}.{minor}")
            n = int.from_bytes(fp.read(2 if major == 1 else 4), "little")
            header = ast.literal_eval(fp.read(n).decode("latin1" if major < 3 else "utf8"))
        return (tuple(int(s) for s in header["shape"]), np.dtype(npformat.descr_to_dtype(header["descr"])),
                bool(header["fortran_order"]))
    except (ValueError, EOFError, zlib.error, zipfile.BadZipFile, SyntaxError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: unreadable .npy header ({e})") from None


def _read_npy_header(fp, where: str) -> tuple[tuple[int, ...], np.dtype]:
    shape, dtype, _ = _read_npy_header_full(fp, where)
    return shape, dtype


def npz_read_slice(path: str | os.PathLike, key: str, z: int) -> np.ndarray:
    """Slice z (along the first axis) of array `key` in an npz, inflating only the bytes up to the
    end of that slice (on average half of a volume, and never the whole volume in memory).
    Fortran-ordered arrays fall back to a full decode."""
    where = f"{path}:{key}"
    try:
        with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as fp:
            shape, dtype, fortran = _read_npy_header_full(fp, where)
            if not 0 <= z < shape[0]:
                raise ValueError(f"{where}: slice {z} out of range for shape {shape}")
            if fortran or dtype.hasobject:
                with np.load(path, allow_pickle=False) as npz:
                    return np.ascontiguousarray(npz[key][z])
            slice_shape = shape[1:]
            n_bytes = int(np.prod(slice_shape, dtype=np.int64)) * dtype.itemsize
            fp.seek(fp.tell() + z * n_bytes)  # forward seek = inflate and discard
            buf = fp.read(n_bytes)
            if len(buf) != n_bytes:
                raise ValueError(f"{where}: truncated payload")
            return np.frombuffer(buf, dtype=dtype).reshape(slice_shape).copy()
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{where}: cannot read slice {z} ({type(e).__name__}: {e})") from None


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Array names stored in an npz (from the zip directory; nothing is decompressed)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable npz ({e})") from None


def npz_array_shape(path: str | os.PathLike, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `key` inside an npz, read from its .npy header only.

    For a deflated member only the first compressed chunk (512 B, see below) is inflated, so the
    cost is independent of the array size and a corrupt payload past the header goes unnoticed here
    (it fails later, when the slice is drawn). The member's CRC is never checked: we stop before EOF.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                info = zf.getinfo(key + ".npy")
            except KeyError:
                raise ValueError(f"{path}: no array '{key}' (has {sorted(n[:-4] for n in zf.namelist())})") from None
            with zf.open(info) as fp:
                fp.MIN_READ_SIZE = 512  # the header is ~128 B: inflate 512 B, not zipfile's 4 KiB
                return _read_npy_header(fp, f"{path}:{key}")
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable npz ({e})") from None


def npz_headers(path: str | os.PathLike, keys: Iterable[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} for those of `keys` present in the npz, opening the zip once (see
    npz_array_shape: headers only, nothing decompressed beyond the first chunk of each member)."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for key in keys:
                if key + ".npy" in names:
                    with zf.open(key + ".npy") as fp:
                        fp.MIN_READ_SIZE = 512  # the header is ~128 B: inflate 512 B, not zipfile's 4 KiB
                        out[key] = _read_npy_header(fp, f"{path}:{key}")
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable npz ({e})") from None
    return out


class HeaderCache:
    """Persistent {npz path: (size, mtime_ns, {key: (shape, dtype) or None})} so that re-indexing a
    large tree (every training start, every DDP rank) costs one stat per unchanged file instead of
    a zip open. Entries are keyed by absolute path and invalidated by size or mtime changes; the
    JSON file is rewritten atomically by save() only when something changed."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, list] = {}
        self.dirty = False
        self.hits = 0
        if self.path is not None and self.path.is_file():
            try:
                blob = json.loads(self.path.read_text())
                if blob.get("version") == 1:
                    self.entries = blob["entries"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                print(f"{self.path}: ignoring unreadable header cache ({e})", file=sys.stderr)

    def headers(self, path: Path, keys: Sequence[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """npz_headers(path, keys) through the cache."""
        if self.path is None:
            return npz_headers(path, keys)
        key = os.path.abspath(path)
        st = os.stat(path)
        e = self.entries.get(key)
        if e is not None and e[0] == st.st_size and e[1] == st.st_mtime_ns and all(k in e[2] for k in keys):
            self.hits += 1
            return {k: (tuple(e[2][k][0]), np.dtype(e[2][k][1])) for k in keys if e[2][k] is not None}
        found = npz_headers(path, keys)
        self.entries[key] = [st.st_size, st.st_mtime_ns,
                             {k: ([list(found[k][0]), found[k][1].str] if k in found else None) for k in keys}]
        self.dirty = True
        return found

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fp:
            json.dump({"version": 1, "entries": self.entries}, fp, separators=(",", ":"))
        os.replace(tmp, self.path)
        self.dirty = False


def load_case(path: str | os.PathLike, keys: Sequence[str] = ("imgs", "boxes", "spacing", "gts"),
              labels_path: str | os.PathLike | None = None) -> dict:
    """Decode one challenge case → dict with the present `keys` among imgs / boxes / spacing / gts.

    `imgs` is required: 2D H×W×3 (or H×W) uint8, 3D D×H×W. `boxes` N×4 (2D) or N×6 (3D) when present.
    `gts` comes from the same file, else from `labels_path` (see find_labels) when given; it must
    have the image's spatial shape. Any problem → ValueError naming the file and the problem.
    """
    path = Path(path)
    out: dict = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            if "imgs" not in names:
                raise ValueError(f"{path}: no 'imgs' array (has {sorted(names)})")
            for k in keys:
                if k in names:
                    out[k] = z[k]
        if "gts" in keys and "gts" not in out and labels_path is not None:
            with np.load(labels_path, allow_pickle=False) as z:
                if "gts" not in z.files:
                    raise ValueError(f"{labels_path}: no 'gts' array (has {sorted(z.files)})")
                out["gts"] = z["gts"]
    except ValueError as e:
        if str(e).startswith(str(path)) or (labels_path and str(e).startswith(str(labels_path))):
            raise
        raise ValueError(f"{path}: cannot decode ({e})") from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot decode ({type(e).__name__}: {e})") from None
    imgs = out["imgs"]
    is_3d = is_3d_case(path.name, imgs.shape)
    if imgs.ndim not in (2, 3):
        raise ValueError(f"{path}: imgs must be H×W, H×W×3 or D×H×W, got shape {imgs.shape}")
    spatial = imgs.shape if is_3d else imgs.shape[:2]
    if "boxes" in out:
        width = 6 if is_3d else 4
        b = out["boxes"]
        if b.size and (b.ndim != 2 or b.shape[1] != width):
            raise ValueError(f"{path}: boxes must be N×{width} for a {'3D' if is_3d else '2D'} case, got {b.shape}")
        out["boxes"] = b.reshape(-1, width)
    if "gts" in out and out["gts"].shape != spatial:
        raise ValueError(f"{path}: gts shape {out['gts'].shape} does not match imgs spatial shape {spatial}")
    return out


def is_3d_case(name: str, imgs_shape: Sequence[int], box_width: int | None = None) -> bool:
    """The one rule for "is this case a 3D volume", from its file name, `imgs` shape and (if known) the
    width of its boxes. H×W is 2D and D×H×W×1 is 3D whatever the name; H×W×C with C in (1, 3, 4) is a
    2D image unless the name (`3D…`), or without a name N×6 boxes, say 3D; any other 3-axis array is 3D
    unless the name says `2D…`. Callers still check that the shape is valid for the answer."""
    named = name[:2] if name[:2] in ("2D", "3D") else None
    if len(imgs_shape) != 3:
        return len(imgs_shape) == 4 and imgs_shape[3] == 1
    if imgs_shape[2] in (1, 3, 4):  # a colour or grey image, or a volume of 1, 3 or 4 rows
        return (named or {4: "2D", 6: "3D"}.get(box_width)) == "3D"
    return named != "2D"


def crop_z(imgs: np.ndarray, boxes: np.ndarray, gts: np.ndarray | None, max_slices: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A 3D case (imgs/gts D×H×W, boxes N×6) cut to at most `max_slices` contiguous slices centred on its
    boxes' z-extent (unchanged when it fits), for cheap evaluation. Box z-ranges are shifted and
    clipped; a box wholly outside the window keeps its row (labels stay box index + 1) but is moved
    outside the image, so the pipeline marks it invalid, and its label is removed from gts."""
    depth = imgs.shape[0]
    if max_slices <= 0 or depth <= max_slices:
        return imgs, boxes, gts
    z_lo, z_hi = int(boxes[:, 2].min()), int(boxes[:, 5].max())
    start = max(0, min((z_lo + z_hi + 1) // 2 - max_slices // 2, depth - max_slices))
    stop = start + max_slices
    boxes = np.asarray(boxes, np.float64).copy()
    outside = (boxes[:, 5] < start) | (boxes[:, 2] >= stop)
    boxes[:, [2, 5]] = np.clip(boxes[:, [2, 5]] - start, 0, max_slices - 1)
    boxes[outside] = [-10, -10, -10, -5, -5, -5]
    if gts is not None:
        gts = gts[start:stop].copy()
        for i in np.flatnonzero(outside):
            gts[gts == i + 1] = 0
    return imgs[start:stop], boxes, gts


def find_cases(root: str | os.PathLike) -> list[Path]:
    """All case files under `root`, sorted: `<root>/<Modality>/<dataset>/*.npz`, `<root>/imgs/*.npz`,
    flat `<root>/*.npz`, any depth. Files inside `gts/` or `segs/` folders are labels or predictions,
    not cases, and are skipped. A single .npz path is returned as a one-element list."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _LABEL_DIRS)
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".npz"))
    return sorted(out)


def find_labels(path: str | os.PathLike, keys: Iterable[str] | None = None) -> Path | None:
    """Where the labels of case `path` live (None = unlabelled). The rule, first match wins:

    1. `gts` inside the case file itself (training layout);
    2. `<dir>/../gts/<same name>` when the case sits in a folder named `imgs` (challenge layout);
    3. `<dir>/gts/<same name>` (a `gts` subfolder next to the cases).
    `keys` = the case file's array names if already known (saves reopening the zip).
    """
    path = Path(path)
    if "gts" in (keys if keys is not None else npz_keys(path)):
        return path
    candidates = []
    if path.parent.name == "imgs":
        candidates.append(path.parent.parent / "gts" / path.name)
    candidates.append(path.parent / "gts" / path.name)
    for c in candidates:
        if c.is_file():
            return c
    return None


def modality_of(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """Modality of a case. Rule, first match wins: the file name `2DBox_<Modality>_…` /
    `3DBox_<Modality>_…`; else the first folder below `root` (`<root>/<Modality>/<dataset>/x.npz`,
    ignoring `imgs`/`gts`); else the file-name prefix before the first `_` if it is a known
    modality (`CT_AbdTumor_…`); else "unknown". Known aliases map to CHALLENGE_MODALITIES names."""
    name = os.path.basename(os.fspath(path))  # plain strings: pathlib was half the cached index time
    m = _BOX_NAME.match(name)
    if m:
        return _canonical_modality(m.group(2))
    if root is not None:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))  # no symlink resolution: cheap
        parts = () if rel.startswith("..") else rel.split(os.sep)
        if len(parts) >= 2 and parts[0] not in _LABEL_DIRS | {"imgs"}:
            return _canonical_modality(parts[0])
    prefix = _canonical_modality(name.split("_", 1)[0])
    return prefix if prefix in CHALLENGE_MODALITIES else "unknown"


def modality_ids(names: Iterable[str]) -> dict[str, int]:
    """Stable ids: challenge modalities by their CHALLENGE_MODALITIES position, others after, sorted."""
    names = set(names)
    ids = {m: i for i, m in enumerate(CHALLENGE_MODALITIES)}
    for j, m in enumerate(sorted(names - set(ids))):
        ids[m] = len(CHALLENGE_MODALITIES) + j
    return {m: ids[m] for m in sorted(names, key=lambda m: ids[m])}


# ────────────────────────────────────────────────────────────────────────────────────────────────
# The slice index: every 2D image is one sample, every 3D volume D samples (one per z-slice)
# ────────────────────────────────────────────────────────────────────────────────────────────────
class SliceIndex:
    """Global sample index over challenge cases, built from .npy headers only (no decompression).

    Per file: its number of slices (2D = 1, 3D = D read from the `imgs` header), its modality and
    where its labels are (find_labels). `cum_ends[f]` = number of samples in files 0..f, so a global
    sample index i lives in file `bisect_right(cum_ends, i)`. Volumes are decoded only when a slice
    of them is drawn, and the last `cache_size` decoded cases are kept (LRU) so that consecutive
    slices of one volume cost one decompression.

    Unlabelled slices (decision: lazy record + retry in the same file): the index counts every slice.
    When a volume is decoded its per-slice label presence is recorded (`label_presence(f)`, a D-bool
    array, free since the whole label volume is decoded anyway); SegmentationDataset then replaces an
    empty slice by a random labelled slice of the same file (same modality, no extra decompression),
    or, for a file with no labels at all, by a random slice of another file of the same modality.
    Nothing is decompressed up front, and the modality balance of the sampler is preserved.
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], root: str | os.PathLike | None = None,
                 cache_size: int = 4, require_labels: bool = True, progress: bool = False,
                 cache_mb: float = 1024.0, header_cache: str | os.PathLike | None = None,
                 partial_decode_mb: float | None = None) -> None:
        """`source`: a root folder (find_cases), one .npz, or a list of .npz paths. `root`: where the
        `<Modality>/` folders start (defaults to `source` when it is a folder). `require_labels`
        drops cases without labels (counted in `n_unlabelled_files`). The cache holds at most
        `cache_size` decoded cases and `cache_mb` MiB (the newest case is always kept): a 300×512×512
        CT is 150 MiB with its labels, and every DataLoader worker has its own cache.
        `header_cache`: a JSON file remembering the npy headers between runs (HeaderCache).
        `partial_decode_mb`: 3D cases whose `imgs` exceed this many MiB and are not cached are read
        one slice at a time (npz_read_slice: inflate up to the slice, ~half the volume on average,
        nothing cached) — for random sampling over large CTs, where the LRU cache almost never hits.
        None (default) = always decode whole cases into the cache."""
        if isinstance(source, (str, os.PathLike)):
            files = find_cases(source)
            if root is None and Path(source).is_dir():
                root = source
        else:
            files = [Path(f) for f in source]
        self.root = Path(root) if root is not None else None
        self.cache_size = int(cache_size)
        self.cache_mb = float(cache_mb)
        self.partial_decode_mb = partial_decode_mb
        self.image_nbytes: list[int] = []
        self.files: list[Path] = []
        self.label_files: list[Path | None] = []
        self.modality: list[str] = []
        self.is_3d: list[bool] = []
        self.image_shape: list[tuple[int, ...]] = []
        n_slices: list[int] = []
        self.n_unlabelled_files = 0
        hc = HeaderCache(header_cache)
        for k, f in enumerate(files):
            f = Path(f)
            headers = hc.headers(f, ("imgs", "gts"))  # one zip open per case: the index's whole cost
            if "imgs" not in headers:
                raise ValueError(f"{f}: no 'imgs' array")
            shape, dtype = headers["imgs"]
            is_3d = is_3d_case(f.name, shape)
            if len(shape) not in (2, 3) or (is_3d and len(shape) != 3):
                raise ValueError(f"{f}: imgs must be H×W, H×W×3 or D×H×W, got shape {shape}")
            labels = find_labels(f, headers)
            if labels is not None:
                gheaders = headers if labels == f else hc.headers(labels, ("gts",))
                if "gts" not in gheaders:
                    raise ValueError(f"{labels}: no 'gts' array (labels of {f})")
                gshape = gheaders["gts"][0]
                spatial = shape if is_3d else shape[:2]
                if gshape != tuple(spatial):
                    raise ValueError(f"{labels}: gts shape {gshape} does not match imgs {shape} of {f}")
            elif require_labels:
                self.n_unlabelled_files += 1
                continue
            self.files.append(f)
            self.label_files.append(labels)
            self.modality.append(modality_of(f, self.root))
            self.is_3d.append(is_3d)
            self.image_shape.append(shape)
            self.image_nbytes.append(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            n_slices.append(shape[0] if is_3d else 1)
            if progress and (k + 1) % 1000 == 0:
                print(f"indexed {k + 1}/{len(files)} files", file=sys.stderr)
        hc.save()
        self.header_cache_hits = hc.hits
        if self.n_unlabelled_files and progress:
            print(f"skipped {self.n_unlabelled_files} unlabelled files", file=sys.stderr)
        self.n_slices = np.asarray(n_slices, dtype=np.int64)
        self.cum_ends: list[int] = np.cumsum(self.n_slices).tolist()
        self.modality_to_id = modality_ids(self.modality)
        self.modality_id = np.asarray([self.modality_to_id[m] for m in self.modality], dtype=np.int64)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._presence: dict[int, np.ndarray] = {}
        self.n_decoded = 0  # number of case decompressions (cache misses), for tests and benchmarks
        self.n_partial = 0  # number of single-slice reads (partial_decode_mb)

    def __len__(self) -> int:
        return self.cum_ends[-1] if self.cum_ends else 0

    def __getstate__(self) -> dict:  # DataLoader workers (spawn): ship the index, not the cache
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample index → (file index, z) (z = 0 for 2D cases)."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"sample {index} out of range for an index of {n} slices")
        f = bisect.bisect_right(self.cum_ends, index)
        return f, index - (self.cum_ends[f - 1] if f else 0)

    def global_index(self, file_index: int, z: int) -> int:
        """Inverse of locate."""
        return (self.cum_ends[file_index - 1] if file_index else 0) + int(z)

    def load(self, file_index: int) -> dict:
        """Decoded case {imgs, gts} (gts None if unlabelled), through the LRU cache."""
        if file_index in self._cache:
            self._cache.move_to_end(file_index)
            return self._cache[file_index]
        f, lab = self.files[file_index], self.label_files[file_index]
        case = load_case(f, keys=("imgs", "gts"), labels_path=lab if lab != f else None)
        case.setdefault("gts", None)
        self.n_decoded += 1
        if case["gts"] is not None and file_index not in self._presence:
            g = case["gts"]
            self._presence[file_index] = (g.reshape(g.shape[0], -1).any(axis=1) if self.is_3d[file_index]
                                          else np.asarray([g.any()]))
        self._cache[file_index] = case
        while len(self._cache) > self.cache_size or (len(self._cache) > 1
                                                     and self.cache_nbytes() > self.cache_mb * 2**20):
            self._cache.popitem(last=False)
        return case

    def cache_nbytes(self) -> int:
        """Bytes held by the decoded-case cache."""
        return sum(a.nbytes for c in self._cache.values() for a in c.values() if a is not None)

    def slice(self, file_index: int, z: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(image, labels) of one slice: image H×W or H×W×3, labels H×W (None if unlabelled)."""
        if (self.partial_decode_mb is not None and self.is_3d[file_index] and file_index not in self._cache
                and self.image_nbytes[file_index] > self.partial_decode_mb * 2**20):
            self.n_partial += 1
            lab = self.label_files[file_index]
            return (npz_read_slice(self.files[file_index], "imgs", z),
                    None if lab is None else npz_read_slice(lab, "gts", z))
        case = self.load(file_index)
        if self.is_3d[file_index]:
            g = case["gts"]
            return case["imgs"][z], (None if g is None else g[z])
        return case["imgs"], case["gts"]

    def label_presence(self, file_index: int) -> np.ndarray | None:
        """Per-slice 'has any label' record, known once the case has been decoded (else None)."""
        return self._presence.get(file_index)

    def modalities(self) -> list[str]:
        """Modality names present, ordered by id."""
        return list(self.modality_to_id)

    def slices_per_modality(self) -> dict[str, int]:
        """N(m): number of samples (slices) per modality."""
        out = {m: 0 for m in self.modalities()}
        for m, n in zip(self.modality, self.n_slices.tolist()):
            out[m] += n
        return out

    def modality_slices(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """(file starts, cumulative counts) of one modality's files, to map the k-th slice of the
        modality to a global index without listing all of them (1.2 M CT slices)."""
        files = np.flatnonzero(np.asarray(self.modality) == modality)
        starts = np.asarray([self.cum_ends[f - 1] if f else 0 for f in files], dtype=np.int64)
        return starts, np.cumsum(self.n_slices[files])

    def modality_to_global(self, modality: str, local: np.ndarray) -> np.ndarray:
        """k-th slices (k in [0, N(m))) of `modality` → global sample indices."""
        return _local_to_global(*self.modality_slices(modality), local)


def _local_to_global(starts: np.ndarray, cum: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Slice numbers within a group of files (file starts, cumulative counts) → global indices."""
    local = np.asarray(local, dtype=np.int64)
    pos = np.searchsorted(cum, local, side="right")
    before = np.concatenate([[0], cum[:-1]])[pos]
    return starts[pos] + (local - before)


# ────────────────────────────────────────────────────────────────────────────────────────────────
# One training sample: a slice, one object, its (jittered) box, random flips
# ────────────────────────────────────────────────────────────────────────────────────────────────
def mask_to_256(mask: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bool H×W object mask → uint8 size×size in model space. Nearest resize (preprocess_mask);
    if a tiny object vanishes (e.g. 4032-px images shrink 16×) keep every pixel it touches."""
    m = preprocess_mask(mask, size)
    if not m.any() and mask.any():
        nh, nw = resized_shape(mask.shape[:2], size)
        cover = cv2.resize(mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA)
        m[:nh, :nw] = cover > 0
    return m


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Tight box (x0, y0, x1, y1) of a non-empty 2D mask, inclusive pixel coordinates, float32 (4,)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        raise ValueError("box_from_mask: empty mask")
    return np.asarray([xs[0], ys[0], xs[-1], ys[-1]], dtype=np.float32)


def jitter_box(box: np.ndarray, shift_px: int, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Enlarge each side of a box by an independent random integer in [0, shift_px] (MedSAM's
    perturbation: the object stays inside), then clip to the image h×w. float32 (4,)."""
    d = rng.integers(0, shift_px + 1, size=4).astype(np.float32) if shift_px > 0 else np.zeros(4, np.float32)
    x0, y0, x1, y1 = box
    h, w = hw
    return np.asarray([max(0.0, x0 - d[0]), max(0.0, y0 - d[1]), min(w - 1.0, x1 + d[2]),
                       min(h - 1.0, y1 + d[3])], dtype=np.float32)


class SegmentationDataset:
    """Box-prompted training samples over a SliceIndex; plain Python (works with torch's DataLoader).

    Item i (a global slice index) →
      image     float32 3×S×S   preprocess_image of the slice (S = image_size = 256)
      mask      uint8 S×S       one object (0/1), drawn uniformly among the slice's labels
      box_256   float32 (4,)    x0, y0, x1, y1 of the mask in model space, each side pushed out by
                                U{0..bbox_shift} px, clipped to the image content (nh×nw)
      modality_id int, modality str, file_index int, z int, label int
    Flips (p = 0.5 each, horizontal and vertical) act on the image content region [0:nh, 0:nw] of
    the padded square, so padding stays bottom/right as at inference; the box is computed from the
    flipped mask, so image, mask and box always agree.
    Randomness is a function of (seed, epoch, i): identical in every DataLoader worker and rerun;
    call set_epoch(e) each epoch (reaches workers unless persistent_workers=True).
    Needs labelled cases: build it on a SliceIndex with require_labels=True (the default).
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike] | SliceIndex, bbox_shift: int = 10,
                 flip: bool = True, seed: int = 0, root: str | os.PathLike | None = None, cache_size: int = 4,
                 image_size: int = IMAGE_SIZE, interp: str | None = None, max_retries: int = 20,
                 cache_mb: float = 1024.0) -> None:
        """`source`: a SliceIndex, or what SliceIndex takes (root folder, .npz, list of .npz)."""
        self.index = (source if isinstance(source, SliceIndex)
                      else SliceIndex(source, root=root, cache_size=cache_size, cache_mb=cache_mb))
        self.bbox_shift = int(bbox_shift)
        self.flip = bool(flip)
        self.seed = int(seed)
        self.epoch = 0
        self.image_size = int(image_size)
        self.interp = interp
        self.max_retries = int(max_retries)
        self._files_of_modality: dict[str, np.ndarray] = {
            m: np.flatnonzero(np.asarray(self.index.modality) == m) for m in self.index.modalities()}

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _labelled_slice(self, index: int, rng: np.random.Generator) -> tuple[int, int, np.ndarray, np.ndarray]:
        """(file, z, image, labels) for sample `index`, moved to a labelled slice if it has none."""
        f, z = self.index.locate(index)
        for _ in range(self.max_retries):
            img, lab = self.index.slice(f, z)
            if lab is not None and lab.any():
                return f, z, img, lab
            present = self.index.label_presence(f)
            if present is None and lab is not None:  # read slice by slice so far: decode once to learn
                self.index.load(f)
                present = self.index.label_presence(f)
            if present is not None and present.any():  # retry in the same file (already decoded)
                z = int(rng.choice(np.flatnonzero(present)))
            else:  # no labels anywhere in the file: another file of the same modality
                f = int(rng.choice(self._files_of_modality[self.index.modality[f]]))
                z = int(rng.integers(self.index.n_slices[f]))
        raise RuntimeError(f"{self.index.files[f]}: no labelled slice found after {self.max_retries} retries "
                           f"(modality {self.index.modality[f]})")

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        rng = np.random.default_rng([self.seed, self.epoch, index % len(self)])
        f, z, img, lab = self._labelled_slice(index, rng)
        counts = np.bincount(lab.ravel(), minlength=2) if lab.dtype.itemsize == 1 else None
        labels = np.flatnonzero(counts)[1:] if counts is not None else np.unique(lab)[1:]
        labels = labels[labels > 0]
        label = int(rng.choice(labels))
        S = self.image_size
        image = preprocess_image(img, S, self.interp, modality=self.index.modality[f])  # the inference defaults
        mask = mask_to_256(lab == label, S)
        nh, nw = resized_shape(lab.shape[:2], S)
        if self.flip:
            if rng.random() < 0.5:  # horizontal: mirror columns of the content region
                image[:, :nh, :nw] = image[:, :nh, :nw][:, :, ::-1].copy()
                mask[:nh, :nw] = mask[:nh, :nw][:, ::-1].copy()
            if rng.random() < 0.5:  # vertical
                image[:, :nh, :nw] = image[:, :nh, :nw][:, ::-1, :].copy()
                mask[:nh, :nw] = mask[:nh, :nw][::-1, :].copy()
        box_256 = jitter_box(box_from_mask(mask), self.bbox_shift, (nh, nw), rng)
        m = self.index.modality[f]
        return {"image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask), "box_256": box_256,
                "modality_id": int(self.index.modality_id[f]), "modality": m, "file_index": f, "z": z,
                "label": label}


# ────────────────────────────────────────────────────────────────────────────────────────────────
# The balanced modality sampler (§ data: Ns(m) samples per modality per epoch) and the split
# ────────────────────────────────────────────────────────────────────────────────────────────────
def samples_per_modality(counts: dict[str, int], strategy: str = "min") -> dict[str, int]:
    """Ns(m) from N(m): "min" → min over modalities of N(m) for every m (default); "max10" →
    max(⌊N(m)/10⌋, min) (ablation: big modalities keep a tenth of their slices)."""
    counts = {m: int(n) for m, n in counts.items() if n > 0}
    if not counts:
        return {}
    lo = min(counts.values())
    if strategy == "min":
        return {m: lo for m in counts}
    if strategy == "max10":
        return {m: max(n // 10, lo) for m, n in counts.items()}
    raise ValueError(f"unknown sampling strategy {strategy!r} (expected 'min' or 'max10')")


class BalancedSampler:
    """Each epoch: Ns(m) distinct slices drawn uniformly (without replacement) from every modality m,
    shuffled together; rank r of R takes positions r, r+R, r+2R, … of that epoch list
    (DistributedSampler-style), so ranks are disjoint and together cover the epoch.

    Padding (drop_last=False, default): the epoch list is padded with its own first items up to a
    multiple of R, so every rank has the same length (DDP needs equal step counts); at most R-1
    samples are seen twice per epoch. drop_last=True trims instead (≤ R-1 samples unseen).
    The permutation depends only on (seed, epoch): identical on every rank; call set_epoch(e).
    Empty slices are handled by SegmentationDataset (lazy record + retry), not here: the record is
    built in DataLoader workers, which the sampler in the main process cannot see.
    """

    def __init__(self, source: SliceIndex | SegmentationDataset, strategy: str = "min", num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, drop_last: bool = False) -> None:
        self.index = source.index if isinstance(source, SegmentationDataset) else source
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.strategy = strategy
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.counts = self.index.slices_per_modality()
        self.ns = samples_per_modality(self.counts, strategy)
        self.epoch_size = sum(self.ns.values())
        if self.drop_last:
            self.num_samples = self.epoch_size // self.num_replicas
        else:
            self.num_samples = -(-self.epoch_size // self.num_replicas)
        self._maps = {m: self.index.modality_slices(m) for m in self.ns}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> np.ndarray:
        """The whole epoch (all ranks), before padding/sharding: int64 (Σ Ns(m),)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        parts = []
        for m, ns in self.ns.items():
            local = rng.choice(self.counts[m], size=ns, replace=False)
            parts.append(_local_to_global(*self._maps[m], local))
        allidx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return allidx[rng.permutation(allidx.size)]

    def rank_indices(self) -> np.ndarray:
        """This rank's share of the epoch: int64 (num_samples,)."""
        idx = self.epoch_indices()
        total = self.num_samples * self.num_replicas
        if total > idx.size:  # pad with the epoch's own first items (cycled if R > epoch size)
            idx = np.concatenate([idx, np.resize(idx, total - idx.size)]) if idx.size else idx
        else:
            idx = idx[:total]
        return idx[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


SPLIT_FILE = "split.csv"  # the dev set's per-modality tune / check halves (tools/build_devset.py writes it)


def read_split(root: str | os.PathLike) -> dict[str, str]:
    """{case name without .npz: "tune" | "check"} from <root>/split.csv; {} when there is none."""
    path = Path(root) / SPLIT_FILE
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["name"]: row["half"] for row in csv.DictReader(f)}


def half_of(path: str | os.PathLike) -> str | None:
    """"tune" or "check" for a dev-set case (its split.csv is in the case's folder or the one above it,
    as in devset/imgs/<name>.npz), None for any other case."""
    path = Path(path)
    for root in (path.parent, path.parent.parent):
        split = _cached_split(str(root.resolve()))
        if split:
            return split.get(path.name[:-4] if path.name.endswith(".npz") else path.name)
    return None


@functools.lru_cache(maxsize=16)
def _cached_split(root: str) -> dict[str, str]:
    return read_split(root)


def without_check_half(files: Iterable[str | os.PathLike]) -> list:
    """`files` minus the dev set's check half: what training, calibration and any selection may read."""
    return [f for f in files if half_of(f) != "check"]


def split_by_file(files: Sequence[str | os.PathLike], eval_fraction: float = 0.1, seed: int = 0,
                  root: str | os.PathLike | None = None) -> tuple[list[Path], list[Path]]:
    """Deterministic train/eval split by case file (§ the paper holds out one tenth).

    Stratified by modality: in each modality, files are sorted by path, permuted with a generator
    seeded by (seed, modality), and round(n × eval_fraction) of them (at least 1 when n ≥ 2 and the
    fraction > 0) go to eval. Independent of input order. Returns (train, eval), each sorted.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    groups: dict[str, list[Path]] = {}
    for f in sorted({Path(f) for f in files}, key=str):
        groups.setdefault(modality_of(f, root), []).append(f)
    train, held = [], []
    for m, fs in sorted(groups.items()):
        n_eval = int(round(len(fs) * eval_fraction))
        if eval_fraction > 0 and len(fs) >= 2:
            n_eval = max(1, n_eval)
        perm = np.random.default_rng([seed, zlib.crc32(m.encode())]).permutation(len(fs))
        held += [fs[i] for i in perm[:n_eval]]
        train += [fs[i] for i in perm[n_eval:]]
    return sorted(train, key=str), sorted(held, key=str)


# ────────────────────────────────────────────────────────────────────────────────────────────────
# Writing challenge npz: atomic and reproducible
# ────────────────────────────────────────────────────────────────────────────────────────────────
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # np.savez stamps the wall clock; a fixed stamp makes rewrites byte-identical


def save_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """What np.savez_compressed writes (np.load reads it), to a temporary file in the same folder
    (`.<name>.*.tmp`, not *.npz, so no evaluator picks it up), then os.replace: readers see the old file
    or the whole new one, never a torn npz. Zip entries carry a fixed timestamp, so the same arrays
    always give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fp, zipfile.ZipFile(fp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for key, arr in arrays.items():
                info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as member:
                    npformat.write_array(member, np.asanyarray(arr), allow_pickle=False)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cases are meant to be shared (docker, other users)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_case(path: str | os.PathLike, case: dict, with_gts: bool = True) -> Path:
    """Write a case dict (imgs, boxes, spacing[, gts]) as a challenge npz, atomically."""
    keys = ["imgs", "boxes", "spacing"] + (["gts"] if with_gts else [])
    save_npz_atomic(path, **{k: case[k] for k in keys if k in case})
    return Path(path)


def write_challenge_case(out_dir: str | os.PathLike, name: str, case: dict) -> Path:
    """Challenge layout: `<out>/imgs/<name>` (imgs, boxes[, spacing]) and `<out>/gts/<name>` (gts, boxes[,
    spacing]). Returns the imgs path."""
    out_dir = Path(out_dir)
    write_case(out_dir / "imgs" / name, case, with_gts=False)
    save_npz_atomic(out_dir / "gts" / name, **{k: case[k] for k in ("gts", "boxes", "spacing") if k in case})
    return out_dir / "imgs" / name


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import time

    p = argparse.ArgumentParser(description="Index a tree of challenge cases (npy headers only) and print slices "
                                "per modality. Synthetic cases: python -m tools.phantoms.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    x = sub.add_parser("index", help="index a tree of cases (headers only) and print slices per modality",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("root", help="folder of challenge npz cases")
    x.add_argument("--strategy", choices=("min", "max10"), default="min", help="balanced-sampler strategy for Ns(m)")
    x.add_argument("--header-cache", default=None, help="JSON file remembering npy headers between runs (HeaderCache)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    idx = SliceIndex(a.root, require_labels=False, progress=True, header_cache=a.header_cache)
    dt = time.perf_counter() - t0
    ns = samples_per_modality(idx.slices_per_modality(), a.strategy)
    n_unlabelled = sum(lab is None for lab in idx.label_files)
    print(f"{len(idx.files)} files ({n_unlabelled} unlabelled), {len(idx)} slices, indexed in {dt:.2f} s")
    for m, n in idx.slices_per_modality().items():
        print(f"  {m:12s} N={n:8d}  Ns({a.strategy})={ns.get(m, 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
