"""infer.py against the oracle model (tests/oracle_model.py), whose outputs are exactly computable:
pipeline results are compared with label maps built independently from data.py + the numpy oracle.

Also the bad-input catalogue: one generated file per case, all in one input folder run
once, then one test per file (message, segmented or skipped, content), plus the exit code.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import data
import infer
import oracle_model
from tools import phantoms

REPO = Path(__file__).resolve().parents[1]


# ---- fixtures and references -------------------------------------------------------------------------
def run(oracle_dir: Path, *argv) -> int:
    """infer.main in-process on the oracle model, no compiled-model cache."""
    return infer.main([*map(str, argv), "-m", str(oracle_dir), "--cache-dir", "", "--precision", "f32"])


ROUNDING = infer.PIPELINE_FALLBACK["box_rounding"]  # the references map boxes as the shipped pipeline does


def reference_segs(img2d: np.ndarray, boxes_xy) -> np.ndarray:
    """Label map from the numpy oracle, box by box; overlap: the higher label wins. None = no box."""
    segs = np.zeros(img2d.shape[:2], np.uint8)
    for i, box in enumerate(boxes_xy):
        if box is not None:
            mask = oracle_model.reference_mask(img2d, box, ROUNDING)
            segs[mask & (segs < i + 1)] = i + 1
    return segs


def reference_propagate(vol: np.ndarray, box6, mode: str, ratio: float = infer.HYBRID_MIN_AREA_RATIO) -> np.ndarray:
    """One 3D box, propagate/hybrid, written from the description (not from infer.py): bool D×H×W."""
    x0, y0, z0, x1, y1, z1 = box6
    box_xy = np.array([x0, y0, x1, y1], float)
    out = np.zeros(vol.shape, bool)
    mid = (z0 + z1) // 2
    mid_mask = None
    for zs in (range(mid, z1 + 1), range(mid - 1, z0 - 1, -1)):
        prompt, prev_area = box_xy, 0
        if zs.start == mid - 1:
            prompt, prev_area = (data.box_from_mask(mid_mask), mid_mask.sum()) if mid_mask.any() else (None, 0)
            if prompt is None and mode == "hybrid":
                prompt = box_xy
        for z in zs:
            if prompt is None:
                break
            mask = oracle_model.reference_mask(vol[z], prompt, ROUNDING)
            if mode == "hybrid" and not np.array_equal(prompt, box_xy) and (
                    not mask.any() or mask.sum() < ratio * prev_area):
                mask = oracle_model.reference_mask(vol[z], box_xy, ROUNDING)
            out[z] = mask
            if z == mid:
                mid_mask = mask
            prev_area = mask.sum()
            prompt = data.box_from_mask(mask) if mask.any() else (box_xy if mode == "hybrid" else None)
    return out


def save(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def segs_of(path: Path) -> np.ndarray:
    with np.load(path) as f:
        return f["segs"]


def synthetic_2d(shape=(96, 128), n=3, seed=0):
    case = phantoms.make_synthetic_case("2D", shape, n, "Endoscopy", seed=seed)
    return case["imgs"], case["boxes"]


# The propagation references below grow no margin around propagated boxes and start on the middle slice;
# the shipped default margin may differ, so these tests ask for the reference's knobs explicitly.
BASELINE_PROPAGATION = infer.Pipeline(margin_px=0.0, start_slice="middle")


# ---- the pipeline ------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [1, 2, 16])
def test_2d_matches_reference_and_blocks(model, block):
    imgs, boxes = synthetic_2d((150, 203), n=5, seed=1)
    case = infer.repair_case("2DBox_Endoscopy_t.npz", imgs, boxes)
    calls = model.encoder_calls, model.decoder_calls
    segs = infer.segment_case(model, case, block=block)
    expected = reference_segs(imgs, boxes)
    assert expected.any() and segs.dtype == np.uint8 and segs.shape == imgs.shape[:2]
    np.testing.assert_array_equal(segs, expected)
    assert model.encoder_calls - calls[0] == 1
    assert model.decoder_calls - calls[1] == -(-len(boxes) // block)


def test_overlap_higher_label_wins(model):
    """Two overlapping boxes on an all-bright image: the overlap carries the later box's label,
    in 2D and in 3D propagate (where the boxes are written in different sweeps)."""
    img = np.full((64, 64), 200, np.uint8)
    img[0, 0] = 0  # min-max needs a range
    a, b = [4, 4, 40, 40], [20, 20, 60, 60]
    for boxes in ([a, b], [b, a]):
        segs = infer.segment_case(model, infer.repair_case("2DBox_X_t.npz", img, np.array(boxes)))
        assert (segs[25:38, 25:38] == 2).all()  # the overlap
        own = (6, 6) if boxes[0] == a else (55, 55)  # a pixel of the first box only
        assert segs[own] == 1
    vol = np.repeat(img[None], 9, axis=0)
    boxes3 = np.array([[4, 4, 0, 40, 40, 8], [20, 20, 0, 60, 60, 2]])  # box 2's middle is below box 1's
    alone = [infer.segment_case(model, infer.repair_case("3DBox_X_t.npz", vol, b[None]),
                                pipe=infer.Pipeline(prompt_3d="propagate")) > 0
             for b in boxes3]
    segs = infer.segment_case(model, infer.repair_case("3DBox_X_t.npz", vol, boxes3),
                              pipe=infer.Pipeline(prompt_3d="propagate"))
    assert (alone[0] & alone[1]).sum() > 100
    np.testing.assert_array_equal(segs, np.where(alone[1], 2, np.where(alone[0], 1, 0)))


def phantom_3d(depth=10, hw=(64, 80)):
    """A bright square that shrinks to nothing at both ends, and a bright distractor far away."""
    vol = np.full((depth, *hw), 30, np.uint8)
    for z in range(depth):
        r = [0, 0, 4, 7, 10, 10, 8, 5, 0, 0][z % 10]
        if r:
            vol[z, 30 - r:30 + r, 30 - r:30 + r] = 220
    far = [z for z in range(depth) if abs(z - (depth - 1) // 2) >= 2]
    vol[far, 50:60, 62:74] = 220  # a distractor inside the 3D box, away from the object and the middle
    return vol


def test_3d_box_mode_counts_one_encoder_call_per_slice(model):
    vol = phantom_3d(12)
    boxes = np.array([[10, 10, 2, 78, 62, 5], [10, 10, 4, 78, 62, 8], [0, 0, 10, 20, 20, 10]])
    case = infer.repair_case("3DBox_CT_t.npz", vol, boxes)
    calls = model.encoder_calls
    segs = infer.segment_case(model, case, block=2, pipe=infer.Pipeline(prompt_3d="box"))
    assert model.encoder_calls - calls == len(set(range(2, 9)) | {10})  # slices with boxes, not slices × boxes
    expected = np.zeros_like(segs)
    for z in range(12):
        expected[z] = reference_segs(vol[z], [b[[0, 1, 3, 4]] if b[2] <= z <= b[5] else None for b in boxes])
    np.testing.assert_array_equal(segs, expected)


@pytest.mark.parametrize("mode", ["propagate", "hybrid"])
def test_3d_propagation_matches_description(model, mode):
    vol = phantom_3d(10)
    box = np.array([10, 10, 0, 78, 62, 9])
    case = infer.repair_case("3DBox_CT_t.npz", vol, box[None])
    calls = model.encoder_calls
    segs = infer.segment_case(model, case, pipe=replace(BASELINE_PROPAGATION, prompt_3d=mode))
    calls = model.encoder_calls - calls
    expected = reference_propagate(vol, box, mode)
    np.testing.assert_array_equal(segs == 1, expected)
    box_mode = infer.segment_case(model, case, pipe=infer.Pipeline(prompt_3d="box"))
    assert box_mode[[0, 1, 2, 6, 7, 8, 9], 52, 66].all()  # the fixed box also takes the distractor…
    if mode == "propagate":
        assert not segs[5:, 52, 66].any()  # …propagation leaves it after the middle slice
        # it stops where the object vanishes: slices 4..8 up, 3..1 down, never 0 or 9
        assert calls == 8
        assert not segs[0].any() and not segs[9].any()


def test_hybrid_falls_back_where_propagation_loses_the_object(model):
    """The object jumps to a new place on slice 6: propagation (prompted by slice 5's bbox) finds
    nothing and stops; hybrid falls back to the 3D box and keeps segmenting it."""
    vol = np.full((10, 64, 80), 30, np.uint8)
    for z in range(10):
        x = 10 if z < 6 else 50
        vol[z, 20:34, x:x + 14] = 220
    box = np.array([5, 15, 0, 70, 40, 9])
    case = infer.repair_case("3DBox_CT_t.npz", vol, box[None])
    prop = infer.segment_case(model, case, pipe=replace(BASELINE_PROPAGATION, prompt_3d="propagate"))
    hyb = infer.segment_case(model, case, pipe=replace(BASELINE_PROPAGATION, prompt_3d="hybrid"))
    assert prop[:6, 25, 15].all() and not prop[6:].any()
    assert hyb[:, 25, 15].tolist() == [1] * 6 + [0] * 4 and hyb[6:, 25, 55].all()
    np.testing.assert_array_equal(hyb == 1, reference_propagate(vol, box, "hybrid"))


def test_hybrid_falls_back_when_the_mask_shrinks(model):
    """From slice 6 only a small dot stays where the object was (area ratio ≪ 0.5) and the object
    moves: propagation follows the dot; hybrid re-prompts with the 3D box and finds the object too."""
    vol = np.full((10, 64, 80), 30, np.uint8)
    for z in range(10):
        if z < 6:
            vol[z, 20:34, 10:24] = 220
        else:
            vol[z, 25:29, 15:19] = 220  # the dot
            vol[z, 20:34, 50:64] = 220  # the object, moved
    box = np.array([5, 15, 0, 70, 40, 9])
    case = infer.repair_case("3DBox_CT_t.npz", vol, box[None])
    prop = infer.segment_case(model, case, pipe=replace(BASELINE_PROPAGATION, prompt_3d="propagate"))
    hyb = infer.segment_case(model, case, pipe=replace(BASELINE_PROPAGATION, prompt_3d="hybrid"))
    assert prop[6:, 26, 16].all() and not prop[6:, 25, 55].any()
    assert hyb[6:, 26, 16].all() and hyb[6:, 25, 55].all()
    np.testing.assert_array_equal(hyb == 1, reference_propagate(vol, box, "hybrid"))


def test_per_modality_default_table(monkeypatch):
    monkeypatch.setitem(infer.PROMPT_3D_BY_MODALITY, "PET", "hybrid")
    pet = infer.repair_case("3DBox_PET_t.npz", np.zeros((3, 8, 8), np.uint8), np.array([[0, 0, 0, 4, 4, 2]]))
    other = infer.repair_case("3DBox_Weird_t.npz", np.zeros((3, 8, 8), np.uint8), np.array([[0, 0, 0, 4, 4, 2]]))
    assert infer.resolve_pipeline(pet).prompt_3d == "hybrid"
    assert infer.resolve_pipeline(pet, infer.Pipeline(prompt_3d="box")).prompt_3d == "box"
    assert infer.resolve_pipeline(other).prompt_3d == infer.PROMPT_3D_FALLBACK


@pytest.mark.parametrize("modality", ["CT", "MR", "PET", "Weird"])
def test_shipped_3d_defaults_reach_segment_case(model, monkeypatch, modality):
    """The shipped table as infer.py applies it to a case named 3DBox_<Modality>_…: the 3D prompt mode and
    the z-sampling of the resolved pipeline are the ones segment_3d runs (adaptive: fewer encoder calls)."""
    depth = 30
    vol = _volume_with([(z, 48, 48, 20 + z / 6) for z in range(depth)], depth)
    case = infer.repair_case(f"3DBox_{modality}_t.npz", vol, np.array([[10, 10, 0, 86, 86, depth - 1]]))
    pipe = infer.resolve_pipeline(case)
    assert pipe.prompt_3d == infer.PROMPT_3D_BY_MODALITY.get(modality, infer.PROMPT_3D_FALLBACK)
    assert pipe.z_sampling == infer.PIPELINE_FALLBACK["z_sampling"] and pipe.image_interp == "area/linear"
    seen = _encoded_slices(monkeypatch)
    infer.segment_case(model, case)
    assert (len(seen) < depth) == (pipe.z_sampling == "adaptive")


# ---- the CLI: files, reruns, CSV, backends, messages ----------------------------------------------------
def test_cli_outputs_times_rerun_overwrite(oracle_dir, tmp_path, capsys):
    imgs, boxes = synthetic_2d(seed=2)
    save(tmp_path / "in" / "2DBox_Endoscopy_a.npz", imgs=imgs, boxes=boxes)
    vol = phantom_3d(6)
    save(tmp_path / "in" / "3DBox_CT_b.npz", imgs=vol, boxes=np.array([[10, 10, 1, 78, 62, 4]]), spacing=np.ones(3))
    out = tmp_path / "out"
    assert run(oracle_dir, "-i", tmp_path / "in", "-o", out) == 0
    err = capsys.readouterr().err
    assert "inference precision f32" in err and "2 segmented" in err and "3DBox_CT_b.npz" in err  # bar shows names
    assert sorted(p.name for p in out.iterdir()) == ["2DBox_Endoscopy_a.npz", "3DBox_CT_b.npz"]  # nothing else
    np.testing.assert_array_equal(segs_of(out / "2DBox_Endoscopy_a.npz"), reference_segs(imgs, boxes))
    assert segs_of(out / "3DBox_CT_b.npz").shape == vol.shape
    times = (tmp_path / "out_times.csv").read_text().splitlines()
    assert times[0] == "case,time" and [t.split(",")[0] for t in times[1:]] == ["2DBox_Endoscopy_a.npz",
                                                                                "3DBox_CT_b.npz"]
    assert all(float(t.split(",")[1]) > 0 for t in times[1:])

    stamp = (out / "2DBox_Endoscopy_a.npz").stat().st_mtime_ns
    assert run(oracle_dir, "-i", tmp_path / "in", "-o", out, "-q") == 0
    assert capsys.readouterr().err == ""  # -q: silent when all is well
    assert (out / "2DBox_Endoscopy_a.npz").stat().st_mtime_ns == stamp  # done cases are skipped
    assert run(oracle_dir, "-i", tmp_path / "in", "-o", out, "--overwrite", "--times", "") == 0
    assert (out / "2DBox_Endoscopy_a.npz").stat().st_mtime_ns != stamp
    assert "2 segmented" in capsys.readouterr().err


def test_failed_write_leaves_no_partial_file(oracle_dir, tmp_path, capsys, monkeypatch):
    imgs, boxes = synthetic_2d()
    save(tmp_path / "in" / "2DBox_X_a.npz", imgs=imgs, boxes=boxes)
    save(tmp_path / "in" / "2DBox_X_b.npz", imgs=imgs, boxes=boxes)
    real, calls = data.npformat.write_array, []

    def dies_half_way(f, array, *args, **kwargs):  # the second case writes some bytes, then fails like a full disk
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x93NUMPY partial")
            raise OSError(28, "No space left on device")
        real(f, array, *args, **kwargs)
    monkeypatch.setattr(data.npformat, "write_array", dies_half_way)
    assert run(oracle_dir, "-i", tmp_path / "in", "-o", tmp_path / "out", "-q") == 1
    err = capsys.readouterr().err
    assert "2DBox_X_b.npz: error: OSError: [Errno 28] No space left on device: skipped" in err
    assert "1 failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["2DBox_X_a.npz"]  # no tmp, no torn b


def test_onnxruntime_backend_agrees(oracle_dir, tmp_path):
    imgs, boxes = synthetic_2d(seed=3)
    save(tmp_path / "in" / "2DBox_X_a.npz", imgs=imgs, boxes=boxes)
    save(tmp_path / "in" / "3DBox_CT_b.npz", imgs=phantom_3d(6), boxes=np.array([[10, 10, 1, 78, 62, 4]]))
    for backend in ("openvino", "onnxruntime"):
        assert run(oracle_dir, "-i", tmp_path / "in", "-o", tmp_path / backend, "-q", "--backend", backend) == 0
    for name in ("2DBox_X_a.npz", "3DBox_CT_b.npz"):
        np.testing.assert_array_equal(segs_of(tmp_path / "openvino" / name), segs_of(tmp_path / "onnxruntime" / name))


def test_missing_model_dir_says_how_to_make_one(tmp_path, capsys):
    save(tmp_path / "in" / "2DBox_X_a.npz", imgs=np.zeros((8, 8, 3), np.uint8), boxes=np.array([[0, 0, 4, 4]]))
    rc = infer.main(["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "nomodel")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "python export.py" in err and "nomodel" in err


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_output_dir(oracle_dir, tmp_path, capsys, where):
    save(tmp_path / "in" / "2DBox_X_a.npz", imgs=np.zeros((8, 8, 3), np.uint8), boxes=np.array([[0, 0, 4, 4]]))
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out" if where == "under_a_file" else Path("/proc/qmedsam_out")
    assert run(oracle_dir, "-i", tmp_path / "in", "-o", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"infer: error: cannot write to output dir {out}")


def test_gts_prints_metrics(oracle_dir, tmp_path, capsys):
    case = phantoms.make_synthetic_case("2D", (96, 128), 2, "Endoscopy", seed=4)
    data.write_challenge_case(tmp_path / "set", "2DBox_Endoscopy_t_0001.npz", case)
    assert run(oracle_dir, "-i", tmp_path / "set" / "imgs", "-o", tmp_path / "out", "-q",
               "--gts", tmp_path / "set" / "gts") == 0
    table = capsys.readouterr().out
    assert "2DBox_Endoscopy_t_0001.npz" in table and "overall" in table and "DSC" in table


def test_overlay_png(oracle_dir, tmp_path):
    imgs, boxes = synthetic_2d(seed=5)
    save(tmp_path / "in" / "2DBox_X_a.npz", imgs=imgs, boxes=boxes)
    assert run(oracle_dir, "-i", tmp_path / "in", "-o", tmp_path / "out", "-q", "--overlay", tmp_path / "png") == 0
    import cv2
    png = cv2.imread(str(tmp_path / "png" / "2DBox_X_a.png"))
    assert png.shape == imgs.shape


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_inference_path_imports_no_torch(oracle_dir, tmp_path, backend):
    """Run infer.py as a script in a fresh interpreter; list sys.modules at exit."""
    save(tmp_path / "in" / "2DBox_X_a.npz", imgs=np.zeros((8, 8, 3), np.uint8), boxes=np.array([[0, 0, 4, 4]]))
    argv = ["infer.py", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(oracle_dir),
            "-q", "--cache-dir", "", "--backend", backend]
    code = ("import json, os, runpy, sys\n"
            "def _exit(code):\n    raise SystemExit(code)\n"
            "os._exit = _exit  # infer.py ends with os._exit; here it must return to list the modules\n"
            f"sys.argv = {argv!r}\n"
            "try:\n    runpy.run_path('infer.py', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print(json.dumps([rc, sorted(m.split('.')[0] for m in sys.modules)]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=120)
    rc, modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rc == 0, proc.stderr
    assert not {"torch", "brevitas", "torchvision", "scipy", "onnx"} & set(modules)
    assert ("onnxruntime" in modules) == (backend == "onnxruntime")
    assert ("openvino" in modules) == (backend == "openvino")


# ---- the bad-input catalogue ----------------------------------------------------------------------
IMG, BOXES = synthetic_2d((96, 128), n=3, seed=7)
GREY = IMG[:, :, 0]
VOL = phantom_3d(5)
BOX3 = np.array([[10, 10, 1, 78, 62, 3]])


def _255_boxes():
    img = np.full((256, 256), 200, np.uint8)
    img[255, 255] = 0
    boxes = np.array([[16 * (k % 16), 16 * (k // 16), 16 * (k % 16) + 12, 16 * (k // 16) + 12] for k in range(255)])
    return img, boxes


def _nan_img():
    img = IMG.astype(np.float32)
    img[5:9, 5:9] = np.nan
    img[40, 40:50] = np.inf
    img[41, 40:50] = -np.inf
    return img


def _nan_img_repaired():
    img = _nan_img()
    fin = img[np.isfinite(img)]
    return np.nan_to_num(img, nan=fin.min(), posinf=fin.max(), neginf=fin.min())


B_OUT = np.array([[10, 10, 60, 50], [200, 150, 260, 190]])  # box 1 wholly outside the 128×96 image
PARTLY = np.array([[100, 60, 180, 140]])
NEG = np.array([[-20, -10, 30, 40]])
FLOATS = np.array([[10.4, 5.7, 60.2, 70.9], [33.3, 20.1, 120.6, 90.2]])

# name → (arrays written or raw bytes, expected line regex or None, expected segs or None if skipped / callable)
CATALOGUE = {
    "2DBox_Cat_missing_imgs.npz": (dict(boxes=BOXES), r"error: missing array 'imgs' \(has: boxes\): skipped", None),
    "2DBox_Cat_missing_boxes.npz": (dict(imgs=IMG), r"error: missing array 'boxes' \(has: imgs\): skipped", None),
    "2DBox_Cat_float_out_of_range.npz": (dict(imgs=IMG * 3.7 - 100.0, boxes=BOXES),
                                         rf"warning: imgs dtype float64 \(range {IMG.min() * 3.7 - 100:.4g}\.\."
                                         rf"{IMG.max() * 3.7 - 100:.4g}, expected uint8\): min-max normalised",
                                         reference_segs(IMG, BOXES)),
    "2DBox_Cat_int16.npz": (dict(imgs=IMG.astype(np.int16) * 10 - 500, boxes=BOXES),
                            r"warning: imgs dtype int16 .*min-max normalised", reference_segs(IMG, BOXES)),
    "2DBox_Cat_bool.npz": (dict(imgs=IMG > 100, boxes=BOXES), r"warning: imgs is bool: used as 0/255",
                           reference_segs((IMG > 100).astype(np.uint8) * 255, BOXES)),
    "2DBox_Cat_nan_inf.npz": (dict(imgs=_nan_img(), boxes=BOXES),
                              rf"warning: imgs has {(~np.isfinite(_nan_img())).sum()} NaN/inf values: "
                              r"replaced by the finite min/max",
                              reference_segs(_nan_img_repaired(), BOXES)),
    "2DBox_Cat_all_nan.npz": (dict(imgs=np.full((8, 8, 3), np.nan), boxes=BOXES[:1]),
                              r"error: imgs has no finite values \(all NaN/inf\): skipped", None),
    "2DBox_Cat_grey.npz": (dict(imgs=GREY, boxes=BOXES), None, reference_segs(GREY, BOXES)),
    "2DBox_Cat_rgba.npz": (dict(imgs=np.dstack([IMG, np.arange(IMG[..., 0].size, dtype=np.uint8)
                                                .reshape(IMG.shape[:2])]), boxes=BOXES),
                           r"warning: imgs is H×W×4 \(RGBA\): alpha ignored", reference_segs(IMG, BOXES)),
    "2DBox_Cat_two_channels.npz": (dict(imgs=IMG[..., :2], boxes=BOXES),
                                   r"error: imgs has shape \(96, 128, 2\): expected H×W×3 \(2D\) or D×H×W \(3D\): "
                                   r"skipped", None),
    "3DBox_Cat_4d.npz": (dict(imgs=np.zeros((2, 3, 4, 5), np.uint8), boxes=BOX3),
                         r"error: imgs has shape \(2, 3, 4, 5\)", None),
    "3DBox_Cat_one_slice.npz": (dict(imgs=VOL[2:3], boxes=np.array([[10, 10, 0, 78, 62, 0]])), None,
                                reference_segs(VOL[2], [[10, 10, 78, 62]])[None]),
    "3DBox_Cat_one_slice_boxes4.npz": (dict(imgs=VOL[2:3], boxes=np.array([[10, 10, 78, 62]])),
                                       r"warning: boxes are N×4 for a one-slice volume: used on slice 0",
                                       reference_segs(VOL[2], [[10, 10, 78, 62]])[None]),
    "3DBox_Cat_boxes4.npz": (dict(imgs=VOL, boxes=np.array([[10, 10, 78, 62]])),
                             r"error: boxes are N×4 \(x0,y0,x1,y1\) but imgs is a 3D volume of 5 slices: need N×6",
                             None),
    "3DBox_Cat_z_reversed_outside.npz": (dict(imgs=VOL, boxes=np.array([[10, 10, 9, 78, 62, 2]])),
                                         r"warning: box 0 has z1 < z0: corners swapped; "
                                         r"box 0 is partly outside the image: clipped",
                                         np.stack([reference_segs(VOL[z], [[10, 10, 78, 62]] if z >= 2 else [None])
                                                   for z in range(5)])),
    "2DBox_Cat_boxes6.npz": (dict(imgs=IMG, boxes=np.insert(BOXES, [2, 4], 0, axis=1)),
                             r"warning: boxes are N×6 \(x0,y0,z0,x1,y1,z1\) for a 2D image: z ignored",
                             reference_segs(IMG, BOXES)),
    "2DBox_Cat_boxes5.npz": (dict(imgs=IMG, boxes=np.zeros((2, 5))), r"error: boxes have shape \(2, 5\)", None),
    "2DBox_Cat_reversed.npz": (dict(imgs=IMG, boxes=BOXES[:, [2, 3, 0, 1]]),
                               r"warning: boxes 0, 1, 2 have x1 < x0/y1 < y0: corners swapped",
                               reference_segs(IMG, BOXES)),
    "2DBox_Cat_zero_area.npz": (dict(imgs=IMG, boxes=np.array([[30, 30, 30, 60], *BOXES])),
                                r"warning: box 0 has zero width or height: segmented as given",
                                reference_segs(IMG, [[30, 30, 30, 60], *BOXES])),
    "2DBox_Cat_outside.npz": (dict(imgs=IMG, boxes=B_OUT),
                              r"warning: box 1 lies wholly outside the image: not segmented",
                              reference_segs(IMG, [B_OUT[0], None])),
    "2DBox_Cat_partly_outside.npz": (dict(imgs=IMG, boxes=PARTLY),
                                     r"warning: box 0 is partly outside the image: clipped",
                                     reference_segs(IMG, [[100, 60, 128, 96]])),
    "2DBox_Cat_negative.npz": (dict(imgs=IMG, boxes=NEG), r"warning: box 0 is partly outside the image: clipped",
                               reference_segs(IMG, [[0, 0, 30, 40]])),
    "2DBox_Cat_nan_box.npz": (dict(imgs=IMG, boxes=np.array([[np.nan, 1, 5, 5], *BOXES])),
                              r"warning: box 0 has NaN/inf coordinates: not segmented",
                              reference_segs(IMG, [None, *BOXES])),
    "2DBox_Cat_float_boxes.npz": (dict(imgs=IMG, boxes=FLOATS), None, reference_segs(IMG, FLOATS)),
    "2DBox_Cat_zero_boxes.npz": (dict(imgs=IMG, boxes=np.zeros((0, 4))), r"warning: no boxes: wrote an empty label map",
                                 np.zeros(IMG.shape[:2], np.uint8)),
    "2DBox_Cat_255_boxes.npz": (dict(imgs=_255_boxes()[0], boxes=_255_boxes()[1]), None, reference_segs(*_255_boxes())),
    "2DBox_Cat_256_boxes.npz": (dict(imgs=_255_boxes()[0], boxes=np.concatenate([_255_boxes()[1], [[0, 0, 5, 5]]])),
                                r"warning: 256 boxes but a uint8 label map holds 255: boxes 255\.\. not segmented",
                                reference_segs(*_255_boxes())),
    "2DBox_Cat_4032x3024.npz": (lambda: dict(imgs=phantoms.make_synthetic_case("2D", (3024, 4032), 3, "Endoscopy",
                                                                               seed=8)["imgs"],
                                             boxes=np.array([[0, 0, 4031, 3023], [100, 200, 1500, 1800],
                                                             [2000, 100, 4000, 3000]])),
                                None, "big"),
    "2DBox_Cat_truncated.npz": (b"truncated",
                                r"error: not a readable \.npz \(not a zip archive: truncated or another format\): "
                                r"skipped", None),
    "2DBox_Cat_not_zip.npz": (b"hello, I am text", r"error: not a readable \.npz \(not a zip archive", None),
    "2DBox_Cat_dir.npz": ("dir", r"error: is a directory, not an npz file: skipped", None),
}
IGNORED = ["notes.txt", "subdir"]


@pytest.fixture(scope="module")
def catalogue_run(oracle_dir, tmp_path_factory):
    """Write every catalogue file into one input folder, run infer.main once (not quiet) on it."""
    root = tmp_path_factory.mktemp("catalogue")
    inp = root / "in"
    inp.mkdir()
    for name, (content, _, _) in CATALOGUE.items():
        if content == "dir":
            (inp / name).mkdir()
        elif isinstance(content, bytes) and content == b"truncated":
            full = save(root / "full.npz", imgs=IMG, boxes=BOXES).read_bytes()
            (inp / name).write_bytes(full[: len(full) // 2])
        elif isinstance(content, bytes):
            (inp / name).write_bytes(content)
        else:
            save(inp / name, **(content() if callable(content) else content))
    (inp / "notes.txt").write_text("not a case")
    (inp / "subdir").mkdir()
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = run(oracle_dir, "-i", inp, "-o", root / "out")
    lines = [ln for ln in buf.getvalue().replace("\r", "\n").splitlines() if ln.startswith("infer: ")]
    return rc, lines, root / "out", inp


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_catalogue(catalogue_run, name):
    rc, lines, out, inp = catalogue_run
    _, pattern, expected = CATALOGUE[name]
    mine = [ln for ln in lines if ln.startswith(f"infer: {name}: ")]
    if pattern is None:
        assert mine == [], mine  # clean input: no message
    else:
        import re
        assert len(mine) == 1, lines  # one line per bad case, naming the file
        assert re.search(pattern, mine[0]), mine[0]
    if expected is None:
        assert not (out / name).exists()
        assert mine[0].endswith(": skipped")
    else:
        segs = segs_of(out / name)
        if isinstance(expected, str):  # the 4032×3024 case: computed here, from the file itself
            with np.load(inp / name) as f:
                expected = reference_segs(f["imgs"], f["boxes"])
            assert segs.shape == (3024, 4032) and set(np.unique(expected)) == {0, 1, 2, 3}
            np.testing.assert_array_equal(segs, expected)
        else:
            assert segs.dtype == np.uint8
            np.testing.assert_array_equal(segs, expected)


def test_catalogue_exit_code_and_summary(catalogue_run):
    rc, lines, out, inp = catalogue_run
    n_skipped = sum(1 for _, _, e in CATALOGUE.values() if e is None)
    assert rc == 1
    summary = [ln for ln in lines if "cases:" in ln]
    assert summary and f"{len(CATALOGUE)} cases: {len(CATALOGUE) - n_skipped} segmented, 0 already done, " \
                       f"{n_skipped} failed" in summary[-1]
    for name in IGNORED:
        assert any(ln.startswith(f"infer: {name}: ignored") for ln in lines)
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n, (_, _, e) in CATALOGUE.items() if e is not None)


@pytest.mark.parametrize("encoder_batch", [None, 1, 3])
def test_static_encoder_batch_gives_the_same_embedding(oracle_dir, encoder_batch):
    """infer.py compiles the encoder with a static batch (faster in OpenVINO); the embedding is the same
    function of the image, and a static batch-1 encoder rejects a batch of 2 instead of guessing."""
    net = infer.OpenVINOModel(oracle_dir, precision="f32", cache_dir=None, encoder_batch=encoder_batch)
    images = np.random.default_rng(3).random((encoder_batch or 2, 3, 256, 256), dtype=np.float32)
    np.testing.assert_array_equal(net.encode(images), oracle_model.encode_np(images))
    shape = net.encoder.inputs[0].get_partial_shape()
    assert shape.is_static == (encoder_batch is not None)
    if encoder_batch == 1:
        with pytest.raises(RuntimeError):
            net.encode(np.zeros((2, 3, 256, 256), np.float32))


# ---- the compiled-model cache (one container per case keeps only the output folder) --------------------
def test_cache_survives_a_half_written_blob_and_seeds_an_empty_cache(oracle_dir, tmp_path):
    cache, seed = tmp_path / "outputs" / ".qmedsam_cache", tmp_path / "image_cache"
    first = infer.OpenVINOModel(oracle_dir, precision="f32", cache_dir=seed)
    assert not first.from_cache and len(list(seed.glob("*.blob"))) == 2
    seeded = infer.OpenVINOModel(oracle_dir, precision="f32", cache_dir=cache, seed_cache_dir=seed)
    assert seeded.from_cache  # the image's ready cache, copied into the empty run cache, is used
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in seed.iterdir())
    for blob in cache.glob("*.blob"):  # a container killed while writing leaves truncated blobs
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 3])
    again = infer.OpenVINOModel(oracle_dir, precision="f32", cache_dir=cache, seed_cache_dir=seed)
    assert not again.from_cache  # recompiled, not crashed, and the seed does not overwrite a used cache
    image = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    np.testing.assert_array_equal(again.encode(image), first.encode(image))
    assert infer.OpenVINOModel(oracle_dir, precision="f32", cache_dir=cache).from_cache  # rewritten whole


def test_cli_cache_in_a_hidden_output_subfolder_and_compile_only(oracle_dir, tmp_path, capsys):
    imgs, boxes = synthetic_2d(seed=5)
    save(tmp_path / "in" / "2DBox_Endoscopy_a.npz", imgs=imgs, boxes=boxes)
    out, cache = tmp_path / "out", tmp_path / "out" / ".qmedsam_cache"
    argv = ["-i", tmp_path / "in", "-o", out, "-m", oracle_dir, "--precision", "f32", "--cache-dir", cache,
            "--timing"]
    assert infer.main([*map(str, argv)]) == 0
    err = capsys.readouterr().err
    assert ", compiled" in err and "compiled from cache" not in err and "timing: imports" in err
    assert sorted(p.name for p in out.glob("*.npz")) == ["2DBox_Endoscopy_a.npz"]  # the cache is not a result
    assert infer.main([*map(str, argv), "--overwrite"]) == 0
    assert "compiled from cache" in capsys.readouterr().err
    assert infer.main(["--compile-only", "-m", str(oracle_dir), "--cache-dir", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "c").glob("*.blob"))) == 2
    with pytest.raises(SystemExit):
        infer.main(["-o", str(out)])  # -i is needed for a real run


# ---- adaptive z-sampling ---------------------------------------------------------------------------------
def _volume_with(discs: list[tuple[int, float, float, float]], depth: int, hw=(96, 96)) -> np.ndarray:
    """A dark volume with bright discs (z, cy, cx, r): what the oracle segments inside a box."""
    vol = np.zeros((depth, *hw), np.uint8)
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    for z, cy, cx, r in discs:
        vol[z][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 255
    return vol


def _encoded_slices(monkeypatch) -> list[int]:
    """Record the z of every encoder call segment_3d makes."""
    seen: list[int] = []
    real = infer._Volume.embed

    def embed(self, z):
        seen.append(int(z))
        return real(self, z)
    monkeypatch.setattr(infer._Volume, "embed", embed)
    return seen


ADAPTIVE = infer.Pipeline(z_sampling="adaptive", z_agree_iou=0.9, z_max_gap=4, margin_px=2.0, start_slice="middle")


@pytest.mark.parametrize("mode", ["box", "propagate", "hybrid"])
def test_adaptive_reproduces_a_smoothly_changing_object_with_far_fewer_encoder_calls(model, monkeypatch, mode):
    depth = 60
    # the disc grows from radius 24 to 30 and back while its centre drifts: a shape that changes along z,
    # slowly enough for neighbouring slices to agree
    discs = [(z, 96 + 3 * np.sin(z / 10), 80 + z / 10, 24 + 6 * np.sin(np.pi * z / (depth - 1))) for z in range(depth)]
    vol = _volume_with(discs, depth, (192, 192))
    case = infer.repair_case("3DBox_CT_t.npz", vol, np.array([[5, 5, 0, 186, 186, depth - 1]]))
    seen = _encoded_slices(monkeypatch)
    every = infer.segment_case(model, case, pipe=replace(ADAPTIVE, prompt_3d=mode, z_sampling="every"))
    n_every = len(seen)
    seen.clear()
    adaptive = infer.segment_case(model, case, pipe=replace(ADAPTIVE, prompt_3d=mode))
    dsc = 2 * np.count_nonzero(every & adaptive) / (np.count_nonzero(every) + np.count_nonzero(adaptive))
    print(f"{mode}: encoder calls every {n_every}, adaptive {len(seen)}; DSC vs every slice {dsc:.4f}")
    assert dsc >= 0.99 and len(seen) <= 0.5 * n_every
    assert len(set(seen)) == len(seen)  # no slice encoded twice


@pytest.mark.parametrize("gap", [1, 2, 3, 4])
def test_adaptive_finds_gaps_and_blobs_or_misses_them_only_as_stated(model, monkeypatch, gap):
    """A gap in an object and a separate blob, each `gap` ≤ z_max_gap slices long, at every offset to the
    coarse grid: either found (same masks as every slice) or missed only where segment_3d says it can be:
    inside one run of ≤ z_max_gap slices strictly between two computed slices that agree."""
    depth, step = 25, ADAPTIVE.z_max_gap + 1
    for offset in range(1, step + 1):
        lo = 8 + offset
        gap_discs = [(z, 48, 48, 14) for z in range(depth) if not lo <= z < lo + gap]  # a hole in a column
        blob_discs = [(z, 48, 48, 14) for z in (0, depth - 1)] + [(z, 40, 52, 9) for z in range(lo, lo + gap)]
        for discs in (gap_discs, blob_discs):
            case = infer.repair_case("3DBox_CT_t.npz", _volume_with(discs, depth),
                                     np.array([[20, 20, 0, 80, 80, depth - 1]]))
            every = infer.segment_case(model, case, pipe=replace(ADAPTIVE, prompt_3d="box", z_sampling="every"))
            seen = _encoded_slices(monkeypatch)
            adaptive = infer.segment_case(model, case, pipe=replace(ADAPTIVE, prompt_3d="box"))
            monkeypatch.undo()
            wrong = [z for z in range(depth) if (every[z] != adaptive[z]).sum() > 0.02 * max(1, every[z].sum())]
            computed = sorted(set(seen))
            assert not set(wrong) & set(computed)  # a computed slice is always the model's own answer
            if wrong:  # one missed run, inside a single interval between two computed slices
                assert wrong == list(range(wrong[0], wrong[-1] + 1)) and len(wrong) <= ADAPTIVE.z_max_gap
                below = max(z for z in computed if z < wrong[0])
                above = min(z for z in computed if z > wrong[-1])
                assert above - below <= step
                assert infer.masks_agree(adaptive[below] > 0, adaptive[above] > 0, ADAPTIVE.z_agree_iou)


def test_adaptive_encodes_a_slice_once_for_all_its_boxes(model, monkeypatch):
    depth = 30
    discs = [(z, 30, 30, 10) for z in range(depth)] + [(z, 66, 66, 10) for z in range(5, depth)]
    case = infer.repair_case("3DBox_CT_t.npz", _volume_with(discs, depth),
                             np.array([[15, 15, 0, 45, 45, depth - 1], [51, 51, 5, 81, 81, depth - 1]]))
    seen = _encoded_slices(monkeypatch)
    segs = infer.segment_case(model, case, pipe=replace(ADAPTIVE, prompt_3d="box"))
    assert len(seen) == len(set(seen)) < depth  # shared slices (the boxes' grids overlap) encoded once
    assert {1, 2} <= set(np.unique(segs))


def test_interpolated_masks_move_between_the_two_shapes():
    """What gets filled is the space between two agreeing masks (adaptive sampling only interpolates
    those): a disc that grows and shifts a little passes smoothly from one to the other."""
    yy, xx = np.mgrid[:96, :96]
    a = (yy - 40) ** 2 + (xx - 40) ** 2 <= 20 ** 2
    b = (yy - 44) ** 2 + (xx - 46) ** 2 <= 24 ** 2
    mids = list(infer.interpolate_masks(a, b, 3))
    areas = [int(m.sum()) for m in mids]
    assert len(mids) == 3 and a.sum() < areas[0] < areas[1] < areas[2] < b.sum()
    centres = [np.argwhere(m).mean(axis=0) for m in mids]
    assert 40 < centres[0][0] < centres[1][0] < centres[2][0] < 44
    assert 40 < centres[0][1] < centres[1][1] < centres[2][1] < 46
    assert not any(m.any() for m in infer.interpolate_masks(np.zeros_like(a), np.zeros_like(a), 2))


@pytest.mark.parametrize("flags, cap, expected", [
    ({"avx2", "avx512bw", "avx512_vnni"}, "", True),    # this machine: AVX-512 VNNI
    ({"avx2", "avx512bw"}, "", True),                   # Skylake-SP/W: AVX-512 without VNNI, int8 still faster
    ({"avx2", "avx_vnni"}, "", True),                   # Alder Lake and later laptops: VEX VNNI
    ({"avx2", "fma"}, "", False),                       # plain AVX2: int8 measured slower than fp32
    ({"avx2", "avx512bw", "avx512_vnni"}, "AVX2", False),
    ({"avx2", "avx512bw", "avx512_vnni"}, "avx2", False),
    ({"avx2", "avx512bw", "avx512_vnni"}, "AVX512_CORE", True),
    ({"avx2", "avx512bw", "avx512_vnni"}, "AVX2_VNNI", False),  # the cap leaves no VNNI this CPU has
    ({"avx2", "avx_vnni"}, "AVX2_VNNI", True),
])
def test_int8_pays_follows_cpu_flags_and_the_onednn_cap(flags, cap, expected):
    assert infer.int8_pays(flags, cap) is expected


def test_choose_model_dir_falls_back_to_fp32_only_when_there_is_one(tmp_path, monkeypatch):
    (tmp_path / "encoder.xml").touch()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert infer.choose_model_dir(tmp_path) == tmp_path  # no fp32/: the int8 model, slow or not
    (tmp_path / "fp32").mkdir()
    (tmp_path / "fp32" / "encoder.xml").touch()
    assert infer.choose_model_dir(tmp_path) == tmp_path / "fp32"
    assert infer.choose_model_dir(tmp_path, "on") == tmp_path
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert infer.choose_model_dir(tmp_path, "off") == tmp_path / "fp32"
