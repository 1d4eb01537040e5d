"""Plain class-folder datasets (`--dataset folder --root DIR`) and portable few-shot splits (export / import):
layouts, the drawn split and where it goes, class names and template files, every method trains on a folder
dataset, and a split exported on one machine is what another machine loads."""
import json
import os
import shutil

import pytest
import torch

import data
import files
import train
import datatools
from conftest import FOLDERS, make_clip, make_folder_dataset


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "tiny_clip.pt")
    torch.save(make_clip().state_dict(), path)
    return path


def test_folder_split_is_drawn_once_stratified_and_seeded(tmp_path):
    d = make_folder_dataset(tmp_path / "mine")
    os.makedirs(os.path.join(d, "runs_by_mistake"))  # a folder without images is not a class
    b = data.load_benchmark("folder", d, shots=0)
    assert b.classnames == ["blue square", "green triangle", "red circle", "yellow cross"]
    assert b.template == "a photo of a {}."
    path = os.path.join(d, "split_folder.json")
    with open(path) as f:
        split = json.load(f)
    assert split["meta"]["seed"] == 1 and split["meta"]["folders"] == FOLDERS
    for y in range(4):  # 10 images per class: 5 train / 2 val / 3 test, disjoint
        parts = [[p for p, lab, _ in split[s] if lab == y] for s in ("train", "val", "test")]
        assert [len(p) for p in parts] == [5, 2, 3]
        assert len(set(sum(parts, []))) == 10 and all(p.startswith(FOLDERS[y] + "/") for p in sum(parts, []))
    mtime = os.path.getmtime(path)
    assert data.load_benchmark("folder", d, shots=0).train == b.train and os.path.getmtime(path) == mtime
    other = data.make_folder_split(d, seed=2, force=True)  # another seed draws another split, same counts
    with open(other) as f:
        redrawn = json.load(f)
    assert redrawn["train"] != split["train"] and len(redrawn["train"]) == len(split["train"])
    assert data._class_counts(2, data.FOLDER_FRACTIONS) == (1, 0) and data._class_counts(3, data.FOLDER_FRACTIONS) == (2, 0)


def test_folder_class_names_and_template_files_are_read_on_every_load(tmp_path, capsys):
    d = make_folder_dataset(tmp_path / "mine", per_class=4, masks=False)
    data.load_benchmark("folder", d, shots=0)
    with open(os.path.join(d, "classnames.txt"), "w") as f:
        f.write("red_circle a round red disc\nblue_square\tthe blue box\n")
    with open(os.path.join(d, "template.txt"), "w") as f:
        f.write("a toy picture of a {}.\n")
    b = data.load_benchmark("folder", d, shots=2, seed=1)
    assert b.classnames == ["the blue box", "green triangle", "a round red disc", "yellow cross"]
    assert b.template == "a toy picture of a {}." and {c for _, _, c in b.train} >= {"the blue box"}
    assert datatools.main(["check", "folder", "--root", d]) == 0
    out = capsys.readouterr().out
    assert "one folder per class" in out and "classnames.txt" in out and "template.txt" in out
    assert "masks: none" in out
    with open(os.path.join(d, "classnames.txt"), "a") as f:
        f.write("purple_star a star\n")
    with pytest.raises(data.DataValueError, match="purple_star"):
        data.load_benchmark("folder", d, shots=0)


def test_read_only_folder_writes_its_split_to_the_user_cache(tmp_path, monkeypatch, caplog):
    d = make_folder_dataset(tmp_path / "shared", per_class=4, masks=False)
    monkeypatch.setenv("DAPT_CACHE", str(tmp_path / "cache"))
    real = data.can_write  # tests run as root, for whom os.access says yes: the dataset folder is read-only
    monkeypatch.setattr(data, "can_write", lambda folder: not folder.startswith(d) and real(folder))
    with caplog.at_level("INFO", logger="dapt"):
        b = data.load_benchmark("folder", d, shots=0)
    path = os.path.join(data.folder_cache_dir(d), "split_folder.json")
    assert os.path.isfile(path) and not os.path.exists(os.path.join(d, "split_folder.json"))
    assert path.startswith(str(tmp_path / "cache")) and "user cache" in caplog.text
    assert b.meta["split_file"] == path and data.find_folder_split(d) == path


