"""train.py — quantization-aware training of LiteMedSAM in three stages (QMedSAM §3).

  stage 1  quantized image encoder trained; prompt encoder and mask decoder float and frozen;
           loss = segmentation loss + distillation from an fp32 teacher (default: the published
           LiteMedSAM, `--teacher CKPT` for another checkpoint of the same architecture).
  stage 2  quantized mask decoder trained on top of the best stage-1 quantized encoder (frozen);
           prompt encoder float and frozen.
  stage 3  the whole quantized model end to end (prompt encoder float and frozen unless
           `--train-prompt-encoder`).

Run directory (`--out RUN`): every stage writes RUN/stage<k>/{last.pth, best.pth, metrics.csv,
curves.png}; `--init` defaults to RUN/stage<k-1>/best.pth (stage 1: the published LiteMedSAM,
quantized and calibrated on a few training images).

One process, or DDP under torchrun (gloo on CPU, NCCL on CUDA; rank 0 logs and saves):
  python train.py --stage 1                       # a short run on the bundled dev set → runs/qat/stage1
  torchrun --nproc_per_node 2 train.py --stage 2  # starts from runs/qat/stage1/best.pth
  python train.py --stage 3 --config configs/cvpr24.py --data /data/cvpr24 --device cuda
Multi-node (2 nodes × 4 GPUs; run the same line on every node, HOST0 reachable from all):
  torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 \
      --rdzv_id qmedsam train.py --stage 1 --device cuda --data /data/cvpr24 --out /shared/runs/qat

Defaults are the plain names below; a config file (`--config FILE`, a .json object or a .py file
assigning the same names) overrides them, and command-line flags override both.

Learning rate: `lr_at(epoch, ...)` is a closed-form function of the epoch, applied once per epoch
(per-epoch schedule: a resume lands exactly on the same LR). Linear warm-up from 1 % of the LR at
epoch 0 to the LR at epoch Nw, then cosine annealing from the LR at epoch Nw to 0.1 % of it at epoch
Nw + Na − 1 (half-period Na − 1 epochs), constant 0.1 % after that.

Checkpoint (one dict, torch.save, written atomically; model.build_model(path) rebuilds the model
from it): {"model": state_dict (incl. Brevitas scales), "quant": {"encoder": bool, "decoder": bool,
"float_layers": [...]} (model.save_model_state), "optimizer": state_dict, "scaler":
state_dict|None, "epoch": last finished epoch (0-based), "lr": LR used in that epoch, "schedule":
{"base_lr", "warmup_epochs", "anneal_epochs"}, "config": all settings, "stage": int,
"metrics": that epoch's eval summary, "best_metric": best mean DSC so far, "best_epoch": int}.
With --eval-start the start model competes too: it is saved as best.pth (epoch -1) first, and an epoch
replaces it only with a higher eval DSC.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import data
import infer  # evaluation runs the challenge entrypoint's own segmentation code (no openvino import)
import losses
import metrics
import model as model_lib

REPO_DIR = Path(__file__).resolve().parent

# ---- defaults (override with --config FILE or flags) ----
# Bare `python train.py --stage k` is a short CPU run on the bundled dev set (minutes); challenge-scale
# settings are a config file away: --config configs/cvpr24.py --data /data/cvpr24.
stage = 1                      # 1 | 2 | 3, see the module docstring
data_root = str(REPO_DIR / "devset")  # challenge tree <root>/<Modality>/<dataset>/*.npz, or a flat dir
extra_data = []                # more training trees, never evaluated on (e.g. synthetic phantoms)
eval_root = None               # separate eval tree; None → hold out eval_fraction of --data by file
eval_fraction = 0.1            # the paper holds out one tenth
out = "runs/qat"               # run directory; stage k writes out/stage<k>/
init = None                    # start checkpoint; None → previous stage's best.pth (stage 1: published)
teacher = "published"          # stage-1 fp32 teacher
resume = False                 # continue from out/stage<k>/last.pth
epochs = 1
batch_size = 2
lr = 2e-5
warmup_epochs = 0
anneal_epochs = None           # None → epochs − warmup_epochs
optim = "adamw"                # sgd (momentum 0.9, like the reference) | adamw
momentum = 0.9
weight_decay = 1e-4
distill_weight = 1.0           # weight of the stage-1 distillation term
device = "cpu"
amp = False                    # CUDA autocast fp16 + GradScaler; ignored with a warning on CPU
max_steps = 0                  # >0: stop each epoch after this many optimizer steps
samples_per_modality = 6       # >0: the balanced sampler draws this many per modality per epoch (0: Ns(m))
workers = 0                    # DataLoader worker processes
seed = 0
bbox_shift = 10                # box jitter in pixels (paper config: 10)
calib_images = 16              # training images used to calibrate freshly quantized parts
eval_max_slices = 6            # 3D eval: at most this many contiguous slices per case (0 = all)
eval_max_cases = 0             # >0: evaluate only the first N eval cases (cheap smoke runs)
eval_box_block = 16            # boxes per decoder call in evaluation (infer.DEFAULT_BLOCK: memory)
pseudo_label = False           # also train on unlabeled cases with the fp32 teacher's mask as target
train_prompt_encoder = False   # stage 3 only
save_every_epoch = False       # also keep epoch_XXX.pth
threads = 2                    # torch.set_num_threads per process
eval_start = True              # score the start model first (CSV row epoch -1: "before QAT")
eval_only = None               # "start": score the stage's start model; "teacher": the fp32 teacher
debug_sample_log = None        # write "rank epoch sample_id" lines to this file prefix (tests)

DEFAULT_NAMES = ["stage", "data_root", "extra_data", "eval_root", "eval_fraction", "out", "init", "teacher",
                 "resume", "epochs", "batch_size", "lr", "warmup_epochs", "anneal_epochs", "optim",
                 "momentum", "weight_decay", "distill_weight", "device", "amp", "max_steps",
                 "samples_per_modality", "workers", "seed", "bbox_shift", "calib_images",
                 "eval_max_slices", "eval_max_cases", "eval_box_block", "pseudo_label",
                 "train_prompt_encoder", "save_every_epoch", "threads", "eval_start", "eval_only", "debug_sample_log"]
QUANT_BY_STAGE = {1: (True, False), 2: (True, True), 3: (True, True)}  # (encoder, decoder)


# ---- learning-rate schedule ----

def lr_at(epoch: float, base_lr: float, warmup_epochs: int, anneal_epochs: int) -> float:
    """Closed-form LR at (possibly fractional) `epoch`: linear 1 % → 100 % over [0, Nw], then cosine
    100 % → 0.1 % over [Nw, Nw + Na − 1] (half-period Na − 1), then 0.1 %."""
    start, floor = 0.01 * base_lr, 0.001 * base_lr
    if epoch < warmup_epochs:
        return start + (base_lr - start) * epoch / warmup_epochs
    t = epoch - warmup_epochs
    half_period = anneal_epochs - 1
    if half_period <= 0:  # Na ≤ 1: nothing to anneal over, stay at the LR
        return base_lr
    if t >= half_period:
        return floor
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t / half_period))


# ---- configuration ----

def load_config_file(path: str) -> dict:
    """A .json object or a .py file assigning default names → {name: value}."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"train.py: config file {path} does not exist")
    if p.suffix == ".json":
        values = json.loads(p.read_text())
    else:
        scope: dict = {}
        exec(compile(p.read_text(), str(p), "exec"), scope)
        values = {k: v for k, v in scope.items() if not k.startswith("__")}
    unknown = sorted(set(values) - set(DEFAULT_NAMES))
    if unknown:
        raise SystemExit(f"train.py: config file {path} sets unknown names {unknown}")
    return values


