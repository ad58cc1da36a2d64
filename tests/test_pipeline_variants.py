"""tools/pipeline_variants.py and the pipeline knobs of infer.py / data.py, on the exact oracle model
(tests/oracle_model.py: "segments the bright part of each box"), so every expectation is computed,
not stored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import data
import infer
import oracle_model
from tools import phantoms, pipeline_variants

REPO = Path(__file__).resolve().parents[1]


class Recorder:
    """Wraps a model and keeps every encoder input (B×3×256×256) and decoder box batch (N×4)."""

    def __init__(self, model):
        self.model, self.images, self.boxes = model, [], []

    def encode(self, image):
        self.images.append(image.copy())
        return self.model.encode(image)

    def decode(self, emb, boxes_256):
        self.boxes.append(np.array(boxes_256))
        return self.model.decode(emb, boxes_256)


def seg3d(model, vol, box6, name="3DBox_CT_t.npz", **knobs):
    """One 3D box; start slice "middle", no propagation margin, float boxes and area resizing (64 px
    slices become 4×4-pixel blocks: the oracle is pixel-exact) unless given (not the shipped tables)."""
    knobs.setdefault("start_slice", "middle")
    knobs.setdefault("margin_px", 0.0)
    knobs.setdefault("box_rounding", "float")
    knobs.setdefault("image_interp", "area")
    case = infer.repair_case(name, vol, np.asarray(box6)[None])
    return infer.segment_case(model, case, pipe=infer.Pipeline(**knobs))


# ---- one preprocessing function for training and inference ---------------------------------------------
@pytest.mark.parametrize("modality,table", [("Endoscopy", {}), ("Endoscopy", {"Endoscopy": {"interp": "cubic",
                                                                                            "norm_then_pad": False}}),
                                            ("US", None)])
def test_training_and_inference_share_preprocess_image(tmp_path, model, monkeypatch, modality, table):
    """Both paths call data.preprocess_image, and give bit-identical model inputs for the same image:
    with an empty table, with a per-modality entry changed in data.py only, and with the shipped table."""
    if table is not None:
        monkeypatch.setattr(data, "PREPROCESS_BY_MODALITY", table)
    table = data.PREPROCESS_BY_MODALITY
    case = phantoms.make_synthetic_case("2D", (90, 140), 2, modality, seed=3)
    path = data.write_case(tmp_path / f"2DBox_{modality}_t_0000.npz", case)
    calls = []
    real = data.preprocess_image

    def spy(*args, **kwargs):
        calls.append(kwargs.get("modality"))
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "preprocess_image", spy)
    train_image = data.SegmentationDataset(path, flip=False, bbox_shift=0)[0]["image"]
    assert calls == [modality]
    rec = Recorder(model)
    infer.segment_case(rec, infer.load_case(path))
    assert calls == [modality, modality]
    np.testing.assert_array_equal(rec.images[0][0], train_image)
    fallback = real(case["imgs"], interp=data.PREPROCESS_FALLBACK["interp"],
                    norm_then_pad=data.PREPROCESS_FALLBACK["norm_then_pad"])
    assert np.array_equal(train_image, fallback) == (modality not in table)  # a table entry reaches both sides


# ---- the 3D prompt modes ---------------------------------------------------------------------------------
def test_hybrid_falls_back_when_the_object_vanishes_for_a_slice(model):
    """The object is missing on slice 3 only: propagation from the middle slice (5) loses it going down
    and stops; hybrid re-prompts slice 3 with the 3D box's x/y (empty too) and, from then on with the
    3D box, finds the object again on slices 2..0."""
    vol = np.full((10, 64, 64), 30, np.uint8)  # 64 px → ×4 in model space: the oracle is pixel-exact
    for z in range(10):
        if z != 3:
            vol[z, 20:34, 30:44] = 220
    box = np.array([10, 12, 0, 60, 44, 9])
    prop = seg3d(model, vol, box, prompt_3d="propagate")
    hyb = seg3d(model, vol, box, prompt_3d="hybrid")
    assert prop[4:].any(axis=(1, 2)).all() and not prop[:4].any()
    assert hyb[[0, 1, 2, 4, 5, 6, 7, 8, 9]].any(axis=(1, 2)).all() and not hyb[3].any()
    # slice 2 is prompted with the 3D box's x/y (the fallback); slices 1, 0 propagate from it again
    np.testing.assert_array_equal(hyb[2] > 0, vol[2] > 100)
    np.testing.assert_array_equal(hyb[2] > 0, oracle_model.reference_mask(vol[2], box[[0, 1, 3, 4]], interp="area"))


def test_start_largest_finds_an_object_absent_from_the_middle_slice(model):
    """The 3D box spans slices 0..9 but the object is only on 0..3: from the middle slice propagation
    finds nothing; starting on the slice of the largest box-prompted mask segments all of it."""
    vol = np.full((10, 64, 64), 30, np.uint8)
    for z in range(4):
        r = 4 + 2 * z  # largest on slice 3
        vol[z, 32 - r:32 + r, 32 - r:32 + r] = 220
    box = np.array([16, 16, 0, 48, 48, 9])
    middle = seg3d(model, vol, box, prompt_3d="propagate", start_slice="middle")
    largest = seg3d(model, vol, box, prompt_3d="propagate", start_slice="largest")
    assert not middle.any()
    np.testing.assert_array_equal(largest > 0, vol > 100)


def test_margin_lets_propagation_follow_a_growing_object(model):
    """A cone widening by 2 px per slice: the mask bbox of slice z cannot contain slice z+1's object, so
    with margin 0 the propagated masks stay clipped; a 5 px margin follows the growth exactly."""
    vol = np.full((9, 64, 64), 30, np.uint8)
    for z in range(9):
        r = 4 + 2 * z
        vol[z, 32 - r // 2:32 + r // 2 + 1, 32 - r // 2:32 + r // 2 + 1] = 220
    box = np.array([0, 0, 0, 63, 63, 8])
    m0 = seg3d(model, vol, box, prompt_3d="propagate", margin_px=0)
    m5 = seg3d(model, vol, box, prompt_3d="propagate", margin_px=5)
    truth = vol > 100
    assert (m0 > 0).sum() < truth.sum()
    np.testing.assert_array_equal(m5 > 0, truth)


# ---- 2D knobs: box rounding, mask upsampling, normalisation order ---------------------------------------
def test_variant_knobs_reach_the_model(model):
    """Box rounding changes the decoder's boxes as specified; the normalisation order changes the encoder
    input of a non-square image only in the padding; mask upsampling changes the label map's edge."""
    img = np.full((100, 300), 40, np.uint8)
    img[30:70, 50:250] = 200
    case = infer.repair_case("2DBox_Weird_t.npz", np.repeat(img[..., None], 3, 2), np.array([[45.3, 25.2, 255.7,
                                                                                              74.6]]))
    out = {}
    for rounding in data.BOX_ROUNDINGS:
        rec = Recorder(model)
        out[rounding] = infer.segment_case(rec, case, pipe=infer.Pipeline(box_rounding=rounding))
        out[rounding + "_boxes"] = rec.boxes[0][0]
    f = out["float_boxes"]
    np.testing.assert_array_equal(out["round_boxes"], np.round(f))
    np.testing.assert_array_equal(out["outward_boxes"], [np.floor(f[0]), np.floor(f[1]), np.ceil(f[2]), np.ceil(f[3])])
    assert (out["outward"] >= out["float"]).all()  # an outward box never loses pixels

    inputs = {}
    for ntp in (True, False):
        rec = Recorder(model)
        infer.segment_case(rec, case, pipe=infer.Pipeline(norm_then_pad=ntp))
        inputs[ntp] = rec.images[0][0]
    for ntp in (True, False):  # the encoder sees exactly the shared preprocessing with that order
        np.testing.assert_array_equal(inputs[ntp], data.preprocess_image(case.imgs, norm_then_pad=ntp))
    assert not np.array_equal(inputs[True], inputs[False])

    masks = {m: infer.segment_case(model, case, pipe=infer.Pipeline(mask_interp=m)) for m in infer.MASK_INTERPS}
    assert not np.array_equal(masks["nearest"], masks["linear"])


