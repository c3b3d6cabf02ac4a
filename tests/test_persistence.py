"""Model folders: sealed (any changed byte, missing or extra file is refused, naming the file),
portable (the backbone travels with the model), and replaced atomically (no instant without a complete
model; interrupted saves leave nothing that the next save or load does not clean or recover)."""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from patchcore_jax._src.io import atomic
from patchcore_jax._src.io import model_files as persistence
from patchcore_jax._src.model import weights
from patchcore_jax._src.model.backbone import build
from patchcore_jax.data import make_synthetic
from patchcore_jax._src.api.patchcore import PatchCore
from patchcore_jax._src.io.model_files import ModelFileError
from tests.helpers import quiet_model

# layer2 only keeps the backbone file small (2.8 MB), so every check below is cheap.
TINY = dict(backbone="resnet18", layers=("layer2",), resize=72, crop=64, pretrain_dim=32, target_dim=32,
            num_neighbors=3, batch_size=4)


def tiny(**changes):
    return quiet_model(TINY, **changes)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=3, n_train=4, n_test_good=2, n_test_defect=2, size=80, margin=16)


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """A pristine model folder; tests copy it before damaging it."""
    path = tmp_path_factory.mktemp("pristine") / "model"
    model = tiny().fit(data["train"])
    model.threshold = 1.5
    model.save(path)
    scores, _ = model.predict(data["test"])
    return path, scores


def _copy(saved, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(saved[0], dst)
    return dst


def _reseal(path):
    """Recomputes the manifest after an edit, as a consistent but wrong writer would."""
    files = {n: (path / n).read_bytes() for n in persistence.FILES}
    (path / persistence.MANIFEST).write_bytes(persistence.manifest_bytes(files))


def test_layout_and_round_trip(saved, data):
    path, scores = saved
    assert sorted(os.listdir(path)) == ["backbone.safetensors", "bank.safetensors", "config.json", "index.safetensors",
                                        "manifest.json"]
    loaded = PatchCore.load(path, progress=False)
    assert loaded.threshold == 1.5 and loaded.calibration is not None
    np.testing.assert_array_equal(loaded.predict(data["test"])[0], scores)


def test_portable_with_the_weights_inside(data, tmp_path):
    """The weights file may move or change after fit: the model folder alone predicts the same."""
    state = weights.state_dict_of(build("resnet18", ("layer2",), seed=7))
    wfile = tmp_path / "w.safetensors"
    weights.save_safetensors(state, wfile)
    model = tiny(weights=str(wfile)).fit(data["train"])
    want, _ = model.predict(data["test"])
    model.save(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["weights"]["source"] == str(wfile) and len(meta["weights"]["sha256"]) == 64
    os.remove(wfile)  # gone
    shutil.copytree(tmp_path / "model", tmp_path / "elsewhere" / "copy")
    got, _ = PatchCore.load(tmp_path / "elsewhere" / "copy", progress=False).predict(data["test"])
    np.testing.assert_array_equal(got, want)
    weights.save_safetensors(weights.state_dict_of(build("resnet18", ("layer2",), seed=8)), wfile)  # overwritten
    got, _ = PatchCore.load(tmp_path / "model", progress=False).predict(data["test"])
    np.testing.assert_array_equal(got, want)


def test_every_single_bit_flip_of_the_small_files_is_refused(saved, tmp_path):
    path = _copy(saved, tmp_path)
    for name in ("manifest.json", "config.json"):
        original = (path / name).read_bytes()
        for pos in range(len(original)):
            for bit in range(8):
                damaged = bytearray(original)
                damaged[pos] ^= 1 << bit
                (path / name).write_bytes(bytes(damaged))
                with pytest.raises(ModelFileError, match=name.replace(".", r"\.")):
                    persistence.read_model_files(path)
        (path / name).write_bytes(original)
    persistence.read_model_files(path)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["bank.safetensors", "backbone.safetensors", "index.safetensors"]), where=st.floats(0.0, 1.0),
       bit=st.integers(0, 7))
