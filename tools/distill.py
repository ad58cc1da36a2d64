"""Cached-teacher distillation of a calibrated int8 LiteMedSAM's encoder on a CPU budget (the paper's stage 1,
teacher = fp32 LiteMedSAM, with the teacher's work done once instead of every step).

    python -m tools.distill --checkpoint runs/ptq.pth --out runs/distilled.pth --epochs 3

1. Samples: the dev set's tune half only (never the check half): every 2D image and its horizontal flip,
   and --slices slices of each 3D volume spread over its boxes' z-range, preprocessed as at inference,
   with the boxes that reach the slice.
2. Cache, once: the fp32 teacher's image embedding and its low-res mask logits for every box; and the input
   of the first quantized encoder stage, which the teacher and the student compute alike when everything
   before it is float (patch embedding and stage 0 in the default float list), so the student's steps
   skip that third of the encoder.
3. The quantized stages and neck (weights, biases, norms, learned activation scales; straight-through
   rounding) minimise the MSE between the student's and the teacher's embeddings; the teacher's masks
   only monitor (mask IoU of the held-out samples, through the student's decoder).
AdamW, warm-up from 1 % then cosine to 0.1 % of --lr, as the paper schedules. Writes a train.py-style
checkpoint that export.py reads (--checkpoint).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/distill.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

import data
import infer
import losses
import model as model_lib
from tools.quant_agreement import slices_of
from train import lr_at, save_atomic

REPO = Path(__file__).resolve().parents[1]


def tune_samples(root: Path, half: str, per_volume: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(model input 3×256×256, boxes_256 N×4, case name) for every training sample of `half`."""
    out = []
    for path in sorted(root.glob("*.npz")):
        if data.half_of(path) != half:
            continue
        case = infer.load_case(path)
        pipe, modality = infer.resolve_pipeline(case), case.modality
        views = slices_of(case, per_volume)  # the 2D image, or slices spread over the 3D boxes' z-range
        if not case.is_3d:
            img, boxes = views[0]
            flipped = boxes.copy()
            flipped[:, [0, 2]] = img.shape[1] - boxes[:, [2, 0]]
            views.append((np.ascontiguousarray(img[:, ::-1]), flipped))
        for img, bx in views:
            if len(bx) == 0:
                continue
            image = infer.model_input(img, pipe.image_interp, pipe.norm_then_pad, modality)
            out.append((image, data.boxes_to_256(bx, img.shape[:2], rounding=pipe.box_rounding), path.name))
    return out


def first_quantized_stage(student: model_lib.LiteMedSAM) -> int:
    """Index of the first encoder stage holding a quantizer; patch embedding and stages before it are float."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    quant = (QuantWeightBiasInputOutputLayer, model_lib.qnn.QuantIdentity)
    if any(isinstance(m, quant) for m in student.image_encoder.patch_embed.modules()):
        return -1
    for i, layer in enumerate(student.image_encoder.layers):
        if any(isinstance(m, quant) for m in layer.modules()):
            return i
    return len(student.image_encoder.layers)


def encoder_prefix(encoder, image: torch.Tensor, start: int) -> torch.Tensor:
    """The encoder's activations just before stage `start` (start = -1: the image itself)."""
    if start < 0:
        return image
    x = encoder.patch_embed(image)
    for layer in encoder.layers[:start]:
        x = layer(x)
    return x


