"""Encoder time and peak RSS against the number of 3D slices per encoder call, and static vs dynamic
input shapes.

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
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/bench_batch.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SLICES_PER_SIZE = 24  # timed slices per batch size (calls = SLICES_PER_SIZE // batch)


def worker(model_dir: str, batch: int, static: bool, precision: str, threads: int | None) -> dict:
    """Compile the model as infer.py does (with a static batch of `batch`, or the IR's dynamic batch)
    and time encoder calls on `batch` random 256×256 slices; returns ms per slice and this process's
    peak RSS."""
    import infer
    from tools.benchlib import median_ms, peak_rss_mb
    net = infer.OpenVINOModel(Path(model_dir), precision=precision, threads=threads,  # infer.py's compile
                              encoder_batch=batch if static else None)
    image = np.random.default_rng(0).random((batch, 3, 256, 256), dtype=np.float32)
    ms = median_ms(lambda: net.encode(image), max(1, SLICES_PER_SIZE // batch), warmup=2)
    return {"batch": batch, "ms_per_slice": ms / batch, "peak_rss_mb": peak_rss_mb(),
            "precision": net.precision}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", default=str(REPO / "models" / "default"), help="model dir with encoder.xml")
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
                cmd = [sys.executable, "-m", "tools.bench_batch", "-m", args.model, "--precision",
                       args.precision, "--worker", str(batch), str(static)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                out = subprocess.run(cmd, check=True, capture_output=True,
                                     encoding="utf-8", errors="replace", cwd=REPO).stdout
                rows[batch, static] = json.loads(out.strip().splitlines()[-1])
    base = rows[args.batches[0], 1]["ms_per_slice"]
    print(f"{args.model}  (float ops: {rows[args.batches[0], 1]['precision']}; ms per slice, median)")
    print(f"{'slices/call':>11} {'dynamic ms':>10} {'static ms':>9} {'static ×':>8} {'vs ' + str(args.batches[0]):>6} "
          f"{'peak RSS MB':>11}")
    for batch in args.batches:
        dyn, sta = rows[batch, 0], rows[batch, 1]
        print(f"{batch:>11} {dyn['ms_per_slice']:>10.1f} {sta['ms_per_slice']:>9.1f} "
              f"{dyn['ms_per_slice'] / sta['ms_per_slice']:>8.2f} {base / sta['ms_per_slice']:>6.2f} "
              f"{sta['peak_rss_mb']:>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
