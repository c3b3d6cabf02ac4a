"""The paper's evaluation protocol on MVTec AD, MTD and mSTC, as a library function.

Per category: fit on the nominal training images, score the test set, then image AUROC, pixel AUROC
over the category's full test set, and AU-PRO (FPR <= 0.3); a category without ground-truth masks
(labels only) reports its pixel metrics as not available. Beside them, the F1-optimal ("adaptive")
image and pixel thresholds on the evaluated set itself, with precision, recall and F1 at them (an
optimistic figure: the threshold is chosen on the data it is scored on, as anomalib reports it). Each finished category is written at once
(atomically) to `OUT/categories/<name>.json` with a fingerprint of its inputs (every image and mask
file's path, size and modification time, and the settings); a rerun reuses a category only when its
fingerprint is unchanged, and recomputes it when its files changed (resumable, never stale); results
made with other settings are refused, not replaced, unless `overwrite`. The report
(`results.json`, `results.csv`) holds every category and the mean over categories; `scores.csv` every
test image's score; `heatmaps/<category>/` panels for every kind of test image (good and each defect).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
import warnings
from typing import Callable

import numpy as np

from patchcore_jax._src.stages import metrics
from patchcore_jax._src.stages.metrics import METRICS
from patchcore_jax._src.model import preprocess
from patchcore_jax._src.app import visualize
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.io.data import datasets as datasets
from patchcore_jax._src.model.images import display
from patchcore_jax._src.io import atomic
from patchcore_jax._src.io.outputs import OutputDir, csv_text

SOURCES = ("folder", "tfds")
MAX_CATEGORY_BYTES = 256 << 20  # a category result: its scores take ~100 bytes per test image


def protocol_config(dataset: str, config: PatchCoreConfig, *, crop_given: bool = True) -> PatchCoreConfig:
    """The data set's geometry: mSTC frames are squashed to `resize x resize` with no crop."""
    if dataset == "mstc":
        changes = {"geometry": "squash"}
        if not crop_given:
            changes["crop"] = config.resize
        return config.replace(**changes)
    return config


def input_fingerprint(category: datasets.Category, settings: dict) -> str:
    """A digest of a category's inputs (every image and mask file's path, size and modification time,
    its records) and of `settings`: equal digests mean the result can be reused."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    files = sorted({f for s in category.train + category.test for f in (s.image, s.mask) if f})
    for f in files:
        st = os.stat(f)
        digest.update(f"{os.fsencode(f)!r}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for s in category.train + category.test:
        digest.update(f"{s.name}\0{s.label}\0{s.kind}\0{s.mask_index}\n".encode())
    return digest.hexdigest()


def _metric(fn, *args):
    try:
        return fn(*args)
    except ValueError:  # one class only (e.g. a scene without anomalous test frames)
        return None


def _score_set(model, images, meta: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps of a whole test set. One model: its predictions. An ensemble: each member's raw
    scores and maps, combined over the set as the published evaluation does (`combine_over_set`).
    Each record in `meta` (filled as `images` is consumed) gets its `prediction`."""
    from patchcore_jax._src.model.detector import Prediction
    from patchcore_jax._src.api.ensemble import combine_over_set

    if not hasattr(model, "members"):
        preds = list(model.predict_iter(images))
    else:
        crops, sizes, parts = [], [], [[] for _ in model.members]
        for _, batch, batch_sizes in model.crop_batches(images):
            for j, (s, m) in enumerate(model.member_scores(batch)):
                parts[j].append((s, m))
            crops += list(batch)
            sizes += batch_sizes
        scores, maps = combine_over_set([np.concatenate([s for s, _ in p]) for p in parts],
                                        [np.concatenate([m for _, m in p]) for p in parts])
        preds = [Prediction(r["name"], c, float(s), m.astype(np.float32), tuple(z))
                 for r, c, s, m, z in zip(meta, crops, scores, maps, sizes)]
    for rec, pred in zip(meta, preds):
        rec["prediction"] = pred
    return np.asarray([p.score for p in preds]), np.stack([p.anomaly_map for p in preds])


