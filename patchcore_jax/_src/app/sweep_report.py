"""The sweep's reports: `results.csv` (one row per category x cell x seed), `table.md` (the paper's
layout: categories x cells, mean ± std over seeds, and the mean over categories) and one PNG per metric
and swept knob (the metric's mean over categories against the knob's values, with the spread over
seeds as error bars)."""

from __future__ import annotations

import csv
import io

import numpy as np

from patchcore_jax._src.io.outputs import csv_text
from patchcore_jax._src.stages.metrics import METRICS

STAGES = ("extract_s", "features_s", "coreset_s", "score_s")


def columns(keys) -> list[str]:
    return ["category", *keys, "seed", *METRICS, "image_f1", "pixel_f1", "bank_size", "n_train", "n_test",
            *STAGES, "seconds"]


def _f1(threshold):
    return "" if threshold is None else threshold["f1"]


def _value(x):
    return "" if x is None else x


def results_csv(keys, rows) -> str:
    """`rows`: dicts with `category`, `values` (key -> text), `seed`, `result`, `stages`."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns(keys))
    for r in rows:
        res, st = r["result"], r["stages"]
        w.writerow([csv_text(r["category"]), *(csv_text(r["values"][k]) for k in keys), r["seed"],
                    *(_value(res[m]) for m in METRICS), _f1(res["image_threshold_f1"]), _f1(res["pixel_threshold_f1"]),
                    res["bank_size"], res["n_train"], res["n_test"], *(st[s] for s in STAGES), res["seconds"]])
    return out.getvalue()


def _cell_label(keys, values) -> str:
    return ", ".join(f"{k}={values[k]}" for k in keys) or "base"


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def summary(keys, rows) -> dict:
    """`{metric: {cell label: {category | "mean": [value per seed]}}}`; the mean over categories is
    taken per seed (so its spread is the spread over seeds)."""
    out = {m: {} for m in METRICS}
    for m in METRICS:
        for r in rows:
            label = _cell_label(keys, r["values"])
            out[m].setdefault(label, {}).setdefault(r["category"], {})[r["seed"]] = r["result"][m]
        for label, per_cat in out[m].items():
            seeds = sorted({s for c in per_cat.values() for s in c})
            means = []
            for s in seeds:
                vals = [c[s] for c in per_cat.values() if c.get(s) is not None]
                means.append(float(np.mean(vals)) if vals and len(vals) == len(per_cat) else None)
            per_cat_lists = {c: [v for _, v in sorted(d.items())] for c, d in per_cat.items()}
            out[m][label] = {**per_cat_lists, "mean": means}
    return out


def table_md(keys, rows, categories) -> str:
    """Per metric, a table of categories x cells (mean ± std over seeds), with the mean over categories."""
    summ = summary(keys, rows)
    labels = list(dict.fromkeys(_cell_label(keys, r["values"]) for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# Sweep results", "", f"Seeds: {', '.join(map(str, seeds))} (mean ± sample std over seeds; the "
             "mean row averages the categories per seed).", ""]
    for m in METRICS:
        lines += [f"## {m}", "", "| category | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for cat in [*categories, "mean"]:
            cells = [_mean_std(summ[m].get(label, {}).get(cat, [])) for label in labels]
            name = f"**{cat}**" if cat == "mean" else cat
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(path: str, keys, rows, metric: str, key: str) -> None:
    """`metric` (mean over categories, then over the other knobs' values) against `key`'s values, with
    the standard deviation over seeds as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = list(dict.fromkeys(r["values"][key] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    means, errs = [], []
    for v in values:
        per_seed = []
        for s in seeds:
            vals = [r["result"][metric] for r in rows if r["values"][key] == v and r["seed"] == s
                    and r["result"][metric] is not None]
            if vals:
                per_seed.append(float(np.mean(vals)))
        means.append(np.mean(per_seed) if per_seed else np.nan)
        errs.append(np.std(per_seed, ddof=1) if len(per_seed) > 1 else 0.0)
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.errorbar(range(len(values)), means, yerr=errs, marker="o", capsize=4)
    ax.set_xticks(range(len(values)), values, rotation=20 if max(len(v) for v in values) > 8 else 0)
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} (mean over categories)")
    ax.set_title(f"{metric} against {key}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
