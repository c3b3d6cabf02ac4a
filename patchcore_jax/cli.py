"""The `patchcore-jax` command line: the only place that parses arguments or prints.

Exit codes: 0 success; 2 bad usage or bad input (one line naming the path or value); 1 an
unexpected failure (one line; `--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings

import numpy as np

RANDOM_BACKBONE_NOTE = (
    "NOTE: no --weights given, so the backbone is RANDOMLY initialised (not pretrained). PatchCore's accuracy "
    "comes from ImageNet features: expect far lower numbers than with pretrained weights. Fetch torchvision's "
    "IMAGENET1K_V1 wide_resnet50_2 (or timm's wide_resnet50_2.tv_in1k safetensors) and pass --weights FILE."
)


class UsageError(Exception):
    """Bad arguments or input: reported as one line, exit status 2."""


def _config_from_args(args, **overrides):
    from patchcore_jax.config import PatchCoreConfig

    fields = {}
    for name in ("backbone", "weights", "resize", "crop", "coreset_fraction", "num_neighbors", "seed", "batch_size",
                 "projection_dim", "coreset_dtype"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if fields.get("weights"):
        fields["weights"] = os.path.abspath(fields["weights"])
    fields.update(overrides)
    return PatchCoreConfig(**fields)


def _add_model_options(p, *, coreset_default=None):
    p.add_argument("--weights", help="torchvision/timm state dict (.safetensors, or .pth with torch installed)")
    p.add_argument("--backbone", help="torchvision ResNet name (default wide_resnet50_2)")
    p.add_argument("--coreset", dest="coreset_fraction", type=float, default=coreset_default,
                   help="coreset fraction, the paper's PatchCore-n%% (default 0.1)")
    p.add_argument("--resize", type=int, help="shorter side after resizing (default 256)")
    p.add_argument("--crop", type=int, help="centre crop size (default 224)")
    p.add_argument("--neighbors", dest="num_neighbors", type=int, help="b of Eq. 7 (default 9; 1 = plain maximum)")
    p.add_argument("--projection-dim", type=int, help="coreset projection width (default 128; 0 = none)")
    p.add_argument("--coreset-dtype", choices=("float32", "bfloat16"), help="storage of the projected bank")
    p.add_argument("--batch-size", type=int, help="images per compiled step (default 8)")
    p.add_argument("--seed", type=int, help="seed of projection, start points and a random backbone (default 0)")


def _save_overlays(out_dir, names, images, maps, masks, *, vmin, vmax, limit=None):
    from patchcore_jax import visualize

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for i, name in enumerate(names[:limit] if limit else names):
        path = os.path.join(out_dir, f"{name}.png")
        visualize.save_overlay(path, images[i], maps[i], None if masks is None else masks[i], vmin=vmin, vmax=vmax)
        written.append(path)
    return written


def _cropped(images, cfg):
    """uint8 images through the model's resize and crop (without normalisation), for overlays."""
    import jax.numpy as jnp

    from patchcore_jax.model import IMAGENET_MEAN, IMAGENET_STD, as_float_images, preprocess

    x = np.asarray(preprocess(jnp.asarray(as_float_images(images)), resize=cfg.resize, crop=cfg.crop))
    return np.round(np.clip(x * IMAGENET_STD + IMAGENET_MEAN, 0, 1) * 255).astype(np.uint8)


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


