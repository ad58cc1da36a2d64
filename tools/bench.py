"""Speed, memory and accuracy of the inference paths, side by side in one run.

    python -m tools.bench                 # all rows on the synthetic benchmark set + the dev set
    python -m tools.bench --sets bench --rows a,d --repeats 3

Rows (each runs in its own subprocess, one after another, so each peak RSS is its own):
  a  fp32 PyTorch LiteMedSAM through our pipeline (the baseline path)
  b  OpenVINO fp32 IR, INFERENCE_PRECISION_HINT f32
  c  the same IR, bf16
  d  the int8 IR (models/default), f32 hint for the ops left in float
  d' the int8 IR with bf16 for the ops left in float (what `--precision auto` gives on this CPU)
  e  ONNX Runtime on the int8 QCDQ ONNX
Columns: encoder ms (1×3×256×256), decoder ms (1 box, 64 boxes): medians over --repeats after warm-up;
per-set seconds = sum of per-case times (load → segs, like the challenge's timer, minus the write);
peak RSS of the row's process over the case pipeline (measured before the latency calls: a
64-box decoder call alone needs ~3 GB); mean DSC/NSD (metrics.py, as the challenge) where gts exist; and each row's
speed ratio to row a (whole-set time and encoder time). Shared, noisy machine: compare ratios, not
absolute times, and rerun before trusting a small difference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/bench.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from tools.benchlib import median_ms, peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    "a": ("torch", "fp32", "f32", "fp32 PyTorch (baseline path)"),
    "b": ("openvino", "fp32", "f32", "OpenVINO fp32 IR, f32"),
    "c": ("openvino", "fp32", "bf16", "OpenVINO fp32 IR, bf16"),
    "d": ("openvino", "int8", "f32", "OpenVINO int8 IR, f32 rest"),
    "d'": ("openvino", "int8", "bf16", "OpenVINO int8 IR, bf16 rest"),
    "e": ("onnxruntime", "int8", "f32", "ONNX Runtime int8 QCDQ"),
}


def run_row(row: str, model_dirs: dict[str, Path], sets: list[tuple[Path, Path | None]], repeats: int,
            threads: int | None, block: int) -> dict:
    """One row in this process: the pipeline over every case (time, accuracy, peak RSS), then latencies."""
    import infer
    import metrics

    backend, weights, precision, _ = ROWS[row]
    t0 = time.perf_counter()
    if backend == "torch":
        import torch

        import model
        import train

        if threads:
            torch.set_num_threads(threads)
        net = train.TorchModel(model.build_model("published"))
    else:
        net = infer.load_model(model_dirs[weights], backend, precision, threads, infer.DEFAULT_CACHE_DIR)
    load_s = time.perf_counter() - t0

    out = {"row": row, "precision": net.precision, "load_s": load_s}
    for cases_dir, gts_dir in sets:
        rows, total_s, encoder_calls = [], 0.0, 0
        for path in sorted(cases_dir.glob("*.npz")):
            t0 = time.perf_counter()
            case = infer.load_case(path)
            calls0 = net.encoder_calls
            segs = infer.segment_case(net, case, block)
            dt = time.perf_counter() - t0
            total_s += dt
            encoder_calls += net.encoder_calls - calls0
            gt_path = gts_dir / path.name if gts_dir else None
            if gt_path and gt_path.is_file():
                with np.load(gt_path) as g:
                    gts = g["gts"]
                    spacing = tuple(float(s) for s in g["spacing"]) if "spacing" in g else None
                dsc, nsd = metrics.case_metrics(gts, segs, spacing, case.is_3d)
                rows.append({"case": path.name, "modality": metrics.modality_of(path.name), "dsc": dsc,
                             "nsd": nsd, "time_s": dt})
            print(f"bench[{row}]: {path.name} {dt:.2f} s", file=sys.stderr, flush=True)
        summary = metrics.summarise(rows) if rows else {}
        out[str(cases_dir)] = {"total_s": total_s, "encoder_calls": encoder_calls, "cases": rows,
                               "summary": summary}
    out["peak_rss_mb"] = peak_rss_mb()  # the pipeline's peak (blocks of -b boxes), before the 64-box latency call
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, 256, 256), dtype=np.float32)
    embedding = net.encode(image)
    boxes1 = np.array([[60, 60, 180, 200]], np.float32)
    boxes64 = np.concatenate([rng.uniform(0, 120, (64, 2)), rng.uniform(130, 255, (64, 2))], 1).astype(np.float32)
    out.update({"encoder_ms": median_ms(lambda: net.encode(image), repeats),
                "decoder1_ms": median_ms(lambda: net.decode(embedding, boxes1), repeats),
                "decoder64_ms": median_ms(lambda: net.decode(embedding, boxes64), max(1, repeats // 2))})
    return out


def ensure_fp32_ir(path: Path) -> None:
    """Export the published LiteMedSAM as a plain fp32 IR once (export.py) if it is not there."""
    if (path / "encoder.xml").is_file() and (path / "decoder.xml").is_file():
        return
    print(f"bench: exporting the fp32 LiteMedSAM to {path} (once)", file=sys.stderr)
    subprocess.run([sys.executable, str(REPO / "export.py"), "--checkpoint", "published", "--fp32",
                    "--out", str(path)], check=True, cwd=REPO)


def ensure_bench_set(path: Path) -> None:
    if not (path / "imgs").is_dir():
        from tools import phantoms

        print(f"bench: writing the synthetic benchmark set to {path}", file=sys.stderr)
        phantoms.write_bench_set(path)


def list_set(list_file: Path, devset: Path, work: Path) -> Path:
    """A folder with imgs/ and gts/ holding links to the dev-set cases a list file names (one per line,
    '#' comments), so a frozen case list runs like any other set."""
    names = [ln.split("#")[0].strip() for ln in list_file.read_text().splitlines()]
    names = [n if n.endswith(".npz") else n + ".npz" for n in names if n]
    root = work / list_file.stem
    for sub in ("imgs", "gts"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for old in (root / sub).glob("*.npz"):
            old.unlink()
    missing = [n for n in names if not (devset / "imgs" / n).is_file()]
    if missing:
        raise SystemExit(f"bench: {list_file}: not in {devset}/imgs: {', '.join(missing[:5])}")
    for n in names:
        (root / "imgs" / n).symlink_to((devset / "imgs" / n).resolve())
        if (devset / "gts" / n).is_file():
            (root / "gts" / n).symlink_to((devset / "gts" / n).resolve())
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", default="a,b,c,d,d',e", help="which rows, comma-separated (see the module doc)")
    p.add_argument("--sets", default="bench,dev", help="case sets: bench (synthetic), dev (devset/), demo, "
                   "a .txt list of dev-set case names (e.g. tools/bench_cases.txt), or a folder with imgs/ and gts/")
    p.add_argument("--int8", type=Path, default=REPO / "models" / "default", help="int8 model dir (rows d, d', e)")
    p.add_argument("--fp32", type=Path, default=REPO / "runs" / "models" / "fp32",
                   help="fp32 IR dir (rows b, c); exported from the published weights if missing")
    p.add_argument("--bench-dir", type=Path, default=REPO / "runs" / "bench_set", help="where the synthetic set lives")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per latency (median)")
    p.add_argument("--threads", type=int, default=None, help="inference threads (none = runtime default)")
    p.add_argument("-b", "--block", type=int, default=None, help="boxes per decoder call (default infer.py's)")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = p.parse_args(argv)

    sets: list[tuple[Path, Path | None]] = []
    for name in args.sets.split(","):
        if name == "bench":
            ensure_bench_set(args.bench_dir)
            root = args.bench_dir
        elif name in ("dev", "demo"):
            root = REPO / ("devset" if name == "dev" else "demo")
        elif name.endswith(".txt"):
            root = list_set(Path(name), REPO / "devset", REPO / "runs" / "bench_lists")
        else:
            root = Path(name)
        sets.append((root / "imgs", root / "gts" if (root / "gts").is_dir() else None))

    import infer

    block = args.block or infer.DEFAULT_BLOCK
    dirs = {"fp32": args.fp32, "int8": args.int8}
    if args.worker:
        result = run_row(args.worker, dirs, sets, args.repeats, args.threads, block)
        print("BENCH_JSON " + json.dumps(result, default=float))
        return 0

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if any(ROWS[r][1] == "fp32" and ROWS[r][0] != "torch" for r in rows):
        ensure_fp32_ir(args.fp32)
    if any(ROWS[r][1] == "int8" for r in rows) and not (args.int8 / "encoder.xml").is_file():
        print(f"bench: error: no int8 model in {args.int8} (python export.py ... --out {args.int8})", file=sys.stderr)
        return 2

    results = {}
    for r in rows:  # one after another: never two rows competing for the 2 cores
        cmd = [sys.executable, "-m", "tools.bench", "--worker", r, "--sets", args.sets, "--int8", str(args.int8),
               "--fp32", str(args.fp32), "--bench-dir", str(args.bench_dir), "--repeats", str(args.repeats),
               "-b", str(block)] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, encoding="utf-8", errors="replace", cwd=REPO)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
        if proc.returncode or not line:
            print(f"bench: row {r} failed (exit {proc.returncode})", file=sys.stderr)
            continue
        results[r] = json.loads(line[-1][len("BENCH_JSON "):])

    print(format_results(results, [s for s, _ in sets]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0 if len(results) == len(rows) else 1


def format_results(results: dict, set_dirs: list[Path]) -> str:
    """The table: one line per row; per set: seconds, DSC/NSD; ratios to row a."""
    base = results.get("a")
    set_names = [d.parent.name for d in set_dirs]
    head = f"{'row':<4} {'path':<30} {'prec':<5} {'enc ms':>7} {'dec1 ms':>8} {'dec64 ms':>9} {'RSS MB':>7}"
    for n in set_names:
        head += f" | {n + ' s':>9} {'DSC':>6} {'NSD':>6} {'×a':>5}"
    head += f" | {'enc ×a':>6}"
    lines = [head, "-" * len(head)]
    for r, res in results.items():
        line = (f"{r:<4} {ROWS[r][3]:<30} {res['precision'][:5]:<5} {res['encoder_ms']:7.1f} "
                f"{res['decoder1_ms']:8.1f} {res['decoder64_ms']:9.1f} {res['peak_rss_mb']:7.0f}")
        for d in set_dirs:
            s = res[str(d)]
            overall = s["summary"].get("overall", {})
            ratio = base[str(d)]["total_s"] / s["total_s"] if base and s["total_s"] else float("nan")
            line += (f" | {s['total_s']:9.1f} {overall.get('dsc', float('nan')):6.4f} "
                     f"{overall.get('nsd', float('nan')):6.4f} {ratio:5.2f}")
        enc_ratio = base["encoder_ms"] / res["encoder_ms"] if base else float("nan")
        line += f" | {enc_ratio:6.2f}"
        lines.append(line)
    lines.append("")
    lines.append("per-modality DSC / NSD:")
    for d in set_dirs:
        mods = sorted({m for res in results.values() for m in res[str(d)]["summary"]} - {"overall"})
        if not mods:
            continue
        lines.append(f"  {d.parent.name}: " + "  ".join(f"{m}" for m in mods))
        for r, res in results.items():
            summ = res[str(d)]["summary"]
            lines.append(f"    {r:<3} " + "  ".join(
                f"{m}={summ[m]['dsc']:.3f}/{summ[m]['nsd']:.3f}(n={summ[m]['n']})" for m in mods if m in summ))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
