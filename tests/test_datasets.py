import json
import os

import numpy as np
import pytest

from patchcore_jax._src.app import cli
from patchcore_jax._src.io.data import datasets as datasets
from patchcore_jax._src.model.geometry import ImageGeometry
from tests import dataset_trees

SMALL = ["--backbone", "resnet18", "--neighbors", "3", "--pretrain-dim", "64", "--target-dim", "64", "--batch-size", "4",
         "--quiet", "--heatmaps", "2"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    return {
        "mvtec": dataset_trees.make_mvtec(str(base / "mvtec")),
        "mtd": dataset_trees.make_mtd(str(base / "mtd")),
        "mstc": dataset_trees.make_mstc(str(base / "mstc")),
    }


def test_readers_follow_the_layouts(trees):
    bottle, grid = datasets.mvtec(trees["mvtec"])
    assert (bottle.name, len(bottle.train), len(bottle.test)) == ("bottle", 4, 5)
    assert sorted({s.kind for s in grid.test}) == ["good", "scratch", "spot"]
    assert all(s.mask.endswith("_mask.png") for s in grid.test if s.label)
    (tile,) = datasets.mtd(trees["mtd"])
    assert len(tile.train) == 4 and sum(s.label == 0 for s in tile.test) == 1  # 20% of 5 held out
    assert sorted({s.kind for s in tile.test}) == ["blowhole", "crack", "good"]
    (scene,) = datasets.mstc(trees["mstc"])
    assert [s.name for s in scene.train] == ["train/01_001/0", "train/01_001/5", "train/01_001/10"]
    assert [s.label for s in scene.test] == [0, 1, 1]


def test_records_have_the_published_geometry(trees):
    (grid,) = datasets.mvtec(trees["mvtec"], ["grid"])
    rec = datasets.load_sample(next(s for s in grid.test if s.label), geometry=ImageGeometry.square(256))
    assert rec["image"].shape == (256, 256, 3) and rec["image"].dtype == np.uint8  # grayscale expanded
    assert rec["mask"].shape == (256, 256) and rec["mask"].dtype == np.uint8 and 0 < rec["mask"].mean() < 255
    (tile,) = datasets.mtd(trees["mtd"])
    for s in tile.train:  # odd, differing sizes all come out square
        assert datasets.load_sample(s, geometry=ImageGeometry.square(256))["image"].shape == (256, 256, 3)


def _evaluate(tmp_path, dataset, root, source, *extra):
    out = tmp_path / f"{dataset}-{source}"
    code = cli.main(["evaluate", "--dataset", dataset, "--root", root, "--out", str(out), "--source", source,
                     "--tfds-dir", str(tmp_path / "tfds"), *SMALL, *extra])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("dataset", ["mvtec", "mtd", "mstc"])
def test_evaluate_through_folders_and_tfds_agree(dataset, trees, tmp_path, capsys):
    out_f, folder = _evaluate(tmp_path, dataset, trees[dataset], "folder")
    out_t, via_tfds = _evaluate(tmp_path, dataset, trees[dataset], "tfds")
    assert folder["categories"].keys() == via_tfds["categories"].keys()
    for name, res in folder["categories"].items():
        for key in ("image_auroc", "pixel_auroc", "au_pro"):
            assert res[key] is not None and 0.0 <= res[key] <= 1.0
            assert res[key] == via_tfds["categories"][name][key]  # same arrays, same order: bit-identical
        a = {r["name"]: r["score"] for r in json.loads((out_f / "categories" / f"{name}.json").read_text())["result"]["scores"]}
        b = {r["name"]: r["score"] for r in json.loads((out_t / "categories" / f"{name}.json").read_text())["result"]["scores"]}
        assert a.keys() == b.keys()
        assert a == b
    rows = (out_f / "results.csv").read_text().splitlines()
    assert rows[0].startswith("category,image_auroc") and rows[-1].startswith("mean,")
    assert len(list((out_f / "heatmaps").rglob("*.png"))) >= 2
    if dataset == "mvtec":  # resumable: a second run keeps finished categories
        before = (out_f / "categories" / "bottle.json").stat().st_mtime_ns
        _evaluate(tmp_path, dataset, trees[dataset], "folder")
        assert "done before with the same inputs and settings, kept" in capsys.readouterr().out
        assert (out_f / "categories" / "bottle.json").stat().st_mtime_ns == before


def _broken_copy(tmp_path, trees, name):
    import shutil

    root = tmp_path / name
    shutil.copytree(trees["mvtec"], root)
    return root


def test_bad_data_names_the_file(trees, tmp_path, capsys):
    run = lambda root, out: cli.main(["evaluate", "--dataset", "mvtec", "--root", str(root), "--out", str(out), *SMALL])  # noqa: E731

    root = _broken_copy(tmp_path, trees, "nomask")
    os.remove(root / "grid" / "ground_truth" / "scratch" / "001_mask.png")
    assert run(root, tmp_path / "o1") == 2
    assert "grid/test/scratch/001.png: test image without its mask" in capsys.readouterr().err

    root = _broken_copy(tmp_path, trees, "badsize")
    from PIL import Image

    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "grid" / "ground_truth" / "spot" / "000_mask.png")
    assert run(root, tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "000_mask.png: mask is 12x10 but its image" in err
    assert not (tmp_path / "o2" / "categories" / "grid.json").exists()  # nothing half-written

    root = _broken_copy(tmp_path, trees, "unreadable")
    (root / "bottle" / "train" / "good" / "001.png").write_bytes(b"garbage")
    assert run(root, tmp_path / "o3") == 2
    assert "bottle/train/good/001.png: not a readable image" in capsys.readouterr().err

    root = _broken_copy(tmp_path, trees, "empty")
    (root / "bottle" / "test" / "good" / "000.png").write_bytes(b"")
    assert run(root, tmp_path / "o4") == 2
    assert "000.png: empty file" in capsys.readouterr().err

    assert run(tmp_path / "absent", tmp_path / "o5") == 2
    assert "absent: missing folder" in capsys.readouterr().err


def test_a_changed_input_or_setting_recomputes_and_a_corrupt_result_is_named(trees, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(trees["mvtec"], root)
    out = tmp_path / "out"
    args = ["evaluate", "--dataset", "mvtec", "--root", str(root), "--out", str(out), "--categories", "bottle", *SMALL]
    assert cli.main(args) == 0
    first = json.loads((out / "categories" / "bottle.json").read_text())
    capsys.readouterr()
    # The same file name with other pixels (a newer modification time) is another input.
    from PIL import Image

    img = np.asarray(Image.open(root / "bottle" / "test" / "good" / "000.png"))
    Image.fromarray(255 - img).save(root / "bottle" / "test" / "good" / "000.png")
    assert cli.main(args) == 0
    assert "kept" not in capsys.readouterr().out
    second = json.loads((out / "categories" / "bottle.json").read_text())
    assert second["fingerprint"] != first["fingerprint"]
    assert second["result"]["scores"] != first["result"]["scores"]
    # Another setting into the same folder: refused before any work, the earlier result kept...
    assert cli.main(args + ["--mask-rule", "half", "--coreset", "0.2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "made with other settings" in err
    assert 'mask_rule "published" -> "half"' in err and "coreset_fraction 0.1 -> 0.2" in err and "--overwrite" in err
    assert json.loads((out / "categories" / "bottle.json").read_text()) == second
    # ... unless replacing it is asked for.
    assert cli.main(args + ["--mask-rule", "half", "--overwrite"]) == 0
    assert "kept" not in capsys.readouterr().out
    assert json.loads((out / "categories" / "bottle.json").read_text())["settings"]["mask_rule"] == "half"
    (out / "categories" / "bottle.json").write_text('{"settings": ')
    assert cli.main(args) == 2
    assert "categories/bottle.json: corrupt category result" in capsys.readouterr().err


def test_hidden_and_system_files_are_skipped(trees, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(trees["mvtec"], root)
    for folder in (root, root / "bottle", root / "bottle" / "test", root / "bottle" / "train" / "good",
                   root / "bottle" / "test" / "scratch"):
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (folder / "Thumbs.db").write_bytes(b"\xd0\xcf")
    (root / "bottle" / "train" / "good" / "._000.png").write_bytes(b"\0\5\26\7")
    (root / "bottle" / "test" / "scratch" / "._000.png").write_bytes(b"\0\5\26\7")
    (bottle,) = datasets.mvtec(str(root), ["bottle"])
    assert len(bottle.train) == 4 and len(bottle.test) == 5
    assert cli.main(["evaluate", "--dataset", "mvtec", "--root", str(root), "--out", str(tmp_path / "o"),
                     "--categories", "bottle", *SMALL]) == 0


def test_evaluate_never_writes_into_a_folder_it_does_not_own(trees, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("my own results")
    code = cli.main(["evaluate", "--dataset", "mvtec", "--root", trees["mvtec"], "--out", str(mine), *SMALL])
    assert code == 2 and "mine: exists and is not empty" in capsys.readouterr().err
    assert sorted(os.listdir(mine)) == ["results.json"] and (mine / "results.json").read_text() == "my own results"
