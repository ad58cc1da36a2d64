"""Build the dev set: public images with manual labels, pinned in public GitHub repositories → challenge npz.

Every raw file is pinned in devset/pins.csv by (key, repository, commit, path, sha256[, zip member]) and
read straight out of a fetched snapshot (a bare git dir, default /work/.mirror/<owner>+<name>/repo) with
`git --git-dir … show <commit>:<path>`; a hash mismatch stops the build. Nothing is downloaded here.

Output (challenge layout; native resolution: no image is resized unless its masks live on another grid):
  devset/imgs/<name>.npz       imgs (2D H×W×3 / 3D D×H×W uint8), boxes (N×4 / N×6), spacing (3D)
  devset/gts/<name>.npz        gts (uint8 label map, label i+1 ↔ box i), boxes, spacing (3D)
  devset/unlabeled/<name>.npz  imgs (+ spacing) from sources without usable masks (calibration, distillation)
  devset/manifest.csv          one row per case: source, commit, files, licence, what the label is, half
  devset/split.csv             name, modality, half (tune | check), local: the per-modality split
  demo/imgs, demo/gts          copies of DEMO_CASES, bundled for the README's demo command

The dev set is split per modality into a *tune* half (choose defaults, calibrate, train, select) and a
*check* half (confirm only; nothing is ever fitted or selected on it). Cases whose licence forbids
redistribution are marked local: they are built into the same folders on a machine that has the
snapshots, but .gitignore keeps them out of the repository.

Conventions (the challenge's): boxes are inclusive pixel bounds of each object's mask, 2D (x0, y0, x1,
y1), 3D (x0, y0, z0, x1, y1, z1); 3D `spacing` is the voxel size in mm in (x, y, z) order; CT is windowed
to soft tissue [-160, 240] HU, MR and PET are min-max scaled between the 0.5 and 99.5 percentiles of the
cropped volume; 2D images are kept as stored (16-bit ones min-max scaled, grey replicated to 3 channels).
Objects: each source label value is split into connected components; a component ≥ MIN_OBJECT_PIXELS and
≥ MIN_OBJECT_FRACTION of the largest component of that value is its own object (own label, own box);
smaller specks are set to 0, so every label has a box.

Run:  python -m tools.build_devset                     (all cases, split, manifest, demo copies)
      python -m tools.build_devset --only 3DBox_CT_sts_1 --mirror-root /path/to/mirrors
      python -m tools.build_devset --print-hashes       (sha256 of every pinned file, to check pins)
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as `python tools/build_devset.py`: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np
from scipy import ndimage

import data

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINS_CSV = os.path.join(REPO_DIR, "devset", "pins.csv")
RESERVED = ("STS_001", "STS_002", "STS_003", "A_0040", "B_3627", "D_4574")  # independent evaluation only

MIN_OBJECT_PIXELS = 20       # smaller components are annotation specks, not promptable objects
MIN_OBJECT_FRACTION = 0.05   # of the largest component of the same source label
CT_WINDOW_HU = (-160.0, 240.0)
PERCENTILES = (0.5, 99.5)
SPLIT_SEED = 0


# ---------------------------------------------------------------- sources --------------------------
@dataclass(frozen=True)
class Source:
    licence: str        # repository licence and the data's own terms, as read
    labels: str         # what the labels are and who drew them
    redistribute: bool  # False: built locally, never committed (.gitignore), never in demo/


SOURCES: dict[str, Source] = {
    "theibsi/data_sets": Source(
        "ibsi_validation/LICENSE.md: CC BY 3.0 Unported; cite Vallières et al. 2015 (TCIA Soft-tissue-Sarcoma, "
        "Phys. Med. Biol. 60:5471) and Clark et al. 2013 (TCIA)",
        "gross tumour volume (GTV_Mass) of a soft-tissue sarcoma of the extremities, expert contour; the same "
        "contour on CT, PET (SUV) and T1w MR (resampled to the CT grid by the IBSI preparation)", True),
    "WisnuMulya/hippocampal-volume-quantification": Source(
        "no repo licence; Medical Segmentation Decathlon Task04, CC BY-SA 4.0 (Simpson et al. 2019, "
        "Antonelli et al. 2022): derived npz carry the same licence",
        "hippocampus, 1 anterior and 2 posterior, manual tracings (Vanderbilt), T1w MR crop", True),
    "AIM-Harvard/pyradiomics": Source(
        "repo BSD-3-Clause; test images shipped with the library (origin of the labels not documented)",
        "tumour ROI of a brain / breast MR", True),
    "qk1512/IPCV_1": Source(
        "3D-IRCADb-01 (IRCAD), CC BY-NC-ND 4.0: adapted material may not be shared",
        "abdominal organs (liver, spleen, kidneys, adrenal gland, lung bases), manual, contrast CT 512×512", False),
    "alireza-da/TraumaDetectionProject": Source(
        "3D-IRCADb-01 (IRCAD), CC BY-NC-ND 4.0: adapted material may not be shared",
        "liver, manual, contrast CT 512×512", False),
    "DeepTrial/Optic-Disc-Unet": Source(
        "no repo licence; DRIONS-DB, research use (Carmona et al. 2008)",
        "optic disc, filled expert contour (lossy JPEG mask, values only near 0 and 255)", True),
    "sarah-antillia/TensorFlow-FlexUNet-Image-Segmentation-CDD-CESM-Mammogram": Source(
        "repo Apache-2.0 (code); CDD-CESM via TCIA, TCIA Data Usage Policy, cite Khaled et al. 2021 "
        "(doi:10.7937/29kw-ae92)",
        "breast lesion (mass / calcification) outline by the dataset's radiologists; the repo stores 512×512 "
        "resizes, horizontally flipped", True),
    "datascience-mobi-2022/2022-topic-01-team-04": Source(
        "no repo licence; NIH3T3 hand-segmented set of Coelho et al. 2009 (terms not stated)",
        "nuclei (Hoechst), binary hand segmentation: each connected component is one object", True),
    "McGregorWwww/UCTransNet": Source(
        "no repo licence; MoNuSeg, CC BY-NC-SA 4.0", "H&E nuclei, manual, binary", True),
    "mohit-aren/Breast_Cancer": Source(
        "no repo licence; BUSI (Al-Dhabyani et al. 2020), no licence text found",
        "breast lesion, manual mask by the dataset's radiologists", True),
    "suraj7974/Tensorflow-Keras-UNET-model-for-Fetal-dataset": Source(
        "no repo licence; HC18, CC BY 4.0 (van den Heuvel et al. 2018)",
        "fetal head, sonographer's ellipse outline (filled)", True),
    "pi-null-mezon/OpenIST": Source(
        "no repo licence; images from the chestx-ray.com teaching module, licence unknown",
        "lungs (left and right), masks from the repo (annotator not stated)", True),
    "AnishHota/JSRT-Segmentation": Source(
        "no repo licence; JSRT / SCR: redistribution prohibited",
        "right lung, left lung, heart: SCR manual masks (van Ginneken et al. 2006)", False),
    "chelseaparlett/SkinCancerVariation": Source(
        "no repo licence; PH2, research use (Mendonça et al. 2013)", "skin lesion, expert dermatologists", True),
    "ViniciusSimm/Colo-Retal-Induscon2023": Source(
        "no repo licence; Kvasir-SEG (Jha et al. 2020) and CVC-ClinicDB (Bernal et al. 2015): research and "
        "education use, no commercial use", "colon polyp, manual (original-size files of the older commit)", True),
    "ashkan-abbasi66/OCTseg-Zeiss": Source(
        "repo MIT; example B-scans of a proprietary set", "none used (retinal layer bands are not box prompts)",
        True),
    "spertuz/openbreast": Source("repo BSD-2-Clause; BCDR sample (research use, Lopez et al. 2012)", "none", True),
    "TongxinWang0405/BMI702_project": Source("no repo licence; BUSI images", "none (this copy has no masks)", True),
    "neurolabusc/niivue-images": Source("repo BSD-2-Clause; per-file sources in its README", "none", True),
}


# ---------------------------------------------------------------- cases ---------------------------
@dataclass
class Case:
    """One output case. `image` / `label` are pin keys (a key with several rows is a DICOM series);
    `label` is None for unlabelled cases, a list for binary masks stacked as labels 1, 2, … (later wins).
    `patient` names the distinct patient or image behind the case (one per case within a modality).

    `recipe`: "ct" | "mr" | "pet" (3D intensity mapping) | "rgb" (2D as stored).
    `options`: "crop" (y0, x0, h, w) before anything is measured; "value_map" {grey value: label};
    "fill_holes" for outline annotations; "decoder": "tiff_raw" for uncompressed TIFFs OpenCV misreads;
    "label_scale" k (masks on a k× coarser grid: nearest upsampling); "image_scale" f (image onto its
    mask grid, area resize); "z_step" k (3D: keep every k-th slice); "label_series" {label: key}."""
    name: str
    image: str
    label: str | list[str] | None
    recipe: str
    patient: str
    label_map: dict[int, int] | None = None
    mask_threshold: int | None = None
    z_margin: int = 5
    options: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return 3 if self.name.startswith("3D") else 2

    @property
    def modality(self) -> str:
        return data.modality_of(self.name + ".npz")

    @property
    def label_keys(self) -> list[str]:
        if self.label is None:
            return list(self.options.get("label_series", {}).values())
        return [self.label] if isinstance(self.label, str) else list(self.label)


def _sts(modality: str, recipe: str, patients: list[str]) -> list[Case]:
    tag = modality.lower()
    return [Case(f"3DBox_{modality}_sts_{i}", f"sts{p}_{tag}_img", f"sts{p}_{tag}_lbl", recipe, f"STS_{p}")
            for i, p in enumerate(patients, 1)]


def _ircad(i: int, patient: str, organs: dict[int, str], z_step: int = 2) -> Case:
    # 1.6 mm slices: every 2nd keeps the organs' shape and halves a 15 MB case
    return Case(f"3DBox_CT_ircad_{i}", f"ircad{patient}_img", None, "ct", f"3Dircadb1.{int(patient)}",
                options={"z_step": z_step, "label_series": {k: f"ircad{patient}_{o}" for k, o in organs.items()}})


_IRCAD_ORGANS = {1: "liver", 2: "spleen", 3: "rightkidney", 4: "leftkidney", 6: "rightlung", 7: "leftlung"}

CASES: list[Case] = (
    _sts("CT", "ct", ["022", "044", "005", "034", "031", "014", "004", "006", "028", "041", "025", "019"])
    + [_ircad(1, "01", _IRCAD_ORGANS), _ircad(2, "07", {**_IRCAD_ORGANS, 5: "leftsurrenalgland"}),
       _ircad(3, "17", {1: "liver"})]
    + _sts("PET", "pet", ["008", "042", "035", "012", "024", "015", "009", "020", "013", "046", "017", "007"])
    + _sts("MR", "mr", ["049", "027", "026", "032"])
    + [Case(f"3DBox_MR_hippocampus_{i}", f"hip{p}_img", f"hip{p}_lbl", "mr", f"MSD hippocampus_{p}")
       for i, p in enumerate(["004", "006", "007", "008", "011", "014"], 1)]
    + [Case(f"3DBox_MR_pyradiomics_{i}", f"prad_{k}_img", f"prad_{k}_lbl", "mr", f"pyradiomics {k}")
       for i, k in enumerate(["brain1", "brain2", "breast1"], 1)]
    + [Case(f"2DBox_Fundus_drions_{i}", f"drions{p}_img", f"drions{p}_lbl", "rgb", f"DRIONS image_{p}",
            mask_threshold=127)
       for i, p in enumerate(["001", "005", "012", "026", "040", "050", "060", "070", "080", "090", "100", "110"], 1)]
    + [Case(f"2DBox_Mammography_cddcesm_{i}", f"cesm_{p}_img", f"cesm_{p}_lbl", "rgb", f"CDD-CESM {p.upper()}",
            mask_threshold=127)
       for i, p in enumerate(["p121", "p132", "p137", "p139", "p149", "p152", "p181", "p190", "p191", "p65",
                              "p93", "p99"], 1)]
    + [Case(f"2DBox_Microscopy_nih3t3_{i}", f"nih3t3_{p}_img", f"nih3t3_{p}_lbl", "rgb", f"NIH3T3 dna-{p}",
            mask_threshold=127)
       for i, p in enumerate(["0", "1", "26", "28", "30", "31", "33", "40", "44", "47"], 1)]
    # MoNuSeg tiles hold ~700 nuclei; a 384×384 crop keeps the count under 255 labels
    + [Case(f"2DBox_Microscopy_monuseg_{i}", f"monuseg{i}_img", f"monuseg{i}_lbl", "rgb", f"MoNuSeg tile {i}",
            mask_threshold=127, options={"crop": (300, 300, 384, 384)}) for i in (1, 2, 3)]
    + [Case(f"2DBox_US_hc18_{i}", f"hc18_{p}_img", f"hc18_{p}_lbl", "rgb", f"HC18 {p}", mask_threshold=0,
            options={"fill_holes": True})
       for i, p in enumerate(["000", "001", "002", "003", "050", "210", "370", "450", "610", "770"], 1)]
    + [Case(f"2DBox_US_busi_{i}", f"busi_{p}_img", [f"busi_{p}_lbl"] + (["busi_b25_lbl1"] if p == "b25" else []),
            "rgb", f"BUSI {p}", mask_threshold=127)
       for i, p in enumerate(["b15", "b25", "b32", "b44", "m4", "m14", "m17", "m31"], 1)]
    + [Case(f"2DBox_XRay_openist_{i}", f"cxr{p}_img", f"cxr{p}_lbl", "rgb", f"OpenIST {p}", mask_threshold=127)
       for i, p in enumerate(["1", "10", "11", "12", "100-109", "120-129", "135-144", "147-156", "163-172",
                              "175-184", "186-195", "207-216"], 1)]
    # JSRT masks (SCR) are on a 1024 grid: the first case keeps the 2048² film (a large image), the others
    # bring the film onto the mask grid
    + [Case(f"2DBox_XRay_jsrt_{i}", f"jsrt_{p}_img", [f"jsrt_{p}_{o}" for o in ("right_lung", "left_lung", "heart")],
            "rgb", f"JSRT {p}", mask_threshold=127,
            options={"label_scale": 2} if i == 1 else {"image_scale": 0.5})
       for i, p in enumerate(["JPCLN010", "JPCLN050", "JPCLN100", "JPCLN150", "JPCNN010", "JPCNN040", "JPCNN070",
                              "JPCNN090"], 1)]
    + [Case(f"2DBox_Dermoscopy_ph2_{i}", f"ph2_{p}_img", f"ph2_{p}_lbl", "rgb", f"PH2 {p}", mask_threshold=127)
       for i, p in enumerate(["IMD002", "IMD003", "IMD004", "IMD006", "IMD085", "IMD211", "IMD405", "IMD013",
                              "IMD126", "IMD164", "IMD009", "IMD150"], 1)]
    + [Case(f"2DBox_Endoscopy_kvasir_{i}", f"kvasir_{p}_img", f"kvasir_{p}_lbl", "rgb", f"Kvasir-SEG {p}",
            mask_threshold=127)
       for i, p in enumerate(["cjyzul1qgg", "cju2htabev", "cju2zdvjn9", "cju1dia8hv", "cju5b9oyda", "cju7dlk532"], 1)]
    + [Case(f"2DBox_Endoscopy_cvcclinicdb_{i}", f"cvc_{p}_img", f"cvc_{p}_lbl", "rgb", f"CVC-ClinicDB frame {p}",
            mask_threshold=127, options={"decoder": "tiff_raw"})
       for i, p in enumerate(["60", "160", "240", "390", "520", "580"], 1)]
    # unlabelled: images for calibration and distillation only
    + [Case(f"2DBox_OCT_octsegzeiss_{i}", f"oct{i}_img", None, "rgb", f"OCTseg-Zeiss example {i}")
       for i in (1, 2, 3, 4)]
    + [Case("2DBox_Mammography_bcdr_1", "bcdr_251_334_LO", None, "rgb", "BCDR 251/334")]
    + [Case(f"2DBox_US_busiu_{i}", f"busi_{n}_img", None, "rgb", f"BUSI {n} (BMI702 copy)")
       for i, n in enumerate(("benign1", "benign2", "malignant1", "malignant2"), 1)]
    + [Case("3DBox_CT_niivue_1", "niivue_CT_AVM", None, "ct", "niivue CT_AVM"),
       Case("3DBox_CT_niivue_2", "niivue_CT_pitch", None, "ct", "niivue CT_pitch"),
       Case("3DBox_MR_niivue_1", "niivue_MR_Gd", None, "mr", "niivue MR_Gd")]
)

# bundled for the README demo: redistributable, manually labelled, one per kind of input, ≈ 2 MB
DEMO_CASES: list[str] = ["3DBox_CT_sts_1", "3DBox_PET_sts_1", "3DBox_MR_hippocampus_1", "2DBox_Endoscopy_kvasir_3",
                         "2DBox_US_hc18_1", "2DBox_Fundus_drions_1"]


# ---------------------------------------------------------------- pinned raw files ----------------
@dataclass(frozen=True)
class Pin:
    repo: str
    commit: str
    path: str
    sha256: str
    member: str = ""  # a file inside the zip at `path` ("" = the blob itself)


def read_pins(path: str = PINS_CSV) -> dict[str, list[Pin]]:
    """key → its pinned files in order (one file, or the slices of a DICOM series)."""
    pins: dict[str, list[Pin]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            pins.setdefault(row["key"], []).append(Pin(row["repo"], row["commit"], row["path"], row["sha256"],
                                                       row.get("member") or ""))
    return pins


def git_dir(mirror_root: str, repo: str) -> str:
    """The bare git dir of a fetched snapshot of `repo` under mirror_root."""
    base = os.path.join(mirror_root, repo.replace("/", "+"))
    for cand in (os.path.join(base, "repo", ".git"), os.path.join(base, "repo"), base):
        if os.path.isfile(os.path.join(cand, "HEAD")):  # a git dir, bare or not
            return cand
    return base


class Blobs:
    """Pinned bytes out of fetched snapshots, each checked against its sha256 (zip members too)."""

    def __init__(self, mirror_root: str, pins: dict[str, list[Pin]]) -> None:
        self.root, self.pins = mirror_root, pins
        self._zips: dict[tuple[str, str, str], zipfile.ZipFile] = {}

    def _blob(self, repo: str, commit: str, path: str) -> bytes:
        gd = git_dir(self.root, repo)
        try:
            return subprocess.run(["git", "--git-dir", gd, "show", f"{commit}:{path}"],
                                  check=True, capture_output=True).stdout
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            err = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip()
            raise SystemExit(f"{gd}: cannot read {commit[:10]}:{path} ({err}); fetch {repo} first") from None

    def read_pin(self, pin: Pin, check: bool = True) -> bytes:
        if pin.member:
            zkey = (pin.repo, pin.commit, pin.path)
            if zkey not in self._zips:
                self._zips[zkey] = zipfile.ZipFile(io.BytesIO(self._blob(*zkey)))
            blob = self._zips[zkey].read(pin.member)
        else:
            blob = self._blob(pin.repo, pin.commit, pin.path)
        where = f"{pin.repo}:{pin.path}" + (f"!{pin.member}" if pin.member else "")
        if blob.startswith(b"version https://git-lfs"):
            raise SystemExit(f"{where}: a Git LFS pointer, not the data")
        digest = hashlib.sha256(blob).hexdigest()
        if check and digest != pin.sha256:
            raise SystemExit(f"{where}: sha256 {digest} != pinned {pin.sha256}")
        return blob

    def read(self, key: str) -> list[bytes]:
        if key not in self.pins:
            raise SystemExit(f"{key}: not pinned in {PINS_CSV}")
        if any(r in p.path or r in p.member for p in self.pins[key] for r in RESERVED):
            raise SystemExit(f"{key}: reserved for independent evaluation")
        return [self.read_pin(p) for p in self.pins[key]]

    def path(self, key: str) -> str:
        return self.pins[key][0].member or self.pins[key][0].path


# ---------------------------------------------------------------- readers -------------------------
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
                 1024: "i8", 1280: "u8"}
_NRRD_DTYPES = {"uchar": "u1", "unsigned char": "u1", "uint8": "u1", "uint8_t": "u1",
                "signed char": "i1", "int8": "i1", "int8_t": "i1", "char": "i1",
                "short": "i2", "short int": "i2", "signed short": "i2", "int16": "i2", "int16_t": "i2",
                "ushort": "u2", "unsigned short": "u2", "uint16": "u2", "uint16_t": "u2",
                "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
                "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4",
                "float": "f4", "double": "f8"}
_MHA_DTYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_SHORT": "i2", "MET_USHORT": "u2",
               "MET_INT": "i4", "MET_UINT": "u4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def read_nifti(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI-1 (.nii / .nii.gz) → (array D×H×W as stored, z slowest; spacing_mm (x, y, z))."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    endian = "<" if np.frombuffer(blob[:4], "<i4")[0] == 348 else ">"
    dims = np.frombuffer(blob[40:56], endian + "i2")
    code = int(np.frombuffer(blob[70:72], endian + "i2")[0])
    pixdim = np.frombuffer(blob[76:108], endian + "f4")
    offset = int(np.frombuffer(blob[108:112], endian + "f4")[0])
    slope, inter = np.frombuffer(blob[112:120], endian + "f4")
    if code not in _NIFTI_DTYPES:
        raise ValueError(f"NIfTI datatype {code} not supported")
    shape = [int(d) for d in dims[1:1 + int(dims[0])]] + [1, 1]
    nx, ny, nz = shape[:3]
    dt = np.dtype(endian + _NIFTI_DTYPES[code])
    arr = np.frombuffer(blob, dt, count=nx * ny * nz, offset=offset).reshape(nz, ny, nx)
    if slope not in (0.0, 1.0) or inter != 0.0:
        arr = arr * np.float32(slope if slope != 0 else 1.0) + np.float32(inter)
    return arr, np.abs(pixdim[1:4]).astype(np.float64)


def _text_header(blob: bytes, end_marker: bytes) -> tuple[list[str], int]:
    i = blob.index(end_marker)
    return blob[:i].decode("latin-1").splitlines(), i + len(end_marker)


def read_nrrd(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """NRRD (attached blob, raw or gzip) → (array D×H×W, spacing_mm (x, y, z))."""
    lines, start = _text_header(blob, b"\n\n")
    fields = {}
    for ln in lines[1:]:
        if ln.startswith("#") or ":" not in ln:
            continue
        k, v = ln.split(":", 1)
        fields[k.strip().lower()] = v.lstrip("=").strip()
    sizes = [int(s) for s in fields["sizes"].split()]
    dt = np.dtype(("<" if fields.get("endian", "little") == "little" else ">")
                  + _NRRD_DTYPES[fields["type"].lower()])
    payload = blob[start:]
    enc = fields.get("encoding", "raw").lower()
    if enc in ("gzip", "gz"):
        payload = gzip.decompress(payload)
    elif enc != "raw":
        raise ValueError(f"NRRD encoding {enc} not supported")
    arr = np.frombuffer(payload, dt, count=int(np.prod(sizes))).reshape(sizes[::-1])
    if "space directions" in fields:
        vecs = [v for v in fields["space directions"].replace(" ", "").split(")(")]
        spacing = [float(np.linalg.norm([float(x) for x in v.strip("()").split(",")])) for v in vecs
                   if v.strip("()") != "none"]
    else:
        spacing = [float(s) for s in fields.get("spacings", "1 1 1").split()]
    return arr, np.asarray(spacing, np.float64)


def read_mha(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """MetaImage .mha (ElementDataFile = LOCAL, optionally zlib-compressed) → (D×H×W, spacing_mm)."""
    marker = blob.index(b"ElementDataFile")
    start = blob.index(b"\n", marker) + 1
    fields = {}
    for ln in blob[:start].decode("latin-1").splitlines():
        if "=" in ln:
            k, v = ln.split("=", 1)
            fields[k.strip()] = v.strip()
    sizes = [int(s) for s in fields["DimSize"].split()]
    msb = fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False")) == "True"
    dt = np.dtype((">" if msb else "<") + _MHA_DTYPES[fields["ElementType"]])
    payload = blob[start:]
    if fields.get("CompressedData", "False") == "True":
        payload = zlib.decompress(payload)
    arr = np.frombuffer(payload, dt, count=int(np.prod(sizes))).reshape(sizes[::-1])
    spacing = [float(s) for s in fields.get("ElementSpacing", "1 1 1").split()]
    return arr, np.asarray(spacing, np.float64)


def read_volume(blob: bytes, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch on the file name: .nii(.gz) / .nrrd / .mha → (D×H×W array, spacing_mm (x, y, z))."""
    p = path.lower()
    if p.endswith((".nii", ".nii.gz")):
        return read_nifti(blob)
    if p.endswith(".nrrd"):
        return read_nrrd(blob)
    if p.endswith(".mha"):
        return read_mha(blob)
    raise ValueError(f"{path}: no volume reader for this extension")


