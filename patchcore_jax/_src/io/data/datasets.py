"""Readers for the paper's data sets, from the user's own copies (nothing is downloaded).

Each reader turns a folder into categories of `Sample`s; `FolderSplit` loads them at the published
geometry; `patchcore_jax.data.tfds_builders` writes the same arrays to TFDS array_record files. Both
give records `{image (S, S, 3) uint8, mask (S, S) uint8 0..255, has_mask, label, kind, name}` with `S = resize`,
made by the one reader (`data.images`) and the one preprocessing (`patchcore_jax.preprocess`): the
shorter side resized to `resize` (PIL bilinear, as torchvision's Resize on PIL images), then a centred
`S x S` crop (or, for squashed categories, the whole frame resized to `S x S`). The model's own
preprocessing then takes its centre crop (224); a centre crop of a centre crop is the centre crop, so
this is bit for bit the published Resize(256) + CenterCrop(224), and the same crop a file gets through
`PatchCore.predict`. Masks take the same geometry as 8-bit images and are binarised after the final
crop (`preprocess.preprocess_mask`; by default only pixels at 255, as the published evaluation).
Hidden files, non-image files and folders written by patchcore-jax are skipped (`list_images`).

Layouts:
  MVTec AD: <cat>/train/good/*.png, <cat>/test/<defect|good>/*.png,
            <cat>/ground_truth/<defect>/<name>_mask.png (0/255).
  MTD:      MT_<Kind>/Imgs/<name>.jpg with <name>.png masks; MT_Free holds the defect-free tiles, 20% of
            which (fixed seed) are held out for testing.
  mSTC:     training/frames/<scene>_<clip>/<n>.jpg (extracted frames), testing/frames/<scene>_<clip>/<n>.jpg,
            testing/test_frame_mask/<scene>_<clip>.npy (T,), testing/test_pixel_mask/<scene>_<clip>.npy
            (T, H, W); every 5th frame; frames squashed to 256 x 256 (the mSTC protocol).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from patchcore_jax._src.model.geometry import ImageGeometry
from patchcore_jax._src.model.images import display, list_images, read_image, read_mask

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
)
MSTC_SCENES = tuple(f"{i:02d}" for i in range(1, 13))
DATASETS = ("mvtec", "mtd", "mstc")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image of a split. `mask` is a mask image path, an `.npy` stack (with `mask_index`), or
    None (all good)."""

    image: str
    label: int
    kind: str
    name: str
    mask: str | None = None
    mask_index: int | None = None


@dataclasses.dataclass(frozen=True)
class Category:
    name: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    squash: bool = False  # resize to a square ignoring the aspect (mSTC) instead of shorter side + crop

    def geometry(self, size: int) -> ImageGeometry:
        """The geometry of this category's records at `size x size` (its protocol's: cropped or squashed)."""
        return ImageGeometry.square(size, squash=self.squash)
    has_masks: bool = True  # False: labels only (an MVTec-style tree without ground_truth/)


def _images_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise ValueError(f"{display(folder)}: missing folder")
    return list_images(folder, recursive=False)


def _folders_in(folder: str) -> list[str]:
    """Names of the visible sub-folders (symlinks followed), sorted."""
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def mvtec(root: str, categories=None) -> list[Category]:
    """MVTec AD categories under `root` (all that are present, or the named ones)."""
    if not os.path.isdir(root):
        raise ValueError(f"{root}: missing folder (expected MVTec AD's category folders)")
    if categories is None:
        categories = [c for c in _folders_in(root) if os.path.isdir(os.path.join(root, c, "train", "good"))]
        if not categories:
            raise ValueError(f"{root}: no MVTec AD category (a folder with train/good) found")
    out = []
    for cat in categories:
        base = os.path.join(root, cat)
        train = [Sample(p, 0, "good", f"train/good/{_stem(p)}") for p in _images_in(os.path.join(base, "train", "good"))]
        if not train:
            raise ValueError(f"{os.path.join(base, 'train', 'good')}: no training images")
        test_root = os.path.join(base, "test")
        if not os.path.isdir(test_root):
            raise ValueError(f"{test_root}: missing folder")
        test = labelled_samples(test_root, os.path.join(base, "ground_truth"), prefix="test")
        out.append(Category(cat, tuple(train), tuple(test), has_masks=os.path.isdir(os.path.join(base, "ground_truth"))))
    return out