def test_norm_order_differs_where_the_image_minimum_is_not_zero():
    """pad-then-norm includes the zero padding in the min-max: with an image minimum of 40 the content
    is rescaled; norm-then-pad maps the image minimum to 0."""
    img = np.full((64, 128), 40, np.uint8)
    img[16:48, 32:96] = 200
    a = data.preprocess_image(img, norm_then_pad=True)
    b = data.preprocess_image(img, norm_then_pad=False)
    nh, nw = data.resized_shape(img.shape)
    assert a[:, :nh].min() == 0 and b[:, :nh].min() == pytest.approx(40 / 200, abs=1e-6)
    assert (b[:, nh:] == 0).all() and (a[:, nh:] == 0).all()


# ---- pipeline_variants.py -----------------------------------------------------------------------------------------
def test_parse_variant():
    p = pipeline_variants.parse_variant("3d-hybrid+start-largest+margin2+min_area_ratio=0.3")
    assert (p.prompt_3d, p.start_slice, p.margin_px, p.min_area_ratio) == ("hybrid", "largest", 2.0, 0.3)
    assert pipeline_variants.parse_variant("default") == infer.Pipeline()
    with pytest.raises(ValueError, match="unknown variant part 'nope'"):
        pipeline_variants.parse_variant("img-cubic+nope")


def test_previous_variant_applies_its_us_exceptions_only_to_us():
    pipe = pipeline_variants.parse_variant("previous")
    us = pipeline_variants.case_pipeline("previous", pipe, "US")
    ct = pipeline_variants.case_pipeline("previous", pipe, "CT")
    assert (ct.image_interp, ct.box_rounding) == ("area", "float")
    assert (us.image_interp, us.box_rounding) == ("cubic", "outward")
    assert pipeline_variants.case_pipeline("default+mask-cubic", pipe, "US") == pipe


