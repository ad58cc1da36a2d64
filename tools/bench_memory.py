"""Peak memory of infer.py's pipeline against box count, image size and decoder block size.

Each point is one fresh `python infer.py` subprocess on a one-case input folder; its peak RSS is the
child's own VmHWM (/proc/self/status) read as it exits. (Not getrusage/wait4 ru_maxrss: Linux carries
the parent's RSS at fork into the child's ru_maxrss, so a big parent would inflate every point.)

    python bench_memory.py -m MODEL_DIR            # the default grid, a table on stdout
    python bench_memory.py -m models/default --boxes 1,255 --sizes 2560x1920 --blocks 16

The default -b of infer.py is chosen from this table: the smallest block whose time is within a few
per cent of the fastest, since memory grows with the block for a real decoder (N×256×64×64 embeddings
and N×32×256×256 upscaled features per call) while the time per box stops improving.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/bench_memory.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data
from tools import phantoms

REPO_DIR = Path(__file__).resolve().parents[1]
BOX_COUNTS = (1, 16, 64, 128, 255)
SIZES = ("512x512", "2560x1920", "4032x3024")  # W×H
BLOCKS = (1, 16, 64, 255)
SWEEP_SIZE = "2560x1920"  # the memory case: 255 boxes on this image must stay well under 8 GB


def measure(model_dir: Path, width: int, height: int, n_boxes: int, block: int, work: Path,
            extra: list[str]) -> tuple[float, float, int]:
    """(peak_rss_mb, time_s, exit code) of one infer.py run on one generated case."""
    inp, out = work / f"in_{width}x{height}_{n_boxes}", work / "out"
    if not inp.exists():
        inp.mkdir()
        case = phantoms.make_synthetic_case("2D", (height, width), n_boxes, "Microscopy", seed=0)
        data.write_case(inp / f"2DBox_Bench_{width}x{height}_{n_boxes}.npz", case, with_gts=False)
    argv = ["infer.py", "-i", str(inp), "-o", str(out), "-m", str(model_dir),
            "-b", str(block), "-q", "--overwrite", "--times", "", *extra]
    code = (f"import os, runpy, sys\nsys.argv = {argv!r}\nrc = 0\n"
            "def _exit(code):\n    raise SystemExit(code)\n"
            "os._exit = _exit  # infer.py ends with os._exit: return here to read the peak\n"
            f"try:\n    runpy.run_path({str(REPO_DIR / 'infer.py')!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code or 0\n"
            "from tools.benchlib import peak_rss_mb\nprint('peak_rss_mb', peak_rss_mb())\nsys.exit(rc)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True,
                          encoding="utf-8", errors="replace")
    time_s = time.perf_counter() - t0
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    peak = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("peak_rss_mb")]
    return (float(peak[-1]) if peak else float("nan")), time_s, proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Peak RSS of infer.py vs box count, image size and -b "
                                "(one subprocess per point).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", type=Path, default=REPO_DIR / "models" / "default", help="model dir for infer.py")
    p.add_argument("--boxes", default=",".join(map(str, BOX_COUNTS)), help="box counts (at --sweep-size)")
    p.add_argument("--sizes", default=",".join(SIZES), help="image sizes WxH (at the largest box count)")
    p.add_argument("--blocks", default=",".join(map(str, BLOCKS)),
                   help="-b values (at --sweep-size, largest box count)")
    p.add_argument("-b", "--block", type=int, default=16, help="-b for the box-count and size sweeps")
    p.add_argument("--sweep-size", default=SWEEP_SIZE, help="image size WxH of the box-count and block sweeps")
    p.add_argument("--infer-args", default="--precision f32", help="extra infer.py arguments (one string)")
    args = p.parse_args(argv)

    size = lambda s: tuple(int(v) for v in s.lower().split("x"))  # noqa: E731
    boxes = [int(v) for v in args.boxes.split(",") if v]
    sizes = [size(s) for s in args.sizes.split(",") if s]
    blocks = [int(v) for v in args.blocks.split(",") if v]
    sweep = size(args.sweep_size)
    n_max = max(boxes)
    points = ([("boxes", *sweep, n, args.block) for n in boxes]
              + [("size", w, h, n_max, args.block) for w, h in sizes if (w, h) != sweep]
              + [("block", *sweep, n_max, b) for b in blocks if b != args.block])
    print(f"model {args.model}, infer.py {args.infer_args}", file=sys.stderr)
    print(f"{'sweep':<6} {'image':>10} {'boxes':>5} {'-b':>4} {'peak_rss_mb':>11} {'time_s':>7}")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for sweep_name, w, h, n, b in points:
            rss_mb, time_s, rc = measure(args.model, w, h, n, b, Path(tmp), args.infer_args.split())
            failed += rc != 0
            print(f"{sweep_name:<6} {f'{w}x{h}':>10} {n:>5} {b:>4} {rss_mb:>11.0f} {time_s:>7.2f}"
                  + ("" if rc == 0 else f"  (exit {rc})"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
