"""export.py: the model dir infer.py reads, checked by running it.

Parity: the same inputs (a dev-set image and its boxes, or a synthetic case when devset/ is absent)
through PyTorch, ONNX Runtime and OpenVINO (INFERENCE_PRECISION_HINT f32). fp32: absolute
tolerances a few orders of magnitude above float rounding. QCDQ: tolerances in quantization steps
(k × scale, as brevitas' export tests do) and binarised-mask IoU ≥ 0.99 between backends.
The exports take ~40 s (fp32) and ~1–2 min (QCDQ) each, once per session: those tests are slow.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import export  # noqa: E402
import infer  # noqa: E402
import model as model_lib  # noqa: E402

torch.set_num_threads(2)
DEVSET_CASE = REPO / "devset" / "imgs" / "2DBox_Microscopy_monuseg_1.npz"  # many nuclei: ≥ 7 boxes


# ---- inputs and runners ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sample() -> tuple[np.ndarray, np.ndarray]:
    """(image 1×3×256×256 float32, boxes_256 7×4 float32) from a real-looking 2D case."""
    if DEVSET_CASE.is_file():
        case = data.load_case(DEVSET_CASE, keys=("imgs", "boxes"))
    else:
        case = data.make_synthetic_case("2D", n_objects=7, seed=3)
    hw = case["imgs"].shape[:2]
    boxes_256 = data.boxes_to_256(case["boxes"], hw)
    assert len(boxes_256) >= 7
    return data.preprocess_image(case["imgs"])[None], boxes_256[:7]


def torch_run(net, image: np.ndarray, embedding: np.ndarray, boxes_256: np.ndarray):
    """(image_embedding from image, low_res_logits from the given embedding + boxes), numpy."""
    with torch.no_grad():
        emb = net.encode(torch.from_numpy(image)).numpy()
        logits = net.decode(torch.from_numpy(embedding), torch.from_numpy(boxes_256)).numpy()
    return emb, logits


class Backends:
    """ONNX Runtime and OpenVINO (f32 hint) sessions of one model dir, compiled once."""

    def __init__(self, model_dir: Path) -> None:
        import onnxruntime as ort
        import openvino as ov

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.ort_enc = ort.InferenceSession(str(model_dir / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
        self.ort_dec = ort.InferenceSession(str(model_dir / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
        core = ov.Core()
        cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}
        self.ov_enc = core.compile_model(str(model_dir / "encoder.xml"), "CPU", cfg)
        self.ov_dec = core.compile_model(str(model_dir / "decoder.xml"), "CPU", cfg)

    def encode(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return {"ort": self.ort_enc.run(None, {"image": image})[0],
                "ov": self.ov_enc({"image": image})["image_embedding"]}

    def decode(self, embedding: np.ndarray, boxes_256: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"image_embedding": embedding, "boxes": np.ascontiguousarray(boxes_256, np.float32)}
        return {"ort": self.ort_dec.run(None, feeds)[0], "ov": self.ov_dec(feeds)["low_res_logits"]}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of the binarised (logit > 0) masks; two empty masks agree fully."""
    union = np.logical_or(a > 0, b > 0).sum()
    return 1.0 if union == 0 else float(np.logical_and(a > 0, b > 0).sum() / union)


