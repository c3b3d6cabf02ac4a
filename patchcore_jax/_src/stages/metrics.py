"""Evaluation metrics: image AUROC, pixel AUROC and the MVTec AD AU-PRO, in NumPy/SciPy.

One implementation, shared by both backends, tested against scikit-learn and worked examples. Built
for MVTec-sized input (about 86 million pixels at 224 x 224): no full argsort with payload; scores of
the negatives are sorted once (NumPy's vectorised sort), the few positives are located in them by
binary search, so time is dominated by one sort and memory by one copy of the scores.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from patchcore_jax._src.stages import checks as _checks

# The paper's three metrics, as results name them.
METRICS = ("image_auroc", "pixel_auroc", "au_pro")


def _binary(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == bool:
        return x
    if not np.isin(x, (0, 1)).all():
        bad = np.unique(x[~np.isin(x, (0, 1))])[:5]
        raise ValueError(f"{name}: expected binary values (0/1 or bool), found e.g. {bad.tolist()}")
    return x.astype(bool)


def _auroc_from_split(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg): each positive counts the negatives below it, ties as half."""
    neg = np.sort(neg)  # the default kind is the vectorised one; stability is irrelevant here
    below = np.searchsorted(neg, pos, side="left").astype(np.float64)
    at_or_below = np.searchsorted(neg, pos, side="right").astype(np.float64)
    u = below.sum() + 0.5 * (at_or_below - below).sum()
    return float(u / (len(pos) * len(neg)))


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores; ties count half (the Mann-Whitney statistic).

    Args:
      labels: `(N,)` 1/True for anomalous, 0/False for good; both classes must occur.
      scores: `(N,)` finite anomaly scores, higher meaning more anomalous.
    """
    # The metrics run on the host: device arrays come over once, here, and are checked there.
    labels, scores = np.asarray(labels), np.asarray(scores)
    (n,) = _checks.check_array("labels", labels, ndim=1, finite=False)
    (m,) = _checks.check_array("scores", scores, ndim=1)
    if n != m:
        raise ValueError(f"scores: expected shape ({n},) like labels, got ({m},)")
    labels = _binary("labels", labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        raise ValueError("labels: expected both good (0) and anomalous (1) entries, got one class only")
    return _auroc_from_split(scores[labels], scores[~labels])


def _check_masks_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks), np.asarray(maps)  # host data from here on (see image_auroc)
    ms = _checks.check_array("masks", masks, ndim=None, finite=False)
    ps = _checks.check_array("maps", maps, ndim=None)
    if len(ms) != 3:
        raise ValueError(f"masks: expected (N, H, W), got shape {ms}")
    if ms != ps:
        raise ValueError(f"maps: expected shape {ms} like masks, got {ps}")
    masks = _binary("masks", masks)
    maps = np.asarray(maps)
    if maps.dtype.kind != "f":
        maps = maps.astype(np.float64)
    return masks, maps


def pixel_auroc(masks, maps) -> float:
    """AUROC over all pixels of all images (`masks` `(N, H, W)` binary, `maps` `(N, H, W)` scores)."""
    masks, maps = _check_masks_maps(masks, maps)
    if masks.all() or not masks.any():
        raise ValueError("masks: expected both good (0) and anomalous (1) pixels, got one class only")
    return _auroc_from_split(maps[masks], maps[~masks])


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """The MVTec AD per-region-overlap curve: `(fpr, pro)`, ascending in fpr, from (0, 0) to (1, 1).

    Thresholds run over all distinct scores, descending. A good pixel adds 1 to the false positives;
    a pixel of an 8-connected ground-truth region adds `1 / region size` to the overlap. Only points
    where the overlap changes (or a tie moves both) are kept: between them the curve is flat, so the
    trapezoid integral and linear interpolation equal those of the full curve.
    """
    masks, maps = _check_masks_maps(masks, maps)
    if not masks.any():
        raise ValueError("masks: expected at least one anomalous region, got none")
    if masks.all():
        raise ValueError("masks: expected some good (0) pixels, got none")
    # One labelling for the stack: the structure joins 8 neighbours within an image, never across.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, n_regions = scipy.ndimage.label(masks, structure=structure)
    region_px = labels[masks]
    weights = 1.0 / np.bincount(region_px)[region_px]
    region_scores = maps[masks]
    good = np.sort(maps[~masks])
    n_good = len(good)

    # Distinct region thresholds, descending, with the overlap reached at each.
    order = np.argsort(-region_scores, kind="stable")
    thresholds, first = np.unique(-region_scores[order], return_index=True)
    thresholds = -thresholds
    cum = np.cumsum(weights[order]) / n_regions
    last = np.append(first[1:], len(order)) - 1
    pro_at = np.minimum(cum[last], 1.0)
    fpr_at = (n_good - np.searchsorted(good, thresholds, side="left")) / n_good  # scores >= t
    fpr_above = (n_good - np.searchsorted(good, thresholds, side="right")) / n_good  # scores > t
    pro_before = np.concatenate([[0.0], pro_at[:-1]])
    # Per threshold: the flat run just above it ends at (fpr_above, pro_before), then (fpr_at, pro_at).
    fpr = np.concatenate([[0.0], np.column_stack([fpr_above, fpr_at]).ravel(), [1.0]])
    pro = np.concatenate([[0.0], np.column_stack([pro_before, pro_at]).ravel(), [1.0]])
    return np.clip(fpr, 0.0, 1.0), np.clip(pro, 0.0, 1.0)


def area_under_curve(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under `y(x)` (x ascending) from `x[0]` to `x_max`, interpolating at `x_max`."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max:
        j = np.searchsorted(x, x_max, side="right")  # first point beyond the limit
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_lim = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_lim)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def au_pro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit`, as the MVTec AD evaluation computes it.

    Args:
      masks: `(N, H, W)` binary ground truth; maps: `(N, H, W)` anomaly maps.
      fpr_limit: integration limit in `(0, 1]`; the area is divided by it, so a perfect map gives 1.
    """
    if not isinstance(fpr_limit, (int, float)) or not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit: expected a number in (0, 1], got {fpr_limit!r}")
    fpr, pro = pro_curve(masks, maps)
    return area_under_curve(fpr, pro, float(fpr_limit)) / fpr_limit


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = _binary("labels", np.asarray(labels).ravel())
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"scores: expected {labels.size} values like labels, got {scores.size}")
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError("scores: expected a non-empty array of finite values")
    return labels, scores


