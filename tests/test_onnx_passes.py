"""onnx_passes.py on hand-built QCDQ graphs (no torch): each pass is exact (bit-identical outputs in ONNX
Runtime) and makes OpenVINO run the layer in int8; the passes on whole exported graphs are in test_export.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import onnx_passes


def tiny_qdq_conv(path: Path, with_clip: bool) -> None:
    """A hand-built QCDQ Conv as Brevitas writes it: x → Q → DQ, int8 weight → [Clip(-127, 127)] → DQ,
    Conv. 1×8×16×16 → 1×16×16×16."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (16, 8, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w_int8"), numpy_helper.from_array(np.float32(0.02), "x_scale"),
             numpy_helper.from_array(np.int8(0), "x_zp"), numpy_helper.from_array(np.float32(0.003), "w_scale"),
             numpy_helper.from_array(np.int8(0), "w_zp"), numpy_helper.from_array(np.int8(-127), "lo"),
             numpy_helper.from_array(np.int8(127), "hi")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"])]
    w_in = "w_int8"
    if with_clip:
        nodes.append(helper.make_node("Clip", ["w_int8", "lo", "hi"], ["w_clip"]))
        w_in = "w_clip"
    nodes += [helper.make_node("DequantizeLinear", [w_in, "w_scale", "w_zp"], ["wd"]),
              helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def conv_runtime_precisions(path: Path) -> list[str]:
    """runtimePrecision of every Convolution in OpenVINO's compiled (CPU, f32 hint) model."""
    import openvino as ov
    cm = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return [op.get_rt_info()["runtimePrecision"].astype(str) for op in cm.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) == "Convolution"]


def test_fold_weight_clips_is_exact_and_lets_openvino_run_int8(tmp_path):
    import onnx
    import onnxruntime as ort
    path = tmp_path / "tiny.onnx"
    tiny_qdq_conv(path, with_clip=True)
    x = np.random.default_rng(1).normal(size=(1, 8, 16, 16)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    before, before_prec = run(path), conv_runtime_precisions(path)
    assert onnx_passes.fold_weight_clips(path) == 1
    onnx_passes.check_onnx(path)
    g = onnx.load(str(path)).graph
    assert [n.op_type for n in g.node].count("Clip") == 0
    assert {t.name for t in g.initializer} >= {"w_clip"} and "w_int8" not in {t.name for t in g.initializer}
    np.testing.assert_array_equal(run(path), before)  # the clip of a constant: bit-identical
    after_prec = conv_runtime_precisions(path)
    print(f"Convolution runtime precision: with Clip {before_prec}, folded {after_prec}")
    assert after_prec and all(p in ("u8", "i8") for p in after_prec)
    assert onnx_passes.fold_weight_clips(path) == 0  # idempotent


def tiny_subpixel_linear(path: Path) -> None:
    """model._subpixel_linear as Brevitas exports it: x (1×L×Cin) → Q → DQ; int8 ConvTranspose weight
    (Cin, Cout, 2, 2) → DQ (per output channel: axis 1) → Transpose(2, 3, 1, 0) → Reshape(4·Cout, Cin)
    → Transpose → MatMul. Cin 32, Cout 16, L 64."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(2)
    cin, cout = 32, 16
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (cin, cout, 2, 2)).astype(np.int8), "w_int8"),
             numpy_helper.from_array(rng.uniform(1e-3, 5e-3, cout).astype(np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(cout, np.int8), "w_zp"),
             numpy_helper.from_array(np.float32(0.02), "x_scale"), numpy_helper.from_array(np.int8(0), "x_zp"),
             numpy_helper.from_array(np.array([4 * cout, cin], np.int64), "shape")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zp"], ["wd"], axis=1),
             helper.make_node("Transpose", ["wd"], ["wt"], perm=[2, 3, 1, 0]),
             helper.make_node("Reshape", ["wt", "shape"], ["wr"]),
             helper.make_node("Transpose", ["wr"], ["wl"], perm=[1, 0]),
             helper.make_node("MatMul", ["xd", "wl"], ["y"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, cin])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 4 * cout])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_fold_weight_layout_is_exact_and_lets_openvino_run_int8(tmp_path):
    import onnx
    import onnxruntime as ort
    import openvino as ov
    path = tmp_path / "tiny.onnx"
    tiny_subpixel_linear(path)
    x = np.random.default_rng(3).normal(size=(1, 64, 32)).astype(np.float32)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # reference float DQ math
    run = lambda p: ort.InferenceSession(str(p), plain, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731

    def fc_precisions(p: Path) -> list[str]:
        cm = ov.Core().compile_model(str(p), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})  # read as export.to_ir does
        return [op.get_rt_info()["runtimePrecision"].astype(str) for op in cm.get_runtime_model().get_ordered_ops()
                if op.get_rt_info()["layerType"].astype(str).startswith("FullyConnected")]

    before, before_prec = run(path), fc_precisions(path)
    assert onnx_passes.fold_weight_layout(path) == 1
    onnx_passes.check_onnx(path)
    g = onnx.load(str(path)).graph
    assert [n.op_type for n in g.node] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul"]
    dq = g.node[2]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    assert inits[dq.input[0]].shape == (32, 64) and inits[dq.input[0]].dtype == np.int8  # Cin × (block, Cout)
    assert inits[dq.input[1]].shape == (64,)  # the 16 channel scales, repeated for the 4 block positions
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]
    np.testing.assert_array_equal(run(path), before)  # the same int8 values and scales, moved
    after_prec = fc_precisions(path)
    print(f"FullyConnected runtime precision: laid out after DQ {before_prec}, folded {after_prec}")
    assert after_prec and all(p in ("u8", "i8") for p in after_prec)
    assert onnx_passes.fold_weight_layout(path) == 0  # idempotent


def test_drop_zero_weight_zero_points_is_exact_and_leaves_other_zero_points(tmp_path):
    """Two weight DQs sharing one zeros vector (as the exporter merges them) lose it; a weight DQ with a
    non-zero zero point and the activation Q/DQ keep theirs; ONNX Runtime gives bit-identical outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(4)
    c = 16
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (c, c)).astype(np.int8), f"w{k}") for k in range(3)]
    inits += [numpy_helper.from_array(rng.uniform(1e-3, 5e-3, c).astype(np.float32), "w_scale"),
              numpy_helper.from_array(np.zeros(c, np.int8), "zeros"),
              numpy_helper.from_array(np.full(c, 3, np.int8), "threes"),
              numpy_helper.from_array(np.float32(0.02), "x_scale"), numpy_helper.from_array(np.int8(0), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["h0"])]
    for k, zp in enumerate(("zeros", "zeros", "threes")):
        nodes += [helper.make_node("DequantizeLinear", [f"w{k}", "w_scale", zp], [f"wd{k}"], axis=0),
                  helper.make_node("MatMul", [f"h{k}", f"wd{k}"], [f"h{k + 1}"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, c])],
                          [helper.make_tensor_value_info("h3", TensorProto.FLOAT, [1, 8, c])], inits)
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(5).normal(size=(1, 8, c)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    before = run(path)
    assert onnx_passes.drop_zero_weight_zero_points(path) == 2
    onnx_passes.check_onnx(path)
    dqs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"]
    assert [list(n.input[2:]) for n in dqs] == [["x_zp"], [], [], ["threes"]]
    assert "zeros" not in {t.name for t in onnx.load(str(path)).graph.initializer}
    np.testing.assert_array_equal(run(path), before)
    assert onnx_passes.drop_zero_weight_zero_points(path) == 0  # idempotent
