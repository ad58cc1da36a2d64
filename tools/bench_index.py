"""Benchmark of the header-only slice index: build a SliceIndex over a synthetic tree of
many small 3D npz files, report files/s and RSS, then the cost of random slice access.

    python bench_index.py                       # 2000 files in a temporary folder, removed afterwards
    python bench_index.py --dir /tmp/tree --keep --n-files 5000 --out results/bench_index.json

The tree is `<dir>/<Modality>/<dataset>/<name>.npz` with `imgs` D×H×W and `gts` in the same file
(the challenge's training layout). Volumes are cut from a small pool of synthetic phantoms so that
writing thousands of files is quick while the payload compresses like real data.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/bench_index.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import data
from tools import phantoms
from tools.benchlib import peak_rss_mb, rss_mb

MODALITIES = ("CT", "MR", "PET")


def write_tree(root: Path, n_files: int, depth_range: tuple[int, int], side: int, seed: int) -> int:
    """n_files 3D cases spread over MODALITIES × 4 datasets; returns the total number of slices."""
    rng = np.random.default_rng(seed)
    pool = [phantoms.make_synthetic_case("3D", (depth_range[1], side, side), 3, MODALITIES[k % 3], seed=seed + k)
            for k in range(12)]
    total = 0
    t0 = time.perf_counter()
    for i in range(n_files):
        mod = MODALITIES[i % len(MODALITIES)]
        d = int(rng.integers(depth_range[0], depth_range[1] + 1))
        z0 = int(rng.integers(0, depth_range[1] - d + 1))
        src = pool[int(rng.integers(len(pool)))]
        path = root / mod / f"{mod}_set{i % 4}" / f"{mod}_set{i % 4}_case{i:05d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, imgs=src["imgs"][z0:z0 + d], gts=src["gts"][z0:z0 + d], spacing=src["spacing"])
        total += d
        if (i + 1) % 500 == 0:
            print(f"wrote {i + 1}/{n_files} files ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", default=None,
                   help="tree folder (None: a temporary folder, removed afterwards unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the tree after the run")
    p.add_argument("--reuse", action="store_true", help="index an existing tree in --dir instead of writing one")
    p.add_argument("--n-files", type=int, default=2000, help="number of 3D npz files to write")
    p.add_argument("--min-depth", type=int, default=8, help="fewest z-slices per volume")
    p.add_argument("--max-depth", type=int, default=48, help="most z-slices per volume")
    p.add_argument("--side", type=int, default=64, help="in-plane size H = W of every volume (pixels)")
    p.add_argument("--samples", type=int, default=300, help="random accesses to time")
    p.add_argument("--cache-size", type=int, default=4, help="decoded volumes kept by the LRU cache")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--large", action="store_true",
                   help="also time random slices of one 64×512×512 CT phantom: whole-case decode vs partial_decode_mb")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)
    if a.reuse and not a.dir:
        p.error("--reuse needs --dir (the tree to index)")

    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench_index_"))
    try:
        if not a.reuse:
            t0 = time.perf_counter()
            write_tree(root, a.n_files, (a.min_depth, a.max_depth), a.side, a.seed)
            print(f"tree written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rss_before = rss_mb()
        t0 = time.perf_counter()
        index = data.SliceIndex(root, cache_size=a.cache_size)
        index_time_s = time.perf_counter() - t0
        rss_after = rss_mb()
        n_files = len(index.files)
        res = {"files": n_files, "slices": len(index), "index_time_s": round(index_time_s, 3),
               "files_per_s": round(n_files / index_time_s, 1),
               "decoded_during_indexing": index.n_decoded,
               "rss_before_index_mb": round(rss_before, 1), "rss_after_index_mb": round(rss_after, 1),
               "index_rss_delta_mb": round(rss_after - rss_before, 1)}

        # the same tree again with a persistent header cache: first run fills it, second reuses it
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "headers.json"
            t0 = time.perf_counter()
            data.SliceIndex(root, header_cache=cache)
            res["cache_fill_files_per_s"] = round(n_files / (time.perf_counter() - t0), 1)
            t0 = time.perf_counter()
            again = data.SliceIndex(root, header_cache=cache)
            res["cached_files_per_s"] = round(n_files / (time.perf_counter() - t0), 1)
            res["cache_hits"] = again.header_cache_hits
            res["header_cache_kb"] = round(cache.stat().st_size / 1024, 1)

        t0 = time.perf_counter()
        sampler = data.BalancedSampler(index, strategy="min")
        epoch = sampler.rank_indices()
        res["sampler_epoch_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        res["epoch_samples"] = int(epoch.size)

        rng = np.random.default_rng(a.seed)
        draws = rng.integers(0, len(index), size=a.samples)
        t0 = time.perf_counter()
        for i in draws:
            index.slice(*index.locate(int(i)))
        res["random_slice_ms"] = round((time.perf_counter() - t0) * 1e3 / a.samples, 3)
        res["random_decodes"] = index.n_decoded

        ds = data.SegmentationDataset(index, bbox_shift=10, flip=True, seed=a.seed)
        t0 = time.perf_counter()
        for i in draws:
            ds[int(i)]
        res["random_sample_ms"] = round((time.perf_counter() - t0) * 1e3 / a.samples, 3)

        f = int(np.argmax(index.n_slices))  # sequential pass through the deepest volume: cache hits
        start = index.global_index(f, 0)
        before = index.n_decoded
        t0 = time.perf_counter()
        for z in range(int(index.n_slices[f])):
            ds[start + z]
        res["sequential_sample_ms"] = round((time.perf_counter() - t0) * 1e3 / int(index.n_slices[f]), 3)
        res["sequential_decodes"] = index.n_decoded - before

        if a.large:  # cache-miss regime on one CT-sized volume: whole-case decode vs slice-only reads
            big = root.parent / (root.name + "_large") / "3DBox_CT_large.npz"
            case = phantoms.make_synthetic_case("3D", (64, 512, 512), 6, "CT", seed=a.seed)
            data.write_case(big, case)
            zs = rng.integers(0, 64, size=12)
            for mode, kw in (("full_decode", {}), ("partial_decode", {"partial_decode_mb": 0.0})):
                idx = data.SliceIndex([big], cache_size=0, **kw)
                t0 = time.perf_counter()
                for z in zs:
                    idx.slice(0, int(z))
                res[f"large_{mode}_slice_ms"] = round((time.perf_counter() - t0) * 1e3 / zs.size, 1)
            res["large_shape"] = list(case["imgs"].shape)
            shutil.rmtree(big.parent, ignore_errors=True)
        res["peak_rss_mb"] = round(peak_rss_mb(), 1)
        res["tree"] = {"dir": str(root), "side_px": a.side, "depth": [a.min_depth, a.max_depth],
                       "bytes": sum(p.stat().st_size for p in index.files)}
    finally:
        if not a.keep and not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
