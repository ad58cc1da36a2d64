"""DSC and NSD as the CVPR24 "MedSAM on Laptop" challenge computes them (compute_metrics.py).

Per case, for every label in ``np.unique(gts)[1:]`` (the challenge skips the *first* unique value,
which is the background whenever 0 is present):
  * DSC = 2|G∩P| / (|G|+|P|), NaN when both masks are empty (DeepMind surface-distance semantics);
  * NSD = normalised surface Dice at 2 mm: surfaces are marching-cubes surfels whose areas come from a
    256-entry neighbour-code table, distances are Euclidean distance transforms in millimetres, and
    NSD = (area of G's surfels within tol of P + area of P's surfels within tol of G) / (total area).
The case scores are the means over labels; NSD is set to 0 when the case DSC is ≤ 0.2 (and is not
computed then). 3D cases use ``spacing`` from the gts npz; 2D masks are expanded to H×W×1 with spacing
(1, 1, 1), exactly like the challenge script, so 2D contours are measured as 3D surfel areas.

Imports numpy and scipy (and data.py's modality_of, numpy/opencv), never torch, so infer.py, train.py
and evaluation tools can all share it.
"""
from __future__ import annotations

import argparse
import csv
import functools
import itertools
import math
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from data import is_3d_case, modality_of  # the file-name rules of the sampler and the pipeline (no torch)

NSD_TOLERANCE_MM = 2.0
NSD_DSC_THRESHOLD = 0.2  # challenge: NSD only counts for cases whose mean DSC is above this

# ---------------------------------------------------------------------------------------------------
# Surfel areas of a 2×2×2 neighbourhood (marching cubes with vertices on edge midpoints)
# ---------------------------------------------------------------------------------------------------
_CORNERS = list(itertools.product((0, 1), repeat=3))


def _corner_bit(corner: tuple[int, int, int]) -> int:
    """Bit of a cube corner in the neighbour code: (0,0,0) → 128 … (1,1,1) → 1."""
    return 7 - (4 * corner[0] + 2 * corner[1] + corner[2])


def _cube_loops(code: int) -> list[np.ndarray]:
    """Closed polygons (k×3 vertex arrays, voxel units) of the iso-surface inside one cube.

    Each face contributes segments between midpoints of its sign-changing edges; on an ambiguous face
    (two diagonal corners inside) the minority corners (inside if ≤ 4 corners are inside, else outside)
    are cut off separately, which is the convention of the table DeepMind's surface-distance uses.
    """
    inside = {c: (code >> _corner_bit(c)) & 1 for c in _CORNERS}
    separate_inside = sum(inside.values()) <= 4
    segments = []
    for axis in range(3):
        a, b = [ax for ax in range(3) if ax != axis]
        for level in (0, 1):
            cycle = []
            for u, v in ((0, 0), (1, 0), (1, 1), (0, 1)):
                c = [0, 0, 0]
                c[axis], c[a], c[b] = level, u, v
                cycle.append(tuple(c))
            flags = [inside[c] for c in cycle]
            mids = {i: tuple((np.add(cycle[i], cycle[(i + 1) % 4]) / 2).tolist())
                    for i in range(4) if flags[i] != flags[(i + 1) % 4]}
            if len(mids) == 2:
                segments.append(tuple(mids.values()))
            elif len(mids) == 4:
                pivots = [i for i in range(4) if flags[i] == int(separate_inside)]
                segments.extend((mids[(p - 1) % 4], mids[p]) for p in pivots)
    loops = []
    while segments:
        loop = list(segments.pop(0))
        while True:
            nxt = None
            for k, (p, q) in enumerate(segments):
                if loop[-1] in (p, q):
                    nxt = q if p == loop[-1] else p
                    segments.pop(k)
                    break
            if nxt is None or nxt == loop[0]:
                break
            loop.append(nxt)
        loops.append(np.array(loop, dtype=np.float64))
    return loops


def _fan_area(loop: np.ndarray, apex: int, spacing_mm: np.ndarray) -> float:
    """Sum of triangle areas (mm²) of the fan triangulation of `loop` from vertex `apex`."""
    n = len(loop)
    # a triangle's area vector scales by (s1·s2, s0·s2, s0·s1) under an axis scaling by s
    scale = np.array([spacing_mm[1] * spacing_mm[2], spacing_mm[0] * spacing_mm[2],
                      spacing_mm[0] * spacing_mm[1]])
    total = 0.0
    for i in range(1, n - 1):
        p0, p1, p2 = loop[apex], loop[(apex + i) % n], loop[(apex + i + 1) % n]
        total += float(np.linalg.norm(0.5 * np.cross(p1 - p0, p2 - p0) * scale))
    return total


