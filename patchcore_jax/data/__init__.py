"""Data: image files, the paper's data sets (MVTec AD, MTD, mSTC) and a synthetic defect set."""

from patchcore_jax.data.images import check_image, list_images, read_image, read_mask
from patchcore_jax.data.synthetic import make_synthetic

__all__ = ["check_image", "list_images", "make_synthetic", "read_image", "read_mask"]
