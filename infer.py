"""Inference: the challenge entrypoint. A folder of challenge npz cases → a folder of `segs` label maps.

    python infer.py -i INPUT_DIR -o OUTPUT_DIR [-m MODEL_DIR] [-b BLOCK] [--3d-prompt box|propagate|hybrid] ...

Per case `X.npz` (2D `imgs` H×W×3 + `boxes` N×4, or 3D `imgs` D×H×W + `boxes` N×6) it writes
OUTPUT_DIR/X.npz with `segs`: uint8 label map (H×W or D×H×W), label i+1 where box i's mask is.
  * Overlap: where masks of two boxes overlap the HIGHER label (the later box) wins, like the
    challenge baseline; it is applied as a per-pixel max, so it does not depend on processing order.
  * Outputs are written atomically (temporary file in OUTPUT_DIR + os.replace): a kill never leaves a
    truncated npz; a rerun skips cases already done unless --overwrite.
  * Per-case seconds (load → save) go to a CSV `case,time` beside OUTPUT_DIR, never inside it
    (default `<OUTPUT_DIR>_times.csv`), so the challenge evaluator only ever sees the npz results.
  * Bad inputs: repaired where the intent is clear (boxes clipped/swapped, intensities min-max
    normalised, NaN/inf replaced, alpha dropped), with one warning line naming the file; otherwise the
    case is skipped with one error line, the others still run, and the exit code is 1.
    Exit codes: 0 all cases done, 1 some case failed, 2 nothing could run (bad dirs, no model).
  * 3D: every 3D box becomes per-slice 2D boxes; each slice's embedding is computed once for all the
    boxes on it. Decoder calls take at most BLOCK boxes; each box's logits are resized and written into
    the label map one at a time, so memory never holds N full-size masks.

Compiled models are cached (--cache-dir): the challenge runs one container per case and keeps only the
output folder, so predict.sh puts the cache in a hidden folder there (OUTPUT_DIR/.qmedsam_cache) and
seeds it from the cache built into the image; a stale or half-written cache entry is recompiled.

Imports numpy, opencv, openvino and data.py's preprocessing only (tqdm for a progress bar over several
cases, onnxruntime only for --backend onnxruntime): no torch, so the Docker image stays small.
"""
from __future__ import annotations

import time

_T_START = time.perf_counter()  # before the heavy imports: --timing reports what they cost

import argparse  # noqa: E402
import csv  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import zipfile  # noqa: E402
from collections import OrderedDict  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import data  # noqa: E402

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = REPO_DIR / "models" / "default"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qmedsam" / "ov"
# Boxes per decoder call: memory grows ~50 MB per box in a block while time per box stays flat
# (tools/bench_memory.py); 16 keeps the peak far under the 8 GB limit with 255 boxes.
DEFAULT_BLOCK = 16
MAX_LABELS = 255  # a uint8 label map holds labels 1..255

# 3D prompt mode per modality (from `3DBox_<Modality>_…` names), chosen on the dev set
# (docs/pipeline_variants.md); unknown modalities take the paper's fixed per-slice box.
PROMPT_3D_BY_MODALITY: dict[str, str] = {"CT": "box", "MR": "box", "PET": "box"}
PROMPT_3D_FALLBACK = "box"
PROMPT_3D_MODES = ("box", "propagate", "hybrid")
HYBRID_MIN_AREA_RATIO = 0.5  # hybrid: fall back to the 3D box when the mask shrinks below this × previous
EMBED_CACHE_MB = 1024  # propagate/hybrid keep slice embeddings for the downward sweep up to this size
START_SLICES = ("middle", "largest")
Z_SAMPLINGS = ("every", "adaptive")
ADAPTIVE_CACHE_SLICES = 64  # adaptive z-sampling: slice embeddings kept for other boxes (4 MB each)
INTERP_CHOICES = ("area", "linear", "cubic", "area/linear", "area/cubic")  # "DOWN/UP": data.interpolation
MASK_INTERPS = ("linear", "cubic", "nearest", "area/linear", "area/cubic")


@dataclass(frozen=True)
class Pipeline:
    """The knobs around the model (tools/pipeline_variants.py compares them). None = the default: image
    preprocessing from data.preprocess_options(modality) (shared with training), the 3D prompt from
    PROMPT_3D_BY_MODALITY, everything else from PIPELINE_BY_MODALITY / PIPELINE_FALLBACK.

    image_interp   resize of the image to 256: area / linear / cubic, or DOWN/UP by scale (data.interpolation)
    norm_then_pad  min-max normalise before zero padding (True) or after (False)
    mask_interp    resize of the 256² logits to H×W: linear / cubic / nearest, or DOWN/UP by scale
    box_rounding   boxes mapped to 256 space kept as float, rounded, or floor/ceil outward
    prompt_3d      box | propagate | hybrid (see segment_3d)
    start_slice    propagate/hybrid: start at the middle of the box's z-range, or on the slice where the
                   3D box's x/y gives the largest predicted mask (costs the box-mode decoder pass)
    margin_px      propagate/hybrid: grow each propagated mask bbox by this many pixels per side
    min_area_ratio hybrid: fall back to the 3D box's x/y below this × the previous slice's mask area
    z_sampling     every: the model on every slice of a box's z-range; adaptive: on a coarse grid, refined
                   where neighbouring masks disagree, the rest filled by shape interpolation (segment_3d)
    z_agree_iou    adaptive: two computed slices agree when their masks' IoU is at least this
    z_max_gap      adaptive: at most this many slices are filled between two computed ones
    """
    image_interp: str | None = None
    norm_then_pad: bool | None = None
    mask_interp: str | None = None
    box_rounding: str | None = None
    prompt_3d: str | None = None
    start_slice: str | None = None
    margin_px: float | None = None
    min_area_ratio: float | None = None
    z_sampling: str | None = None
    z_agree_iou: float | None = None
    z_max_gap: int | None = None


# Defaults of the knobs after preprocessing (preprocessing defaults live in data.py, for training too),
# chosen on the dev set's tune half and confirmed on its check half (docs/pipeline_variants.md). Adaptive
# z-sampling stays off: 41 % fewer encoder calls on the check half's volumes, but NSD −1.7 points (the
# bar was −0.5 per 3D modality); its knobs are what the tune half chose when it is turned on.
PIPELINE_FALLBACK: dict[str, object] = {"mask_interp": "linear", "box_rounding": "outward", "start_slice": "middle",
                                        "margin_px": 2.0, "min_area_ratio": HYBRID_MIN_AREA_RATIO,
                                        "z_sampling": "every", "z_agree_iou": 0.75, "z_max_gap": 4}
PIPELINE_BY_MODALITY: dict[str, dict[str, object]] = {}


class CaseError(Exception):
    """A case that cannot be segmented; the message names the problem (the file name is added later)."""


