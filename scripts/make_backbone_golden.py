"""Writes tests/data/backbone_golden_<arch>.npz: torchvision's layer2/layer3 outputs for weights drawn
by `patchcore_jax._synthetic_weights` and a fixed input, so CI can check the Flax port without torch.

Run once where torchvision is installed:  python scripts/make_backbone_golden.py
"""

import os
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from patchcore_jax import _synthetic_weights  # noqa: E402

SEED = 1234
ARCHS = ("wide_resnet50_2", "resnet18")


def main() -> None:
    out_dir = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
    for arch in ARCHS:
        model = getattr(torchvision.models, arch)(weights=None).eval()
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = _synthetic_weights.draw(shapes, SEED)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        images = _synthetic_weights.golden_input(SEED)
        feats = {}
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2)
            x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            for name in ("layer1", "layer2", "layer3"):
                x = getattr(model, name)(x)
                feats[name] = x.permute(0, 2, 3, 1).numpy()
        path = os.path.join(out_dir, f"backbone_golden_{arch}.npz")
        np.savez_compressed(path, images=images, seed=np.array(SEED), layer2=feats["layer2"], layer3=feats["layer3"],
                            torch_version=np.array(torch.__version__), torchvision_version=np.array(torchvision.__version__))
        print(path, {k: v.shape for k, v in feats.items()})


if __name__ == "__main__":
    main()
