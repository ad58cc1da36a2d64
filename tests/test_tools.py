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


def test_distill_splits_the_encoder_exactly_where_the_float_prefix_ends():
    import torch

    import model as model_lib
    from tools import distill
    torch.manual_seed(0)
    student = model_lib.build_model(None, quant_encoder=True, quant_decoder=False)
    assert distill.first_quantized_stage(student) == 1  # patch embedding and stage 0 float by default
    everything = model_lib.build_model(None, quant_encoder=True, float_layers=())
    assert distill.first_quantized_stage(everything) == -1
    teacher = model_lib.build_model(None).eval()
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        whole = teacher.encode(image)
        enc = teacher.image_encoder
        split = distill.encoder_suffix(enc, distill.encoder_prefix(enc, image, 1), 1)
        assert torch.equal(distill.encoder_prefix(teacher.image_encoder, image, -1), image)
    assert torch.allclose(split, whole, atol=1e-6)


def test_distill_epochs_draw_each_modality_equally_without_repeats():
    import collections

    import numpy as np

    from tools import distill
    modality = ["CT"] * 30 + ["MR"] * 7 + ["Microscopy"] * 4 + ["US"] * 9
    train = [i for i in range(len(modality)) if i % 8]  # with gaps, as the held-out samples leave them
    rng = np.random.default_rng(0)
    epochs = [distill.epoch_order(train, modality, "min", rng) for _ in range(100)]
    for order in epochs:
        assert len(order) == len(set(order)) and set(order) <= set(train)
        assert set(collections.Counter(modality[i] for i in order).values()) == {3}  # Ns(m): the smallest, Microscopy
        assert len(order) == distill.epoch_size(train, modality, "min")
    assert {i for order in epochs for i in order} == set(train)  # over epochs every CT sample comes round
    assert sorted(distill.epoch_order(train, modality, "all", rng)) == train
    assert distill.epoch_size(train, modality, "all") == len(train)
    assert len(distill.epoch_order(train, modality, "max10", rng)) == distill.epoch_size(train, modality, "max10")


def test_distill_trains_on_the_tune_half_only():
    import data
    from tools import distill
    samples = distill.tune_samples(REPO / "devset" / "imgs", "tune", per_volume=1)
    names = {name for _, _, name, _ in samples}
    assert names and all(data.half_of(REPO / "devset" / "imgs" / n) == "tune" for n in names)
    assert all(img.shape == (3, 256, 256) and len(bx) > 0 and bx.shape[1] == 4 for img, bx, _, _ in samples)
    bare = distill.tune_samples(REPO / "devset" / "imgs", "tune", per_volume=1, masks=False)
    assert [s[2] for s in bare] == [s[2] for s in samples] and all(s[3] is None for s in bare)


def test_distill_label_masks_sit_in_their_boxes_also_when_mirrored():
    """The IoU-weighted loss compares the teacher's mask for box i with label i + 1 of the same slice."""
    import numpy as np

    from tools import distill
    samples = distill.tune_samples(REPO / "devset" / "imgs", "tune", per_volume=1)
    inside, total, mirrored = 0, 0, 0
    for _, bx, name, gts in samples:
        assert gts is not None and gts.shape == (len(bx), 256, 256) and gts.dtype == np.uint8
        for (x0, y0, x1, y1), m in zip(bx.round().astype(int), gts):
            inside += int(m[max(y0 - 2, 0):y1 + 3, max(x0 - 2, 0):x1 + 3].sum())
            total += int(m.sum())
        mirrored += name.startswith("2D")
    assert mirrored % 2 == 0 and total > 0
    assert inside / total > 0.97  # a label mirrored apart from its box, or the wrong label, lands outside


def test_encoder_budget_split_parts_compute_the_whole_encoder():
    """The lower bound's suffix is the shipped IR's own stages 1–3 and neck, not a different graph."""
    import numpy as np
    import openvino as ov

    from tools import encoder_budget
    core = ov.Core()
    xml = str(REPO / "models" / "default" / "encoder.xml")
    whole = core.read_model(xml)
    whole.reshape({whole.inputs[0]: [1, 3, 256, 256]})
    prefix, suffix = encoder_budget.split_model(core.read_model(xml), 1)
    assert suffix.inputs[0].get_partial_shape().to_shape()[-1] == 128  # stage 1's width, tokens of 128×128
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    image = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
    expect = core.compile_model(whole, "CPU", f32)({0: image})[0]
    prefix.reshape({prefix.inputs[0]: [1, 3, 256, 256]})
    mid = core.compile_model(prefix, "CPU", f32)({0: image})[0]
    got = core.compile_model(suffix, "CPU", f32)({0: mid})[0]
    assert got.shape == expect.shape == (1, 256, 64, 64)
    np.testing.assert_allclose(got, expect, atol=1e-4 * np.abs(expect).max())
    with pytest.raises(ValueError, match="expected one tensor"):
        encoder_budget.split_model(core.read_model(xml), 5)


def test_encoder_budget_prints_groups_and_the_bound_below_stage_one():
    import re
    out = subprocess.run([sys.executable, "-m", "tools.encoder_budget", "--repeats", "3", "--ops", "3", "--split", "1",
                          "--bandwidth-gbs", "20"], cwd=REPO, capture_output=True, encoding="utf-8", errors="replace")
    assert out.returncode == 0, out.stderr
    groups = re.findall(r"^\| (stage \d|neck|io|patch_embed) \| ([^|]+) \| (\w+) \|", out.stdout, re.M)
    assert ("stage 2", "FullyConnected", "i8") in [(s, k.strip(), p) for s, k, p in groups]
    t = {k: float(v) for k, v in re.findall(r"(whole encoder|\(prefix\)|\(suffix\)|int8 peak|below)\s+([\d.]+) ms",
                                            out.stdout)}
    assert len(t) == 5 and 0 < t["int8 peak"] < t["(prefix)"] and t["(suffix)"] < t["whole encoder"]
    assert t["below"] == pytest.approx(t["(suffix)"] + t["int8 peak"], abs=0.11)
