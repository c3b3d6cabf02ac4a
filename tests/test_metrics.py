import numpy as np
import pytest
import scipy.ndimage
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import roc_auc_score

from patchcore_jax._src.stages import metrics


@given(st.integers(2, 60).flatmap(lambda n: st.tuples(
    hnp.arrays(bool, n), hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]) | st.floats(-5, 5)))))
def test_image_auroc_matches_sklearn(case):
    labels, scores = case
    if labels.all() or not labels.any():
        labels = labels.copy()
        labels[0] = not labels[0]
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@given(st.integers(0, 2**16))
def test_pixel_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 9, 7)) < 0.2
    masks[0, 0, 0], masks[0, 0, 1] = True, False
    maps = np.round(rng.random(masks.shape) + masks * 0.4, 1).astype(np.float32)  # many ties
    want = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(want, abs=1e-12)


def test_perfect_separation_gives_one_and_reversal_zero():
    labels = np.array([0, 0, 1, 1])
    assert metrics.image_auroc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.image_auroc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert metrics.image_auroc(labels, [1.0, 1.0, 1.0, 1.0]) == 0.5


def mvtec_pro_naive(masks, maps, fpr_limit):
    """The MVTec AD evaluation's procedure, step by step, with a full sort (slow, for checking)."""
    fp_inc = (~masks).astype(float).ravel()
    overlap = np.zeros(masks.shape)
    n_regions = 0
    for i in range(len(masks)):
        lab, n = scipy.ndimage.label(masks[i], structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            overlap[i][lab == r] = 1.0 / (lab == r).sum()
        n_regions += n
    s = maps.ravel()
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fpr = np.cumsum(fp_inc[order]) / fp_inc.sum()
    pro = np.cumsum(overlap.ravel()[order]) / n_regions
    keep = np.append(s[1:] != s[:-1], True)  # last point of each run of equal scores
    fpr = np.concatenate([[0.0], np.clip(fpr[keep], 0, 1), [1.0]])
    pro = np.concatenate([[0.0], np.clip(pro[keep], 0, 1), [1.0]])
    return metrics.area_under_curve(fpr, pro, fpr_limit) / fpr_limit


@given(st.integers(0, 2**16), st.sampled_from([0.3, 0.05, 1.0]))
def test_au_pro_matches_the_mvtec_procedure(seed, limit):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), bool)
    for i in range(3):
        y, x = rng.integers(0, 9, 2)
        masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 5)] = True
        masks[i, rng.integers(0, 12), rng.integers(0, 12)] = True
    maps = np.round(rng.random(masks.shape) + masks * 0.5, 1)  # ties across good and region pixels
    assert metrics.au_pro(masks, maps, limit) == pytest.approx(mvtec_pro_naive(masks, maps, limit), abs=1e-12)


def test_au_pro_worked_by_hand():
    # One 1x4 image. Region A: pixel 0 (size 1). Region B: pixels 2, 3 (size 2, 8-connected).
    # Good pixel 1. Scores: A = 0.9, good = 0.5, B = 0.5 and 0.1 (a tie between good and B at 0.5).
    # Thresholds, descending (2 regions, 1 good pixel):
    #   0.9: A covered -> pro 0.5, fpr 0
    #   0.5: good pixel and half of B -> pro (1 + 0.5) / 2 = 0.75, fpr 1
    #   0.1: rest of B -> pro 1, fpr 1
    # Curve: (0, 0), (0, 0.5), (1, 0.75), (1, 1), (1, 1).
    # fpr_limit 0.4: interpolate on (0, 0.5)-(1, 0.75) at 0.4 -> 0.6; area 0.4 * (0.5 + 0.6) / 2 = 0.22;
    # normalised 0.22 / 0.4 = 0.55.
    masks = np.array([[[1, 0, 1, 1]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.5, 0.1]]])
    assert metrics.au_pro(masks, maps, fpr_limit=0.4) == pytest.approx(0.55, abs=1e-12)
    # Full range: 1 * (0.5 + 0.75) / 2 = 0.625.
    assert metrics.au_pro(masks, maps, fpr_limit=1.0) == pytest.approx(0.625, abs=1e-12)


def test_au_pro_regions_are_eight_connected_and_per_image():
    # A diagonal pair is one region; the same pixels in a second image are another region.
    masks = np.zeros((2, 4, 4), bool)
    masks[:, 0, 0] = masks[:, 1, 1] = True
    maps = np.zeros((2, 4, 4))
    maps[0, 0, 0] = maps[0, 1, 1] = 1.0  # only the first image's region is found
    fpr, pro = metrics.pro_curve(masks, maps)
    assert pro[np.searchsorted(fpr, 0.0, side="right") - 1] == pytest.approx(0.5)


def test_perfect_maps_give_au_pro_one():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 16, 16)) < 0.1
    masks[0, 0, 0] = True
    assert metrics.au_pro(masks, masks.astype(float) + 1.0) == pytest.approx(1.0)
    assert metrics.pixel_auroc(masks, masks.astype(float)) == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="labels.*both"):
        metrics.image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores.*\\(3,\\)"):
        metrics.image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores.*finite"):
        metrics.image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="masks.*binary"):
        metrics.pixel_auroc(np.full((1, 2, 2), 255), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="maps.*shape"):
        metrics.au_pro(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="masks.*region"):
        metrics.au_pro(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.au_pro(np.eye(2, dtype=bool)[None], np.zeros((1, 2, 2)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="masks.*non-empty"):
        metrics.pixel_auroc(np.zeros((0, 2, 2)), np.zeros((0, 2, 2)))
