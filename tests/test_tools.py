"""The benchmark tools run and report what they promise, on tiny inputs (their figures come from full
runs documented in docs/)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_index_runs_on_a_tiny_tree(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tools.bench_index", "--dir", str(tmp_path / "tree"), "--n-files", "12",
                          "--max-depth", "10", "--side", "32", "--samples", "10", "--out", str(tmp_path / "r.json")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["files"] == 12 and res["decoded_during_indexing"] == 0 and res["sequential_decodes"] <= 1
    assert res["files_per_s"] > 0 and res["random_sample_ms"] > 0


def test_bench_batch_times_encoder_calls_of_several_slices(oracle_dir, tmp_path):
    """bench_batch.py (slices per encoder call, static vs dynamic input shape) runs through
    infer.OpenVINOModel: a row per batch size with positive times and the peak RSS of its own
    subprocess; a missing model is one line."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "tools.bench_batch", *args], cwd=REPO, capture_output=True,
                              text=True)

    out = run("-m", str(oracle_dir), "--batches", "1", "4", "--rounds", "1", "--precision", "f32")
    assert out.returncode == 0, out.stderr
    assert "(float ops: f32;" in out.stdout
    rows = {int(line.split()[0]): [float(v) for v in line.split()[1:]]
            for line in out.stdout.splitlines() if line.split() and line.split()[0].isdigit()}
    assert set(rows) == {1, 4}
    assert rows[1][3] == 1.0  # static per-slice speed relative to batch 1
    assert all(dyn > 0 and static > 0 and rss > 50 for dyn, static, _, _, rss in rows.values())
    bad = run("-m", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and "no encoder.xml" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
