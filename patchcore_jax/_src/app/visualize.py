"""Pictures a person can read: heatmap panels with their scale and verdict, and an evaluation summary.

Drawn with matplotlib's object API (no pyplot state, the Agg canvas), so it is safe in any process.
Colours are fixed by the model (`PatchCore.color_scale`): the pixel threshold is always the middle of
the colour map, so a map value at the threshold has the same colour in every run and every process.
"""

from __future__ import annotations

import numpy as np

from patchcore_jax._src.stages.metrics import METRICS

CMAP = "turbo"
UNITS = "anomaly score (feature distance to the nearest nominal patch)"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def digits(score: float, threshold: float, *, least: int = 4, most: int = 9) -> int:
    """Significant digits enough to tell `score` from `threshold` (at least `least`, at most `most`):
    6.66742 and 6.66723 read 6.6674 and 6.6672, not both 6.667."""
    if score == threshold:
        return least
    for d in range(least, most + 1):
        if f"{score:.{d}g}" != f"{threshold:.{d}g}":
            return d
    return most


def verdict(score: float, threshold: float | None) -> tuple[str, str]:
    """The line a panel leads with, and its colour."""
    if threshold is None:
        return f"score {score:.4g} (no image threshold set: no verdict)", "black"
    d = digits(score, threshold)
    if score > threshold:
        return f"DEFECT: score {score:.{d}g} > threshold {threshold:.{d}g}", "#c00000"
    return f"fine: score {score:.{d}g} <= threshold {threshold:.{d}g}", "#006400"


def outline_title(decision) -> str:
    """The overlay's title: what its outline shows (a `Decision` of `Detector.decide`)."""
    if decision.anomalous is False:
        return "map over image (judged fine: no region outlined)"
    if decision.anomalous is None:
        return "map over image (outline: above pixel threshold)"
    if decision.level is not None and "peak" in decision.rule:
        return "map over image (outline: the map's peak; no pixel above pixel threshold)"
    if "maximum" in decision.rule:
        return "map over image (outline: the map's maximum)"
    return "map over image (outline: above pixel threshold)"


def draw_panel(path, *, image: np.ndarray, amap: np.ndarray, scale: tuple[float, float, float], score: float,
               image_threshold: float | None, name: str = "", mask: np.ndarray | None = None,
               image_format: str = "png", decision=None) -> None:
    """Writes one panel: image | map over the image (the predicted defect region outlined, the region
    not inspected hatched) | ground truth (when given); a colour bar in score units with the pixel
    threshold marked; the image score, the threshold and the verdict in the title.

    `decision`: the model's `Decision` for this image (`Detector.decide`); its region is the one
    outlined, so the panel agrees with `scores.csv` and the saved masks. Without it, the outline is
    the map above the pixel threshold.

    Args:
      image: `(H, W, 3)` uint8, the same geometry as `amap` (the crop, or the original frame).
      amap: `(H, W)` float map; NaN where the model did not look.
      scale: `(low, pixel threshold, high)` from `PatchCore.color_scale`.
    """
    from matplotlib.colors import TwoSlopeNorm

    low, mid, high = scale
    norm = TwoSlopeNorm(vmin=low, vcenter=mid, vmax=high)
    n = 3 if mask is not None else 2
    h, w = amap.shape
    panel_w = 3.2 * min(max(w / h, 0.5), 2.0)
    fig = _figure(panel_w * n + 1.2, 3.9)
    axes = fig.subplots(1, n)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(image)
    shown = axes[1].imshow(np.ma.masked_invalid(amap), cmap=CMAP, norm=norm, alpha=0.55, interpolation="bilinear")
    inspected = np.isfinite(amap)
    region = (inspected & (np.where(inspected, amap, low) > mid)) if decision is None else decision.region
    if region.any():
        axes[1].contour(region.astype(float), levels=[0.5], colors="white", linewidths=1.2)
    if not inspected.all():
        axes[1].imshow(np.where(inspected, np.nan, 1.0), cmap="gray", vmin=0, vmax=2, alpha=0.6)
        axes[1].contourf((~inspected).astype(float), levels=[0.5, 1.5], hatches=["//"], colors="none")
    axes[1].set_title("map over image (outline: above pixel threshold)" if decision is None
                      else outline_title(decision), fontsize=9)
    if mask is not None:
        axes[2].imshow(np.asarray(mask, bool), cmap="gray", vmin=0, vmax=1)
        axes[2].set_title("ground truth", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(shown, ax=list(axes), fraction=0.05, pad=0.02)
    bar.set_alpha(1.0)
    bar.set_label(UNITS, fontsize=7)
    bar.ax.axhline(mid, color="black", linewidth=2)
    bar.ax.text(-0.3, mid, "pixel\nthreshold", transform=bar.ax.get_yaxis_transform(), ha="right", va="center",
                fontsize=6)
    line, colour = verdict(score, image_threshold)
    fig.suptitle(f"{line}\n{name}", fontsize=10, color=colour)
    fig.savefig(path, format=image_format)


def save_mask_png(path, predicted: np.ndarray) -> None:
    """A binary predicted mask as an 8-bit PNG (255 = predicted defect)."""
    from PIL import Image

    Image.fromarray(np.where(predicted, 255, 0).astype(np.uint8)).save(path, format="PNG")


def save_npy(path, array: np.ndarray) -> None:
    """`np.save` to exactly `path` (no suffix appended), float32."""
    with open(path, "wb") as f:
        np.save(f, np.asarray(array, np.float32))


def summary_figure(path, report: dict, rocs: dict) -> None:
    """One picture of an evaluation: the three metrics per category (bars; "n/a" where a metric is
    not available) and each category's image ROC curve."""
    cats = list(report["categories"])
    fig = _figure(max(8.0, 1.1 * len(cats) + 5.0), 4.2)
    bars, roc = fig.subplots(1, 2, width_ratios=[max(2.0, 0.5 * len(cats)), 1.4])
    width = 0.8 / len(METRICS)
    for k, metric in enumerate(METRICS):
        values = [report["categories"][c][metric] for c in cats]
        xs = np.arange(len(cats)) + (k - 1) * width
        bars.bar(xs, [0.0 if v is None else v for v in values], width, label=metric.replace("_", " "))
        for x, v in zip(xs, values):
            if v is None:
                bars.text(x, 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=7)
    bars.set_xticks(np.arange(len(cats)), cats, rotation=45, ha="right", fontsize=8)
    bars.set_ylim(0.0, 1.05)
    bars.set_title(f"{report['dataset']}: mean image AUROC {_fmt(report['mean']['image_auroc'])}, pixel AUROC "
                   f"{_fmt(report['mean']['pixel_auroc'])}, AU-PRO {_fmt(report['mean']['au_pro'])}", fontsize=9)
    bars.legend(fontsize=7, loc="lower right")
    for name, (fpr, tpr) in rocs.items():
        roc.plot(fpr, tpr, linewidth=1, label=name)
    roc.plot([0, 1], [0, 1], color="gray", linewidth=0.5, linestyle="--")
    roc.set_xlabel("false positive rate", fontsize=8)
    roc.set_ylabel("true positive rate", fontsize=8)
    roc.set_title("image ROC per category", fontsize=9)
    if rocs:
        roc.legend(fontsize=6, loc="lower right")
    fig.savefig(path, format="png")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
