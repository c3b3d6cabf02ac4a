"""Writes tests/data/model-0.2.0/ and tests/data/model-0.2.0.npz: a small model folder as
patchcore-jax 0.2.0 saved it, and the scores and maps that 0.2.0 predicted with it on fixed
images, so later versions are held to loading it and predicting the same.

Run with the 0.2.0 release checked out (it has run once; its output is committed):
    python scripts/make_model_fixture.py
"""

import os
import shutil
import warnings

import numpy as np

from patchcore_jax import PatchCore, PatchCoreConfig
from patchcore_jax.data import make_synthetic

HERE = os.path.join(os.path.dirname(__file__), "..", "tests", "data")


def main():
    data = make_synthetic(seed=3, n_train=6, n_test_good=2, n_test_defect=2, size=72, margin=8)
    config = PatchCoreConfig(backbone="resnet18", layers=("layer1", "layer2"), resize=72, crop=64,
                             pretrain_dim=32, target_dim=32, num_neighbors=3, batch_size=4,
                             coreset_fraction=0.25, search="clustered")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PatchCore(config, progress=False).fit(data["train"])
    model.calibrate(data["train"][:3])
    out = os.path.join(HERE, "model-0.2.0")
    shutil.rmtree(out, ignore_errors=True)
    model.save(out)
    scores, maps = model.predict(data["test"])
    np.savez_compressed(os.path.join(HERE, "model-0.2.0.npz"), images=data["test"], scores=scores, maps=maps,
                        image_threshold=model.threshold, pixel_threshold=model.pixel_threshold.value)


if __name__ == "__main__":
    main()
