"""Multi-device agreement: 8 host devices (conftest sets XLA_FLAGS) and two processes on localhost."""

import json
import os
import socket
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.sharding import PartitionSpec as P

import patchcore_jax as pj
from patchcore_jax._src.run import sharding
from tests.helpers import assert_close, gaussian, shape_buckets, x64, xla_flags

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS host device count)")


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(jax.devices()[:8])


@st.composite
def cases(draw):
    return dict(seed=draw(st.integers(0, 2**16)), **draw(shape_buckets(n=[9, 64, 333], d=[3, 16], num=[1, 9], k=[1, 4])),
                projected=draw(st.booleans()))


@given(c=cases())
def test_coreset_indices_equal_single_device_under_x64(c, mesh):
    bank = gaussian(c["seed"], (c["n"], c["d"]), offset=2.0)
    proj = np.asarray(pj.random_projection(c["seed"], c["d"], 2)) if c["projected"] else None
    with x64():
        proj = None if proj is None else proj.astype(np.float64)
        want = np.asarray(pj.greedy_coreset(bank, c["num"], projection=proj, start_indices=(0, c["n"] - 1)))
        got = np.asarray(sharding.greedy_coreset(bank, c["num"], projection=proj, start_indices=(0, c["n"] - 1), mesh=mesh))
    np.testing.assert_array_equal(got, want)


@given(c=cases())
def test_coreset_float32_equals_single_device(c, mesh):
    bank = gaussian(c["seed"], (c["n"], c["d"])).astype(np.float32)
    proj = np.asarray(pj.random_projection(c["seed"], c["d"], 2)) if c["projected"] else None
    want = np.asarray(pj.greedy_coreset(bank, c["num"], projection=proj))
    got = np.asarray(sharding.greedy_coreset(bank, c["num"], projection=proj, mesh=mesh))
    np.testing.assert_array_equal(got, want)


@given(c=cases())
def test_search_and_scores_equal_single_device(c, mesh):
    bank = gaussian(c["seed"], (c["n"], c["d"])).astype(np.float32)
    queries = gaussian(c["seed"] + 1, (11, c["d"])).astype(np.float32)
    k = min(c["k"], c["n"])
    want_d, want_i = pj.nearest_neighbors(bank, queries, k)
    got_d, got_i = sharding.nearest_neighbors(bank, queries, k, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    assert_close(got_d, want_d)
    feats = gaussian(c["seed"] + 2, (2, 7, c["d"])).astype(np.float32)
    b = min(5, c["n"])
    want_s, want_p = pj.image_scores(bank, feats, num_neighbors=b)
    got_s, got_p = sharding.image_scores(bank, feats, num_neighbors=b, mesh=mesh)
    assert_close(got_s, want_s)
    assert_close(got_p, want_p)
    with x64():
        got_d, got_i = sharding.nearest_neighbors(bank.astype(np.float64), queries.astype(np.float64), k, mesh=mesh)
        want_d, want_i = pj.nearest_neighbors(bank.astype(np.float64), queries.astype(np.float64), k)
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))


def test_bank_stays_sharded(mesh):
    bank = gaussian(0, (1000, 8)).astype(np.float32)
    index = sharding.build_index(bank, mesh)
    assert index.rows.sharding.spec == P("rows")
    assert {s.data.shape[0] for s in index.rows.addressable_shards} == {index.rows.shape[0] // 8}
    sharded = sharding.shard_rows(bank, mesh)
    assert sharding.shard_rows(sharded, mesh) is sharded  # an already sharded bank is used as it is


@pytest.fixture(scope="module")
def one_process():
    """The synthetic images, and a model fitted on one device on all the training images, with its
    scores and maps of all the test images (the two-process test's reference)."""
    from patchcore_jax._src.api.patchcore import PatchCore
    from patchcore_jax._src.model.config import PatchCoreConfig
    from patchcore_jax.data import make_synthetic
    from tests.multiprocess_worker import CONFIG

    data = make_synthetic(seed=3, n_train=5, n_test_good=2, n_test_defect=3, size=80, margin=16)
    cfg = PatchCoreConfig(**CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = PatchCore(cfg, progress=False).fit(data["train"])
    scores, maps = single.predict(data["test"])
    return dict(data=data, cfg=cfg, model=single, scores=scores, maps=maps)


def test_patchcore_with_a_mesh_matches_one_device(mesh, one_process):
    from patchcore_jax._src.api.patchcore import PatchCore

    data, cfg, single = one_process["data"], one_process["cfg"], one_process["model"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multi = PatchCore(cfg, progress=False, mesh=mesh).fit(data["train"])
    np.testing.assert_allclose(np.asarray(multi.bank), np.asarray(single.bank), rtol=1e-5, atol=1e-5)
    s2, m2 = multi.predict(data["test"])
    assert_close(s2, one_process["scores"])
    assert_close(m2, one_process["maps"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        everywhere = PatchCore(cfg, progress=False, mesh="all")
    assert everywhere.mesh.size == len(jax.devices())


@pytest.mark.parametrize("n", [0, 1, 5, 6, 7])
@pytest.mark.parametrize("processes", [1, 2, 3])
def test_process_shares_are_contiguous_blocks_in_order(n, processes):
    from patchcore_jax.sharding import process_share

    items = [f"{i:02d}.png" for i in range(n)]
    shares = [process_share(items, process_index=p, process_count=processes) for p in range(processes)]
    assert sum(shares, []) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="process_index"):
        process_share(items, process_index=processes, process_count=processes)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_each_holding_half_the_bank_and_fitting_on_their_share(tmp_path, one_process):
    from PIL import Image

    data = one_process["data"]
    for part in ("train", "test"):
        os.makedirs(tmp_path / part)
        for i, image in enumerate(data[part]):
            Image.fromarray(image).save(tmp_path / part / f"{i:02d}.png")
    (tmp_path / "broken.png").write_bytes(b"not a PNG")
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "result")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(i), str(port), str(tmp_path), out],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out_text, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(next(line for line in out_text.splitlines() if line.startswith('{"process"')))
               for out_text, _ in outs]
    for r in results:
        assert r["devices"] == 4 and r["local_rows"] == 200  # half of the 400 rows on each process
        assert r["coreset_equal"] and r["indices_equal"]
        assert r["max_dist_diff"] < 1e-5 and r["max_score_diff"] < 1e-5
    # Fit and predict: 5 training and 5 test images over 2 processes, 3 and 2 each (batch size 2, so
    # process 1 takes part in a step with no images of its own).
    got = [np.load(f"{out}.{i}.npz") for i in range(2)]
    np.testing.assert_array_equal(got[0]["bank"], got[1]["bank"])  # the same bank on every process
    np.testing.assert_allclose(got[0]["bank"], np.asarray(one_process["model"].bank), rtol=1e-5, atol=1e-5)
    assert [list(g["names"]) for g in got] == [["00.png", "01.png", "02.png"], ["03.png", "04.png"]]
    share = [slice(0, 3), slice(3, 5)]
    for g, rows in zip(got, share):
        assert_close(g["scores"], one_process["scores"][rows])
        assert_close(g["maps"], one_process["maps"][rows])
    assert [str(g["error"]) for g in got] == ["ProcessFailed", "ValueError"]
    single = one_process["model"]
    features = np.asarray(single.embed_crops(np.stack([single.prepare(x) for x in one_process["data"]["test"]])))
    for g, rows in zip(got, share):
        assert_close(g["features"], features[rows])