def test_evaluate_runs_variants_once_per_distinct_pipeline(tmp_path, model):
    """Two 2D cases and a 3D phantom under variants where some knobs do not apply: rows for every
    (variant, case), identical scores where the resolved pipelines are the same, encoder calls shared."""
    for k in range(2):
        c = phantoms.make_synthetic_case("2D", (80, 120), 2, "Endoscopy", seed=k)
        data.write_challenge_case(tmp_path, phantoms.case_name("2D", "Endoscopy", k), c)
    c = phantoms.make_synthetic_case("3D", (8, 64, 64), 2, "CT", seed=5)
    data.write_challenge_case(tmp_path, phantoms.case_name("3D", "CT", 9), c)
    paths = sorted((tmp_path / "imgs").glob("*.npz"))
    variants = ["default", "3d-propagate", "3d-hybrid+start-largest", "mask-cubic"]
    cached = pipeline_variants.CachingModel(model)
    rows = pipeline_variants.evaluate(cached, paths, tmp_path / "gts", variants, progress=False)
    assert len(rows) == len(paths) * len(variants)
    by = {(r["variant"], r["case"]): r for r in rows}
    for p in paths[:2]:  # 2D: the 3D knobs change nothing, so the scores are those of default
        assert by[("3d-propagate", p.name)]["dsc"] == by[("default", p.name)]["dsc"]
    assert all(0 <= r["dsc"] <= 1 for r in rows)
    # encoder: 1 per 2D case (all variants share the input) + the 3D box's slices once
    depth = int(c["boxes"][:, 5].max() - c["boxes"][:, 2].min() + 1)
    assert cached.encoder_calls == 2 + depth
    summary = pipeline_variants.summaries(rows, variants)
    table = pipeline_variants.format_variant_table(summary)
    assert "| overall | 3 | default" in table and "| CT | 1 | 3d-propagate" in table


def test_cli_prints_table_and_csv(tmp_path, oracle_dir, capsys):
    c = phantoms.make_synthetic_case("2D", (64, 96), 1, "X-Ray", seed=1)
    data.write_challenge_case(tmp_path, phantoms.case_name("2D", "X-Ray", 0), c)
    code = pipeline_variants.main(["-i", str(tmp_path / "imgs"), "--gts", str(tmp_path / "gts"), "-m", str(oracle_dir),
                          "--variants", "default,img-cubic", "--out", str(tmp_path / "rows.csv"), "--cache-dir", "",
                          "--wide"])
    assert code == 0
    out = capsys.readouterr().out
    assert "default DSC" in out and "img-cubic NSD" in out and "| X-Ray | 1 |" in out
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 3
    assert pipeline_variants.main(["-i", str(tmp_path / "imgs"), "--gts", str(tmp_path / "gts"), "-m", str(oracle_dir),
                          "--variants", "bogus"]) == 2


def test_caching_model_gives_the_models_label_maps(model):
    """The encoder/decoder caches change costs, never results: every variant's label map through one
    CachingModel equals the plain model's, and repeated variants cost no new model calls."""
    c = phantoms.make_synthetic_case("3D", (8, 64, 64), 3, "CT", seed=7)
    case = infer.repair_case("3DBox_CT_t.npz", c["imgs"], c["boxes"])
    cached = pipeline_variants.CachingModel(model)
    specs = ["3d-box", "3d-propagate", "3d-hybrid+start-largest+margin2", "box-outward+mask-cubic"]
    for spec in specs:
        pipe = pipeline_variants.parse_variant(spec)
        np.testing.assert_array_equal(infer.segment_case(cached, case, pipe=pipe), infer.segment_case(model, case,
                                                                                                      pipe=pipe))
    calls = (cached.encoder_calls, cached.decoder_calls)
    for spec in specs:
        infer.segment_case(cached, case, pipe=pipeline_variants.parse_variant(spec))
    assert (cached.encoder_calls, cached.decoder_calls) == calls and cached.decoder_box_hits > 0


def test_compare_counts_wins_and_from_csv_roundtrip(tmp_path, capsys):
    rows = [dict(variant=v, case=f"c{k}", modality="US", dsc=d, nsd=d, seconds=0.0)
            for v, ds in (("a", [0.5, 0.6, 0.7]), ("b", [0.6, 0.6, 0.65])) for k, d in enumerate(ds)]
    table = pipeline_variants.compare(rows, "a")
    assert "| US | b | 3 | +0.0167 | +0.0167 | 1 / 1 / 1 |" in table
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        import csv
        w = csv.DictWriter(f, fieldnames=pipeline_variants.ROW_FIELDS)
        w.writeheader()
        w.writerows(rows)
    assert pipeline_variants.main(["--from-csv", str(tmp_path / "rows.csv"), "--baseline", "a"]) == 0
    assert "1 / 1 / 1" in capsys.readouterr().out
