"""The image geometry as one value: how a picture becomes the crop the model sees, and how a map
goes back to the picture's frame.

`ImageGeometry(resize, crop, mode)` travels wherever the three settings used to travel as loose
arguments: the model's host stage, its masks and maps, the command line's header checks, the data set
readers and the TFDS builders. Its methods are `preprocess`'s functions with the geometry bound.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from patchcore_jax._src.model import preprocess
from patchcore_jax._src.model.images import MAX_PIXELS

MODES = preprocess.GEOMETRIES


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageGeometry:
    """`mode="center_crop"`: the shorter side resized to `resize` (PIL bilinear), then the centred
    `crop x crop` window (torchvision's Resize + CenterCrop, the published preprocessing);
    `mode="squash"`: the whole image resized to `crop x crop`, ignoring its aspect (mSTC)."""

    resize: int
    crop: int
    mode: str = "center_crop"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"geometry: expected one of {MODES}, got {self.mode!r}")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")

    @classmethod
    def square(cls, size: int, *, squash: bool = False) -> "ImageGeometry":
        """The geometry of a stored data set record: `size x size`, cropped or squashed."""
        return cls(resize=size, crop=size, mode="squash" if squash else "center_crop")

    @property
    def settings(self) -> dict:
        """As `preprocess`'s keyword arguments."""
        return {"resize": self.resize, "crop": self.crop, "geometry": self.mode}

    def check(self, height: int, width: int, *, name: str = "image", max_pixels: int | None = MAX_PIXELS) -> None:
        """Refuses (ValueError naming the image) one whose resized size would exceed `max_pixels`."""
        preprocess.check_geometry(height, width, **self.settings, name=name, max_pixels=max_pixels)

    def image(self, image, *, name: str = "image") -> np.ndarray:
        """One image -> the uint8 crop `(crop, crop, 3)` the model sees."""
        return preprocess.preprocess_image(image, **self.settings, name=name)

    def resize_mask(self, mask, *, name: str = "mask") -> np.ndarray:
        """One mask `(H, W)` -> `(crop, crop)` uint8, not yet binarised."""
        return preprocess.resize_mask(mask, **self.settings, name=name)

    def mask(self, mask, *, rule: str = "published", name: str = "mask") -> np.ndarray:
        """One mask `(H, W)` -> `(crop, crop)` bool, binarised by `rule`."""
        return preprocess.preprocess_mask(mask, **self.settings, rule=rule, name=name)

    def masks(self, masks, *, rule: str = "published") -> np.ndarray:
        """Masks `(B, H, W)` -> `(B, crop, crop)` bool."""
        return preprocess.preprocess_masks(masks, **self.settings, rule=rule)

    def to_frame(self, amap, size: tuple[int, int]) -> np.ndarray:
        """A map `(crop, crop)` -> `(H, W)` float32 in the original frame, NaN outside the crop."""
        return preprocess.map_to_frame(amap, size, **self.settings)
