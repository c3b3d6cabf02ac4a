"""What `predict`, `evaluate` and `sweep` need in memory, refused before any work when the machine
has less (`fit` and `demo`: `console.check_memory`).

Every estimate is read from shapes alone (traces and `eval_shape`; nothing is compiled or run) and
follows what the code holds at its peak:

- predict (`check_predict`): the model is loaded first (its bank and index are then held); what is
  still to be taken is the backbone's working memory on one batch (`Executor.memory_estimate`) plus
  the scoring of one batch (`run.jaxprs.scoring_memory`: that batch's features and the next one's, the
  search's distance tiles, the maps) plus the host's crops and maps of the two batches in flight.
  `predict` streams: no map is held after its image is written. Ensemble members are dispatched
  together: their scoring adds up, their backbones count once (the largest).
- evaluate (`check_evaluate`): per category a fit on its training images (the backbone on one batch
  and the bank being built, `Executor.memory_estimate`), then the bank held (the bank and its index,
  2 x M x D float32 per member) while the whole test set is scored, whose predictions are all kept
  for the metrics: per test pixel its crop (3 bytes), map (4), the stacked maps (4), mask (1) and
  the metrics' working arrays (about 24: labels, sorted scores, an argsort); one more map per member
  for an ensemble. Checked for the category with the most training images and the one with the most
  test images.
- sweep (`check_sweep`): one category at a time (`sweep_cells.CategoryWork`), holding its crops (3 bytes
  per pixel), the backbone taps of all its images for every feature key (twice while they are
  concatenated), the patch features of every aggregation setting the grid asks for (kept for the
  category's whole run), and the largest cell's fit (the chosen training features copied, the bank
  being built) and scoring (the test features and their k nearest distances kept per batch, the bank
  and its index, the test set's maps and metrics as in evaluate).

The totals add parts that are not all held at the same time, but leave out compilation's own memory
and the runtime's (docs/model-files.md, "Memory", has one measurement): settings just under the limit
may still fail.
"""

from __future__ import annotations

import numpy as np

from patchcore_jax._src.app import console
from patchcore_jax._src.app.console import UsageError, plural

TEST_PIXEL = 3 + 4 + 4 + 1 + 24  # bytes per test pixel held for the metrics (see the module docstring)


def gib(size: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _available(available: int | None) -> int | None:
    return console.available_memory() if available is None else available


def _members(model) -> list:
    return list(getattr(model, "members", [model]))


def held_bytes(tree) -> int:
    """Bytes of the arrays in a pytree (a bank, an index)."""
    import jax

    return int(sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(tree)))


def predict_estimate(model) -> dict[str, int]:
    """`{"activations", "scoring", "host", "bank"}` bytes of `predict` with a loaded model (see the
    module docstring); `bank` is already held."""
    from patchcore_jax._src.run import jaxprs

    members = _members(model)
    cfg = model.config
    activations = max(m.executor.memory_estimate(1)["activations"] for m in members)
    # A mesh's sharded index: a brute-force index of the whole bank stands in (one device's bound).
    scoring = sum(jaxprs.scoring_memory(m.config, m.feature_grid, m.index if m.executor.mesh is None else None,
                                        bank_rows=len(m.bank)) for m in members)
    host = 2 * cfg.batch_size * cfg.crop * cfg.crop * (3 + 4 * len(members))
    bank = sum(held_bytes(m.bank) + (held_bytes(m.index) if m.index is not m.bank else 0) for m in members)
    return {"activations": activations, "scoring": scoring, "host": host, "bank": bank}


