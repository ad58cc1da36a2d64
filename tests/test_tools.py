"""The benchmark tools run and report what they promise, on tiny inputs (their figures come from full
runs documented in docs/)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_index_runs_on_a_tiny_tree(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tools.bench_index", "--dir", str(tmp_path / "tree"), "--n-files", "12",
                          "--max-depth", "10", "--side", "32", "--samples", "10", "--out", str(tmp_path / "r.json")],
                         cwd=REPO, capture_output=True, encoding="utf-8", errors="replace")
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
                              encoding="utf-8", errors="replace")

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


def test_bench_case_list_becomes_a_set_of_links(tmp_path):
    """bench.py --sets LIST.txt: the named dev-set cases (and their gts) as a folder set; a name that is
    not in the dev set stops the run with the file named."""
    from tools import bench

    dev = tmp_path / "dev"
    for sub, name in (("imgs", "2DBox_US_a.npz"), ("gts", "2DBox_US_a.npz"), ("imgs", "3DBox_CT_b.npz")):
        (dev / sub).mkdir(parents=True, exist_ok=True)
        np.savez(dev / sub / name, x=np.arange(3))
    listed = tmp_path / "few.txt"
    listed.write_text("# a comment\n2DBox_US_a\n3DBox_CT_b.npz  # with a note\n")
    root = bench.list_set(listed, dev, tmp_path / "work")
    assert sorted(p.name for p in (root / "imgs").iterdir()) == ["2DBox_US_a.npz", "3DBox_CT_b.npz"]
    assert [p.name for p in (root / "gts").iterdir()] == ["2DBox_US_a.npz"]
    assert np.load(root / "imgs" / "3DBox_CT_b.npz")["x"].tolist() == [0, 1, 2]
    listed.write_text("2DBox_US_missing\n")
    with pytest.raises(SystemExit, match="few.txt.*2DBox_US_missing"):
        bench.list_set(listed, dev, tmp_path / "work")


def test_committed_bench_list_names_dev_set_cases(tmp_path):
    from tools import bench

    root = bench.list_set(REPO / "tools" / "bench_cases.txt", REPO / "devset", tmp_path)
    assert len(list((root / "imgs").iterdir())) == len(list((root / "gts").iterdir())) == 51


def test_product_code_never_imports_tools():
    """The top-level scripts (what the Docker image and train/export users run) stand without tools/."""
    import ast
    product = sorted(REPO.glob("*.py"))
    assert {p.name for p in product} >= {"data.py", "model.py", "infer.py", "export.py", "train.py"}
    for path in product:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "tools" or n.startswith("tools.") for n in names), f"{path.name} imports {names}"
