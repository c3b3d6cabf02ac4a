"""Exact nearest-neighbour search of the memory bank: `brute` (tiled brute force, a matrix product for
GPU and TPU), `clustered` (an index that prunes, fastest on a CPU), `index` (search through either),
and `common` (what both share)."""