# ---- fast: CLI and helpers ---------------------------------------------------------------------------
def test_cli_missing_checkpoint_fails_in_one_line(tmp_path, capsys):
    rc = export.main(["--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "nope.pth" in err[0] and "not found" in err[0]
    assert not (tmp_path / "m").exists()


def test_cli_quantize_calibrated_rejects_fp32(tmp_path, capsys):
    rc = export.main(["--quantize-calibrated", "--fp32", "--out", str(tmp_path / "m")])
    assert rc == 1 and "--quantize-calibrated" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["synthetic", "devset"])
def test_calibration_batch_shapes(source):
    calib = "synthetic" if source == "synthetic" else REPO / "devset" / "imgs"
    if source == "devset" and not Path(calib).is_dir():
        pytest.skip("devset/imgs not present")
    images, boxes = export.calibration_batch(calib, 3)
    assert images.shape == (3, 3, 256, 256) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert len(boxes) == 3
    for b in boxes:
        assert b.ndim == 2 and b.shape[1] == 4 and len(b) >= 1
        assert bool((b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all())
        assert float(b.min()) >= 0 and float(b.max()) <= 256


# ---- fp32 ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fp32(tmp_path_factory):
    """(torch model, exported model dir, backends) of the published fp32 LiteMedSAM, via the CLI."""
    out = tmp_path_factory.mktemp("fp32") / "model"
    assert export.main(["--checkpoint", "published", "--fp32", "--out", str(out)]) == 0
    net, _ = export.load_checkpoint("published")
    return net, out, Backends(out)


@pytest.mark.slow
def test_fp32_model_dir_contract(fp32):
    _, out, _ = fp32
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(export.MODEL_FILES)
    assert not list(out.parent.glob(".model.tmp-*"))  # the temporary dir is gone
    meta = json.loads((out / "meta.json").read_text())
    assert meta["checkpoint_sha256"] == model_lib.CHECKPOINT_SHA256
    assert meta["quantized"] == {"encoder": False, "decoder": False}
    assert meta["opset"] == export.DEFAULT_OPSET and "openvino" in meta["versions"]
    import onnx
    for part, ins, outs in (("encoder", export.ENCODER_INPUTS, export.ENCODER_OUTPUTS),
                            ("decoder", export.DECODER_INPUTS, export.DECODER_OUTPUTS)):
        export.check_onnx(out / f"{part}.onnx")
        g = onnx.load(str(out / f"{part}.onnx"), load_external_data=False).graph
        assert [i.name for i in g.input] == ins and [o.name for o in g.output] == outs
    # infer.py's loader finds every port by name
    m = infer.load_model(out, "openvino", precision="f32", cache_dir=None)
    assert m.precision == "f32"


@pytest.mark.slow
@pytest.mark.parametrize("n_boxes", [1, 7])
def test_fp32_parity_torch_ort_openvino(fp32, sample, n_boxes):
    net, _, be = fp32
    image, boxes_256 = sample[0], sample[1][:n_boxes]
    emb_t, _ = torch_run(net, image, np.zeros((1, 256, 64, 64), np.float32), boxes_256[:1])
    _, logits_t = torch_run(net, image, emb_t, boxes_256)
    emb, logits = be.encode(image), be.decode(emb_t, boxes_256)
    assert logits_t.shape == (n_boxes, 1, 256, 256)
    for name in ("ort", "ov"):
        assert emb[name].shape == emb_t.shape
        # float reordering only: measured ≤ 2e-6 on |embedding| ≤ 0.8 and ≤ 1e-4 on |logits| ≤ 41
        assert np.abs(emb[name] - emb_t).max() < 1e-4, name
        assert np.abs(logits[name] - logits_t).max() < 2e-3, name
        assert mask_iou(logits[name], logits_t) >= 0.999, name


@pytest.mark.slow
def test_fp32_dynamic_shapes_one_compiled_model(fp32, sample):
    net, _, be = fp32
    image, boxes_256 = sample
    emb2 = be.encode(np.concatenate([image, image[:, :, ::-1].copy()]))  # B = 2, two different images
    emb_t, _ = torch_run(net, image, np.zeros((1, 256, 64, 64), np.float32), boxes_256[:1])
    for name in ("ort", "ov"):
        assert emb2[name].shape == (2, 256, 64, 64)
        assert np.abs(emb2[name][0] - emb_t[0]).max() < 1e-4
    many = np.tile(boxes_256, (10, 1))  # row j and row j + 7 are the same box
    single = be.decode(emb_t, many[:1])
    for n in (1, 3, 64):
        out = be.decode(emb_t, many[:n])
        for name in ("ort", "ov"):
            assert out[name].shape == (n, 1, 256, 256)
            # a box's mask does not depend on the other boxes in the call
            assert np.abs(out[name][0] - single[name][0]).max() < 2e-3, (name, n)
            if n > 7:
                assert np.abs(out[name][:n - 7] - out[name][7:]).max() < 2e-3, (name, n)
