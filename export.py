"""Export LiteMedSAM / QMedSAM to the model dir infer.py reads: ONNX (plain for fp32, Brevitas QCDQ
for int8) and OpenVINO IR.

    python export.py --checkpoint CKPT --out MODEL_DIR [--fp32] [--opset N] [--no-ir]
    python export.py --quantize-calibrated --calib-data devset/imgs --calib-images 8 --out MODEL_DIR

MODEL_DIR (written atomically: a temporary dir next to it, then one rename per file, meta.json last):
    encoder.onnx / encoder.xml+.bin  image B×3×256×256 float32 → image_embedding B×256×64×64 (B dynamic)
    decoder.onnx / decoder.xml+.bin  image_embedding 1×256×64×64, boxes N×4 float32 (256-pixel model
                                     space, N dynamic) → low_res_logits N×1×256×256 (prompt encoder inside)
    meta.json                        source checkpoint + sha256, quantized parts, opset, date, versions

CKPT is "published" (the fp32 LiteMedSAM weights, model.published_checkpoint()) or a train.py
checkpoint ({"model": state_dict, "quant": {"encoder": bool, "decoder": bool, …}}). A quantized part
goes through brevitas.export.export_onnx_qcdq (TorchScript exporter: dynamo=False), a float part
through torch.onnx.export(dynamo=False). --quantize-calibrated makes an int8 post-training-quantized
model from the published weights (model.quantize_ + model.calibrate on K images) before any training.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

import data
import model as model_lib

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_OPSET = 17  # LayerNormalization is an ONNX op from opset 17: fewer nodes than its decomposition
DEFAULT_CALIB_DATA = REPO_DIR / "devset" / "imgs"
DEFAULT_CALIB_IMAGES = 8
ENCODER_INPUTS, ENCODER_OUTPUTS = ["image"], ["image_embedding"]
DECODER_INPUTS, DECODER_OUTPUTS = ["image_embedding", "boxes"], ["low_res_logits"]
MODEL_FILES = ("encoder.onnx", "decoder.onnx", "encoder.bin", "encoder.xml", "decoder.bin",
               "decoder.xml", "meta.json")  # rename order: meta.json last marks a complete dir


def say(*msg) -> None:
    print("export.py:", *msg, file=sys.stderr, flush=True)


# ---- models ------------------------------------------------------------------------------------------

def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_quantized(module: nn.Module) -> bool:
    """True if `module` holds any Brevitas quant layer (then it is exported as QCDQ)."""
    return any(isinstance(m, model_lib.qnn.quant_layer.QuantWeightBiasInputOutputLayer)
               or isinstance(m, model_lib.qnn.QuantIdentity) for m in module.modules())


# Parts of the mask decoder the single-mask graph never reads (the exporter drops them as dead code):
# the hypernetworks of mask tokens 1–3 and the IoU head.
DECODER_UNUSED = ("output_hypernetworks_mlps.1.", "output_hypernetworks_mlps.2.",
                  "output_hypernetworks_mlps.3.", "iou_prediction_head.")


def quantizers(module: nn.Module, skip: Sequence[str] = ()) -> dict[str, list[tuple[str, nn.Module]]]:
    """Enabled Brevitas quantizers of `module` by kind, as (name, proxy), names not starting with
    any of `skip`: "act" (input / identity activation quantizers: one QuantizeLinear +
    DequantizeLinear each in QCDQ) and "weight" (int8 initializer + DequantizeLinear each)."""
    from brevitas.proxy import ActQuantProxyFromInjector, WeightQuantProxyFromInjector
    out: dict[str, list] = {"act": [], "weight": []}
    for name, m in module.named_modules():
        if any(name.startswith(p) for p in skip) or not getattr(m, "is_quant_enabled", False):
            continue
        if isinstance(m, ActQuantProxyFromInjector):
            out["act"].append((name, m))
        elif isinstance(m, WeightQuantProxyFromInjector):
            out["weight"].append((name, m))
    return out


def count_quantizers(net: model_lib.LiteMedSAM) -> dict[str, dict[str, int]]:
    """{"encoder"|"decoder": {"act": n, "weight": n}}: the quantizers each exported graph contains."""
    parts = {"encoder": quantizers(net.image_encoder),
             "decoder": quantizers(net.mask_decoder, DECODER_UNUSED)}
    return {p: {k: len(v) for k, v in q.items()} for p, q in parts.items()}


def load_checkpoint(checkpoint: str = "published") -> tuple[model_lib.LiteMedSAM, dict]:
    """"published" or a train.py checkpoint path → (model in eval mode, source info for meta.json)."""
    if checkpoint == "published":
        path = model_lib.published_checkpoint()
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found")
        # train.py checkpoints also hold optimizer state and config objects: not weights_only
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path}: not a checkpoint dict (state_dict or {{'model', 'quant'}})")
    if hasattr(model_lib, "build_model"):
        net = model_lib.build_model(checkpoint=ckpt)  # rebuilds the saved quantized structure
    else:  # model.py without build_model yet: the same steps, here
        quant = dict(ckpt.get("quant") or {}) if "model" in ckpt else {}
        net = model_lib.build_lite_medsam()
        if quant.get("encoder") or quant.get("decoder"):
            model_lib.quantize_(net, encoder=bool(quant.get("encoder")),
                                decoder=bool(quant.get("decoder")),
                                float_layers=quant.get("float_layers") or ())
        net.load_state_dict(ckpt["model"] if "model" in ckpt else ckpt, strict=True)
    info = {"checkpoint": "published" if checkpoint == "published" else str(path),
            "checkpoint_path": str(path), "checkpoint_sha256": sha256_of(path),
            "quantized": {"encoder": is_quantized(net.image_encoder),
                          "decoder": is_quantized(net.mask_decoder)},
            "quant_config": dict(getattr(net, "quant_config", None) or {})}
    return net.eval(), info


def calibration_files(calib_data: str | os.PathLike, k: int) -> list[Path]:
    """The K npz cases calibration_batch reads from a folder: spread evenly over the sorted list
    (repeating from the start when the folder has fewer than K)."""
    files = data.find_cases(calib_data)
    if not files:
        raise FileNotFoundError(f"{calib_data}: no npz cases for calibration")
    picks = [files[int(i)] for i in np.linspace(0, len(files) - 1, min(k, len(files)))]
    return picks + [files[i % len(files)] for i in range(k - len(picks))]


def box_slice(path: str | os.PathLike, z_frac: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(2D image, its boxes x0,y0,x1,y1) of a challenge npz case: the image itself for 2D; for 3D the
    slice at `z_frac` of the first box's z-range and the boxes that reach that slice."""
    case = data.load_case(path, keys=("imgs", "boxes"))
    imgs, bx = case["imgs"], np.asarray(case["boxes"])
    if bx.shape[1] != 6:
        return imgs, bx
    z = int(bx[0, 2] + z_frac * (bx[0, 5] - bx[0, 2]))
    on = (bx[:, 2] <= z) & (z <= bx[:, 5])
    return imgs[z], bx[on][:, [0, 1, 3, 4]]