def read_image2d(blob: bytes, path: str) -> np.ndarray:
    """PNG/JPG/TIFF/GIF/BMP/PGM bytes → H×W or H×W×3 (RGB order) array, dtype as stored."""
    arr = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"{path}: OpenCV cannot decode this image")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim == 3:
        arr = arr[:, :, ::-1]  # OpenCV decodes BGR
    return np.ascontiguousarray(arr)


def _tiff_tags(blob: bytes) -> tuple[str, dict]:
    e = "<" if blob[:2] == b"II" else ">"
    off = struct.unpack(e + "I", blob[4:8])[0]
    n = struct.unpack(e + "H", blob[off:off + 2])[0]
    tags = {}
    for i in range(n):
        ent = blob[off + 2 + 12 * i: off + 14 + 12 * i]
        tag, typ, cnt = struct.unpack(e + "HHI", ent[:8])
        tags[tag] = (typ, cnt, ent[8:12])
    return e, tags


def _tiff_values(blob: bytes, e: str, entry) -> list[int]:
    typ, cnt, value = entry
    fmt = {3: "H", 4: "I"}[typ]
    size = struct.calcsize(fmt) * cnt
    buf = value[:size] if size <= 4 else blob[struct.unpack(e + "I", value)[0]:][:size]
    return list(struct.unpack(e + fmt * cnt, buf))


