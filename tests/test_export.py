"""Exported programs (StableHLO through jax.export, ONNX through jax2onnx) against the model itself.

The ONNX tests need the `export` extra (jax2onnx, onnx, onnxruntime) and are skipped without it; the
StableHLO path needs JAX alone and always runs.
"""

import copy
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from patchcore_jax._src.app import cli
from patchcore_jax import export
from patchcore_jax._src.io import atomic
from patchcore_jax._src.io import export as export_impl
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax.data import make_synthetic
from patchcore_jax._src.api.patchcore import PatchCore
from tests.helpers import assert_close

from tests.helpers import SMALL
HAS_ONNX = not export.missing_onnx_packages()
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="the export extra (jax2onnx, onnx, onnxruntime) is not installed")


@pytest.fixture(scope="module")
def fitted():
    data = make_synthetic(seed=1, n_train=6, n_test_good=2, n_test_defect=3, size=96, margin=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PatchCore(PatchCoreConfig(**SMALL), progress=False).fit(data["train"])
    # 5 crops: one full batch of 4 and a padded one inside score_crops; the export has no padding.
    crops = np.stack([model.prepare(image) for image in data["test"]])
    return model, crops, model.score_crops(crops)


@pytest.fixture(scope="module")
def stablehlo_file(fitted, tmp_path_factory):
    model, _, _ = fitted
    path = tmp_path_factory.mktemp("stablehlo") / "model.stablehlo"
    meta = export.export_model(model, path, format="stablehlo", verify=False)  # the CLI test verifies
    return path, meta


@pytest.fixture(scope="module")
def onnx_file(fitted, tmp_path_factory):
    if not HAS_ONNX:
        pytest.skip("the export extra (jax2onnx, onnx, onnxruntime) is not installed")
    model, _, _ = fitted
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    # Blocks of 16 rows: the 38-row bank is searched in three blocks, so the merge across blocks
    # (Less, Where) goes through the converter and the runtime.
    meta = export.export_model(model, path, format="onnx", block_rows=16, verify=False)
    return path, meta


def assert_agrees(got, expected, what):
    assert_close(got[0], expected[0], err_msg=f"{what}: scores")
    assert_close(got[1], expected[1], err_msg=f"{what}: maps")


# -- the exported computation, before any export ----------------------------------------------------------
def test_serving_function_equals_score_crops(fitted):
    """In blocks of 7 rows (the last one partial) here; in one block in the StableHLO export, in
    blocks of 16 in the ONNX export."""
    model, crops, expected = fitted
    assert model.bank.shape == (38, 64)
    assert_agrees(jax.jit(export.serving_function(model, block_rows=7))(crops), expected, "blocks of 7")


def test_ties_between_blocks_go_to_the_lower_index_as_in_the_model(fitted):
    """A bank holding every row twice, the copy in a later block: Eq. 6 picks the first copy, and
    Eq. 7's neighbourhood then holds the second one at distance 0 from m*, as the model's does; a
    copy picked from the later block would leave the first one in N_b and change the score."""
    model, crops, _ = fitted
    twin = copy.copy(model)
    bank = np.asarray(model.bank)
    twin.set_bank(np.concatenate([bank, bank]))
    expected = twin.score_crops(crops)
    assert not np.allclose(expected[0], fitted[2][0])  # the copies do change Eq. 7
    got = jax.jit(export.serving_function(twin, block_rows=16))(crops)
    assert_agrees(got, expected, "bank with copies")


# -- StableHLO ------------------------------------------------------------------------------------------
def test_stablehlo_with_jax_alone_equals_score_crops(fitted, stablehlo_file):
    model, crops, expected = fitted
    path, meta = stablehlo_file
    # The README's lines: no patchcore_jax needed to run it.
    with open(path, "rb") as f:
        f.readline()
        header = json.loads(f.readline())
        exported = jax.export.deserialize(bytearray(f.read()))
    assert_agrees(exported.call(crops), expected, "jax.export.deserialize(...).call")
    assert_agrees(exported.call(crops[:1]), (expected[0][:1], expected[1][:1]), "batch of 1")
    assert str(exported.in_avals[0].shape[0]) == "B" and exported.in_avals[0].shape[1:] == (64, 64, 3)
    assert str(exported.in_avals[0].dtype) == "uint8"
    assert [str(a.dtype) for a in exported.out_avals] == ["float32", "float32"]
    assert header == meta and header["calling_convention_version"] == exported.calling_convention_version
    assert tuple(exported.platforms) == export.PLATFORMS
    assert header["input"]["shape"] == ["B", 64, 64, 3] and header["bank_shape"] == list(model.bank.shape)
    assert header["config"] == model.config.to_dict() and "verification" not in header


def test_load_exported_runs_either_format(fitted, stablehlo_file):
    _, crops, expected = fitted
    loaded = export.load_exported(stablehlo_file[0])
    assert loaded.program == "stablehlo" and loaded.batch is None and loaded.crop == 64
    assert_agrees(loaded(crops), expected, "load_exported(stablehlo)")
    assert loaded.metadata == export.read_metadata(stablehlo_file[0])
    for bad in (crops.astype(np.float32), crops[0], crops[:, :32]):
        with pytest.raises(ValueError, match=r"crops: expected uint8 crops of shape \(B, 64, 64, 3\)"):
            loaded(bad)


# -- ONNX -----------------------------------------------------------------------------------------------
@needs_onnx
def test_onnx_in_onnxruntime_equals_score_crops(fitted, onnx_file):
    import onnx
    import onnxruntime as ort

    model, crops, expected = fitted
    path, meta = onnx_file
    # The README's lines: onnxruntime alone.
    session = ort.InferenceSession(str(path))
    assert_agrees(session.run(None, {"crops": crops}), expected, "onnxruntime")
    first = (expected[0][:1], expected[1][:1])
    assert_agrees(session.run(None, {"crops": crops[:1]}), first, "onnxruntime, batch of 1")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    (inp,) = proto.graph.input
    assert inp.name == "crops" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["B", 64, 64, 3]
    assert [o.name for o in proto.graph.output] == ["scores", "maps"]
    ops = {node.op_type for node in proto.graph.node}
    assert not ops & {"Loop", "Scan", "If", "MaxPool"}, ops  # the rewritten forms, see export.py
    loaded = export.load_exported(path)
    assert loaded.program == "onnx" and loaded.metadata == meta and meta["opset"] == export.ONNX_OPSET
    assert_agrees(loaded(crops), expected, "load_exported(onnx)")


# -- files that are not exports ---------------------------------------------------------------------------
def _refused(path, match):
    with pytest.raises(export.ExportFileError, match=match) as info:
        export.load_exported(path)
    assert str(path) in str(info.value)


def test_truncated_or_altered_stablehlo_is_refused(stablehlo_file, tmp_path):
    data = stablehlo_file[0].read_bytes()
    header_end = data.index(b"\n", len(export.MAGIC)) + 1
    for cut in (0, 7, len(export.MAGIC), header_end - 20, header_end, header_end + 1000, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.stablehlo"
        path.write_bytes(data[:cut])
        _refused(path, "empty or truncated|truncated|not valid JSON|not a patchcore-jax export")
    flipped = bytearray(data)
    flipped[len(data) * 3 // 4] ^= 0x01
    (tmp_path / "flipped.stablehlo").write_bytes(bytes(flipped))
    _refused(tmp_path / "flipped.stablehlo", "checksum differs")
    altered = data.replace(b'"threshold":null', b'"threshold":1e9', 1)
    assert altered != data
    (tmp_path / "altered.stablehlo").write_bytes(altered)
    _refused(tmp_path / "altered.stablehlo", "does not match its own checksum")


def test_files_that_are_not_exports_are_refused(tmp_path, fitted):
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "text.onnx").write_text("hello")
    (tmp_path / "empty.stablehlo").write_bytes(b"")
    fitted[0].save(tmp_path / "model")
    for name in ("random.bin", "text.onnx"):
        _refused(tmp_path / name, "not a patchcore-jax")
    _refused(tmp_path / "empty.stablehlo", "empty or truncated")
    _refused(tmp_path / "model", "is a folder")
    _refused(tmp_path / "absent.onnx", "no such file")


@needs_onnx
def test_truncated_or_foreign_onnx_is_refused(onnx_file, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    data = onnx_file[0].read_bytes()
    for cut in (100, len(data) // 3, len(data) - 200, len(data) - 1):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        _refused(path, "not a patchcore-jax export|checksum|not valid JSON")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    _refused(tmp_path / "other.onnx", "no patchcore-jax metadata")


def _resealed_stablehlo(data: bytes, change) -> bytes:
    """The export with its metadata changed by `change(meta)` and sealed again, as a consistent but
    wrong writer would."""
    from patchcore_jax._src.io.export_format import canonical

    end = data.index(b"\n", len(export.MAGIC))
    meta = json.loads(data[len(export.MAGIC):end])
    change(meta)
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    meta["metadata_sha256"] = atomic.sha256(canonical(body))
    return export.MAGIC + canonical(meta) + data[end:]


def test_lying_or_malformed_stablehlo_metadata_is_refused_in_one_line(stablehlo_file, tmp_path):
    """Sealed metadata without its input, metadata nested 100,000 deep, and a file extended (sparse) to
    8 GiB behind its header: each an ExportFileError naming the file, before the program is read."""
    import resource

    data = stablehlo_file[0].read_bytes()
    (tmp_path / "no-input.stablehlo").write_bytes(_resealed_stablehlo(data, lambda m: m.pop("input")))
    _refused(tmp_path / "no-input.stablehlo", "input shape")
    deep = export.MAGIC + b"[" * 100_000 + b"]" * 100_000 + b"\n" + b"x"
    (tmp_path / "deep.stablehlo").write_bytes(deep)
    _refused(tmp_path / "deep.stablehlo", "nested too deeply")
    big = tmp_path / "big.stablehlo"
    big.write_bytes(data)
    os.truncate(big, 8 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(big, r"truncated or damaged: the program holds \d+ bytes, the export wrote")
    onnx_named = tmp_path / "big.onnx"
    onnx_named.write_bytes(b"\x08\x07")
    os.truncate(onnx_named, 8 << 30)
    _refused(onnx_named, "8589934592 bytes: not a patchcore-jax export")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # KiB: under 1 GiB more


@needs_onnx
def test_onnx_that_reads_files_beside_it_is_refused(onnx_file, tmp_path, monkeypatch):
    """An initializer moved to external data named like a file in the current folder, the metadata
    sealed again: refused, and the file's bytes never reach an output."""
    import onnx

    from patchcore_jax._src.io.export_format import ONNX_METADATA_KEY, canonical

    proto = onnx.load_from_string(onnx_file[0].read_bytes())
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    secret = tmp_path / "passwd_copy"
    secret.write_bytes(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "passwd_copy"), ("offset", "0"), ("length", str(secret.stat().st_size))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    props = {p.key: p for p in proto.metadata_props}
    meta = json.loads(props[ONNX_METADATA_KEY].value)
    meta["graph_sha256"] = atomic.sha256(proto.graph.SerializeToString(deterministic=True))
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    meta["metadata_sha256"] = atomic.sha256(canonical(body))
    props[ONNX_METADATA_KEY].value = canonical(meta).decode()
    crafted = tmp_path / "crafted.onnx"
    crafted.write_bytes(proto.SerializeToString())
    monkeypatch.chdir(tmp_path)
    _refused(crafted, "refers to data outside the file \\(passwd_copy")


# -- what export refuses, and what it never does ------------------------------------------------------------
def test_export_checks_its_arguments_and_never_overwrites(fitted, tmp_path):
    model, _, _ = fitted
    mine = tmp_path / "mine.onnx"
    mine.write_text("my file")
    cases = [
        (dict(path=tmp_path / "a", format="tflite"), "format: expected one of"),
        (dict(path=tmp_path / "a", format="stablehlo", batch=0), "batch: expected None or an integer >= 1"),
        (dict(path=tmp_path / "a", format="stablehlo", batch=True), "batch"),
        (dict(path=tmp_path / "a", format="stablehlo", batch=2.0), "batch"),
        (dict(path=mine, format="stablehlo"), "mine.onnx: exists; refusing to overwrite it"),
        (dict(path=tmp_path / "missing" / "a", format="stablehlo"), "missing does not exist"),
        (dict(path=str(tmp_path) + "/", format="stablehlo"), "expected a file name"),
        (dict(path=tmp_path / "model" / "a.onnx", format="stablehlo"), "is inside the model folder"),
    ]
    model.save(tmp_path / "model")
    saved = {f: (tmp_path / "model" / f).read_bytes() for f in os.listdir(tmp_path / "model")}
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            model.export(kwargs.pop("path"), **kwargs)
    unfitted = copy.copy(model)
    unfitted.bank = None
    with pytest.raises(ValueError, match="not fitted"):
        export.export_model(unfitted, tmp_path / "b", format="stablehlo")
    with pytest.raises(ValueError, match="mine.onnx: exists"):
        atomic.write_new(str(mine), b"new")  # the name taken between the check and the link
    assert mine.read_text() == "my file" and sorted(os.listdir(tmp_path)) == ["mine.onnx", "model"]
    # The model folder is left as it was: nothing was written into it.
    assert {f: (tmp_path / "model" / f).read_bytes() for f in os.listdir(tmp_path / "model")} == saved
    assert {"manifest.json", "config.json", "bank.safetensors"} <= set(saved)


def test_a_program_that_disagrees_with_the_model_is_not_written(fitted, tmp_path, monkeypatch):
    model, _, _ = fitted
    honest = export_impl.serving_function

    def off_by_a_little(m, **kwargs):
        fn = honest(m, **kwargs)
        return lambda crops: (fn(crops)[0] * 1.001, fn(crops)[1])

    monkeypatch.setattr(export_impl, "serving_function", off_by_a_little)
    with pytest.raises(export.ExportError, match="scores differ from the model's"):
        model.export(tmp_path / "bad.stablehlo", format="stablehlo")
    assert os.listdir(tmp_path) == []


# -- the command line -------------------------------------------------------------------------------------
def test_cli_export_end_to_end_and_its_refusals(fitted, tmp_path, monkeypatch, capsys):
    model, crops, expected = fitted
    folder = tmp_path / "model"
    model.save(folder)
    out = tmp_path / "fixed.stablehlo"
    r = subprocess.run([sys.executable, "-m", "patchcore_jax.cli", "export", str(folder), "--format", "stablehlo",
                        "--out", str(out), "--batch", "5", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}") and "input crops uint8 (5, 64, 64, 3)" in r.stdout
    loaded = export.load_exported(out)
    check = loaded.metadata["verification"]  # measured at export, within the same float32 table
    assert check["crops"] == 5 and check["scores_max_rel_diff"] < 1e-5 and check["maps_max_abs_diff"] < 1e-4
    assert loaded.batch == 5 and loaded.exported.in_avals[0].shape == (5, 64, 64, 3)
    assert_agrees(loaded(crops), expected, "CLI export, batch 5")
    with pytest.raises(ValueError, match=r"crops: expected uint8 crops of shape \(5, 64, 64, 3\)"):
        loaded(crops[:3])
    written = out.read_bytes()

    # Refusals: one line naming the value, exit 2, before the model is even read.
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(PatchCore, "load", no_work)
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("mine")
    cases = [
        (["--format", "stablehlo", "--out", str(out)], "fixed.stablehlo: exists; refusing to overwrite it"),
        (["--format", "stablehlo", "--out", str(tmp_path / "new"), "--batch", "0"],
         "--batch 0: expected an integer >= 1"),
        (["--format", "tflite", "--out", str(tmp_path / "new")], "invalid choice: 'tflite'"),
        (["--format", "onnx", "--out", str(tmp_path / "nowhere" / "m.onnx")], "nowhere does not exist"),
    ]
    for args, message in cases:
        code = _cli("export", str(folder), *args)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    monkeypatch.setattr(export_impl, "missing_onnx_packages", lambda: ["jax2onnx", "onnxruntime"])
    assert _cli("export", str(folder), "--format", "onnx", "--out", str(tmp_path / "m.onnx")) == 2
    assert "pip install 'patchcore-jax[export]'" in capsys.readouterr().err
    monkeypatch.undo()
    assert _cli("export", str(tmp_path / "not-a-model"), "--format", "stablehlo", "--out", str(tmp_path / "n")) == 2
    err = capsys.readouterr().err
    assert "not-a-model" in err and err.count("\n") == 1
    assert out.read_bytes() == written
    assert sorted(os.listdir(tmp_path)) == ["fixed.stablehlo", "model", "not-a-model"]  # no temporary left


def _cli(*args):
    try:
        return cli.main(list(args))
    except SystemExit as exit:  # argparse's own errors
        return exit.code