def test_folder_subtree_layouts(tmp_path):
    full = make_folder_dataset(tmp_path / "a", masks=False, parts={"train": 3, "val": 1, "test": 2})
    b = data.load_benchmark("folder", full, shots=0)
    assert (len(b.train), len(b.val), len(b.test)) == (12, 4, 8)
    assert data.find_folder_split(full) is None  # the sub-trees are the split
    assert all("/train/" in p for p, _, _ in b.train) and all("/test/" in p for p, _, _ in b.test)
    shutil.rmtree(os.path.join(full, "test", "red_circle"))
    with pytest.raises(data.EmptyClassError, match="red_circle.*lack images in train/ or test/"):
        data.load_benchmark("folder", full, shots=0)
    no_val = make_folder_dataset(tmp_path / "b", masks=False, parts={"train": 5, "test": 2})
    b = data.load_benchmark("folder", no_val, shots=0)
    assert (len(b.train), len(b.val), len(b.test)) == (16, 4, 8)  # val = 20 % of each train class, drawn once
    assert os.path.isfile(os.path.join(no_val, "split_folder.json"))
    shutil.rmtree(os.path.join(no_val, "test"))
    with pytest.raises(data.DataValueError, match="needs both train/ and test/"):
        data.load_benchmark("folder", no_val, shots=0)
    with pytest.raises(data.DatasetNotFoundError, match="one sub-folder per class"):
        data.load_benchmark("folder", tmp_path / "missing", shots=0)


def test_every_setting_trains_on_a_folder_dataset(tmp_path, tiny_clip_path):
    """zero-shot (DIR/template.txt), CoOp few-shot, DAPT base-to-novel with the DIR/mask/ masks, DAPT-G."""
    d = make_folder_dataset(tmp_path / "mine", per_class=6)
    with open(os.path.join(d, "template.txt"), "w") as f:
        f.write("a toy photo of a {}.\n")
    common = ["--dataset", "folder", "--root", d, "--out", str(tmp_path / "runs"), "--clip", tiny_clip_path,
              "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--log-every", "1000"]
    zs = train.main(["--method", "zsclip", *common])
    assert zs["config"]["template"] == "a toy photo of a {}." and set(zs["accuracy"]) == {"all"}
    fs = train.main(["--method", "coop", "--shots", "2", "--n-ctx", "4", *common])
    assert fs["config"]["benchmark"]["counts"]["train"] == 8
    b2n = train.main(["--method", "dapt", "--subsample", "base", "--shots", "2", "--batch", "4", *common])
    assert set(b2n["accuracy"]) == {"base", "new", "hm"} and b2n["classnames"]["new"] == ["red circle", "yellow cross"]
    assert b2n["config"]["benchmark"]["mask_encoding"] == "white"
    g = train.main(["--method", "dapt", "--cue", "gradcam", "--subsample", "base", "--shots", "2", "--tag", "-g",
                    *common])
    b, n = g["accuracy"]["base"], g["accuracy"]["new"]
    assert g["accuracy"]["hm"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)  # the HM of its own base, new
    assert g["config"]["cue"] == "gradcam" and g["test_images"] == {"base": 4, "new": 4}