# -- demo ---------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from patchcore_jax import metrics
    from patchcore_jax.data import make_synthetic, preprocess_masks
    from patchcore_jax.model import PatchCore, reference_agreement

    start = time.perf_counter()
    cfg = _config_from_args(args)
    print(f"patchcore-jax demo: synthetic defects (scratch, spot, missing piece, colour change), backbone {cfg.backbone}, "
          f"coreset {cfg.coreset_fraction:.0%}, Eq. 7 with b={cfg.num_neighbors}")
    if cfg.weights is None:
        print(RANDOM_BACKBONE_NOTE)
    data = make_synthetic(seed=args.data_seed, n_train=args.train, n_test_good=args.test_good, n_test_defect=args.test_defect)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        model = PatchCore(cfg, progress=not args.quiet)
    model.fit(data["train"])
    print(f"memory bank: {model.num_patches_seen} patches -> coreset of {model.bank.shape[0]} x {model.bank.shape[1]}")
    scores, maps = model.predict(data["test"])
    masks = preprocess_masks(data["masks"], resize=cfg.resize, crop=cfg.crop)
    results = {
        "image_auroc": metrics.image_auroc(data["labels"], scores),
        "pixel_auroc": metrics.pixel_auroc(masks, maps),
        "au_pro": metrics.au_pro(masks, maps),
    }
    print(f"image AUROC {results['image_auroc']:.4f}   pixel AUROC {results['pixel_auroc']:.4f}   "
          f"AU-PRO (FPR <= 0.3) {results['au_pro']:.4f}")
    agreement = reference_agreement(model, data["train"], data["test"][-4:])
    print(f"JAX vs float64 NumPy reference on the same backbone features ({agreement['images']['train']} train, "
          f"{agreement['images']['test']} test images): image scores max rel. diff {agreement['image_scores_max_rel_diff']:.2e}, "
          f"maps {agreement['anomaly_maps_max_rel_diff']:.2e}, patch features {agreement['features_max_rel_diff']:.2e}, "
          f"coreset indices equal {agreement['coreset_same_indices']:.0%}")
    os.makedirs(args.out, exist_ok=True)
    names = [f"test_{i:03d}_{k}" for i, k in enumerate(data["kinds"])]
    vmin, vmax = float(np.min(maps)), float(np.max(maps))
    shown = list(range(0, len(names), max(1, len(names) // 12)))
    pngs = _save_overlays(os.path.join(args.out, "heatmaps"), [names[i] for i in shown], _cropped(data["test"][shown], cfg),
                          maps[shown], masks[shown], vmin=vmin, vmax=vmax)
    summary = {
        "dataset": "synthetic",
        "pretrained_backbone": cfg.weights is not None,
        "config": json.loads(cfg.to_json()),
        "metrics": results,
        "reference_agreement": agreement,
        "images": [{"name": n, "label": int(l), "score": float(s)} for n, l, s in zip(names, data["labels"], scores)],
        "seconds": round(time.perf_counter() - start, 1),
    }
    _write_json(os.path.join(args.out, "results.json"), summary)
    print(f"wrote {os.path.join(args.out, 'results.json')} and {len(pngs)} heatmaps in {os.path.join(args.out, 'heatmaps')} "
          f"({summary['seconds']} s)")
    return 0


# -- fit / predict ------------------------------------------------------------------------------------
def cmd_fit(args) -> int:
    from patchcore_jax.data.images import group_by_size, list_images
    from patchcore_jax.model import PatchCore

    paths = list_images(args.train)
    if not paths:
        raise UsageError(f"{args.train}: no images found (looked for .png, .jpg, .bmp, .tif)")
    cfg = _config_from_args(args)
    if cfg.weights is None:
        print(RANDOM_BACKBONE_NOTE, file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        model = PatchCore(cfg, progress=not args.quiet)
    model.fit(batch for _, batch in group_by_size(paths, cfg.batch_size))
    if args.threshold_from:
        held = list_images(args.threshold_from)
        scores, _ = model.predict(batch for _, batch in group_by_size(held, cfg.batch_size))
        model.fit_threshold(scores, quantile=args.quantile)
        print(f"threshold {model.threshold:.6g} from {len(held)} held-out good images (quantile {args.quantile})")
    model.save(args.out)
    print(f"fitted on {len(paths)} images: {model.num_patches_seen} patches -> bank {model.bank.shape[0]} x "
          f"{model.bank.shape[1]}; saved {args.out}")
    return 0


def cmd_predict(args) -> int:
    from patchcore_jax.data.images import group_by_size, list_images
    from patchcore_jax.model import PatchCore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        model = PatchCore.load(args.model, progress=not args.quiet)
    if model.config.weights is None:
        print(RANDOM_BACKBONE_NOTE, file=sys.stderr)
    paths = list_images(args.images)
    if not paths:
        raise UsageError(f"{' '.join(args.images)}: no images found")
    if args.threshold is not None:
        model.threshold = args.threshold
    os.makedirs(args.out, exist_ok=True)
    rows, all_maps, order = [], [], []
    for batch_paths, batch in group_by_size(paths, model.config.batch_size):
        scores, maps = model.predict(batch)
        labels = model.classify(scores) if model.threshold is not None else [None] * len(scores)
        for p, s, lab in zip(batch_paths, scores, labels):
            rows.append({"path": p, "score": float(s), "anomalous": None if lab is None else bool(lab)})
        names = [_safe_name(p) for p in batch_paths]
        all_maps.append((names, _cropped(batch, model.config), maps))
        order += batch_paths
    vmax = max(float(m.max()) for _, _, m in all_maps)
    vmin = min(float(m.min()) for _, _, m in all_maps)
    for names, imgs, maps in all_maps:
        _save_overlays(os.path.join(args.out, "heatmaps"), names, imgs, maps, None, vmin=vmin, vmax=vmax)
    with open(os.path.join(args.out, "scores.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "score", "anomalous"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "anomalous": "" if row["anomalous"] is None else int(row["anomalous"])})
    print(f"scored {len(rows)} images: {os.path.join(args.out, 'scores.csv')}, heatmaps in {os.path.join(args.out, 'heatmaps')}")
    if model.threshold is not None:
        print(f"{sum(bool(r['anomalous']) for r in rows)} above threshold {model.threshold:.6g}")
    return 0


def _safe_name(path: str) -> str:
    stem = os.path.splitext(os.path.relpath(path))[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("_.")


# -- convert-weights ----------------------------------------------------------------------------------
def cmd_convert_weights(args) -> int:
    from patchcore_jax import weights

    if not args.output.endswith(".safetensors"):
        raise UsageError(f"{args.output}: the output must end in .safetensors")
    state = weights.read_state_dict(args.input)
    weights.save_safetensors(state, args.output)
    print(f"wrote {args.output}: {len(state)} tensors")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchcore-jax", description="PatchCore anomaly detection in JAX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="fit and evaluate on an embedded synthetic defect set (no files needed)",
                       description="Makes a deterministic synthetic defect data set, fits, predicts, prints image AUROC, "
                                   "pixel AUROC and AU-PRO, checks the JAX numerics against the NumPy reference, and "
                                   "writes results.json and heatmap PNGs.")
    p.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--train", type=int, default=40, help="nominal training images (default 40)")
    p.add_argument("--test-good", type=int, default=16, help="good test images (default 16)")
    p.add_argument("--test-defect", type=int, default=24, help="defective test images (default 24)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fit", help="build a model from a folder of defect-free images")
    p.add_argument("--train", required=True, help="folder (searched recursively) or image of defect-free images")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--threshold-from", help="folder of held-out good images to set the decision threshold from")
    p.add_argument("--quantile", type=float, default=1.0, help="quantile of held-out good scores (default 1.0 = max)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="score images with a fitted model")
    p.add_argument("--model", required=True, help="model directory written by fit")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output directory: scores.csv and heatmaps/")
    p.add_argument("--threshold", type=float, help="decision threshold (overrides the model's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("convert-weights", help="convert a .pth state dict to .safetensors (needs torch once)")
    p.add_argument("input", help="torchvision/timm .pth state dict")
    p.add_argument("output", help="destination .safetensors")
    p.set_defaults(func=cmd_convert_weights)

    from patchcore_jax import evaluate as evaluate_cmd

    evaluate_cmd.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"patchcore-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for users; --debug for the traceback
        if args.debug:
            raise
        print(f"patchcore-jax {args.command}: unexpected failure: {type(err).__name__}: {err} (rerun with --debug)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
