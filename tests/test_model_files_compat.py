"""Model folders saved by earlier releases still load and predict as they did.

tests/data/model-0.2.0/ was written by patchcore-jax 0.2.0 (scripts/make_model_fixture.py), with the
scores and maps 0.2.0 predicted from it on fixed images (tests/data/model-0.2.0.npz).
"""

import os

import numpy as np

import patchcore_jax
from tests.helpers import assert_close

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_a_0_2_0_model_folder_loads_and_predicts_as_0_2_0_did():
    want = np.load(os.path.join(DATA, "model-0.2.0.npz"))
    model = patchcore_jax.load(os.path.join(DATA, "model-0.2.0"), progress=False)
    assert isinstance(model, patchcore_jax.PatchCore)
    assert model.config.backbone == "resnet18" and model.config.layers == ("layer1", "layer2")
    assert model.threshold == float(want["image_threshold"])
    assert model.pixel_threshold.value == float(want["pixel_threshold"])
    scores, maps = model.predict(want["images"])
    assert_close(scores, want["scores"])
    assert_close(maps, want["maps"])
    same = patchcore_jax.PatchCore.load(os.path.join(DATA, "model-0.2.0"), progress=False)
    assert_close(same.predict(want["images"])[0], want["scores"])
