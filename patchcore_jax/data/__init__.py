"""Data: image files, the paper's data sets (MVTec AD, MTD, mSTC) and a synthetic defect set."""

from patchcore_jax._src.io.data.synthetic import DEFECT_KINDS, make_synthetic
from patchcore_jax._src.model.images import check_image, list_images, read_image, read_mask

__all__ = ["DEFECT_KINDS", "check_image", "list_images", "make_synthetic", "read_image", "read_mask"]
