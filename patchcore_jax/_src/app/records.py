"""What `predict` leaves behind besides its pictures: output names that mirror the inputs, and the run
record (`run.json`) that says which model, thresholds and settings gave `scores.csv`."""

from __future__ import annotations

import os
import time

from patchcore_jax._src.model.images import display

DECISION_RULE = (
    "An image is anomalous when its image score is strictly above the image threshold. An image judged "
    "fine shows no region (its mask is empty and its panel has no outline). An image judged anomalous "
    "shows the pixels whose map value is above the pixel threshold or, when no pixel is, the peak of its "
    "map (the pixels above half way from the nominal level to the map's maximum). Without an image "
    "threshold there is no verdict and the region is the map above the pixel threshold.")

NORMALIZED_SCORE = (
    "normalized_score = 0.5 + 0.5 * (score - threshold) / (threshold - median), where median is the median "
    "image score of the held-out good images (0 without them): 0 at that median, 0.5 at the threshold, 1 at "
    "threshold + (threshold - median); not clipped, so below 0 and above 1 keep their order.")


def output_names(paths: list[str]) -> list[str]:
    """One output name per input, without its extension, mirroring the inputs' paths relative to their
    common folder (`a/b.png` -> `a/b`, so `heatmaps/a/b.png` and `maps/a/b.npy`). Inputs that would
    share a name keep their suffix in it (`x.png` and `x.jpg` -> `x_png`, `x_jpg`); distinct inputs
    always get distinct names."""
    absolute = [os.path.abspath(p) for p in paths]
    base = os.path.commonpath(absolute) if len(set(absolute)) > 1 else os.path.dirname(absolute[0])
    if base in absolute:  # one file given twice
        base = os.path.dirname(base)
    rel = [os.path.relpath(p, base) for p in absolute]
    stems = [os.path.splitext(r)[0] for r in rel]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    names = [s if counts[s] == 1 else s + "_" + os.path.splitext(r)[1].lstrip(".")
             for s, r in zip(stems, rel)]
    taken: set[str] = set()
    out = []
    for name, r in zip(names, rel):  # the rare leftovers (x.png beside x_png.png; one file given twice)
        unique, i = name, 2
        while unique in taken:
            unique, i = f"{name}-{i}", i + 1
        taken.add(unique)
        out.append(unique)
    return out


def threshold_record(threshold) -> dict | None:
    return None if threshold is None else {"value": threshold.value, "rule": threshold.rule}


def run_record(*, model, model_path: str, args, counts: dict, skipped: list, outputs: list[str],
               started: float) -> dict:
    """The `run.json` of a predict: model, thresholds and their rules, settings, counts, skipped files."""
    configs = getattr(model, "configs", [model.config])
    return {
        "command": "predict",
        "model": {"path": display(os.path.abspath(model_path)), "description": model.describe(),
                  "configs": [c.to_dict() for c in configs],
                  "pretrained_backbone": all(c.weights is not None for c in configs)},
        "thresholds": {"image": threshold_record(model.image_threshold),
                       "pixel": threshold_record(model.pixel_threshold)},
        "decision_rule": DECISION_RULE,
        "normalized_score": NORMALIZED_SCORE,
        "settings": {"threshold": args.threshold, "pixel_threshold": args.pixel_threshold,
                     "heatmaps": not args.no_heatmaps, "save_maps": args.save_maps, "save_masks": args.save_masks,
                     "full_frame": args.full_frame, "skip_unreadable": args.skip_unreadable},
        "counts": counts,
        "skipped": [{"path": display(p), "reason": reason} for p, reason in skipped],
        "outputs": outputs,
        "seconds": round(time.perf_counter() - started, 2),
    }
