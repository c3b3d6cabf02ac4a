"""The `patchcore-jax` command line: the only place that parses arguments or prints.

Every argument and output location is validated before any work starts. Exit codes: 0 success; 2 bad
usage or bad input (one line naming the path or value given); 1 an unexpected failure (one line;
`--debug`, accepted in any position, shows the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
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
# Config fields as the options that set them, so errors name what the user typed.
OPTION_OF = {
    "backbone": "--backbone", "weights": "--weights", "resize": "--resize", "crop": "--crop",
    "coreset_fraction": "--coreset", "num_neighbors": "--neighbors", "seed": "--seed", "batch_size": "--batch-size",
    "projection_dim": "--projection-dim", "coreset_dtype": "--coreset-dtype", "geometry": "--geometry",
    "layers": "--layers", "target_dim": "--target-dim", "pretrain_dim": "--pretrain-dim", "search": "--search",
}


class UsageError(Exception):
    """Bad arguments or input: reported as one line, exit status 2."""


def _say(message: str, file=None) -> None:
    """Prints a line whatever bytes a path in it holds (undecodable bytes as \\xNN)."""
    from patchcore_jax.data.images import display

    file = file or sys.stdout
    print(display(message), file=file, flush=True)


def _version() -> str:
    from patchcore_jax import __version__

    return __version__


# -- shared argument handling ---------------------------------------------------------------------------
def _weights_spec(weights: str) -> str:
    """Checks a --weights value now (a file, or a name fetched or found in the Hub cache)."""
    from patchcore_jax import hub

    if hub.repo_of(weights) is not None:
        try:
            hub.resolve(weights)  # fetched (or found in the cache) now, before any work
        except ValueError as err:
            raise UsageError(f"--weights {err}") from None
        return weights
    if not os.path.isfile(weights):
        raise UsageError(f"--weights {weights}: no such file (nor a known name: an alias such as "
                         f"{', '.join(sorted(hub.ALIASES)[:4])}, ... or a Hub repository org/name)")
    if not weights.endswith((".safetensors", ".pth", ".pt", ".bin")):
        raise UsageError(f"--weights {weights}: expected a .safetensors or .pth state dict")
    return os.path.abspath(weights)


def _configs_from_args(args, **overrides) -> list:
    """One PatchCoreConfig per --backbone (an ensemble when repeated), with one --weights per backbone."""
    from patchcore_jax.config import PatchCoreConfig

    backbones = getattr(args, "backbone", None) or [None]
    weights = getattr(args, "weights", None) or [None] * len(backbones)
    if len(weights) != len(backbones):
        raise UsageError(f"--weights: give one per --backbone ({len(backbones)} backbones, {len(weights)} --weights)")
    if len(backbones) > 1 and getattr(args, "layers", None):
        raise UsageError("--layers: applies to a single --backbone; ensemble members use each backbone's natural taps")
    shared = {name: getattr(args, name) for name in OPTION_OF
              if name not in ("backbone", "weights") and getattr(args, name, None) is not None}
    shared.update(overrides)
    configs = []
    for backbone, weight in zip(backbones, weights):
        fields = dict(shared)
        if backbone is not None:
            fields["backbone"] = backbone
        if weight is not None:
            fields["weights"] = _weights_spec(weight)
        try:
            configs.append(PatchCoreConfig(**fields))
        except ValueError as err:
            field, _, rest = str(err).partition(": ")
            if field in OPTION_OF:
                raise UsageError(f"{OPTION_OF[field]}: {rest}") from None
            raise UsageError(str(err)) from None
    return configs


def _config_from_args(args, **overrides):
    configs = _configs_from_args(args, **overrides)
    if len(configs) > 1:
        raise UsageError(f"--backbone: patchcore-jax {args.command} takes one backbone, got {len(configs)}")
    return configs[0]


def _add_model_options(p, *, coreset_default=None):
    p.add_argument("--weights", action="append",
                   help="torchvision/timm state dict (.safetensors, or .pth with torch installed), or a name fetched "
                        "once through the Hugging Face cache: timm/wide_resnet50_2.tv_in1k, or an alias (wrn50, wrn101, "
                        "r18, r50, rx101, dn201, ...); one per --backbone")
    p.add_argument("--backbone", action="append",
                   help="torchvision name: resnet18/34/50/101, wide_resnet50_2/101_2, resnext50_32x4d, resnext101_32x8d, "
                        "densenet121/169/201 (default wide_resnet50_2); repeat it for an ensemble")
    p.add_argument("--layers", nargs="+", help="feature taps, finest first (default layer2 layer3; DenseNet: "
                                                "denseblock2 denseblock3)")
    p.add_argument("--coreset", dest="coreset_fraction", type=float, default=coreset_default,
                   help="coreset fraction, the paper's PatchCore-n%% (default 0.1)")
    p.add_argument("--resize", type=int, help="shorter side after resizing (default 256)")
    p.add_argument("--crop", type=int, help="centre crop size (default 224)")
    p.add_argument("--geometry", choices=("center_crop", "squash"),
                   help="center_crop (default: resize the shorter side, crop the centre) or squash (resize the "
                        "whole image to crop x crop)")
    p.add_argument("--neighbors", dest="num_neighbors", type=int, help="b of Eq. 7 (default 9; 1 = plain maximum)")
    p.add_argument("--target-dim", type=int, help="patch feature width after aggregation (default 1024; the published "
                                                   "ensembles use 384)")
    p.add_argument("--pretrain-dim", type=int, help="per-layer width before the final pooling (default 1024)")
    p.add_argument("--projection-dim", type=int, help="coreset projection width (default 128; 0 = none)")
    p.add_argument("--coreset-dtype", choices=("float32", "bfloat16"), help="storage of the projected bank")
    p.add_argument("--search", choices=("auto", "brute", "clustered"),
                   help="exact search index: clustered (prunes; fastest on a CPU), brute (for GPU/TPU), or auto "
                        "(default: by the backend the model runs on); the same results")
    p.add_argument("--batch-size", type=int, help="images per compiled step (default 8)")
    p.add_argument("--seed", type=int, help="seed of projection, start points and a random backbone (default 0)")


def _new_model(cfg, *, quiet: bool):
    """A PatchCore for one config, an ensemble for several."""
    from patchcore_jax.ensemble import PatchCoreEnsemble
    from patchcore_jax.model import PatchCore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        if isinstance(cfg, list):
            return PatchCore(cfg[0], progress=not quiet) if len(cfg) == 1 else PatchCoreEnsemble(cfg, progress=not quiet)
        return PatchCore(cfg, progress=not quiet)


def _list_checked(paths, cfg, *, what: str, exclude=()):
    """Lists image files and reads every header now (mode, size, and the size after resizing), so a
    bad file stops the run before any work."""
    from patchcore_jax.data.images import check_image, display, list_images
    from patchcore_jax.preprocess import check_geometry

    found = list_images(paths, exclude=exclude)
    if not found:
        raise UsageError(f"{' '.join(display(p) for p in ([paths] if isinstance(paths, str) else paths))}: "
                         f"no {what} found (looked for .png, .jpg, .bmp, .tif, ... files; hidden files are skipped)")
    for p in found:
        h, w = check_image(p)
        check_geometry(h, w, resize=cfg.resize, crop=cfg.crop, geometry=cfg.geometry, name=display(p))
    return found


def _check_bank_size(model, num_images: int) -> None:
    size = model.bank_size_for(num_images)
    if size < model.config.num_neighbors:
        raise UsageError(f"--neighbors {model.config.num_neighbors}: {num_images} training images give a memory bank "
                         f"of {size} rows; use at most {size}, more images, or a larger --coreset")


# -- demo -----------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from patchcore_jax import metrics, visualize
    from patchcore_jax.data import make_synthetic
    from patchcore_jax.diagnostics import reference_agreement
    from patchcore_jax.outputs import OutputDir
    from patchcore_jax.preprocess import preprocess_masks

    start = time.perf_counter()
    for option, value in (("--train", args.train), ("--test-good", args.test_good), ("--test-defect", args.test_defect)):
        if value < 1:
            raise UsageError(f"{option} {value}: expected at least 1 image")
    cfg = _config_from_args(args)
    OutputDir.check(args.out, "demo")
    model = _new_model(cfg, quiet=args.quiet)
    _check_bank_size(model, max(1, args.train - args.train // 5))
    out = OutputDir.claim(args.out, "demo")
    _say(f"patchcore-jax demo: synthetic defects (scratch, spot, missing piece, colour change), backbone {cfg.backbone}, "
         f"coreset {cfg.coreset_fraction:.0%}, Eq. 7 with b={cfg.num_neighbors}")
    if cfg.weights is None:
        _say(RANDOM_BACKBONE_NOTE)
    data = make_synthetic(seed=args.data_seed, n_train=args.train, n_test_good=args.test_good, n_test_defect=args.test_defect)
    model.fit(data["train"][: max(1, args.train - args.train // 5)])
    held = data["train"][max(1, args.train - args.train // 5):]
    _say(f"memory bank: {model.num_patches_seen} patches -> coreset of {model.bank.shape[0]} x {model.bank.shape[1]}")
    if len(held):
        model.calibrate(held)
        _say(f"thresholds from {len(held)} held-out good image{'s' if len(held) != 1 else ''}: image {model.threshold:.4g}, pixel "
             f"{model.pixel_threshold.value:.4g}")
    preds = list(model.predict_iter(data["test"]))
    scores, maps = np.array([p.score for p in preds]), np.stack([p.anomaly_map for p in preds])
    masks = preprocess_masks(data["masks"], resize=cfg.resize, crop=cfg.crop, geometry=cfg.geometry)
    results = {
        "image_auroc": metrics.image_auroc(data["labels"], scores),
        "pixel_auroc": metrics.pixel_auroc(masks, maps),
        "au_pro": metrics.au_pro(masks, maps),
    }
    _say(f"image AUROC {results['image_auroc']:.4f}   pixel AUROC {results['pixel_auroc']:.4f}   "
         f"AU-PRO (FPR <= 0.3) {results['au_pro']:.4f}")
    agreement = reference_agreement(model, data["train"], data["test"][-4:])
    _say(f"JAX vs float64 NumPy reference on the same backbone features ({agreement['images']['train']} train, "
         f"{agreement['images']['test']} test images): image scores max rel. diff {agreement['image_scores_max_rel_diff']:.2e}, "
         f"maps {agreement['anomaly_maps_max_rel_diff']:.2e}, patch features {agreement['features_max_rel_diff']:.2e}, "
         f"coreset indices equal {agreement['coreset_same_indices']:.0%}")
    names = [f"test_{i:03d}_{k}" for i, k in enumerate(data["kinds"])]
    scale = model.color_scale()
    shown = list(range(0, len(names), max(1, len(names) // 12)))
    for i in shown:
        out.write(os.path.join("heatmaps", f"{names[i]}.png"),
                  lambda tmp, i=i: visualize.draw_panel(tmp, image=preds[i].crop, amap=maps[i], mask=masks[i], scale=scale,
                                                        score=preds[i].score, image_threshold=model.threshold,
                                                        name=names[i]))
    summary = {
        "dataset": "synthetic",
        "pretrained_backbone": cfg.weights is not None,
        "config": cfg.to_dict(),
        "metrics": results,
        "reference_agreement": agreement,
        "images": [{"name": n, "label": int(l), "score": float(s)} for n, l, s in zip(names, data["labels"], scores)],
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.write_json("results.json", summary)
    _say(f"wrote {out.path('results.json')} and {len(shown)} heatmaps in {out.path('heatmaps')} ({summary['seconds']} s)")
    return 0


# -- fit / predict --------------------------------------------------------------------------------------
def _validation_set(folder, cfg, *, exclude):
    """A labelled folder: `good/` holds nominal images, every other sub-folder defective ones; masks,
    when the folder has `ground_truth/<kind>/<name>_mask.png` (MVTec's layout), for every defect."""
    from patchcore_jax.data.datasets import labelled_folder

    paths, labels, masks = labelled_folder(folder)
    _list_checked(paths, cfg, what="validation images", exclude=exclude)
    if labels.all() or not labels.any():
        raise UsageError(f"--validation {folder}: expected good/ and at least one defect folder, with images in both")
    return paths, labels, masks


def cmd_fit(args) -> int:
    from patchcore_jax import persistence
    from patchcore_jax.data.images import check_image, read_mask
    from patchcore_jax.model import check_quantile

    cfgs = _configs_from_args(args)
    cfg = cfgs[0]  # the geometry all members share
    try:
        check_quantile(args.quantile)
    except ValueError:
        raise UsageError(f"--quantile {args.quantile}: expected a number in [0, 1]") from None
    persistence.check_target(args.out)
    out_abs = os.path.abspath(args.out)
    paths = _list_checked(args.train, cfg, what="training images", exclude=[out_abs])
    held = _list_checked(args.threshold_from, cfg, what="held-out images", exclude=[out_abs]) if args.threshold_from else []
    validation = _validation_set(args.validation, cfg, exclude=[out_abs]) if args.validation else None
    model = _new_model(cfgs, quiet=args.quiet)
    _check_bank_size(model, len(paths))
    if any(c.weights is None for c in cfgs):
        _say(RANDOM_BACKBONE_NOTE, sys.stderr)
    model.fit(paths)
    if held:
        model.calibrate(held, quantile=args.quantile)
        _say(f"thresholds from {len(held)} held-out good images (quantile {args.quantile}): image {model.threshold:.6g}, "
             f"pixel {model.pixel_threshold.value:.6g}")
    if validation is not None:
        paths_v, labels_v, masks_v = validation
        masks = None if masks_v is None else [np.zeros(check_image(p), np.uint8) if m is None else read_mask(m)
                                              for p, m in zip(paths_v, masks_v)]
        report = model.calibrate_f1(paths_v, labels_v, masks, mask_rule=args.mask_rule)
        for kind in ("image", "pixel"):
            if kind in report:
                r = report[kind]
                _say(f"{kind} threshold {r['threshold']:.6g}, F1-optimal on {len(paths_v)} validation images: "
                     f"precision {r['precision']:.3f}, recall {r['recall']:.3f}, F1 {r['f1']:.3f}")
    model.save(args.out)
    _say(f"fitted on {len(paths)} images: {model.describe()}; saved {args.out}")
    return 0


def cmd_predict(args) -> int:
    from patchcore_jax import visualize
    from patchcore_jax.data.images import display, read_image
    from patchcore_jax.model import Threshold, check_threshold
    from patchcore_jax.outputs import OutputDir
    from patchcore_jax.persistence import load

    given = {}
    for option, value in (("--threshold", args.threshold), ("--pixel-threshold", args.pixel_threshold)):
        try:
            given[option] = check_threshold(value)
        except ValueError:
            raise UsageError(f"{option} {value}: expected a finite number") from None
    out_abs = OutputDir.check(args.out, "predict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        model = load(args.model, progress=not args.quiet)
    paths = _list_checked(args.images, model.config, what="images", exclude=[out_abs])
    if given["--threshold"] is not None:
        model.threshold = given["--threshold"]
    if given["--pixel-threshold"] is not None:
        model.pixel_threshold = Threshold(given["--pixel-threshold"], "manual")
    if any(c.weights is None for c in getattr(model, "configs", [model.config])):
        _say("NOTE: this model was fitted with a randomly initialised backbone (no --weights); its scores are weak.",
             sys.stderr)
    out = OutputDir.claim(out_abs, "predict")
    names = _mirrored_names(paths)
    scale = model.color_scale()
    above = 0
    with out.open_stream("scores.csv") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score", "normalized_score", "anomalous", "heatmap"])
        for pred, path, rel in zip(model.predict_iter(paths), paths, names):
            label = "" if model.threshold is None else int(pred.score > model.threshold)
            above += label == 1
            norm = model.normalized_scores([pred.score])
            heatmap = None if args.no_heatmaps else os.path.join("heatmaps", rel + ".png")
            writer.writerow([display(path), repr(pred.score), "" if norm is None else f"{norm[0]:.6f}", label,
                             "" if heatmap is None else display(heatmap)])
            amap, image = pred.anomaly_map, pred.crop
            if args.full_frame:
                amap, image = model.frame_map(pred.anomaly_map, pred.size), read_image(path)
            if heatmap is not None:
                out.write(heatmap, lambda tmp, p=pred, a=amap, im=image, n=display(path): visualize.draw_panel(
                    tmp, image=im, amap=a, scale=scale, score=p.score, image_threshold=model.threshold, name=n))
            if args.save_maps:
                out.write(os.path.join("maps", rel + ".npy"), lambda tmp, a=amap: visualize.save_npy(tmp, a))
            if args.save_masks:
                predicted = np.nan_to_num(amap, nan=-np.inf) > model.pixel_threshold.value
                out.write(os.path.join("masks", rel + ".png"), lambda tmp, m=predicted: visualize.save_mask_png(tmp, m))
    written = [w for w, on in (("heatmaps", not args.no_heatmaps), ("maps", args.save_maps), ("masks", args.save_masks)) if on]
    _say(f"scored {len(paths)} images: {out.path('scores.csv')}" + "".join(f", {out.path(w)}" for w in written))
    if model.threshold is not None:
        _say(f"{above} above the image threshold {model.threshold:.6g} ({model.image_threshold.rule})")
    return 0


def _mirrored_names(paths: list[str]) -> list[str]:
    """Output names mirroring the inputs' paths relative to their common folder: distinct inputs get
    distinct names (`a/b.png` and `a_b.png` stay apart; `x.png` and `x.jpg` keep their suffixes)."""
    absolute = [os.path.abspath(p) for p in paths]
    base = os.path.commonpath(absolute) if len(set(absolute)) > 1 else os.path.dirname(absolute[0])
    if base in absolute:  # one file given twice
        base = os.path.dirname(base)
    return [os.path.relpath(p, base) for p in absolute]


# -- evaluate -------------------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from patchcore_jax import evaluate

    if args.heatmaps < 0:
        raise UsageError(f"--heatmaps {args.heatmaps}: expected an integer >= 0")
    cfgs = [evaluate.protocol_config(args.dataset, c, crop_given=args.crop is not None) for c in _configs_from_args(args)]
    cfg = cfgs if len(cfgs) > 1 else cfgs[0]
    if args.source == "tfds":
        import tensorflow_datasets as tfds

        if args.quiet:
            tfds.disable_progress_bar()
    if any(c.weights is None for c in cfgs):
        _say(RANDOM_BACKBONE_NOTE)
    report = evaluate.evaluate(args.dataset, args.root, cfg, out=args.out, categories=args.categories,
                               source=args.source, tfds_dir=args.tfds_dir, heatmaps=args.heatmaps,
                               mask_rule=args.mask_rule, progress=not args.quiet, log=_say)
    mean = report["mean"]
    _say(f"mean over {len(report['categories'])} categories: image AUROC {evaluate.fmt(mean['image_auroc'])}  pixel AUROC "
         f"{evaluate.fmt(mean['pixel_auroc'])}  AU-PRO {evaluate.fmt(mean['au_pro'])}; "
         f"wrote {os.path.join(args.out, 'results.json')}")
    return 0


# -- convert-weights ------------------------------------------------------------------------------------
def cmd_convert_weights(args) -> int:
    from patchcore_jax import weights

    if not args.output.endswith(".safetensors"):
        raise UsageError(f"{args.output}: the output must end in .safetensors")
    if os.path.lexists(args.output):
        raise UsageError(f"{args.output}: exists; refusing to overwrite it (give a new file name)")
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{args.output}: its folder {parent} does not exist or is not writable")
    state = weights.read_state_dict(args.input)
    tmp = f"{args.output}.tmp-{os.getpid()}"
    try:
        weights.save_safetensors(state, tmp)
        os.link(tmp, args.output)  # fails, rather than overwrite, if the name appeared meanwhile
    except FileExistsError:
        raise UsageError(f"{args.output}: exists; refusing to overwrite it") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _say(f"wrote {args.output}: {len(state)} tensors")
    return 0


# -- export ---------------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from patchcore_jax import export
    from patchcore_jax.persistence import load

    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch {args.batch}: expected an integer >= 1")
    try:
        export.check_destination(args.out)
    except ValueError as err:
        raise UsageError(f"--out {err}") from None
    missing = export.missing_onnx_packages() if args.format == "onnx" else []
    if missing:
        raise UsageError(f"--format onnx: needs {', '.join(missing)}; pip install 'patchcore-jax[export]'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        model = load(args.model, progress=not args.quiet)
    if hasattr(model, "members"):
        raise UsageError(f"{args.model}: an ensemble of {len(model.members)} members; export writes one model's program "
                         "(ensembles are not exported)")
    meta = model.export(args.out, format=args.format, batch=args.batch)
    b, c = meta["input"]["shape"][0], model.config.crop
    check = meta["verification"]
    _say(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB): {args.format} program, input crops uint8 "
         f"({b}, {c}, {c}, 3), outputs scores ({b},) and maps ({b}, {c}, {c}); equal to the model's on "
         f"{check['crops']} test crops to {check['scores_max_rel_diff']:.1e} (scores) and "
         f"{check['maps_max_rel_diff']:.1e} (maps), max. rel. diff")
    return 0


# -- the parser -----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (exit status 2) that point at --help."""

    def error(self, message):
        _say(f"{self.prog}: error: {message} (see {self.prog} --help)", sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of failures")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    parser = _Parser(prog="patchcore-jax", description="PatchCore anomaly detection in JAX.", parents=[common])
    parser.add_argument("--version", action="version", version=f"patchcore-jax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", parents=[common], help="fit and evaluate on an embedded synthetic defect set (no files needed)",
                       description="Makes a deterministic synthetic defect data set, fits, predicts, prints image AUROC, "
                                   "pixel AUROC and AU-PRO, checks the JAX numerics against the NumPy reference, and "
                                   "writes results.json and heatmap PNGs.")
    p.add_argument("--out", default="demo-out", help="output folder, new or an earlier demo's (default demo-out)")
    p.add_argument("--train", type=int, default=40, help="nominal training images (default 40)")
    p.add_argument("--test-good", type=int, default=16, help="good test images (default 16)")
    p.add_argument("--test-defect", type=int, default=24, help="defective test images (default 24)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    _add_model_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fit", parents=[common], help="build a model from a folder of defect-free images")
    p.add_argument("--train", required=True, help="folder (searched recursively) or image of defect-free images")
    p.add_argument("--out", required=True, help="model folder to write: new, empty, or an earlier model")
    p.add_argument("--threshold-from", help="folder of held-out good images: sets the image and pixel thresholds "
                                            "and the score scale from them")
    p.add_argument("--quantile", type=float, default=1.0,
                   help="quantile of the held-out good scores and map values (default 1.0 = max)")
    p.add_argument("--validation", help="labelled folder (good/ and defect sub-folders; masks in ground_truth/<kind>/"
                                        "<name>_mask.png when present): F1-optimal image (and pixel) thresholds")
    p.add_argument("--mask-rule", choices=("published", "half"), default="published",
                   help="validation masks after resizing: published (only 255 counts) or half (>= 128)")
    _add_model_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", parents=[common], help="score images with a fitted model")
    p.add_argument("--model", required=True, help="model folder written by fit")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder, new or an earlier predict's: scores.csv and heatmaps/")
    p.add_argument("--threshold", type=float, help="image threshold (overrides the model's)")
    p.add_argument("--pixel-threshold", type=float, help="pixel threshold: outlines and masks (overrides the model's)")
    p.add_argument("--no-heatmaps", action="store_true", help="no heatmap panels")
    p.add_argument("--save-maps", action="store_true", help="raw anomaly maps as float32 maps/<input>.npy")
    p.add_argument("--save-masks", action="store_true", help="predicted defect masks (map > pixel threshold) as "
                                                             "masks/<input>.png")
    p.add_argument("--full-frame", action="store_true",
                   help="maps, panels and masks at each image's original size, the region outside the crop marked "
                        "as not inspected (NaN in the .npy maps)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", parents=[common], help="fit and evaluate per category on MVTec AD, MTD or mSTC",
                       description="Runs the paper's protocol on a data set folder you provide (nothing is downloaded) "
                                   "and writes results.json, results.csv and a few heatmaps per category. Resumable: a "
                                   "category whose inputs and settings are unchanged is kept.")
    p.add_argument("--dataset", required=True, choices=("mvtec", "mtd", "mstc"))
    p.add_argument("--root", required=True, help="the data set's folder (see README for the layouts)")
    p.add_argument("--categories", nargs="+", help="categories (mSTC: scenes 01..12) to run; default all present")
    p.add_argument("--out", required=True, help="output folder, new or an earlier evaluate's")
    p.add_argument("--source", choices=("folder", "tfds"), default="folder",
                   help="read files directly, or through a TFDS array_record preparation (default folder)")
    p.add_argument("--tfds-dir", help="where TFDS preparations live (default OUT/tfds)")
    p.add_argument("--heatmaps", type=int, default=4, help="heatmap panels written per category (default 4)")
    p.add_argument("--mask-rule", choices=("published", "half"), default="published",
                   help="ground-truth pixels after resizing: published (only full 255 counts, as the published "
                        "code; default) or half (>= 128)")
    _add_model_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("convert-weights", parents=[common], help="convert a .pth state dict to .safetensors (needs torch once)")
    p.add_argument("input", help="torchvision/timm .pth state dict")
    p.add_argument("output", help="destination .safetensors (must not exist)")
    p.set_defaults(func=cmd_convert_weights)

    p = sub.add_parser("export", parents=[common], help="write a fitted model as one StableHLO or ONNX program",
                       description="Writes the model folder MODEL as one self-contained program (backbone weights, "
                                   "memory bank and settings inside): input uint8 crops (B, crop, crop, 3) prepared "
                                   "as the model prepares images, outputs image scores (B,) and anomaly maps (B, "
                                   "crop, crop). It is checked against the model before it is written.")
    p.add_argument("model", metavar="MODEL", help="model folder written by fit")
    p.add_argument("--format", required=True, choices=("stablehlo", "onnx"),
                   help="stablehlo (jax.export; runs with JAX alone on CPU, GPU, TPU) or onnx (needs "
                        "pip install 'patchcore-jax[export]')")
    p.add_argument("--out", required=True, help="the file to write (must not exist)")
    p.add_argument("--batch", type=int, help="fix the batch size (default: any batch)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)
    args.quiet = getattr(args, "quiet", False)
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        message = str(err).replace("\n", " ")
        _say(f"patchcore-jax {args.command}: error: {message}", sys.stderr)
        return 2
    except KeyboardInterrupt:
        _say("interrupted", sys.stderr)
        return 130
    except Exception as err:  # one line for users; --debug for the traceback
        if args.debug:
            raise
        message = str(err).replace("\n", " ")
        _say(f"patchcore-jax {args.command}: unexpected failure: {type(err).__name__}: {message} (rerun with --debug)",
             sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
