"""Cached-teacher distillation of a calibrated int8 LiteMedSAM's encoder on a CPU budget (the paper's stage 1,
teacher = fp32 LiteMedSAM, with the teacher's work done once instead of every step).

    python -m tools.distill --checkpoint runs/ptq.pth --out runs/distilled.pth --epochs 8

1. Samples: the dev set's tune half only (never the check half): every 2D image and its horizontal flip,
   and --slices slices of each 3D volume spread over its boxes' z-range, preprocessed as at inference,
   with the boxes that reach the slice.
2. Cache, once: the fp32 teacher's image embedding and its low-res mask logits for every box; and the input
   of the first quantized encoder stage, which the teacher and the student compute alike when everything
   before it is float (patch embedding and stage 0 in the default float list), so the student's steps
   skip that third of the encoder.
3. The quantized stages and neck (weights, biases, norms, learned activation scales; straight-through
   rounding) minimise the MSE between the student's and the teacher's embeddings (--loss mse), or the
   paper's stage-1 loss, that MSE weighted per sample by the teacher's mask IoU with the ground truth
   over the sample's boxes (--loss iou-mse: slices where the teacher misses the label teach less); the
   teacher's masks also monitor (mask IoU of the held-out samples, through the student's decoder). Each epoch draws the
   balanced sampler's Ns(m) samples of every modality (--sampler); gradients of a batch are summed one
   sample at a time, which bounds memory (~8 GB peak) without changing the update.
AdamW, warm-up from 1 % then cosine to 0.1 % of --lr, as the paper schedules. Writes a train.py-style
checkpoint that export.py reads (--checkpoint).
"""
from __future__ import annotations

import argparse
import resource
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


def tune_samples(root: Path, half: str, per_volume: int, masks: bool = True) -> list[tuple]:
    """(model input 3×256×256, boxes_256 N×4, case name, gt masks N×256×256 uint8, or None when the case
    has no labels or `masks` is off) for every training sample of `half`."""
    out = []
    for path in sorted(root.glob("*.npz")):
        if data.half_of(path) != half:
            continue
        case = infer.load_case(path)
        pipe, modality = infer.resolve_pipeline(case), case.modality
        labels = data.find_labels(path) if masks else None
        views = []
        # the 2D image and its mirror image, or slices spread over the 3D boxes' z-range
        for img, bx, z, ids in slices_of(case, per_volume, where=True):
            gts = None
            if labels is not None and case.is_3d:
                gts = data.npz_read_slice(labels, "gts", z)
            elif labels is not None:
                with np.load(labels) as npz:
                    gts = npz["gts"]
            views.append((img, bx, gts, ids))
            if not case.is_3d:
                flipped = bx.copy()
                flipped[:, [0, 2]] = img.shape[1] - bx[:, [2, 0]]
                views.append((np.ascontiguousarray(img[:, ::-1]), flipped,
                              None if gts is None else gts[:, ::-1], ids))
        for img, bx, gts, ids in views:
            if len(bx) == 0:
                continue
            image = infer.model_input(img, pipe.image_interp, pipe.norm_then_pad, modality)
            gt = None if gts is None else np.stack([data.mask_to_256(gts == i) for i in ids])
            out.append((image, data.boxes_to_256(bx, img.shape[:2], rounding=pipe.box_rounding), path.name, gt))
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
    return image if start < 0 else encoder.stem(image, start)


def epoch_order(train_idx: list[int], modality: list[str], strategy: str, rng: np.random.Generator) -> list[int]:
    """One epoch's training samples, shuffled: every sample once ("all"), or the paper's balanced sampler,
    Ns(m) distinct samples of each modality m (data.samples_per_modality: "min" or "max10")."""
    if strategy == "all":
        return [train_idx[j] for j in rng.permutation(len(train_idx))]
    groups: dict[str, list[int]] = {}
    for i in train_idx:
        groups.setdefault(modality[i], []).append(i)
    ns = data.samples_per_modality({m: len(g) for m, g in groups.items()}, strategy)
    picked = [i for m, g in groups.items() for i in rng.choice(g, size=ns[m], replace=False).tolist()]
    return [picked[j] for j in rng.permutation(len(picked))]


def epoch_size(train_idx: list[int], modality: list[str], strategy: str) -> int:
    """How many samples epoch_order draws per epoch."""
    if strategy == "all":
        return len(train_idx)
    counts: dict[str, int] = {}
    for i in train_idx:
        counts[modality[i]] = counts.get(modality[i], 0) + 1
    return sum(data.samples_per_modality(counts, strategy).values())