def evaluate_category(model, splits, *, mask_rule: str = "published", heatmaps: int = 0) -> tuple[dict, list]:
    """Fits `model` on `splits["train"]` and scores `splits["test"]` (records as `datasets.load_sample`
    gives them). Returns the result and up to `heatmaps` `(record name, Prediction, mask)` to draw.
    `model` is a `PatchCore` or a `PatchCoreEnsemble` (combined over the test set, see `_score_set`)."""
    cfg = model.config
    start = time.perf_counter()
    train = splits["train"]
    model.fit(train[i]["image"] for i in range(len(train)))
    test = splits["test"]
    meta: list[dict] = []

    def images():
        for i in range(len(test)):
            rec = test[i]
            meta.append(rec)
            yield rec["image"]

    scores, maps = _score_set(model, images(), meta)
    masks = test_masks(cfg, meta, mask_rule)
    result = category_result(meta, scores, maps, masks, n_train=len(train),
                             bank_size=int(sum(m.bank.shape[0] for m in getattr(model, "members", [model]))),
                             seconds=time.perf_counter() - start)
    image_f1, pixel_f1 = result["image_threshold_f1"], result["pixel_threshold_f1"]
    has_masks = result["masks"] == "available"
    from patchcore_jax._src.model.detector import Threshold

    if image_f1 is not None:
        model.image_threshold = Threshold(image_f1["threshold"], "F1-optimal on the evaluated test set")
    if pixel_f1 is not None:
        model.pixel_threshold = Threshold(pixel_f1["threshold"], "F1-optimal over the evaluated test set's pixels")
    pick = panels_to_draw([r["kind"] for r in meta], heatmaps)
    return result, [(meta[i]["name"], meta[i]["prediction"], masks[i] if has_masks else None) for i in pick]


def test_masks(cfg: PatchCoreConfig, meta: list[dict], mask_rule: str) -> np.ndarray:
    """The test records' ground-truth masks at the crop's geometry `(N, crop, crop)`."""
    return np.stack([cfg.image_geometry.mask(r["mask"], rule=mask_rule, name=r["name"]) for r in meta])


def category_result(meta: list[dict], scores, maps, masks, *, n_train: int, bank_size: int, seconds: float) -> dict:
    """One category's result from its test records, image scores `(N,)`, maps `(N, crop, crop)` and
    masks (`test_masks`): the metrics, the F1-optimal thresholds, the counts and every score. `evaluate`
    and `sweep` both report through here, so a sweep cell and an `evaluate` agree by construction."""
    scores = np.asarray(scores)
    labels = np.array([int(r["label"]) for r in meta])
    has_masks = all(bool(r.get("has_mask", True)) for r in meta)
    image_f1 = _metric(metrics.f1_optimal_threshold, labels, scores) if labels.any() else None
    pixel_f1 = _metric(metrics.f1_optimal_threshold, masks, maps) if has_masks and masks.any() else None
    return {
        "image_auroc": _metric(metrics.image_auroc, labels, scores),
        "pixel_auroc": _metric(metrics.pixel_auroc, masks, maps) if has_masks else None,
        "au_pro": _metric(metrics.au_pro, masks, maps) if has_masks else None,
        "masks": "available" if has_masks else "not available (labels only)",
        "image_threshold_f1": image_f1,
        "pixel_threshold_f1": pixel_f1,
        "n_train": int(n_train),
        "n_test": len(meta),
        "n_anomalous": int(labels.sum()),
        "bank_size": int(bank_size),
        "seconds": round(seconds, 1),
        "scores": [{"name": r["name"], "kind": r["kind"], "label": int(r["label"]), "score": float(s)}
                   for r, s in zip(meta, scores)],
    }


def panels_to_draw(kinds: list[str], per_kind: int) -> list[int]:
    """The test images whose panels are drawn: the first `per_kind` of every kind (good and each
    defect type), in test order, so no defect type goes unseen."""
    seen: dict[str, int] = {}
    pick = []
    for i, kind in enumerate(kinds):
        if seen.get(kind, 0) < per_kind:
            seen[kind] = seen.get(kind, 0) + 1
            pick.append(i)
    return pick


def _read_previous(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CATEGORY_BYTES + 1)
        if len(raw) > MAX_CATEGORY_BYTES:
            raise ValueError(f"larger than {MAX_CATEGORY_BYTES >> 20} MiB")
        data = atomic.strict_json(raw, "its content")
        if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
            raise ValueError("not a category result")
        for key in METRICS + ("n_train", "n_test", "n_anomalous", "bank_size", "image_threshold_f1",
                              "pixel_threshold_f1", "scores"):
            data["result"][key]  # noqa: B018 -- every field the report reads must be there
        return data
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as err:
        raise ValueError(f"{display(path)}: corrupt category result ({err}); delete it to recompute the category") from None


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def settings_changes(before: dict, now: dict) -> list[str]:
    """The settings that differ, as `name before -> now` (config fields without their `config.`)."""
    a, b = _flat(before), _flat(json.loads(json.dumps(now)))
    changes = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            name = key.removeprefix("config.")
            changes.append(f"{name} {json.dumps(a.get(key))} -> {json.dumps(b.get(key))}")
    return changes


