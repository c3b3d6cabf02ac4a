"""TFDS builders for MVTec AD, MTD and mSTC, written to array_record and read with `as_data_source()`.

Nothing here needs TensorFlow: arrays are stored as `tfds.features.Tensor(..., encoding=ZLIB)` (the
`Image` feature would need TensorFlow to encode arrays) and read back through random-access data
sources (`as_dataset()` would need TensorFlow). The records equal `datasets.load_sample`'s, at the
geometry of the builder's `resize` (256, the published setting), one builder config per category.

    builder = make_builder("mvtec", "bottle", data_dir=...)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MVTEC_ROOT))
    test = builder.as_data_source()["test"]          # test[i] -> {"image", "mask", "label", ...}
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from patchcore_jax._src.io.data import datasets
from patchcore_jax._src.model.geometry import ImageGeometry

RESIZE = 256


def _features():
    zlib = tfds.features.Encoding.ZLIB
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding=zlib),
        "mask": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding=zlib),
        "has_mask": np.bool_,
        "label": np.int64,
        "index": np.int64,
        "kind": tfds.features.Text(),
        "name": tfds.features.Text(),
    })


@dataclasses.dataclass
class CategoryConfig(tfds.core.BuilderConfig):
    category: str = ""


class _PaperDataset(tfds.core.GeneratorBasedBuilder):
    """Shared body: one category per config, `train` and `test` splits from the manual folder."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.1.0": "Masks stored as uint8 0..255 (not yet binarised); hidden files skipped.",
                     "1.2.0": "has_mask: False for a defect of a category without ground-truth masks."}
    DATASET = ""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features())

    def _split_generators(self, dl_manager):
        (category,) = datasets.load_categories(self.DATASET, str(dl_manager.manual_dir), [self.builder_config.category])
        return {
            "train": self._generate_examples(category.train, category.squash),
            "test": self._generate_examples(category.test, category.squash),
        }

    def _generate_examples(self, samples, squash):
        for i, sample in enumerate(samples):
            yield sample.name, {**datasets.load_sample(sample, geometry=ImageGeometry.square(RESIZE, squash=squash)), "index": i}


class PatchcoreMvtecAd(_PaperDataset):
    """MVTec AD (Bergmann et al., CVPR 2019), one config per category."""

    name = "patchcore_mvtec_ad"
    DATASET = "mvtec"
    BUILDER_CONFIGS = [CategoryConfig(name=c, category=c) for c in datasets.MVTEC_CATEGORIES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad (free for "
        "non-commercial use after accepting its licence), extract it, and pass the folder holding the 15 "
        "category folders (bottle, cable, ...) as manual_dir."
    )


class PatchcoreMtd(_PaperDataset):
    """Magnetic Tile Defects (Huang et al., 2018): 80/20 split of the defect-free tiles, fixed seed."""

    name = "patchcore_mtd"
    DATASET = "mtd"
    BUILDER_CONFIGS = [CategoryConfig(name="magnetic_tile", category="magnetic_tile")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Clone or download https://github.com/abin24/Magnetic-tile-defect-datasets. and pass the folder "
        "holding MT_Blowhole, MT_Break, MT_Crack, MT_Fray, MT_Free and MT_Uneven as manual_dir."
    )


class PatchcoreMstc(_PaperDataset):
    """ShanghaiTech Campus, every 5th frame (mSTC), one config per scene, frames at 256 x 256."""

    name = "patchcore_mstc"
    DATASET = "mstc"
    BUILDER_CONFIGS = [CategoryConfig(name=f"scene_{s}", category=s) for s in datasets.MSTC_SCENES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download ShanghaiTech Campus (https://svip-lab.github.io/dataset/campus_dataset.html), extract the "
        "training videos to frames as training/frames/<scene>_<clip>/<n>.jpg (e.g. with ffmpeg, numbered "
        "from 0), keep testing/frames, testing/test_frame_mask and testing/test_pixel_mask, and pass the "
        "folder holding training/ and testing/ as manual_dir."
    )


BUILDERS = {"mvtec": PatchcoreMvtecAd, "mtd": PatchcoreMtd, "mstc": PatchcoreMstc}


def config_name(dataset: str, category: str) -> str:
    return f"scene_{category}" if dataset == "mstc" else category


def make_builder(dataset: str, category: str, *, data_dir: str) -> tfds.core.DatasetBuilder:
    """The builder of one category, array_record format, under `data_dir`."""
    if dataset not in BUILDERS:
        raise ValueError(f"dataset: expected one of {sorted(BUILDERS)}, got {dataset!r}")
    names = [c.name for c in BUILDERS[dataset].BUILDER_CONFIGS]
    name = config_name(dataset, category)
    if name not in names:
        raise ValueError(f"category: {category!r} is not a {dataset} category ({', '.join(names)})")
    return BUILDERS[dataset](data_dir=data_dir, config=name, file_format="array_record")


def prepared_splits(dataset: str, category: str, *, root: str, data_dir: str) -> dict:
    """Prepares (once) and opens the category's splits as random-access data sources."""
    builder = make_builder(dataset, category, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    sources = builder.as_data_source()
    return {split: _Decoded(sources[split]) for split in ("train", "test")}


class _Decoded:
    """A data source in the readers' order (TFDS stores records by key hash; each carries its
    position as `index`), with text fields as `str`. A category read through TFDS and one read from
    folders thus feed the model the same batches and the coreset the same start rows."""

    def __init__(self, source):
        self.source = source
        self.order = np.argsort([int(source[i]["index"]) for i in range(len(source))])

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        rec = dict(self.source[int(self.order[i])])
        for key in ("kind", "name"):
            if isinstance(rec[key], bytes):
                rec[key] = rec[key].decode()
        return rec
