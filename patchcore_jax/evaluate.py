"""`patchcore-jax evaluate`: the paper's protocol on MVTec AD, MTD and mSTC (see patchcore_jax.data)."""


def add_parser(sub) -> None:
    """Registered by the CLI; the subcommand itself lands with the data-set readers."""