def read_tiff_raw(blob: bytes) -> np.ndarray:
    """Uncompressed chunky 8-bit TIFF → H×W or H×W×S, from its strips (OpenCV returns one sample of the
    CVC-ClinicDB files)."""
    e, t = _tiff_tags(blob)
    w, h = _tiff_values(blob, e, t[256])[0], _tiff_values(blob, e, t[257])[0]
    spp = _tiff_values(blob, e, t[277])[0] if 277 in t else 1
    if _tiff_values(blob, e, t[259])[0] != 1 or any(b != 8 for b in _tiff_values(blob, e, t[258])):
        raise ValueError("only uncompressed 8-bit TIFF is supported")
    strips = b"".join(blob[o:o + c] for o, c in zip(_tiff_values(blob, e, t[273]), _tiff_values(blob, e, t[279])))
    a = np.frombuffer(strips[:w * h * spp], np.uint8).reshape(h, w, spp)
    return np.ascontiguousarray(a[:, :, 0] if spp == 1 else a)


# DICOM: uncompressed little-endian single-frame slices only (the IRCAD series); anything else raises
_DICOM_TAGS = {(0x0002, 0x0010): "TransferSyntaxUID", (0x0020, 0x0032): "ImagePositionPatient",
               (0x0020, 0x0037): "ImageOrientationPatient", (0x0028, 0x0002): "SamplesPerPixel",
               (0x0028, 0x0010): "Rows", (0x0028, 0x0011): "Columns", (0x0028, 0x0030): "PixelSpacing",
               (0x0028, 0x0100): "BitsAllocated", (0x0028, 0x0103): "PixelRepresentation",
               (0x0028, 0x1052): "RescaleIntercept", (0x0028, 0x1053): "RescaleSlope",
               (0x0018, 0x0050): "SliceThickness"}
