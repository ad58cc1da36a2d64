"""tools/phantoms.py: synthetic challenge cases whose labels, boxes and layout are what the tests and
benchmarks built on them assume."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
from tools import phantoms

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind,shape,n", [("2D", (200, 300), 5), ("2D", (512, 512), 255), ("3D", (12, 64, 80), 4),
                                          ("3D", (24, 96, 96), 8)])
def test_synthetic_case_labels_match_boxes(kind, shape, n):
    c = phantoms.make_synthetic_case(kind, shape, n, seed=11)
    imgs, gts, boxes = c["imgs"], c["gts"], c["boxes"]
    assert imgs.dtype == np.uint8 and gts.dtype == np.uint8
    assert imgs.shape == (tuple(shape) + (3,) if kind == "2D" else tuple(shape))
    assert gts.shape == tuple(shape) and boxes.shape == (n, 4 if kind == "2D" else 6)
    assert set(np.unique(gts).tolist()) == set(range(n + 1))
    for i in range(n):
        where = np.argwhere(gts == i + 1)  # (y, x) or (z, y, x)
        lo, hi = where.min(0), where.max(0)
        if kind == "2D":
            assert boxes[i].tolist() == [lo[1], lo[0], hi[1], hi[0]]
        else:
            assert boxes[i].tolist() == [lo[2], lo[1], lo[0], hi[2], hi[1], hi[0]]
            assert np.array_equal(np.flatnonzero((gts == i + 1).any(axis=(1, 2))), np.arange(lo[0], hi[0] + 1))
        inside, outside = imgs[gts == i + 1].mean(), imgs[gts == 0].mean()
        assert abs(inside - outside) > 5 or n > 100  # objects are visible against the background
    if kind == "3D":
        assert boxes[:, 2].max() <= boxes[:, 5].min()  # all z-ranges overlap


def test_synthetic_case_limits():
    with pytest.raises(ValueError, match="n_objects"):
        phantoms.make_synthetic_case("2D", (512, 512), 256)
    big = phantoms.make_synthetic_case("2D", (3024, 4032), 2, "Endoscopy", seed=0)
    assert big["imgs"].shape == (3024, 4032, 3) and big["boxes"].shape == (2, 4)


def test_write_synthetic_set_layout_is_atomic_and_loadable(tmp_path):
    paths = phantoms.write_synthetic_set(tmp_path, n2d=2, n3d=1, seed=0)
    assert [p.name for p in paths] == ["2DBox_Endoscopy_synth_0000.npz", "2DBox_X-Ray_synth_0001.npz",
                                       "3DBox_CT_synth_0002.npz"]
    names = sorted(p.name for p in paths)
    assert sorted(os.listdir(tmp_path / "gts")) == sorted(os.listdir(tmp_path / "imgs")) == names
    assert not [f for f in os.listdir(tmp_path / "imgs") if f.startswith(".")]  # no temporary files left
    for p in paths:
        case = data.load_case(p)
        assert set(case) == {"imgs", "boxes", "spacing"}
        gts = data.load_case(p, labels_path=data.find_labels(p))["gts"]
        assert gts.max() == len(case["boxes"])
    again = tmp_path / "again"
    phantoms.write_synthetic_set(again, n2d=2, n3d=1, seed=0)
    for p in paths:
        assert np.array_equal(np.load(p)["imgs"], np.load(again / "imgs" / p.name)["imgs"])
    index = data.SliceIndex(tmp_path / "imgs")
    assert index.modalities() == ["CT", "X-Ray", "Endoscopy"] and index.n_unlabelled_files == 0


def test_cli_synth(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tools.phantoms", "synth", "--out", str(tmp_path), "--n2d", "1",
                          "--n3d", "1", "--seed", "2"], cwd=REPO, capture_output=True,
                          encoding="utf-8", errors="replace")
    assert out.returncode == 0, out.stderr
    assert len(data.find_cases(tmp_path)) == 2 and len(os.listdir(tmp_path / "gts")) == 2


def test_bench_set_cases_have_the_promised_content():
    kinds = {(k, tuple(s), n) for k, _, s, n in phantoms.BENCH_CASES}
    assert ("3D", (64, 512, 512), 6) in kinds and ("2D", (3024, 4032), 3) in kinds
    kind, mod, shape, n = next(c for c in phantoms.BENCH_CASES if c[0] == "2D" and c[3] >= 120)
    many = phantoms.make_synthetic_case(kind, shape, n, mod, seed=1)
    assert len(many["boxes"]) == n >= 120 and many["gts"].max() == n
    ct = phantoms.make_synthetic_case("3D", (64, 512, 512), 6, "CT", seed=0)
    z0, z1 = ct["boxes"][:, 2], ct["boxes"][:, 5]
    assert z0.max() < z1.min() and (z1 - z0 >= 8).all()  # six objects sharing a common z-range