def build_parser(defaults: dict) -> argparse.ArgumentParser:
    d = defaults
    p = argparse.ArgumentParser(description="QMedSAM quantization-aware training (3 stages).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, help="a .json or .py file of default names to override")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=d["stage"],
                   help="1: quant encoder + distillation; 2: quant decoder; 3: whole model")
    p.add_argument("--data", dest="data_root", default=d["data_root"],
                   help="training tree (challenge layout or our synthetic/dev layout)")
    p.add_argument("--extra-data", nargs="*", default=d["extra_data"], metavar="DIR",
                   help="more training trees, added to the training files only (the eval split of "
                        "--data is unchanged): e.g. synthetic phantoms from `python -m tools.phantoms synth`")
    p.add_argument("--eval-root", default=d["eval_root"],
                   help="separate evaluation tree; None = hold out --eval-fraction of --data")
    p.add_argument("--eval-fraction", type=float, default=d["eval_fraction"],
                   help="fraction of --data files held out for evaluation (split by file)")
    p.add_argument("--out", default=d["out"], help="run directory; stage k writes OUT/stage<k>/")
    p.add_argument("--init", default=d["init"],
                   help="start checkpoint ('published' or a path); None = OUT/stage<k-1>/best.pth "
                        "(stage 1: published)")
    p.add_argument("--teacher", default=d["teacher"],
                   help="stage-1 fp32 teacher ('published' or a checkpoint path)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=d["resume"],
                   help="continue from OUT/stage<k>/last.pth")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="total epochs of this stage")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="samples per step per rank")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate")
    p.add_argument("--warmup-epochs", type=int, default=d["warmup_epochs"],
                   help="linear warm-up from 1%% of --lr over this many epochs")
    p.add_argument("--anneal-epochs", type=int, default=d["anneal_epochs"],
                   help="cosine annealing to 0.1%% of --lr over this many epochs; None = epochs - warmup")
    p.add_argument("--optim", choices=("sgd", "adamw"), default=d["optim"], help="optimizer")
    p.add_argument("--momentum", type=float, default=d["momentum"], help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="weight decay")
    p.add_argument("--distill-weight", type=float, default=d["distill_weight"],
                   help="weight of the stage-1 distillation term")
    p.add_argument("--device", choices=("cpu", "cuda"), default=d["device"], help="device")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=d["amp"],
                   help="mixed precision (CUDA only; warned and ignored on CPU)")
    p.add_argument("--max-steps", type=int, default=d["max_steps"],
                   help="stop each epoch after this many steps (0 = whole epoch)")
    p.add_argument("--samples-per-modality", type=int, default=d["samples_per_modality"],
                   help="balanced sampler: samples per modality per epoch (0 = sampler default)")
    p.add_argument("--workers", type=int, default=d["workers"], help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed for split, sampler and torch")
    p.add_argument("--bbox-shift", type=int, default=d["bbox_shift"], help="box jitter in pixels")
    p.add_argument("--calib-images", type=int, default=d["calib_images"],
                   help="training images used to calibrate freshly quantized parts")
    p.add_argument("--eval-max-slices", type=int, default=d["eval_max_slices"],
                   help="3D eval: at most this many contiguous slices per case (0 = all)")
    p.add_argument("--eval-max-cases", type=int, default=d["eval_max_cases"],
                   help="evaluate only the first N eval cases (0 = all)")
    p.add_argument("--eval-box-block", type=int, default=d["eval_box_block"],
                   help="boxes per decoder call during evaluation")
    p.add_argument("--pseudo-label", action=argparse.BooleanOptionalAction, default=d["pseudo_label"],
                   help="also train on unlabeled cases (no gts): random box prompts, the fp32 "
                        "teacher's mask as target (stage 1: embedding distillation at weight 1)")
    p.add_argument("--train-prompt-encoder", action=argparse.BooleanOptionalAction,
                   default=d["train_prompt_encoder"], help="stage 3: also train the prompt encoder")
    p.add_argument("--save-every-epoch", action=argparse.BooleanOptionalAction,
                   default=d["save_every_epoch"], help="also keep epoch_XXX.pth")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads per process")
    p.add_argument("--eval-start", action=argparse.BooleanOptionalAction, default=d["eval_start"],
                   help="evaluate the start model before training (metrics.csv row epoch -1)")
    p.add_argument("--eval-only", choices=("start", "teacher"), default=d["eval_only"],
                   help="only evaluate (no training, nothing saved): the stage's start model "
                        "(quantized + calibrated as training would begin) or the fp32 teacher; "
                        "prints the summary as JSON on stdout")
    p.add_argument("--debug-sample-log", default=d["debug_sample_log"],
                   help="write '<epoch> <sample id>' lines to PREFIX.rank<r>.txt (tests)")
    return p


def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Module defaults ← config file ← command-line flags."""
    defaults = {name: globals()[name] for name in DEFAULT_NAMES}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        defaults.update(load_config_file(known.config))
    cfg = build_parser(defaults).parse_args(argv)
    if cfg.anneal_epochs is None:
        cfg.anneal_epochs = max(cfg.epochs - cfg.warmup_epochs, 1)
    return cfg


# ---- distributed ----

def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK → (rank, world_size, device); init the group."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("train.py: --device cuda but CUDA is not available")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def log(rank: int, *msg) -> None:
    if rank == 0:
        print("train.py:", *msg, file=sys.stderr, flush=True)


# ---- model per stage ----

def read_source(source: str) -> str | dict:
    """"published" stays a name for model.build_model; a path is read once into its dict."""
    if source == "published":
        return source
    if not Path(source).is_file():
        raise SystemExit(f"train.py: checkpoint {source} does not exist")
    return torch.load(source, map_location="cpu", weights_only=False)


def checkpoint_quant(source: str | dict) -> dict:
    """Which parts a start checkpoint has quantized: {"encoder": bool, "decoder": bool, …} (our
    checkpoints carry model.py's quant_config under "quant"; the published file is fp32)."""
    quant = dict(source.get("quant") or {}) if isinstance(source, dict) and "model" in source else {}
    quant["encoder"], quant["decoder"] = bool(quant.get("encoder")), bool(quant.get("decoder"))
    return quant


def default_init(cfg: argparse.Namespace) -> str:
    """Stage 1 starts from the published LiteMedSAM; stage k from OUT/stage<k-1>/best.pth."""
    if cfg.init:
        return cfg.init
    if cfg.stage == 1:
        return "published"
    prev = Path(cfg.out) / f"stage{cfg.stage - 1}" / "best.pth"
    if not prev.is_file():  # a fresh run: the earlier stages' parts start as calibrated int8
        print(f"train.py: no {prev} (stage {cfg.stage - 1} has not run): starting from the published "
              f"LiteMedSAM, quantized and calibrated on the training data", file=sys.stderr)
        return "published"
    return str(prev)


def build_student(cfg: argparse.Namespace, source: str | dict, calib_batch
                  ) -> tuple[nn.Module, dict]:
    """The stage's student → (model, quant_config): load `source` ("published" or a checkpoint
    dict), quantize what the stage needs and `source` lacks, and calibrate only those parts on
    `calib_batch()` = (images B×3×256×256, boxes_256 B×4)."""
    have = checkpoint_quant(source)
    want_enc, want_dec = QUANT_BY_STAGE[cfg.stage]
    net = model_lib.build_model(checkpoint=source, quant_encoder=have["encoder"],
                                quant_decoder=have["decoder"])
    new_enc, new_dec = want_enc and not have["encoder"], want_dec and not have["decoder"]
    if new_enc or new_dec:
        float_layers = have.get("float_layers") or model_lib.FLOAT_LAYERS_DEFAULT
        model_lib.quantize_(net, encoder=new_enc, decoder=new_dec, float_layers=float_layers)
        images, boxes_256 = calib_batch()
        new_parts = [p for p, new in (("image_encoder", new_enc), ("mask_decoder", new_dec)) if new]
        # one 1×4 box per image; parts quantized earlier keep their learned scales
        model_lib.calibrate(net, images, boxes_256[:, None], parts=new_parts)
    quant = dict(getattr(net, "quant_config", None) or {})
    quant["encoder"] = bool(quant.get("encoder", have["encoder"] or new_enc))
    quant["decoder"] = bool(quant.get("decoder", have["decoder"] or new_dec))
    return net, quant


def set_trainable(net: nn.Module, stage_k: int, train_prompt_encoder: bool) -> dict:
    """requires_grad per part for the stage → {part: trainable}."""
    parts = {"image_encoder": stage_k in (1, 3), "mask_decoder": stage_k in (2, 3),
             "prompt_encoder": stage_k == 3 and train_prompt_encoder}
    for name, trainable in parts.items():
        for p in getattr(net, name).parameters():
            p.requires_grad_(trainable)
    return parts


def train_mode(net: nn.Module, parts: dict) -> None:
    """Trainable parts in train mode, frozen ones in eval mode (their quantizers stay fixed)."""
    for name, trainable in parts.items():
        getattr(net, name).train(trainable)


class StudentStep(nn.Module):
    """The module DDP wraps: image B×3×256×256, boxes_256 B×4 (one box per image) →
    (image_embedding B×256×64×64, low_res_logits B×1×256×256)."""

    def __init__(self, net: nn.Module, encoder_trainable: bool) -> None:
        super().__init__()
        self.net = net
        self.encoder_trainable = encoder_trainable

    def forward(self, image: torch.Tensor, boxes_256: torch.Tensor):
        if self.encoder_trainable:
            embedding = self.net.encode(image)
        else:
            with torch.no_grad():  # frozen encoder: no graph, less memory
                embedding = self.net.encode(image)
        return embedding, self.net.decode(embedding, boxes_256)  # B embeddings ↔ B boxes


# ---- checkpoints and logs ----

def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then rename (a kill never leaves a
    truncated checkpoint)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def append_csv(path: Path, row: dict) -> None:
    """Append one row; write the header if the file is new (columns fixed by the first row)."""
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            fields = next(csv.reader(f))
    else:
        fields = list(row)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Loss and eval DSC/NSD against epoch → PNG (matplotlib Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in read_csv(csv_path) if r.get("train_loss")]
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [float(r["train_loss"]) for r in rows], "o-")
    a.set_xlabel("epoch"), a.set_ylabel("train loss"), a.set_title("loss")
    b.plot(ep, [float(r["eval_dsc"]) for r in rows], "o-", label="DSC")
    b.plot(ep, [float(r["eval_nsd"]) for r in rows], "s-", label="NSD")
    b.set_xlabel("epoch"), b.set_title("eval"), b.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


# ---- evaluation (infer.py's segmentation pipeline, the challenge metrics) ----

class TorchModel(infer.Model):
    """infer's model interface over a torch LiteMedSAM, so evaluation (and the bench's baseline row) runs
    infer.segment_case itself: the same preprocessing, box mapping, mask upsampling and 3D prompting as
    the challenge entrypoint."""

    def __init__(self, net: nn.Module, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.net, self.device = net, torch.device(device)

    @torch.no_grad()
    def _encode(self, image: np.ndarray) -> np.ndarray:
        return self.net.encode(torch.from_numpy(image).to(self.device)).float().cpu().numpy()

    @torch.no_grad()
    def _decode(self, image_embedding: np.ndarray, boxes_256: np.ndarray) -> np.ndarray:
        embedding = torch.from_numpy(np.ascontiguousarray(image_embedding, np.float32)).to(self.device)
        return self.net.decode(embedding, torch.from_numpy(boxes_256).to(self.device)).float().cpu().numpy()


def evaluate_case(net: nn.Module, path: str, cfg: argparse.Namespace,
                  device: torch.device) -> dict:
    """One labeled challenge npz → {"case", "modality", "dsc", "nsd"}: infer.segment_case on the
    torch model (3D: on at most --eval-max-slices contiguous slices), then metrics.case_metrics."""
    case = data.load_case(path, labels_path=data.find_labels(path))
    imgs, boxes, gts = case["imgs"], np.asarray(case["boxes"]), case["gts"]
    name = Path(path).name
    if boxes.shape[-1] == 6:
        imgs, boxes, gts = data.crop_z(imgs, boxes, gts, cfg.eval_max_slices)
    pipeline_case = infer.repair_case(name, imgs, boxes)
    segs = infer.segment_case(TorchModel(net, device), pipeline_case, block=cfg.eval_box_block)
    dsc, nsd = metrics.case_metrics(gts, segs, case.get("spacing"), pipeline_case.is_3d)
    return {"case": name, "modality": metrics.modality_of(path), "dsc": float(dsc), "nsd": float(nsd)}


def summarise_eval(rows: list[dict]) -> dict:
    """Per-case rows → flat {"dsc", "nsd" (overall: mean over cases, metrics.summarise), "n",
    "dsc_<M>", "nsd_<M>" per modality}."""
    summary = metrics.summarise(rows)
    flat = {"dsc": float("nan"), "nsd": float("nan"), "n": 0}
    for mod, s in summary.items():
        if mod == "overall":
            flat.update(dsc=s["dsc"], nsd=s["nsd"], n=s["n"])
        else:
            flat[f"dsc_{mod}"], flat[f"nsd_{mod}"] = s["dsc"], s["nsd"]
    return flat


def evaluate(net: nn.Module, files: list[str], cfg: argparse.Namespace, device: torch.device,
             rank: int, world: int) -> dict:
    """Cases sharded over ranks, rows gathered, summary identical on every rank."""
    was_training = net.training
    net.eval()
    rows = [evaluate_case(net, f, cfg, device) for f in files[rank::world]]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    net.train(was_training)
    return summarise_eval(rows)


# ---- training ----

def seed_everything(value: int) -> None:
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


class PseudoLabelSet:
    """Unlabeled slices for --pseudo-label (the dev set's cases without gts carry no boxes either).
    Item i → {"image" 3×256×256, "mask" zeros 256×256 (replaced in the training step by the fp32
    teacher's mask for this box), "box_256" (4,) a random box covering 10–60 % of each side of the
    image content, "labeled" 0}. Randomness is a function of (seed, epoch, i), like the labeled set."""

    def __init__(self, files: list[str], seed: int, root: str | None = None) -> None:
        self.index = data.SliceIndex(files, root=root, require_labels=False)
        self.seed, self.epoch = int(seed), 0

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 1])
        file_index, z = self.index.locate(int(index))
        img, _ = self.index.slice(file_index, z)
        nh, nw = data.resized_shape(img.shape[:2])
        w, h = rng.uniform(0.1, 0.6) * nw, rng.uniform(0.1, 0.6) * nh
        x0, y0 = rng.uniform(0, nw - w), rng.uniform(0, nh - h)
        # the modality's preprocessing (data.PREPROCESS_BY_MODALITY), as at inference
        image = data.preprocess_image(img, modality=self.index.modality[file_index])
        return {"image": image, "box_256": np.float32([x0, y0, x0 + w, y0 + h]),
                "mask": np.zeros((data.IMAGE_SIZE, data.IMAGE_SIZE), np.uint8), "labeled": 0}


