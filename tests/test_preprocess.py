"""The one way in: the image reader, the host preprocessing, masks, and the listing rules."""

import importlib.util
import os
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st
from PIL import Image

from patchcore_jax._src.model import preprocess
from patchcore_jax._src.model import images as imio


def _picture(seed, h, w):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return base


def _published(path_or_image, resize, crop):
    """torchvision's Resize(resize) + CenterCrop(crop) on a PIL image, spelled out with PIL (the calls
    torchvision 0.2x makes: `_compute_resized_output_size`, `img.resize(size[::-1], BILINEAR)`,
    `crop_top = int(round((h - crop) / 2.0))`)."""
    im = Image.open(path_or_image).convert("RGB") if isinstance(path_or_image, str) else path_or_image
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    return np.asarray(im.crop((left, top, left + crop, top + crop)))


@given(seed=st.integers(0, 2**16), h=st.integers(1, 300), w=st.integers(1, 300),
       sizes=st.sampled_from([(256, 224), (72, 64), (80, 80), (33, 32)]))
def test_every_way_in_gives_the_published_crop(tmp_path_factory, seed, h, w, sizes):
    resize, crop = sizes
    rgb = _picture(seed, h, w)
    path = str(tmp_path_factory.mktemp("img") / "x.png")
    Image.fromarray(rgb).save(path)
    want = _published(path, resize, crop)
    got = {
        "file": preprocess.preprocess_image(imio.read_image(path), resize=resize, crop=crop),
        "array": preprocess.preprocess_image(rgb, resize=resize, crop=crop),
        "float": preprocess.preprocess_image(rgb.astype(np.float32) / 255.0, resize=resize, crop=crop),
        "uint16": preprocess.preprocess_image(rgb.astype(np.uint16) * 257, resize=resize, crop=crop),
        "pil": preprocess.preprocess_image(preprocess.load_image(Image.fromarray(rgb)), resize=resize, crop=crop),
    }
    for how, crop_img in got.items():
        assert crop_img.dtype == np.uint8 and crop_img.shape == (crop, crop, 3)
        np.testing.assert_array_equal(crop_img, want, err_msg=how)


@given(seed=st.integers(0, 2**16), h=st.integers(40, 400), w=st.integers(40, 400))
def test_a_record_then_the_model_crop_is_the_direct_crop(seed, h, w):
    """The data sets store `resize x resize` centre crops; the model's crop of that equals the direct
    Resize + CenterCrop (banker's rounding of the offsets included)."""
    rgb = _picture(seed, h, w)
    record = preprocess.preprocess_image(rgb, resize=256, crop=256)
    via_record = preprocess.preprocess_image(record, resize=256, crop=224)
    np.testing.assert_array_equal(via_record, preprocess.preprocess_image(rgb, resize=256, crop=224))
    mask = (_picture(seed + 1, h, w)[..., 0] > 200).astype(np.uint8) * 255
    rec_mask = preprocess.resize_mask(mask, resize=256, crop=256)
    for rule in preprocess.MASK_RULES:
        np.testing.assert_array_equal(preprocess.preprocess_mask(rec_mask, resize=256, crop=224, rule=rule),
                                      preprocess.preprocess_mask(mask, resize=256, crop=224, rule=rule))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_matches_torchvision_itself(tmp_path):
    from torchvision import transforms

    t = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    for i, (h, w) in enumerate([(700, 1024), (1024, 700), (257, 300), (224, 224), (900, 901)]):
        rgb = _picture(i, h, w)
        want = np.asarray(t(Image.fromarray(rgb)))
        np.testing.assert_array_equal(preprocess.preprocess_image(rgb, resize=256, crop=224), want)


def test_squash_resizes_the_whole_frame():
    rgb = _picture(0, 96, 128)
    got = preprocess.preprocess_image(rgb, resize=64, crop=64, geometry="squash")
    np.testing.assert_array_equal(got, np.asarray(Image.fromarray(rgb).resize((64, 64), Image.BILINEAR)))