# ---- the model interface -----------------------------------------------------------------------------
class Model:
    """What the pipeline calls, numpy in and numpy out, implemented here for OpenVINO and ONNX Runtime
    and in train.py for a torch LiteMedSAM (training's evaluation, the bench's baseline row):

        encode(image B×3×256×256 float32) → image_embedding B×256×64×64
        decode(image_embedding 1×256×64×64, boxes_256 N×4 in model space) → low_res_logits N×1×256×256

    `encoder_calls` / `decoder_calls` count the calls; `precision` names the precision float ops run in."""

    precision = "f32"

    def __init__(self) -> None:
        self.encoder_calls = 0
        self.decoder_calls = 0

    def encode(self, image: np.ndarray) -> np.ndarray:
        self.encoder_calls += 1
        return self._encode(np.ascontiguousarray(image, np.float32))

    def decode(self, image_embedding: np.ndarray, boxes_256: np.ndarray) -> np.ndarray:
        self.decoder_calls += 1
        return self._decode(image_embedding, np.ascontiguousarray(boxes_256, np.float32))

    def _encode(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decode(self, image_embedding: np.ndarray, boxes_256: np.ndarray) -> np.ndarray:
        raise NotImplementedError


ENCODER_BATCH = 1  # slices per encoder call: the pipeline embeds one image / 3D slice at a time


def seed_cache(cache_dir: Path, seed_dir: Path | None) -> int:
    """Copy the compiled-model blobs of `seed_dir` (the cache built into the Docker image) into an empty
    `cache_dir`; returns how many. OpenVINO keys each blob by the model, the device and its settings, so a
    seed compiled on another CPU is simply not used (it compiles and adds its own)."""
    if not seed_dir or not Path(seed_dir).is_dir() or any(Path(cache_dir).glob("*.blob")):
        return 0
    n = 0
    for blob in Path(seed_dir).glob("*.blob"):
        tmp = Path(cache_dir) / f".{blob.name}.tmp"
        shutil.copyfile(blob, tmp)
        os.replace(tmp, Path(cache_dir) / blob.name)  # whole blobs only, even if this container is killed
        n += 1
    return n


class OpenVINOModel(Model):
    """encoder.xml + decoder.xml of a model dir, compiled once on CPU (from the cache when it has them)."""

    def __init__(self, model_dir: Path, precision: str = "auto", threads: int | None = None,
                 cache_dir: Path | None = DEFAULT_CACHE_DIR, encoder_batch: int | None = ENCODER_BATCH,
                 seed_cache_dir: Path | None = None):
        import openvino as ov

        super().__init__()
        self.model_dir = model_dir = Path(model_dir)
        core = ov.Core()
        if cache_dir:
            try:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                seed_cache(Path(cache_dir), seed_cache_dir)
            except OSError:
                cache_dir = None  # a read-only location must not stop inference: compile without the cache
        config: dict = {}
        if precision != "auto":  # this CPU runs f32 IRs in bf16 unless told otherwise
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        encoder = str(model_dir / "encoder.xml")
        if encoder_batch and static_encoder_batch(model_dir) != encoder_batch:
            # a static input shape runs faster than a dynamic batch (tools/bench_batch.py)
            encoder = core.read_model(encoder)
            encoder.reshape({encoder.inputs[0]: [encoder_batch, *encoder.inputs[0].get_partial_shape()[1:]]})
        # from the file path when the IR already has the shape: a cache hit then skips reading the graph;
        # the decoder compiles beside the encoder (OpenVINO releases the GIL; about 0.05 s less per start)
        with ThreadPoolExecutor(max_workers=1) as side:
            decoder = side.submit(_compile, core, str(model_dir / "decoder.xml"), config, cache_dir)
            self.encoder = _compile(core, encoder, config, cache_dir)
            self.decoder = decoder.result()
        self.from_cache = all(bool(m.get_property("LOADED_FROM_CACHE")) for m in (self.encoder, self.decoder))
        hint = self.encoder.get_property("INFERENCE_PRECISION_HINT")  # what OpenVINO actually uses
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        self._image = _port(self.encoder.inputs, "image", 0)
        self._embedding_out = _port(self.encoder.outputs, "image_embedding", 0)
        self._embedding_in = _port(self.decoder.inputs, "image_embedding", 0)
        self._boxes = _port(self.decoder.inputs, "boxes", 1)
        self._logits = _port(self.decoder.outputs, "low_res_logits", 0)
        self._enc_request = self.encoder.create_infer_request()
        self._dec_request = self.decoder.create_infer_request()

    def _encode(self, image: np.ndarray) -> np.ndarray:
        return self._enc_request.infer({self._image: image})[self._embedding_out]

    def _decode(self, image_embedding: np.ndarray, boxes_256: np.ndarray) -> np.ndarray:
        return self._dec_request.infer({self._embedding_in: image_embedding, self._boxes: boxes_256})[self._logits]


class OnnxRuntimeModel(Model):
    """encoder.onnx + decoder.onnx of a model dir through ONNX Runtime (CPU)."""

    def __init__(self, model_dir: Path, threads: int | None = None):
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)

        def session(name: str):
            return ort.InferenceSession(str(Path(model_dir) / name), options, providers=["CPUExecutionProvider"])

        def names(ports) -> list[str]:
            return [p.name for p in ports]

        self.encoder, self.decoder = session("encoder.onnx"), session("decoder.onnx")
        self._image = _pick(names(self.encoder.get_inputs()), "image", 0)
        self._embedding_out = _pick(names(self.encoder.get_outputs()), "image_embedding", 0)
        self._embedding_in = _pick(names(self.decoder.get_inputs()), "image_embedding", 0)
        self._boxes = _pick(names(self.decoder.get_inputs()), "boxes", 1)
        self._logits = _pick(names(self.decoder.get_outputs()), "low_res_logits", 0)

    def _encode(self, image: np.ndarray) -> np.ndarray:
        return self.encoder.run([self._embedding_out], {self._image: image})[0]

    def _decode(self, image_embedding: np.ndarray, boxes_256: np.ndarray) -> np.ndarray:
        return self.decoder.run([self._logits], {self._embedding_in: image_embedding, self._boxes: boxes_256})[0]


def static_encoder_batch(model_dir: Path) -> int | None:
    """The batch the encoder IR was exported with, if static (meta.json); None if dynamic or unknown."""
    try:
        import json
        shape = json.loads((Path(model_dir) / "meta.json").read_text())["graphs"]["encoder"]["inputs"]["image"]
        return shape[0] if isinstance(shape[0], int) else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _compile(core, model, config: dict, cache_dir):
    """core.compile_model through the cache, and once more without it if a cached blob cannot be used
    (OpenVINO recompiles a truncated or foreign blob by itself; this guards against anything it does not).
    The cache folder goes in each call's config, not the Core, so two compiles can run at once."""
    if not cache_dir:
        return core.compile_model(model, "CPU", config)
    try:
        return core.compile_model(model, "CPU", {**config, "CACHE_DIR": str(cache_dir)})
    except RuntimeError:
        return core.compile_model(model, "CPU", config)


def _port(ports, name: str, index: int):
    """The port called `name`, else the one at `index` (exported graphs may lose their names)."""
    for port in ports:
        if name in port.get_names():
            return port
    return ports[index]


def _pick(names: list[str], name: str, index: int) -> str:
    return name if name in names else names[index]


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which int8 has no fast kernel: plain AVX2 and older
_ISA_CAPS_WITHOUT_FAST_INT8 = ("SSE41", "AVX", "AVX2")


def int8_pays(cpu_flags: set[str] | None = None, isa_cap: str | None = None) -> bool:
    """Whether OpenVINO's int8 kernels beat its fp32 ones on this CPU: they need AVX-512 or a VNNI
    extension (measured, f32 hint: int8 encoder 2.10× faster with AVX-512 VNNI, 1.47× with AVX-512 alone,
    1.20× slower with AVX2 alone). cpu_flags: /proc/cpuinfo's (None: read them; unknown → True);
    isa_cap: oneDNN's cap (None: $ONEDNN_MAX_CPU_ISA), which OpenVINO honours."""
    if isa_cap is None:
        isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    if isa_cap.upper() in _ISA_CAPS_WITHOUT_FAST_INT8:
        return False
    if cpu_flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                line = next((ln for ln in f if ln.startswith("flags")), "")
        except OSError:
            return True  # not Linux: nothing to go on, keep the int8 model
        if not line:
            return True
        cpu_flags = set(line.split(":", 1)[1].split())
    if isa_cap.upper().startswith("AVX2_VNNI"):
        return "avx_vnni" in cpu_flags
    return bool(cpu_flags & {"avx512_vnni", "avx_vnni", "amx_int8", "avx512bw"})


