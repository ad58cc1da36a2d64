"""Export LiteMedSAM / QMedSAM to the model dir infer.py reads: ONNX (plain for fp32, Brevitas QCDQ
for int8) and OpenVINO IR.

    python export.py                                  # the latest run's best.pth (else int8 by calibration)
    python export.py --checkpoint CKPT --out MODEL_DIR [--fp32] [--opset N] [--no-ir]
    python export.py --quantize-calibrated --calib-data devset/imgs --calib-images 8 --out MODEL_DIR

Without --out the model goes to a new folder runs/export/<UTC time>/ (never over models/default).

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

import torch
import torch.nn as nn

import model as model_lib
import onnx_passes

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_OPSET = 17  # LayerNormalization is an ONNX op from opset 17: fewer nodes than its decomposition
DEFAULT_CALIB_DATA = REPO_DIR / "devset" / "imgs"
DEFAULT_CALIB_IMAGES = 8
ENCODER_INPUTS, ENCODER_OUTPUTS = ["image"], ["image_embedding"]
DECODER_INPUTS, DECODER_OUTPUTS = ["image_embedding", "boxes"], ["low_res_logits"]
PARTS = ("encoder", "decoder")
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


def build_ptq_model(calib_data: str | os.PathLike = DEFAULT_CALIB_DATA, k: int = DEFAULT_CALIB_IMAGES,
                    float_layers: Sequence[str] = model_lib.FLOAT_LAYERS_DEFAULT,
                    reconstruct_steps: int = 0, conv_input: str = "int8") -> tuple[model_lib.LiteMedSAM, dict]:
    """The published LiteMedSAM, int8-quantized (model.quantize_, `float_layers` kept float) and calibrated
    on K images; with `reconstruct_steps`, the encoder is then fitted block by block to the fp32 model on
    the same images (model.reconstruct_blocks) and the decoder recalibrated on its new embeddings."""
    net, info = load_checkpoint("published")
    model_lib.quantize_(net, float_layers=float_layers, conv_input=conv_input)
    images, boxes_256 = model_lib.calibration_batch(calib_data, k)
    say(f"calibrating on {len(images)} images from {calib_data}")
    model_lib.calibrate(net, images, boxes_256)
    if reconstruct_steps:
        teacher, _ = load_checkpoint("published")
        model_lib.reconstruct_blocks(net, teacher, images, steps=reconstruct_steps, log=say)
        model_lib.calibrate(net, images, boxes_256, parts=("mask_decoder",))
        info["reconstruction"] = {"steps_per_unit": reconstruct_steps, "images": len(images)}
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


DEFAULT_ENCODER_BATCH = 1  # infer.py embeds one image / slice per call; a static shape runs faster


def to_ir(onnx_path: Path, xml_path: Path, batch: int | None = None) -> None:
    """ONNX → OpenVINO IR (xml + bin), weights kept in f32 (precision is chosen at compile time; f16-stored
    weights measured 4–10 % slower at f32, decompressed as the FullyConnected run); with
    `batch`, the first input gets that static batch (so infer.py compiles the IR from its path, and a
    compiled-model cache hit never reads the graph).

    Read by the ONNX frontend as is (Core.read_model), not through ov.convert_model: convert_model's
    offline graph rewrites break OpenVINO's int8 pattern for per-channel weight scales on the layers
    that write the residual stream of stages 2–3 (measured: 16 encoder FullyConnected and 4 merge
    convolutions then run in f32/bf16; read as is, after onnx_passes, every quantized layer runs in int8)."""
    import openvino as ov
    graph = ov.Core().read_model(str(onnx_path))
    if batch:
        first = graph.inputs[0]
        graph.reshape({first: [batch, *first.get_partial_shape()[1:]]})
    ov.save_model(graph, str(xml_path), compress_to_fp16=False)


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
                 split_qkv: bool = True, encoder_batch: int | None = DEFAULT_ENCODER_BATCH,
                 keep_onnx: bool = True) -> Path:
    """Write encoder/decoder ONNX (+ IR) and meta.json into `out_dir`, atomically per file.
    fold_clips / split_qkv: the fold_weight_clips / split_fused_qkv post-passes on QCDQ graphs;
    keep_onnx False: the IR and meta.json only."""
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
        zero_points: dict[str, int] = {}
        for name, (graph, args, ins, outs, dyn) in parts.items():
            onnx_path = tmp / f"{name}.onnx"
            kind = "QCDQ" if is_quantized(graph) else "fp32"
            say(f"{name}: exporting {kind} ONNX (opset {opset})")
            export_onnx(graph, args, onnx_path, ins, outs, dyn, opset)
            onnx_passes.drop_initializer_inputs(onnx_path)
            if fold_clips:
                n_clips = onnx_passes.fold_weight_clips(onnx_path)
                if n_clips:
                    say(f"{name}: folded {n_clips} weight Clips into their int8 initializers")
            counts = finish_graph(onnx_path, name, split_qkv, ir, encoder_batch)
            if not keep_onnx:
                onnx_path.unlink()
            split_counts[name], zero_points[name] = counts["split_qkv"], counts["zero_points_dropped"]
        meta = dict(info)
        meta["quantizers"] = count_quantizers(net)
        meta.update({
            "opset": opset, "fold_weight_clips": fold_clips, "split_qkv": split_counts,
            "zero_points_dropped": zero_points,
            "format": {"encoder": "QCDQ" if meta["quantized"]["encoder"] else "fp32",
                       "decoder": "QCDQ" if meta["quantized"]["decoder"] else "fp32"},
        })
        write_meta_and_move(tmp, out_dir, meta, ir, encoder_batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def finish_graph(onnx_path: Path, name: str, split_qkv: bool, ir: bool, encoder_batch: int | None) -> dict:
    """The ONNX passes after export (layout folding, qkv split, zero-point removal), the checker, and the
    IR conversion of one part; returns what the passes changed."""
    n_laid = onnx_passes.fold_weight_layout(onnx_path)
    if n_laid:
        say(f"{name}: folded the Linear layout of {n_laid} transposed-conv weights into their int8 initializers")
    n_split = onnx_passes.split_fused_qkv(onnx_path) if split_qkv else 0
    if n_split:
        say(f"{name}: split {n_split} fused qkv projections into q, k, v")
    n_zero = onnx_passes.drop_zero_weight_zero_points(onnx_path)
    if n_zero:
        say(f"{name}: dropped {n_zero} all-zero weight zero points")
    onnx_passes.check_onnx(onnx_path)
    if ir:
        say(f"{name}: converting to OpenVINO IR")
        to_ir(onnx_path, onnx_path.with_suffix(".xml"), encoder_batch if name == "encoder" else None)
    return {"split_qkv": n_split, "zero_points_dropped": n_zero}


def write_meta_and_move(tmp: Path, out_dir: Path, meta: dict, ir: bool, encoder_batch: int | None) -> None:
    """meta.json (+ command, time, versions, graph shapes) into `tmp`, then every model file into
    `out_dir`; the old meta.json goes first and the new one comes last, so an incomplete dir has none."""
    ir_batch = encoder_batch if ir and encoder_batch else "batch"  # the ONNX keeps a dynamic batch
    meta.update({
        "command": "python " + " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("export.py") else None,
        "ir": ir,
        "exported_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "graphs": {"encoder": {"inputs": {"image": [ir_batch, 3, 256, 256]},
                               "outputs": {"image_embedding": [ir_batch, 256, 64, 64]}},
                   "decoder": {"inputs": {"image_embedding": [1, 256, 64, 64], "boxes": ["num_boxes", 4]},
                               "outputs": {"low_res_logits": ["num_boxes", 1, 256, 256]}}},
    })
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    out_dir.mkdir(exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # an incomplete dir has no meta.json
    for name in MODEL_FILES:
        if (tmp / name).exists():
            os.replace(tmp / name, out_dir / name)
        elif name.endswith((".xml", ".bin", ".onnx")):
            (out_dir / name).unlink(missing_ok=True)  # no stale file of another model


def reexport(src_dir: Path, out_dir: Path, ir: bool = True, encoder_batch: int | None = DEFAULT_ENCODER_BATCH) -> Path:
    """Run the current ONNX passes and IR conversion again on an exported model dir's ONNX files (same
    weights and scales, no torch model needed) into `out_dir`; its meta.json is carried over and updated."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if not (src_dir / "meta.json").is_file() or not all((src_dir / f"{p}.onnx").is_file() for p in PARTS):
        raise FileNotFoundError(f"{src_dir}: needs encoder.onnx, decoder.onnx and meta.json")
    meta = json.loads((src_dir / "meta.json").read_text())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name in PARTS:
            shutil.copyfile(src_dir / f"{name}.onnx", tmp / f"{name}.onnx")
            counts = finish_graph(tmp / f"{name}.onnx", name, True, ir, encoder_batch)
            dropped = meta.setdefault("zero_points_dropped", {})
            dropped[name] = dropped.get(name, 0) + counts["zero_points_dropped"]  # over every pass it has had
            if counts["split_qkv"]:  # a graph exported with --keep-fused-qkv is split now
                meta.setdefault("split_qkv", {})[name] = counts["split_qkv"]
        meta.setdefault("reexported_from", []).append(
            {"dir": str(src_dir), "exported_utc": meta.get("exported_utc"), "command": meta.get("command")})
        write_meta_and_move(tmp, out_dir, meta, ir, encoder_batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---- CLI ---------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help='"published" (fp32 LiteMedSAM) or a train.py checkpoint (.pth); default: the newest '
                        "runs/*/stage*/best.pth, or the published model int8-quantized by calibration if none")
    p.add_argument("--out", type=Path, default=None,
                   help="model dir to write; default: a new folder runs/export/<UTC time>")
    p.add_argument("--fp32", action="store_true",
                   help="plain fp32 ONNX export (the checkpoint must not be quantized)")
    p.add_argument("--quantize-calibrated", action="store_true",
                   help="int8 post-training quantization of the published model: quantize_ + "
                        "calibrate on --calib-images images from --calib-data, then QCDQ export")
    p.add_argument("--calib-data", default=str(DEFAULT_CALIB_DATA),
                   help="folder of npz cases for --quantize-calibrated")
    p.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES,
                   help="number of calibration images")
    p.add_argument("--float-layers", type=lambda s: tuple(x for x in s.split(",") if x),
                   default=model_lib.FLOAT_LAYERS_DEFAULT, metavar="PATTERN,…",
                   help="--quantize-calibrated: fnmatch patterns of module names left in float")
    p.add_argument("--conv-input", choices=tuple(model_lib.CONV_INPUTS), default="int8",
                   help="--quantize-calibrated: convolution input quantizers, symmetric int8 or uint8 with a "
                        "zero point (what OpenVINO's int8 convolutions take on CPUs without AMX)")
    p.add_argument("--reconstruct-steps", type=int, default=0,
                   help="--quantize-calibrated: Adam steps per encoder block fitting it to fp32 LiteMedSAM "
                        "(model.reconstruct_blocks); 0 = calibration only")
    p.add_argument("--save-checkpoint", type=Path, default=None,
                   help="also save the quantized model as a train.py-style checkpoint (to start QAT from)")
    p.add_argument("--from-onnx", type=Path, default=None, metavar="MODEL_DIR",
                   help="no torch export: run the current ONNX passes and IR conversion again on MODEL_DIR's "
                        "encoder/decoder.onnx (same weights and scales) and write them with its meta.json to --out")
    p.add_argument("--fp32-fallback", action="store_true",
                   help="also write OUT/fp32/: the published fp32 LiteMedSAM as IR (no ONNX), which infer.py runs "
                        "instead on CPUs where int8 is slower (no AVX-512, no VNNI)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--no-ir", action="store_true", help="write ONNX only, no OpenVINO IR")
    p.add_argument("--keep-clips", action="store_true",
                   help="skip the post-pass folding Clip(int8 weight) into the initializer "
                        "(OpenVINO then runs Conv/ConvTranspose in f32)")
    p.add_argument("--keep-fused-qkv", action="store_true",
                   help="skip the post-pass splitting the encoder's fused qkv projections into q, k, v "
                        "(OpenVINO then runs their quantizers standalone: ~17%% slower encoder)")
    p.add_argument("--encoder-batch", type=int, default=DEFAULT_ENCODER_BATCH,
                   help="static batch of the encoder IR (what infer.py runs); 0 = dynamic")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args(argv)


