"""The `patchcore-jax` command (`python -m patchcore_jax.cli` runs it too)."""

from patchcore_jax._src.app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
