"""Pipeline variants: run labelled cases under named variants of the pipeline around the model and
print DSC/NSD per modality and overall for each.

    python -m tools.pipeline_variants -i CASES_DIR --gts GTS_DIR -m MODEL_DIR \
        --variants default,pad-then-norm,img-linear [--precision f32] [--max-slices N] [--out CSV]

A variant is one name or several joined by "+" (`3d-hybrid+start-largest+margin2`); each name sets
fields of infer.Pipeline (VARIANTS below, or `field=value`, e.g. `margin_px=3`). Fields left unset
take the shipped per-modality defaults, so `default` is what infer.py does today.
There is one pipeline: every variant runs infer.segment_case with a different infer.Pipeline.

Costs: the encoder is the bottleneck (LiteMedSAM fp32 ≈ 0.5–2 s per slice on 2 busy cores), so
  * slice embeddings are cached per case and keyed by the exact encoder input: variants that differ only
    after the encoder (mask upsampling, box rounding, 3D prompting) cost decoder calls only;
  * a variant whose resolved pipeline equals one already run on this case (e.g. a 3D-only knob on a 2D
    case) reuses its label map and scores;
  * --max-slices crops 3D volumes to N slices around the centre of their boxes' z-range (boxes and
    gts cropped with them; objects wholly outside the window are dropped from both).
Imports infer.py (numpy, opencv, openvino) and metrics.py (scipy); no torch.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/pipeline_variants.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import data
import infer
import metrics
from tools import phantoms

# name → infer.Pipeline fields it sets (a variant combines names with "+")
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "norm-then-pad": {"norm_then_pad": True},
    "pad-then-norm": {"norm_then_pad": False},
    "img-area": {"image_interp": "area"},
    "img-linear": {"image_interp": "linear"},
    "img-cubic": {"image_interp": "cubic"},
    "img-area/linear": {"image_interp": "area/linear"},
    "img-area/cubic": {"image_interp": "area/cubic"},
    "mask-linear": {"mask_interp": "linear"},
    "mask-cubic": {"mask_interp": "cubic"},
    "mask-nearest": {"mask_interp": "nearest"},
    "mask-area/linear": {"mask_interp": "area/linear"},
    "mask-area/cubic": {"mask_interp": "area/cubic"},
    "box-float": {"box_rounding": "float"},
    "box-round": {"box_rounding": "round"},
    "box-outward": {"box_rounding": "outward"},
    "3d-box": {"prompt_3d": "box"},
    "3d-propagate": {"prompt_3d": "propagate"},
    "3d-hybrid": {"prompt_3d": "hybrid"},
    "start-middle": {"start_slice": "middle"},
    "start-largest": {"start_slice": "largest"},
    "margin0": {"margin_px": 0.0},
    "margin2": {"margin_px": 2.0},
    "margin5": {"margin_px": 5.0},
    "ratio0.25": {"min_area_ratio": 0.25},
    "ratio0.5": {"min_area_ratio": 0.5},
    "ratio0.75": {"min_area_ratio": 0.75},
    "z-every": {"z_sampling": "every"},
    "z-adaptive": {"z_sampling": "adaptive"},
    "agree0.75": {"z_agree_iou": 0.75},
    "agree0.8": {"z_agree_iou": 0.8},
    "agree0.85": {"z_agree_iou": 0.85},
    "agree0.9": {"z_agree_iou": 0.9},
    "gap2": {"z_max_gap": 2},
    "gap4": {"z_max_gap": 4},
    "gap8": {"z_max_gap": 8},
}
# Named pipelines that differ by modality; "previous" = the defaults before the dev-set decisions
# (docs/pipeline_variants.md), for before/after tables.
MODALITY_VARIANTS: dict[str, dict[str, dict[str, object]]] = {
    "previous": {"*": {"image_interp": "area", "box_rounding": "float"},
                 "US": {"image_interp": "cubic", "box_rounding": "outward"}},
}
THREE_D_FIELDS = ("prompt_3d", "start_slice", "margin_px", "min_area_ratio", "z_sampling", "z_agree_iou", "z_max_gap")
_FIELD_TYPES = {"norm_then_pad": lambda v: v.lower() in ("1", "true", "yes"), "margin_px": float,
                "min_area_ratio": float, "z_agree_iou": float, "z_max_gap": int}


def parse_variant(spec: str) -> infer.Pipeline:
    """'name+name+field=value' → infer.Pipeline with those fields set (the rest None = defaults)."""
    fields: dict[str, object] = {}
    names = {f.name for f in dataclasses.fields(infer.Pipeline)}
    for part in spec.split("+"):
        part = part.strip()
        if part in VARIANTS:
            fields.update(VARIANTS[part])
        elif part in MODALITY_VARIANTS:
            fields.update(MODALITY_VARIANTS[part]["*"])
        elif "=" in part and part.split("=", 1)[0] in names:
            key, value = part.split("=", 1)
            fields[key] = _FIELD_TYPES.get(key, str)(value)
        else:
            raise ValueError(f"unknown variant part {part!r} in {spec!r}: use one of {', '.join(VARIANTS)} "
                             f"or field=value with a field of infer.Pipeline ({', '.join(sorted(names))})")
    return infer.Pipeline(**fields)


def case_pipeline(spec: str, pipe: infer.Pipeline, modality: str) -> infer.Pipeline:
    """`pipe` with the per-modality fields of any MODALITY_VARIANTS part of `spec` for this modality."""
    for part in spec.split("+"):
        extra = MODALITY_VARIANTS.get(part.strip(), {}).get(modality)
        if extra:
            pipe = dataclasses.replace(pipe, **extra)
    return pipe


def effective_key(case: infer.Case, pipe: infer.Pipeline) -> tuple:
    """The resolved pipeline reduced to the knobs that can change this case's label map."""
    resolved = infer.resolve_pipeline(case, pipe)
    values = dataclasses.asdict(resolved)
    if not case.is_3d:
        values.update({k: None for k in THREE_D_FIELDS})
    elif resolved.prompt_3d == "box":
        values.update(start_slice=None, margin_px=None, min_area_ratio=None)
    elif resolved.prompt_3d == "propagate":
        values.update(min_area_ratio=None)
    if case.is_3d and resolved.z_sampling == "every":
        values.update(z_agree_iou=None, z_max_gap=None)
    return tuple(sorted(values.items()))