def choose_model_dir(model_dir: Path, int8: str = "auto") -> Path:
    """`model_dir`, or its fp32/ fallback (written by `export.py --fp32-fallback`) when int8 would run slower
    than fp32 on this CPU (int8_pays) or int8 == "off"."""
    fallback = Path(model_dir) / "fp32"
    if int8 == "on" or not (fallback / "encoder.xml").is_file():
        return Path(model_dir)
    return fallback if int8 == "off" or not int8_pays() else Path(model_dir)


def load_model(model_dir: Path, backend: str = "openvino", precision: str = "auto",
               threads: int | None = None, cache_dir: Path | None = DEFAULT_CACHE_DIR,
               seed_cache_dir: Path | None = None, int8: str = "auto") -> Model:
    """The model of `model_dir` for `backend`; raises FileNotFoundError with a one-line how-to-fix.
    int8 "auto" runs the int8 IR where it is the faster one, else the model dir's fp32/ fallback if it
    has one (choose_model_dir); "on" / "off" force either."""
    model_dir = Path(model_dir)
    if backend == "openvino":
        model_dir = choose_model_dir(model_dir, int8)
    needed = ("encoder.xml", "decoder.xml") if backend == "openvino" else ("encoder.onnx", "decoder.onnx")
    missing = [n for n in needed if not (model_dir / n).is_file()]
    if missing:
        what = "not found" if not model_dir.is_dir() else f"has no {', '.join(missing)}"
        how = "python export.py " + ("--out MODEL_DIR" if backend == "openvino" else "--no-ir --out MODEL_DIR")
        raise FileNotFoundError(f"model dir {model_dir} {what}: make one with `{how}` (or pass -m MODEL_DIR)")
    if backend == "openvino":
        return OpenVINOModel(model_dir, precision, threads, cache_dir, seed_cache_dir=seed_cache_dir)
    return OnnxRuntimeModel(model_dir, threads)


# ---- reading and repairing a case --------------------------------------------------------------------
@dataclass
class Case:
    """A validated case. imgs: 2D H×W or H×W×3 (any numeric dtype), 3D D×H×W; boxes: float64 N×4 (2D,
    x0 y0 x1 y1) or N×6 (3D, x0 y0 z0 x1 y1 z1) in pixels, repaired; valid: bool N (False → no mask)."""
    name: str
    imgs: np.ndarray
    boxes: np.ndarray
    valid: np.ndarray
    is_3d: bool
    notes: list[str] = field(default_factory=list)

    @property
    def segs_shape(self) -> tuple[int, ...]:
        return tuple(self.imgs.shape) if self.is_3d else tuple(self.imgs.shape[:2])

    @property
    def modality(self) -> str:
        return data.modality_of(self.name)


def load_case(path: Path) -> Case:
    """Read a challenge npz and repair it (see repair_case); CaseError when it cannot be read."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CaseError("not a readable .npz (not a zip archive: truncated or another format)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("imgs", "boxes") if k not in npz.files]
            if missing:
                raise CaseError(f"missing array {' and '.join(map(repr, missing))} "
                                f"(has: {', '.join(npz.files) or 'nothing'})")
            imgs, boxes = npz["imgs"], npz["boxes"]
    except CaseError:
        raise
    except Exception as e:  # truncated members, pickled objects, bad headers
        raise CaseError(f"cannot read the npz ({type(e).__name__}: {e})") from e
    return repair_case(path.name, imgs, boxes)


def repair_case(name: str, imgs: np.ndarray, boxes: np.ndarray) -> Case:
    """Decide 2D/3D and repair what has a clear intent; CaseError otherwise. Every repair adds a note."""
    notes: list[str] = []
    imgs, boxes = np.asarray(imgs), np.asarray(boxes)
    if imgs.dtype == bool:
        imgs = imgs.astype(np.uint8) * np.uint8(255)
        notes.append("imgs is bool: used as 0/255")
    elif not (np.issubdtype(imgs.dtype, np.integer) or np.issubdtype(imgs.dtype, np.floating)):
        raise CaseError(f"imgs has dtype {imgs.dtype}: expected numbers (uint8)")
    if imgs.size == 0:
        raise CaseError(f"imgs is empty (shape {imgs.shape})")

    is_3d = data.is_3d_case(name, imgs.shape, boxes.shape[-1] if boxes.ndim else None)
    if imgs.ndim == 4 and is_3d:
        imgs = imgs[..., 0]  # D×H×W×1
    if imgs.ndim not in (2, 3) or (not is_3d and imgs.ndim == 3 and imgs.shape[2] not in (1, 3, 4)):
        raise CaseError(f"imgs has shape {imgs.shape}: expected H×W×3 (2D) or D×H×W (3D)")
    if not is_3d and imgs.ndim == 3 and imgs.shape[2] == 1:
        imgs = imgs[:, :, 0]
    if not is_3d and imgs.ndim == 3 and imgs.shape[2] == 4:
        imgs = imgs[:, :, :3]
        notes.append("imgs is H×W×4 (RGBA): alpha ignored")

    if imgs.dtype != np.uint8:
        if np.issubdtype(imgs.dtype, np.floating):
            n_bad = int(imgs.size - np.count_nonzero(np.isfinite(imgs)))
            if n_bad == imgs.size:
                raise CaseError("imgs has no finite values (all NaN/inf)")
            if n_bad:
                notes.append(f"imgs has {n_bad} NaN/inf values: replaced by the finite min/max")
        finite = imgs[np.isfinite(imgs)] if imgs.dtype.kind == "f" else imgs
        lo, hi = finite.min(), finite.max()
        del finite
        notes.append(f"imgs dtype {imgs.dtype} (range {lo:.4g}..{hi:.4g}, expected uint8): min-max normalised")

    depth, height, width = (imgs.shape if is_3d else (1, *imgs.shape[:2]))
    boxes = _boxes_matrix(boxes, is_3d, depth, notes)
    boxes, valid = _repair_boxes(boxes, is_3d, depth, height, width, notes)
    return Case(name, imgs, boxes, valid, is_3d, notes)


def _boxes_matrix(boxes: np.ndarray, is_3d: bool, depth: int, notes: list[str]) -> np.ndarray:
    """boxes as float64 N×4 (2D) or N×6 (3D), or CaseError."""
    if boxes.dtype == bool or not (np.issubdtype(boxes.dtype, np.integer) or np.issubdtype(boxes.dtype, np.floating)):
        raise CaseError(f"boxes have dtype {boxes.dtype}: expected numbers")
    cols = 6 if is_3d else 4
    if boxes.size == 0:
        notes.append("no boxes: wrote an empty label map")
        return np.zeros((0, cols))
    if boxes.ndim == 1 and boxes.size in (4, 6):
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 6):
        raise CaseError(f"boxes have shape {boxes.shape}: expected N×4 (2D) or N×6 (3D)")
    boxes = boxes.astype(np.float64)
    if is_3d and boxes.shape[1] == 4:
        if depth != 1:
            raise CaseError(f"boxes are N×4 (x0,y0,x1,y1) but imgs is a 3D volume of {depth} slices: "
                            "need N×6 (x0,y0,z0,x1,y1,z1)")
        notes.append("boxes are N×4 for a one-slice volume: used on slice 0")
        boxes = np.insert(boxes, [2, 4], 0.0, axis=1)
    if not is_3d and boxes.shape[1] == 6:
        notes.append("boxes are N×6 (x0,y0,z0,x1,y1,z1) for a 2D image: z ignored")
        boxes = boxes[:, [0, 1, 3, 4]]
    return boxes


def _rows(index: np.ndarray, verb: str = "have") -> str:
    """'box 3 has' / 'boxes 1, 4, 9 …(+5) have' for 0-based box rows (label = row + 1)."""
    index = [int(i) for i in np.flatnonzero(index)]
    head = ", ".join(map(str, index[:6])) + (f" …(+{len(index) - 6})" if len(index) > 6 else "")
    if len(index) == 1:
        return f"box {head} {dict(have='has', lie='lies', are='is').get(verb, verb)}"
    return f"boxes {head} {verb}"


def _repair_boxes(boxes: np.ndarray, is_3d: bool, depth: int, height: int, width: int,
                  notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Swap reversed corners, clip to the image, round z; boxes wholly outside, non-finite or beyond
    label 255 are marked invalid (no mask, their label stays reserved)."""
    n, half = len(boxes), boxes.shape[1] // 2
    valid = np.ones(n, bool)
    finite = np.isfinite(boxes).all(axis=1)
    if not finite.all():
        notes.append(f"{_rows(~finite)} NaN/inf coordinates: not segmented")
        valid &= finite
        boxes = np.where(finite[:, None], boxes, 0.0)
    lo, hi = boxes[:, :half], boxes[:, half:]
    swapped = (hi < lo).any(axis=1)
    if swapped.any():
        axes = "/".join(f"{a}1 < {a}0" for k, a in enumerate("xyz"[:half]) if (hi[:, k] < lo[:, k]).any())
        notes.append(f"{_rows(swapped)} {axes}: corners swapped")
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    if is_3d:
        z_frac = (lo[:, 2] != np.round(lo[:, 2])) | (hi[:, 2] != np.round(hi[:, 2]))
        if z_frac.any():
            notes.append(f"{_rows(z_frac & valid)} non-integer z: rounded")
        lo[:, 2], hi[:, 2] = np.round(lo[:, 2]), np.round(hi[:, 2])
    limit = np.array([width, height, depth - 1][:half], np.float64)  # x, y: pixel edges; z: slice index
    outside = ((lo > limit) | (hi < 0)).any(axis=1) & valid
    if outside.any():
        notes.append(f"{_rows(outside, 'lie')} wholly outside the image: not segmented")
        valid &= ~outside
    clipped_lo, clipped_hi = np.clip(lo, 0, limit), np.clip(hi, 0, limit)
    partly = ((clipped_lo != lo) | (clipped_hi != hi)).any(axis=1) & valid
    if partly.any():
        notes.append(f"{_rows(partly, 'are')} partly outside the image: clipped")
    zero = ((clipped_hi[:, :2] - clipped_lo[:, :2]) <= 0).any(axis=1) & valid
    if zero.any():
        notes.append(f"{_rows(zero)} zero width or height: segmented as given")
    if n > MAX_LABELS:
        notes.append(f"{n} boxes but a uint8 label map holds {MAX_LABELS}: boxes {MAX_LABELS}.. not segmented")
        valid[MAX_LABELS:] = False
    return np.concatenate([clipped_lo, clipped_hi], axis=1), valid


