"""The gate's statistics: a ratio of two sets of timings that noise on a shared machine does not move.

Each round is one fresh process per revision; within it, a stage is called several times and the
minimum kept (the least disturbed call). Between rounds, what moves is the load the process met. The
ratio candidate / base is the Hodges-Lehmann estimate on log times (the median of all pairwise log
ratios between the rounds of the two revisions), with the distribution-free confidence interval that
inverts the Mann-Whitney test (as in Bauer 1972; the same order statistics of the pairwise ratios).
A stage is called slower only when the whole interval lies above 1.05 (MARGIN) and the estimate
exceeds the threshold: a change must be both real and large enough to matter.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

# Thresholds: run time 10% (what a maintainer would act on; below that, a 2-core machine shared with
# other jobs cannot tell it from noise in 4 rounds, see docs/benchmarks.md); compile time 50% and at
# least half a second of CPU time (it is measured once per revision, in the round that starts with
# no cached programs, so there is no interval; compiling meets the load unevenly); peak memory 10%
# and, beyond that, at least 0.5 MiB where XLA's buffer assignment gives it (exact) and 32 MiB where
# the resident set has to (the allocator moves small footprints by several MiB from process to process).
THRESHOLDS = {"time": 0.10, "compile": 0.50, "memory": 0.10}
COMPILE_FLOOR_S = 0.5
# The interval must clear 1 by this much, not just 1: with 4 and 4 rounds the interval is the range of
# the 16 pairwise ratios, and on unchanged code the 4 candidate rounds all come out above the 4 base
# ones for 1 split in 70 (1.1% a stage, about 10% a run of 9 stages: measured 7 of 630 stage-splits
# under a load of 17 on 2 cores). Asking the smallest pairwise ratio to exceed 1.05 left 1 of 630.
MARGIN = 0.05
MEMORY_FLOOR_MB = {"xla": 0.5, "rss": 32.0}


@lru_cache(maxsize=None)
def _u_counts(n: int, m: int) -> tuple[int, ...]:
    """Number of arrangements of n x's and m y's giving each value of the Mann-Whitney U (0..n*m)."""
    # f(n, m, u) = f(n - 1, m, u - m) + f(n, m - 1, u): the largest value is an x (beating all m y's)
    # or a y.
    if n == 0 or m == 0:
        return (1,)
    a, b = _u_counts(n - 1, m), _u_counts(n, m - 1)
    out = [0] * (n * m + 1)
    for u, c in enumerate(a):
        out[u + m] += c
    for u, c in enumerate(b):
        out[u] += c
    return tuple(out)


def mw_rank(n: int, m: int, alpha: float = 0.05) -> int:
    """C: the interval [d_(C), d_(nm + 1 - C)] of the sorted pairwise differences covers the shift
    with probability >= 1 - alpha (0 when the samples are too small for any such interval)."""
    counts = _u_counts(n, m)
    total = math.comb(n + m, n)
    cum = 0
    for u, c in enumerate(counts):
        cum += c
        if cum / total > alpha / 2:
            return u  # P(U <= u - 1) <= alpha / 2
    return 0


def ratio_interval(base, cand, alpha: float = 0.05):
    """`(estimate, low, high)` of cand / base from per-round times (positive floats); low and high are
    None when there are too few rounds for an interval at this level."""
    x, y = np.log(np.asarray(base, float)), np.log(np.asarray(cand, float))
    d = np.sort((y[None, :] - x[:, None]).ravel())
    est = float(np.exp(np.median(d)))
    c = mw_rank(len(x), len(y), alpha)
    if c < 1:
        return est, None, None
    return est, float(np.exp(d[c - 1])), float(np.exp(d[len(d) - c]))


def verdict(kind: str, base, cand, *, threshold: float | None = None, memory_source: str = "rss") -> dict:
    """One row's figures and its verdict: "slower", "faster", "same", or "no verdict" (too few rounds).

    kind: "time" or "compile" (seconds, a ratio), "memory" (MiB: a ratio and an absolute floor)."""
    thr = THRESHOLDS[kind] if threshold is None else threshold
    base, cand = [float(v) for v in base], [float(v) for v in cand]
    row = {"kind": kind, "base": float(np.min(base)), "candidate": float(np.min(cand)), "threshold": thr}
    if kind == "memory":
        # Footprints are nearly deterministic: medians, and a floor so that a few MiB never alarm.
        b, c = float(np.median(base)), float(np.median(cand))
        row.update(base=b, candidate=c, ratio=(c / b if b > 0 else math.inf if c > 0 else 1.0), low=None, high=None)
        big = abs(c - b) >= MEMORY_FLOOR_MB[memory_source]
        row["verdict"] = ("slower" if big and c > b * (1 + thr) else
                          "faster" if big and c < b / (1 + thr) else "same")
        return row
    if kind == "compile" and len(base) == 1 and len(cand) == 1:
        # Compiling is measured once per revision (the round that starts with no cached programs): no
        # interval, so a coarse guard: slower only beyond the threshold and by more than COMPILE_FLOOR_S.
        b, c = base[0], cand[0]
        row.update(ratio=c / b if b > 0 else math.inf if c > 0 else 1.0, low=None, high=None)
        big = abs(c - b) > COMPILE_FLOOR_S
        row["verdict"] = ("slower" if big and c > b * (1 + thr) else
                          "faster" if big and c < b / (1 + thr) else "same")
        return row
    floor = 1e-6  # a stage that rounds to zero CPU time still has a ratio
    est, low, high = ratio_interval([max(v, floor) for v in base], [max(v, floor) for v in cand])
    row.update(ratio=est, low=low, high=high)
    if low is None:
        row["verdict"] = "no verdict"
    elif low > 1.0 + MARGIN and est > 1.0 + thr:
        row["verdict"] = "slower"
    elif high < 1.0 / (1.0 + MARGIN) and est < 1.0 / (1.0 + thr):
        row["verdict"] = "faster"
    else:
        row["verdict"] = "same"
    return row
