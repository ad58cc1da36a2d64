import csv
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

import metrics


def _square(shape: tuple[int, int], top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:top + size, left:left + size] = True
    return mask


def _blobs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth random blobs: realistic surfaces with every neighbourhood configuration."""
    return ndimage.gaussian_filter(rng.random(shape), 1.2) > 0.52


# ---------------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------------
def test_dice_by_hand():
    gt = _square((12, 12), 2, 2, 4)
    pred = _square((12, 12), 2, 3, 4)  # shifted one column: overlap 4×3 = 12 of 16 + 16
    assert metrics.dice(gt, pred) == pytest.approx(2 * 12 / 32)
    assert metrics.dice(gt, gt) == 1.0
    assert metrics.dice(gt, np.zeros_like(gt)) == 0.0
    assert math.isnan(metrics.dice(np.zeros_like(gt), np.zeros_like(gt)))


def test_surfel_areas_by_hand():
    sx, sy, sz = 2.5, 0.7, 1.3
    iso, aniso = metrics.surfel_area_table((1.0, 1.0, 1.0)), metrics.surfel_area_table((sx, sy, sz))
    assert iso[0] == 0 and iso[255] == 0
    # one corner inside: a triangle on three edge midpoints, area vector (1/8, 1/8, 1/8)
    for bit in range(8):
        assert iso[1 << bit] == pytest.approx(math.sqrt(3) / 8)
        assert iso[255 - (1 << bit)] == pytest.approx(math.sqrt(3) / 8)
    assert aniso[128] == pytest.approx(math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 8)
    # the four corners with first index 0 (codes 128+64+32+16): a plane x = ½ of area sy·sz
    assert aniso[0b11110000] == pytest.approx(sy * sz)
    assert aniso[0b11001100] == pytest.approx(sx * sz)  # second index 0: plane y = ½
    assert aniso[0b10101010] == pytest.approx(sx * sy)  # third index 0: plane z = ½
    # corners (0,0,0),(0,0,1): a rectangle sz long, ½·√(sx²+sy²) wide
    assert aniso[128 + 64] == pytest.approx(sz * 0.5 * math.hypot(sx, sy))


def test_nsd_shifted_square():
    gt = _square((40, 40), 10, 10, 12)
    assert metrics.nsd(gt, gt, (1.0, 1.0)) == 1.0
    # 1 px shift: every surfel of one contour is within 1 px ≤ 2 mm of the other
    assert metrics.nsd(gt, _square((40, 40), 10, 11, 12), (1.0, 1.0)) == 1.0
    far = metrics.nsd(gt, _square((40, 40), 10, 15, 12), (1.0, 1.0))
    assert 0.0 < far < 1.0
    # the same 5 px shift is within a 6 mm tolerance, and within 2 mm at 0.4 mm pixels
    assert metrics.nsd(gt, _square((40, 40), 10, 15, 12), (1.0, 1.0), tolerance_mm=6.0) == 1.0
    assert metrics.nsd(gt, _square((40, 40), 10, 15, 12), (0.4, 0.4)) == 1.0
    # NSD is symmetric and 0 for disjoint far-apart masks
    pred = _square((40, 40), 13, 16, 9)
    assert metrics.nsd(gt, pred, (1.0, 1.0)) == pytest.approx(metrics.nsd(pred, gt, (1.0, 1.0)))
    assert metrics.nsd(_square((40, 40), 0, 0, 5), _square((40, 40), 30, 30, 5), (1.0, 1.0)) == 0.0
    # an empty prediction has no surface: nothing of gt's surface is matched
    assert metrics.nsd(gt, np.zeros_like(gt), (1.0, 1.0)) == 0.0
    assert math.isnan(metrics.nsd(np.zeros_like(gt), np.zeros_like(gt), (1.0, 1.0)))


def test_3d_spacing_is_per_axis():
    gt = np.zeros((10, 20, 20), bool)
    gt[3:7, 5:12, 5:12] = True
    pred = np.roll(gt, 3, axis=0)  # shifted 3 slices
    # 3 slices × 0.5 mm = 1.5 mm ≤ 2 mm; × 1 mm = 3 mm > 2 mm for the moved caps
    assert metrics.nsd(gt, pred, (0.5, 1.0, 1.0)) == 1.0
    assert metrics.nsd(gt, pred, (1.0, 1.0, 1.0)) < 1.0
    # the in-plane spacing does not rescue a through-plane shift
    assert metrics.nsd(gt, pred, (1.0, 0.1, 0.1)) < 1.0


# ---------------------------------------------------------------------------------------------------
# Case-level rules of the challenge
# ---------------------------------------------------------------------------------------------------
def test_nsd_zero_when_dsc_at_most_0p2():
    gts = _square((40, 40), 10, 10, 10).astype(np.uint8)
    segs = _square((40, 40), 10, 18, 10).astype(np.uint8)  # overlap 10×2 → DSC 40/200 = 0.2
    dsc, nsd = metrics.case_metrics(gts, segs, None, is_3d=False)
    assert dsc == pytest.approx(0.2) and nsd == 0.0
    assert metrics.nsd(gts == 1, segs == 1, (1.0, 1.0)) > 0  # NSD itself would not be 0
    segs = _square((40, 40), 10, 17, 10).astype(np.uint8)  # overlap 10×3 → DSC 0.3
    dsc, nsd = metrics.case_metrics(gts, segs, None, is_3d=False)
    assert dsc == pytest.approx(0.3) and nsd == pytest.approx(metrics.nsd(gts == 1, segs == 1, (1, 1)))


def test_2d_case_ignores_spacing_and_equals_a_one_slice_volume():
    rng = np.random.default_rng(3)
    gts = _blobs(rng, (48, 40)).astype(np.uint8)
    segs = np.roll(gts, 2, axis=1)
    dsc2, nsd2 = metrics.case_metrics(gts, segs, (5.0, 5.0, 5.0), is_3d=False)
    assert dsc2 > 0.2
    assert metrics.case_metrics(gts, segs, None, is_3d=False) == (dsc2, nsd2)
    dsc3, nsd3 = metrics.case_metrics(gts[..., None], segs[..., None], (1.0, 1.0, 1.0), is_3d=True)
    assert (dsc3, nsd3) == pytest.approx((dsc2, nsd2))
    # 3D uses the spacing it is given
    _, nsd_fine = metrics.case_metrics(gts[None], segs[None], (1.0, 0.5, 0.5), is_3d=True)
    assert nsd_fine > nsd2
    with pytest.raises(ValueError):
        metrics.case_metrics(gts[None], segs[None], None, is_3d=True)


def test_multi_label_mean_and_label_rule():
    gts = np.zeros((30, 30), np.uint8)
    gts[2:10, 2:10] = 1
    gts[15:25, 15:25] = 2
    segs = np.where(gts == 1, 1, 0).astype(np.uint8)  # label 1 perfect, label 2 missed
    dsc, nsd = metrics.case_metrics(gts, segs, None, is_3d=False)
    assert dsc == pytest.approx(0.5) and nsd == pytest.approx(0.5)
    # a label only in segs is not scored; the challenge's np.unique(gts)[1:] drops the first value
    segs[26:29, 26:29] = 3
    assert metrics.case_metrics(gts, segs, None, is_3d=False) == (dsc, nsd)
    no_bg = np.where(gts == 2, 2, 1).astype(np.uint8)  # labels {1, 2}: label 1 is skipped
    assert metrics.case_metrics(no_bg, np.where(no_bg == 2, 2, 0), None, is_3d=False) == (1.0, 1.0)


def test_case_without_labels_and_summary_skip_nan():
    empty = np.zeros((16, 16), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty-slice RuntimeWarning
        dsc, nsd = metrics.case_metrics(empty, empty, None, is_3d=False)
    assert math.isnan(dsc) and nsd == 0.0
    rows = [dict(case="2DBox_CT_a.npz", modality="CT", dsc=0.8, nsd=0.6),
            dict(case="2DBox_CT_b.npz", modality="CT", dsc=float("nan"), nsd=0.0),
            dict(case="3DBox_MR_c.npz", modality="MR", dsc=0.4, nsd=0.2)]
    summary = metrics.summarise(rows)
    assert summary["CT"] == dict(dsc=pytest.approx(0.8), nsd=pytest.approx(0.3), n=2)
    assert summary["overall"]["dsc"] == pytest.approx(0.6)
    assert summary["overall"]["nsd"] == pytest.approx(0.8 / 3)
    table = metrics.format_table(rows, summary)
    assert "3DBox_MR_c.npz" in table and "overall" in table


def test_modality_comes_from_the_file_name():
    assert metrics.modality_of("/x/3DBox_CT_liver_12.npz") == "CT"
    assert metrics.modality_of("2DBox_XRay_0001.npz") == "X-Ray"  # data.py maps aliases to challenge names


# ---------------------------------------------------------------------------------------------------
# Directories and CLI
# ---------------------------------------------------------------------------------------------------
def test_evaluate_dirs_and_cli(tmp_path, capsys):
    gts_dir, seg_dir = tmp_path / "gts", tmp_path / "segs"
    gts_dir.mkdir()
    seg_dir.mkdir()
    rng = np.random.default_rng(4)
    gts2 = _blobs(rng, (40, 36)).astype(np.uint8)
    gts3 = _blobs(rng, (6, 30, 30)).astype(np.uint8) * 2
    np.savez(gts_dir / "2DBox_XRay_0.npz", gts=gts2, imgs=np.zeros((40, 36, 3), np.uint8))
    np.savez(seg_dir / "2DBox_XRay_0.npz", segs=np.roll(gts2, 1, axis=0))
    np.savez(gts_dir / "3DBox_CT_0.npz", gts=gts3, spacing=np.array([3.0, 0.8, 0.8]))
    np.savez(seg_dir / "3DBox_CT_0.npz", segs=np.roll(gts3, 1, axis=2))
    np.savez(seg_dir / "3DBox_CT_orphan.npz", segs=gts3)  # no ground truth: skipped
    rows = metrics.evaluate_dirs(seg_dir, gts_dir)
    assert [r["case"] for r in rows] == ["2DBox_XRay_0.npz", "3DBox_CT_0.npz"]
    assert (rows[1]["dsc"], rows[1]["nsd"]) == metrics.case_metrics(
        gts3, np.roll(gts3, 1, axis=2), (3.0, 0.8, 0.8), is_3d=True)
    assert rows[0]["modality"] == "X-Ray" and rows[1]["modality"] == "CT"
    out_csv = tmp_path / "m.csv"
    metrics.main(["--segs", str(seg_dir), "--gts", str(gts_dir), "--csv", str(out_csv)])
    printed = capsys.readouterr().out
    assert "3DBox_CT_0.npz" in printed and "overall" in printed
    with open(out_csv) as f:
        read = list(csv.DictReader(f))
    assert [float(r["dsc"]) for r in read] == pytest.approx([r["dsc"] for r in rows])


# ---------------------------------------------------------------------------------------------------
# Parity with DeepMind's surface-distance (test-only reference, PyPI `surface-distance`)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing_mm", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.7), (0.7, 2.5, 1.3), (5.0, 1.0, 0.3)])
def test_surfel_table_equals_reference(spacing_mm):
    sd = pytest.importorskip("surface_distance")
    ref = sd.lookup_tables.create_table_neighbour_code_to_surface_area(spacing_mm)
    np.testing.assert_allclose(metrics.surfel_area_table(spacing_mm), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dims", [2, 3])
def test_random_masks_equal_reference(dims):
    sd = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(dims)
    for trial in range(8):
        if dims == 2:  # the challenge's 2D path: H×W×1 with spacing (1, 1, 1)
            shape, spacing = (36, 30, 1), (1.0, 1.0, 1.0)
        else:
            shape, spacing = (10, 24, 20), tuple(rng.uniform(0.3, 3.0, 3))
        gt = _blobs(rng, shape)
        pred = gt ^ (rng.random(shape) < 0.05) if trial % 2 else _blobs(rng, shape)
        ref_sd = sd.compute_surface_distances(gt, pred, spacing)
        for tolerance in (1.0, 2.0):
            ref_nsd = sd.compute_surface_dice_at_tolerance(ref_sd, tolerance)
            assert metrics.nsd(gt, pred, spacing, tolerance) == pytest.approx(ref_nsd, abs=1e-6)
        assert metrics.dice(gt, pred) == pytest.approx(sd.compute_dice_coefficient(gt, pred), abs=1e-12)


def test_edt_and_kdtree_distances_agree_with_reference():
    sd = pytest.importorskip("surface_distance")
    rng = np.random.default_rng(7)
    shape, spacing = (12, 64, 48), (2.5, 0.8, 0.8)
    gt = ndimage.gaussian_filter(rng.random(shape), 3.0) > 0.5
    pred = np.roll(gt, (1, 2, -1), axis=(0, 1, 2)) ^ (rng.random(shape) < 0.01)
    ref = sd.compute_surface_distances(gt, pred, spacing)  # sorted by distance
    full = metrics.surface_distances(gt, pred, spacing)
    near = metrics.surface_distances(gt, pred, spacing, max_distance_mm=2.0)
    for key, areas in (("distances_gt_to_pred", "surfel_areas_gt"), ("distances_pred_to_gt", "surfel_areas_pred")):
        np.testing.assert_allclose(np.sort(full[key]), ref[key], rtol=0, atol=1e-9)
        assert full[areas].sum() == pytest.approx(ref[areas].sum(), rel=1e-12)
        within = full[key] <= 2.0
        assert 0 < within.sum() < len(within)  # both sides of the tolerance are exercised
        np.testing.assert_array_equal(near[key][within], full[key][within])
        assert np.isinf(near[key][~within]).all()
