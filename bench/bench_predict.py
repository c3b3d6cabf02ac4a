"""`predict` end to end, images per second: this library against the published pipeline.

Both contenders score the same PNG files (900 x 900 woven textures, decoded from disk), with the same
WideResNet50-2 weights (randomly initialised from one seed and handed to both: no pretrained weights
exist here; the cost is the same), at 224 px, against the same memory bank: this library's fit on 250
training images of the same synthetic category (10% coreset, about 19.6k x 1024 rows), k = 1, in
batches of 8:

- jax: `PatchCore.predict_iter(paths)` (decode and preprocess on the host, one compiled device stage:
  backbone, aggregation, exact search with the clustered index, Eq. 7 with b = 1, maps).
- published: what the published PatchCore runs (written here after its code): PIL +
  torchvision `Resize(256)`, `CenterCrop(224)`, `ToTensor`, `Normalize`; torchvision's
  wide_resnet50_2 to layer3; its PatchMaker (Unfold, bilinear interpolation of layer3's planes,
  adaptive average pooling to 1024 twice); faiss `IndexFlatL2` (k = 1); image score = max patch score;
  its RescaleSegmentor (bilinear to 224, `scipy.ndimage.gaussian_filter(sigma=4)`).

Cold (the first call of a fresh process: compilation and first-touch costs) and warm (later calls) are
reported separately, in `extra_info`. Run each contender in its own process (faiss needs torch and
faiss-cpu; the published one is skipped without them):

    python -m bench.separate bench/bench_predict.py --out predict.json && python bench/report.py predict.json
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

N_IMAGES = 32
BATCH = 8
SEED = 0


N_TRAIN = 250  # training images the bank is fitted on (a 10% coreset of their patches: about 19.6k rows)


def _category(tmp_dir: str, weights: str) -> tuple[list[str], str]:
    """One synthetic category at 900 px: the test images as PNG files and the bank fitted (by this
    library, 10% coreset) on its training images, both cached. The bank must come from the category
    the test images belong to, as in any PatchCore run: the exact search prunes by how near a query
    lies to the bank (a first version scored these images against a bank of other images, 256 px
    textures, and its queries lay 7.6 times farther from the bank than the category's own)."""
    from PIL import Image

    from patchcore_jax import PatchCore, PatchCoreConfig
    from patchcore_jax.data import make_synthetic

    folder = os.path.join(tmp_dir, f"predict-900-{N_TRAIN}")
    paths = [os.path.join(folder, f"{i:03d}.png") for i in range(N_IMAGES)]
    bank_path = os.path.join(folder, "bank.npy")
    if not (all(os.path.exists(p) for p in paths) and os.path.exists(bank_path)):
        os.makedirs(folder, exist_ok=True)
        data = make_synthetic(seed=1, n_train=N_TRAIN, n_test_good=N_IMAGES // 2,
                              n_test_defect=N_IMAGES - N_IMAGES // 2, size=900, margin=64)
        for p, image in zip(paths, data["test"]):
            Image.fromarray(image).save(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PatchCore(PatchCoreConfig(weights=weights, coreset_fraction=0.1, batch_size=BATCH), progress=False)
        model.fit(data["train"])
        np.save(bank_path + ".tmp.npy", np.asarray(model.bank))
        os.replace(bank_path + ".tmp.npy", bank_path)
    return paths, bank_path


def _weights(tmp_dir: str) -> str:
    from patchcore_jax._src.model import weights
    from patchcore_jax._src.model.backbone import build

    path = os.path.join(tmp_dir, "wrn50-seed0.safetensors")
    if not os.path.exists(path):
        weights.save_safetensors(weights.state_dict_of(build("wide_resnet50_2", ("layer2", "layer3"), seed=SEED)), path)
    return path


@pytest.fixture(scope="module")
def setting():
    return make_setting()


def make_setting() -> dict:
    """The shared inputs: image files, the weights file, the bank (cached under bench.real_features.CACHE)."""
    from bench import real_features

    cache = real_features.CACHE
    os.makedirs(cache, exist_ok=True)
    weights = _weights(cache)
    paths, bank_path = _category(cache, weights)
    return {"paths": paths, "weights": weights, "bank": np.load(bank_path)}


def _timed(benchmark, run, paths):
    start = time.perf_counter()
    run(paths)
    cold = time.perf_counter() - start
    benchmark.pedantic(run, args=(paths,), rounds=3, iterations=1)
    warm = benchmark.stats.stats.min
    benchmark.extra_info.update(images=len(paths), cold_seconds=round(cold, 2), cold_images_per_second=round(len(paths) / cold, 2),
                                warm_images_per_second=round(len(paths) / warm, 2))


GROUP = "predict end to end, WRN50-2 224 px, 19.6k bank, k=1"


def jax_runner(setting):
    """`run(paths) -> image scores` through this library."""
    from patchcore_jax import PatchCore, PatchCoreConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PatchCore(PatchCoreConfig(weights=setting["weights"], num_neighbors=1, batch_size=BATCH), progress=False)
    model.set_bank(setting["bank"])

    def run(paths):
        return [p.score for p in model.predict_iter(paths)]

    return run


def published_runner(setting):
    """`run(paths) -> image scores` through the published pipeline (squared L2, as faiss gives)."""
    import faiss
    import scipy.ndimage
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.numpy import load_file
    from torchvision import models, transforms

    torch.set_grad_enabled(False)
    net = models.wide_resnet50_2()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(setting["weights"]).items()}, strict=False)
    net.eval()
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    index = faiss.IndexFlatL2(setting["bank"].shape[1])
    index.add(np.ascontiguousarray(setting["bank"], np.float32))
    unfold = torch.nn.Unfold(kernel_size=3, stride=1, padding=1)

    def patchify(x):
        b, c = x.shape[:2]
        h, w = x.shape[2:]
        return unfold(x).reshape(b, c, 3, 3, -1).permute(0, 4, 1, 2, 3), (h, w)

    def embed(images):
        """The published PatchCore._embed: layer2 and layer3, PatchMaker, MeanMapper, Aggregator."""
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        l2 = net.layer2(net.layer1(x))
        l3 = net.layer3(l2)
        (p2, s2), (p3, s3) = patchify(l2), patchify(l3)
        p3 = p3.reshape(p3.shape[0], s3[0], s3[1], *p3.shape[2:]).permute(0, 3, 4, 5, 1, 2)  # (B, C, 3, 3, h3, w3)
        base = p3.shape
        p3 = F.interpolate(p3.reshape(-1, *s3).unsqueeze(1), size=s2, mode="bilinear", align_corners=False)
        p3 = p3.squeeze(1).reshape(*base[:-2], *s2).permute(0, 4, 5, 1, 2, 3)  # (B, h2, w2, C, 3, 3)
        p3 = p3.reshape(len(p3), -1, *p3.shape[-3:])
        layers = [p.reshape(-1, *p.shape[-3:]) for p in (p2, p3)]
        pooled = [F.adaptive_avg_pool1d(f.reshape(len(f), 1, -1), 1024).squeeze(1) for f in layers]
        stacked = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
        return F.adaptive_avg_pool1d(stacked, 1024).reshape(len(stacked), -1), s2

    def run(paths):
        scores = []
        for start in range(0, len(paths), BATCH):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start : start + BATCH]])
            feats, (h, w) = embed(batch)
            dist, _ = index.search(feats.numpy(), 1)
            patch = dist.reshape(len(batch), h, w)
            scores += list(patch.reshape(len(batch), -1).max(axis=1))
            maps = F.interpolate(torch.from_numpy(patch).unsqueeze(1), size=224, mode="bilinear", align_corners=False)
            [scipy.ndimage.gaussian_filter(m, sigma=4) for m in maps.squeeze(1).numpy()]
        return scores

    return run


def test_predict_jax(benchmark, setting):
    benchmark.group = GROUP
    _timed(benchmark, jax_runner(setting), setting["paths"])


def test_predict_published_faiss(benchmark, setting):
    for module in ("torch", "torchvision", "faiss"):
        pytest.importorskip(module)
    benchmark.group = GROUP
    _timed(benchmark, published_runner(setting), setting["paths"])
