"""The streaming bank builder: the same coreset as in memory, spill files always removed."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from patchcore_jax._src.stages import bank as bank_lib
from patchcore_jax._src.stages import coreset
from tests.helpers import gaussian


def _stream(bank, sizes):
    at = 0
    for s in sizes:
        yield bank[at : at + s]
        at += s


SIZES = [100, 777, 1, 512, 610]  # 2000 rows in uneven batches


@pytest.mark.parametrize("method", ["lazy", "dense"])
def test_same_coreset_as_in_memory(method, tmp_path):
    full = gaussian(0, (2000, 48)).astype(np.float32)
    proj = coreset.random_projection(0, 48, 16)
    num = int(2000 * 0.1)
    starts = np.random.default_rng(3).choice(2000, size=10, replace=False).tolist()  # the documented rule
    want = np.asarray(coreset.greedy_coreset(jnp.asarray(full), num, projection=proj, start_indices=starts,
                                             method=method, block=128))
    rows, got = bank_lib.build_memory_bank(_stream(full, SIZES), coreset_fraction=0.1, projection=proj, seed=3,
                                           method=method, block=128, spill_dir=tmp_path)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(rows, full[np.sort(want)])
    assert os.listdir(tmp_path) == []


def test_spill_files_removed_on_failure_and_others_kept(tmp_path):
    keep = tmp_path / "mine.npy"
    np.save(keep, np.zeros(3))
    full = gaussian(1, (300, 8)).astype(np.float32)

    def broken():
        yield full[:100]
        yield full[100:200]
        raise RuntimeError("the reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        bank_lib.build_memory_bank(broken(), coreset_fraction=0.1, projection=np.eye(8, 4), spill_dir=tmp_path)
    with pytest.raises(ValueError, match=r"batches\[1\].*\(n, 8\)"):
        bank_lib.build_memory_bank([full[:10], full[:10, :5]], coreset_fraction=0.1, projection=np.eye(8, 4),
                                   spill_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["mine.npy"]


def test_whole_bank_and_device_batches(tmp_path):
    full = gaussian(2, (50, 8)).astype(np.float32)
    rows, got = bank_lib.build_memory_bank([jnp.asarray(full[:20]), full[20:]], coreset_fraction=1.0,
                                           projection=np.eye(8, 3), spill_dir=tmp_path)
    assert sorted(got.tolist()) == list(range(50))
    np.testing.assert_array_equal(rows, full)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="projection"):
        bank_lib.build_memory_bank([np.ones((4, 3))], coreset_fraction=0.1, projection=None)
    with pytest.raises(ValueError, match="batches.*none"):
        bank_lib.build_memory_bank([], coreset_fraction=0.1, projection=np.eye(3), spill_dir=tmp_path)
    with pytest.raises(ValueError, match="start_indices"):
        bank_lib.build_memory_bank([np.ones((4, 3))], coreset_fraction=0.5, projection=np.eye(3), start_indices=[9],
                                   spill_dir=tmp_path)
    with pytest.raises(ValueError, match="coreset_fraction"):
        bank_lib.build_memory_bank([np.ones((4, 3))], coreset_fraction=0, projection=np.eye(3))
    assert os.listdir(tmp_path) == []
