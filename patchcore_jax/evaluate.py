"""`patchcore-jax evaluate`: the paper's protocol on MVTec AD, MTD and mSTC.

Per category: fit on the nominal training images, score the test set, then image AUROC, pixel AUROC
over the category's full test set, and AU-PRO (FPR <= 0.3). Each finished category is written at once
(atomically) to `OUT/categories/<name>.json`; a rerun with the same settings skips it (resumable).
The report (`results.json`, `results.csv`) holds every category and the mean over categories.
"""

from __future__ import annotations

import csv
import json
import os
import time
import warnings

import numpy as np


def add_parser(sub) -> None:
    from patchcore_jax.cli import _add_model_options

    p = sub.add_parser(
        "evaluate", help="fit and evaluate per category on MVTec AD, MTD or mSTC (your own copy)",
        description="Runs the paper's protocol on a data set folder you provide (nothing is downloaded) and writes "
                    "results.json, results.csv and a few heatmaps per category. Resumable.",
    )
    p.add_argument("--dataset", required=True, choices=("mvtec", "mtd", "mstc"))
    p.add_argument("--root", required=True, help="the data set's folder (see README for the layouts)")
    p.add_argument("--categories", nargs="+", help="categories (mSTC: scenes 01..12) to run; default all present")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--source", choices=("folder", "tfds"), default="folder",
                   help="read files directly, or through a TFDS array_record preparation (default folder)")
    p.add_argument("--tfds-dir", help="where TFDS preparations live (default OUT/tfds)")
    p.add_argument("--heatmaps", type=int, default=4, help="heatmap overlays written per category (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_options(p)
    p.set_defaults(func=run)


def _batches(split, batch_size):
    for start in range(0, len(split), batch_size):
        recs = [split[i] for i in range(start, min(start + batch_size, len(split)))]
        yield recs


def _metric(fn, *args):
    try:
        return fn(*args)
    except ValueError:  # one class only (e.g. a scene without anomalous test frames)
        return None


def evaluate_category(model_factory, splits, cfg, *, heatmap_dir=None, heatmaps=4) -> dict:
    from patchcore_jax import metrics
    from patchcore_jax.data.images import preprocess_masks

    start = time.perf_counter()
    model = model_factory()
    train = splits["train"]
    model.fit(np.stack([r["image"] for r in recs]) for recs in _batches(train, cfg.batch_size))
    test = splits["test"]
    scores, maps, masks, labels, names, kinds = [], [], [], [], [], []
    shown = []
    for recs in _batches(test, cfg.batch_size):
        images = np.stack([r["image"] for r in recs])
        s, m = model.predict(images)
        scores.append(s)
        maps.append(m)
        masks.append(preprocess_masks(np.stack([r["mask"] for r in recs]), resize=cfg.resize, crop=cfg.crop))
        labels += [int(r["label"]) for r in recs]
        names += [r["name"] for r in recs]
        kinds += [r["kind"] for r in recs]
        shown += [(r["name"], r["image"]) for r in recs]
    scores, maps, masks, labels = np.concatenate(scores), np.concatenate(maps), np.concatenate(masks), np.array(labels)
    result = {
        "image_auroc": _metric(metrics.image_auroc, labels, scores),
        "pixel_auroc": _metric(metrics.pixel_auroc, masks, maps),
        "au_pro": _metric(metrics.au_pro, masks, maps),
        "n_train": len(train),
        "n_test": len(test),
        "n_anomalous": int(labels.sum()),
        "bank_size": int(model.bank.shape[0]),
        "seconds": round(time.perf_counter() - start, 1),
        "scores": [{"name": n, "kind": k, "label": int(l), "score": float(s)} for n, k, l, s in zip(names, kinds, labels, scores)],
    }
    if heatmap_dir and heatmaps:
        from patchcore_jax.cli import _cropped, _save_overlays

        bad, good = np.nonzero(labels == 1)[0], np.nonzero(labels == 0)[0]
        pick = list(bad[: heatmaps - heatmaps // 2]) + list(good[: heatmaps // 2])
        pick = sorted(pick)[:heatmaps]
        if pick:
            imgs = _cropped(np.stack([shown[i][1] for i in pick]), cfg)
            safe = ["".join(c if c.isalnum() or c in "-_" else "_" for c in names[i]) for i in pick]
            _save_overlays(heatmap_dir, safe, imgs, maps[pick], masks[pick], vmin=float(maps.min()), vmax=float(maps.max()))
    return result


def run(args) -> int:
    from patchcore_jax.cli import RANDOM_BACKBONE_NOTE, UsageError, _config_from_args, _write_json
    from patchcore_jax.data import datasets
    from patchcore_jax.model import PatchCore

    overrides = {}
    if args.dataset == "mstc" and args.crop is None:
        overrides["crop"] = 256  # mSTC protocol: frames at 256 x 256, no crop
    cfg = _config_from_args(args, **overrides)
    if args.source == "tfds":
        import tensorflow_datasets as tfds

        from patchcore_jax.data import tfds_builders

        if args.quiet:
            tfds.disable_progress_bar()
        if cfg.resize != tfds_builders.RESIZE:
            raise UsageError(f"--resize {cfg.resize}: TFDS preparations are stored at {tfds_builders.RESIZE}; use --source folder")
    categories = datasets.load_categories(args.dataset, args.root, args.categories)
    if cfg.weights is None:
        print(RANDOM_BACKBONE_NOTE)
    os.makedirs(os.path.join(args.out, "categories"), exist_ok=True)
    settings = {"dataset": args.dataset, "root": os.path.abspath(args.root), "config": json.loads(cfg.to_json())}

    def factory():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            return PatchCore(cfg, progress=not args.quiet)

    per_category = {}
    for i, cat in enumerate(categories, 1):
        out_file = os.path.join(args.out, "categories", f"{cat.name}.json")
        if os.path.isfile(out_file):
            with open(out_file) as f:
                previous = json.load(f)
            if previous.get("settings") == settings:
                per_category[cat.name] = previous["result"]
                print(f"[{i}/{len(categories)}] {cat.name}: done before, kept ({out_file})")
                continue
        if args.source == "tfds":
            from patchcore_jax.data import tfds_builders

            splits = tfds_builders.prepared_splits(args.dataset, cat.name, root=args.root,
                                                   data_dir=args.tfds_dir or os.path.join(args.out, "tfds"))
        else:
            splits = {s: datasets.FolderSplit(getattr(cat, s), size=cfg.resize, squash=cat.squash) for s in ("train", "test")}
        result = evaluate_category(factory, splits, cfg, heatmap_dir=os.path.join(args.out, "heatmaps", cat.name),
                                   heatmaps=args.heatmaps)
        _write_json(out_file, {"settings": settings, "result": result})
        per_category[cat.name] = result
        print(f"[{i}/{len(categories)}] {cat.name}: image AUROC {_fmt(result['image_auroc'])}  pixel AUROC "
              f"{_fmt(result['pixel_auroc'])}  AU-PRO {_fmt(result['au_pro'])}  ({result['seconds']} s)")

    keys = ("image_auroc", "pixel_auroc", "au_pro")
    mean = {}
    for k in keys:
        values = [r[k] for r in per_category.values() if r[k] is not None]
        mean[k] = float(np.mean(values)) if values else None
    report = {
        **settings,
        "pretrained_backbone": cfg.weights is not None,
        "mean": mean,
        "categories": {n: {k: v for k, v in r.items() if k != "scores"} for n, r in per_category.items()},
    }
    _write_json(os.path.join(args.out, "results.json"), report)
    tmp = os.path.join(args.out, "results.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", *keys, "n_train", "n_test", "n_anomalous", "bank_size"])
        for n, r in per_category.items():
            w.writerow([n, *(r[k] for k in keys), r["n_train"], r["n_test"], r["n_anomalous"], r["bank_size"]])
        w.writerow(["mean", *(mean[k] for k in keys), "", "", "", ""])
    os.replace(tmp, os.path.join(args.out, "results.csv"))
    print(f"mean over {len(per_category)} categories: image AUROC {_fmt(mean['image_auroc'])}  pixel AUROC "
          f"{_fmt(mean['pixel_auroc'])}  AU-PRO {_fmt(mean['au_pro'])}; wrote {os.path.join(args.out, 'results.json')}")
    return 0


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"