def test_exported_splits_are_what_another_machine_loads(toy_copy, tmp_path, capsys):
    """Export the toy's few-shot splits, import them on a 'second machine' (another copy, no caches): identical
    items; an edited export (checksums updated) is what load_benchmark then returns; a damaged one is refused."""
    other = str(tmp_path / "machine2")
    shutil.copytree(toy_copy, other)
    shutil.rmtree(os.path.join(other, "toy", "split_fewshot"), ignore_errors=True)
    assert datatools.main(["export-splits", "toy", "--root", toy_copy, "--out", str(tmp_path / "splits")]) == 0
    export = os.path.join(tmp_path, "splits", "toy")
    names = sorted(os.listdir(export))
    assert len(names) == 16 and "SHA256SUMS" in names  # K in 1, 2, 4, 8, 16 x seeds 1-3
    with open(os.path.join(export, "shot_4-seed_2.json")) as f:
        exported = json.load(f)
    assert all(not os.path.isabs(p) for p, _, _ in exported["train"]) and exported["K"] == 4
    assert datatools.main(["import-splits", str(tmp_path / "splits"), "--root", other]) == 0
    for k, s in ((1, 1), (4, 2), (16, 3)):
        a = data.load_benchmark("toy", toy_copy, shots=k, seed=s)
        b = data.load_benchmark("toy", other, shots=k, seed=s)
        rel = lambda items, root: [(os.path.relpath(p, root), y, c) for p, y, c in items]  # noqa: E731
        assert rel(a.train, toy_copy) == rel(b.train, other) and rel(a.val, toy_copy) == rel(b.val, other)
        assert b.meta["cache_hit"]
    # an edited split (one training image swapped for another of its class) travels when its checksum does
    path = os.path.join(export, "shot_1-seed_1.json")
    with open(path) as f:
        d = json.load(f)
    used = {p for p, _, _ in d["train"]}
    p0, y0, c0 = d["train"][0]
    full = data.read_full_split(data.DATASETS["toy"], os.path.join(other, "toy"))[0]
    d["train"][0] = next([p, y, c] for p, y, c in full["train"] if y == y0 and p not in used)
    files.write_json(path, d)
    with pytest.raises(data.SplitFileError, match="sha256 differs"):
        datatools.import_splits(export, other)
    with open(os.path.join(export, "SHA256SUMS")) as f:
        sums = [ln.split("  ") for ln in f.read().splitlines()]
    with open(os.path.join(export, "SHA256SUMS"), "w") as f:
        f.writelines(f"{files.sha256_file(os.path.join(export, n)) if n == 'shot_1-seed_1.json' else h}  {n}\n"
                     for h, n in sums)
    datatools.import_splits(export, other)
    b = data.load_benchmark("toy", other, shots=1, seed=1)
    assert os.path.relpath(b.train[0][0], os.path.join(other, "toy", "images")) == d["train"][0][0] != p0
    # an item this machine does not have is refused, naming it
    os.remove(os.path.join(other, "toy", "images", d["train"][0][0]))
    with pytest.raises(data.SplitFileError, match="missing under .*the two copies of the dataset differ"):
        datatools.import_splits(export, other)


def test_a_folder_dataset_split_travels_with_its_export(tmp_path):
    d = make_folder_dataset(tmp_path / "mine", per_class=6, masks=False)
    data.make_folder_split(d, seed=7)
    out = datatools.export_splits("folder", d, str(tmp_path / "splits"), shots=(1, 2), seeds=(1,))
    assert os.path.basename(out) == "folder-mine" and "split_folder.json" in os.listdir(out)
    copy = str(tmp_path / "elsewhere" / "mine")
    shutil.copytree(d, copy, ignore=shutil.ignore_patterns("split_*"))
    datatools.import_splits(str(tmp_path / "splits"), copy)
    for k in (1, 2):
        a, b = data.load_benchmark("folder", d, shots=k), data.load_benchmark("folder", copy, shots=k)
        assert [os.path.relpath(p, d) for p, _, _ in a.train + a.test] == \
               [os.path.relpath(p, copy) for p, _, _ in b.train + b.test]
    data.make_folder_split(copy, seed=8, force=True)  # a different local split is not replaced silently
    with pytest.raises(data.SplitFileError, match="--force"):
        datatools.import_splits(out, copy)
    assert len(datatools.import_splits(out, copy, force=True)) == 2