class CachingModel(infer.Model):
    """Wraps an infer model for one case at a time (call clear() between cases):
      encode(): cached by the exact bytes of the encoder input;
      decode(): per box, cached by (embedding, exact box_256 bytes); only unseen boxes reach the decoder
    (variants differing after the decoder, or sharing propagation steps, cost no decoder calls).
    Outputs are exactly the wrapped model's. Counts real calls."""

    def __init__(self, model: infer.Model) -> None:
        super().__init__()
        self.model = model
        self.precision = getattr(model, "precision", "?")
        self._embeddings: dict[bytes, np.ndarray] = {}
        self._embedding_key: dict[int, bytes] = {}  # id(embedding array) → its key, while cached
        self._logits: dict[tuple[bytes, bytes], np.ndarray] = {}
        self.encoder_hits = 0
        self.decoder_box_hits = 0

    def encode(self, image: np.ndarray) -> np.ndarray:
        """image B×3×256×256 float32 → image_embedding B×256×64×64 (cached)."""
        key = hashlib.blake2b(np.ascontiguousarray(image, np.float32).tobytes(), digest_size=16).digest()
        if key in self._embeddings:
            self.encoder_hits += 1
            return self._embeddings[key]
        self.encoder_calls += 1
        emb = self.model.encode(image)
        self._embeddings[key] = emb
        self._embedding_key[id(emb)] = key
        return emb

    def decode(self, image_embedding: np.ndarray, boxes_256: np.ndarray) -> np.ndarray:
        """image_embedding 1×256×64×64, boxes_256 N×4 → low_res_logits N×1×256×256 (cached per box)."""
        emb_key = self._embedding_key.get(id(image_embedding))
        boxes_256 = np.ascontiguousarray(boxes_256, np.float32)
        if emb_key is None:  # not from encode(): no caching
            self.decoder_calls += 1
            return self.model.decode(image_embedding, boxes_256)
        keys = [(emb_key, b.tobytes()) for b in boxes_256]
        missing = [k for k, key in enumerate(keys) if key not in self._logits]
        self.decoder_box_hits += len(keys) - len(missing)
        if missing:
            self.decoder_calls += 1
            fresh = self.model.decode(image_embedding, boxes_256[missing])
            for j, k in enumerate(missing):
                self._logits[keys[k]] = fresh[j]
        return np.stack([self._logits[key] for key in keys])

    def clear(self) -> None:
        self._embeddings.clear()
        self._embedding_key.clear()
        self._logits.clear()


