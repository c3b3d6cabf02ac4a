"""What the published best ensemble costs per image on this machine: time and peak memory.

    python -m bench.ensemble_cost --size 224 --train 20 --test 8 [--json out.json]

WideResNet101-2 + ResNeXt101-32x8d + DenseNet201 (layer2/layer3, denseblock2/denseblock3), target
dimension 384, 1% coreset, k = 1, as the published sample_training.sh. Randomly initialised weights:
the cost is the same as with the pretrained ones (the accuracy is not). Fit and predict are timed
warm (a first call compiles); peak resident memory is the process's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings

import numpy as np


def main(argv=None) -> dict:
    from patchcore_jax import PatchCoreConfig, PatchCoreEnsemble
    from patchcore_jax.data import make_synthetic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="crop size (224 or 320 in the published runs)")
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    resize = round(args.size * 256 / 224)  # the published ratio: 256 -> 224, 366 -> 320
    shared = dict(resize=resize, crop=args.size, coreset_fraction=0.01, num_neighbors=1, target_dim=384, batch_size=4)
    data = make_synthetic(seed=0, n_train=args.train, n_test_good=args.test // 2, n_test_defect=args.test - args.test // 2,
                          size=resize + 32, margin=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ensemble = PatchCoreEnsemble([PatchCoreConfig(backbone=b, **shared)
                                      for b in ("wide_resnet101_2", "resnext101_32x8d", "densenet201")], progress=False)
    start = time.perf_counter()
    ensemble.fit(data["train"])
    fit_cold = time.perf_counter() - start
    start = time.perf_counter()
    ensemble.predict(data["test"][:4])
    predict_cold = time.perf_counter() - start
    times = []
    for _ in range(2):
        start = time.perf_counter()
        ensemble.predict(data["test"])
        times.append((time.perf_counter() - start) / len(data["test"]))
    figures = {
        "members": [m.config.backbone for m in ensemble.members],
        "resize": resize,
        "crop": args.size,
        "train_images": args.train,
        "fit_seconds_per_image_cold": round(fit_cold / args.train, 3),
        "predict_seconds_per_image_warm": round(min(times), 3),
        "predict_first_call_seconds_cold": round(predict_cold, 1),
        "bank_rows": [int(m.bank.shape[0]) for m in ensemble.members],
        "peak_resident_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
