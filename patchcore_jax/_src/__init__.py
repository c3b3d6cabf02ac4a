"""The implementation, in layers whose imports point one way (checked in CI, see pyproject.toml):

    app     the command line, evaluation, figures, diagnostics (the only importer of `reference`)
    api     the public objects: `PatchCore`, `PatchCoreEnsemble`, `load`
    io      model files, export, atomic files and checksums, the weights hub, output folders, data sets
    run     the executor: one device or a mesh, the scoring thread, progress callbacks
    model   configuration, backbone, weights, images and preprocessing, the fitted value, decisions
    stages  the numerics: aggregation, coreset, memory bank, search, scores, maps, metrics

Names here are public inside the package and private outside it; `patchcore_jax` re-exports the
public face (as optax keeps `optax/_src`).
"""
