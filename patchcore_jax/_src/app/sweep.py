"""`sweep`: the paper's ablations as one resumable run over features extracted once.

A sweep runs every cell of a grid (`app.sweep_grid`) with every seed on every category, each unit
evaluated as `evaluate` evaluates a category (the same metrics: `evaluate.category_result`), and writes
under its output folder S:
  results.csv          one row per category x cell x seed (`sweep_report.columns`)
  table.md             per metric, categories x cells, mean ± std over seeds, and the mean over categories
  plots/<metric>-<key>.png   each metric against each swept knob
  units/<category>/<fingerprint>.json   each finished unit, written atomically as it finishes
  features/            the backbone taps (`io.feature_store`), reused by every cell and later sweeps;
                       `remove_features=True` (`--remove-features`) deletes them at the end
Resuming: a unit's fingerprint covers its category's files (paths, sizes, modification times), its
configuration, the mask rule and its shots; a rerun keeps every unit whose fingerprint file exists and
computes the rest, so a run killed at any point (even `kill -9`) loses at most the units in flight, a
finished sweep returns at once, and changed data or settings recompute only the units they touch.
"""

from __future__ import annotations

import json
import os
import time

from patchcore_jax._src.app import evaluate as evaluate_lib
from patchcore_jax._src.app import sweep_grid, sweep_report
from patchcore_jax._src.io import feature_store
from patchcore_jax._src.io.data import datasets
from patchcore_jax._src.io.outputs import OutputDir
from patchcore_jax._src.model import preprocess
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.model.images import display
from patchcore_jax._src.stages.metrics import METRICS


def _unit_path(category: str, fingerprint: str) -> str:
    return os.path.join("units", category, f"{fingerprint[:32]}.json")


