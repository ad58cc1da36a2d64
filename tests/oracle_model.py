"""An "oracle" encoder/decoder pair with the model-dir contract of export.py, whose outputs are exactly
computable in numpy — so infer.py's pipeline tests check real numbers without the real network.

encoder: image B×3×256×256 → image_embedding B×256×64×64 = 4×4 max pool of channel 0, tiled to 256
         channels (max, not average: it is exact in float, so numpy and both runtimes agree bit for bit).
decoder: image_embedding 1×256×64×64, boxes N×4 (256-pixel model space) → low_res_logits N×1×256×256
         = +1 where the pixel (x, y) lies in the box (x0 ≤ x ≤ x1, y0 ≤ y ≤ y1) AND the nearest-upsampled
         embedding channel 0 is > BRIGHT (a "bright" pixel), −1 elsewhere.
So the oracle "segments the bright part of each box", which makes propagation across 3D slices meaningful.

Test helper only: infer.py never imports this.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import data

BRIGHT = 0.3  # threshold on the [0, 1] normalised image; away from 0.5 so half-covered pixels do not tie
SIZE = 256
EMBED_SIDE = 64
EMBED_DIM = 256


# ---- numpy reference (the same maths as the graphs below) -------------------------------------------
def encode_np(image: np.ndarray) -> np.ndarray:
    """image B×3×256×256 → B×256×64×64."""
    b = image.shape[0]
    pooled = image[:, 0].reshape(b, EMBED_SIDE, 4, EMBED_SIDE, 4).max(axis=(2, 4))
    return np.repeat(pooled[:, None], EMBED_DIM, axis=1).astype(np.float32)


def decode_np(image_embedding: np.ndarray, boxes_256: np.ndarray) -> np.ndarray:
    """image_embedding 1×256×64×64, boxes_256 N×4 → low_res_logits N×1×256×256 (±1)."""
    bright = np.repeat(np.repeat(image_embedding[0, 0], 4, axis=0), 4, axis=1) > BRIGHT
    grid = np.arange(SIZE, dtype=np.float32)
    out = np.empty((len(boxes_256), 1, SIZE, SIZE), np.float32)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes_256, np.float32)):
        inside = ((grid[None, :] >= x0) & (grid[None, :] <= x1)) & ((grid[:, None] >= y0) & (grid[:, None] <= y1))
        out[i, 0] = np.where(inside & bright, 1.0, -1.0)
    return out


def reference_mask(img2d: np.ndarray, box: np.ndarray, rounding: str = "float", interp: str | None = None
                   ) -> np.ndarray:
    """The oracle pipeline for one 2D image (H×W or H×W×3) and one box (x0, y0, x1, y1) in original
    pixels → bool H×W, built from data.py's preprocessing and the numpy oracle (not from infer.py);
    `rounding` / `interp` as data.boxes_to_256 / data.preprocess_image take them."""
    hw = img2d.shape[:2]
    emb = encode_np(data.preprocess_image(img2d, interp=interp)[None])
    logits = decode_np(emb, data.boxes_to_256(np.asarray(box, np.float32)[None], hw, rounding=rounding))
    return data.postprocess_logits(logits[0, 0], hw)


# ---- OpenVINO IR ------------------------------------------------------------------------------------
def build_openvino(model_dir: Path) -> None:
    """Write encoder.xml/.bin and decoder.xml/.bin (f32) into model_dir."""
    import openvino as ov
    import openvino.opset13 as ops

    i64 = lambda v: ops.constant(np.asarray(v, np.int64))  # noqa: E731
    f32 = lambda v: ops.constant(np.asarray(v, np.float32))  # noqa: E731

    image = ops.parameter([-1, 3, SIZE, SIZE], np.float32, name="image")
    image.output(0).set_names({"image"})
    ch0 = ops.gather(image, i64([0]), i64(1))
    pooled = ops.max_pool(ch0, [4, 4], [1, 1], [0, 0], [0, 0], [4, 4]).output(0)
    # multiply by ones, not Tile: OpenVINO 2026.4 CPU computed Tile-after-AvgPool wrongly here (max err 0.45)
    emb = ops.multiply(pooled, ops.constant(np.ones((1, EMBED_DIM, 1, 1), np.float32)))
    emb.output(0).set_names({"image_embedding"})
    encoder = ov.Model([ops.result(emb)], [image], "oracle_encoder")

    emb_in = ops.parameter([1, EMBED_DIM, EMBED_SIDE, EMBED_SIDE], np.float32, name="image_embedding")
    emb_in.output(0).set_names({"image_embedding"})
    boxes = ops.parameter([-1, 4], np.float32, name="boxes")
    boxes.output(0).set_names({"boxes"})
    e0 = ops.reshape(ops.gather(emb_in, i64([0]), i64(1)), i64([1, 1, EMBED_SIDE, 1, EMBED_SIDE, 1]), False)
    up = ops.reshape(ops.broadcast(e0, i64([1, 1, EMBED_SIDE, 4, EMBED_SIDE, 4])), i64([1, 1, SIZE, SIZE]), False)
    bright = ops.greater(up, f32(BRIGHT))
    grid = ops.range(f32(0.0), f32(float(SIZE)), f32(1.0), "f32")
    xs = ops.reshape(grid, i64([1, 1, 1, SIZE]), False)
    ys = ops.reshape(grid, i64([1, 1, SIZE, 1]), False)
    x0, y0, x1, y1 = (ops.reshape(o, i64([-1, 1, 1, 1]), False) for o in ops.split(boxes, i64(1), 4).outputs())
    inside = ops.logical_and(ops.logical_and(ops.greater_equal(xs, x0), ops.less_equal(xs, x1)),
                             ops.logical_and(ops.greater_equal(ys, y0), ops.less_equal(ys, y1)))
    logits = ops.select(ops.logical_and(inside, bright), f32(1.0), f32(-1.0))
    logits.output(0).set_names({"low_res_logits"})
    decoder = ov.Model([ops.result(logits)], [emb_in, boxes], "oracle_decoder")

    model_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(encoder, str(model_dir / "encoder.xml"), compress_to_fp16=False)
    ov.save_model(decoder, str(model_dir / "decoder.xml"), compress_to_fp16=False)


# ---- ONNX (for --backend onnxruntime) ---------------------------------------------------------------
def build_onnx(model_dir: Path) -> None:
    """Write encoder.onnx and decoder.onnx with the same maths, via onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    enc = helper.make_graph(
        [helper.make_node("Gather", ["image", "ch0_idx"], ["ch0"], axis=1),
         helper.make_node("MaxPool", ["ch0"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
         helper.make_node("Mul", ["pooled", "ones"], ["image_embedding"])],  # not Tile: see build_openvino
        "oracle_encoder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("image_embedding", TensorProto.FLOAT, ["B", EMBED_DIM, EMBED_SIDE, EMBED_SIDE])],
        [const("ch0_idx", np.array([0], np.int64)), const("ones", np.ones((1, EMBED_DIM, 1, 1), np.float32))])

    grid = np.arange(SIZE, dtype=np.float32)
    dec = helper.make_graph(
        [helper.make_node("Gather", ["image_embedding", "ch0_idx"], ["e0"], axis=1),
         helper.make_node("Reshape", ["e0", "shape6"], ["e6"]),
         helper.make_node("Expand", ["e6", "expand6"], ["e6x"]),
         helper.make_node("Reshape", ["e6x", "shape_up"], ["up"]),
         helper.make_node("Greater", ["up", "bright_thr"], ["bright"]),
         helper.make_node("Split", ["boxes", "split4"], ["bx0", "by0", "bx1", "by1"], axis=1),
         *[helper.make_node("Reshape", [f"b{c}", "shape_n111"], [f"r{c}"]) for c in ("x0", "y0", "x1", "y1")],
         helper.make_node("GreaterOrEqual", ["xs", "rx0"], ["gx0"]),
         helper.make_node("LessOrEqual", ["xs", "rx1"], ["lx1"]),
         helper.make_node("GreaterOrEqual", ["ys", "ry0"], ["gy0"]),
         helper.make_node("LessOrEqual", ["ys", "ry1"], ["ly1"]),
         helper.make_node("And", ["gx0", "lx1"], ["inx"]),
         helper.make_node("And", ["gy0", "ly1"], ["iny"]),
         helper.make_node("And", ["inx", "iny"], ["inside"]),
         helper.make_node("And", ["inside", "bright"], ["fg"]),
         helper.make_node("Where", ["fg", "one", "minus_one"], ["low_res_logits"])],
        "oracle_decoder",
        [helper.make_tensor_value_info("image_embedding", TensorProto.FLOAT, [1, EMBED_DIM, EMBED_SIDE, EMBED_SIDE]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("low_res_logits", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [const("ch0_idx", np.array([0], np.int64)),
         const("shape6", np.array([1, 1, EMBED_SIDE, 1, EMBED_SIDE, 1], np.int64)),
         const("expand6", np.array([1, 1, EMBED_SIDE, 4, EMBED_SIDE, 4], np.int64)),
         const("shape_up", np.array([1, 1, SIZE, SIZE], np.int64)),
         const("bright_thr", np.array(BRIGHT, np.float32)),
         const("split4", np.array([1, 1, 1, 1], np.int64)),
         const("shape_n111", np.array([-1, 1, 1, 1], np.int64)),
         const("xs", grid.reshape(1, 1, 1, SIZE)), const("ys", grid.reshape(1, 1, SIZE, 1)),
         const("one", np.array(1.0, np.float32)), const("minus_one", np.array(-1.0, np.float32))])

    model_dir.mkdir(parents=True, exist_ok=True)
    for graph, name in ((enc, "encoder"), (dec, "decoder")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(model_dir / f"{name}.onnx"))


def build(model_dir: Path, with_onnx: bool = True) -> Path:
    """The oracle model dir: IR always, ONNX too when `with_onnx` (needs the onnx package)."""
    model_dir = Path(model_dir)
    build_openvino(model_dir)
    if with_onnx:
        build_onnx(model_dir)
    (model_dir / "meta.json").write_text('{"name": "oracle", "note": "tests/oracle_model.py"}\n')
    return model_dir


if __name__ == "__main__":  # python tests/oracle_model.py OUT_DIR  (e.g. for tools/bench_memory.py -m)
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qmedsam_oracle")))
