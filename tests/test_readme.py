"""The README's statements that code can check: its Python blocks run as written (with a small
random-weight configuration in place of the pretrained WideResNet), its set-up commands are the
documented two, it stays short, and the files it links to exist."""

import os
import pathlib
import re

import numpy as np
from PIL import Image

from patchcore_jax.data import make_synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The one substitution: the README's pretrained configuration -> the tests' small random one.
PRETRAINED = 'PatchCoreConfig(weights="wrn50")'
SMALL = ('PatchCoreConfig(backbone="resnet18", resize=72, crop=64, pretrain_dim=64, target_dim=64, '
         'num_neighbors=3, batch_size=4)')


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_is_short_and_starts_with_the_two_set_up_commands():
    lines = README.splitlines()
    assert len(lines) <= 300
    first = "\n".join(lines[:40])
    assert "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/patchcore-jax demo" in first
    assert ("python3 -m venv .venv && .venv/bin/pip install -q -e '.[test,export]' && .venv/bin/python -m pytest"
            in first)
    for link in re.findall(r"\]\((docs/[^)]+)\)", README):
        assert (ROOT / link).is_file(), link


def test_the_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks(README)
    assert blocks and any(PRETRAINED in b for b in blocks)
    data = make_synthetic(seed=3, n_train=6, n_test_good=2, n_test_defect=2, size=80, margin=16)
    for folder, images in (("good", data["train"]), ("new", data["test"])):
        (tmp_path / folder).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / folder / f"{i:03d}.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning
        for block in blocks:
            exec(compile(block.replace(PRETRAINED, SMALL), "README.md", "exec"), scope)
    model, scores, anomalous = scope["model"], scope["scores"], scope["anomalous"]
    assert scores.shape == (4,) and anomalous.dtype == np.bool_
    assert model.threshold is not None and "a fold of 1 of the 6 training images" in model.image_threshold.rule
    assert scope["decision"].region.any() == scope["decision"].anomalous
    assert os.path.isfile(tmp_path / "model" / "config.json")
    # The statements beside the block: fit_threshold returns a float; scores compare with the threshold.
    value = model.fit_threshold(scores)
    assert isinstance(value, float) and value == model.threshold
    np.testing.assert_array_equal(scores > model.threshold, model.classify(scores))