class TrainSet:
    """What the DataLoader reads: the labeled SegmentationDataset (indices [0, n_labeled)) and, with
    --pseudo-label, a PseudoLabelSet after it; each part has its own balanced, rank-sharded sampler."""

    KEYS = ("image", "mask", "box_256")

    def __init__(self, labeled, labeled_sampler, unlabeled=None, unlabeled_sampler=None) -> None:
        self.labeled, self.labeled_sampler = labeled, labeled_sampler
        self.unlabeled, self.unlabeled_sampler = unlabeled, unlabeled_sampler

    def __len__(self) -> int:
        return len(self.labeled) + (len(self.unlabeled) if self.unlabeled is not None else 0)

    def __getitem__(self, index: int) -> dict:
        if index < len(self.labeled):
            item = self.labeled[index]
            return {**{k: item[k] for k in self.KEYS}, "labeled": 1}
        return self.unlabeled[index - len(self.labeled)]

    def epoch_indices(self, epoch: int, max_samples: int, seed: int) -> list[int]:
        """This rank's sample indices for `epoch` (its shard of the balanced epoch; unlabeled ones
        offset and mixed in), cut to `max_samples` if > 0 — equal counts on every rank."""
        self.labeled.set_epoch(epoch)
        self.labeled_sampler.set_epoch(epoch)
        idx = [int(i) for i in self.labeled_sampler]
        if self.unlabeled is not None:
            self.unlabeled.set_epoch(epoch)
            self.unlabeled_sampler.set_epoch(epoch)
            idx += [len(self.labeled) + int(i) for i in self.unlabeled_sampler]
            idx = [idx[j] for j in np.random.default_rng([seed, epoch, 2]).permutation(len(idx))]
        return idx[:max_samples] if max_samples > 0 else idx


