"""Encoder time and peak RSS against the number of 3D slices per encoder call (issue 7: "consider
batching several slices of a 3D volume into one encoder call").

    python bench_batch.py                                  # models/default, batches 1 2 4, 2 rounds
    python bench_batch.py -m runs/models/fp32 --batches 1 2 4 8 --precision f32

Each (round, batch size, input shape) runs in its own subprocess so its peak RSS is its own; rounds
interleave them so the shared machine's drift hits them alike; the table shows the last round. Both
input shapes are timed: the IR's dynamic batch, and a static batch (what infer.py compiles, batch 1):
"static ×" is dynamic / static time, "vs 1" the static per-slice speed relative to the first batch size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SLICES_PER_SIZE = 24  # timed slices per batch size (calls = SLICES_PER_SIZE // batch)


def worker(model_dir: str, batch: int, static: bool, precision: str, threads: int | None) -> dict:
    """Compile the model as infer.py does (with a static batch of `batch`, or the IR's dynamic batch)
    and time encoder calls on `batch` random 256×256 slices; returns ms per slice and this process's
    peak RSS."""
    import bench_index
    import infer
    net = infer.OpenVINOModel(Path(model_dir), precision=precision, threads=threads,  # infer.py's compile
                              encoder_batch=batch if static else None)
    image = np.random.default_rng(0).random((batch, 3, 256, 256), dtype=np.float32)
    for _ in range(2):  # warm-up: first calls allocate and tune kernels
        net.encode(image)
    times_s = []
    for _ in range(max(1, SLICES_PER_SIZE // batch)):
        t0 = time.perf_counter()
        net.encode(image)
        times_s.append(time.perf_counter() - t0)
    return {"batch": batch, "ms_per_slice": 1000 * float(np.median(times_s)) / batch,
            "peak_rss_mb": bench_index.peak_rss_mb(),
            "precision": net.precision}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", default=str(HERE / "models" / "default"), help="model dir with encoder.xml")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="slices per encoder call")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the table shows the last")
    p.add_argument("--precision", choices=("f32", "bf16", "auto"), default="auto",
                   help="INFERENCE_PRECISION_HINT for the float ops (auto: OpenVINO's default, infer.py's)")
    p.add_argument("--threads", type=int, default=None, help="inference threads (none = runtime default)")
    p.add_argument("--worker", type=int, nargs=2, default=None, help=argparse.SUPPRESS)  # batch, static
    args = p.parse_args(argv)
    if not (Path(args.model) / "encoder.xml").is_file():
        print(f"bench_batch.py: {args.model}: no encoder.xml (export a model first)", file=sys.stderr)
        return 2
    if args.worker is not None:
        batch, static = args.worker
        print(json.dumps(worker(args.model, batch, bool(static), args.precision, args.threads)))
        return 0
    rows = {}
    for _ in range(args.rounds):
        for batch in args.batches:
            for static in (0, 1):
                cmd = [sys.executable, str(Path(__file__).resolve()), "-m", args.model, "--precision",
                       args.precision, "--worker", str(batch), str(static)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE).stdout
                rows[batch, static] = json.loads(out.strip().splitlines()[-1])
    base = rows[args.batches[0], 1]["ms_per_slice"]
    print(f"{args.model}  (float ops: {rows[args.batches[0], 1]['precision']}; ms per slice, median)")
    print(f"{'slices/call':>11} {'dynamic ms':>10} {'static ms':>9} {'static ×':>8} {'vs ' + str(args.batches[0]):>6} "
          f"{'peak RSS MB':>11}")
    for batch in args.batches:
        dyn, sta = rows[batch, 0], rows[batch, 1]
        print(f"{batch:>11} {dyn['ms_per_slice']:>10.1f} {sta['ms_per_slice']:>9.1f} "
              f"{dyn['ms_per_slice'] / sta['ms_per_slice']:>8.2f} {base / sta['ms_per_slice']:>6.2f} {sta['peak_rss_mb']:>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