ROW_FIELDS = ["variant", "case", "modality", "dsc", "nsd", "seconds", "encoder_calls"]


def evaluate(model, case_paths: list[Path], gts_dir: Path, variants: list[str], block: int = infer.DEFAULT_BLOCK,
             max_slices: int = 0, progress: bool = True, rows_csv: Path | None = None,
             share: bool = True) -> list[dict]:
    """Every case under every variant → rows {variant, case, modality, dsc, nsd, seconds, encoder_calls}.

    `encoder_calls` is what the variant asks of the encoder (as if it ran alone). With `share` (default)
    variants share embeddings and decoder outputs (CachingModel), so `seconds` is a rough cost, not a
    latency; without it every variant runs on the bare model and `seconds` is its own wall time.
    With `rows_csv`, each case's rows are appended as soon as it is done (a stopped run keeps them)."""
    if rows_csv:
        with open(rows_csv, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=ROW_FIELDS).writeheader()
    pipes = {v: parse_variant(v) for v in variants}
    cached = model if isinstance(model, CachingModel) or not share else CachingModel(model)
    rows: list[dict] = []
    for n, path in enumerate(case_paths):
        case = infer.load_case(path)
        gts_path = gts_dir / path.name
        with np.load(gts_path, allow_pickle=False) as g:
            gts = g["gts"]
            spacing = tuple(float(s) for s in g["spacing"]) if "spacing" in g.files else None
        if case.is_3d and max_slices:
            with np.load(path, allow_pickle=False) as f:
                imgs, boxes = f["imgs"], f["boxes"]
            imgs, boxes, gts = data.crop_z(imgs, boxes, gts, max_slices)
            case = infer.repair_case(path.name, imgs, boxes)
        done: dict[tuple, tuple[float, float, float, int]] = {}
        for v, pipe in pipes.items():
            pipe = case_pipeline(v, pipe, case.modality)
            key = effective_key(case, pipe)
            if key not in done:
                asked = cached.encoder_calls + getattr(cached, "encoder_hits", 0)
                t0 = time.perf_counter()
                segs = infer.segment_case(cached, case, block, pipe=pipe)
                seconds = time.perf_counter() - t0
                dsc, nsd = metrics.case_metrics(gts, segs, spacing, case.is_3d)
                done[key] = (dsc, nsd, seconds, cached.encoder_calls + getattr(cached, "encoder_hits", 0) - asked)
            dsc, nsd, seconds, calls = done[key]
            rows.append(dict(variant=v, case=path.name, modality=case.modality, dsc=dsc, nsd=nsd, seconds=seconds,
                             encoder_calls=calls))
        if share:
            cached.clear()
        if rows_csv:
            with open(rows_csv, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=ROW_FIELDS).writerows(rows[-len(pipes):])
        if progress:
            best = " ".join(f"{v}={r['dsc']:.3f}" for v, r in ((r["variant"], r) for r in rows[-len(pipes):]))
            print(f"pipeline_variants: [{n + 1}/{len(case_paths)}] {path.name} (encoder {cached.encoder_calls}, "
                  f"decoder {cached.decoder_calls}) DSC {best}", file=sys.stderr, flush=True)
    return rows


def summaries(rows: list[dict], variants: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: metrics.summarise(rows of that variant)}."""
    return {v: metrics.summarise([r for r in rows if r["variant"] == v]) for v in variants}


def format_variant_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per variant and modality group (n, DSC, NSD), modalities as row blocks."""
    variants = list(summary)
    groups = list(dict.fromkeys(m for s in summary.values() for m in s))
    groups = [m for m in groups if m != "overall"] + ["overall"]
    lines = ["| modality | n | variant | DSC | NSD |", "|---|---:|---|---:|---:|"]
    for m in groups:
        scores = {v: summary[v][m] for v in variants if m in summary[v]}
        best = max((s["dsc"] for s in scores.values() if not math.isnan(s["dsc"])), default=float("nan"))
        for v, s in scores.items():
            mark = " **←**" if s["dsc"] == best and len(scores) > 1 else ""
            lines.append(f"| {m} | {s['n']} | {v}{mark} | {s['dsc']:.4f} | {s['nsd']:.4f} |")
    return "\n".join(lines)


