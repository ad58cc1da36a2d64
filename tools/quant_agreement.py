"""How closely an exported int8 model agrees with fp32 LiteMedSAM: mean mask IoU over every box of a
dev-set half's slices, the int8 IR run as infer.py runs it against the fp32 torch model.

    python -m tools.quant_agreement -m models/default --half check          # the shipped model
    python -m tools.quant_agreement -m runs/models/ptq --half tune --slices 3 --precision f32

Each 2D case gives its image; each 3D case gives --slices slices spread over its boxes' z-range, each
with the boxes that reach it. Both models get the same preprocessed image and the same boxes in model
space (the shipped pipeline's defaults); masks are the low-res logits > 0, so the figure isolates the
network, not the pipeline around it. Per modality and overall; IoU of two empty masks counts as 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/quant_agreement.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import data
import infer

REPO = Path(__file__).resolve().parents[1]


def slices_of(case: infer.Case, per_volume: int, where: bool = False) -> list[tuple]:
    """(2D image, boxes x0 y0 x1 y1 in pixels) samples of one case (see the module doc); with `where`,
    each sample also names its slice (None for 2D) and its boxes' labels (box row + 1)."""
    rows = np.flatnonzero(case.valid)
    boxes = case.boxes[rows]
    if not case.is_3d:
        return [(case.imgs, boxes) + ((None, rows + 1) if where else ())]
    z_lo, z_hi = int(boxes[:, 2].min()), int(boxes[:, 5].max())
    out = []
    for z in np.unique(np.linspace(z_lo, z_hi, per_volume + 2)[1:-1].round().astype(int)):
        on = (boxes[:, 2] <= z) & (z <= boxes[:, 5])
        out.append((case.imgs[z], boxes[on][:, [0, 1, 3, 4]]) + ((int(z), rows[on] + 1) if where else ()))
    return out


def agreement(model_dir: Path, half: str, per_volume: int, precision: str, only: str = "") -> dict[str, list]:
    import torch

    import losses
    import model as model_lib
    import train
    torch.set_num_threads(2)
    ref = train.TorchModel(model_lib.build_model("published"))
    net = infer.load_model(model_dir, precision=precision, cache_dir=None)
    per_modality: dict[str, list[float]] = {}
    paths = sorted(p for p in (REPO / "devset" / "imgs").glob("*.npz")
                   if (half == "all" or data.half_of(p) == half) and (not only or only in p.name))
    for path in paths:
        case = infer.load_case(path)
        modality, pipe = case.modality, infer.resolve_pipeline(case)
        for img, boxes in slices_of(case, per_volume):
            if len(boxes) == 0:
                continue
            image = infer.model_input(img, pipe.image_interp, pipe.norm_then_pad, modality)[None]
            boxes_256 = data.boxes_to_256(boxes, img.shape[:2], rounding=pipe.box_rounding)
            emb, emb_ref = net.encode(image), ref.encode(image)
            for start in range(0, len(boxes_256), infer.DEFAULT_BLOCK):
                part = boxes_256[start:start + infer.DEFAULT_BLOCK]
                ours, fp32 = net.decode(emb, part), ref.decode(emb_ref, part)
                per_modality.setdefault(modality, []).extend(  # two empty masks agree fully
                    losses.mask_iou(torch.from_numpy(ours), torch.from_numpy((fp32 > 0).astype(np.float32))).tolist())
        print(f"quant_agreement: {path.name}: mean IoU so far {np.mean(per_modality[modality]):.4f}",
              file=sys.stderr, flush=True)
    return per_modality


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", type=Path, default=infer.DEFAULT_MODEL_DIR, help="int8 model dir (IR)")
    p.add_argument("--half", choices=("tune", "check", "all"), default="check", help="dev-set half")
    p.add_argument("--slices", type=int, default=5, help="slices per 3D case, spread over its boxes")
    p.add_argument("--precision", choices=("auto", "bf16", "f32"), default="auto",
                   help="float ops of the int8 IR (auto: infer.py's default)")
    p.add_argument("--only", default="", help="only cases whose name contains this")
    args = p.parse_args(argv)
    per_modality = agreement(args.model, args.half, args.slices, args.precision, args.only)
    every = [v for vs in per_modality.values() for v in vs]
    print(f"mean mask IoU, {args.model} ({args.precision}) vs fp32 torch, {args.half} half:")
    print("| modality | boxes | mean IoU | min IoU |\n|---|---:|---:|---:|")
    for m, vs in sorted(per_modality.items()):
        print(f"| {m} | {len(vs)} | {np.mean(vs):.4f} | {np.min(vs):.3f} |")
    print(f"| **all** | {len(every)} | **{np.mean(every):.4f}** | {np.min(every):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