# -- modes -------------------------------------------------------------------------------------------
def test_every_common_mode_reads_as_the_same_picture(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    want_gray = np.repeat(gray[..., None], 3, axis=-1)

    def save(name, im, **kw):
        path = str(tmp_path / name)
        im.save(path, **kw)
        return path

    cases = {
        "L": (save("l.png", Image.fromarray(gray)), want_gray),
        "LA": (save("la.png", Image.fromarray(gray).convert("LA")), want_gray),
        "I;16": (save("g16.png", Image.fromarray(gray.astype(np.uint16) * 257)), want_gray),
        "I": (save("i.tif", Image.fromarray(gray.astype(np.int32) * 257)), want_gray),
        "F": (save("f.tif", Image.fromarray(gray.astype(np.float32) / 255.0)), want_gray),
        "RGB": (save("rgb.png", Image.fromarray(rgb)), rgb),
        "RGBA": (save("rgba.png", Image.fromarray(np.dstack([rgb, np.full((20, 30), 7, np.uint8)]))), rgb),
        "P": (save("p.png", Image.fromarray(rgb).quantize(64)), np.asarray(Image.fromarray(rgb).quantize(64).convert("RGB"))),
        "CMYK": (save("cmyk.tif", Image.fromarray(rgb).convert("CMYK")), np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB"))),
        "1": (save("one.png", Image.fromarray(gray > 127)), np.repeat(((gray > 127) * 255).astype(np.uint8)[..., None], 3, -1)),
    }
    for mode, (path, want) in cases.items():
        with Image.open(path) as im:
            assert im.mode == mode or (mode == "I;16" and im.mode.startswith("I;16")), (mode, im.mode)
        got = imio.read_image(path)
        assert got.dtype == np.uint8 and got.shape == (20, 30, 3), mode
        np.testing.assert_array_equal(got, want, err_msg=mode)


def test_sixteen_bit_uses_its_whole_range(tmp_path):
    """16-bit values scale by 1/257 (rounded): a dark 16-bit picture is not read as white."""
    values = np.array([[0, 128, 129, 257, 32896, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g.png")
    np.testing.assert_array_equal(imio.read_image(tmp_path / "g.png")[..., 0], [[0, 0, 1, 1, 128, 255]])


def test_unreadable_values_are_refused_naming_the_file(tmp_path):
    Image.fromarray(np.full((4, 4), 2.5, np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match=r"hdr\.tif: float pixel values must lie in \[0, 1\], got \[2\.5, 2\.5\]"):
        imio.read_image(tmp_path / "hdr.tif")
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"nan\.tif: found 16 NaN"):
        imio.read_image(tmp_path / "nan.tif")
    Image.fromarray(np.full((4, 4), -5, np.int32)).save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"neg\.tif: integer pixel values must lie in 0\.\.65535"):
        imio.read_image(tmp_path / "neg.tif")


def test_broken_files_are_named(tmp_path):
    rgb = _picture(0, 64, 64)
    Image.fromarray(rgb).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    for name, match in (("trunc.png", "not a readable image"), ("empty.png", "empty file"), ("text.png", "not a readable image")):
        with pytest.raises(ValueError, match=f"{name}: {match}"):
            imio.read_image(tmp_path / name)
    with pytest.raises(ValueError, match="no such file"):
        imio.read_image(tmp_path / "absent.png")


def test_pixel_limits_name_the_file(tmp_path, monkeypatch):
    # 12000 x 12000 one-bit zeros: a few KB on disk, 144 M pixels once decoded.
    Image.new("1", (12000, 12000)).save(tmp_path / "huge.png")
    assert os.path.getsize(tmp_path / "huge.png") < 100_000
    with pytest.raises(ValueError, match=r"huge\.png: 12000x12000 pixels is more than the limit"):
        imio.read_image(tmp_path / "huge.png")
    with pytest.raises(ValueError, match=r"huge\.png: 12000x12000"):
        imio.check_image(tmp_path / "huge.png")
    # Without this library's limit, PIL's own decompression-bomb guard still refuses it, by name.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (40, 40)).save(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match=r"bomb\.png: refused by PIL's decompression-bomb guard"):
        imio.read_image(tmp_path / "bomb.png", max_pixels=None)


def test_elongated_images_are_refused_before_resizing():
    with pytest.raises(ValueError, match=r"line: 3000x1 pixels would be resized to 768000x256"):
        preprocess.preprocess_image(np.zeros((1, 3000), np.uint8), resize=256, crop=224, name="line")


# -- masks -------------------------------------------------------------------------------------------
def test_mask_rules():
    """A 0/255 square resized bilinearly has soft edges: the published rule keeps only full 255
    pixels, the half rule everything >= 128; both are binary and nested."""
    mask = np.zeros((100, 100), np.uint8)
    mask[30:71, 30:71] = 255
    published = preprocess.preprocess_mask(mask, resize=73, crop=73)
    half = preprocess.preprocess_mask(mask, resize=73, crop=73, rule="half")
    soft = preprocess.resize_mask(mask, resize=73, crop=73)
    assert published.dtype == bool and half.dtype == bool
    np.testing.assert_array_equal(published, soft == 255)
    np.testing.assert_array_equal(half, soft >= 128)
    assert published.sum() < half.sum() and not (published & ~half).any()
    with pytest.raises(ValueError, match="mask rule"):
        preprocess.preprocess_mask(mask, resize=73, crop=73, rule="0.5")


# -- library input -----------------------------------------------------------------------------------
def test_bare_arrays_are_refused_and_lists_are_read_by_one_rule(tmp_path):
    with pytest.raises(ValueError, match=r"bare 3-D array of shape \(224, 224, 3\) is ambiguous"):
        list(preprocess.iter_images(np.zeros((224, 224, 3), np.uint8)))
    with pytest.raises(ValueError, match="bare 2-D"):
        list(preprocess.iter_images(np.zeros((5, 5), np.uint8)))
    Image.fromarray(_picture(0, 10, 10)).save(tmp_path / "a.png")
    items = list(preprocess.iter_images([np.zeros((5, 6), np.uint8), np.zeros((2, 5, 6, 3), np.uint8),
                                         str(tmp_path / "a.png"), str(tmp_path)]))
    assert [n for n, _ in items] == ["images[0]", "images[1][0]", "images[1][1]", str(tmp_path / "a.png"),
                                     str(tmp_path / "a.png")]
    with pytest.raises(ValueError, match=r"images\[1\]: expected an image array"):
        list(preprocess.iter_images([np.zeros((5, 6), np.uint8), 3.0]))


# -- listing -----------------------------------------------------------------------------------------
def test_listing_rules(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    png = lambda p: Image.fromarray(_picture(0, 8, 8)).save(p)  # noqa: E731
    png(root / "b.png")
    png(root / "A.JPG".lower())
    png(root / "sub" / "c.png")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "._b.png").write_bytes(b"\0\5\26\7AppleDouble")
    (root / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "notes.txt").write_text("mine")
    (root / ".hidden").mkdir()
    png(root / ".hidden" / "x.png")
    os.mkfifo(root / "pipe.png")
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    png(linked / "d.png")
    os.symlink(linked, root / "link")
    os.symlink(root, root / "sub" / "loop")  # a cycle
    os.symlink(tmp_path / "absent.png", root / "broken.png")
    bad = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, not UTF-8
    png(os.path.join(os.fsencode(root), b"caf\xe9.png"))
    out = root / "out"
    out.mkdir()
    (out / imio.OUTPUT_MARKER).write_text('{"owner": "patchcore-jax", "command": "predict"}\n')
    png(out / "heat.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = imio.list_images(str(root))
    rel = [os.path.relpath(p, root) for p in found]
    assert rel == ["a.jpg", "b.png", bad, "link/d.png", "sub/c.png"]
    assert any("broken.png: broken symbolic link" in str(w.message) for w in caught)
    assert imio.display(found[2]).endswith("caf\\xe9.png")
    assert imio.read_image(found[2]).shape == (8, 8, 3)  # a non-UTF-8 name reads like any other
    assert imio.list_images(str(root), exclude=[str(root / "sub")]) == [str(root / n) for n in ("a.jpg", "b.png")] + \
        [os.path.join(str(root), bad), str(root / "link" / "d.png")]
    # Named directly: a FIFO is refused (never opened, so nothing hangs), any regular file is taken.
    with pytest.raises(ValueError, match=r"pipe\.png: not a regular file"):
        imio.list_images(str(root / "pipe.png"))
    with pytest.raises(ValueError, match=r"pipe\.png: not a regular file"):
        imio.read_image(str(root / "pipe.png"))
    assert imio.list_images(str(root / "notes.txt")) == [str(root / "notes.txt")]
    with pytest.raises(ValueError, match=r"notes\.txt: not a readable image"):
        imio.read_image(str(root / "notes.txt"))
    with pytest.raises(ValueError, match="an output folder of patchcore-jax"):
        imio.list_images(str(out))
    with pytest.raises(ValueError, match="no such file or folder"):
        imio.list_images(str(tmp_path / "nowhere"))