def labelled_samples(folder: str, ground_truth: str, *, prefix: str) -> list[Sample]:
    """MVTec's test layout: `folder/good/*` nominal, `folder/<kind>/*` defective, with masks
    `ground_truth/<kind>/<name>_mask.png` for every defect when `ground_truth` exists (labels only
    when it does not)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{display(folder)}: missing folder")
    with_masks = os.path.isdir(ground_truth)
    samples = []
    for kind in _folders_in(folder):
        if os.path.realpath(os.path.join(folder, kind)) == os.path.realpath(ground_truth):
            continue
        for p in _images_in(os.path.join(folder, kind)):
            name = f"{prefix}/{kind}/{_stem(p)}"
            if kind == "good":
                samples.append(Sample(p, 0, "good", name))
                continue
            mask = None
            if with_masks:
                mask = os.path.join(ground_truth, kind, f"{_stem(p)}_mask.png")
                if not os.path.isfile(mask):
                    raise ValueError(f"{display(p)}: test image without its mask (expected {display(mask)}; "
                                     f"{display(ground_truth)} exists, so every defect needs one)")
            samples.append(Sample(p, 1, kind, name, mask))
    if not samples:
        raise ValueError(f"{display(folder)}: no test images")
    return samples


def validation_layout(folder: str) -> tuple[str, str | None]:
    """Where a labelled validation set's images and masks are: `(test folder, ground-truth folder or
    None)`. Accepts MVTec AD's layout at either level: a category folder (`folder/test/<kind>/` with
    `folder/ground_truth/<kind>/<name>_mask.png`), its `test/` folder (masks in the sibling
    `../ground_truth/`), or a folder holding `good/`, defect folders and its own `ground_truth/`."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{display(folder)}: missing folder")
    test = folder
    if not os.path.isdir(os.path.join(folder, "good")) and os.path.isdir(os.path.join(folder, "test")):
        test = os.path.join(folder, "test")  # a category folder
    for gt in (os.path.join(test, "ground_truth"), os.path.join(os.path.dirname(os.path.abspath(test)), "ground_truth")):
        if os.path.isdir(gt):
            return test, gt
    return test, None


def labelled_folder(folder: str) -> tuple[list[str], np.ndarray, list[str | None] | None]:
    """A user's labelled validation folder in MVTec's layout (see `validation_layout`): `(image paths,
    labels (N,), mask paths or None per image, or None without masks)`."""
    test, gt = validation_layout(folder)
    samples = labelled_samples(test, gt or os.path.join(test, "ground_truth"), prefix=os.path.basename(test))
    return ([s.image for s in samples], np.array([s.label for s in samples]),
            [s.mask for s in samples] if gt is not None else None)


def mtd(root: str, *, seed: int = 0, holdout: float = 0.2) -> list[Category]:
    """Magnetic Tile Defects as one category: 80% of MT_Free for training, 20% and all defects for testing."""
    free_dir = os.path.join(root, "MT_Free", "Imgs")
    free = [p for p in _images_in(free_dir) if p.lower().endswith((".jpg", ".jpeg"))]
    if not free:
        raise ValueError(f"{free_dir}: no defect-free .jpg tiles")
    order = np.random.default_rng(seed).permutation(len(free))
    n_test = int(round(holdout * len(free)))
    test_idx, train_idx = set(order[:n_test].tolist()), order[n_test:]
    train = tuple(Sample(free[i], 0, "good", f"MT_Free/{_stem(free[i])}") for i in sorted(train_idx))
    test = [Sample(free[i], 0, "good", f"MT_Free/{_stem(free[i])}") for i in sorted(test_idx)]
    kinds = [d for d in _folders_in(root) if d.startswith("MT_") and d != "MT_Free"]
    for kind in kinds:
        imgs = os.path.join(root, kind, "Imgs")
        for p in _images_in(imgs):
            if not p.lower().endswith((".jpg", ".jpeg")):
                continue
            mask = os.path.join(imgs, f"{_stem(p)}.png")
            if not os.path.isfile(mask):
                raise ValueError(f"{p}: test image without its mask (expected {mask})")
            test.append(Sample(p, 1, kind[3:].lower(), f"{kind}/{_stem(p)}", mask))
    return [Category("magnetic_tile", train, tuple(test))]


def _frames(folder: str, step: int) -> list[tuple[int, str]]:
    frames = []
    for p in _images_in(folder):
        if re.fullmatch(r"\d+", _stem(p)):
            frames.append((int(_stem(p)), p))
    frames.sort()
    return frames[::step]


def mstc(root: str, scenes=None, *, step: int = 5) -> list[Category]:
    """ShanghaiTech Campus, every `step`-th frame, one category per scene."""
    train_root = os.path.join(root, "training", "frames")
    test_root = os.path.join(root, "testing", "frames")
    for d in (train_root, test_root):
        if not os.path.isdir(d):
            raise ValueError(f"{d}: missing folder (training clips must be extracted to frames)")
    clips = _folders_in
    present = sorted({c.split("_")[0] for c in clips(train_root) + clips(test_root)})
    scenes = present if scenes is None else list(scenes)
    out = []
    for scene in scenes:
        train = [Sample(p, 0, "good", f"train/{c}/{n}") for c in clips(train_root) if c.split("_")[0] == scene
                 for n, p in _frames(os.path.join(train_root, c), step)]
        test = []
        for c in (c for c in clips(test_root) if c.split("_")[0] == scene):
            labels_file = os.path.join(root, "testing", "test_frame_mask", f"{c}.npy")
            pixels_file = os.path.join(root, "testing", "test_pixel_mask", f"{c}.npy")
            for f in (labels_file, pixels_file):
                if not os.path.isfile(f):
                    raise ValueError(f"{os.path.join(test_root, c)}: test clip without {f}")
            labels = _load_npy(labels_file)
            for n, p in _frames(os.path.join(test_root, c), step):
                if n >= len(labels):
                    raise ValueError(f"{p}: frame {n} has no label in {labels_file} ({len(labels)} frames)")
                label = int(labels[n] > 0)
                test.append(Sample(p, label, "anomaly" if label else "good", f"test/{c}/{n}", pixels_file, n))
        if not train or not test:
            raise ValueError(f"{root}: scene {scene} needs training and test frames")
        out.append(Category(scene, tuple(train), tuple(test), squash=True))
    return out


def load_categories(dataset: str, root: str, categories=None) -> list[Category]:
    if dataset == "mvtec":
        return mvtec(root, categories)
    if dataset == "mtd":
        cats = mtd(root)
        return [c for c in cats if categories is None or c.name in categories]
    if dataset == "mstc":
        return mstc(root, categories)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{display(path)}: not a readable .npy array ({err})") from None


def load_sample(sample: Sample, *, geometry: ImageGeometry) -> dict:
    """The record of one sample at the data geometry (`Category.geometry`; see the module docstring)."""
    raw = read_image(sample.image)
    image = geometry.image(raw, name=display(sample.image))
    size = geometry.crop
    if sample.mask is None:
        mask = np.zeros((size, size), np.uint8)  # a good image, or a defect of a category without masks
    else:
        if sample.mask.endswith(".npy"):
            stack = _load_npy(sample.mask)
            if stack.ndim != 3 or sample.mask_index >= len(stack):
                raise ValueError(f"{display(sample.mask)}: expected (T, H, W) masks with frame {sample.mask_index}, "
                                 f"got shape {stack.shape}")
            m = np.where(stack[sample.mask_index] > 0, 255, 0).astype(np.uint8)
        else:
            m = read_mask(sample.mask)
        if m.shape != raw.shape[:2]:
            raise ValueError(f"{display(sample.mask)}: mask is {m.shape[1]}x{m.shape[0]} but its image "
                             f"{display(sample.image)} is {raw.shape[1]}x{raw.shape[0]}")
        mask = geometry.resize_mask(m, name=display(sample.mask))
    return {"image": image, "mask": mask, "has_mask": sample.label == 0 or sample.mask is not None,
            "label": sample.label, "kind": sample.kind, "name": sample.name}


class FolderSplit:
    """Random access to a list of samples, loaded from files on demand."""

    def __init__(self, samples, *, geometry: ImageGeometry):
        self.samples, self.geometry = tuple(samples), geometry

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return load_sample(self.samples[i], geometry=self.geometry)
