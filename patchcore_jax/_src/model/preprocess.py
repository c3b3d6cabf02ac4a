"""The one preprocessing, on the host: every image becomes the same uint8 crop whichever way it enters.

Geometry, as the published PatchCore's torchvision transforms on PIL images:
- `center_crop` (default): `Resize(resize)` (the shorter side becomes `resize`, the longer
  `int(resize * long / short)`, PIL bilinear) then `CenterCrop(crop)` (`top = round((h - crop) / 2)`).
- `squash`: the whole image resized to `crop x crop`, ignoring its aspect (the mSTC protocol).
Normalisation (ImageNet mean and std, after `/ 255`) happens on the device, so the host hands the
device one fixed shape `(batch, crop, crop, 3)` uint8 per configuration, whatever the input sizes.

Masks take the same geometry as 8-bit images (PIL bilinear) and are binarised afterwards:
- `published` (default): a pixel is defective only where the resized mask is exactly 255 (the published
  code's `ToTensor()` then `mask.astype(int)`, so only 1.0 counts).
- `half`: where the resized mask is at least 128 (>= 0.5 of its range).

Library input (`iter_images`) is read by one rule that cannot misread an array: a 4-D array is a batch
`(B, H, W, C)`; a list (or any iterable) holds single images `(H, W)`, `(H, W, C)`, PIL images, file
paths, or batches `(B, H, W, C)`; a path to a folder stands for its images. A bare 2-D or 3-D array is
refused, with a message saying how to pass it (`(224, 224, 3)` could be one image or 224 grayscale
ones).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from patchcore_jax._src.model.images import MAX_PIXELS, array_to_rgb8, display, list_images, pil_to_rgb8, read_image

GEOMETRIES = ("center_crop", "squash")
MASK_RULES = ("published", "half")


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(size)`: the shorter side becomes `size`, the longer keeps the aspect."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _geometry(height: int, width: int, *, resize: int, crop: int, geometry: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """`((resized_h, resized_w), (top, left))` of the crop window in the resized image."""
    if geometry == "squash":
        return (crop, crop), (0, 0)
    rh, rw = resized_shape(height, width, resize)
    return (rh, rw), (int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0)))


def check_geometry(height: int, width: int, *, resize: int, crop: int, geometry: str = "center_crop",
                   name: str = "image", max_pixels: int | None = MAX_PIXELS) -> None:
    """Refuses (ValueError naming the image) an image whose resized size would exceed `max_pixels`
    (e.g. 1 x 3000 pixels: its shorter side to 256 makes it 256 x 768000)."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry: expected one of {GEOMETRIES}, got {geometry!r}")
    (rh, rw), _ = _geometry(height, width, resize=resize, crop=crop, geometry=geometry)
    if max_pixels is not None and rh * rw > max_pixels:
        raise ValueError(f"{name}: {width}x{height} pixels would be resized to {rw}x{rh} (shorter side {resize}), "
                         f"more than the limit of {max_pixels} pixels; crop it to a less elongated shape first")


def _apply(im: Image.Image, *, resize: int, crop: int, geometry: str, name: str, max_pixels: int | None) -> np.ndarray:
    w, h = im.size
    check_geometry(h, w, resize=resize, crop=crop, geometry=geometry, name=name, max_pixels=max_pixels)
    (rh, rw), (top, left) = _geometry(h, w, resize=resize, crop=crop, geometry=geometry)
    if (rh, rw) != (h, w):
        im = im.resize((rw, rh), Image.BILINEAR)
    return np.asarray(im.crop((left, top, left + crop, top + crop)))


