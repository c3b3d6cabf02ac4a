"""The commands of `patchcore-jax` (`cli` parses the arguments and calls one of these)."""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np

from patchcore_jax._src.app.console import (
    UsageError, check_bank_size, check_memory, config_from_args, configs_from_args, list_checked, new_model,
    plural, progress_for, random_backbone_note, say,
)


# -- demo -----------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from patchcore_jax._src.stages import metrics
    from patchcore_jax._src.app import visualize
    from patchcore_jax._src.io.data.synthetic import make_synthetic
    from patchcore_jax._src.app.diagnostics import reference_agreement
    from patchcore_jax._src.io.outputs import OutputDir

    start = time.perf_counter()
    for option, value in (("--train", args.train), ("--test-good", args.test_good), ("--test-defect", args.test_defect)):
        if value < 1:
            raise UsageError(f"{option} {value}: expected at least 1 image")
    cfg = config_from_args(args)
    OutputDir.check(args.out, "demo")
    model = new_model(cfg, quiet=args.quiet)
    check_bank_size(model, max(1, args.train - args.train // 5))
    check_memory(model, args.train)
    out = OutputDir.claim(args.out, "demo")
    say(f"patchcore-jax demo: synthetic defects (scratch, spot, missing piece, colour change), backbone {cfg.backbone}, "
         f"coreset {cfg.coreset_fraction:.0%}, Eq. 7 with b={cfg.num_neighbors}")
    if cfg.weights is None:
        say(random_backbone_note(cfg))
    data = make_synthetic(seed=args.data_seed, n_train=args.train, n_test_good=args.test_good, n_test_defect=args.test_defect)
    model.fit(data["train"][: max(1, args.train - args.train // 5)])
    held = data["train"][max(1, args.train - args.train // 5):]
    say(f"memory bank: {model.num_patches_seen} patches -> coreset of {model.bank.shape[0]} x {model.bank.shape[1]}")
    if len(held):
        model.calibrate(held)
        say(f"thresholds from {plural(len(held), 'held-out good image')}: image {model.threshold:.4g}, pixel "
             f"{model.pixel_threshold.value:.4g}")
    preds = list(model.predict_iter(data["test"]))
    scores, maps = np.array([p.score for p in preds]), np.stack([p.anomaly_map for p in preds])
    masks = cfg.image_geometry.masks(data["masks"])
    results = {
        "image_auroc": metrics.image_auroc(data["labels"], scores),
        "pixel_auroc": metrics.pixel_auroc(masks, maps),
        "au_pro": metrics.au_pro(masks, maps),
    }
    say(f"image AUROC {results['image_auroc']:.4f}   pixel AUROC {results['pixel_auroc']:.4f}   "
         f"AU-PRO (FPR <= 0.3) {results['au_pro']:.4f}")
    agreement = reference_agreement(model, data["train"], data["test"][-4:])
    say(f"JAX vs float64 NumPy reference on the same backbone features ({agreement['images']['train']} train, "
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
                                                        name=names[i], decision=model.decide(preds[i].score, maps[i])))
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
    say(f"wrote {out.path('results.json')} and {len(shown)} heatmaps in {out.path('heatmaps')} ({summary['seconds']} s)")
    return 0


# -- fit / predict --------------------------------------------------------------------------------------
def _validation_set(folder, cfg, *, exclude):
    """A labelled folder in MVTec AD's layout: `good/` holds nominal images, every other sub-folder
    defective ones; masks in `ground_truth/<kind>/<name>_mask.png` beside or inside it (a category
    folder with `test/` and `ground_truth/` is taken too). Every image and mask is checked now."""
    from patchcore_jax._src.io.data.datasets import labelled_folder, validation_layout
    from patchcore_jax._src.model.images import check_image, display

    try:
        test, gt = validation_layout(folder)
        paths, labels, masks = labelled_folder(folder)
    except ValueError as err:
        raise UsageError(f"--validation {err}") from None
    list_checked(paths, cfg, what="validation images", exclude=exclude)
    for image, mask in zip(paths, masks or []):
        if mask is not None:
            try:
                size = check_image(mask)
            except ValueError as err:
                raise UsageError(f"--validation {err}") from None
            if size != check_image(image):
                raise UsageError(f"--validation {display(mask)}: a {size[1]}x{size[0]} mask for the "
                                 f"{check_image(image)[1]}x{check_image(image)[0]} image {display(image)}")
    if labels.all() or not labels.any():
        raise UsageError(f"--validation {display(test)}: expected good/ and at least one defect folder, with images "
                         "in both")
    kinds = sorted({os.path.basename(os.path.dirname(p)) for p, l in zip(paths, labels) if l})
    say(f"validation: {plural(int((~labels.astype(bool)).sum()), 'good image')} and "
        f"{plural(int(labels.sum()), 'defective image')} ({', '.join(kinds)}) in {display(test)}; "
        + (f"masks from {display(gt)}" if gt else "no ground_truth/ folder: image threshold only"))
    return paths, labels, masks


def cmd_fit(args) -> int:
    from patchcore_jax._src.io import model_files as persistence
    from patchcore_jax._src.model.images import check_image, read_mask
    from patchcore_jax._src.model.detector import check_quantile

    cfgs = configs_from_args(args)
    cfg = cfgs[0]  # the geometry all members share
    try:
        check_quantile(args.quantile)
    except ValueError:
        raise UsageError(f"--quantile {args.quantile}: expected a number in [0, 1]") from None
    if not 0.0 <= args.held_out < 1.0:
        raise UsageError(f"--held-out {args.held_out}: expected a fraction in [0, 1)")
    persistence.check_target(args.out)
    out_abs = os.path.abspath(args.out)
    paths = list_checked(args.train, cfg, what="training images", exclude=[out_abs])
    held = list_checked(args.threshold_from, cfg, what="held-out images", exclude=[out_abs]) if args.threshold_from else []
    validation = _validation_set(args.validation, cfg, exclude=[out_abs]) if args.validation else None
    model = new_model(cfgs, quiet=args.quiet)
    check_bank_size(model, len(paths))
    check_memory(model, len(paths))
    if any(c.weights is None for c in cfgs):
        say(random_backbone_note(cfgs), sys.stderr)
    if held or validation is not None or args.held_out == 0:
        model.fit(paths)
    else:
        done = model.fit_calibrated(paths, held_out=args.held_out, quantile=args.quantile)
        if done["held_out"]:
            say(f"default thresholds from the training images ({model.image_threshold.rule}): image "
                f"{model.threshold:.6g}, pixel {model.pixel_threshold.value:.6g}; --threshold-from or --validation "
                "set better ones")
        else:
            say(f"no image threshold: {plural(len(paths), 'training image')} are too few to hold any out; give "
                "--threshold-from or --validation (predict gives no verdict without one)", sys.stderr)
    if held:
        model.calibrate(held, quantile=args.quantile)
        say(f"thresholds from {plural(len(held), 'held-out good image')} (quantile {args.quantile}): image {model.threshold:.6g}, "
             f"pixel {model.pixel_threshold.value:.6g}")
    if validation is not None:
        paths_v, labels_v, masks_v = validation
        masks = None if masks_v is None else [np.zeros(check_image(p), np.uint8) if m is None else read_mask(m)
                                              for p, m in zip(paths_v, masks_v)]
        report = model.calibrate_f1(paths_v, labels_v, masks, mask_rule=args.mask_rule)
        for kind in ("image", "pixel"):
            if kind in report:
                r = report[kind]
                say(f"{kind} threshold {r['threshold']:.6g}, F1-optimal on {len(paths_v)} validation images: "
                     f"precision {r['precision']:.3f}, recall {r['recall']:.3f}, F1 {r['f1']:.3f}")
    model.save(args.out)
    say(f"fitted on {plural(len(paths), 'image')}: {model.describe()}; saved {args.out}")
    return 0


def cmd_predict(args) -> int:
    from patchcore_jax._src.app import memory, records, visualize
    from patchcore_jax._src.model.images import display, read_image
    from patchcore_jax._src.model.detector import Threshold, check_threshold
    from patchcore_jax._src.io.outputs import OutputDir, csv_text
    from patchcore_jax._src.api.loading import load

    started = time.perf_counter()
    given = {}
    for option, value in (("--threshold", args.threshold), ("--pixel-threshold", args.pixel_threshold)):
        try:
            given[option] = check_threshold(value)
        except ValueError:
            raise UsageError(f"{option} {value}: expected a finite number") from None
    out_abs = OutputDir.check(args.out, "predict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        model = load(args.model, progress=progress_for(args.quiet))
    skipped = [] if args.skip_unreadable else None
    paths = list_checked(args.images, model.config, what="images", exclude=[out_abs], skipped=skipped)
    for path, reason in skipped or []:
        say(f"patchcore-jax predict: skipped {reason}" if display(path) in reason
            else f"patchcore-jax predict: skipped {display(path)}: {reason}", sys.stderr)
    if not paths:
        raise UsageError(f"{' '.join(display(p) for p in args.images)}: none of the {plural(len(skipped), 'image')} "
                         "could be read")
    memory.check_predict(model)
    if given["--threshold"] is not None:
        model.threshold = given["--threshold"]
    if given["--pixel-threshold"] is not None:
        model.pixel_threshold = Threshold(given["--pixel-threshold"], "manual")
    if any(c.weights is None for c in getattr(model, "configs", [model.config])):
        say("NOTE: this model was fitted with a randomly initialised backbone (no --weights); its scores are weak.",
             sys.stderr)
    if model.threshold is None:
        say("NOTE: this model has no image threshold, so there is no verdict (blank anomalous column); refit with "
            "--threshold-from, --validation or the default held-out fold, or pass --threshold", sys.stderr)
    out = OutputDir.claim(out_abs, "predict")
    names = records.output_names(paths)
    scale = model.color_scale()
    above = 0
    with out.open_rows("scores.csv", ["path", "score", "normalized_score", "anomalous", "heatmap"]) as table:
        for pred, path, rel in zip(model.predict_iter(paths), paths, names):
            amap, image = pred.anomaly_map, pred.crop
            if args.full_frame:
                amap, image = model.frame_map(pred.anomaly_map, pred.size), read_image(path)
            decision = model.decide(pred.score, amap)
            label = "" if decision.anomalous is None else int(decision.anomalous)
            above += label == 1
            norm = model.normalized_scores([pred.score])
            heatmap = None if args.no_heatmaps else os.path.join("heatmaps", rel + ".png")
            # An image's files first, its row after them: a run stopped in between (Ctrl-C, a full
            # disk) never leaves a row that points at a file not written.
            if heatmap is not None:
                out.write(heatmap, lambda tmp, p=pred, a=amap, im=image, n=display(path), d=decision:
                          visualize.draw_panel(tmp, image=im, amap=a, scale=scale, score=p.score,
                                               image_threshold=model.threshold, name=n, decision=d))
            if args.save_maps:
                out.write(os.path.join("maps", rel + ".npy"), lambda tmp, a=amap: visualize.save_npy(tmp, a))
            if args.save_masks:
                out.write(os.path.join("masks", rel + ".png"),
                          lambda tmp, m=decision.region: visualize.save_mask_png(tmp, m))
            table.write([csv_text(display(path)), repr(pred.score), "" if norm is None else f"{norm[0]:.6f}", label,
                             "" if heatmap is None else csv_text(display(heatmap))])
    written = [w for w, on in (("heatmaps", not args.no_heatmaps), ("maps", args.save_maps), ("masks", args.save_masks)) if on]
    counts = {"images": len(paths) + len(skipped or []), "scored": len(paths), "skipped": len(skipped or []),
              "anomalous": None if model.threshold is None else int(above)}
    out.write_json("run.json", records.run_record(model=model, model_path=args.model, args=args, counts=counts,
                                                  skipped=skipped or [], outputs=["scores.csv", *written],
                                                  started=started))
    say(f"scored {plural(len(paths), 'image')}: {out.path('scores.csv')}" + "".join(f", {out.path(w)}" for w in written)
        + f"; run record {out.path('run.json')}")
    if model.threshold is not None:
        say(f"{above} above the image threshold {model.threshold:.6g} ({model.image_threshold.rule})")
    if skipped:
        say(f"patchcore-jax predict: skipped {plural(len(skipped), 'unreadable file')} (listed above and in "
            f"{out.path('run.json')}); exit status 3", sys.stderr)
        return 3
    return 0


# -- evaluate -------------------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from patchcore_jax._src.app import evaluate, memory
    from patchcore_jax._src.io.data import datasets
    from patchcore_jax._src.io.outputs import OutputDir

    if args.heatmaps < 0:
        raise UsageError(f"--heatmaps {args.heatmaps}: expected an integer >= 0")
    cfgs = [evaluate.protocol_config(args.dataset, c, crop_given=args.crop is not None) for c in configs_from_args(args)]
    cfg = cfgs if len(cfgs) > 1 else cfgs[0]
    if args.source == "tfds":
        import tensorflow_datasets as tfds

        if args.quiet:
            tfds.disable_progress_bar()
    OutputDir.check(args.out, "evaluate")  # a folder in use: refused before the data set is read
    categories = datasets.load_categories(args.dataset, args.root, args.categories)
    if not args.overwrite:  # refused before a model is built for the memory estimate
        evaluate.check_other_settings(args.out, categories, evaluate.run_settings(
            args.dataset, cfgs, mask_rule=args.mask_rule, source=args.source))
    memory.check_evaluate(new_model(cfg, quiet=True), categories)
    if any(c.weights is None for c in cfgs):
        say(random_backbone_note(cfgs))
    report = evaluate.evaluate(args.dataset, args.root, cfg, out=args.out, categories=args.categories,
                               source=args.source, tfds_dir=args.tfds_dir, heatmaps=args.heatmaps,
                               mask_rule=args.mask_rule, progress=progress_for(args.quiet), log=say,
                               save_models=args.save_models, overwrite=args.overwrite)
    mean = report["mean"]
    say(f"mean over {len(report['categories'])} categories: image AUROC {evaluate.fmt(mean['image_auroc'])}  pixel AUROC "
         f"{evaluate.fmt(mean['pixel_auroc'])}  AU-PRO {evaluate.fmt(mean['au_pro'])}; "
         f"wrote {os.path.join(args.out, 'results.json')}")
    return 0


# -- sweep ----------------------------------------------------------------------------------------------
def cmd_sweep(args) -> int:
    from patchcore_jax._src.app import evaluate, memory, sweep, sweep_run

    if not args.grid:
        raise UsageError("--grid: give at least one KEY=V1,V2 (e.g. --grid coreset_fraction=0.01,0.1)")
    # Before any JAX work: every process of a cluster runs this same command (docs/sweep.md).
    sweep_run.join(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    import jax

    lead = jax.process_index() == 0  # only process 0 reports (and writes)
    tell = say if lead else (lambda message: None)
    cfg = evaluate.protocol_config(args.dataset, config_from_args(args), crop_given=args.crop is not None)
    start = time.perf_counter()
    if args.dry_run or jax.process_count() == 1:  # several processes check the plan together, in the sweep
        p = sweep.plan(args.dataset, args.root, cfg, grid=args.grid, seeds=args.seeds, categories=args.categories,
                       mask_rule=args.mask_rule, out=args.out)
        if args.dry_run:
            for line in [*sweep.describe_plan(p), memory.describe_sweep(memory.sweep_estimate(p))]:
                tell(line)
            return 0
        memory.check_sweep(p)
        if cfg.weights is None and any(u["done"] is None for u in p["units"]):
            tell(random_backbone_note(cfg))
    elif cfg.weights is None:
        tell(random_backbone_note(cfg))
    report = sweep_run.sweep(args.dataset, args.root, cfg, out=args.out, grid=args.grid, seeds=args.seeds,
                         categories=args.categories, mask_rule=args.mask_rule, remove_features=args.remove_features,
                         log=tell)
    processes = f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""
    tell(f"{report['ran']} units run{processes}, {report['kept']} kept from before "
         f"({time.perf_counter() - start:.1f} s); wrote {os.path.join(args.out, 'results.csv')} and "
         f"{os.path.join(args.out, 'table.md')}")
    return 0


# -- convert-weights ------------------------------------------------------------------------------------
def cmd_convert_weights(args) -> int:
    from patchcore_jax._src.model import weights

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
    say(f"wrote {args.output}: {len(state)} tensors")
    return 0


# -- export ---------------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from patchcore_jax._src.api.loading import load
    from patchcore_jax._src.io import export

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
        model = load(args.model, progress=progress_for(args.quiet))
    if hasattr(model, "members"):
        raise UsageError(f"{args.model}: an ensemble of {len(model.members)} members; export writes one model's program "
                         "(ensembles are not exported)")
    meta = model.export(args.out, format=args.format, batch=args.batch)
    b, c = meta["input"]["shape"][0], model.config.crop
    check = meta["verification"]
    say(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB): {args.format} program, input crops uint8 "
         f"({b}, {c}, {c}, 3), outputs scores ({b},) and maps ({b}, {c}, {c}); equal to the model's on "
         f"{check['crops']} test crops to {check['scores_max_rel_diff']:.1e} (scores) and "
         f"{check['maps_max_rel_diff']:.1e} (maps), max. rel. diff")
    return 0
