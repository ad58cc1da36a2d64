"""ONNX graph passes that export.py runs on Brevitas' QCDQ graphs, each exact (the graph computes the
same function) and each there so a runtime sees int8 patterns it can run as int8 kernels.

    drop_initializer_inputs   initializers listed as graph inputs → plain initializers
    fold_weight_clips         int8 weight → Clip(-127, 127) → DQ  ⇒  int8 weight → DQ
    fold_weight_layout        DQ → Transpose/Reshape chain  ⇒  the chain applied to the int8 weight
    split_fused_qkv           one fused qkv projection + Split  ⇒  three projections with their own Q/DQ
    drop_zero_weight_zero_points  DQ(int8 weight, scale, zero point of zeros)  ⇒  DQ(int8 weight, scale)
    drop_unused_initializers  clean-up after the passes above

Every pass takes an .onnx path, rewrites it in place and returns how many places it changed.
numpy + onnx only (no torch): the passes are tested on hand-built graphs as well as on exported ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


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
                helper.make_node("Transpose", [p + "/weight"], [p + "/weight_t"], perm=[1, 0],
                                 name=p + "/weight/Transpose"),
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


def drop_zero_weight_zero_points(path: Path) -> int:
    """Remove the zero-point input of every weight DequantizeLinear (integer initializer in) whose zero
    point is all zeros, in place; returns how many. Exact: an absent zero point is zero.

    Brevitas writes a zero-point tensor per layer and the exporter merges equal ones, so one zeros
    vector serves, say, a merge convolution and the FullyConnected layers of the same width. OpenVINO
    keeps such a shared Subtract on the weight path at a static input shape, takes those layers for
    compressed-weight FullyConnected / float convolutions, and runs them in bf16 (f32) with fake-quantized
    inputs: 16 of the encoder's 60 FullyConnected and 4 of its convolutions (see the runtime precision test)."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    dropped = 0
    for n in g.node:
        if (n.op_type != "DequantizeLinear" or len(n.input) < 3 or n.input[0] not in inits
                or n.input[2] not in inits):
            continue
        if numpy_helper.to_array(inits[n.input[0]]).dtype.kind in "iu" and not numpy_helper.to_array(
                inits[n.input[2]]).any():
            del n.input[2]
            dropped += 1
    if dropped:
        drop_unused_initializers(g)
        onnx.save(m, str(path))
    return dropped


def check_onnx(path: Path) -> None:
    """onnx.checker with full shape inference; raises naming the file."""
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001  (checker raises several types)
        raise ValueError(f"{path}: onnx.checker failed: {e}") from None