def preprocess_image(image, *, resize: int, crop: int, geometry: str = "center_crop", name: str = "image",
                     max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """One image (any form `array_to_rgb8` takes) -> `(crop, crop, 3)` uint8 by the module's geometry."""
    rgb = array_to_rgb8(image, name=name)
    return _apply(Image.fromarray(rgb), resize=resize, crop=crop, geometry=geometry, name=name, max_pixels=max_pixels)


def resize_mask(mask, *, resize: int, crop: int, geometry: str = "center_crop", name: str = "mask") -> np.ndarray:
    """One mask `(H, W)` (uint8 0..255, or bool) through the image geometry -> `(crop, crop)` uint8,
    not yet binarised (the data set records keep this)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D mask (H, W), got shape {m.shape}")
    if m.dtype == np.bool_:
        m = m.astype(np.uint8) * 255
    elif m.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 (0..255) or boolean mask, got dtype {m.dtype}")
    return _apply(Image.fromarray(m), resize=resize, crop=crop, geometry=geometry, name=name, max_pixels=None)


def preprocess_mask(mask, *, resize: int, crop: int, geometry: str = "center_crop", rule: str = "published",
                    name: str = "mask") -> np.ndarray:
    """One mask `(H, W)` (uint8 0..255, or bool) -> `(crop, crop)` bool, binarised by `rule`."""
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule: expected one of {MASK_RULES}, got {rule!r}")
    resized = resize_mask(mask, resize=resize, crop=crop, geometry=geometry, name=name)
    # DECISION: by default only pixels whose resized value is exactly 255 are defective, as the
    # published evaluation's `astype(int)` of the [0, 1] mask counts them.
    return resized == 255 if rule == "published" else resized >= 128


def preprocess_masks(masks, *, resize: int, crop: int, geometry: str = "center_crop", rule: str = "published") -> np.ndarray:
    """Masks `(B, H, W)` -> `(B, crop, crop)` bool; see `preprocess_mask`."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks: expected (B, H, W), got shape {masks.shape}")
    out = [preprocess_mask(m, resize=resize, crop=crop, geometry=geometry, rule=rule, name=f"masks[{i}]")
           for i, m in enumerate(masks)]
    return np.stack(out) if out else np.zeros((0, crop, crop), bool)


def _to_host(x):
    """jax.Arrays come to the host by an explicit transfer (never an implicit one)."""
    if type(x).__module__.startswith("jax"):
        import jax

        return jax.device_get(x)
    return np.asarray(x)


_BARE_ARRAY = ("{name}: a bare {ndim}-D array of shape {shape} is ambiguous ({hint}); pass a batch (B, H, W, C) "
               "(image[None] for one image) or a list of single images")


def iter_images(images: Any, *, name: str = "images") -> Iterator[tuple[str, Any]]:
    """Library input -> `(name, single image)` pairs in input order, lazily (by the module's rule).

    Each single image is a file path (`str`), a PIL image, or a host array `(H, W[, C])`; decode it with
    `load_image`. Folders are listed with `list_images`.
    """
    if isinstance(images, (str, bytes, os.PathLike)):
        for p in list_images(images):
            yield display(p), p
        return
    if isinstance(images, Image.Image):
        yield name, images
        return
    if hasattr(images, "shape") and hasattr(images, "dtype"):
        shape = tuple(images.shape)
        if len(shape) == 4:
            host = _to_host(images)
            for i in range(shape[0]):
                yield f"{name}[{i}]", host[i]
            return
        hint = {2: "one grayscale image, or a batch of rows?",
                3: f"one image, or {shape[0]} grayscale images?" if len(shape) == 3 else ""}.get(len(shape), "")
        if len(shape) in (2, 3):
            raise ValueError(_BARE_ARRAY.format(name=name, ndim=len(shape), shape=shape, hint=hint))
        raise ValueError(f"{name}: expected a batch (B, H, W, C) or a list of images, got an array of shape {shape}")
    if isinstance(images, dict) or not isinstance(images, Iterable):
        raise ValueError(f"{name}: expected an array (B, H, W, C), a list of images or paths, or a folder; "
                         f"got {type(images).__name__}")
    for i, item in enumerate(images):
        item_name = f"{name}[{i}]"
        if isinstance(item, (str, bytes, os.PathLike, Image.Image)):
            yield from iter_images(item, name=item_name)
        elif hasattr(item, "shape") and hasattr(item, "dtype"):
            if len(item.shape) == 4:
                yield from iter_images(item, name=item_name)
            elif len(item.shape) in (2, 3):
                yield item_name, _to_host(item)
            else:
                raise ValueError(f"{item_name}: expected one image (H, W[, C]) or a batch (B, H, W, C), "
                                 f"got shape {tuple(item.shape)}")
        else:
            raise ValueError(f"{item_name}: expected an image array, a PIL image or a file path, "
                             f"got {type(item).__name__}")