def test_bit_flips_of_the_arrays_are_refused(saved, tmp_path_factory, name, where, bit):
    path = _copy(saved, tmp_path_factory.mktemp("flip"))
    data = bytearray((path / name).read_bytes())
    pos = min(int(where * len(data)), len(data) - 1)
    data[pos] ^= 1 << bit
    (path / name).write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=rf"{name}: checksum differs"):
        persistence.read_model_files(path)


def test_truncated_missing_and_extra_files_are_named(saved, tmp_path):
    for name in persistence.FILES + (persistence.MANIFEST,):
        path = _copy(saved, tmp_path, f"trunc-{name}")
        content = (path / name).read_bytes()
        for keep in (0, 1, len(content) // 2, len(content) - 1):
            (path / name).write_bytes(content[:keep])
            with pytest.raises(ModelFileError, match=name.replace(".", r"\.")):
                persistence.read_model_files(path)
        os.remove(path / name)
        with pytest.raises(ModelFileError, match=rf"{name.replace('.', '[.]')}: missing"):
            persistence.read_model_files(path)
    for extra in ("notes.txt", ".hidden", "sub"):
        path = _copy(saved, tmp_path, f"extra-{extra}")
        if extra == "sub":
            (path / extra).mkdir()
        else:
            (path / extra).write_text("mine")
        with pytest.raises(ModelFileError, match=rf"{extra}: not part of the model"):
            persistence.read_model_files(path)


@pytest.mark.parametrize("field, value, match", [
    ("thresholds.image", {"value": "abc", "rule": "manual"}, "thresholds.image"),
    ("thresholds.image", [1.0], "thresholds.image"), ("thresholds.pixel", {"value": 1.0}, "thresholds.pixel"),
    ("thresholds", None, "thresholds"), ("num_patches_seen", -1, "num_patches_seen"),
    ("bank_shape", [1, 2, 3], "bank_shape"), ("weights", None, "weights"), ("extra", 1, "fields"),
    ("calibration.fit.patch_sample", 0, "patch_sample"), ("calibration.fit.patch_score_quantiles", {}, "quantiles"),
    ("calibration.good_images", {"count": 1}, "good_images"),
])
def test_fields_are_type_checked_even_under_a_valid_seal(saved, tmp_path, field, value, match):
    path = _copy(saved, tmp_path)
    meta = json.loads((path / "config.json").read_text())
    *parents, leaf = field.split(".")
    node = meta
    for key in parents:
        node = node[key]
    node[leaf] = value
    (path / "config.json").write_text(json.dumps(meta))
    _reseal(path)
    with pytest.raises(ModelFileError, match=rf"config\.json: .*{match}"):
        persistence.read_model_files(path)


def test_a_file_grown_behind_its_manifest_is_refused_before_it_is_read(saved, tmp_path):
    """bank.safetensors extended (sparse) to 8 GiB: the size is compared with the manifest's record
    before a byte is read, so the load fails at once, naming the file, with memory bounded."""
    import resource

    path = _copy(saved, tmp_path)
    os.truncate(path / "bank.safetensors", 8 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelFileError, match=r"bank\.safetensors: 8589934592 bytes where the manifest records \d+"):
        persistence.read_model_files(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # KiB: under 1 GiB more


def test_a_resealed_index_that_is_not_the_banks_is_refused(saved, tmp_path, capsys):
    """index.safetensors with a zeroed row, re-sealed in the manifest: the load refuses it, naming the
    file (the scores would otherwise change silently), and the command line exits 2 with one line."""
    from safetensors.numpy import load_file, save_file

    from patchcore_jax._src.app import cli

    path = _copy(saved, tmp_path)
    arrays = load_file(str(path / "index.safetensors"))
    assert arrays, "the tiny model searches with a clustered index on a CPU"
    real = np.flatnonzero(arrays["ids"] != np.iinfo(np.int32).max)
    arrays["rows"][real[0]] = 0.0
    arrays["sq_norms"][real[0]] = 0.0
    save_file(arrays, str(path / "index.safetensors"))
    _reseal(path)
    with pytest.raises(ModelFileError, match=r"index\.safetensors: the stored rows are not the bank's"):
        PatchCore.load(path)
    images = tmp_path / "images"
    images.mkdir()
    assert cli.main(["predict", "--model", str(path), str(images), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "index.safetensors" in err and err.count("\n") == 1


@pytest.mark.parametrize("field, value", [("seed", 1.0), ("resize", "64"), ("sigma", True), ("layers", "layer2"),
                                          ("crop", 10**6), ("weights", 3)])
def test_config_fields_are_type_checked(saved, tmp_path, field, value):
    path = _copy(saved, tmp_path)
    meta = json.loads((path / "config.json").read_text())
    meta["config"][field] = value
    (path / "config.json").write_text(json.dumps(meta))
    _reseal(path)
    with pytest.raises(ModelFileError, match=rf"config\.json: .*{field}"):
        persistence.read_model_files(path)


def test_nan_threshold_and_other_versions(saved, tmp_path):
    path = _copy(saved, tmp_path)
    text = (path / "config.json").read_text().replace('"value": 1.5', '"value": NaN')
    assert "NaN" in text
    (path / "config.json").write_text(text)
    _reseal(path)
    with pytest.raises(ModelFileError, match=r"config\.json: not valid JSON \(NaN is not allowed\)"):
        persistence.read_model_files(path)
    old = tmp_path / "v1"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "bank.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="older patchcore-jax .format 1"):
        persistence.read_model_files(old)
    path = _copy(saved, tmp_path, "v3")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 3
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = atomic.sha256(atomic.canonical_json(body))
    (path / "manifest.json").write_bytes(atomic.canonical_json(manifest))
    with pytest.raises(ModelFileError, match="newer than this library reads"):
        persistence.read_model_files(path)


def test_refuses_to_replace_what_it_did_not_write(data, tmp_path):
    model = tiny().fit(data["train"])
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("mine")
    (project / "config.json").write_text("{}")  # looks a bit like a model, is not one
    for target, match in ((project, "not a patchcore-jax model"), (project / "README.md", "not a folder")):
        with pytest.raises(ValueError, match=match):
            model.save(target)
    assert sorted(os.listdir(project)) == ["README.md", "config.json"]
    model.save(project / "m")
    (project / "m" / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match=r"notes\.txt: is not part of the model"):
        model.save(project / "m")
    assert (project / "m" / "notes.txt").read_text() == "my notes"
    os.symlink(project / "m", project / "link")
    with pytest.raises(ValueError, match="symbolic link"):
        model.save(project / "link")
    (project / "empty").mkdir()
    model.save(project / "empty")  # an empty folder is taken
    assert "manifest.json" in os.listdir(project / "empty")
    assert not [n for n in os.listdir(project) if ".tmp-" in n]


def _scores(path, data):
    return PatchCore.load(path, progress=False).predict(data["test"])[0]


STEPS = ["created", "wrote backbone.safetensors", "wrote bank.safetensors", "wrote config.json",
         "wrote index.safetensors", "wrote manifest.json", "exchanged"]


@pytest.mark.parametrize("step", STEPS)
def test_a_failure_at_any_step_keeps_a_complete_model_and_no_leftovers(data, tmp_path, monkeypatch, step):
    old, new = tiny().fit(data["train"]), tiny(seed=5).fit(data["train"])
    path = tmp_path / "model"
    old.save(path)
    want_old, want_new = _scores(path, data), new.predict(data["test"])[0]

    def fail(name):
        if name == step:
            raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(persistence, "_step", fail)
    with pytest.raises(OSError, match="injected"):
        new.save(path)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # nothing temporary left
    got = _scores(path, data)
    np.testing.assert_array_equal(got, want_new if step == "exchanged" else want_old)


CRASH = textwrap.dedent("""
    import os, sys, warnings
    warnings.simplefilter("ignore")
    from patchcore_jax._src.io import model_files as persistence
    from patchcore_jax.config import PatchCoreConfig
    from patchcore_jax.data import make_synthetic
    from patchcore_jax.model import PatchCore
    path, step, seed, exchange = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    cfg = PatchCoreConfig(**{TINY!r}, seed=seed)
    model = PatchCore(cfg, progress=False).fit(make_synthetic(seed=3, n_train=4, n_test_good=2, n_test_defect=2,
                                                              size=80, margin=16)["train"])
    if not exchange:
        persistence.exchange = lambda a, b: False
    def crash(name):
        if name == step:
            os._exit(137)   # as kill -9: no cleanup runs
    persistence._step = crash
    model.save(path)
""")


@pytest.mark.parametrize("exchange, step", [(True, "wrote bank.safetensors"), (True, "exchanged"),
                                            (False, "moved aside"), (False, "renamed")])
def test_killed_mid_save_is_recovered_by_the_next_load(data, tmp_path, exchange, step):
    path = tmp_path / "model"
    tiny().fit(data["train"]).save(path)
    want_old = _scores(path, data)
    script = CRASH.replace("{TINY!r}", repr(TINY))
    r = subprocess.run([sys.executable, "-c", script, str(path), step, "5", "1" if exchange else "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 137, r.stderr
    leftovers = [n for n in os.listdir(tmp_path) if n != "model"]
    assert leftovers and all(n.startswith(".model.tmp-") for n in leftovers)
    if step == "moved aside":
        assert not path.exists()  # the one window of the fallback without an atomic exchange
    got = _scores(path, data)  # the load recovers and cleans
    assert sorted(os.listdir(tmp_path)) == ["model"]
    if step in ("wrote bank.safetensors", "moved aside"):
        np.testing.assert_array_equal(got, want_old)
    else:
        assert not np.array_equal(got, want_old)  # the new model (seed 5) is in place


def test_a_leftover_locked_by_a_live_writer_is_left_alone(saved, tmp_path):
    import fcntl

    path = _copy(saved, tmp_path)
    busy = tmp_path / ".model.tmp-busy"
    busy.mkdir()
    (busy / "bank.safetensors").write_bytes(b"partial")
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        persistence.read_model_files(path)
        assert busy.exists()
    finally:
        os.close(fd)
    persistence.read_model_files(path)
    assert not busy.exists()
    mine = tmp_path / ".model.tmp-mine"
    mine.mkdir()
    (mine / "photo.jpg").write_text("not ours")
    persistence.read_model_files(path)
    assert (mine / "photo.jpg").exists()  # anything but our own files is never deleted


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_and_folders_follow_the_umask(data, tmp_path, umask):
    model = tiny().fit(data["train"])
    old = os.umask(umask)
    try:
        model.save(tmp_path / "model")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "model").st_mode) == 0o777 & ~umask
    for name in os.listdir(tmp_path / "model"):
        assert stat.S_IMODE(os.stat(tmp_path / "model" / name).st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("arch", ["resnext50_32x4d", "densenet121"])
def test_other_backbones_round_trip(data, tmp_path, arch):
    """The stored backbone (torchvision names and layouts) reads back exactly for grouped convolutions
    and dense blocks too."""
    from patchcore_jax._src.model.backbone import layer_names

    model = tiny(backbone=arch, layers=layer_names(arch)[:1], crop=32, resize=32).fit(data["train"][:2])
    model.save(tmp_path / "m")
    want, want_maps = model.predict(data["test"][:2])
    got, got_maps = PatchCore.load(tmp_path / "m", progress=False).predict(data["test"][:2])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_maps, want_maps)