def encoder_suffix(encoder, x: torch.Tensor, start: int) -> torch.Tensor:
    """The rest of the encoder from stage `start`'s input to the image embedding."""
    return encoder(x) if start < 0 else encoder.head(x, start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="calibrated int8 checkpoint (export.py --save-checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    p.add_argument("--data", type=Path, default=REPO / "devset" / "imgs", help="dev-set images")
    p.add_argument("--slices", type=int, default=12, help="slices per 3D volume")
    p.add_argument("--epochs", type=int, default=3, help="encoder epochs over the cached samples")
    p.add_argument("--sampler", choices=("min", "max10", "all"), default="min",
                   help="per epoch: Ns(m) samples per modality (balanced sampler's strategy), or all samples")
    p.add_argument("--loss", choices=("mse", "iou-mse"), default="mse",
                   help="embedding MSE, or the paper's stage-1 loss: MSE × the teacher's mask IoU with the labels")
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
    samples = tune_samples(cfg.data, "tune", cfg.slices, masks=cfg.loss == "iou-mse")
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
            for image, bx, *_ in samples:
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
    modality = [data.modality_of(s[2]) for s in samples]
    # label masks stay uint8 (as float for every sample they would take ~0.7 GB)
    gt = [None if s[3] is None else torch.from_numpy(s[3][:cfg.max_boxes, None]) for s in samples]
    if cfg.loss == "iou-mse":
        # what the paper's loss multiplies each sample's MSE by (a sample without labels keeps weight 1)
        w = [losses.mask_iou(logits_t[i].float(), gt[i].float()).mean().item() for i in train_idx
             if gt[i] is not None]
        log(f"teacher mask IoU with the labels over the training samples: mean {np.mean(w):.3f}, "
            f"{sum(x < 0.5 for x in w)} of {len(w)} below 0.5")

    def loss_of(i: int) -> torch.Tensor:
        emb = student_embedding(i)
        if gt[i] is not None:
            return losses.distillation_loss(emb, emb_t[i], logits_t[i].float(), gt[i].float())
        return F.mse_loss(emb, emb_t[i].float())

    def student_embedding(i: int) -> torch.Tensor:
        return encoder_suffix(student.image_encoder, prefix[i].float(), start)

    def held_out() -> str:
        """Embedding MSE and mask IoU vs the fp32 teacher over the held-out samples."""
        mse, ious = [], []
        with torch.no_grad():
            for i in held:
                emb = student_embedding(i)
                mse.append(F.mse_loss(emb, emb_t[i].float()).item())
                ious += losses.mask_iou(student.decode(emb, boxes[i]), (logits_t[i] > 0).float()).tolist()
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
        return (f"held-out embedding MSE {np.mean(mse):.4g}, mask IoU vs fp32 {np.mean(ious):.4f}; "
                f"peak RSS {peak_gb:.1f} GB")

    def save(progress: str) -> None:
        """The student as it is now, a checkpoint export.py reads; rewritten after every epoch."""
        state = model_lib.save_model_state(student)
        state["distill"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
        state["distill"]["progress"] = progress
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(state, cfg.out)

    enc_params = [p for layer in student.image_encoder.layers[max(start, 0):] for p in layer.parameters()]
    enc_params += list(student.image_encoder.neck.parameters())
    if start < 0:
        enc_params = list(student.image_encoder.parameters())
    opt = torch.optim.AdamW(enc_params, lr=cfg.lr, weight_decay=0.0)
    per_epoch = epoch_size(train_idx, modality, cfg.sampler) // cfg.batch_size
    total, step = per_epoch * cfg.epochs, 0
    warmup = max(1, total // 20)
    log(f"before: {held_out()}")
    for epoch in range(cfg.epochs):
        order = epoch_order(train_idx, modality, cfg.sampler, np.random.default_rng([cfg.seed, epoch]))
        student.train()
        running = []
        for k in range(per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, warmup, total - warmup + 1)  # in steps: 1 % → 100 % → 0.1 %
            batch = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            # one sample's graph at a time: a batch of 4 through the fake-quantized stages peaked near 19 GB
            for i in batch:
                part = loss_of(i) / len(batch)
                part.backward()
                loss += part.item()
            opt.step()
            running.append(loss)
            step += 1
        student.eval()
        save(f"epoch {epoch + 1}")
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {np.mean(running):.4g}; {held_out()}")

    save("done")
    log(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
