"""Writes the backbone golden fixtures in tests/data, so CI can check the Flax ports without torch.

- `backbone_golden_<arch>.npz`, for the smallest member of each family (`VALUES`): torchvision's
  outputs at the architecture's two default taps (layer2 + layer3, denseblock2 + denseblock3) for
  weights drawn by `patchcore_jax._synthetic_weights` and a fixed input.
- `backbone_structure.json.gz`, for every architecture of `patchcore_jax.backbone.ARCHITECTURES`:
  torchvision's state-dict key -> shape, and each tap's output shape (C, h, w) at 224 x 224. CI checks
  the larger members (ResNeXt101, DenseNet169/201, ...) against it by structure, without a forward pass.

Run where torchvision is installed:
  python scripts/make_backbone_golden.py                      # everything
  python scripts/make_backbone_golden.py densenet121 structure  # only these
"""

import gzip
import json
import os
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests import synthetic_weights as _synthetic_weights  # noqa: E402
from patchcore_jax._src.model import backbone

SEED = 1234
# arch -> input shape (B, H, W, 3). The newer fixtures use odd sizes, so that the stride-2 stages
# (max pooling, DenseNet's 2x2 average pooling in floor mode) meet odd inputs; the files stay small.
VALUES = {
    "wide_resnet50_2": (2, 64, 64, 3),
    "resnet18": (2, 64, 64, 3),
    "resnext50_32x4d": (2, 56, 40, 3),
    "densenet121": (2, 56, 40, 3),
}
OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "tests", "data")


def write_values(arch: str) -> None:
    model = _synthetic_weights.torchvision_model(arch, SEED)
    images = _synthetic_weights.golden_input(SEED, VALUES[arch])
    taps = backbone.default_layers(arch)
    feats = _synthetic_weights.torchvision_taps(model, images, taps)
    path = os.path.join(OUT_DIR, f"backbone_golden_{arch}.npz")
    versions = dict(torch_version=np.array(torch.__version__), torchvision_version=np.array(torchvision.__version__))
    np.savez_compressed(path, images=images, seed=np.array(SEED), **feats, **versions)
    print(path, {k: v.shape for k, v in feats.items()}, f"{os.path.getsize(path)} bytes")


def write_structure() -> None:
    out = {"torch_version": torch.__version__, "torchvision_version": torchvision.__version__, "architectures": {}}
    images = np.zeros((1, 224, 224, 3), np.float32)
    for arch in backbone.ARCHITECTURES:
        model = getattr(torchvision.models, arch)(weights=None).eval()
        taps = _synthetic_weights.torchvision_taps(model, images, backbone.layer_names(arch))
        out["architectures"][arch] = {
            "state": {k: list(v.shape) for k, v in model.state_dict().items()},
            "taps_224": {k: [v.shape[3], v.shape[1], v.shape[2]] for k, v in taps.items()},
        }
        print(arch, out["architectures"][arch]["taps_224"])
    path = os.path.join(OUT_DIR, "backbone_structure.json.gz")
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same content gives the same bytes
        f.write(json.dumps(out, sort_keys=True).encode())
    print(path, f"{os.path.getsize(path)} bytes")


def main(argv) -> None:
    targets = argv or [*VALUES, "structure"]
    unknown = sorted(set(targets) - set(VALUES) - {"structure"})
    if unknown:
        raise SystemExit(f"unknown targets {unknown}; expected some of {[*VALUES, 'structure']}")
    for target in targets:
        if target == "structure":
            write_structure()
        else:
            write_values(target)


if __name__ == "__main__":
    main(sys.argv[1:])