@functools.lru_cache(maxsize=1)
def _cube_triangulations() -> tuple[tuple[tuple[np.ndarray, int], ...], ...]:
    """Per neighbour code, its loops with the fan apex used to triangulate them.

    Non-planar loops (pentagons, hexagons) have triangulation-dependent area; the fan of largest
    isotropic area reproduces DeepMind's surfel table for every code and any spacing (checked in tests).
    """
    ones = np.ones(3)
    table = []
    for code in range(256):
        entries = []
        for loop in _cube_loops(code):
            areas = np.round([_fan_area(loop, k, ones) for k in range(len(loop))], 9)
            entries.append((loop, int(np.argmax(areas))))
        table.append(tuple(entries))
    return tuple(table)


@functools.lru_cache(maxsize=32)
def surfel_area_table(spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Surface area (mm²) inside a 2×2×2 neighbourhood, indexed by its 8-bit neighbour code: (256,)."""
    s = np.asarray(spacing_mm, dtype=np.float64)
    table = np.zeros(256)
    for code, entries in enumerate(_cube_triangulations()):
        table[code] = sum(_fan_area(loop, apex, s) for loop, apex in entries)
    table.setflags(write=False)
    return table


# ---------------------------------------------------------------------------------------------------
# DSC and NSD of one binary pair
# ---------------------------------------------------------------------------------------------------
def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Dice coefficient of two boolean masks of equal shape; NaN when both are empty."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"dice: shapes differ, gt {gt.shape} vs pred {pred.shape}")
    volume_sum = int(gt.sum()) + int(pred.sum())
    if volume_sum == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(gt, pred).sum()) / volume_sum


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """8-bit code of every 2×2×2 neighbourhood of a zero-padded mask: (D+1)×(H+1)×(W+1) uint8.

    Code at q covers voxels q-1..q on each axis, so border surfels of a mask touching the crop edge exist.
    """
    padded = np.pad(mask.astype(np.uint8), 1)
    d, h, w = mask.shape
    codes = np.zeros((d + 1, h + 1, w + 1), np.uint8)
    for c in _CORNERS:
        codes |= padded[c[0]:c[0] + d + 1, c[1]:c[1] + h + 1, c[2]:c[2] + w + 1] << _corner_bit(c)
    return codes


def _edt_distances(border_from: np.ndarray, border_to: np.ndarray, spacing: tuple[float, ...]
                   ) -> np.ndarray:
    """Distance (mm) from every True voxel of `border_from` to the nearest of `border_to` (inf if none)."""
    if not border_to.any():
        return np.full(int(border_from.sum()), np.inf)
    return ndimage.distance_transform_edt(~border_to, sampling=spacing)[border_from]


def _near_distances(border_from: np.ndarray, border_to: np.ndarray, spacing: tuple[float, ...],
                    max_distance_mm: float) -> np.ndarray:
    """As `_edt_distances`, but inf beyond `max_distance_mm`; a k-d tree of border voxels only.

    The distance to the found neighbour is recomputed as scipy's EDT does, sqrt(Σ(Δi·si)²) with
    integer Δ, so values up to the bound are bit-identical except for ulp-level ties between neighbours.
    """
    from_idx, to_idx = np.argwhere(border_from), np.argwhere(border_to)
    distances = np.full(len(from_idx), np.inf)
    if len(to_idx) == 0 or len(from_idx) == 0:
        return distances
    s = np.asarray(spacing, dtype=np.float64)
    tree = cKDTree(to_idx * s)
    # a slightly loose bound so that rounding in the tree never drops a neighbour at the bound
    _, nearest = tree.query(from_idx * s, k=1, distance_upper_bound=max_distance_mm * (1 + 1e-9) + 1e-12)
    found = nearest < len(to_idx)
    delta_mm = (to_idx[nearest[found]] - from_idx[found]).astype(np.float64) * s
    exact = np.sqrt(np.add.reduce(delta_mm * delta_mm, axis=1))
    distances[found] = np.where(exact <= max_distance_mm, exact, np.inf)
    return distances


def surface_distances(gt: np.ndarray, pred: np.ndarray, spacing_mm: tuple[float, float, float],
                      max_distance_mm: float | None = None) -> dict[str, np.ndarray]:
    """Surfel distances and areas of two 3D boolean masks (D×H×W) in millimetres.

    Returns ``distances_gt_to_pred``, ``distances_pred_to_gt`` (mm, inf when the other surface is
    empty) and ``surfel_areas_gt``, ``surfel_areas_pred`` (mm²), one entry per border neighbourhood, in
    C order. With `max_distance_mm` set, distances beyond it are inf and are found with a k-d tree
    instead of two full distance transforms (≈4× faster on a 64×512×512 organ; NSD needs no more).
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.ndim != 3 or gt.shape != pred.shape:
        raise ValueError(f"surface_distances: need two 3D masks of equal shape, got {gt.shape}, {pred.shape}")
    spacing = tuple(float(s) for s in spacing_mm)
    union = gt | pred
    if not union.any():
        empty = np.zeros(0)
        return dict(distances_gt_to_pred=empty, distances_pred_to_gt=empty,
                    surfel_areas_gt=empty, surfel_areas_pred=empty)
    # crop to the union's bounding box: distance transforms of the full volume are the whole cost otherwise
    box = []
    for axis in range(3):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    box = tuple(box)
    codes_gt, codes_pred = _neighbour_codes(gt[box]), _neighbour_codes(pred[box])
    border_gt = (codes_gt != 0) & (codes_gt != 255)
    border_pred = (codes_pred != 0) & (codes_pred != 255)
    if max_distance_mm is None:
        gt_to_pred = _edt_distances(border_gt, border_pred, spacing)
        pred_to_gt = _edt_distances(border_pred, border_gt, spacing)
    else:
        gt_to_pred = _near_distances(border_gt, border_pred, spacing, max_distance_mm)
        pred_to_gt = _near_distances(border_pred, border_gt, spacing, max_distance_mm)
    areas = surfel_area_table(spacing)
    return dict(distances_gt_to_pred=gt_to_pred, distances_pred_to_gt=pred_to_gt,
                surfel_areas_gt=areas[codes_gt[border_gt]],
                surfel_areas_pred=areas[codes_pred[border_pred]])


def nsd(gt: np.ndarray, pred: np.ndarray, spacing_mm: tuple[float, ...],
        tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice of two boolean masks at `tolerance_mm`; NaN when both are empty.

    3D masks take a 3-tuple spacing; 2D masks (H×W) are expanded to H×W×1 as the challenge does, with
    spacing (*spacing_mm[:2], 1.0).
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.ndim == 2:
        gt, pred = gt[..., None], pred[..., None]
        spacing_mm = (float(spacing_mm[0]), float(spacing_mm[1]), 1.0)
    sd = surface_distances(gt, pred, tuple(spacing_mm), max_distance_mm=tolerance_mm)
    total_area = sd["surfel_areas_gt"].sum() + sd["surfel_areas_pred"].sum()
    if total_area == 0:
        return float("nan")
    overlap = (sd["surfel_areas_gt"][sd["distances_gt_to_pred"] <= tolerance_mm].sum()
               + sd["surfel_areas_pred"][sd["distances_pred_to_gt"] <= tolerance_mm].sum())
    return float(overlap / total_area)


# ---------------------------------------------------------------------------------------------------
# Cases, directories, tables
# ---------------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float:
    """np.mean without the empty-slice warning: NaN for no values (the challenge's np.mean([]))."""
    return float(np.mean(values)) if values else float("nan")


def case_metrics(gts: np.ndarray, segs: np.ndarray, spacing_mm: tuple[float, float, float] | None,
                 is_3d: bool, tolerance_mm: float = NSD_TOLERANCE_MM) -> tuple[float, float]:
    """(DSC, NSD) of a label map `segs` against `gts` (H×W for 2D, D×H×W for 3D).

    Labels are ``np.unique(gts)[1:]``; both scores are means over them. NSD is 0 when DSC ≤ 0.2 or is
    NaN (a case without labels: DSC NaN, NSD 0, as in the challenge). 2D ignores `spacing_mm`.
    """
    gts, segs = np.asarray(gts), np.asarray(segs)
    if gts.shape != segs.shape:
        raise ValueError(f"case_metrics: gts {gts.shape} and segs {segs.shape} differ in shape")
    labels = np.unique(gts)[1:]
    dsc = _mean([dice(gts == i, segs == i) for i in labels])
    if not dsc > NSD_DSC_THRESHOLD:  # also catches NaN, like the challenge's `if dsc > 0.2`
        return dsc, 0.0
    if is_3d:
        if spacing_mm is None:
            raise ValueError("case_metrics: a 3D case needs spacing_mm")
        spacing, gts3, segs3 = tuple(float(s) for s in spacing_mm), gts, segs
    else:
        spacing, gts3, segs3 = (1.0, 1.0, 1.0), gts[..., None], segs[..., None]
    return dsc, _mean([nsd(gts3 == i, segs3 == i, spacing, tolerance_mm) for i in labels])


def evaluate_dirs(seg_dir: str | Path, gts_dir: str | Path,
                  tolerance_mm: float = NSD_TOLERANCE_MM) -> list[dict]:
    """Score every ``*.npz`` in `seg_dir` that has a namesake in `gts_dir` (sorted by name).

    Returns rows ``{case, modality, dsc, nsd}``; 3D or not by data.is_3d_case (name, then shape).
    """
    seg_dir, gts_dir = Path(seg_dir), Path(gts_dir)
    names = sorted(p.name for p in seg_dir.glob("*.npz") if (gts_dir / p.name).exists())
    rows = []
    for k, name in enumerate(names):
        with np.load(gts_dir / name, allow_pickle=True) as gt_npz, np.load(seg_dir / name) as seg_npz:
            if "gts" not in gt_npz or "segs" not in seg_npz:
                raise KeyError(f"{name}: need 'gts' in {gts_dir} and 'segs' in {seg_dir}")
            gts = gt_npz["gts"]
            is_3d = is_3d_case(name, gts.shape)
            spacing = tuple(gt_npz["spacing"]) if is_3d else None
            dsc, nsd_ = case_metrics(gts, seg_npz["segs"], spacing, is_3d, tolerance_mm)
        rows.append(dict(case=name, modality=modality_of(name), dsc=dsc, nsd=nsd_))
        print(f"[{k + 1}/{len(names)}] {name} DSC {dsc:.4f} NSD {nsd_:.4f}", file=sys.stderr)
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per-modality means ``{modality: {dsc, nsd, n}}`` plus ``"overall"`` (mean over cases).

    NaN case scores are skipped, as pandas' mean does on the challenge's CSV.
    """
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["modality"], []).append(row)
    groups = dict(sorted(groups.items()))
    groups["overall"] = list(rows)

    def nanmean(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return float(np.mean(finite)) if finite else float("nan")

    return {m: dict(dsc=nanmean([r["dsc"] for r in g]), nsd=nanmean([r["nsd"] for r in g]), n=len(g))
            for m, g in groups.items()}


def format_table(rows: list[dict] | None = None, summary: dict[str, dict[str, float]] | None = None
                 ) -> str:
    """Plain-text table of per-case rows (with a `time s` column when rows carry "time_s") and/or a
    per-modality summary."""
    lines = []
    if rows:
        width = max(len("case"), *(len(r["case"]) for r in rows))
        timed = all("time_s" in r for r in rows)
        lines.append(f"{'case':<{width}}  {'modality':<12} {'DSC':>7} {'NSD':>7}"
                     + (f" {'time s':>8}" if timed else ""))
        lines += [f"{r['case']:<{width}}  {r['modality']:<12} {r['dsc']:7.4f} {r['nsd']:7.4f}"
                  + (f" {r['time_s']:8.2f}" if timed else "") for r in rows]
    if summary:
        if lines:
            lines.append("")
        lines.append(f"{'modality':<12} {'n':>5} {'DSC':>7} {'NSD':>7}")
        lines += [f"{m:<12} {s['n']:>5} {s['dsc']:7.4f} {s['nsd']:7.4f}" for m, s in summary.items()]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Per-case rows as CSV with columns case, modality, dsc, nsd."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "modality", "dsc", "nsd"])
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DSC and NSD of predicted segs against ground truth, "
                                                 "as the CVPR24 MedSAM-on-Laptop challenge computes them.")
    parser.add_argument("--segs", required=True, help="directory of predicted *.npz with 'segs'")
    parser.add_argument("--gts", required=True, help="directory of ground-truth *.npz with 'gts' "
                                                     "(and 'spacing' for 3D)")
    parser.add_argument("--csv", default=None, help="also write per-case rows to this CSV (default: none)")
    parser.add_argument("--tolerance-mm", type=float, default=NSD_TOLERANCE_MM,
                        help=f"NSD tolerance in mm (default: {NSD_TOLERANCE_MM})")
    args = parser.parse_args(argv)
    for flag, d in (("--segs", args.segs), ("--gts", args.gts)):
        if not Path(d).is_dir():
            parser.error(f"{flag} {d}: not a directory")
    rows = evaluate_dirs(args.segs, args.gts, args.tolerance_mm)
    if not rows:
        parser.error(f"no *.npz in {args.segs} with a namesake in {args.gts}")
    print(format_table(rows, summarise(rows)))
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
