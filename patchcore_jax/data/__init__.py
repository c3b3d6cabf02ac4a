"""Data: image files, the paper's data sets (MVTec AD, MTD, mSTC) and a synthetic defect set."""

from patchcore_jax.data.images import list_images, preprocess_masks, read_image, read_mask
from patchcore_jax.data.synthetic import make_synthetic

__all__ = ["list_images", "make_synthetic", "preprocess_masks", "read_image", "read_mask"]
