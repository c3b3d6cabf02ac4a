"""The one image reader: every file the library, the commands and the data set readers open."""

from patchcore_jax._src.model.images import (  # noqa: F401 -- the public face
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    array_to_rgb8,
    check_image,
    display,
    list_images,
    pil_to_rgb8,
    read_image,
    read_mask,
)

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "array_to_rgb8", "check_image", "display", "list_images", "pil_to_rgb8",
           "read_image", "read_mask"]