def balanced_sampler(source, cfg: argparse.Namespace, rank: int, world: int):
    """data.BalancedSampler sharded for this rank; --samples-per-modality k sets Ns(m) = min(N(m), k)."""
    sampler = data.BalancedSampler(source, num_replicas=world, rank=rank, seed=cfg.seed)
    if cfg.samples_per_modality > 0:  # short runs: override the strategy's Ns(m)
        sampler.ns = {m: min(n, cfg.samples_per_modality) for m, n in sampler.counts.items() if n}
        sampler.epoch_size = sum(sampler.ns.values())
        sampler.num_samples = -(-sampler.epoch_size // world)
    return sampler


def make_train_data(cfg: argparse.Namespace, files: list[str], rank: int, world: int) -> TrainSet:
    """Labeled slices of `files` (one random object, jittered box, flips) and, with --pseudo-label,
    the unlabeled ones, each with a balanced sampler sharded for this rank."""
    labeled = data.SegmentationDataset(files, bbox_shift=cfg.bbox_shift, seed=cfg.seed,
                                       root=cfg.data_root)
    if len(labeled) == 0:
        raise SystemExit(f"train.py: no labeled training cases under {cfg.data_root}")
    unlabeled = unlabeled_sampler = None
    if cfg.pseudo_label:
        files_u = [f for f in files if data.find_labels(f) is None]
        if files_u:
            unlabeled = PseudoLabelSet(files_u, cfg.seed, root=cfg.data_root)
            unlabeled_sampler = balanced_sampler(unlabeled.index, cfg, rank, world)
    return TrainSet(labeled, balanced_sampler(labeled, cfg, rank, world), unlabeled,
                    unlabeled_sampler)


def train_one_epoch(step: nn.Module, net: nn.Module, parts: dict, teacher: nn.Module | None,
                    loader, optimizer, scaler, cfg: argparse.Namespace, device: torch.device,
                    rank: int, epoch: int, use_amp: bool) -> tuple[float, int, float]:
    """One pass over `loader` → (mean loss over ranks, samples over ranks, seconds)."""
    from tqdm import tqdm
    train_mode(net, parts)
    loss_sum, n_local, t0 = 0.0, 0, time.time()
    bar = tqdm(total=len(loader), desc=f"stage {cfg.stage} epoch {epoch}", file=sys.stderr,
               disable=rank != 0, dynamic_ncols=True)
    for batch in loader:
        image = batch["image"].to(device, torch.float32, non_blocking=True)
        target = batch["mask"].to(device, torch.float32, non_blocking=True)[:, None]  # B×1×256×256
        boxes_256 = batch["box_256"].to(device, torch.float32, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            unlabeled = (batch["labeled"].to(device) == 0).view(-1, 1, 1, 1)
            if teacher is not None and (cfg.stage == 1 or bool(unlabeled.any())):
                with torch.no_grad():
                    t_embedding = teacher.encode(image)
                    t_logits = teacher.decode(t_embedding, boxes_256)
                # unlabeled samples (--pseudo-label): the fp32 teacher's mask is the target
                target = torch.where(unlabeled, (t_logits > 0).float(), target)
            embedding, logits = step(image, boxes_256)
            loss = losses.segmentation_loss(logits.float(), target)
            if cfg.stage == 1:
                loss = loss + cfg.distill_weight * losses.distillation_loss(
                    embedding.float(), t_embedding.float(), t_logits.float(), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train.py: non-finite loss {loss.item()} at epoch {epoch}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        b = image.shape[0]
        loss_sum += loss.item() * b
        n_local += b
        dt = time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{n_local / max(dt, 1e-9):.2f}")
    bar.close()
    totals = torch.tensor([loss_sum, float(n_local)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / max(totals[1], 1)), int(totals[1]), time.time() - t0


def make_optimizer(params: list, cfg: argparse.Namespace) -> torch.optim.Optimizer:
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def checkpoint_dict(net: nn.Module, optimizer, scaler, epoch: int, lr_now: float,
                    cfg: argparse.Namespace, summary: dict, best_metric: float, best_epoch: int) -> dict:
    """model.save_model_state's {"model", "quant"} (what build_model(path) reloads) + training state."""
    return {**model_lib.save_model_state(net), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "epoch": epoch,
            "lr": lr_now, "schedule": {"base_lr": cfg.lr, "warmup_epochs": cfg.warmup_epochs,
                                       "anneal_epochs": cfg.anneal_epochs},
            "config": vars(cfg).copy(), "stage": cfg.stage, "metrics": summary,
            "best_metric": best_metric, "best_epoch": best_epoch}


def split_files(cfg: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(training files, labeled eval files): hold out --eval-fraction of --data by file, or
    --eval-root; --extra-data trees only add training files. The dev set's check half is never read:
    not to train, not to choose the best checkpoint."""
    files = [str(f) for f in data.without_check_half(data.find_cases(cfg.data_root))]
    if not files:
        raise SystemExit(f"train.py: no npz cases found under {cfg.data_root}")
    if cfg.eval_root:
        train_files, eval_files = files, [str(f) for f in data.without_check_half(data.find_cases(cfg.eval_root))]
    else:
        train_files, eval_files = data.split_by_file(files, cfg.eval_fraction, cfg.seed)
    for root in cfg.extra_data or ():
        try:
            extra = data.without_check_half(data.find_cases(root))
        except ValueError as e:
            raise SystemExit(f"train.py: --extra-data {e}") from None
        if not extra:
            raise SystemExit(f"train.py: --extra-data {root}: no npz cases found")
        train_files = sorted({str(f) for f in train_files} | {str(f) for f in extra})
    eval_files = [f for f in eval_files if data.find_labels(f) is not None]
    if cfg.eval_max_cases > 0:
        eval_files = eval_files[:cfg.eval_max_cases]
    return [str(f) for f in train_files], [str(f) for f in eval_files]


def main(argv: list[str] | None = None) -> dict:
    """Run one stage (or --eval-only); returns the last eval summary."""
    cfg = parse_config(argv)
    rank, world, device = setup_distributed(cfg.device)
    torch.set_num_threads(max(1, cfg.threads))
    use_amp = bool(cfg.amp and device.type == "cuda")
    if cfg.amp and not use_amp:
        warnings.warn("train.py: --amp needs CUDA; ignored on CPU")
    seed_everything(cfg.seed)
    stage_dir = Path(cfg.out) / f"stage{cfg.stage}"
    last_path, best_path = stage_dir / "last.pth", stage_dir / "best.pth"
    csv_path = stage_dir / "metrics.csv"
    if rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)

    train_files, eval_files = split_files(cfg)
    log(rank, f"stage {cfg.stage}: training on {cfg.data_root} for {cfg.epochs} epoch(s), writing "
              f"{stage_dir}/ (last.pth, best.pth, metrics.csv)")
    dataset = make_train_data(cfg, train_files, rank, world)
    n_unlabeled = len(dataset.unlabeled) if dataset.unlabeled is not None else 0
    log(rank, f"stage {cfg.stage}: {len(train_files)} training files ({len(dataset.labeled)} labeled"
              f" + {n_unlabeled} pseudo-labeled slices), "
              f"{len(eval_files)} labeled eval files, world size {world}, device {device}")

    def calib_batch():  # a few fixed training samples, the same on every rank
        n = len(dataset.labeled)
        idx = np.random.default_rng(cfg.seed).choice(n, min(cfg.calib_images, n), replace=False)
        items = [dataset.labeled[int(i)] for i in idx]
        return (torch.from_numpy(np.stack([it["image"] for it in items])),
                torch.from_numpy(np.stack([it["box_256"] for it in items])))

    if cfg.eval_only:
        if cfg.eval_only == "teacher":
            net = model_lib.build_model(checkpoint=cfg.teacher).to(device)
        else:
            net = build_student(cfg, read_source(default_init(cfg)), calib_batch)[0].to(device)
        summary = evaluate(net, eval_files, cfg, device, rank, world)
        if rank == 0:
            print(json.dumps(summary, indent=1))
        if dist.is_initialized():
            dist.destroy_process_group()
        return summary

    ckpt = None
    if cfg.resume:
        if not last_path.is_file():
            raise SystemExit(f"train.py: --resume but {last_path} does not exist")
        ckpt = read_source(str(last_path))
        source = str(last_path)
    else:
        source = default_init(cfg)
    net, quant = build_student(cfg, ckpt if ckpt is not None else read_source(source), calib_batch)
    net.to(device)
    parts = set_trainable(net, cfg.stage, cfg.train_prompt_encoder)
    teacher = None
    if cfg.stage == 1 or cfg.pseudo_label:
        teacher = model_lib.build_model(checkpoint=cfg.teacher).to(device).eval()
        teacher.requires_grad_(False)
    log(rank, f"init {source}, quantized {quant}, trainable "
              f"{[k for k, v in parts.items() if v]}")

    step = StudentStep(net, encoder_trainable=parts["image_encoder"]).to(device)
    if world > 1:
        step = nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, best_metric, best_epoch, summary = 0, -math.inf, None, {}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and use_amp:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"]) + 1
        schedule = {"base_lr": cfg.lr, "warmup_epochs": cfg.warmup_epochs,
                    "anneal_epochs": cfg.anneal_epochs}
        if ckpt.get("schedule") != schedule:  # e.g. --epochs changed and the anneal length with it
            warnings.warn(f"train.py: resuming {last_path} with LR schedule {schedule}, the "
                          f"checkpoint used {ckpt.get('schedule')}; pass --anneal-epochs to keep it")
        best_metric, best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
        summary = ckpt.get("metrics", {})
        log(rank, f"resumed from {last_path} after epoch {ckpt['epoch']} (best DSC {best_metric:.4f} "
                  f"at epoch {best_epoch})")
        del ckpt
    elif eval_files and cfg.eval_start:  # the start model's score: "before QAT" for this stage
        summary = evaluate(net, eval_files, cfg, device, rank, world)
        log(rank, f"start model: eval DSC {summary['dsc']:.4f} NSD {summary['nsd']:.4f}")
        # the start model competes for best.pth: an epoch must beat it (a short QAT run on a small
        # set can lose to plain calibration, and the next stage should then start from the better)
        best_metric, best_epoch = summary["dsc"], -1
        if rank == 0:
            append_csv(csv_path, {"epoch": -1, "stage": cfg.stage, "lr": "", "train_loss": "",
                                  "train_samples": 0, "train_time_s": 0, **prefixed(summary)})
            save_atomic(checkpoint_dict(net, optimizer, scaler, -1, 0.0, cfg, summary, best_metric, -1),
                        best_path)

    max_samples = cfg.max_steps * cfg.batch_size if cfg.max_steps > 0 else 0
    for epoch in range(start_epoch, cfg.epochs):
        lr_now = lr_at(epoch, cfg.lr, cfg.warmup_epochs, cfg.anneal_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        seed_everything(cfg.seed * 1000 + epoch * 10 + rank)  # resume-exact randomness per epoch
        indices = dataset.epoch_indices(epoch, max_samples, cfg.seed)
        if cfg.debug_sample_log:
            with open(f"{cfg.debug_sample_log}.rank{rank}.txt", "a") as f:
                f.writelines(f"{epoch} {i}\n" for i in indices)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=indices,
                                             num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                             persistent_workers=False)
        train_loss, n_samples, time_s = train_one_epoch(step, net, parts, teacher, loader, optimizer,
                                                        scaler, cfg, device, rank, epoch, use_amp)
        summary = evaluate(net, eval_files, cfg, device, rank, world) if eval_files else {
            "dsc": float("nan"), "nsd": float("nan"), "n": 0}
        is_best = summary["dsc"] > best_metric or best_epoch is None
        if is_best:
            best_metric, best_epoch = summary["dsc"], epoch
        log(rank, f"epoch {epoch}: lr {lr_now:.3g} loss {train_loss:.4f} ({n_samples} samples, "
                  f"{n_samples / max(time_s, 1e-9):.2f} samples/s) eval DSC {summary['dsc']:.4f} "
                  f"NSD {summary['nsd']:.4f}{' (best)' if is_best else ''}")
        if rank == 0:
            state = checkpoint_dict(net, optimizer, scaler, epoch, lr_now, cfg, summary,
                                    best_metric, best_epoch)
            save_atomic(state, last_path)
            if is_best:
                save_atomic(state, best_path)
            if cfg.save_every_epoch:
                save_atomic(state, stage_dir / f"epoch_{epoch:03d}.pth")
            append_csv(csv_path, {"epoch": epoch, "stage": cfg.stage, "lr": lr_now,
                                  "train_loss": train_loss, "train_samples": n_samples,
                                  "train_time_s": round(time_s, 3), **prefixed(summary)})
        if world > 1:
            dist.barrier()  # nobody starts the next epoch (or exits) before the checkpoint exists
    if rank == 0:
        plot_curves(csv_path, stage_dir / "curves.png")
        log(rank, f"done: best eval DSC {best_metric:.4f} at epoch {best_epoch} → {best_path}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def prefixed(summary: dict) -> dict:
    """Eval summary → CSV columns eval_dsc, eval_nsd, eval_n, eval_dsc_<M>, …"""
    return {f"eval_{k}": v for k, v in summary.items()}


if __name__ == "__main__":
    main()