def write_fp32_fallback(out_dir: Path, opset: int = DEFAULT_OPSET,
                        encoder_batch: int | None = DEFAULT_ENCODER_BATCH) -> Path:
    """The published fp32 LiteMedSAM as OpenVINO IR (no ONNX) in `out_dir`: what
    infer.choose_model_dir runs on CPUs without fast int8 kernels."""
    say(f"fp32 fallback for CPUs without fast int8: {out_dir}")
    net, info = load_checkpoint("published")
    return export_model(net, out_dir, info, opset=opset, ir=True, encoder_batch=encoder_batch,
                        keep_onnx=False)


def latest_checkpoint(runs_dir: Path = REPO_DIR / "runs") -> Path | None:
    """The most recently written train.py selection, runs/<run>/stage<k>/best.pth, or None."""
    found = sorted(runs_dir.glob("*/stage*/best.pth"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def new_export_dir(runs_dir: Path = REPO_DIR / "runs") -> Path:
    """A folder name under runs/export/ that does not exist yet (UTC time, suffixed if taken)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out, k = runs_dir / "export" / stamp, 1
    while out.exists():
        out, k = runs_dir / "export" / f"{stamp}-{k}", k + 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or new_export_dir()
    if args.from_onnx:
        try:
            reexport(args.from_onnx, out, ir=not args.no_ir, encoder_batch=args.encoder_batch or None)
            if args.fp32_fallback and not args.no_ir:
                write_fp32_fallback(out / "fp32", args.opset, args.encoder_batch or None)
        except (FileNotFoundError, ValueError) as e:
            say(f"error: {e}")
            return 1
        say(f"wrote {args.from_onnx}'s graphs, passed and converted again, to {out}")
        return 0
    checkpoint = args.checkpoint
    if checkpoint is None and args.fp32:
        checkpoint = "published"
    if checkpoint is None and not args.quantize_calibrated:
        checkpoint = latest_checkpoint()
        if checkpoint is None:
            say("no runs/*/stage*/best.pth: exporting the published LiteMedSAM quantized to int8 by calibration")
            args.quantize_calibrated = True
        else:
            say(f"exporting the latest run's selected checkpoint {checkpoint}")
    try:
        if args.quantize_calibrated:
            if args.fp32 or checkpoint not in (None, "published"):
                raise ValueError("--quantize-calibrated starts from the published model: "
                                 "drop --fp32 / --checkpoint")
            net, info = build_ptq_model(args.calib_data, args.calib_images, float_layers=args.float_layers,
                                        reconstruct_steps=args.reconstruct_steps, conv_input=args.conv_input)
        else:
            net, info = load_checkpoint(str(checkpoint))
            if args.fp32 and (info["quantized"]["encoder"] or info["quantized"]["decoder"]):
                raise ValueError(f"{checkpoint}: --fp32 given but the checkpoint is quantized")
        if args.save_checkpoint:
            args.save_checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model_lib.save_model_state(net), args.save_checkpoint)
        out = export_model(net, out, info, opset=args.opset, ir=not args.no_ir, fold_clips=not args.keep_clips,
                           split_qkv=not args.keep_fused_qkv, encoder_batch=args.encoder_batch or None)
        if args.fp32_fallback and not args.no_ir:
            write_fp32_fallback(out / "fp32", args.opset, args.encoder_batch or None)
    except (FileNotFoundError, ValueError) as e:
        say(f"error: {e}")
        return 1
    kind = ("int8 (calibrated)" if args.quantize_calibrated else
            "int8" if info["quantized"]["encoder"] or info["quantized"]["decoder"] else "fp32")
    say(f"wrote the {kind} model of {info['checkpoint']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
