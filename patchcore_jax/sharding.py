"""PatchCore's stages across devices and hosts (`jax.sharding`): row-sharded bank, collective coreset and search."""

from patchcore_jax._src.run.sharding import (  # noqa: F401 -- the public face
    AXIS,
    build_index,
    greedy_coreset,
    image_scores,
    make_mesh,
    nearest_neighbors,
    replicate,
    row_sharding,
    shard_rows,
)
from patchcore_jax._src.run.multihost import ProcessFailed, process_share  # noqa: F401

__all__ = ["AXIS", "build_index", "greedy_coreset", "image_scores", "make_mesh", "nearest_neighbors", "replicate", "row_sharding", "shard_rows",
           "ProcessFailed", "process_share"]
