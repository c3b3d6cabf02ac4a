"""The streaming memory-bank builder: features in, coreset bank out, beyond memory."""

from patchcore_jax._src.stages.bank import (  # noqa: F401 -- the public face
    build_memory_bank,
)

__all__ = ["build_memory_bank"]