_DICOM_US = {"SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "PixelRepresentation"}
_DICOM_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_IMPLICIT_LE, _EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_UNDEFINED = 0xFFFFFFFF


def _dicom_element(blob: bytes, pos: int, explicit: bool) -> tuple[int, tuple[int, int], int]:
    """The element at pos → (position after it, tag, value offset); sequences of undefined length are
    walked to their delimiter."""
    tag = struct.unpack_from("<HH", blob, pos)
    if tag[0] == 0xFFFE:  # items and delimiters carry no VR
        length = struct.unpack_from("<I", blob, pos + 4)[0]
        return pos + 8 + (0 if length == _UNDEFINED else length), tag, pos + 8
    if explicit and blob[pos + 4:pos + 6] in _DICOM_LONG_VRS:
        length, start = struct.unpack_from("<I", blob, pos + 8)[0], pos + 12
    elif explicit:
        length, start = struct.unpack_from("<H", blob, pos + 6)[0], pos + 8
    else:
        length, start = struct.unpack_from("<I", blob, pos + 4)[0], pos + 8
    if length != _UNDEFINED:
        return start + length, tag, start
    if tag == (0x7FE0, 0x0010):
        raise ValueError("encapsulated (compressed) PixelData is not supported")
    pos = start
    while True:  # an undefined-length sequence: items until the sequence delimiter
        item, item_len = struct.unpack_from("<HHI", blob, pos)[:2], struct.unpack_from("<I", blob, pos + 4)[0]
        pos += 8
        if item == (0xFFFE, 0xE0DD):
            return pos, tag, start
        if item_len != _UNDEFINED:
            pos += item_len
            continue
        while struct.unpack_from("<HH", blob, pos) != (0xFFFE, 0xE00D):
            pos = _dicom_element(blob, pos, explicit)[0]
        pos += 8


def read_dicom(blob: bytes) -> tuple[dict, np.ndarray]:
    """One DICOM slice → (the tags above, float32 values after RescaleSlope/Intercept, rows × cols)."""
    pos = 132 if blob[128:132] == b"DICM" else 0
    hdr: dict = {}
    explicit, in_meta = True, True  # the file meta group is always explicit VR
    while pos + 8 <= len(blob):
        if in_meta and struct.unpack_from("<H", blob, pos)[0] != 0x0002:
            in_meta = False
            syntax = hdr.get("TransferSyntaxUID", _IMPLICIT_LE if pos == 0 else _EXPLICIT_LE)
            if syntax not in (_IMPLICIT_LE, _EXPLICIT_LE):
                raise ValueError(f"transfer syntax {syntax} is not supported (uncompressed little endian only)")
            explicit = syntax == _EXPLICIT_LE
        nxt, tag, start = _dicom_element(blob, pos, explicit)
        raw = blob[start:nxt]
        if tag == (0x7FE0, 0x0010):
            if hdr.get("SamplesPerPixel", 1) != 1 or hdr["BitsAllocated"] not in (8, 16):
                raise ValueError("only single-sample 8/16-bit slices are supported")
            dt = ("<i" if hdr.get("PixelRepresentation", 0) else "<u") + str(hdr["BitsAllocated"] // 8)
            pix = np.frombuffer(raw, dt, count=hdr["Rows"] * hdr["Columns"]).reshape(hdr["Rows"], hdr["Columns"])
            values = pix.astype(np.float32) * np.float32(hdr.get("RescaleSlope", 1.0))
            return hdr, values + np.float32(hdr.get("RescaleIntercept", 0.0))
        name = _DICOM_TAGS.get(tag)
        if name in _DICOM_US:
            hdr[name] = int(struct.unpack_from("<H", raw)[0])
        elif name == "TransferSyntaxUID":
            hdr[name] = raw.decode("latin-1").strip("\x00 ")
        elif name:
            values = [float(v) for v in raw.decode("latin-1").strip("\x00 ").split("\\")]
            hdr[name] = values[0] if name in ("RescaleIntercept", "RescaleSlope", "SliceThickness") else values
        pos = nxt
    raise ValueError("no PixelData element")


def read_dicom_series(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """DICOM slices → (D×H×W values sorted along the slice normal, spacing_mm (x, y, z))."""
    items = [read_dicom(b) for b in blobs]

    def position(hdr: dict) -> float:
        iop = np.asarray(hdr.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
        return float(np.dot(hdr["ImagePositionPatient"], np.cross(iop[:3], iop[3:])))

    items.sort(key=lambda it: position(it[0]))
    pos = np.array([position(h) for h, _ in items])
    gaps = np.abs(np.diff(pos))
    dz = float(np.median(gaps)) if len(gaps) and (gaps > 1e-6).all() else float(items[0][0].get("SliceThickness", 1))
    row_mm, col_mm = items[0][0]["PixelSpacing"]
    return np.stack([v for _, v in items]), np.array([col_mm, row_mm, dz], np.float64)


# ---------------------------------------------------------------- conversion ----------------------
def to_uint8(arr: np.ndarray, recipe: str) -> np.ndarray:
    """Intensities → uint8 0..255: "ct" soft-tissue window; "mr" (also PET) 0.5–99.5 percentile
    min-max; "rgb" keeps uint8 images as they are and min-max scales anything deeper (16-bit PNG)."""
    if recipe == "rgb" and arr.dtype == np.uint8:
        return arr
    a = np.asarray(arr, np.float32)
    if recipe == "ct":
        lo, hi = CT_WINDOW_HU
    elif recipe in ("mr", "pet"):
        lo, hi = (float(v) for v in np.percentile(a, PERCENTILES))
    elif recipe == "rgb":
        lo, hi = float(a.min()), float(a.max())
    else:
        raise ValueError(f"unknown intensity recipe {recipe!r}")
    out = (np.clip(a, lo, hi) - lo) / max(hi - lo, 1e-6) * 255.0
    return np.round(out).astype(np.uint8)


def split_objects(labels: np.ndarray, label_map: dict[int, int] | None = None
                  ) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Source label map (2D or 3D ints) → (uint8 map with one label per kept connected object,
    bounding slices of object i at index i-1). Order: source label ascending, then component size."""
    out = np.zeros(labels.shape, np.uint8)
    bounds: list[tuple[slice, ...]] = []
    values = [v for v in np.unique(labels) if v != 0]
    if label_map is not None:
        values = [v for v in values if int(v) in label_map]
    structure = np.ones((3,) * labels.ndim, bool)  # 8-/26-connectivity
    for v in values:
        comp, n = ndimage.label(labels == v, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        keep = [i + 1 for i in np.argsort(-sizes)
                if sizes[i] >= MIN_OBJECT_PIXELS and sizes[i] >= MIN_OBJECT_FRACTION * sizes.max()]
        slices = ndimage.find_objects(comp)
        for c in keep:
            if len(bounds) == 255:
                raise ValueError("more than 255 objects; uint8 gts cannot hold them")
            bounds.append(slices[c - 1])
            out[comp == c] = len(bounds)
    return out, bounds


def boxes_from_bounds(bounds: list[tuple[slice, ...]]) -> np.ndarray:
    """Object bounding slices → inclusive boxes: 2D (x0, y0, x1, y1), 3D (x0, y0, z0, x1, y1, z1)."""
    rows = []
    for b in bounds:
        if len(b) == 2:
            y, x = b
            rows.append([x.start, y.start, x.stop - 1, y.stop - 1])
        else:
            z, y, x = b
            rows.append([x.start, y.start, z.start, x.stop - 1, y.stop - 1, z.stop - 1])
    ncol = 4 if not bounds or len(bounds[0]) == 2 else 6
    return np.asarray(rows, np.int64).reshape(-1, ncol)


# ---------------------------------------------------------------- building one case ----------------
def decode_2d(blob: bytes, path: str, decoder: str | None) -> np.ndarray:
    return read_tiff_raw(blob) if decoder == "tiff_raw" else read_image2d(blob, path)


def build_3d(case: Case, blobs: Blobs) -> dict:
    """Volume (+ labels) → arrays of one 3D case: z cropped to the labels ± z_margin, native in-plane size."""
    series = case.options.get("label_series")
    if len(blobs.pins[case.image]) > 1:
        img, spacing = read_dicom_series(blobs.read(case.image))
    else:
        img, spacing = read_volume(blobs.read(case.image)[0], blobs.path(case.image))
    lbl = None
    if series:  # one binary DICOM series per organ, painted as its label
        lbl = np.zeros(img.shape, np.int32)
        for value, key in sorted(series.items()):
            mask, _ = read_dicom_series(blobs.read(key))
            if mask.shape != img.shape:
                raise SystemExit(f"{case.name}: {key} shape {mask.shape} != image {img.shape}")
            lbl[mask > 0] = value
    elif case.label:
        for i, key in enumerate(case.label_keys, 1):
            part, _ = read_volume(blobs.read(key)[0], blobs.path(key))
            if part.shape != img.shape:
                raise SystemExit(f"{case.name}: {blobs.path(key)} shape {part.shape} != image {img.shape}")
            part = np.asarray(part).astype(np.int32)
            if len(case.label_keys) > 1:  # a stack of binary masks: mask i becomes label i (later masks win)
                lbl = np.zeros(img.shape, np.int32) if lbl is None else lbl
                lbl[part > 0] = i
            else:
                lbl = part
    if lbl is not None:
        if case.label_map is not None:
            lbl = np.where(np.isin(lbl, list(case.label_map)), lbl, 0)
        zs = np.flatnonzero(lbl.reshape(lbl.shape[0], -1).any(1))
        if zs.size == 0:
            raise SystemExit(f"{case.name}: label volume is empty")
        z0, z1 = max(0, zs[0] - case.z_margin), min(img.shape[0], zs[-1] + 1 + case.z_margin)
        step = int(case.options.get("z_step", 1))
        img, lbl = img[z0:z1:step], lbl[z0:z1:step]
        spacing = spacing * np.array([1.0, 1.0, step])
    out = {"imgs": np.ascontiguousarray(to_uint8(img, case.recipe)), "spacing": spacing.astype(np.float64)}
    if lbl is not None:
        gts, bounds = split_objects(lbl)
        out["gts"], out["boxes"] = gts, boxes_from_bounds(bounds)
    return out


def build_2d(case: Case, blobs: Blobs) -> dict:
    """Image (+ masks) → arrays of one 2D case at the image's own resolution."""
    decoder = case.options.get("decoder")
    img = to_uint8(decode_2d(blobs.read(case.image)[0], blobs.path(case.image), decoder), case.recipe)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if "image_scale" in case.options:  # the image onto the grid its masks were drawn on
        f = case.options["image_scale"]
        img = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)), interpolation=cv2.INTER_AREA)
    lbl = None
    if case.label:
        lbl = np.zeros(img.shape[:2], np.int32)
        for i, key in enumerate(case.label_keys, 1):
            m = decode_2d(blobs.read(key)[0], blobs.path(key), decoder)
            if m.ndim == 3:
                m = m.max(axis=2)  # masks stored as RGB/grey copies: any channel marks foreground
            if "label_scale" in case.options:
                k = int(case.options["label_scale"])
                m = cv2.resize(m, (m.shape[1] * k, m.shape[0] * k), interpolation=cv2.INTER_NEAREST)
            if m.shape != img.shape[:2]:
                raise SystemExit(f"{case.name}: mask {m.shape} != image {img.shape[:2]}")
            if "value_map" in case.options:  # grey value → label; unlisted values are background
                for value, label in case.options["value_map"].items():
                    lbl[m == value] = label
                continue
            fg = m > case.mask_threshold
            if case.options.get("fill_holes"):  # outline annotations (HC18 ellipses) → filled masks
                fg = ndimage.binary_fill_holes(fg)
            lbl[fg] = i
    if "crop" in case.options:
        y0, x0, h, w = case.options["crop"]
        img = img[y0:y0 + h, x0:x0 + w]
        lbl = None if lbl is None else lbl[y0:y0 + h, x0:x0 + w]
    out = {"imgs": np.ascontiguousarray(img.astype(np.uint8))}
    if lbl is not None:
        gts, bounds = split_objects(lbl, case.label_map)
        out["gts"], out["boxes"] = gts, boxes_from_bounds(bounds)
    return out


def is_labelled(case: Case) -> bool:
    return bool(case.label or case.options.get("label_series"))


def is_local(case: Case, blobs_or_pins) -> bool:
    """True if a file of the case comes from a source whose licence forbids redistribution."""
    pins = blobs_or_pins.pins if isinstance(blobs_or_pins, Blobs) else blobs_or_pins
    repos = {p.repo for key in [case.image] + case.label_keys for p in pins.get(key, [])}
    return any(not SOURCES[r].redistribute for r in repos)


def check_case(name: str, arrays: dict) -> None:
    """Challenge-format invariants, checked before anything is written: uint8 images of the right
    rank, labels 1..N present exactly once each as boxes, each box the tight bound of its label."""
    imgs = arrays["imgs"]
    dim = 3 if name.startswith("3D") else 2
    ok_shape = imgs.ndim == 3 and (dim == 3 or imgs.shape[2] == 3)
    if imgs.dtype != np.uint8 or not ok_shape:
        raise SystemExit(f"{name}: imgs {imgs.shape} {imgs.dtype} is not challenge format")
    if dim == 3 and arrays["spacing"].shape != (3,):
        raise SystemExit(f"{name}: spacing must have 3 values, got {arrays['spacing']}")
    if "gts" not in arrays:
        return
    gts, boxes = arrays["gts"], arrays["boxes"]
    if gts.shape != imgs.shape[:gts.ndim] or gts.dtype != np.uint8:
        raise SystemExit(f"{name}: gts {gts.shape} {gts.dtype} does not match imgs {imgs.shape}")
    if len(boxes) == 0 or int(gts.max()) != len(boxes):
        raise SystemExit(f"{name}: {len(boxes)} boxes but labels up to {int(gts.max())}")
    for i, (box, sl) in enumerate(zip(boxes, ndimage.find_objects(gts)), 1):
        if sl is None or not np.array_equal(box, boxes_from_bounds([sl])[0]):
            raise SystemExit(f"{name}: box {i} {box.tolist()} is not the bound of label {i}")



# ---------------------------------------------------------------- the tune / check split -----------
def assign_halves(cases: list[Case], pins: dict[str, list[Pin]], seed: int = SPLIT_SEED) -> dict[str, str]:
    """Labelled case → "tune" | "check", per modality: cases are ordered by source (the name's third
    field), then by a seeded hash of their name, and dealt alternately, so each half gets its share of
    every source and of the local cases."""
    halves: dict[str, str] = {}
    groups: dict[str, list[Case]] = {}
    for c in cases:
        if is_labelled(c):
            groups.setdefault(c.modality, []).append(c)
    for modality, group in sorted(groups.items()):
        def order(c: Case) -> tuple:
            return (is_local(c, pins), c.name.split("_")[2], zlib.crc32(f"{seed}:{c.name}".encode()))
        for k, c in enumerate(sorted(group, key=order)):
            halves[c.name] = "tune" if k % 2 == 0 else "check"
    return halves


# ---------------------------------------------------------------- writing -------------------------
def write_case(case: Case, arrays: dict, out_dir: str) -> None:
    """Labelled: imgs/ + gts/ (challenge layout); unlabelled: unlabeled/ (imgs, spacing)."""
    if "gts" in arrays:
        data.write_challenge_case(out_dir, case.name + ".npz", arrays)
    else:
        data.write_case(os.path.join(out_dir, "unlabeled", case.name + ".npz"), arrays, with_gts=False)


MANIFEST_FIELDS = ["name", "modality", "dim", "half", "local", "patient", "source_repo", "commit", "files",
                   "sha256", "licence", "labels", "n_objects", "shape"]


def manifest_row(case: Case, arrays: dict, blobs: Blobs, half: str) -> dict:
    keys = [case.image] + case.label_keys
    first = blobs.pins[case.image][0]
    files = [p.path + (f"!{p.member}" if p.member else "") for k in keys for p in blobs.pins[k][:1]]
    return {"name": case.name, "modality": case.modality, "dim": f"{case.dim}D", "half": half,
            "local": "yes" if is_local(case, blobs) else "no", "patient": case.patient,
            "source_repo": first.repo, "commit": first.commit,
            "files": ";".join(files) + (f" (+{len(blobs.pins[case.image]) - 1} slices)"
                                        if len(blobs.pins[case.image]) > 1 else ""),
            "sha256": ";".join(blobs.pins[k][0].sha256 for k in keys),
            "licence": SOURCES[first.repo].licence,
            "labels": SOURCES[first.repo].labels if is_labelled(case) else "none (unlabelled)",
            "n_objects": len(arrays.get("boxes", [])), "shape": "x".join(str(s) for s in arrays["imgs"].shape)}


def write_csv_atomic(path: str, fields: list[str], rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--mirror-root", default="/work/.mirror",
                    help="directory holding fetched snapshots as <owner>+<name>/repo git dirs")
    ap.add_argument("--out", default=os.path.join(REPO_DIR, "devset"), help="dev set output directory")
    ap.add_argument("--demo-out", default=os.path.join(REPO_DIR, "demo"),
                    help="where DEMO_CASES are copied (imgs/ and gts/)")
    ap.add_argument("--only", nargs="*", default=None, help="build only these case names")
    ap.add_argument("--no-local", action="store_true",
                    help="skip the cases whose licence forbids redistribution (what the repository holds)")
    ap.add_argument("--print-hashes", action="store_true",
                    help="print the sha256 of every pinned file (to check or fill pins.csv) and exit")
    args = ap.parse_args(argv)

    pins = read_pins()
    blobs = Blobs(args.mirror_root, pins)
    if args.print_hashes:
        for key, rows in pins.items():
            for pin in rows:
                blob = blobs.read_pin(pin, check=False)
                print(f"{key}\t{pin.path}{'!' + pin.member if pin.member else ''}\t"
                      f"{hashlib.sha256(blob).hexdigest()}\t{len(blob)}")
        return 0
    unknown = sorted(set(args.only or ()) - {c.name for c in CASES})
    if unknown:
        raise SystemExit(f"--only: no such case(s): {', '.join(unknown)}")
    halves = assign_halves(CASES, pins)
    cases = [c for c in CASES if (args.only is None or c.name in args.only)
             and not (args.no_local and is_local(c, pins))]
    rows = []
    for case in cases:
        arrays = (build_3d if case.dim == 3 else build_2d)(case, blobs)
        check_case(case.name, arrays)
        write_case(case, arrays, args.out)
        rows.append(manifest_row(case, arrays, blobs, halves.get(case.name, "")))
        print(f"{case.name}: imgs {arrays['imgs'].shape}, {len(arrays.get('boxes', []))} objects, "
              f"{halves.get(case.name, 'unlabelled')}", file=sys.stderr)
    if args.only is None:
        write_csv_atomic(os.path.join(args.out, "manifest.csv"), MANIFEST_FIELDS, rows)
        split_rows = [{"name": c.name, "modality": c.modality, "half": halves[c.name],
                       "local": "yes" if is_local(c, pins) else "no"} for c in CASES if c.name in halves]
        write_csv_atomic(os.path.join(args.out, "split.csv"), ["name", "modality", "half", "local"], split_rows)
        for name in DEMO_CASES:
            for sub in ("imgs", "gts"):
                os.makedirs(os.path.join(args.demo_out, sub), exist_ok=True)
                shutil.copyfile(os.path.join(args.out, sub, name + ".npz"),
                                os.path.join(args.demo_out, sub, name + ".npz"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