def model_input(img2d: np.ndarray, interp: str | None = None, norm_then_pad: bool | None = None,
                modality: str | None = None) -> np.ndarray:
    """One 2D image (H×W or H×W×3, any numeric dtype) → float32 3×256×256 via data.preprocess_image
    (None options: its per-modality defaults, the same as training's).
    Non-uint8 images are first mapped linearly to 0..255 with NaN/inf set to the finite min/max: the
    min-max normalisation inside preprocess_image makes that exact, and keeps float32 finite."""
    if img2d.dtype != np.uint8:
        a = img2d.astype(np.float64)
        finite = np.isfinite(a)
        if not finite.all():
            if not finite.any():
                a = np.zeros_like(a)
            else:
                fin = a[finite]
                a = np.nan_to_num(a, nan=fin.min(), posinf=fin.max(), neginf=fin.min())
        lo, hi = a.min(), a.max()
        img2d = ((a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)).astype(np.float32)
    return data.preprocess_image(img2d, interp=interp, norm_then_pad=norm_then_pad, modality=modality)


# ---- segmentation ------------------------------------------------------------------------------------
def resolve_pipeline(case: Case, pipe: Pipeline | None = None) -> Pipeline:
    """`pipe` with every None replaced by the default for the case's modality (file-name prefix)."""
    pipe = pipe or Pipeline()
    modality = case.modality
    interp, norm_then_pad = data.preprocess_options(modality)
    table = {**PIPELINE_FALLBACK, **PIPELINE_BY_MODALITY.get(modality, {}),
             "image_interp": interp, "norm_then_pad": norm_then_pad,
             "prompt_3d": PROMPT_3D_BY_MODALITY.get(modality, PROMPT_3D_FALLBACK)}
    return Pipeline(**{k: (table[k] if v is None else v) for k, v in vars(pipe).items()})


def segment_case(model: Model, case: Case, block: int = DEFAULT_BLOCK, pipe: Pipeline | None = None) -> np.ndarray:
    """A repaired case → its uint8 label map (shape case.segs_shape); unset knobs of `pipe` take the
    per-modality defaults (resolve_pipeline)."""
    pipe = resolve_pipeline(case, pipe)
    return segment_3d(model, case, pipe, block) if case.is_3d else segment_2d(model, case, pipe, block)


def _write(segs2d: np.ndarray, mask: np.ndarray, label: int) -> None:
    """Overlap rule: the higher label (the later box) wins, independent of the writing order."""
    np.maximum(segs2d, np.uint8(label), out=segs2d, where=mask)


def _decode_masks(model: Model, image_embedding: np.ndarray, boxes_xy: np.ndarray, hw: tuple[int, int],
                  block: int, pipe: Pipeline):
    """Yield (k, bool H×W mask) for each row k of boxes_xy (N×4 original pixels), ≤ block per decoder call."""
    boxes_256 = data.boxes_to_256(boxes_xy, hw, rounding=pipe.box_rounding)
    for start in range(0, len(boxes_xy), block):
        low_res_logits = model.decode(image_embedding, boxes_256[start:start + block])
        for j in range(low_res_logits.shape[0]):
            yield start + j, data.postprocess_logits(low_res_logits[j, 0], hw, interp=pipe.mask_interp)
        del low_res_logits


def _embed(model: Model, img2d: np.ndarray, pipe: Pipeline, modality: str) -> np.ndarray:
    """One image or slice → its image_embedding 1×256×64×64."""
    return model.encode(model_input(img2d, pipe.image_interp, pipe.norm_then_pad, modality)[None])