def _descending_counts(labels: np.ndarray, scores: np.ndarray):
    """Distinct scores descending, with the true and false positives of `score >= t` at each."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.append(np.nonzero(np.diff(s))[0], len(s) - 1)  # the last index of each run of ties
    return s[last], tp[last], fp[last]


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """`(fpr, tpr)` of `score >= t` over all distinct thresholds, from (0, 0) to (1, 1); its trapezoid
    area is `image_auroc` (ties on the diagonal). Inputs as `image_auroc`, or flattened masks and maps."""
    labels, scores = _labels_scores(labels, scores)
    if labels.all() or not labels.any():
        raise ValueError("labels: expected both good (0) and anomalous (1) entries, got one class only")
    _, tp, fp = _descending_counts(labels, scores)
    return np.concatenate([[0.0], fp / fp[-1]]), np.concatenate([[0.0], tp / tp[-1]])


def f1_optimal_threshold(labels, scores) -> dict:
    """The threshold of best F1 (anomalib's "adaptive" threshold), for the rule `score > threshold`.

    Every distinct score is a candidate cut (anomalous at or above it); the best F1 wins, ties to the
    higher cut. The returned threshold lies halfway between that cut and the next lower score (or
    just below the lowest), so `score > threshold` marks exactly the chosen set on these data.
    Returns `{"threshold", "precision", "recall", "f1"}`.
    """
    labels, scores = _labels_scores(labels, scores)
    if not labels.any():
        raise ValueError("labels: expected at least one anomalous (1) entry to place an F1 threshold")
    cuts, tp, fp = _descending_counts(labels, scores)
    precision = tp / (tp + fp)
    recall = tp / labels.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))  # cuts descend: the first maximum is the highest cut
    below = cuts[best + 1] if best + 1 < len(cuts) else cuts[best] - max(1.0, abs(cuts[best])) * 1e-6
    return {"threshold": float((cuts[best] + below) / 2.0), "precision": float(precision[best]),
            "recall": float(recall[best]), "f1": float(f1[best])}


def rates_at(labels, scores, threshold: float) -> dict:
    """Precision, recall and F1 of `score > threshold`."""
    labels, scores = _labels_scores(labels, scores)
    pred = scores > threshold
    tp, fp, fn = int((pred & labels).sum()), int((pred & ~labels).sum()), int((~pred & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1}
