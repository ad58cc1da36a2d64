"""Where the encoder's time goes: OpenVINO's per-op counters of one compiled encoder, grouped by stage and
op kind, each group against its own floor.

    python -m tools.encoder_budget                              # models/default, as infer.py compiles it
    python -m tools.encoder_budget -m runs/models/fp32 --precision f32 --repeats 20 --ops 15
    python -m tools.encoder_budget --split 1 --ops 0           # + what no change before stage 1 can beat

The encoder is compiled the way infer.py compiles it (static 1×3×256×256; `--precision auto` leaves the
float ops to OpenVINO, bf16 on this CPU) with PERF_COUNT on, run --repeats times on a real dev-set slice,
and every executed runtime op is attributed to a group: (stage, kind, precision). Stage comes from the
op's original ONNX names (patch_embed, layers.0–3, neck); kind from its runtime type, convolutions split
into 1×1, depthwise and other. Floors: matmul/conv work at the CPU's peak for its precision (--int8-tops,
--bf16-tflops, --f32-tflops), everything else at memory bandwidth (bytes read + written, measured here
by a large numpy copy unless --bandwidth-gbs is given). "×floor" = measured / floor: how far a group is
from what the hardware could do, which says where effort pays.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/encoder_budget.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import data
import infer

REPO = Path(__file__).resolve().parents[1]
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i8": 1, "u8": 1, "i32": 4, "i64": 8, "boolean": 1}
COMPUTE_KINDS = {"Convolution", "FullyConnected", "MatMul", "Deconvolution"}


def stage_of(names: str) -> str:
    """'patch_embed' | 'stage 0'…'stage 3' | 'neck' | 'io' from an op's original layer names."""
    if "/patch_embed/" in names or ".patch_embed." in names:
        return "patch_embed"
    m = re.search(r"layers\.(\d)", names)
    if m:
        return f"stage {m.group(1)}"
    if "/neck" in names or ".neck." in names:
        return "neck"
    return "io"


def shape_of(port) -> list[int]:
    ps = port.get_partial_shape()
    return [d.get_length() for d in ps] if ps.is_static else []


def op_work(op) -> tuple[str, float, float]:
    """(kind, FLOPs, bytes moved) of one runtime op, from its static input and output shapes."""
    kind = op.get_rt_info()["layerType"].astype(str)
    outs = [shape_of(op.output(i)) for i in range(op.get_output_size())]
    ins = [shape_of(op.input(i).get_source_output()) for i in range(op.get_input_size())]
    prec = [p.strip() for p in op.get_rt_info()["outputPrecisions"].astype(str).split(",")] if \
        "outputPrecisions" in op.get_rt_info() else ["f32"]
    out_elems = sum(int(np.prod(s)) for s in outs if s)
    in_elems = sum(int(np.prod(s)) for s in ins[:1] if s)  # weights stay in cache: count the data input
    elem = BYTES.get(prec[0], 4)
    flops = 0.0
    if kind == "Convolution" and len(ins) > 1 and ins[1]:
        w = ins[1]
        group = len(w) == 5  # a grouped weight G×O×I×kh×kw
        per_out = int(np.prod(w[2:] if group else w[1:]))
        kind = "conv dw3x3" if group and w[2] == 1 else ("conv 1x1" if w[-1] == w[-2] == 1 else "conv kxk")
        flops = 2.0 * out_elems * per_out
    elif kind in ("FullyConnected", "MatMul") and ins and ins[0]:
        flops = 2.0 * out_elems * ins[0][-1]
    elif kind == "Deconvolution" and len(ins) > 1 and ins[1]:
        flops = 2.0 * out_elems * int(np.prod(ins[1][1:])) / 4
    return kind, flops, float((in_elems + out_elems) * elem)