def _read_unit(path: str, fingerprint: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("fingerprint") == fingerprint and isinstance(data.get("result"), dict):
            return data
    except (OSError, ValueError):
        pass
    return None  # absent, or torn/corrupt: computed again


def plan(dataset: str, root: str, config: PatchCoreConfig | None, *, grid, seeds=(0,), categories=None,
         mask_rule: str = "published", out: str) -> dict:
    """Everything a sweep will do, checked before any work: the keys, cells, categories and units,
    each unit's fingerprint and whether it is already done. ValueError naming what is wrong."""
    base = config or PatchCoreConfig()
    if not isinstance(base, PatchCoreConfig):
        raise ValueError("config: expected a PatchCoreConfig (a sweep runs one backbone per cell)")
    if dataset not in datasets.DATASETS:
        raise ValueError(f"dataset: expected one of {datasets.DATASETS}, got {dataset!r}")
    if mask_rule not in preprocess.MASK_RULES:
        raise ValueError(f"mask rule: expected one of {preprocess.MASK_RULES}, got {mask_rule!r}")
    seeds = sweep_grid.check_seeds(seeds)
    cells = sweep_grid.expand(grid, base, seeds)
    keys = [k for k, _ in sweep_grid.normalise_grid(grid)]
    out = OutputDir.check(out, "sweep")
    cats = datasets.load_categories(dataset, root, categories)
    units = []
    for cat in cats:
        squash = cat.squash
        for cell in cells:
            for seed in seeds:
                cfg = cell.config(base, seed)
                if (cfg.geometry == "squash") != squash:
                    raise ValueError(f"geometry {cfg.geometry!r}: the {dataset} protocol uses "
                                     f"{'squash' if squash else 'center_crop'}")
                if cell.shots is not None and cell.shots > len(cat.train):
                    raise ValueError(f"--grid shots={cell.shots}: category {cat.name} has only {len(cat.train)} "
                                     "training images")
                settings = {"dataset": dataset, "config": cfg.to_dict(), "mask_rule": mask_rule, "shots": cell.shots}
                fingerprint = evaluate_lib.input_fingerprint(cat, settings)
                rel = _unit_path(cat.name, fingerprint)
                done = _read_unit(os.path.join(out, rel), fingerprint)
                units.append({"category": cat, "cell": cell, "seed": seed, "config": cfg, "fingerprint": fingerprint,
                              "rel": rel, "done": done})
    from patchcore_jax._src.app.sweep_cells import feature_key

    for cfg in {u["config"].replace(seed=0) for u in units if u["config"].weights is not None}:
        feature_key(cfg)  # resolves and hashes every weights file or name now (ValueError naming it)
    return {"keys": keys, "cells": cells, "seeds": seeds, "categories": cats, "units": units, "out": out,
            "base": base}


def describe_plan(p: dict) -> list[str]:
    """`--dry-run`'s lines: the cells, the units left, and what they reuse."""
    from patchcore_jax._src.app.sweep_cells import bank_group, feature_key, shares_prefix

    todo = [u for u in p["units"] if u["done"] is None]
    lines = [f"{len(p['cells'])} cells x {len(p['seeds'])} seeds x {len(p['categories'])} categories = "
             f"{len(p['units'])} units; {len(p['units']) - len(todo)} done before, {len(todo)} to run"]
    for i, cell in enumerate(p["cells"], 1):
        left = sum(1 for u in todo if u["cell"] is cell)
        lines.append(f"  cell {i}: {cell.label}  ({left} units to run)")
    keys = {}
    for u in todo:
        key = feature_key(u["config"])
        name = feature_store.key_name(key)
        keys.setdefault(name, (key, set()))[1].update(u["config"].layers)
    store = os.path.join(p["out"], feature_store.FOLDER)
    for name, (key, layers) in keys.items():
        there = os.path.isdir(os.path.join(store, name))
        lines.append(f"  backbone taps {name} ({'found on disk, reused where sealed' if there else 'extracted once'}): "
                     f"layers {'+'.join(sorted(layers))}; {feature_store.describe(key)}")
    groups = {}
    for u in todo:
        if shares_prefix(u["config"]):
            groups.setdefault((u["category"].name, bank_group(u["config"], u["cell"].shots)), []).append(u)
    shared = sum(len(g) - 1 for g in groups.values() if len(g) > 1)
    if shared:
        lines.append(f"  {shared} coresets are prefixes of a larger one (one greedy run per group of coreset fractions)")
    return lines


def row(u: dict) -> dict:
    """A finished unit's row of results.csv (`sweep_report.results_csv`)."""
    d = u["done"]
    return {"category": u["category"].name, "values": dict(u["cell"].values), "seed": u["seed"],
            "result": d["result"], "stages": d["stages"]}


def store_for(outdir: OutputDir | None, out: str | None = None):
    """The feature store of each key under the sweep's folder: written through `outdir`, or (None: a
    process other than process 0) read from `out`'s store and never written."""
    if outdir is None:
        return lambda key: feature_store.FeatureStore(os.path.join(out, feature_store.FOLDER), key, keep=False)
    root = outdir.path(feature_store.FOLDER)
    return lambda key: feature_store.FeatureStore(root, key, write=outdir.write)


def record(outdir: OutputDir, p: dict, units: list) -> None:
    """Writes finished units' files (each atomically) and results.csv with every unit finished so far."""
    for u in units:
        outdir.write_json(u["rel"], u["done"])
    done_units = [x for x in p["units"] if x["done"] is not None]
    outdir.write_text("results.csv", sweep_report.results_csv(p["keys"], [row(x) for x in done_units]))


def progress_line(u: dict, finished: int, total: int, start: float) -> str:
    """The log line of the `finished`-th of `total` units, with an estimate of the time left."""
    result = u["done"]["result"]
    eta = (time.perf_counter() - start) / finished * (total - finished)
    return (f"[{finished}/{total}] {u['category'].name} | {u['cell'].label} | seed {u['seed']}: image AUROC "
            f"{evaluate_lib.fmt(result['image_auroc'])}  pixel AUROC {evaluate_lib.fmt(result['pixel_auroc'])}  "
            f"AU-PRO {evaluate_lib.fmt(result['au_pro'])}  ({result['seconds']} s; about {_duration(eta)} left)")


def finish(outdir: OutputDir, p: dict, *, remove_features: bool, log) -> list:
    """Writes the reports of a sweep whose units are all done (and removes the feature store if
    asked); returns the rows."""
    rows = [row(u) for u in p["units"]]
    _write_reports(outdir, p, rows)
    if remove_features:
        n = feature_store.remove(outdir.path(feature_store.FOLDER))
        log(f"removed the feature store ({n} files) from {display(outdir.path(feature_store.FOLDER))}")
    return rows


def work_order(units: list) -> list:
    """`units` by category, and within a category by score group (first appearance): the order
    `compute` runs them in, so a contiguous block of it shares taps, coresets and searches."""
    from patchcore_jax._src.app.sweep_cells import score_group

    groups: dict = {}
    key = lambda u: groups.setdefault((u["category"].name, score_group(u["config"], u["cell"].shots)), len(groups))  # noqa: E731
    cats = {c.name: i for i, c in enumerate(dict.fromkeys(u["category"] for u in units))}
    return sorted(units, key=lambda u: (cats[u["category"].name], key(u)))


def compute(p: dict, todo: list, store_for, *, dataset: str, mask_rule: str):
    """Computes `todo`'s units on this process's default device, category by category, sharing taps,
    features, coresets and searches; yields each unit as it finishes, its `done` set (not written)."""
    from patchcore_jax._src.app.sweep_cells import CategoryWork, bank_group, feature_key, score_group, shares_prefix

    for cat in p["categories"]:
        units = [u for u in todo if u["category"] is cat]
        if not units:
            continue
        work = CategoryWork(dataset, cat, store_for=store_for, mask_rule=mask_rule)
        layers, largest, largest_k = {}, {}, {}
        for u in units:
            name = feature_store.key_name(feature_key(u["config"]))
            layers.setdefault(name, set()).update(u["config"].layers)
            if shares_prefix(u["config"]):
                g = bank_group(u["config"], u["cell"].shots)
                largest[g] = max(largest.get(g, 0.0), u["config"].coreset_fraction)
            s = score_group(u["config"], u["cell"].shots)
            largest_k[s] = max(largest_k.get(s, 1), u["config"].anomaly_scorer_num_nn)
        # Units of a score group run one after another, so one search serves them all.
        units.sort(key=lambda u: list(largest_k).index(score_group(u["config"], u["cell"].shots)))
        for u in units:
            cfg = u["config"]
            needed = layers[feature_store.key_name(feature_key(cfg))]
            group = bank_group(cfg, u["cell"].shots)
            try:
                result, stages = work.run(cfg, u["cell"].shots, needed_layers=needed,
                                          largest_fraction=largest.get(group, cfg.coreset_fraction),
                                          largest_k=largest_k[score_group(cfg, u["cell"].shots)])
            except ValueError as err:
                raise ValueError(f"{cat.name}, {u['cell'].label}, seed {u['seed']}: {err}") from None
            u["done"] = {"fingerprint": u["fingerprint"], "category": cat.name, "values": dict(u["cell"].values),
                         "seed": u["seed"], "config": cfg.to_dict(), "shots": u["cell"].shots, "result": result,
                         "stages": stages}
            yield u


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _write_reports(outdir: OutputDir, p: dict, rows: list) -> None:
    keys = p["keys"]
    text = sweep_report.results_csv(keys, rows)
    path = outdir.path("results.csv")
    same = False
    if os.path.exists(path):
        with open(path, encoding="utf-8", newline="") as f:
            same = f.read() == text
    if same and os.path.exists(outdir.path("table.md")):
        return  # a finished sweep: nothing new to write
    outdir.write_text("results.csv", text)
    outdir.write_text("table.md", sweep_report.table_md(keys, rows, [c.name for c in p["categories"]]))
    for metric in METRICS:
        for key in keys:
            outdir.write(os.path.join("plots", f"{metric}-{key}.png"),
                         lambda tmp, m=metric, k=key: sweep_report.plot(tmp, keys, rows, m, k))