def segment_2d(model: Model, case: Case, pipe: Pipeline, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """2D case → uint8 H×W label map: one encoder call, ⌈N/block⌉ decoder calls. `pipe` is resolved."""
    hw = case.segs_shape
    segs = np.zeros(hw, np.uint8)
    rows = np.flatnonzero(case.valid)
    if len(rows) == 0:
        return segs
    image_embedding = _embed(model, case.imgs, pipe, case.modality)
    for k, mask in _decode_masks(model, image_embedding, case.boxes[rows], hw, block, pipe):
        _write(segs, mask, int(rows[k]) + 1)
    return segs


class _Volume:
    """One 3D case being segmented: its valid boxes (x/y prompt, z-range, label; row k ↔ box k), slice
    embeddings on demand (kept for a later sweep up to EMBED_CACHE_MB) and the label map being written."""

    def __init__(self, model: Model, case: Case, pipe: Pipeline, block: int):
        self.model, self.case, self.pipe, self.block = model, case, pipe, block
        self.hw = case.imgs.shape[1:]
        self.segs = np.zeros(case.imgs.shape, np.uint8)
        rows = np.flatnonzero(case.valid)
        self.xy = case.boxes[rows][:, [0, 1, 3, 4]]
        self.z0, self.z1 = case.boxes[rows, 2].astype(int), case.boxes[rows, 5].astype(int)
        self.labels = rows + 1
        self.kept: dict[int, np.ndarray] = {}
        self.keep_limit = int(EMBED_CACHE_MB * 2**20 // (256 * 64 * 64 * 4))
        self.recent: OrderedDict[int, np.ndarray] = OrderedDict()  # adaptive: the last embeddings, LRU

    def __len__(self) -> int:
        return len(self.labels)

    def on(self, z: int) -> np.ndarray:
        """Rows of the boxes whose z-range holds slice z."""
        return np.flatnonzero((self.z0 <= z) & (z <= self.z1))

    def slices(self) -> range:
        return range(int(self.z0.min()), int(self.z1.max()) + 1)

    def embed(self, z: int) -> np.ndarray:
        """Slice z's embedding: the kept one (handed over once), else one encoder call."""
        if z in self.kept:
            return self.kept.pop(z)
        return _embed(self.model, self.case.imgs[z], self.pipe, self.case.modality)

    def embed_recent(self, z: int) -> np.ndarray:
        """Slice z's embedding through a small LRU: adaptive sampling visits slices in no fixed order,
        and another box may need the same slice later."""
        if z in self.recent:
            self.recent.move_to_end(z)
            return self.recent[z]
        emb = self.embed(z)
        self.recent[z] = emb
        if len(self.recent) > ADAPTIVE_CACHE_SLICES:
            self.recent.popitem(last=False)
        return emb

    def keep(self, z: int, embedding: np.ndarray) -> None:
        if len(self.kept) < self.keep_limit:
            self.kept[z] = embedding

    def masks(self, embedding: np.ndarray, boxes_xy: np.ndarray):
        return _decode_masks(self.model, embedding, boxes_xy, self.hw, self.block, self.pipe)

    def write(self, z: int, row: int, mask: np.ndarray) -> None:
        _write(self.segs[z], mask, int(self.labels[row]))


def segment_3d(model: Model, case: Case, pipe: Pipeline, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """3D case → uint8 D×H×W label map. Each slice's embedding is computed once for all its boxes.
    `pipe` is resolved; pipe.prompt_3d chooses how a 3D box prompts each slice of its z-range:

    box:       the box's x/y on every slice (the paper's way).
    propagate: the start slice gets the box; each next slice (up, then down) gets the bounding box of
               the previous slice's mask, grown by pipe.margin_px; a box stops when its mask vanishes.
    hybrid:    propagate, but use the box's x/y on a slice whose propagated mask is empty or smaller
               than pipe.min_area_ratio × the previous slice's.
    Start slice (pipe.start_slice): "middle" of the z-range (the baseline's), or "largest": the slice
    where the box's x/y gives the largest mask (one box-mode pass over the z-range first).

    pipe.z_sampling "adaptive" runs the model on fewer slices: in box mode on every box's first and last
    slice and a grid z_max_gap + 1 apart, in propagate/hybrid mode from the start slice in steps of up to
    z_max_gap + 1; wherever two neighbouring computed slices disagree (mask IoU below z_agree_iou, or one
    empty and one not) the slice between them is computed too, recursively, down to adjacent slices; the
    slices between two that agree are filled by interpolating the masks' signed distances. What it cannot
    see: a change that starts and ends strictly between two computed slices that agree with each other
    (at most z_max_gap slices long), e.g. a gap in an object, or a separate blob, of ≤ z_max_gap slices.
    """
    vol = _Volume(model, case, pipe, block)
    if len(vol) == 0:
        return vol.segs
    if pipe.z_sampling not in Z_SAMPLINGS:
        raise ValueError(f"unknown z-sampling {pipe.z_sampling!r} (expected one of {Z_SAMPLINGS})")
    adaptive = pipe.z_sampling == "adaptive"
    if pipe.prompt_3d == "box":
        (_box_adaptive if adaptive else _box_every_slice)(vol)
        return vol.segs
    if pipe.prompt_3d not in ("propagate", "hybrid"):
        raise ValueError(f"unknown 3D prompt mode {pipe.prompt_3d!r}")
    if pipe.start_slice not in START_SLICES:
        raise ValueError(f"unknown start slice {pipe.start_slice!r} (expected one of {START_SLICES})")
    start = (vol.z0 + vol.z1) // 2  # the baseline's int((z1 - z0) / 2 + z0)
    if pipe.start_slice == "largest":
        start = _largest_mask_slice(vol, start)
    (_propagate_adaptive if adaptive else _propagate)(vol, start, hybrid=pipe.prompt_3d == "hybrid")
    return vol.segs


def _box_every_slice(vol: _Volume) -> None:
    for z in vol.slices():
        active = vol.on(z)
        if len(active) == 0:
            continue
        for k, mask in vol.masks(vol.embed(z), vol.xy[active]):
            vol.write(z, active[k], mask)


def masks_agree(a: np.ndarray, b: np.ndarray, min_iou: float) -> bool:
    """Two bool masks tell the same story: IoU ≥ min_iou; two empty masks agree, one empty one does not."""
    union = np.count_nonzero(a | b)
    return union == 0 or np.count_nonzero(a & b) >= min_iou * union


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance to the boundary, positive inside the mask, negative outside (float32)."""
    m = mask.astype(np.uint8)
    return (cv2.distanceTransform(m, cv2.DIST_L2, 5) - cv2.distanceTransform(1 - m, cv2.DIST_L2, 5))


def interpolate_masks(a: np.ndarray, b: np.ndarray, n: int):
    """Yield the n masks evenly between bool masks a and b (shape-based interpolation: a blend of their
    signed distances, thresholded at 0), computed on the two masks' joint bounding box only."""
    union = a | b
    if not union.any():
        for _ in range(n):
            yield np.zeros_like(a)
        return
    ys, xs = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    pad = 2  # the distance field needs background around the masks
    y0, y1 = max(0, ys[0] - pad), min(a.shape[0], ys[-1] + 1 + pad)
    x0, x1 = max(0, xs[0] - pad), min(a.shape[1], xs[-1] + 1 + pad)
    da, db = _signed_distance(a[y0:y1, x0:x1]), _signed_distance(b[y0:y1, x0:x1])
    for k in range(1, n + 1):
        t = np.float32(k / (n + 1))
        out = np.zeros_like(a)
        out[y0:y1, x0:x1] = (1 - t) * da + t * db > 0
        yield out


def _fill(vol: _Volume, row: int, za: int, ma: np.ndarray, zb: int, mb: np.ndarray) -> None:
    """Write the interpolated masks of the slices strictly between za and zb."""
    step = 1 if zb > za else -1
    for z, mask in zip(range(za + step, zb, step), interpolate_masks(ma, mb, abs(zb - za) - 1)):
        vol.write(z, row, mask)


def _box_adaptive(vol: _Volume) -> None:
    """Box mode on a coarse z-grid, refined where neighbours disagree (see segment_3d). Each round
    encodes every slice it needs once and decodes all the boxes that need it in one call."""
    pipe, step = vol.pipe, int(vol.pipe.z_max_gap) + 1
    masks: list[dict[int, np.ndarray]] = [{} for _ in range(len(vol))]
    need: dict[int, set[int]] = {}
    pending: dict[int, list[tuple[int, int]]] = {}
    for i in range(len(vol)):
        grid = sorted(set(range(int(vol.z0[i]), int(vol.z1[i]) + 1, step)) | {int(vol.z1[i])})
        for z in grid:
            need.setdefault(z, set()).add(i)
        pending[i] = list(zip(grid, grid[1:]))
    while need:
        for z in sorted(need):
            rows = sorted(need[z])
            for k, mask in vol.masks(vol.embed_recent(z), vol.xy[rows]):
                masks[rows[k]][z] = mask
                vol.write(z, rows[k], mask)
        need, refine = {}, {}
        for i, intervals in pending.items():
            for a, b in intervals:
                if b - a <= 1:
                    continue
                if masks_agree(masks[i][a], masks[i][b], pipe.z_agree_iou):
                    _fill(vol, i, a, masks[i][a], b, masks[i][b])
                    continue
                mid = (a + b) // 2
                need.setdefault(mid, set()).add(i)
                refine.setdefault(i, []).extend([(a, mid), (mid, b)])
        pending = refine


def _propagate_adaptive(vol: _Volume, start: np.ndarray, hybrid: bool) -> None:
    """Propagate/hybrid in strides of up to z_max_gap + 1 slices, each box on its own (slice embeddings
    shared through the LRU): a stride whose end mask disagrees with its start is halved until they agree
    or are adjacent; the slices skipped over are interpolated."""
    pipe, stride = vol.pipe, int(vol.pipe.z_max_gap) + 1
    margin, ratio = float(pipe.margin_px or 0.0), pipe.min_area_ratio

    def decode(z: int, box: np.ndarray) -> np.ndarray:
        return next(iter(vol.masks(vol.embed_recent(z), box[None])))[1]

    for i in range(len(vol)):
        s = int(start[i])
        first = decode(s, vol.xy[i])
        vol.write(s, i, first)
        for direction, last in ((+1, int(vol.z1[i])), (-1, int(vol.z0[i]))):
            za, ma = s, first
            while za != last:
                bbox = _bbox(ma)
                prompt = vol.xy[i] if bbox is None else _grow(bbox, margin, vol.hw)
                if bbox is None and not hybrid:
                    break  # propagation ends where the object vanishes
                span = min(stride, abs(last - za))
                while True:
                    zb = za + direction * span
                    mb = decode(zb, prompt)
                    if hybrid and not np.array_equal(prompt, vol.xy[i]) and (
                            not mb.any() or mb.sum() < ratio * ma.sum()):
                        mb = decode(zb, vol.xy[i])
                    if span == 1 or masks_agree(ma, mb, pipe.z_agree_iou):
                        break
                    span //= 2
                _fill(vol, i, za, ma, zb, mb)
                vol.write(zb, i, mb)
                za, ma = zb, mb


def _largest_mask_slice(vol: _Volume, middle: np.ndarray) -> np.ndarray:
    """Per box, the first slice where its x/y prompt gives the largest mask (`middle` where it finds
    nothing anywhere); the embeddings are kept for the propagation sweeps."""
    area = np.zeros((len(vol), vol.segs.shape[0]), np.int64)
    for z in vol.slices():
        active = vol.on(z)
        if len(active) == 0:
            continue
        emb = vol.embed(z)
        vol.keep(z, emb)
        for k, mask in vol.masks(emb, vol.xy[active]):
            area[active[k], z] = int(mask.sum())
    return np.where(area.max(axis=1) > 0, area.argmax(axis=1), middle)


def _bbox(mask: np.ndarray) -> np.ndarray | None:
    """Bounding box (x0, y0, x1, y1) of a bool H×W mask in inclusive pixel indices, None if empty."""
    return data.box_from_mask(mask).astype(np.float64) if mask.any() else None


def _grow(bbox: np.ndarray | None, margin_px: float, hw: tuple[int, int]) -> np.ndarray | None:
    """A mask bbox (x0, y0, x1, y1) grown by margin_px per side, clipped to the H×W image."""
    if bbox is None or not margin_px:
        return bbox
    h, w = hw
    return np.clip(bbox + np.array([-margin_px, -margin_px, margin_px, margin_px]), 0, [w - 1, h - 1, w - 1, h - 1])


def _propagate(vol: _Volume, start: np.ndarray, hybrid: bool) -> None:
    """Sweep up from each box's start slice to z1, then down from start − 1 to z0, each slice prompted
    by the previous slice's mask bbox (see segment_3d)."""
    margin, ratio = float(vol.pipe.margin_px or 0.0), vol.pipe.min_area_ratio
    start_state: dict[int, tuple[np.ndarray | None, int]] = {}  # row → (mask bbox, area) on its start slice

    def next_prompt(i: int, bbox: np.ndarray | None) -> np.ndarray | None:
        if bbox is None:  # the object vanished: stop, or (hybrid) fall back to the box
            return vol.xy[i] if hybrid else None
        return _grow(bbox, margin, vol.hw)

    for direction in (+1, -1):
        first = start if direction > 0 else start - 1
        last = vol.z1 if direction > 0 else vol.z0
        todo = np.flatnonzero((last - first) * direction >= 0)
        if len(todo) == 0:
            continue
        prompt_box: dict[int, np.ndarray | None] = {}
        prev_area: dict[int, int] = {}
        for i in todo:
            if direction > 0:
                prompt_box[i], prev_area[i] = vol.xy[i], 0
            else:
                bbox, prev_area[i] = start_state[i]
                prompt_box[i] = next_prompt(i, bbox)
        zs = (range(int(first[todo].min()), int(last[todo].max()) + 1) if direction > 0 else
              range(int(first[todo].max()), int(last[todo].min()) - 1, -1))
        for z in zs:
            active = [i for i in todo if (z - first[i]) * direction >= 0 and (last[i] - z) * direction >= 0
                      and prompt_box[i] is not None]
            if not active:
                continue
            emb = vol.embed(z)
            if direction > 0 and ((vol.z0 <= z) & (z < start)).any():
                vol.keep(z, emb)  # the downward sweep needs this slice again
            masks = {active[k]: m for k, m in vol.masks(emb, np.stack([prompt_box[i] for i in active]))}
            if hybrid:
                retry = [i for i in active if not np.array_equal(prompt_box[i], vol.xy[i]) and
                         (not masks[i].any() or masks[i].sum() < ratio * prev_area[i])]
                if retry:
                    for k, m in vol.masks(emb, vol.xy[retry]):
                        masks[retry[k]] = m
            for i in active:
                mask = masks.pop(i)
                vol.write(z, i, mask)
                bbox, prev_area[i] = _bbox(mask), int(mask.sum())
                if direction > 0 and z == start[i]:
                    start_state[i] = (bbox, prev_area[i])
                prompt_box[i] = next_prompt(i, bbox)


# ---- files -------------------------------------------------------------------------------------------
def read_times(path: Path | None) -> dict[str, float]:
    if not path or not path.is_file():
        return {}
    try:
        with open(path, newline="") as f:
            return {row["case"]: float(row["time"]) for row in csv.DictReader(f)}
    except (OSError, KeyError, ValueError):
        return {}  # an unreadable old CSV is replaced, not fatal


def write_times(path: Path, times: dict[str, float]) -> None:
    """The per-case `case,time` CSV (seconds), rewritten atomically after every case."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "time"])
        writer.writerows([name, f"{t:.4f}"] for name, t in sorted(times.items()))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_overlay(path: Path, case: Case, segs: np.ndarray) -> None:
    """A PNG of the image (3D: the slice with most labelled pixels) with the labels blended in colour."""
    if case.is_3d:
        z = int(np.argmax((segs > 0).reshape(len(segs), -1).sum(axis=1)))
        img, seg = case.imgs[z], segs[z]
    else:
        img, seg = case.imgs, segs
    base = (model_input(img)[0] * 255)  # normalised, padded 256² view: crop it back to the image
    nh, nw = data.resized_shape(img.shape[:2])
    base = cv2.resize(base[:nh, :nw], (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
    bgr = cv2.cvtColor(base.astype(np.uint8), cv2.COLOR_GRAY2BGR)
    hue = (seg.astype(np.int32) * 47 % 180).astype(np.uint8)  # 47: labels 1, 2, 3… get far-apart hues
    colour = cv2.cvtColor(np.stack([hue, np.full_like(hue, 255), np.full_like(hue, 255)], -1), cv2.COLOR_HSV2BGR)
    on = seg > 0
    bgr[on] = (0.5 * bgr[on] + 0.5 * colour[on]).astype(np.uint8)
    cv2.imwrite(str(path), bgr)


# ---- CLI ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Segment every challenge .npz case of INPUT_DIR into OUTPUT_DIR "
                                "(segs label maps). Exit code 0: all done, 1: some case failed, 2: could not run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", type=Path, metavar="INPUT_DIR",
                   help="folder of input .npz cases (imgs, boxes)")
    p.add_argument("-o", "--output", type=Path, metavar="OUTPUT_DIR",
                   help="folder for the output .npz (segs), created if missing")
    p.add_argument("-m", "--model", type=Path, default=DEFAULT_MODEL_DIR, metavar="MODEL_DIR",
                   help="model dir with encoder/decoder .xml/.bin (or .onnx for --backend onnxruntime)")
    p.add_argument("-b", "--block", type=int, default=DEFAULT_BLOCK, metavar="BLOCK",
                   help="max boxes per decoder call (bounds memory)")
    p.add_argument("--precision", choices=("f32", "bf16", "auto"), default="auto",
                   help="OpenVINO INFERENCE_PRECISION_HINT; auto = OpenVINO's default for this CPU")
    p.add_argument("--backend", choices=("openvino", "onnxruntime"), default="openvino", help="inference runtime")
    p.add_argument("--int8", choices=("auto", "on", "off"), default=os.environ.get("QMEDSAM_INT8", "auto"),
                   help="auto: the int8 IR where this CPU runs int8 fast (AVX-512 or VNNI), else the model dir's "
                        "fp32/ IR if it has one; on / off force either (env QMEDSAM_INT8)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="inference threads; none = the runtime's choice")
    p.add_argument("--3d-prompt", dest="prompt_3d", choices=PROMPT_3D_MODES, default=None,
                   help=f"how 3D boxes prompt each slice; default per modality {PROMPT_3D_BY_MODALITY}, "
                        f"else {PROMPT_3D_FALLBACK}")
    p.add_argument("--image-interp", choices=INTERP_CHOICES, default=None,
                   help="image resize to 256; default per modality from data.PREPROCESS_BY_MODALITY, else "
                        f"{data.PREPROCESS_FALLBACK['interp']}")
    p.add_argument("--norm-order", choices=("norm-then-pad", "pad-then-norm"), default=None,
                   help="min-max normalise before or after zero padding; default per modality (data.py), else "
                        f"{'norm-then-pad' if data.PREPROCESS_FALLBACK['norm_then_pad'] else 'pad-then-norm'}")
    p.add_argument("--mask-interp", choices=MASK_INTERPS, default=None,
                   help=f"upsampling of the 256² logits; default per modality, else {PIPELINE_FALLBACK['mask_interp']}")
    p.add_argument("--box-rounding", choices=data.BOX_ROUNDINGS, default=None,
                   help="boxes in 256 space: float, round, or floor/ceil outward; "
                        f"default {PIPELINE_FALLBACK['box_rounding']}")
    p.add_argument("--start-slice", choices=START_SLICES, default=None,
                   help="propagate/hybrid start: middle of the z-range or the slice of the largest box-prompted mask; "
                        f"default per modality, else {PIPELINE_FALLBACK['start_slice']}")
    p.add_argument("--margin-px", type=float, default=None, metavar="PX",
                   help="propagate/hybrid: grow propagated boxes by PX per side; "
                        f"default {PIPELINE_FALLBACK['margin_px']}")
    p.add_argument("--hybrid-ratio", type=float, default=None, metavar="R",
                   help="hybrid: fall back to the 3D box when the mask area drops below R × the previous slice's; "
                        f"default {PIPELINE_FALLBACK['min_area_ratio']}")
    p.add_argument("--z-sampling", choices=Z_SAMPLINGS, default=None,
                   help="3D: run the model on every slice, or adaptively (coarse grid refined where masks "
                        "change, the rest interpolated); default per modality, else "
                        f"{PIPELINE_FALLBACK['z_sampling']}")
    p.add_argument("--z-agree-iou", type=float, default=None, metavar="IOU",
                   help=f"adaptive: neighbouring masks agree at this IoU; default {PIPELINE_FALLBACK['z_agree_iou']}")
    p.add_argument("--z-max-gap", type=int, default=None, metavar="N",
                   help="adaptive: fill at most N slices between computed ones; "
                        f"default {PIPELINE_FALLBACK['z_max_gap']}")
    p.add_argument("--overlay", type=Path, default=None, metavar="DIR",
                   help="also write a PNG overlay per case into this folder")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output already exists")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar or info lines (warnings and errors still print)")
    p.add_argument("--times", type=str, default=None, metavar="CSV",
                   help="per-case seconds CSV (case,time); default <OUTPUT_DIR>_times.csv beside OUTPUT_DIR; '' = none")
    p.add_argument("--cache-dir", type=str, default=os.environ.get("QMEDSAM_CACHE_DIR", str(DEFAULT_CACHE_DIR)),
                   metavar="DIR", help="OpenVINO compiled-model cache folder (env QMEDSAM_CACHE_DIR); '' = no cache")
    p.add_argument("--seed-cache", type=Path, default=None, metavar="DIR",
                   help="compiled blobs to copy into an empty --cache-dir first (the Docker image's own cache)")
    p.add_argument("--compile-only", action="store_true",
                   help="only compile the model into --cache-dir and exit (the Docker build's ready cache)")
    p.add_argument("--timing", action="store_true",
                   help="print where the time went: imports, model ready, and per case read / segment / save")
    p.add_argument("--gts", type=Path, default=None, metavar="DIR",
                   help="folder of ground-truth npz (gts, spacing): print DSC/NSD per case and modality after "
                        "inference")
    args = p.parse_args(argv)
    if not args.compile_only and (args.input is None or args.output is None):
        p.error("-i/--input and -o/--output are required (unless --compile-only)")
    if args.block < 1:
        p.error("-b/--block must be ≥ 1")
    args.pipe = Pipeline(image_interp=args.image_interp,
                         norm_then_pad=None if args.norm_order is None else args.norm_order == "norm-then-pad",
                         mask_interp=args.mask_interp, box_rounding=args.box_rounding, prompt_3d=args.prompt_3d,
                         start_slice=args.start_slice, margin_px=args.margin_px, min_area_ratio=args.hybrid_ratio,
                         z_sampling=args.z_sampling, z_agree_iou=args.z_agree_iou, z_max_gap=args.z_max_gap)
    return args


class _Progress:
    """A tqdm bar over several cases when not quiet (imported only then: one container per case needs none)."""

    def __init__(self, todo: list[Path], quiet: bool) -> None:
        self.bar = None
        if not quiet and len(todo) > 1:
            from tqdm import tqdm
            self.bar = tqdm(total=len(todo), desc="infer", unit="case", file=sys.stderr, dynamic_ncols=True)

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def step(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    t_main = time.perf_counter()
    args = parse_args(argv)
    early: list[str] = []  # messages before the progress bar exists
    say = early.append
    if args.compile_only:
        try:
            model = load_model(args.model, args.backend, args.precision, args.threads, args.cache_dir or None,
                               int8=args.int8)
        except Exception as e:
            print(f"infer: error: cannot load the model from {args.model}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        print(f"infer: compiled {args.model} into {args.cache_dir or 'no cache'} "
              f"({'already cached' if getattr(model, 'from_cache', False) else 'compiled'})", file=sys.stderr)
        return 0

    in_dir, out_dir = args.input, args.output
    if not in_dir.is_dir():
        print(f"infer: error: input dir {in_dir} not found", file=sys.stderr)
        return 2
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # probe: fail once, here, not once per case
    except OSError as e:
        print(f"infer: error: cannot write to output dir {out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    times_path = Path(args.times) if args.times else None
    if args.times is None:
        resolved = out_dir.resolve()
        times_path = resolved.parent / f"{resolved.name}_times.csv"
    if args.overlay:
        args.overlay.mkdir(parents=True, exist_ok=True)

    entries = sorted(in_dir.iterdir())
    cases = [p for p in entries if p.name.endswith(".npz")]
    for p in entries:
        if not p.name.endswith(".npz") and not p.name.startswith(".") and not args.quiet:
            say(f"infer: {p.name}: ignored ({'a directory' if p.is_dir() else 'not an .npz file'})")
    todo = [p for p in cases if args.overwrite or not (out_dir / p.name).exists()]
    done_before = len(cases) - len(todo)

    # the model compiles in the background while the first case is read (OpenVINO releases the GIL)
    pool = ThreadPoolExecutor(max_workers=1)
    pending = pool.submit(load_model, args.model, args.backend, args.precision, args.threads,
                          args.cache_dir or None, args.seed_cache, args.int8) if todo else None
    progress = _Progress(todo, args.quiet)
    for msg in early:
        progress.say(msg)
    say = progress.say

    def info(msg: str) -> None:
        if not args.quiet:
            say(msg)

    model, t_ready = None, None
    times = read_times(times_path)
    n_ok, failed, steps = 0, [], []
    for path in todo:
        progress.step(path.name)
        t0 = time.perf_counter()
        try:
            if path.is_dir():
                raise CaseError("is a directory, not an npz file")
            case = load_case(path)
            if case.notes:
                say(f"infer: {path.name}: warning: " + "; ".join(case.notes))
            t_loaded = time.perf_counter()
            if model is None:
                try:
                    model = pending.result()
                except FileNotFoundError as e:
                    say(f"infer: error: {e}")
                    return 2
                except Exception as e:  # a corrupt IR, an unsupported op: one line, not a traceback
                    say(f"infer: error: cannot load the model from {args.model}: {type(e).__name__}: {e}")
                    return 2
                t_ready = time.perf_counter()
                cached = getattr(model, "from_cache", None)
                used = getattr(model, "model_dir", args.model)  # the fp32/ fallback on CPUs without fast int8
                info(f"infer: {args.backend} model {used}, inference precision {model.precision}"
                     f"{' (auto)' if args.precision == 'auto' and args.backend == 'openvino' else ''}, block "
                     f"{args.block}{'' if cached is None else ', compiled from cache' if cached else ', compiled'}")
                t_loaded = time.perf_counter()
            segs = segment_case(model, case, args.block, pipe=args.pipe)
            t_segmented = time.perf_counter()
            data.save_npz_atomic(out_dir / path.name, segs=segs)
            times[path.name] = time.perf_counter() - t0
            steps.append((path.name, t_loaded - t0, t_segmented - t_loaded, time.perf_counter() - t_segmented))
        except CaseError as e:
            say(f"infer: {path.name}: error: {e}: skipped")
            failed.append(path.name)
            continue
        except MemoryError:
            say(f"infer: {path.name}: error: out of memory (try a smaller -b): skipped")
            failed.append(path.name)
            continue
        except Exception as e:  # one bad case must not take the others down
            say(f"infer: {path.name}: error: {type(e).__name__}: {e}: skipped")
            failed.append(path.name)
            continue
        n_ok += 1
        if times_path:
            try:
                write_times(times_path, times)
            except OSError as e:
                say(f"infer: warning: cannot write times CSV {times_path}: {e.strerror or e}")
                times_path = None
        if args.overlay:
            try:
                write_overlay(args.overlay / f"{path.stem}.png", case, segs)
            except Exception as e:  # a picture must not fail a case that is already saved
                say(f"infer: {path.name}: warning: no overlay ({type(e).__name__}: {e})")
    progress.close()
    if model is None and pending is not None:
        try:  # every case failed before the model was needed: still report a model that cannot load
            model = pending.result()
        except Exception as e:
            say(f"infer: error: cannot load the model from {args.model}: {type(e).__name__}: {e}")
            return 2
    pool.shutdown(wait=False)

    summary = (f"infer: {len(cases)} cases: {n_ok} segmented, {done_before} already done"
               f"{' (--overwrite redoes them)' if done_before else ''}, {len(failed)} failed")
    if failed:
        say(summary + f": {', '.join(failed[:10])}{' …' if len(failed) > 10 else ''}")
    else:
        info(summary)
    if model is not None:
        info(f"infer: encoder calls {model.encoder_calls}, decoder calls {model.decoder_calls}")
    if args.timing:
        ready = (t_ready - t_main) if t_ready else float("nan")
        say(f"infer: timing: imports {t_main - _T_START:.3f} s, model ready {ready:.3f} s after them, "
            f"total {time.perf_counter() - _T_START:.3f} s")
        for name, load_s, seg_s, save_s in steps:
            say(f"infer: timing: {name}: read {load_s:.3f} s, segment {seg_s:.3f} s, save {save_s:.3f} s")

    if args.gts:
        try:
            import metrics  # lazily: scipy is only needed for this option
        except ImportError as e:
            say(f"infer: error: --gts needs metrics.py ({e})")
            return 2
        try:
            rows = metrics.evaluate_dirs(out_dir, args.gts)
        except Exception as e:
            say(f"infer: error: --gts {args.gts}: {type(e).__name__}: {e}")
            return 2
        for row in rows:  # per-case seconds (load → save) of this run, or of the run that made the output
            if row["case"] in times:
                row["time_s"] = times[row["case"]]
        print(metrics.format_table(rows, metrics.summarise(rows)))
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    # Every output is written and closed by now; skipping the interpreter's teardown (freeing the compiled
    # models, joining the runtime's threads) saves ~0.1 s of each challenge container.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
