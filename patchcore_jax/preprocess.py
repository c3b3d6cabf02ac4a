"""Host preprocessing: every input form to the uint8 crop the model sees, masks and maps between frames."""

from patchcore_jax._src.model.preprocess import (  # noqa: F401 -- the public face
    GEOMETRIES,
    MASK_RULES,
    check_geometry,
    iter_images,
    load_image,
    map_to_frame,
    preprocess_image,
    preprocess_mask,
    preprocess_masks,
    resize_mask,
    resized_shape,
)

__all__ = ["GEOMETRIES", "MASK_RULES", "check_geometry", "iter_images", "load_image", "map_to_frame", "preprocess_image", "preprocess_mask", "preprocess_masks", "resize_mask", "resized_shape"]
