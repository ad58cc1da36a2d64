"""tools/build_devset.py: its readers on files written here, the per-modality tune/check split, and the
committed dev set against the challenge format."""
from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

import data
from tools import build_devset as bd

DEVSET = Path(__file__).resolve().parents[1] / "devset"


def test_tiff_raw_reader_reads_every_sample(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8)
    path = tmp_path / "x.tif"
    assert cv2.imwrite(str(path), img, [cv2.IMWRITE_TIFF_COMPRESSION, 1])  # uncompressed strips
    np.testing.assert_array_equal(bd.read_tiff_raw(path.read_bytes()), img[:, :, ::-1])  # RGB order


def _dicom(values: np.ndarray, z_mm: float, spacing=(0.7, 0.8), slope=1.0, intercept=-1024.0) -> bytes:
    """A minimal explicit-VR little-endian DICOM slice with the tags read_dicom needs."""
    def el(group, elem, vr, value: bytes) -> bytes:
        if len(value) % 2:
            value += b" "
        if vr in (b"OW", b"OB", b"SQ", b"UN"):
            return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value
    meta = el(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1\x00")
    body = (el(0x0018, 0x0050, b"DS", b"1.5") + el(0x0020, 0x0032, b"DS", f"0\\0\\{z_mm}".encode())
            + el(0x0020, 0x0037, b"DS", b"1\\0\\0\\0\\1\\0") + el(0x0028, 0x0002, b"US", struct.pack("<H", 1))
            + el(0x0028, 0x0010, b"US", struct.pack("<H", values.shape[0]))
            + el(0x0028, 0x0011, b"US", struct.pack("<H", values.shape[1]))
            + el(0x0028, 0x0030, b"DS", f"{spacing[0]}\\{spacing[1]}".encode())
            + el(0x0028, 0x0100, b"US", struct.pack("<H", 16)) + el(0x0028, 0x0103, b"US", struct.pack("<H", 0))
            + el(0x0028, 0x1052, b"DS", str(intercept).encode()) + el(0x0028, 0x1053, b"DS", str(slope).encode())
            + el(0x7FE0, 0x0010, b"OW", values.astype("<u2").tobytes()))
    return b"\x00" * 128 + b"DICM" + meta + body


def test_dicom_series_reader_sorts_rescales_and_measures_spacing():
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 3000, (4, 6, 5)).astype(np.uint16)
    order = [2, 0, 3, 1]  # files in a scrambled order: the reader sorts along the slice normal
    vol, spacing = bd.read_dicom_series([_dicom(stored[k], z_mm=10.0 + 2.5 * k) for k in order])
    np.testing.assert_array_equal(vol, stored.astype(np.float32) - 1024)
    np.testing.assert_allclose(spacing, [0.8, 0.7, 2.5])  # (x, y, z): PixelSpacing is (row, column)


def test_split_deals_every_source_into_both_halves():
    pins = bd.read_pins()
    halves = bd.assign_halves(bd.CASES, pins)
    assert halves == bd.assign_halves(list(reversed(bd.CASES)), pins)  # independent of the table's order
    by_source = Counter((c.modality, c.name.split("_")[2], halves[c.name]) for c in bd.CASES if c.name in halves)
    for (modality, source, half), n in by_source.items():
        other = by_source[(modality, source, "check" if half == "tune" else "tune")]
        assert abs(n - other) <= 1, (modality, source)
    per_modality = Counter(c.modality for c in bd.CASES if c.name in halves)
    assert all(n >= 12 for n in per_modality.values()) and "OCT" not in per_modality


def test_committed_dev_set_is_challenge_format_and_matches_the_split():
    split = data.read_split(DEVSET)
    labelled = sorted(p.name[:-4] for p in (DEVSET / "gts").glob("*.npz"))
    assert labelled and set(labelled) <= set(split)
    for name in labelled:
        with np.load(DEVSET / "imgs" / f"{name}.npz") as f, np.load(DEVSET / "gts" / f"{name}.npz") as g:
            arrays = {"imgs": f["imgs"], "gts": g["gts"], "boxes": f["boxes"]}
            if "spacing" in f.files:
                arrays["spacing"] = f["spacing"]
            np.testing.assert_array_equal(f["boxes"], g["boxes"])
        bd.check_case(name, arrays)


def test_no_case_reads_a_reserved_patient():
    pins = bd.read_pins()
    for case in bd.CASES:
        paths = [p.path + p.member for key in [case.image] + case.label_keys for p in pins[key]]
        assert paths and not any(r in p for p in paths for r in bd.RESERVED), case.name
