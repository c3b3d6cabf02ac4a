"""What a sweep costs against one `evaluate`: a grid of 8 cells over 2 categories vs one cell.

    python -m bench.sweep_cost [--train 10] [--test 6] [--size 224] [--json out.json]

An MVTec-layout tree of 2 synthetic categories (`--train` good training images, `--test` test images
each), WideResNet50-2 (randomly initialised: the cost is the pretrained one's), resize/crop 256/224,
the paper's defaults otherwise. The grid is coreset_fraction 0.01,0.1 x patch_size 3,5 x
anomaly_scorer_num_nn 1,3 (8 cells, one seed). Both are timed warm: a first run of each into a
throwaway folder compiles every program, then each runs once more into a fresh folder and is timed
(features are extracted again in the timed sweep: its folder is new). Prints the two times, their
ratio (target <= 3) and the sweep's seconds per stage summed over its units.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
import warnings

import numpy as np
from PIL import Image

GRID = ["coreset_fraction=0.01,0.1", "patch_size=3,5", "anomaly_scorer_num_nn=1,3"]


def make_tree(root: str, *, train: int, test: int, size: int) -> str:
    from patchcore_jax.data import make_synthetic

    for c, cat in enumerate(("alpha", "beta")):
        data = make_synthetic(seed=c, n_train=train, n_test_good=test // 2, n_test_defect=test - test // 2,
                              size=size, margin=16)
        for i, img in enumerate(data["train"]):
            _save(f"{root}/{cat}/train/good/{i:03d}.png", img)
        for i, (img, mask, label) in enumerate(zip(data["test"], data["masks"], data["labels"])):
            kind = "defect" if label else "good"
            _save(f"{root}/{cat}/test/{kind}/{i:03d}.png", img)
            if label:
                _save(f"{root}/{cat}/ground_truth/{kind}/{i:03d}_mask.png", (np.asarray(mask) > 0).astype(np.uint8) * 255)
    return root


def _save(path: str, array) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path)


def main(argv=None) -> dict:
    import patchcore_jax
    from patchcore_jax import PatchCoreConfig
    from patchcore_jax._src.app.evaluate import evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10)
    parser.add_argument("--test", type=int, default=6)
    parser.add_argument("--size", type=int, default=224, help="crop (resize = 256/224 of it)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="sweep-cost-")
    resize = round(args.size * 256 / 224)
    root = make_tree(os.path.join(work, "mvtec"), train=args.train, test=args.test, size=resize + 32)
    cfg = PatchCoreConfig(resize=resize, crop=args.size)
    cell = cfg.replace(coreset_fraction=0.1, patch_size=3, anomaly_scorer_num_nn=1)
    warnings.simplefilter("ignore")

    def run_evaluate(out):
        start = time.perf_counter()
        evaluate("mvtec", root, cell, out=os.path.join(work, out), heatmaps=0)
        return time.perf_counter() - start

    def run_sweep(out):
        start = time.perf_counter()
        patchcore_jax.sweep("mvtec", root, cfg, out=os.path.join(work, out), grid=GRID, seeds=[0])
        return time.perf_counter() - start

    cold = {"evaluate": run_evaluate("e0"), "sweep": run_sweep("s0")}
    warm = {"evaluate": run_evaluate("e1"), "sweep": run_sweep("s1")}
    stages = {}
    with open(os.path.join(work, "s1", "results.csv"), newline="") as f:
        for row in csv.DictReader(f):
            for k in ("extract_s", "features_s", "coreset_s", "score_s"):
                stages[k] = stages.get(k, 0.0) + float(row[k])
    result = {"images_per_category": {"train": args.train, "test": args.test}, "crop": args.size,
              "cold_s": cold, "warm_s": warm, "ratio_warm": warm["sweep"] / warm["evaluate"],
              "ratio_cold": cold["sweep"] / cold["evaluate"], "sweep_stage_s": stages}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
