"""Exact search through any prepared index: the brute-force `BankIndex` or the pruning
`ClusteredIndex`. Both answer the protocol of `search.common` (`search_traced`, `bank_rows`,
`distances_to`, `host_parts`), so nothing here needs to know which one it holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from patchcore_jax._src.stages import checks
from patchcore_jax._src.stages.search import common


def search(
    index, queries: jax.Array, k: int = 1, *, query_block: int = common.QUERY_BLOCK
) -> tuple[jax.Array, jax.Array]:
    """Exact k nearest rows of a prepared bank; shapes and meaning as `nearest_neighbors`.

    `index`: a `BankIndex` (`build_index`, brute force) or a `ClusteredIndex`
    (`build_clustered_index`, prunes); both give the same rows.

    A query whose difference from the bank mean overflows the dtype, or whose nearest distance does,
    gets inf or NaN distances (never a finite wrong one); check `jnp.isfinite` on the host if such
    inputs can occur. Nothing is checked on the device here, so nothing waits for a transfer, except
    that a clustered index on a CPU searches 512 or more queries per core from as many host threads
    (`ClusteredIndex.host_parts`) and returns when they are done; the results are the same bit for bit.
    """
    checks.check_width("queries", queries, "Q", index.rows.shape[1], "the bank")
    k = checks.check_int("k", k, low=1, high=index.size)
    query_block = min(checks.check_int("query_block", query_block, low=1), queries.shape[0])
    queries = jnp.asarray(queries)
    return common.in_parts(lambda part: index.search_traced(part, k=k, query_block=query_block),
                           index.host_parts(queries), queries)


def search_traced(index, queries, *, k, query_block):
    """Traceable exact search of any prepared index (`search` without the checks or host threads)."""
    return index.search_traced(queries, k=k, query_block=query_block)


def bank_rows(index, idx):
    """Bank rows `idx` of any prepared index, in the bank's units."""
    return index.bank_rows(idx)


def distances_to(index, centred_queries, idx):
    """Exact distances from `(b, D)` queries minus `index.centre` to the rows `idx` `(b, m)`, with the
    search's own arithmetic."""
    return index.distances_to(centred_queries, idx)