def calibration_batch(calib_data: str | os.PathLike, k: int,
                      seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """K calibration samples → (images K×3×256×256 in [0, 1], boxes_256: K tensors N_i×4).

    `calib_data` is a folder of challenge npz cases (calibration_files; a 3D case gives the slice in
    the middle of its first box) or "synthetic" (data.make_synthetic_case)."""
    images, boxes = [], []
    if str(calib_data) == "synthetic":
        for i in range(k):
            case = data.make_synthetic_case("2D", n_objects=4, seed=seed + i)
            hw = case["imgs"].shape[:2]
            images.append(data.preprocess_image(case["imgs"]))
            boxes.append(data.boxes_to_256(case["boxes"], hw))
    else:
        for path in calibration_files(calib_data, k):
            img2d, bx = box_slice(path)
            hw = img2d.shape[:2]
            images.append(data.preprocess_image(img2d, modality=data.modality_of(path)))  # as at inference
            boxes.append(data.boxes_to_256(bx[:16], hw))  # ≤ 16 boxes: enough statistics, bounded time
    return torch.from_numpy(np.stack(images)), [torch.from_numpy(b) for b in boxes]


def build_ptq_model(calib_data: str | os.PathLike = DEFAULT_CALIB_DATA,
                    k: int = DEFAULT_CALIB_IMAGES) -> tuple[model_lib.LiteMedSAM, dict]:
    """The published LiteMedSAM, int8-quantized (model.quantize_) and calibrated on K images."""
    net, info = load_checkpoint("published")
    model_lib.quantize_(net)
    images, boxes_256 = calibration_batch(calib_data, k)
    say(f"calibrating on {len(images)} images from {calib_data}")
    model_lib.calibrate(net, images, boxes_256)
    info["quantized"] = {"encoder": True, "decoder": True}
    info["quant_config"] = dict(getattr(net, "quant_config", None) or {})
    info["calibration"] = {"data": str(calib_data), "images": len(images)}
    return net.eval(), info


# ---- ONNX / IR writing -------------------------------------------------------------------------------

def example_inputs() -> dict[str, tuple[torch.Tensor, ...]]:
    """Tracing inputs: a [0, 1] image, an embedding, two boxes (N > 1 so no size-1 broadcast is baked in)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, model_lib.IMAGE_SIZE, model_lib.IMAGE_SIZE, generator=g)
    embedding = torch.randn(1, model_lib.EMBED_DIM, model_lib.EMBED_SIZE, model_lib.EMBED_SIZE,
                            generator=g)
    boxes = torch.tensor([[30.0, 40.0, 120.0, 150.0], [100.0, 80.0, 220.0, 200.0]])
    return {"encoder": (image,), "decoder": (embedding, boxes)}


def export_onnx(graph: nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                output_names: list[str], dynamic_axes: dict, opset: int) -> None:
    """One graph → ONNX at `path`: Brevitas QCDQ if it holds quant layers, else plain ONNX."""
    graph.eval()
    kwargs = dict(input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                  opset_version=opset, dynamo=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer warnings
        if is_quantized(graph):
            from brevitas.export import export_onnx_qcdq
            export_onnx_qcdq(graph, args, export_path=str(path), **kwargs)
        else:
            torch.onnx.export(graph, args, str(path), do_constant_folding=True, **kwargs)


def drop_initializer_inputs(path: Path) -> int:
    """Remove initializers from the graph inputs (the TorchScript exporter under Brevitas lists every
    bias/norm weight as an input too: ONNX Runtime then cannot constant-fold them and warns once per
    tensor). Rewrites `path` in place; returns how many inputs were dropped."""
    import onnx
    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    dropped = len(m.graph.input) - len(keep)
    if dropped:
        del m.graph.input[:]
        m.graph.input.extend(keep)
        onnx.save(m, str(path))
    return dropped


def drop_unused_initializers(graph) -> int:
    """Remove the initializers no node of `graph` (an onnx GraphProto) reads; returns how many."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [t for t in graph.initializer if t.name not in used]
    for t in dead:
        graph.initializer.remove(t)
    return len(dead)


def node_consumers(graph) -> dict[str, list]:
    """Tensor name → the nodes of `graph` that read it, in graph order."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return consumers


def fold_weight_clips(path: Path) -> int:
    """Fold every Clip whose data input is an integer initializer (Brevitas' narrow-range int8 weights:
    int8 → Clip(-127, 127) → DequantizeLinear) into that initializer, in place; returns how many.

    Exact (the clip of a constant), and it matters: OpenVINO keeps such a Clip as a runtime int8
    Eltwise, which hides the weight's DequantizeLinear from its low-precision transformations, so
    every Convolution (and the decoder's ConvTranspose) ran in f32 with it (see the runtime precision
    test)."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    const = lambda name: numpy_helper.to_array(inits[name]) if name in inits else None  # noqa: E731
    folded, keep = 0, []
    for node in g.node:
        w = const(node.input[0]) if node.op_type == "Clip" and node.input else None
        if w is None or w.dtype.kind not in "iu":
            keep.append(node)
            continue
        lo = const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if (len(node.input) > 1 and node.input[1] and lo is None) or (
                len(node.input) > 2 and node.input[2] and hi is None):
            keep.append(node)  # a bound computed at run time: leave it
            continue
        clipped = np.clip(w, lo if lo is not None else None, hi if hi is not None else None).astype(w.dtype)
        name = node.output[0]  # the folded constant takes the Clip's output name: consumers unchanged
        g.initializer.append(numpy_helper.from_array(clipped, name))
        folded += 1
    if folded:
        del g.node[:]
        g.node.extend(keep)
        drop_unused_initializers(g)  # the unclipped originals and the now unused bounds
        onnx.save(m, str(path))
    return folded


def fold_weight_layout(path: Path) -> int:
    """Fold the Transpose/Reshape chain after a weight's DequantizeLinear into its int8 initializer, in
    place; returns how many weights were folded. The weight then reaches its consumer as int8 → DQ →
    op, the pattern OpenVINO runs in int8.

    model._subpixel_linear quantizes the decoder's ConvTranspose weights in their stored layout
    (in, out, 2, 2; per output channel = axis 1) and lays them out for a Linear afterwards; with
    per-channel scales OpenVINO does not see through that chain and runs those two Linears in bf16/f32.
    Exact: the layout ops move the int8 values and (per axis) the scale / zero-point vectors alike.
    Chains that are a single Transpose straight into a MatMul (every plain Linear) are left as they are."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consumers = node_consumers(g)

    def layout(a: np.ndarray, chain: list) -> np.ndarray:
        for n in chain:
            if n.op_type == "Reshape":
                a = a.reshape(numpy_helper.to_array(inits[n.input[1]]))
            else:
                perm = [list(x.ints) for x in n.attribute if x.name == "perm"]
                a = np.transpose(a, perm[0] if perm else None)
        return a

    dead, folded = set(), 0
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        if dq.input[0] not in inits or any(i and i not in inits for i in dq.input[1:]):
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        if w.dtype.kind not in "iu":
            continue
        chain, out = [], dq.output[0]
        while len(consumers.get(out, [])) == 1 and consumers[out][0].op_type in ("Transpose", "Reshape"):
            n = consumers[out][0]
            if n.op_type == "Reshape" and n.input[1] not in inits:
                break
            chain.append(n)
            out = n.output[0]
        if not any(n.op_type == "Reshape" for n in chain):
            continue
        axis = next((x.i for x in dq.attribute if x.name == "axis"), 1)
        new_w = layout(w, chain)
        qparams = [numpy_helper.to_array(inits[i]) for i in dq.input[1:] if i]
        new_axis = None
        if qparams[0].size > 1:  # per axis: where do the scales end up? (one axis, constant along the others)
            shape = [1] * w.ndim
            shape[axis] = qparams[0].size
            index = layout(np.broadcast_to(np.arange(qparams[0].size).reshape(shape), w.shape), chain)
            varying = [d for d in range(index.ndim) if not (index == index.take([0], axis=d)).all()]
            if len(varying) != 1:
                continue
            new_axis = varying[0]
            rows = np.moveaxis(index, new_axis, 0).reshape(index.shape[new_axis], -1)[:, 0]
            qparams = [a[rows] if a.size > 1 else a for a in qparams]
        base = dq.input[0] + "/laid_out"
        names = [base] + [f"{base}/qparam{j}" for j in range(len(qparams))]
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(new_w), names[0]))
        g.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(a), nm) for a, nm in zip(qparams, names[1:]))
        dq.input[:] = names
        for x in list(dq.attribute):
            if x.name == "axis":
                dq.attribute.remove(x)
        if new_axis is not None:
            dq.attribute.append(onnx.helper.make_attribute("axis", int(new_axis)))
        dq.output[0] = chain[-1].output[0]
        dead |= {id(n) for n in chain}
        folded += 1
    if folded:
        keep = [n for n in g.node if id(n) not in dead]
        del g.node[:]
        g.node.extend(keep)
        drop_unused_initializers(g)
        onnx.save(m, str(path))
    return folded


def split_fused_qkv(path: Path) -> int:
    """Split every quantized fused qkv projection of the encoder's window attention into three
    projections, in place; returns how many.

    Brevitas writes WindowAttention as: int8 x → MatMul(DQ(int8 W)ᵀ) + b → Reshape(B, L, heads, 3d)
    → Transpose(0, 2, 1, 3) → Split(d, d, d) → Q/DQ each of q, k, v → the attention MatMuls. OpenVINO
    cannot fuse those three per-tensor Q/DQs into anything: it runs each as a standalone f32
    FakeQuantize wrapped in bf16↔f32 layout reorders (17 % of the int8 encoder's time, measured). After
    the rewrite each part is its own projection: MatMul(DQ(the int8 rows of W for that part, same
    scale))ᵀ + those bias entries → Q/DQ → Reshape(B, L, heads, d) → Transpose(0, 2, 1, 3). The int8
    weights, scales and biases are the same numbers (a per-tensor Q/DQ commutes with Reshape and
    Transpose), so the graph computes the same function; OpenVINO then fuses each Q/DQ into its
    projection's int8 output. A runtime may then round differently (a different summation order, or
    ONNX Runtime running the projection and its Q as one int8 kernel): measured 2e-6 to 4e-4 of the
    q/k/v elements move by one step."""
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = node_consumers(g)

    def op(name: str | None, op_type: str):
        n = producer.get(name) if name else None
        return n if n is not None and n.op_type == op_type else None

    def only_consumer(name: str, op_type: str):
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op_type else None

    dead: set[int] = set()
    before: dict[int, list] = {}  # new nodes to insert before / after an existing node (keeps order)
    after: dict[int, list] = {}
    n_split = 0
    for split in [n for n in g.node if n.op_type == "Split"]:
        tr = op(split.input[0], "Transpose")
        rs = op(tr.input[0], "Reshape") if tr is not None else None
        add = op(rs.input[0], "Add") if rs is not None else None
        if add is None or list(tr.attribute[0].ints) != [0, 2, 1, 3] or len(split.input) < 2:
            continue
        bias = next((i for i in add.input if i in inits), None)
        mm = next((op(i, "MatMul") for i in add.input if i not in inits), None)
        w_t = op(mm.input[1], "Transpose") if mm is not None else None
        w_dq = op(w_t.input[0], "DequantizeLinear") if w_t is not None else None
        if bias is None or w_dq is None or w_dq.input[0] not in inits or split.input[1] not in inits:
            continue
        qdq = [(q, only_consumer(q.output[0], "DequantizeLinear") if q is not None else None)
               for q in (only_consumer(o, "QuantizeLinear") for o in split.output)]
        if any(q is None or dq is None for q, dq in qdq) or any(
                len(consumers[n.output[0]]) != 1 for n in (add, rs, tr, mm, w_t, w_dq)):
            continue
        sizes = numpy_helper.to_array(inits[split.input[1]])
        w, b = numpy_helper.to_array(inits[w_dq.input[0]]), numpy_helper.to_array(inits[bias])
        d, heads = int(sizes[0]), w.shape[0] // int(sizes.sum())
        if len(sizes) != 3 or len(set(sizes.tolist())) != 1 or heads * 3 * d != w.shape[0]:
            continue
        rows = np.arange(w.shape[0]).reshape(heads, 3, d)  # torch's view(B, L, heads, 3d) order
        # per-tensor weight scale / zero point: shared by the parts; per output channel: sliced like the rows
        qparams = [numpy_helper.to_array(inits[i]) if i in inits else None for i in w_dq.input[1:]]
        if any(a is None for a in qparams):
            continue
        for part, (q, dq) in enumerate(qdq):
            p = f"{split.name}/part{part}"
            idx = rows[:, part].reshape(-1)
            g.initializer.extend([numpy_helper.from_array(w[idx], p + "/weight_int8"),
                                  numpy_helper.from_array(b[idx], p + "/bias"),
                                  numpy_helper.from_array(np.array([0, 0, heads, d], np.int64), p + "/shape")])
            dq_inputs = list(w_dq.input[1:])
            for j, a in enumerate(qparams):
                if a.ndim == 1 and a.size == w.shape[0]:
                    dq_inputs[j] = f"{p}/{'scale' if j == 0 else 'zero_point'}"
                    g.initializer.append(numpy_helper.from_array(a[idx], dq_inputs[j]))
            before.setdefault(id(split), []).extend([
                helper.make_node("DequantizeLinear", [p + "/weight_int8", *dq_inputs], [p + "/weight"],
                                 name=p + "/weight/DequantizeLinear", **{a.name: helper.get_attribute_value(a)
                                                                         for a in w_dq.attribute}),
                helper.make_node("Transpose", [p + "/weight"], [p + "/weight_t"], perm=[1, 0], name=p + "/weight/Transpose"),
                helper.make_node("MatMul", [mm.input[0], p + "/weight_t"], [p + "/matmul"], name=p + "/MatMul"),
                helper.make_node("Add", [p + "/matmul", p + "/bias"], [p + "/out"], name=p + "/Add")])
            q.input[0] = p + "/out"
            heads_first = dq.output[0]  # what the attention MatMul reads: B×heads×L×d as before
            dq.output[0] = p + "/dq"
            after[id(dq)] = [
                helper.make_node("Reshape", [p + "/dq", p + "/shape"], [p + "/tokens"], name=p + "/Reshape"),
                helper.make_node("Transpose", [p + "/tokens"], [heads_first], perm=[0, 2, 1, 3], name=p + "/Transpose")]
        dead |= {id(n) for n in (split, tr, rs, add, mm, w_t, w_dq)}
        n_split += 1
    if n_split:
        nodes = []
        for n in g.node:
            nodes += before.get(id(n), [])
            if id(n) not in dead:
                nodes.append(n)
            nodes += after.get(id(n), [])
        del g.node[:]
        g.node.extend(nodes)
        drop_unused_initializers(g)  # the fused weights and biases, the split sizes
        onnx.save(m, str(path))
    return n_split


def check_onnx(path: Path) -> None:
    """onnx.checker with full shape inference; raises naming the file."""
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001  (checker raises several types)
        raise ValueError(f"{path}: onnx.checker failed: {e}") from None


def to_ir(onnx_path: Path, xml_path: Path) -> None:
    """ONNX → OpenVINO IR (xml + bin), weights kept in f32 (precision is chosen at compile time).

    Read by the ONNX frontend as is (Core.read_model), not through ov.convert_model: convert_model's
    offline graph rewrites break OpenVINO's int8 pattern for per-channel weight scales on the layers
    that write the residual stream of stages 2–3 (measured: 16 encoder FullyConnected and 4 merge
    convolutions then run in f32/bf16; read as is, every quantized layer runs in int8)."""
    import openvino as ov
    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "brevitas", "onnx", "onnxoptimizer", "openvino", "onnxruntime", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def export_model(net: model_lib.LiteMedSAM, out_dir: str | os.PathLike, info: dict,
                 opset: int = DEFAULT_OPSET, ir: bool = True, fold_clips: bool = True,
                 split_qkv: bool = True) -> Path:
    """Write encoder/decoder ONNX (+ IR) and meta.json into `out_dir`, atomically per file.
    fold_clips / split_qkv: the fold_weight_clips / split_fused_qkv post-passes on QCDQ graphs."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        ex = example_inputs()
        parts = {
            "encoder": (model_lib.EncoderGraph(net), ex["encoder"], ENCODER_INPUTS, ENCODER_OUTPUTS,
                        {"image": {0: "batch"}, "image_embedding": {0: "batch"}}),
            "decoder": (model_lib.DecoderGraph(net), ex["decoder"], DECODER_INPUTS, DECODER_OUTPUTS,
                        {"boxes": {0: "num_boxes"}, "low_res_logits": {0: "num_boxes"}}),
        }
        split_counts: dict[str, int] = {}
        for name, (graph, args, ins, outs, dyn) in parts.items():
            onnx_path = tmp / f"{name}.onnx"
            kind = "QCDQ" if is_quantized(graph) else "fp32"
            say(f"{name}: exporting {kind} ONNX (opset {opset})")
            export_onnx(graph, args, onnx_path, ins, outs, dyn, opset)
            drop_initializer_inputs(onnx_path)
            if fold_clips:
                n_clips = fold_weight_clips(onnx_path)
                if n_clips:
                    say(f"{name}: folded {n_clips} weight Clips into their int8 initializers")
            n_laid = fold_weight_layout(onnx_path)
            if n_laid:
                say(f"{name}: folded the Linear layout of {n_laid} transposed-conv weights into their int8 initializers")
            if split_qkv:
                split_counts[name] = split_fused_qkv(onnx_path)
                if split_counts[name]:
                    say(f"{name}: split {split_counts[name]} fused qkv projections into q, k, v")
            check_onnx(onnx_path)
            if ir:
                say(f"{name}: converting to OpenVINO IR")
                to_ir(onnx_path, tmp / f"{name}.xml")
        meta = dict(info)
        meta["quantizers"] = count_quantizers(net)
        meta.update({
            "opset": opset, "ir": ir, "fold_weight_clips": fold_clips, "split_qkv": split_counts,
            "format": {"encoder": "QCDQ" if meta["quantized"]["encoder"] else "fp32",
                                                  "decoder": "QCDQ" if meta["quantized"]["decoder"] else "fp32"},
            "exported_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "graphs": {"encoder": {"inputs": {"image": ["batch", 3, 256, 256]},
                                   "outputs": {"image_embedding": ["batch", 256, 64, 64]}},
                       "decoder": {"inputs": {"image_embedding": [1, 256, 64, 64], "boxes": ["num_boxes", 4]},
                                   "outputs": {"low_res_logits": ["num_boxes", 1, 256, 256]}}},
        })
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        out_dir.mkdir(exist_ok=True)
        (out_dir / "meta.json").unlink(missing_ok=True)  # an incomplete dir has no meta.json
        for name in MODEL_FILES:
            if (tmp / name).exists():
                os.replace(tmp / name, out_dir / name)
            elif name.endswith((".xml", ".bin")):
                (out_dir / name).unlink(missing_ok=True)  # --no-ir: no stale IR of another model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---- CLI ---------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="published",
                   help='"published" (fp32 LiteMedSAM) or a train.py checkpoint (.pth)')
    p.add_argument("--out", required=True, type=Path, help="model dir to write")
    p.add_argument("--fp32", action="store_true",
                   help="plain fp32 ONNX export (the checkpoint must not be quantized)")
    p.add_argument("--quantize-calibrated", action="store_true",
                   help="int8 post-training quantization of the published model: quantize_ + "
                        "calibrate on --calib-images images from --calib-data, then QCDQ export")
    p.add_argument("--calib-data", default=str(DEFAULT_CALIB_DATA),
                   help='folder of npz cases for --quantize-calibrated, or "synthetic"')
    p.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES,
                   help="number of calibration images")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--no-ir", action="store_true", help="write ONNX only, no OpenVINO IR")
    p.add_argument("--keep-clips", action="store_true",
                   help="skip the post-pass folding Clip(int8 weight) into the initializer "
                        "(OpenVINO then runs Conv/ConvTranspose in f32)")
    p.add_argument("--keep-fused-qkv", action="store_true",
                   help="skip the post-pass splitting the encoder's fused qkv projections into q, k, v "
                        "(OpenVINO then runs their quantizers standalone: ~17%% slower encoder)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.quantize_calibrated:
            if args.fp32 or args.checkpoint != "published":
                raise ValueError("--quantize-calibrated starts from the published model: "
                                 "drop --fp32 / --checkpoint")
            net, info = build_ptq_model(args.calib_data, args.calib_images)
        else:
            net, info = load_checkpoint(args.checkpoint)
            if args.fp32 and (info["quantized"]["encoder"] or info["quantized"]["decoder"]):
                raise ValueError(f"{args.checkpoint}: --fp32 given but the checkpoint is quantized")
        out = export_model(net, args.out, info, opset=args.opset, ir=not args.no_ir,
                           fold_clips=not args.keep_clips, split_qkv=not args.keep_fused_qkv)
    except (FileNotFoundError, ValueError) as e:
        say(f"error: {e}")
        return 1
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
