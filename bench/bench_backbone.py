"""Backbone forward, WRN50-2 up to layer3, 8 images 224x224: the Flax port (compiled once) vs
torchvision on the CPU when installed. extra_info holds images per second."""

import numpy as np
import pytest

from bench.conftest import HAS_TORCHVISION, gaussian, timed_jax

BATCH = (8, 224, 224, 3)


def test_jax(benchmark):
    import warnings

    from patchcore_jax._src.model import backbone

    benchmark.group = "backbone WRN50-2 layer2+3, 8 x 224x224"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract = backbone.feature_extractor("wide_resnet50_2")
    x = gaussian(0, BATCH)
    timed_jax(benchmark, extract, x, rounds=3, compiled=(extract.apply,))
    benchmark.extra_info["images_per_second"] = round(8 / benchmark.stats.stats.min, 2)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
def test_torchvision(benchmark):
    import torch
    import torchvision

    benchmark.group = "backbone WRN50-2 layer2+3, 8 x 224x224"
    model = torchvision.models.wide_resnet50_2(weights=None).eval()
    x = torch.from_numpy(np.ascontiguousarray(gaussian(0, BATCH).transpose(0, 3, 1, 2)))

    def forward():
        with torch.no_grad():
            h = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
            return h, model.layer3(h)

    forward()
    benchmark.pedantic(forward, rounds=3, iterations=1)
    benchmark.extra_info["images_per_second"] = round(8 / benchmark.stats.stats.min, 2)
