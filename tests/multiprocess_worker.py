"""One process of the two-process test: joins `jax.distributed` on localhost (CPU collectives over
gloo), holds half of a row-sharded bank, runs the sharded coreset, search and scores, and prints them
next to a single-device computation on the full bank, as JSON. Then it fits `PatchCore(CONFIG,
mesh="all")` on its own share of the training images of a folder and scores its own share of the test
images, and writes the bank, scores and maps to `<out>.<process>.npz` (the test compares them with one
process fitted on all the images)."""

import json
import os
import sys
import warnings

import jax
import numpy as np


# The model of the two-process fit (the test fits the same on one process).
CONFIG = dict(backbone="resnet18", resize=64, crop=64, pretrain_dim=64, target_dim=64, num_neighbors=3, batch_size=2)


def fit_and_predict(folder: str, out: str) -> None:
    """Fits on this process's share of `folder/train` and scores its share of `folder/test`."""
    from patchcore_jax import PatchCore, PatchCoreConfig
    from patchcore_jax.sharding import process_share

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-initialisation warning
        model = PatchCore(PatchCoreConfig(**CONFIG), progress=False, mesh="all")
    model.fit(process_share(os.path.join(folder, "train")))
    test = process_share(os.path.join(folder, "test"))
    scores, maps = model.predict(test)
    # An unreadable file on process 1 stops both: process 1 with its own error, process 0 told so.
    broken = test[:1] + [os.path.join(folder, "broken.png")] if jax.process_index() == 1 else test[:2]
    try:
        model.predict(broken)
        error = ""
    except Exception as err:
        error = type(err).__name__
    features = model.embed_crops(np.stack([model.prepare(t) for t in test]))  # a collective call too
    np.savez(f"{out}.{jax.process_index()}.npz", bank=model.fitted().bank, scores=scores, maps=maps,
             names=np.array([os.path.basename(t) for t in test]), error=np.array(error), features=features)


def main(process_id: int, port: int, folder: str | None = None, out: str | None = None) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import patchcore_jax as pj
    from patchcore_jax._src.run import sharding

    rng = np.random.default_rng(0)
    bank = (rng.normal(size=(400, 12)) + 3).astype(np.float32)
    queries = (rng.normal(size=(9, 12)) + 3).astype(np.float32)
    feats = (rng.normal(size=(2, 10, 12)) + 3).astype(np.float32)
    proj = np.asarray(rng.uniform(-0.3, 0.3, size=(12, 4)), np.float32)
    mesh = sharding.make_mesh()
    # Each process supplies only the rows of its own devices.
    global_bank = jax.make_array_from_callback(bank.shape, sharding.row_sharding(mesh), lambda idx: bank[idx])
    local_rows = sum(s.data.shape[0] for s in global_bank.addressable_shards)
    sel = np.asarray(sharding.greedy_coreset(global_bank, 40, projection=proj, start_indices=(1, 7), mesh=mesh))
    dist, idx = sharding.nearest_neighbors(bank, queries, 3, mesh=mesh)
    scores, patch = sharding.image_scores(bank, feats, num_neighbors=5, mesh=mesh)
    with jax.default_device(jax.local_devices()[0]):
        want_sel = np.asarray(pj.greedy_coreset(bank, 40, projection=proj, start_indices=(1, 7)))
        want_d, want_i = pj.nearest_neighbors(bank, queries, 3)
        want_s, _ = pj.image_scores(bank, feats, num_neighbors=5)
    print(json.dumps({
        "process": process_id,
        "devices": len(jax.devices()),
        "local_rows": local_rows,
        "coreset_equal": bool(np.array_equal(sel, want_sel)),
        "indices_equal": bool(np.array_equal(np.asarray(idx), np.asarray(want_i))),
        "max_dist_diff": float(np.abs(np.asarray(dist) - np.asarray(want_d)).max()),
        "max_score_diff": float(np.abs(np.asarray(scores) - np.asarray(want_s)).max()),
    }))
    if folder is not None:
        fit_and_predict(folder, out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5])
