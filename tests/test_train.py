"""train.py: the LR schedule at its corners, config precedence, the 3D eval window, and (slow) CPU
smoke runs of the three stages, resume after a simulated kill, and a 2-process torchrun (gloo)."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import train
from tools import phantoms

ROOT = Path(__file__).resolve().parents[1]


# ---- fast tests ----


@pytest.mark.parametrize("nw,na", [(1, 5), (3, 10), (2, 2), (5, 31)])
def test_lr_at_corners_and_monotone(nw, na):
    base = 0.02
    assert math.isclose(train.lr_at(0, base, nw, na), 0.01 * base)           # start: 1 %
    assert math.isclose(train.lr_at(nw, base, nw, na), base)                  # end of warm-up
    assert math.isclose(train.lr_at(nw + na - 1, base, nw, na), 0.001 * base)  # end of annealing
    assert math.isclose(train.lr_at(nw + na + 7, base, nw, na), 0.001 * base)  # stays at the floor
    # monotone up during warm-up, monotone down during annealing (fractional epochs too)
    up = [train.lr_at(e, base, nw, na) for e in np.linspace(0, nw, 25)]
    down = [train.lr_at(e, base, nw, na) for e in np.linspace(nw, nw + na - 1, 25)]
    assert all(b > a for a, b in zip(up, up[1:]))
    assert all(b < a for a, b in zip(down, down[1:]))
    # cosine half-period Na − 1: the midpoint of annealing is halfway between LR and the floor
    mid = train.lr_at(nw + (na - 1) / 2, base, nw, na)
    assert math.isclose(mid, (base + 0.001 * base) / 2)


def test_lr_at_without_warmup():
    assert math.isclose(train.lr_at(0, 1.0, 0, 4), 1.0)
    assert math.isclose(train.lr_at(3, 1.0, 0, 4), 0.001)


def test_config_precedence(tmp_path):
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"lr": 0.5, "epochs": 7, "optim": "adamw"}))
    cfg = train.parse_config(["--config", str(js), "--epochs", "3"])
    assert (cfg.lr, cfg.epochs, cfg.optim) == (0.5, 3, "adamw")  # flag beats file beats default
    assert cfg.batch_size == train.batch_size
    assert cfg.anneal_epochs == 3 - cfg.warmup_epochs             # derived from the final epochs
    py = tmp_path / "c.py"
    py.write_text("stage = 2\nwarmup_epochs = 0\n")
    cfg = train.parse_config(["--config", str(py)])
    assert (cfg.stage, cfg.warmup_epochs, cfg.anneal_epochs) == (2, 0, train.epochs)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(SystemExit, match="learning_rate"):
        train.parse_config(["--config", str(bad)])


def test_extra_data_trains_but_never_evaluates(tmp_path):
    """--extra-data adds its cases to the training files only: the held-out split of --data is the
    same with and without it, and no extra case is ever evaluated."""
    real, synth = tmp_path / "real", tmp_path / "synth"
    phantoms.write_synthetic_set(real, n2d=4, n3d=2, seed=1, modalities_2d=("Endoscopy",), modalities_3d=("CT",))
    phantoms.write_synthetic_set(synth, n2d=3, n3d=1, seed=2, modalities_2d=("Endoscopy",), modalities_3d=("CT",),
                             tag="phantom")
    base_train, base_eval = train.split_files(train.parse_config(["--data", str(real)]))
    cfg = train.parse_config(["--data", str(real), "--extra-data", str(synth)])
    train_files, eval_files = train.split_files(cfg)
    extra = {str(f) for f in data.find_cases(synth)}
    assert eval_files == base_eval and base_eval
    assert set(train_files) == set(base_train) | extra and not extra & set(eval_files)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no npz cases"):
        train.split_files(train.parse_config(["--data", str(real), "--extra-data", str(tmp_path / "empty")]))
    with pytest.raises(SystemExit, match="no such directory"):
        train.split_files(train.parse_config(["--data", str(real), "--extra-data", str(tmp_path / "none")]))


def test_save_atomic_and_csv(tmp_path):
    path = tmp_path / "x.pth"
    train.save_atomic({"a": torch.ones(2)}, path)
    train.save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]  # no temporary left behind
    train.append_csv(tmp_path / "m.csv", {"epoch": 0, "lr": 0.1})
    train.append_csv(tmp_path / "m.csv", {"epoch": 1, "lr": 0.2})
    assert [r["epoch"] for r in train.read_csv(tmp_path / "m.csv")] == ["0", "1"]


def test_pseudo_label_data_shards(tmp_path):
    """--pseudo-label data: unlabeled cases (no gts, no boxes) join the epoch with random boxes
    inside the image content and labeled = 0; rank shards stay disjoint for both parts."""
    phantoms.write_synthetic_set(tmp_path, n2d=2, n3d=1, seed=3, modalities_2d=("Endoscopy",),
                             modalities_3d=("CT",))
    unl = tmp_path / "unlabeled"
    unl.mkdir()
    rng = np.random.default_rng(0)
    np.savez_compressed(unl / "2DBox_US_u_1.npz", imgs=rng.integers(0, 255, (120, 300, 3), np.uint8))
    np.savez_compressed(unl / "3DBox_MR_u_1.npz", imgs=rng.integers(0, 255, (5, 64, 80), np.uint8))
    files = [str(f) for f in data.find_cases(tmp_path)]
    shards = []
    for rank in (0, 1):
        cfg = train.parse_config(["--data", str(tmp_path), "--pseudo-label", "--seed", "4",
                                  "--samples-per-modality", "0"])
        ts = train.make_train_data(cfg, files, rank, 2)
        n_lab = len(ts.labeled)
        assert len(ts.unlabeled) == 1 + 5
        idx = ts.epoch_indices(0, 0, cfg.seed)
        shards.append(idx)
        for i in idx:
            item = ts[i]
            assert item["image"].shape == (3, 256, 256) and item["mask"].shape == (256, 256)
            assert item["labeled"] == int(i < n_lab)
            if i >= n_lab:
                x0, y0, x1, y1 = item["box_256"]
                assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
                assert not item["mask"].any()
    assert len(shards[0]) == len(shards[1])
    assert not set(shards[0]) & set(shards[1])
    both = set(shards[0]) | set(shards[1])
    assert sum(i >= n_lab for i in both) == 2   # Ns = min(1 US slice, 5 MR slices) per modality


class BoxNet(torch.nn.Module):
    """Stand-in for LiteMedSAM in the eval pipeline: the 'mask' of a box is the box itself
    (logit +10 inside, −10 outside, in the 256 model space)."""

    def encode(self, image):
        return torch.zeros(image.shape[0], 256, 64, 64)

    def decode(self, embedding, boxes_256):
        yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
        b = boxes_256[:, :, None, None]
        inside = (xx >= b[:, 0]) & (xx <= b[:, 2]) & (yy >= b[:, 1]) & (yy <= b[:, 3])
        return torch.where(inside, 10.0, -10.0)[:, None]


def test_evaluate_case_2d_and_3d_window(tmp_path, monkeypatch):
    """evaluate_case runs infer.segment_case on the torch model and metrics.case_metrics; with
    box-shaped predictions (and the pipeline's fallback defaults: linear mask upsampling, float
    boxes, the 3D box prompt) the scores equal metrics computed here from the boxes themselves."""
    import infer
    import metrics
    monkeypatch.setattr(infer, "PIPELINE_BY_MODALITY", {})
    monkeypatch.setattr(infer, "PROMPT_3D_BY_MODALITY", {})
    monkeypatch.setattr(infer, "PROMPT_3D_FALLBACK", "box")
    monkeypatch.setattr(infer, "PIPELINE_FALLBACK", {**infer.PIPELINE_FALLBACK,
                                                     "mask_interp": "linear", "box_rounding": "float"})
    paths = phantoms.write_synthetic_set(tmp_path, n2d=1, n3d=1, seed=5, modalities_2d=("Endoscopy",),
                                     modalities_3d=("CT",))
    cfg = train.parse_config(["--eval-max-slices", "3", "--eval-box-block", "2"])
    for path in paths:
        case = data.load_case(path, labels_path=data.find_labels(path))
        row = train.evaluate_case(BoxNet(), str(path), cfg, torch.device("cpu"))
        imgs, gts, boxes = case["imgs"], case["gts"], case["boxes"]
        if boxes.shape[1] == 4:
            seg = np.zeros(gts.shape, np.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes):
                box_256 = data.boxes_to_256(np.array([[x0, y0, x1, y1]]), gts.shape)[0]
                logits = BoxNet().decode(None, torch.from_numpy(box_256)[None])[0, 0].numpy()
                seg[data.postprocess_logits(logits, gts.shape)] = i + 1
            expect = metrics.case_metrics(gts, seg, None, False)
        else:
            kept = data.crop_z(np.arange(imgs.shape[0])[:, None, None], boxes, None, 3)[0].ravel()
            lo, hi = int(kept[0]), int(kept[-1]) + 1
            assert hi - lo == 3
            seg = np.zeros(gts[lo:hi].shape, np.uint8)
            for i, (x0, y0, z0, x1, y1, z1) in enumerate(boxes):
                box_256 = data.boxes_to_256(np.array([[x0, y0, x1, y1]]), gts.shape[1:])[0]
                logits = BoxNet().decode(None, torch.from_numpy(box_256)[None])[0, 0].numpy()
                m2d = data.postprocess_logits(logits, gts.shape[1:])
                for z in range(max(lo, int(z0)), min(hi, int(z1) + 1)):
                    seg[z - lo][m2d] = i + 1
            expect = metrics.case_metrics(gts[lo:hi], seg, case["spacing"], True)
        assert row["modality"] == metrics.modality_of(path)
        assert 0.0 < row["dsc"] < 1.0  # boxes overlap their objects but are not their masks
        assert math.isclose(row["dsc"], expect[0]) and math.isclose(row["nsd"], expect[1])


class TinySAM(torch.nn.Module):
    """A LiteMedSAM-shaped toy (same parts and encode/decode shapes, ~10 k parameters) to test the
    training loop without the 10 M-parameter model."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = torch.nn.Conv2d(3, 256, 4, stride=4)
        self.prompt_encoder = torch.nn.Linear(4, 256)
        self.mask_decoder = torch.nn.Conv2d(256, 16, 1)

    def encode(self, image):
        return self.image_encoder(image)

    def decode(self, embedding, boxes_256):
        x = embedding + self.prompt_encoder(boxes_256 / 256)[:, :, None, None]
        return torch.nn.functional.pixel_shuffle(self.mask_decoder(x), 4)  # N×1×256×256