def check_predict(model, available: int | None = None) -> None:
    """Refuses (UsageError, one line) a `predict` whose scoring needs more memory than is free.
    `available`: bytes free now (default `console.available_memory()`, measured after the model is
    loaded, so its bank is already taken from it)."""
    available = _available(available)
    if available is None:
        return
    e = predict_estimate(model)
    needed = e["activations"] + e["scoring"] + e["host"]
    if needed <= available:
        return
    cfg = model.config
    fits = int(available // (needed / cfg.batch_size))
    advice = (f"refit the model with --batch-size {fits} or less" if fits >= 1
              else "refit the model with a lower --crop")
    raise UsageError(f"--batch-size {cfg.batch_size} --crop {cfg.crop} (the model's): predict needs about "
                     f"{gib(needed + e['bank'])} ({gib(e['activations'])} for the backbone on one batch, "
                     f"{gib(e['scoring'] + e['host'])} for scoring one batch against the bank, {gib(e['bank'])} for "
                     f"the loaded bank), but {gib(available)} is available besides the bank; {advice}")


def fit_and_score(model, n_train: int, n_test: int) -> dict[str, int]:
    """`{"activations", "bank", "test"}` bytes of a fit on `n_train` images followed by the scoring of
    `n_test` held test images (`evaluate`'s category; see the module docstring)."""
    from patchcore_jax._src.run import jaxprs

    members = _members(model)
    cfg = model.config
    parts = [m.executor.memory_estimate(max(n_train, 1)) for m in members]
    fitting = sum(p["bank"] for p in parts)
    holding = 0
    for m in members:
        rows = m.bank_size_for(max(n_train, 1))
        holding += 2 * rows * m.config.target_dim * 4 + jaxprs.scoring_memory(m.config, m.feature_grid, bank_rows=rows)
    pixels = n_test * cfg.crop * cfg.crop
    test = pixels * TEST_PIXEL + (pixels * 4 * len(members) if len(members) > 1 else 0)
    return {"activations": max(p["activations"] for p in parts), "bank": max(fitting, holding), "test": test}


def check_evaluate(model, categories, available: int | None = None) -> None:
    """Refuses (UsageError, one line) an `evaluate` whose largest category needs more memory than is
    available, before the first category starts. `categories`: `datasets.load_categories`'."""
    available = _available(available)
    if available is None or not categories:
        return
    most_train, most_test = max(categories, key=lambda c: len(c.train)), max(categories, key=lambda c: len(c.test))
    worst = None
    for cat in [most_train] if most_test is most_train else [most_train, most_test]:
        e = fit_and_score(model, len(cat.train), len(cat.test))
        if worst is None or sum(e.values()) > sum(worst[1].values()):
            worst = (cat, e)
    cat, e = worst
    total = sum(e.values())
    if total <= available:
        return
    cfg = model.config
    fits = int((available - e["bank"] - e["test"]) // (e["activations"] / cfg.batch_size)) \
        if available > e["bank"] + e["test"] else 0
    if e["test"] > available / 2:
        advice = "lower --crop (every test image's map is held for the metrics), or evaluate on a smaller test set"
    elif e["bank"] > available / 2:
        advice = "lower --coreset or --projection-dim"
    elif fits >= 1:
        advice = f"use --batch-size {fits} or less"
    else:
        advice = "lower --crop"
    raise UsageError(f"--crop {cfg.crop} --batch-size {cfg.batch_size}: category {cat.name} "
                     f"({plural(len(cat.train), 'training image')}, {plural(len(cat.test), 'test image')}) needs about "
                     f"{gib(total)} ({gib(e['activations'])} for the backbone on one batch, {gib(e['bank'])} for the "
                     f"memory bank and its search, {gib(e['test'])} for the test set's maps and metrics), but "
                     f"{gib(available)} is available; {advice}")


def sweep_estimate(p: dict) -> dict | None:
    """The largest category's bytes in a sweep plan (`sweep.plan`) of units still to run: `{"category",
    "taps", "features", "activations", "cell"}` (see the module docstring); None when nothing is left."""
    from patchcore_jax._src.app import sweep_cells
    from patchcore_jax._src.io import feature_store
    from patchcore_jax._src.run import jaxprs

    todo = [u for u in p["units"] if u["done"] is None]
    shapes, layers = {}, {}
    for u in todo:
        name = feature_store.key_name(sweep_cells.feature_key(u["config"]))
        layers.setdefault(name, set()).update(u["config"].layers)
    for u in todo:
        cfg = u["config"]
        key = (feature_store.key_name(sweep_cells.feature_key(cfg)), sweep_cells.aggregate_key(cfg))
        if key not in shapes:
            shapes[key] = (cfg, *sweep_cells.tap_shapes(cfg, layers[key[0]]))
    worst = None
    for cat in p["categories"]:
        units = [u for u in todo if u["category"] is cat]
        if not units:
            continue
        n_train, n_test = len(cat.train), len(cat.test)
        n = n_train + n_test
        per_key, features, activations = {}, 0, 0
        keys = {(feature_store.key_name(sweep_cells.feature_key(u["config"])), sweep_cells.aggregate_key(u["config"]))
                for u in units}
        for (name, aggregation), (cfg, tap, grid, act) in shapes.items():
            if (name, aggregation) not in keys:
                continue
            per_key[name] = max(per_key.get(name, 0), sum(int(np.prod(s)) for s in tap.values()) * 4 * n)
            features += n * grid[0] * grid[1] * cfg.target_dim * 4
            activations = max(activations, act)
        taps = 2 * sum(per_key.values()) + n * max(u["config"].crop for u in units) ** 2 * 3
        cell = 0
        for u in units:
            cfg = u["config"]
            grid = shapes[(feature_store.key_name(sweep_cells.feature_key(cfg)), sweep_cells.aggregate_key(cfg))][2]
            used = u["cell"].shots or n_train
            rows, d = used * grid[0] * grid[1], cfg.target_dim
            m = cfg.bank_size(rows)
            building = rows * (cfg.projection_dim * np.dtype(cfg.coreset_dtype).itemsize + 12) \
                if sweep_cells.shares_prefix(cfg) else 2 * rows * d * 4
            k = max(cfg.anomaly_scorer_num_nn, 1)
            scoring = (n_test * grid[0] * grid[1] * (d * 4 + k * 8) + 2 * m * d * 4
                       + jaxprs.scoring_memory(cfg, grid, bank_rows=m) + n_test * cfg.crop ** 2 * TEST_PIXEL)
            cell = max(cell, rows * d * 4 + building + m * d * 4 + scoring)
        e = {"category": cat, "taps": taps, "features": features, "activations": activations, "cell": cell}
        if worst is None or _total(e) > _total(worst):
            worst = e
    return worst


def _total(e: dict) -> int:
    return e["taps"] + e["features"] + e["activations"] + e["cell"]


def describe_sweep(e: dict | None, available: int | None = None) -> str:
    """`--dry-run`'s line of the estimate (`sweep_estimate`) and of the memory available."""
    if e is None:
        return "  memory: nothing left to run"
    available = _available(available)
    there = "" if available is None else (f"; {gib(available)} available" + (
        ": the run would be refused" if _total(e) > available else ""))
    return (f"  memory: about {gib(_total(e))} at the largest category, {e['category'].name} ({gib(e['taps'])} for "
            f"its crops and backbone taps, {gib(e['features'])} for its patch features, {gib(e['activations'])} for "
            f"the backbone on one batch, {gib(e['cell'])} for the largest cell's fit and scoring){there}")


def check_sweep(p: dict, available: int | None = None) -> dict | None:
    """Refuses (UsageError, one line) a sweep whose largest category needs more memory than is
    available, before any extraction; returns the estimate (`sweep_estimate`)."""
    e = sweep_estimate(p)
    available = _available(available)
    if available is None or e is None or _total(e) <= available:
        return e
    base = p["base"]
    if e["features"] + e["taps"] > available / 2:
        advice = ("lower --crop, or sweep fewer layers, patch sizes or widths at once (each category's taps and "
                  "features are held for all its cells)")
    elif e["cell"] > available / 2:
        advice = "lower --coreset, --projection-dim or the grid's largest coreset_fraction"
    else:
        advice = "use a lower --batch-size"
    raise UsageError(f"--crop {base.crop} --batch-size {base.batch_size}: the sweep's largest category, "
                     f"{e['category'].name}, needs about {gib(_total(e))} ({gib(e['taps'])} for its crops and "
                     f"backbone taps, {gib(e['features'])} for its patch features, {gib(e['activations'])} for the "
                     f"backbone on one batch, {gib(e['cell'])} for the largest cell's fit and scoring), but "
                     f"{gib(available)} is available; {advice}")