def measure_bandwidth_gbs(mb: int = 256) -> float:
    """Copy bandwidth (read + write) of this machine in GB/s, best of 5 numpy copies."""
    a = np.ones(mb * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return 2 * a.nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plugin_config(precision: str, threads: int | None) -> dict:
    """The CPU plugin settings infer.py would use for this precision and thread count."""
    config: dict = {} if precision == "auto" else {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def probe_image() -> np.ndarray:
    """The encoder input every timing here uses: the middle slice of a demo CT volume, 1×3×256×256."""
    case = data.load_case(REPO / "demo" / "imgs" / "3DBox_CT_sts_1.npz", keys=("imgs",))
    return data.preprocess_image(case["imgs"][len(case["imgs"]) // 2])[None]


def budget(model_dir: Path, precision: str, repeats: int, threads: int | None) -> tuple[dict, float, list]:
    """Run the encoder with per-op counters → ({(stage, kind, precision): [ms, flops, bytes, n]},
    median wall ms per call, the slowest single ops)."""
    import openvino as ov
    core = ov.Core()
    encoder = core.read_model(str(model_dir / "encoder.xml"))
    if infer.static_encoder_batch(model_dir) != 1:
        encoder.reshape({encoder.inputs[0]: [1, 3, 256, 256]})
    compiled = core.compile_model(encoder, "CPU", {**plugin_config(precision, threads), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    image = probe_image()
    for _ in range(3):
        request.infer({0: image})
    runtime = {op.get_friendly_name(): op for op in compiled.get_runtime_model().get_ordered_ops()}
    per_op: dict[str, float] = defaultdict(float)
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        request.infer({0: image})
        walls.append(1000 * (time.perf_counter() - t0))
        for info in request.get_profiling_info():
            per_op[info.node_name] += info.real_time.total_seconds() * 1000 / repeats
    groups: dict[tuple, list] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    slow = []
    for name, ms in per_op.items():
        op = runtime.get(name)
        if op is None or ms <= 0:
            continue
        rt = op.get_rt_info()
        kind, flops, nbytes = op_work(op)
        prec = rt["runtimePrecision"].astype(str)
        key = (stage_of(rt["originalLayersNames"].astype(str) + " " + name), kind, prec)
        g = groups[key]
        g[0] += ms
        g[1] += flops
        g[2] += nbytes
        g[3] += 1
        slow.append((ms, name, kind, prec))
    return dict(groups), float(np.median(walls)), sorted(slow, reverse=True)


def split_model(model, stage: int):
    """(prefix, suffix) ov.Models of an encoder IR cut at the input of encoder stage `stage`: the one
    tensor that stage `stage - 1` hands on becomes the prefix's output and the suffix's input."""
    import openvino as ov
    src, dst = f"stage {stage - 1}", f"stage {stage}"
    cut = {(op.get_friendly_name(), i) for op in model.get_ordered_ops() if op.get_type_name() != "Constant"
           and stage_of(op.get_friendly_name()) == src for i in range(op.get_output_size())
           if any(stage_of(t.get_node().get_friendly_name()) == dst for t in op.output(i).get_target_inputs())}
    if len(cut) != 1:
        raise ValueError(f"expected one tensor from {src} into {dst}, found {sorted(cut)}")
    name, index = cut.pop()
    out = next(op for op in model.get_ordered_ops() if op.get_friendly_name() == name).output(index)
    prefix = ov.Model([ov.opset13.result(out)], list(model.get_parameters()), "prefix")
    prefix = prefix.clone()  # detach from the graph the suffix is about to rewire
    param = ov.opset13.parameter(out.get_partial_shape(), out.get_element_type(), name=f"stage{stage}_input")
    for target in list(out.get_target_inputs()):
        target.replace_source_output(param.output(0))
    return prefix, ov.Model(list(model.get_results()), [param], "suffix")


def split_times(model_dir: Path, stage: int, precision: str, repeats: int, threads: int | None,
                int8_tops: float) -> dict[str, float]:
    """Median wall ms of the whole encoder, its prefix and its suffix (cut at `stage`), compiled alone and
    called in turn; and the prefix's convolution/matmul FLOPs at the int8 peak."""
    import openvino as ov
    core = ov.Core()
    config = plugin_config(precision, threads)
    whole = core.read_model(str(model_dir / "encoder.xml"))
    whole.reshape({whole.inputs[0]: [1, 3, 256, 256]})
    prefix, suffix = split_model(core.read_model(str(model_dir / "encoder.xml")), stage)
    prefix.reshape({prefix.inputs[0]: [1, 3, 256, 256]})
    parts = {"whole": whole, "prefix": prefix, "suffix": suffix}
    compiled = {k: core.compile_model(m, "CPU", config) for k, m in parts.items()}
    image = probe_image()
    feeds = {"whole": image, "prefix": image,
             "suffix": compiled["prefix"].create_infer_request().infer({0: image})[0].copy()}
    requests = {k: c.create_infer_request() for k, c in compiled.items()}
    walls: dict[str, list[float]] = {k: [] for k in parts}
    for r in range(repeats + 3):
        for k, req in requests.items():
            t0 = time.perf_counter()
            req.infer({0: feeds[k]})
            if r >= 3:  # the first calls warm caches and thread pools
                walls[k].append(1000 * (time.perf_counter() - t0))
    flops = sum(op_work(op)[1] for op in compiled["prefix"].get_runtime_model().get_ordered_ops()
                if "Constant" not in op.get_rt_info()["layerType"].astype(str))
    out = {k: float(np.median(v)) for k, v in walls.items()}
    out["prefix_int8_floor"] = 1000 * flops / (int8_tops * 1e12)
    return out


def floor_ms(kind: str, prec: str, flops: float, nbytes: float, peaks: dict, bandwidth_gbs: float) -> float:
    if flops and (kind in COMPUTE_KINDS or kind.startswith("conv")):
        peak = peaks["int8"] if prec in ("i8", "u8") else peaks.get(prec, peaks["f32"])
        return 1000 * flops / (peak * 1e12)
    return 1000 * nbytes / (bandwidth_gbs * 1e9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", type=Path, default=infer.DEFAULT_MODEL_DIR, help="model dir (encoder.xml)")
    p.add_argument("--precision", choices=("auto", "bf16", "f32"), default="auto",
                   help="INFERENCE_PRECISION_HINT for the float ops (auto: infer.py's default)")
    p.add_argument("--repeats", type=int, default=20, help="timed encoder calls")
    p.add_argument("--threads", type=int, default=None, help="inference threads (none: the runtime's choice)")
    p.add_argument("--int8-tops", type=float, default=0.95, help="int8 peak of the machine (u8×s8 dot products)")
    p.add_argument("--bf16-tflops", type=float, default=0.47, help="bf16 peak")
    p.add_argument("--f32-tflops", type=float, default=0.24, help="f32 peak")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth; measured when not given")
    p.add_argument("--ops", type=int, default=12, help="also list the N slowest single ops")
    p.add_argument("--split", type=int, default=None, metavar="K",
                   help="also time the encoder from stage K on, compiled alone, beside the whole encoder")
    args = p.parse_args(argv)
    bandwidth = args.bandwidth_gbs or measure_bandwidth_gbs()
    groups, wall_ms, slow = budget(args.model, args.precision, args.repeats, args.threads)
    peaks = {"int8": args.int8_tops, "bf16": args.bf16_tflops, "f32": args.f32_tflops}
    total = sum(g[0] for g in groups.values())
    print(f"{args.model} encoder, batch 1, float ops: {args.precision}; wall {wall_ms:.1f} ms per call (median of "
          f"{args.repeats}), op counters sum {total:.1f} ms; floors: int8 {args.int8_tops} TOPS, bf16 "
          f"{args.bf16_tflops} / f32 {args.f32_tflops} TFLOPS, memory {bandwidth:.1f} GB/s\n")
    print("| stage | op kind | precision | ops | ms | % | GFLOP | MB moved | floor ms | ×floor |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    for (stage, kind, prec), (ms, flops, nbytes, n) in rows:
        fl = floor_ms(kind, prec, flops, nbytes, peaks, bandwidth)
        print(f"| {stage} | {kind} | {prec} | {n} | {ms:.1f} | {100 * ms / total:.1f} | {flops / 1e9:.2f} | "
              f"{nbytes / 2**20:.1f} | {fl:.2f} | {ms / max(fl, 1e-6):.1f} |")
    by_stage: dict[str, float] = defaultdict(float)
    for (stage, _, _), g in groups.items():
        by_stage[stage] += g[0]
    print("\nper stage: " + ", ".join(f"{s} {ms:.1f} ms" for s, ms in sorted(by_stage.items())))
    by_prec: dict[str, float] = defaultdict(float)
    for (_, _, prec), g in groups.items():
        by_prec[prec] += g[0]
    print("per precision: " + ", ".join(f"{s} {ms:.1f} ms ({100 * ms / total:.0f} %)" for s, ms in
                                        sorted(by_prec.items(), key=lambda kv: -kv[1])))
    if args.ops:
        print(f"\nslowest {args.ops} ops:")
        for ms, name, kind, prec in slow[:args.ops]:
            print(f"  {ms:6.2f} ms  {kind:<16} {prec:<5} {name[:110]}")
    if args.split is not None:
        t = split_times(args.model, args.split, args.precision, args.repeats, args.threads, args.int8_tops)
        k = args.split
        print(f"\ncut at the input of stage {k}, each part compiled alone, calls alternating (median of "
              f"{args.repeats}):\n"
              f"  whole encoder                      {t['whole']:6.1f} ms\n"
              f"  before stage {k} (prefix)            {t['prefix']:6.1f} ms\n"
              f"  stage {k} to the embedding (suffix)  {t['suffix']:6.1f} ms\n"
              f"  prefix's conv/matmul FLOPs at the int8 peak {t['prefix_int8_floor']:.1f} ms\n"
              f"  => no change before stage {k} gets the encoder below "
              f"{t['suffix'] + t['prefix_int8_floor']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