@pytest.fixture(scope="module")
def tiny_mixed(tmp_path_factory):
    """2 labeled Endoscopy images + 1 unlabeled US image (no gts, no boxes)."""
    root = tmp_path_factory.mktemp("mixed")
    phantoms.write_synthetic_set(root, n2d=2, n3d=0, seed=6, modalities_2d=("Endoscopy",))
    (root / "unlabeled").mkdir()
    np.savez_compressed(root / "unlabeled" / "2DBox_US_u_1.npz",
                        imgs=np.random.default_rng(0).integers(0, 255, (90, 140, 3), np.uint8))
    return root


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_train_one_epoch_updates_only_the_stage_parts(tiny_mixed, stage):
    """Stage k trains exactly its parts (1: encoder, 2: decoder, 3: both; prompt encoder frozen);
    with --pseudo-label the unlabeled samples join and the loss stays finite."""
    tmp_path = tiny_mixed
    cfg = train.parse_config(["--stage", str(stage), "--pseudo-label", "--batch-size", "2",
                              "--lr", "0.1"])
    torch.manual_seed(0)
    net, teacher = TinySAM(), TinySAM().eval()
    parts = train.set_trainable(net, stage, False)
    ts = train.make_train_data(cfg, [str(f) for f in data.find_cases(tmp_path)], 0, 1)
    idx = ts.epoch_indices(0, 0, cfg.seed)
    assert any(i >= len(ts.labeled) for i in idx)
    loader = torch.utils.data.DataLoader(ts, batch_size=2, sampler=idx)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = train.make_optimizer([p for p in net.parameters() if p.requires_grad], cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loss, n, _ = train.train_one_epoch(train.StudentStep(net, parts["image_encoder"]), net, parts,
                                       teacher, loader, opt, scaler, cfg, torch.device("cpu"), 0, 0,
                                       False)
    assert math.isfinite(loss) and loss > 0 and n == len(idx)
    moved = {p: any(not torch.equal(before[k], v) for k, v in net.state_dict().items()
                    if k.startswith(p)) for p in ("image_encoder", "prompt_encoder", "mask_decoder")}
    assert moved == {"image_encoder": stage in (1, 3), "prompt_encoder": False,
                     "mask_decoder": stage in (2, 3)}


# ---- slow: real runs of the real model on a tiny synthetic set ----

# SGD: the resume test checks its momentum buffers
TINY = ["--batch-size", "1", "--max-steps", "1", "--calib-images", "1", "--eval-max-cases", "1",
        "--eval-fraction", "0.5", "--lr", "1e-3", "--seed", "0", "--optim", "sgd"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """2 Endoscopy 2D + 2 CT 3D cases (challenge layout); the split holds out one of each, the eval
    uses the 2D one (--eval-max-cases 1; the 3D eval path is tested above without the model)."""
    root = tmp_path_factory.mktemp("synth")
    phantoms.write_synthetic_set(root, n2d=2, n3d=2, seed=1, modalities_2d=("Endoscopy",),
                             modalities_3d=("CT",))
    return root


def rows_of(stage_dir: Path) -> list[dict]:
    with open(stage_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def chain(synth, tmp_path_factory):
    """Stage 1 (1 epoch) → stage 2 (killed after epoch 0: run with --epochs 1, then --resume with
    --epochs 2) → stage 3 (1 epoch), each from the previous stage's best.pth, in one run dir."""
    out = tmp_path_factory.mktemp("run")
    common = ["--data", str(synth), "--out", str(out), "--threads", "2", *TINY]
    schedule = ["--warmup-epochs", "1", "--anneal-epochs", "2"]
    train.main(["--stage", "1", "--epochs", "1", *schedule, "--eval-start", *common])
    train.main(["--stage", "2", "--epochs", "1", *schedule, "--no-eval-start", *common])
    shutil.copy(out / "stage2" / "last.pth", out / "stage2_killed.pth")
    train.main(["--stage", "2", "--epochs", "2", *schedule, "--resume", *common])
    with pytest.warns(UserWarning, match="amp"):
        train.main(["--stage", "3", "--epochs", "1", *schedule, "--no-eval-start", "--amp", *common])
    return out


CKPT_KEYS = {"model", "quant", "optimizer", "scaler", "epoch", "lr", "schedule", "config", "stage",
             "metrics", "best_metric", "best_epoch"}


@pytest.mark.slow
def test_three_stages_smoke(chain):
    expect_quant = {1: (True, False), 2: (True, True), 3: (True, True)}
    for k in (1, 2, 3):
        d = chain / f"stage{k}"
        rows = [r for r in rows_of(d) if int(r["epoch"]) >= 0]
        assert len(rows) == (2 if k == 2 else 1)
        for r in rows:
            assert math.isfinite(float(r["train_loss"])) and float(r["train_loss"]) > 0
            assert 0.0 <= float(r["eval_dsc"]) <= 1.0 and int(r["train_samples"]) == 1
        last = torch.load(d / "last.pth", map_location="cpu", weights_only=False)
        assert set(last) == CKPT_KEYS
        assert (last["quant"]["encoder"], last["quant"]["decoder"]) == expect_quant[k]
        assert last["stage"] == k and last["epoch"] == len(rows) - 1
        assert (d / "curves.png").stat().st_size > 0
        # the checkpoint rebuilds through model.py with the same quantized structure, strictly
        net = train.model_lib.build_model(str(d / "best.pth"))
        assert net.quant_config["encoder"] == expect_quant[k][0]
    # stage 1 scored its start model (row -1: the calibrated quantized LiteMedSAM), which competes
    # for best.pth: best is the highest eval DSC over the start and every epoch
    rows1 = rows_of(chain / "stage1")
    assert rows1[0]["epoch"] == "-1"
    best1 = torch.load(chain / "stage1" / "best.pth", map_location="cpu", weights_only=False)
    dscs1 = [float(r["eval_dsc"]) for r in rows1]
    assert best1["best_epoch"] == best1["epoch"] == int(rows1[int(np.argmax(dscs1))]["epoch"])
    assert math.isclose(best1["best_metric"], max(dscs1), rel_tol=1e-9)
    # stage 2: best.pth is the epoch with the highest eval DSC
    dscs = [float(r["eval_dsc"]) for r in rows_of(chain / "stage2")]
    best2 = torch.load(chain / "stage2" / "best.pth", map_location="cpu", weights_only=False)
    assert best2["best_epoch"] == best2["epoch"] == int(np.argmax(dscs))
    assert math.isclose(best2["metrics"]["dsc"], max(dscs), rel_tol=1e-9)
    # stage 2 started from stage 1's best and kept its encoder frozen (bit-identical weights)
    enc = [k for k in best1["model"] if k.startswith("image_encoder.")]
    assert enc and all(torch.equal(best1["model"][k], best2["model"][k]) for k in enc)
    assert best2["config"]["init"] is None  # the default chain, not an explicit --init
    # stage 3 (from stage 2's best) trains encoder and decoder, leaves the float prompt encoder
    s3 = torch.load(chain / "stage3" / "last.pth", map_location="cpu", weights_only=False)
    changed = lambda prefix: any(not torch.equal(best2["model"][k], s3["model"][k])  # noqa: E731
                                 for k in best2["model"] if k.startswith(prefix))
    assert changed("image_encoder.") and changed("mask_decoder.") and not changed("prompt_encoder.")


@pytest.mark.slow
def test_resume_continues_epoch_and_lr(chain):
    """Stage 2 was 'killed' after epoch 0 and resumed: epoch 1 ran once, at the LR of the
    uninterrupted schedule, from the saved optimizer state."""
    rows = rows_of(chain / "stage2")
    assert [int(r["epoch"]) for r in rows] == [0, 1]          # nothing lost, nothing repeated
    assert math.isclose(float(rows[0]["lr"]), train.lr_at(0, 1e-3, 1, 2))
    assert math.isclose(float(rows[0]["lr"]), 1e-5)         # 1 % at epoch 0
    assert math.isclose(float(rows[1]["lr"]), train.lr_at(1, 1e-3, 1, 2))
    before = torch.load(chain / "stage2_killed.pth", map_location="cpu", weights_only=False)
    after = torch.load(chain / "stage2" / "last.pth", map_location="cpu", weights_only=False)
    assert before["epoch"] == 0 and after["epoch"] == 1 and math.isclose(after["lr"], 1e-3)
    # SGD momentum buffers were restored, then advanced by one more step
    mom0, mom1 = before["optimizer"]["state"], after["optimizer"]["state"]
    assert mom0 and set(mom0) == set(mom1)
    assert any(not torch.equal(mom0[i]["momentum_buffer"], mom1[i]["momentum_buffer"]) for i in mom0)
    # decoder weights moved on from the killed state; the frozen encoder did not
    dec = [k for k in before["model"] if k.startswith("mask_decoder.") and k.endswith("weight")]
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in dec)


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(chain, synth, tmp_path):
    """Two CPU processes (gloo): one short stage-2 epoch, same checkpoint format, disjoint samples."""
    out, log_prefix = tmp_path / "ddp", tmp_path / "samples"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), str(ROOT / "train.py"), "--stage", "2", "--epochs", "1",
           "--warmup-epochs", "0", "--init", str(chain / "stage1" / "best.pth"), "--data", str(synth),
           "--out", str(out), "--samples-per-modality", "1", "--debug-sample-log", str(log_prefix),
           "--no-eval-start", "--threads", "1", *TINY, "--eval-max-cases", "2",
           "--eval-max-slices", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ids = [Path(f"{log_prefix}.rank{r}.txt").read_text().split() for r in (0, 1)]
    assert [len(i) for i in ids] == [2, 2]                # "epoch index": one sample per rank
    assert ids[0][1] != ids[1][1]                         # disjoint shards
    ckpt = torch.load(out / "stage2" / "last.pth", map_location="cpu", weights_only=False)
    assert set(ckpt) == CKPT_KEYS and ckpt["epoch"] == 0
    assert ckpt["quant"]["encoder"] and ckpt["quant"]["decoder"]
    rows = rows_of(out / "stage2")
    assert len(rows) == 1 and int(rows[0]["train_samples"]) == 2  # both ranks' samples counted
    assert int(rows[0]["eval_n"]) == 2                            # eval cases gathered over ranks


def test_bare_stage_k_starts_from_the_previous_stage_or_the_published_model(tmp_path, capsys):
    cfg = train.parse_config(["--stage", "2", "--out", str(tmp_path)])
    assert train.default_init(cfg) == "published" and "stage 1 has not run" in capsys.readouterr().err
    best = tmp_path / "stage1" / "best.pth"
    best.parent.mkdir()
    best.write_bytes(b"x")
    assert train.default_init(cfg) == str(best)
    assert train.default_init(train.parse_config(["--stage", "1", "--out", str(tmp_path)])) == "published"
    assert Path(train.parse_config([]).data_root) == Path(train.__file__).parent / "devset"


def test_no_training_selection_or_calibration_file_is_in_the_check_half():
    """The dev set's check half only confirms decisions: the bare run's training and evaluation lists
    (evaluation picks best.pth) and the calibration images never contain a check case."""
    import model
    devset = Path(train.__file__).parent / "devset"
    check = {n for n, h in data.read_split(devset).items() if h == "check"}
    assert len(check) >= 40
    train_files, eval_files = train.split_files(train.parse_config([]))
    calib = model.calibration_files(devset / "imgs", 200)
    for files in (train_files, eval_files, calib):
        names = {Path(f).name[:-4] for f in files}
        assert names and not names & check
    assert {Path(f).name[:-4] for f in train_files + eval_files} & {n for n, h in data.read_split(devset).items()
                                                                     if h == "tune"}
