"""What a traced program will hold, read from its jaxpr before anything is compiled (the memory
estimate that refuses settings the machine cannot run)."""

from __future__ import annotations

import numpy as np


def largest_value(jaxpr) -> int:
    """Bytes of the largest array a jaxpr computes, nested jaxprs (jit, scan, ...) included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = getattr(v, "aval", None)
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                largest = max(largest, int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, largest_value(inner))
    return largest


def scoring_memory(config, grid: tuple[int, int], index=None, *, bank_rows: int | None = None) -> int:
    """Bytes the scoring of one batch holds on the device, from shapes alone (nothing is compiled or
    run): the batch's patch features `(batch_size, h * w, target_dim)` float32, twice (the batch
    scored and the next one, embedded meanwhile), plus 3 times the largest array of a trace of the
    search, Eq. 6/7 and the maps (`Executor.score_features`' program: the distance tiles of the
    search, the upsampled and blurred maps). `index`: the prepared index searched (a loaded model's);
    without it, a brute-force index of a bank of `bank_rows` rows stands in (before a fit; a
    clustered index searches in smaller tiles)."""
    import jax
    import jax.numpy as jnp

    from patchcore_jax._src.model import fitted as fitted_lib
    from patchcore_jax._src.stages import scoring
    from patchcore_jax._src.stages.search import brute
    from patchcore_jax._src.stages.search import common as search_common

    h, w = grid
    b, p, d = config.batch_size, h * w, config.target_dim
    if index is None:
        bank = jax.ShapeDtypeStruct((max(int(bank_rows or 1), config.bank_rows_needed), d), jnp.float32)
        index = jax.eval_shape(lambda rows: brute.prepare_index(rows, block=min(2048, bank.shape[0])), bank)
    feats = jax.ShapeDtypeStruct((b, p, d), jnp.float32)

    def score(index, feats):
        s, patch = scoring.image_scores_unchecked(index, feats, num_neighbors=config.num_neighbors,
                                                  query_block=min(search_common.QUERY_BLOCK, b * p),
                                                  num_nn=config.anomaly_scorer_num_nn)
        return s, fitted_lib.anomaly_maps(patch, (h, w), config)

    return 2 * b * p * d * 4 + 3 * largest_value(jax.make_jaxpr(score)(index, feats).jaxpr)
