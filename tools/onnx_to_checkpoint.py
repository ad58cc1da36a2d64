"""A Brevitas checkpoint back from an exported int8 model dir, so a shipped model can be fine-tuned again.

    python -m tools.onnx_to_checkpoint models/default --like runs/ptq.pth --out runs/default.pth

An exported QCDQ model keeps what calibration learned: every activation quantizer's scale (a QuantizeLinear
named after its module) and the bias-corrected float biases (the encoder's qkv biases sliced into q, k, v
by the split pass). Weights and their per-channel scales follow from the weights, so a calibrated checkpoint
with the same float-layer list and the same weights (`--like`, e.g. `export.py --quantize-calibrated
--save-checkpoint`) takes those numbers and becomes the model in the dir. `--verify` exports the result and
requires the IR to match the dir's (weights byte for byte).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/onnx_to_checkpoint.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import model as model_lib
from train import save_atomic

PARTS = ("encoder", "decoder")
# export turns output_upscaling's two ConvTranspose into MatMuls without module names: their quantizers
UNNAMED_MATMULS = {"/mask_decoder/MatMul": "mask_decoder.output_upscaling.0.input_quant",
                   "/mask_decoder/MatMul_1": "mask_decoder.output_upscaling.3.input_quant"}


def module_path(node_name: str) -> str:
    """'/image_encoder/neck/neck.0/input_quant/export_handler/QuantizeLinear' → 'image_encoder.neck.0.input_quant'."""
    path = node_name.strip("/").split("/export_handler")[0].replace("/", ".")
    return path.replace(".neck.neck.", ".neck.")


def graph_numbers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every initializer and Constant value of the graph by name."""
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR})
    return values


def activation_scales(graph: onnx.GraphProto, values: dict[str, np.ndarray], modules: dict) -> dict[str, float]:
    """Module path of each activation quantizer → its scale in the graph (`values`: graph_numbers(graph))."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    scales = {}
    for n in graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        path = module_path(n.name)
        if path not in modules:  # a merged or renamed quantizer: name it by the layer its DequantizeLinear feeds
            dq = consumers[n.output[0]][0]
            path = UNNAMED_MATMULS.get(consumers[dq.output[0]][0].name, path)
        if path not in modules:
            raise ValueError(f"{n.name}: no quantizer {path} in the checkpoint's model")
        scales[path] = float(values[n.input[1]])
    return scales


def set_scale(proxy, scale: float) -> None:
    """Make an activation quantizer's learned scale exactly `scale` (float32)."""
    value = proxy.fused_activation_quant_proxy.tensor_quant.scaling_impl.value
    value.mul_(scale / float(proxy.scale()))
    target = torch.tensor(scale, dtype=torch.float32)
    for _ in range(8):  # the product's float32 rounding: step the stored value onto the exact scale
        got = proxy.scale().detach().reshape(())
        if got == target:
            return
        value.copy_(torch.nextafter(value, value * (2.0 if got < target else 0.5)))
    raise ValueError(f"scale {scale} not reachable ({float(proxy.scale())})")


def set_biases(values: dict[str, np.ndarray], net: torch.nn.Module) -> int:
    """Copy a graph's float biases (`values`: graph_numbers(graph)) into `net`; returns how many."""
    params, modules = dict(net.named_parameters()), dict(net.named_modules())
    n = 0
    for name, value in values.items():
        if name.startswith("model.") and name.endswith(".bias") and name[len("model."):] in params:
            params[name[len("model."):]].copy_(torch.from_numpy(value.copy()))
            n += 1
        elif name.endswith("/Split/part0/bias"):  # a fused qkv bias the split pass sliced per head
            attn = name[:-len("/Split/part0/bias")]
            bias = params[module_path(attn) + ".qkv.bias"]
            heads = modules[module_path(attn)].num_heads
            rows = np.arange(bias.numel()).reshape(heads, 3, -1)  # torch's view(B, L, heads, 3d) order
            full = bias.detach().clone().numpy()
            for k in range(3):
                full[rows[:, k].reshape(-1)] = values[f"{attn}/Split/part{k}/bias"]
            bias.copy_(torch.from_numpy(full))
            n += 1
    return n


def checkpoint_from_dir(model_dir: Path, like: str) -> dict:
    """The checkpoint `like` with the activation scales and biases of the int8 model in `model_dir`."""
    net = model_lib.build_model(like).eval()
    modules = dict(net.named_modules())
    n_scales = n_biases = 0
    with torch.no_grad():
        for part in PARTS:
            path = model_dir / f"{part}.onnx"
            if not path.is_file():
                continue
            graph = onnx.load(str(path)).graph
            values = graph_numbers(graph)
            for module, scale in activation_scales(graph, values, modules).items():
                set_scale(modules[module], scale)
                n_scales += 1
            n_biases += set_biases(values, net)
    if n_scales == 0:
        raise ValueError(f"{model_dir}: no QCDQ encoder.onnx / decoder.onnx with activation quantizers")
    state = model_lib.save_model_state(net)
    state["from_model_dir"] = {"dir": str(model_dir), "like": like, "scales": n_scales, "biases": n_biases}
    return state


def ir_text(path: Path) -> str:
    """An IR's XML with OpenVINO's generated layer names (`Constant_17905`: a per-process counter) blanked."""
    return re.sub(r"\b([A-Z][A-Za-z]*)_\d+\b", r"\1_#", path.read_text())


def differing_ir(a: Path, b: Path) -> list[str]:
    """IR files of `a` that differ from `b`'s: weights byte for byte, graphs up to generated names."""
    out = []
    for part in PARTS:
        if not (a / f"{part}.xml").is_file():
            continue
        if (a / f"{part}.bin").read_bytes() != (b / f"{part}.bin").read_bytes():
            out.append(f"{part}.bin")
        if ir_text(a / f"{part}.xml") != ir_text(b / f"{part}.xml"):
            out.append(f"{part}.xml")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, help="exported int8 model dir (encoder.onnx, decoder.onnx)")
    p.add_argument("--like", required=True, help="calibrated checkpoint with the same float layers and weights")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    p.add_argument("--verify", action="store_true", help="re-export it and require the dir's IR back")
    cfg = p.parse_args(argv)
    state = checkpoint_from_dir(cfg.model_dir, cfg.like)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(state, cfg.out)
    print(f"onnx_to_checkpoint: {cfg.out}: {state['from_model_dir']['scales']} activation scales, "
          f"{state['from_model_dir']['biases']} biases from {cfg.model_dir}", file=sys.stderr)
    if cfg.verify:
        import export
        with tempfile.TemporaryDirectory() as tmp:
            export.main(["--checkpoint", str(cfg.out), "--out", tmp])
            differ = differing_ir(Path(tmp), cfg.model_dir)
        if differ:
            print(f"onnx_to_checkpoint: {cfg.out} exports a different model than {cfg.model_dir}: "
                  f"{', '.join(differ)} (other weights or float layers in --like?)", file=sys.stderr)
            return 1
        print(f"onnx_to_checkpoint: the re-exported IR matches {cfg.model_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