def encoder_suffix(encoder, x: torch.Tensor, start: int) -> torch.Tensor:
    """The rest of the encoder from stage `start`'s input to the image embedding."""
    if start < 0:
        return encoder(x)
    for layer in encoder.layers[start:]:
        x = layer(x)
    return encoder.neck(model_lib.tokens_to_map(x, encoder.embed_size, encoder.embed_size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="calibrated int8 checkpoint (export.py --save-checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    p.add_argument("--data", type=Path, default=REPO / "devset" / "imgs", help="dev-set images")
    p.add_argument("--slices", type=int, default=12, help="slices per 3D volume")
    p.add_argument("--epochs", type=int, default=3, help="encoder epochs over the cached samples")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (encoder)")
    p.add_argument("--max-boxes", type=int, default=8, help="boxes per sample kept for the mask monitor")
    p.add_argument("--holdout", type=int, default=8, help="every k-th sample only monitors (0: none)")
    p.add_argument("--cache", type=Path, default=None,
                   help="teacher cache file: read if it exists (same samples), else written after computing it")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    cfg = p.parse_args(argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"distill [{time.time() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    teacher = model_lib.build_model("published").eval()
    student = model_lib.build_model(cfg.checkpoint).eval()
    start = first_quantized_stage(student)
    samples = tune_samples(cfg.data, "tune", cfg.slices)
    log(f"{len(samples)} samples from {len({s[2] for s in samples})} tune-half cases; "
        f"student steps start at encoder stage {start}")

    # the teacher's work, once
    key = {"cases": [s[2] for s in samples], "start": start, "max_boxes": cfg.max_boxes}
    cached = torch.load(cfg.cache, weights_only=False) if cfg.cache and cfg.cache.is_file() else None
    if cached is not None and cached["key"] == key:
        prefix, emb_t, boxes, logits_t = cached["prefix"], cached["emb_t"], cached["boxes"], cached["logits_t"]
    else:
        prefix, emb_t, boxes, logits_t = [], [], [], []
        with torch.no_grad():
            for image, bx, _ in samples:
                x = torch.from_numpy(image)[None]
                pre = encoder_prefix(teacher.image_encoder, x, start)
                e = encoder_suffix(teacher.image_encoder, pre, start)
                b = torch.from_numpy(bx[:cfg.max_boxes]).float()
                prefix.append(pre.half())
                emb_t.append(e.half())
                boxes.append(b)
                logits_t.append(teacher.decode(e, b).half())
        if cfg.cache:
            cfg.cache.parent.mkdir(parents=True, exist_ok=True)
            save_atomic({"key": key, "prefix": prefix, "emb_t": emb_t, "boxes": boxes, "logits_t": logits_t},
                        cfg.cache)
    log(f"teacher cache: {sum(t.numel() for t in prefix + emb_t + logits_t) * 2 / 1e9:.2f} GB")
    n = len(samples)
    held = [i for i in range(n) if cfg.holdout and i % cfg.holdout == 0]
    train_idx = [i for i in range(n) if i not in set(held)]

    def student_embedding(idx: list[int]) -> torch.Tensor:
        return encoder_suffix(student.image_encoder, torch.cat([prefix[i] for i in idx]).float(), start)

    def held_mse() -> float:
        with torch.no_grad():
            return float(np.mean([F.mse_loss(student_embedding([i]), emb_t[i].float()).item() for i in held]))

    def held_iou() -> float:
        with torch.no_grad():
            ious = []
            for i in held:
                logits = student.decode(student_embedding([i]), boxes[i])
                ious += losses.mask_iou(logits, (logits_t[i] > 0).float()).tolist()
            return float(np.mean(ious))

    def save(progress: str) -> None:
        """The student as it is now, a checkpoint export.py reads; rewritten after every epoch."""
        state = model_lib.save_model_state(student)
        state["distill"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
        state["distill"]["progress"] = progress
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(state, cfg.out)

    def run_stage(name: str, params: list, epochs: int, lr: float, loss_of) -> None:
        if epochs <= 0 or not params:
            return
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        per_epoch = len(train_idx) // cfg.batch_size
        total, step = per_epoch * epochs, 0
        warmup = max(1, total // 20)
        gen = torch.Generator().manual_seed(cfg.seed)
        log(f"{name}: before: held-out embedding MSE {held_mse():.4g}, mask IoU vs fp32 {held_iou():.4f}")
        for epoch in range(epochs):
            order = [train_idx[j] for j in torch.randperm(len(train_idx), generator=gen).tolist()]
            student.train()
            running = []
            for k in range(per_epoch):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, lr, warmup, total - warmup + 1)  # in steps: 1 % → 100 % → 0.1 %
                loss = loss_of(order[k * cfg.batch_size:(k + 1) * cfg.batch_size])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running.append(loss.item())
                step += 1
            student.eval()
            save(f"{name} epoch {epoch + 1}")
            log(f"{name} epoch {epoch + 1}/{epochs}: train loss {np.mean(running):.4g}; held-out embedding "
                f"MSE {held_mse():.4g}, mask IoU vs fp32 {held_iou():.4f}")

    def encoder_loss(idx: list[int]) -> torch.Tensor:
        return F.mse_loss(student_embedding(idx), torch.cat([emb_t[i] for i in idx]).float())

    enc_params = [p for layer in student.image_encoder.layers[max(start, 0):] for p in layer.parameters()]
    enc_params += list(student.image_encoder.neck.parameters())
    if start < 0:
        enc_params = list(student.image_encoder.parameters())
    run_stage("encoder", enc_params, cfg.epochs, cfg.lr, encoder_loss)

    save("done")
    log(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