def host_threads() -> int:
    """Threads that prepare images on the host: the CPUs this process may use, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def prepared_batches(pairs: Iterable[tuple[str, Any]], prepare: Callable[[Any, str], Any], size: int,
                     *, threads: int | None = None) -> Iterator[list[tuple[str, Any]]]:
    """`(name, item)` pairs -> batches (lists of at most `size`) of `(name, prepare(item, name))`, in
    input order, `prepare` running on a pool of `threads` threads (default `host_threads()`: decoding
    and resizing release the GIL) one batch ahead of the batch yielded, so at most two batches are
    held. Errors surface in input order: an image's error after the batches before it are yielded."""
    pool = concurrent.futures.ThreadPoolExecutor(threads or host_threads(), thread_name_prefix="patchcore-jax-prepare")
    pending: collections.deque = collections.deque()

    def take(k):
        return [(name, future.result()) for name, future in (pending.popleft() for _ in range(k))]

    pairs, listing_error = iter(pairs), None
    try:
        while listing_error is None:
            try:
                name, item = next(pairs)
            except StopIteration:
                break
            except Exception as err:  # raised after the images listed before it, as a plain loop would
                listing_error = err
                break
            pending.append((name, pool.submit(prepare, item, name)))
            if len(pending) == 2 * size:
                yield take(size)
        while pending:
            yield take(min(size, len(pending)))
        if listing_error is not None:
            raise listing_error
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def load_image(item, *, name: str = "image", max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A single image from `iter_images` (path, PIL image or array) -> `(H, W, 3)` uint8."""
    if isinstance(item, (str, bytes, os.PathLike)):
        return read_image(item, max_pixels=max_pixels)
    if isinstance(item, Image.Image):
        w, h = item.size
        if max_pixels is not None and w * h > max_pixels:
            raise ValueError(f"{name}: {w}x{h} pixels is more than the limit of {max_pixels}")
        return pil_to_rgb8(item, name=name)
    x = np.asarray(item)
    if max_pixels is not None and x.ndim >= 2 and x.shape[0] * x.shape[1] > max_pixels:
        raise ValueError(f"{name}: {x.shape[1]}x{x.shape[0]} pixels is more than the limit of {max_pixels}")
    return array_to_rgb8(x, name=name)


def map_to_frame(amap, size: tuple[int, int], *, resize: int, crop: int, geometry: str = "center_crop") -> np.ndarray:
    """The inverse of the geometry for a map: `(crop, crop)` -> `(H, W)` float32 at the original
    image's size, NaN outside the crop window (where the model did not look).

    Each original pixel centre is carried to crop coordinates (`(i + 0.5) * scale - 0.5`, as the
    bilinear resize maps centres) and the map is sampled there bilinearly.
    """
    import scipy.ndimage

    amap = np.asarray(amap, np.float32)
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"size: expected a positive (H, W), got {size!r}")
    (rh, rw), (top, left) = _geometry(h, w, resize=resize, crop=crop, geometry=geometry)
    ys = (np.arange(h) + 0.5) * (rh / h) - 0.5 - top
    xs = (np.arange(w) + 0.5) * (rw / w) - 0.5 - left
    inside_y = (ys >= -0.5) & (ys <= crop - 0.5)
    inside_x = (xs >= -0.5) & (xs <= crop - 0.5)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    out = scipy.ndimage.map_coordinates(amap, [yy, xx], order=1, mode="nearest").astype(np.float32)
    out[~(inside_y[:, None] & inside_x[None, :])] = np.nan
    return out