def format_wide_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: modalities as rows, one DSC / NSD column pair per variant."""
    variants = list(summary)
    groups = list(dict.fromkeys(m for s in summary.values() for m in s))
    groups = [m for m in groups if m != "overall"] + ["overall"]
    head = "| modality | n | " + " | ".join(f"{v} DSC | {v} NSD" for v in variants) + " |"
    lines = [head, "|---|---:|" + "---:|---:|" * len(variants)]
    for m in groups:
        n = next(summary[v][m]["n"] for v in variants if m in summary[v])
        cells = []
        for v in variants:
            s = summary[v].get(m)
            cells += [f"{s['dsc']:.4f}", f"{s['nsd']:.4f}"] if s else ["–", "–"]
        lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    """Rows written by --out (numbers parsed)."""
    with open(path, newline="") as f:
        return [dict(r, dsc=float(r["dsc"]), nsd=float(r["nsd"]), seconds=float(r["seconds"]),
                     encoder_calls=int(r.get("encoder_calls") or 0)) for r in csv.DictReader(f)]


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this lopsided if wins and losses were
    equally likely (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_ci(deltas: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean of paired differences."""
    rng = np.random.default_rng(seed)
    d = np.asarray(deltas, float)
    means = d[rng.integers(0, len(d), (n, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(rows: list[dict], baseline: str) -> str:
    """Markdown table: per modality and variant, mean ΔDSC / ΔNSD against `baseline` over the cases both
    ran, per-case DSC wins / ties (|Δ| < 0.001) / losses, the sign test's p and a bootstrap 95 % interval of
    ΔDSC: how consistent a gain is, not just its size."""
    base = {r["case"]: r for r in rows if r["variant"] == baseline}
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != baseline))
    lines = [f"| modality | variant | n | ΔDSC vs {baseline} | ΔNSD | wins / ties / losses | sign p | ΔDSC 95 % CI |",
             "|---|---|---:|---:|---:|---|---:|---|"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["variant"] != baseline and r["case"] in base:
            groups.setdefault(r["modality"], []).append(r)
            groups.setdefault("overall", []).append(r)
    for m in sorted(g for g in groups if g != "overall") + (["overall"] if groups else []):
        for v in variants:
            sel = [r for r in groups[m] if r["variant"] == v and not math.isnan(r["dsc"])
                   and not math.isnan(base[r["case"]]["dsc"])]
            if not sel:
                continue
            d_dsc = [r["dsc"] - base[r["case"]]["dsc"] for r in sel]
            d_nsd = [r["nsd"] - base[r["case"]]["nsd"] for r in sel]
            wins, losses = sum(d > 1e-3 for d in d_dsc), sum(d < -1e-3 for d in d_dsc)
            lo, hi = bootstrap_ci(d_dsc)
            lines.append(f"| {m} | {v} | {len(sel)} | {np.mean(d_dsc):+.4f} | {np.mean(d_nsd):+.4f} | "
                         f"{wins} / {len(sel) - wins - losses} / {losses} | {sign_test_p(wins, losses):.3f} | "
                         f"[{lo:+.4f}, {hi:+.4f}] |")
    return "\n".join(lines)


def estimated_cost(path: Path) -> float:
    """Decoder calls dominate: boxes × slices (3D) or boxes (2D); used to run cheap cases first."""
    with np.load(path, allow_pickle=False) as f:
        boxes = f["boxes"]
    if boxes.ndim == 2 and boxes.shape[1] == 6:
        return float(((boxes[:, 5] - boxes[:, 2]) + 1).clip(min=1).sum())
    return float(len(boxes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DSC/NSD per modality of labelled challenge cases under named pipeline "
                                "variants (one pipeline: infer.segment_case with different infer.Pipeline knobs).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", type=Path, metavar="CASES_DIR", help="folder of input .npz cases (imgs, boxes)")
    p.add_argument("--gts", type=Path, metavar="GTS_DIR",
                   help="folder of ground-truth .npz (gts, spacing) with the same names")
    p.add_argument("-m", "--model", type=Path, default=infer.DEFAULT_MODEL_DIR, metavar="MODEL_DIR",
                   help="model dir (encoder/decoder IR or ONNX)")
    p.add_argument("--variants", default="default", metavar="V1,V2,…",
                   help=f"comma-separated variants; a variant joins names with '+'; names: "
                        f"{', '.join([*VARIANTS, *MODALITY_VARIANTS])}; "
                        "or field=value of infer.Pipeline")
    p.add_argument("--precision", choices=("f32", "bf16", "auto"), default="f32",
                   help="OpenVINO INFERENCE_PRECISION_HINT")
    p.add_argument("--backend", choices=("openvino", "onnxruntime"), default="openvino", help="inference runtime")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="inference threads; none = the runtime's choice")
    p.add_argument("-b", "--block", type=int, default=infer.DEFAULT_BLOCK, metavar="BLOCK",
                   help="max boxes per decoder call")
    p.add_argument("--max-slices", type=int, default=0, metavar="N",
                   help="crop 3D volumes to N slices around their boxes; 0 = whole volume")
    p.add_argument("--half", choices=("tune", "check", "all"), default="tune",
                   help="dev-set half to run (split.csv beside the cases; cases outside a split always run); "
                        "decide on tune, confirm on check")
    p.add_argument("--only", default="", metavar="SUBSTR,…",
                   help="only cases whose file name contains one of these substrings (e.g. 2DBox_,3DBox_CT)")
    p.add_argument("--out", type=Path, default=None, metavar="CSV",
                   help="per-case rows (variant, case, modality, dsc, nsd, seconds)")
    p.add_argument("--baseline", default=None, metavar="VARIANT",
                   help="also print mean ΔDSC/ΔNSD and per-case wins/ties/losses of every variant against this one")
    p.add_argument("--no-share", action="store_true",
                   help="run every variant on the bare model (real per-variant seconds; slower)")
    p.add_argument("--from-csv", type=Path, default=None, metavar="CSV",
                   help="no inference: summarise rows of an earlier --out (also a partial one)")
    p.add_argument("--wide", action="store_true",
                   help="print one column pair per variant instead of one row per variant")
    p.add_argument("--make-phantoms", type=Path, default=None, metavar="DIR",
                   help="write the synthetic 3D phantoms (small and large objects) to DIR/imgs, DIR/gts, then evaluate "
                        "them if -i is DIR/imgs")
    p.add_argument("--cache-dir", type=str, default=str(infer.DEFAULT_CACHE_DIR), metavar="DIR",
                   help="OpenVINO compiled-model cache; '' = none")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_phantoms:
        paths = phantoms.write_phantom_volumes(args.make_phantoms)
        print(f"pipeline_variants: wrote {len(paths)} phantoms to {args.make_phantoms}", file=sys.stderr)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.from_csv:
        rows = read_rows(args.from_csv)
        found = list(dict.fromkeys(r["variant"] for r in rows))
        variants = [v for v in variants if v in found] if args.variants != "default" else found
        report(rows, variants, args)
        return 0
    if args.input is None or args.gts is None:
        print("pipeline_variants: error: -i CASES_DIR and --gts GTS_DIR are needed (unless --from-csv)",
              file=sys.stderr)
        return 2
    try:
        for v in variants:
            parse_variant(v)
    except ValueError as e:
        print(f"pipeline_variants: error: --variants: {e}", file=sys.stderr)
        return 2
    for flag, d in (("-i", args.input), ("--gts", args.gts)):
        if not d.is_dir():
            print(f"pipeline_variants: error: {flag} {d}: not a directory", file=sys.stderr)
            return 2
    only = [s for s in args.only.split(",") if s]
    paths = sorted(p for p in args.input.glob("*.npz") if (args.gts / p.name).is_file()
                   and (args.half == "all" or data.half_of(p) in (args.half, None))
                   and (not only or any(s in p.name for s in only)))
    paths.sort(key=estimated_cost)  # cheap cases first: a run stopped early has the most cases
    if not paths:
        print(f"pipeline_variants: error: no *.npz in {args.input} with a namesake in {args.gts}", file=sys.stderr)
        return 2
    try:
        model = infer.load_model(args.model, args.backend, args.precision, args.threads, args.cache_dir or None)
    except FileNotFoundError as e:
        print(f"pipeline_variants: error: {e}", file=sys.stderr)
        return 2
    print(f"pipeline_variants: {len(paths)} cases × {len(variants)} variants, model {args.model} ({model.precision})",
          file=sys.stderr)
    rows = evaluate(model, paths, args.gts, variants, args.block, args.max_slices, rows_csv=args.out,
                    share=not args.no_share)
    report(rows, variants, args)
    return 0


def report(rows: list[dict], variants: list[str], args: argparse.Namespace) -> None:
    summary = summaries(rows, variants)
    print(format_wide_table(summary) if args.wide else format_variant_table(summary))
    if args.baseline:
        print()
        print(compare([r for r in rows if r["variant"] in variants], args.baseline))


if __name__ == "__main__":
    sys.exit(main())