def run_settings(dataset: str, configs: list, *, mask_rule: str, source: str) -> dict:
    """What a category's result depends on besides its files: recorded with it, compared on a rerun."""
    config = configs[0].to_dict() if len(configs) == 1 else [c.to_dict() for c in configs]
    return {"dataset": dataset, "config": config, "mask_rule": mask_rule, "source": source}


def check_other_settings(out: str, cats, settings: dict) -> None:
    """Refuses (ValueError, one line) to write into `out` when it holds category results made with
    other settings, which this run would replace: naming the categories and the settings that differ."""
    changed, changes = [], []
    for cat in cats:
        previous = _read_previous(os.path.join(out, "categories", f"{cat.name}.json"))
        if previous is None or not isinstance(previous.get("settings"), dict):
            continue
        diff = settings_changes(previous["settings"], settings)
        if diff:
            changed.append(cat.name)
            changes += [d for d in diff if d not in changes]
    if changed:
        raise ValueError(f"{display(out)}: holds results of {', '.join(changed)} made with other settings "
                         f"({'; '.join(changes)}); give a new --out (or compare settings with 'patchcore-jax "
                         "sweep'), or --overwrite to replace them")


def evaluate(dataset: str, root: str, config, *, out: str, categories=None, source: str = "folder",
             tfds_dir: str | None = None, heatmaps: int = 2, mask_rule: str = "published", progress=None,
             log: Callable[[str], None] = lambda message: None, save_models: bool = False,
             overwrite: bool = False) -> dict:
    """Runs the protocol and writes `out/` (see the module docstring); returns the report.

    `config` is a `PatchCoreConfig`, or a list of them for an ensemble, used as given (see
    `protocol_config` for the data set's geometry). `log` receives one line per category. `heatmaps`:
    panels drawn per kind of test image (good and every defect type). `save_models`: each category's
    fitted model is also written to `out/models/<category>/` (a category kept from an earlier run is
    fitted again when its model folder is missing). An `out` holding category results made with other
    settings is refused before any work (ValueError naming them), unless `overwrite` (then they are
    computed again and replaced).
    """
    from patchcore_jax._src.api.ensemble import PatchCoreEnsemble
    from patchcore_jax._src.api.patchcore import PatchCore

    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    if not configs or not all(isinstance(c, PatchCoreConfig) for c in configs):
        raise ValueError("config: expected a PatchCoreConfig or a non-empty list of them")
    config = configs[0]  # the geometry every member shares

    if dataset not in datasets.DATASETS:
        raise ValueError(f"dataset: expected one of {datasets.DATASETS}, got {dataset!r}")
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
    if mask_rule not in preprocess.MASK_RULES:
        raise ValueError(f"mask rule: expected one of {preprocess.MASK_RULES}, got {mask_rule!r}")
    if isinstance(heatmaps, bool) or not isinstance(heatmaps, int) or heatmaps < 0:
        raise ValueError(f"heatmaps: expected an integer >= 0, got {heatmaps!r}")
    if source == "tfds":
        from patchcore_jax._src.io.data import tfds_builders as tfds_builders

        if config.resize != tfds_builders.RESIZE:
            raise ValueError(f"resize {config.resize}: TFDS preparations are stored at {tfds_builders.RESIZE}; "
                             "use the folder source")
    out = OutputDir.check(out, "evaluate")
    cats = datasets.load_categories(dataset, root, categories)
    squash = config.geometry == "squash"
    for cat in cats:
        if cat.squash != squash:
            raise ValueError(f"geometry {config.geometry!r}: the {dataset} protocol uses "
                             f"{'squash' if cat.squash else 'center_crop'} (see protocol_config)")
    settings = run_settings(dataset, configs, mask_rule=mask_rule, source=source)
    if not overwrite:
        check_other_settings(out, cats, settings)
    outdir = OutputDir.claim(out, "evaluate", keep=True)
    per_category = {}
    for i, cat in enumerate(cats, 1):
        rel = os.path.join("categories", f"{cat.name}.json")
        fingerprint = input_fingerprint(cat, settings)
        previous = _read_previous(outdir.path(rel))
        model_dir = outdir.path(os.path.join("models", cat.name))
        if save_models and not os.path.isdir(model_dir):
            previous = None
        if previous is not None and previous.get("fingerprint") == fingerprint:
            per_category[cat.name] = previous["result"]
            log(f"[{i}/{len(cats)}] {cat.name}: done before with the same inputs and settings, kept "
                f"({display(outdir.path(rel))})")
            continue
        if source == "tfds":
            from patchcore_jax._src.io.data import tfds_builders as tfds_builders

            splits = tfds_builders.prepared_splits(dataset, cat.name, root=root,
                                                   data_dir=tfds_dir or outdir.path("tfds"))
        else:
            splits = {s: datasets.FolderSplit(getattr(cat, s), geometry=cat.geometry(config.resize)) for s in ("train", "test")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            model = (PatchCore(config, progress=progress) if len(configs) == 1
                     else PatchCoreEnsemble(configs, progress=progress))
        result, shown = evaluate_category(model, splits, mask_rule=mask_rule, heatmaps=heatmaps)
        if save_models:
            model.save(model_dir)
        if shown:
            scale = model.color_scale()
            for record_name, pred, mask in shown:
                outdir.write(os.path.join("heatmaps", cat.name, f"{record_name}.png"),
                             lambda tmp, p=pred, m=mask, n=record_name: visualize.draw_panel(
                                 tmp, image=p.crop, amap=p.anomaly_map, mask=m, scale=scale, score=p.score,
                                 image_threshold=model.threshold, name=f"{cat.name}/{n}",
                                 decision=model.decide(p.score, p.anomaly_map)))
        outdir.write_json(rel, {"settings": settings, "fingerprint": fingerprint, "result": result})
        per_category[cat.name] = result
        log(f"[{i}/{len(cats)}] {cat.name}: image AUROC {fmt(result['image_auroc'])}  pixel AUROC "
            f"{fmt(result['pixel_auroc'])}  AU-PRO {fmt(result['au_pro'])}  ({result['seconds']} s)")

    mean = {}
    for k in METRICS:
        values = [r[k] for r in per_category.values() if r[k] is not None]
        mean[k] = float(np.mean(values)) if values else None
    report = {
        **settings,
        "root": display(os.path.abspath(root)),
        "pretrained_backbone": all(c.weights is not None for c in configs),
        "mean": mean,
        "categories": {n: {k: v for k, v in r.items() if k != "scores"} for n, r in per_category.items()},
    }
    outdir.write_json("results.json", report)
    rocs = {}
    for name, r in per_category.items():
        labels = [row["label"] for row in r["scores"]]
        if 0 < sum(labels) < len(labels):
            rocs[name] = metrics.roc_curve(labels, [row["score"] for row in r["scores"]])
    outdir.write("summary.png", lambda tmp: visualize.summary_figure(tmp, report, rocs))
    table = io.StringIO()
    w = csv.writer(table)
    f1_columns = [f"{kind}_{q}" for kind in ("image", "pixel") for q in ("threshold_f1", "precision", "recall", "f1")]
    w.writerow(["category", *METRICS, *f1_columns, "n_train", "n_test", "n_anomalous", "bank_size"])
    for n, r in per_category.items():
        f1 = []
        for kind in ("image", "pixel"):
            t = r[f"{kind}_threshold_f1"]
            f1 += ["", "", "", ""] if t is None else [t["threshold"], t["precision"], t["recall"], t["f1"]]
        w.writerow([csv_text(n), *(r[k] for k in METRICS), *f1, r["n_train"], r["n_test"], r["n_anomalous"], r["bank_size"]])
    w.writerow(["mean", *(mean[k] for k in METRICS), *([""] * len(f1_columns)), "", "", "", ""])
    outdir.write_text("results.csv", table.getvalue())
    outdir.write_text("scores.csv", scores_table(per_category))
    return report


def scores_table(per_category: dict) -> str:
    """Every test image's score, one row each: `category, name, kind, label, score, anomalous` (against
    the category's F1-optimal image threshold on the evaluated set; blank where there is none)."""
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["category", "name", "kind", "label", "score", "anomalous"])
    for cat, r in per_category.items():
        t = r["image_threshold_f1"]
        for row in r["scores"]:
            w.writerow([csv_text(cat), csv_text(row["name"]), csv_text(row["kind"]), row["label"], repr(row["score"]),
                        "" if t is None else int(row["score"] > t["threshold"])])
    return table.getvalue()


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
