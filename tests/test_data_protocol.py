"""data.py, the benchmark protocol: dataset layouts, few-shot sampling (goldens), cache, base/new, Dassl pickle
import, errors, the check command. Datasets are tiny fakes written to tmp_path (8 x 8 JPEGs); the few-shot goldens
use the real Caltech101 split file in ../shared/data."""
import json
import logging
import os
import pickle
import shutil
import sys
import types

import pytest
from PIL import Image

import data
import files
import datatools
import loader
import prompting
import toy

HERE = os.path.dirname(os.path.abspath(__file__))
REAL_SPLIT = os.path.join(HERE, "..", "..", "shared", "data", "split_zhou_Caltech101.json")


@pytest.fixture
def real_split():
    """CoOp's split_zhou_Caltech101.json: ../shared/data beside the clone (CI has it) or DAPT_CALTECH101_SPLIT.
    Without it the three tests that need it skip, naming the file; under CI a missing file is a failure."""
    path = os.environ.get("DAPT_CALTECH101_SPLIT", REAL_SPLIT)
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI runs with ../shared/data beside the clone")
        pytest.skip(f"CoOp's Caltech101 split file is not at {path}: set DAPT_CALTECH101_SPLIT to a copy of "
                    "split_zhou_Caltech101.json (CoOp's DATASETS.md) to run these golden tests")
    return path
GOLDEN = os.path.join(HERE, "golden", "fewshot_caltech101.json")


def _img(path, w=8, h=8, colour=(90, 120, 200)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


# name -> (class names as stored, relative path pattern for class c / file n)
def _in(folders, fmt):
    return lambda c, n: fmt.format(folders[c], n)


FAKE_JSON = {  # class names as stored, and the relative path of image n of class c
    "caltech101": (["face", "leopard", "accordion"], _in(["Faces", "Leopards", "accordion"], "{}/image_{:04d}.jpg")),
    "oxford_pets": (["abyssinian", "basset_hound", "pug"], _in(["Abyssinian", "basset_hound", "pug"], "{}_{}.jpg")),
    "stanford_cars": (["2012 Tesla Model S", "AM General Hummer SUV 2000", "smart fortwo Convertible 2012"],
                      lambda c, n: f"cars_{'train' if n < 50 else 'test'}/{c:02d}{n:03d}.jpg"),
    "oxford_flowers": (["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
                       lambda c, n: f"image_{c}{n:04d}.jpg"),
    "food101": (["apple_pie", "baby_back_ribs", "baklava"],
                _in(["apple_pie", "baby_back_ribs", "baklava"], "{}/{}.jpg")),
    "sun397": (["abbey", "indoor airport_terminal", "outdoor apartment_building"],
               _in(["a/abbey", "a/airport_terminal/indoor", "a/apartment_building/outdoor"], "{}/sun_{}.jpg")),
    "dtd": (["banded", "blotchy", "braided"], lambda c, n: f"{['banded', 'blotchy', 'braided'][c]}/{c}_{n:04d}.jpg"),
    "eurosat": (["Annual Crop Land", "Forest", "Sea or Lake"], _in(["AnnualCrop", "Forest", "SeaLake"], "{}/x_{}.jpg")),
    "ucf101": (["Apply_Eye_Makeup", "Archery", "Band_Marching"],
               lambda c, n: f"{['Apply_Eye_Makeup', 'Archery', 'Band_Marching'][c]}/v_{c}_g{n:02d}.jpg"),
}
PER = {"train": 5, "val": 2, "test": 3}


def make_fake(root, name, per=PER, write=_img):
    """A tiny copy of dataset `name` in the CoOp layout; -> expected class names (as the Benchmark gives them)."""
    info = data.DATASETS[name]
    d = os.path.join(root, info.folder)
    img_dir = os.path.join(d, info.image_dir)
    if name in FAKE_JSON:
        names, rel = FAKE_JSON[name]
        split, n = {}, 0
        for s in ("train", "val", "test"):
            split[s] = []
            for c in range(len(names)):
                for _ in range(per[s]):
                    n += 1
                    m = 50 + n if name == "stanford_cars" and s == "test" else n  # cars_test/ for the test split
                    split[s].append([rel(c, m), c, names[c]])
                    write(os.path.join(img_dir, split[s][-1][0]))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, info.split), "w") as f:
            json.dump(split, f)
        return [c.replace("_", " ") for c in names]
    if name == "fgvc_aircraft":
        names = ["707-320", "A300B4", "Boeing 717"]
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "variants.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
        n = 0
        for s in ("train", "val", "test"):
            lines = []
            for c, v in enumerate(names):
                for _ in range(per[s]):
                    n += 1
                    lines.append(f"{1000000 + n} {v}")
                    write(os.path.join(img_dir, f"{1000000 + n}.jpg"))
            with open(os.path.join(d, f"images_variant_{s}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
        return names
    wnids = ["n01440764", "n01443537", "n01484850"]
    names = ["tench", "goldfish", "great white shark"]
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "classnames.txt"), "w") as f:
        f.write("".join(f"{w} {c}\n" for w, c in zip(wnids, names)))
    subs = {"imagenet": [("train", per["train"]), ("val", per["test"])], "imagenetv2": [("", per["test"])]}
    for sub, k in subs.get(name, [("", per["test"])]):
        for c, w in enumerate(wnids):
            folder = str(c) if name == "imagenetv2" else w
            for i in range(k):
                write(os.path.join(img_dir, sub, folder, f"img_{i}.jpg"))
    if name in ("imagenet_a", "imagenet_r"):
        with open(os.path.join(img_dir, "README.txt"), "w") as f:
            f.write("not a class\n")
    return names


def test_dataset_names_and_templates():
    assert list(data.DATASETS) == ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                                   "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenet", "imagenetv2",
                                   "imagenet_sketch", "imagenet_a", "imagenet_r", "toy", "folder"]
    assert data.DATASETS["dtd"].template == "{} texture."
    assert data.DATASETS["eurosat"].template == "a centered satellite photo of {}."
    assert data.DATASETS["food101"].template == "a photo of {}, a type of food."
    assert data.DATASETS["toy"].template == "a photo of a {}."
    assert len(prompting.IMAGENET_TEMPLATES) == 80 and len(set(prompting.IMAGENET_TEMPLATES)) == 80
    assert prompting.IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and prompting.IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 for t in prompting.IMAGENET_TEMPLATES + prompting.SELECT_TEMPLATES)
    assert len(prompting.SELECT_TEMPLATES) == 7


@pytest.mark.parametrize("name", [n for n in data.DATASETS if n not in ("toy", "folder")])
def test_fake_layouts_load(tmp_path, name):
    names = make_fake(str(tmp_path), name)
    info = data.DATASETS[name]
    full = data.load_benchmark(name, tmp_path, shots=0)
    assert full.classnames == names and full.template == info.template
    n = len(names)
    if info.test_only:
        assert (len(full.train), len(full.val), len(full.test)) == (0, 0, PER["test"] * n)
    elif name == "imagenet":
        assert (len(full.train), len(full.val), len(full.test)) == (PER["train"] * n, 0, PER["test"] * n)
    else:
        assert (len(full.train), len(full.val), len(full.test)) == (PER["train"] * n, PER["val"] * n, PER["test"] * n)
    for p, y, c in full.train + full.val + full.test:
        assert os.path.isfile(p) and os.path.isabs(p) and full.classnames[y] == c.replace("_", " ")
    assert full.meta["counts"]["test"] == len(full.test) and len(full.meta["split_sha256"]) == 64
    if not info.test_only:
        few = data.load_benchmark(name, tmp_path, shots=2, seed=1)
        assert len(few.train) == 2 * n and len(few.val) == (0 if name == "imagenet" else 2 * n)
        assert os.path.isfile(data.fewshot_cache_path(os.path.join(tmp_path, info.folder), 2, 1))


def test_imagenet_variant_labels(tmp_path):
    make_fake(str(tmp_path), "imagenetv2")
    b = data.load_benchmark("imagenetv2", tmp_path, shots=16)  # shots ignored: test only
    assert {(os.path.basename(os.path.dirname(p)), y) for p, y, _ in b.test} == {("0", 0), ("1", 1), ("2", 2)}
    make_fake(str(tmp_path), "imagenet_a")  # README.txt at the class level is skipped
    assert data.load_benchmark("imagenet_a", tmp_path).meta["n_classes"] == 3
    new = data.load_benchmark("imagenet_a", tmp_path, subsample="new")
    assert new.classnames == ["great white shark"] and {y for _, y, _ in new.test} == {0} and len(new.test) == 3


def test_coop_classname_rules(real_split):
    # every class folder of the real Caltech101 split maps to the split's class name
    with open(real_split) as f:
        split = json.load(f)
    for p, _, c in split["train"] + split["test"]:
        assert datatools.coop_classname("caltech101", p.split("/")[0]) == c
    assert datatools.coop_classname("caltech101", "BACKGROUND_Google") is None
    assert datatools.coop_classname("eurosat", "HerbaceousVegetation") == "Herbaceous Vegetation Land"
    assert datatools.coop_classname("ucf101", "ApplyEyeMakeup") == "Apply_Eye_Makeup"
    assert datatools.coop_classname("ucf101", "Apply_Eye_Makeup") == "Apply_Eye_Makeup"
    assert datatools.coop_classname("sun397", "/a/apartment_building/outdoor") == "outdoor apartment_building"
    assert datatools.coop_classname("oxford_pets", "great_pyrenees_173.jpg") == "great_pyrenees"


def _ungroup(g):
    return [f"{folder}/{pre}{mid}{suf}" for folder, (pre, suf, mids) in g.items() for mid in mids]


def test_fewshot_matches_dassl_goldens(real_split):
    """The sampler load_benchmark uses (read_split_json -> fewshot_split) against Dassl's procedure."""
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert files.sha256_file(real_split) == golden["split_sha256"]
    full = data.read_split_json(real_split)
    for k in (1, 2, 4, 8, 16):
        for seed in (1, 2, 3):
            train, val, short = data.fewshot_split(full["train"], full["val"], k, seed)
            g = golden[f"K={k},seed={seed}"]
            assert [p for p, _, _ in train] == _ungroup(g["train"]), (k, seed)
            assert [p for p, _, _ in val] == _ungroup(g["val"]), (k, seed)
            assert len(train) == 100 * k and len(val) == 100 * min(k, 4) and not short


def test_load_benchmark_uses_the_sampler(tmp_path):
    make_fake(str(tmp_path), "sun397", per={"train": 7, "val": 6, "test": 1})
    b = data.load_benchmark("sun397", tmp_path, shots=4, seed=3)
    full = data.read_split_json(os.path.join(tmp_path, "sun397", "split_zhou_SUN397.json"))
    train, val, _ = data.fewshot_split(full["train"], full["val"], 4, 3)
    img_dir = os.path.join(tmp_path, "sun397", "SUN397")
    assert [(os.path.join(img_dir, p), y) for p, y, _ in train] == [(p, y) for p, y, _ in b.train]
    assert [(os.path.join(img_dir, p), y) for p, y, _ in val] == [(p, y) for p, y, _ in b.val]
    assert b.classnames == ["abbey", "indoor airport terminal", "outdoor apartment building"]


def test_base_new_relabel_real_split(real_split):
    full = data.read_split_json(real_split)
    train, val, _ = data.fewshot_split(full["train"], full["val"], 16, 1)
    names = data._classnames_of(train, "split")
    b = data.subsample_classes(train, val, full["test"], "base")
    n = data.subsample_classes(train, val, full["test"], "new")
    assert data._classnames_of(b[0], "b") == names[:50] and data._classnames_of(n[0], "n") == names[50:]
    assert {y for _, y, _ in b[0]} == set(range(50)) and {y for _, y, _ in n[2]} == set(range(50))
    # same images, labels shifted by 50 for new; order kept
    assert [(p, y + 50) for p, y, _ in n[2]] == [(p, y) for p, y, _ in full["test"] if y >= 50]
    assert [p for p, _, _ in b[0]] == [p for p, y, _ in train if y < 50]
    assert len(b[2]) + len(n[2]) == len(full["test"]) and b[3] == {i: i for i in range(50)}


def test_base_new_odd_count(tmp_path):
    make_fake(str(tmp_path), "dtd")  # 3 classes -> base 2, new 1
    b = data.load_benchmark("dtd", tmp_path, shots=1, subsample="base")
    n = data.load_benchmark("dtd", tmp_path, shots=1, subsample="new")
    assert b.classnames == ["banded", "blotchy"] and n.classnames == ["braided"]
    assert {y for _, y, _ in n.train + n.val + n.test} == {0} and b.meta["label_map"] == {0: 0, 1: 1}
    assert n.meta["label_map"] == {2: 0}
    with pytest.raises(ValueError, match="subsample"):
        data.load_benchmark("dtd", tmp_path, shots=1, subsample="novel")


def test_full_split_shots_zero_or_minus_one(tmp_path):
    make_fake(str(tmp_path), "eurosat")
    a, b = data.load_benchmark("eurosat", tmp_path, shots=0), data.load_benchmark("eurosat", tmp_path, shots=-1)
    assert a.train == b.train and len(a.train) == 15 and a.meta["fewshot_cache"] is None
    with pytest.raises(ValueError, match="shots"):
        data.load_benchmark("eurosat", tmp_path, shots=-2)


def test_cache_round_trip_and_moved_folder(tmp_path, caplog):
    root = tmp_path / "a"
    make_fake(str(root), "food101", per={"train": 9, "val": 5, "test": 2})
    first = data.load_benchmark("food101", root, shots=4, seed=2)
    path = first.meta["fewshot_cache"]
    with open(path) as f:
        c = json.load(f)
    assert not first.meta["cache_hit"] and c["meta"]["sampler"] == "dassl-v1" and c["meta"]["K"] == 4
    assert c["meta"]["split_sha256"] == first.meta["split_sha256"]
    assert all(not os.path.isabs(p) for p, _, _ in c["train"] + c["val"])  # portable: relative paths
    # a hit returns the same split without drawing; the cache is what is used (edit it to prove it)
    again = data.load_benchmark("food101", root, shots=4, seed=2)
    assert again.meta["cache_hit"] and again.train == first.train and again.val == first.val
    shutil.move(str(root), str(tmp_path / "b"))
    moved = data.load_benchmark("food101", tmp_path / "b", shots=4, seed=2)
    assert moved.meta["cache_hit"]
    rel = lambda b, r: [(os.path.relpath(p, r), y) for p, y, _ in b.train + b.val]  # noqa: E731
    assert rel(moved, tmp_path / "b") == rel(first, root)
    # another seed differs; a changed split file invalidates the cache (logged)
    assert data.load_benchmark("food101", tmp_path / "b", shots=4, seed=3).train != first.train
    split = tmp_path / "b" / "food-101" / "split_zhou_Food101.json"
    d = json.loads(split.read_text())
    d["test"] = d["test"][:-1]
    split.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING, logger="dapt"):
        regen = data.load_benchmark("food101", tmp_path / "b", shots=4, seed=2)
    assert not regen.meta["cache_hit"] and "regenerating" in caplog.text
    assert rel(regen, tmp_path / "b") == rel(first, root)  # same sampler, same train/val lists -> same subset


def test_fewer_than_k_logged(tmp_path, caplog):
    make_fake(str(tmp_path), "dtd")
    with caplog.at_level(logging.WARNING, logger="dapt"):
        b = data.load_benchmark("dtd", tmp_path, shots=8, seed=1)
    assert len(b.train) == 15 and len(b.meta["few_classes"]) == 3  # 5 < 8 images each: all kept
    assert "has 5 < 8 training images" in caplog.text


class _Datum:  # the shape of dassl.data.datasets.base_dataset.Datum
    def __init__(self, impath, label, classname):
        self._impath, self._label, self._domain, self._classname = impath, label, 0, classname


def test_import_dassl_pickle(tmp_path):
    make_fake(str(tmp_path), "dtd")
    mod = types.ModuleType("dassl.data.datasets.base_dataset")
    mod.Datum = _Datum
    _Datum.__module__, _Datum.__qualname__ = mod.__name__, "Datum"
    for m in ("dassl", "dassl.data", "dassl.data.datasets"):
        sys.modules.setdefault(m, types.ModuleType(m))
    sys.modules[mod.__name__] = mod
    old = "/home/someone/DATA/dtd/images/"
    content = {"train": [_Datum(old + "blotchy/1_0006.jpg", 1, "blotchy"),
                         _Datum(old + "banded/0_0001.jpg", 0, "banded"),
                         _Datum(old + "braided/2_0011.jpg", 2, "braided")],
               "val": [_Datum(old + "banded/0_0016.jpg", 0, "banded"), _Datum(old + "blotchy/1_0018.jpg", 1, "blotchy"),
                       _Datum(old + "braided/2_0020.jpg", 2, "braided")]}
    pkl = tmp_path / "shot_1-seed_7.pkl"
    try:
        pkl.write_bytes(pickle.dumps(content, protocol=pickle.HIGHEST_PROTOCOL))
        (tmp_path / "old.pkl").write_bytes(pickle.dumps(content, protocol=1))
    finally:
        for m in ("dassl.data.datasets.base_dataset", "dassl.data.datasets", "dassl.data", "dassl"):
            sys.modules.pop(m, None)
    got = datatools.import_dassl_pickle(str(pkl), "dtd", root=str(tmp_path))
    assert got["train"] == [("blotchy/1_0006.jpg", 1, "blotchy"), ("banded/0_0001.jpg", 0, "banded"),
                            ("braided/2_0011.jpg", 2, "braided")]
    got = datatools.import_dassl_pickle(str(tmp_path / "old.pkl"), "dtd", prefix=old)  # protocol 1, explicit prefix
    assert got["val"] == [("banded/0_0016.jpg", 0, "banded"), ("blotchy/1_0018.jpg", 1, "blotchy"),
                          ("braided/2_0020.jpg", 2, "braided")]
    b = data.load_benchmark("dtd", tmp_path, shots=1, seed=7)  # the imported subset is used as the cache
    assert b.meta["cache_hit"]
    assert [os.path.basename(p) for p, _, _ in b.train] == ["1_0006.jpg", "0_0001.jpg", "2_0011.jpg"]
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"train": [os.system]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        datatools.import_dassl_pickle(str(evil), "dtd")


# ------------------------------------------------------------------------------------------- errors


def test_error_missing_dataset_folder(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_benchmark("oxford_pets", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "oxford_pets") in msg and "images/" in msg and "DATASETS.md" in msg
    assert "split_zhou_OxfordPets.json" in msg and "python datatools.py check oxford_pets" in msg
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_benchmark("cifar10", tmp_path)


def test_error_missing_split_file(tmp_path):
    make_fake(str(tmp_path), "caltech101")
    os.remove(tmp_path / "caltech-101" / "split_zhou_Caltech101.json")
    with pytest.raises(data.SplitFileError, match="split_zhou_Caltech101.json.*\n.*DATASETS.md"):
        data.load_benchmark("caltech101", tmp_path)
    make_fake(str(tmp_path), "fgvc_aircraft")
    os.remove(tmp_path / "fgvc_aircraft" / "images_variant_val.txt")
    with pytest.raises(data.SplitFileError, match="images_variant_val.txt"):
        data.load_benchmark("fgvc_aircraft", tmp_path)


def test_error_missing_image(tmp_path):
    make_fake(str(tmp_path), "ucf101")
    gone = tmp_path / "ucf101" / "UCF-101-midframes" / "Archery" / "v_1_g07.jpg"
    os.remove(gone)
    with pytest.raises(data.MissingImageError, match="1 image.*missing.*" + str(gone)):
        data.load_benchmark("ucf101", tmp_path)


def test_error_empty_class(tmp_path):
    make_fake(str(tmp_path), "imagenet_sketch")
    folder = tmp_path / "imagenet-sketch" / "images" / "n01443537"
    shutil.rmtree(folder)
    folder.mkdir()
    with pytest.raises(data.EmptyClassError, match=str(folder)):
        data.load_benchmark("imagenet_sketch", tmp_path)
    make_fake(str(tmp_path), "dtd")
    split = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    d = json.loads(split.read_text())
    d["train"] = [x for x in d["train"] if x[1] != 1]  # class 1 has no training images
    split.write_text(json.dumps(d))
    with pytest.raises(data.EmptyClassError, match=r"label\(s\) \[1\]"):
        data.load_benchmark("dtd", tmp_path, shots=0)


def test_error_corrupt_image_and_check_command(tmp_path, capsys):
    make_fake(str(tmp_path), "oxford_flowers")
    assert datatools.main(["check", "oxford_flowers", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "classes: 3" in out and "train 15, val 6, test 9" in out and "30 fine, 0 unreadable" in out
    assert "masks: none" in out
    make_fake(str(tmp_path), "eurosat")
    split = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    d = json.loads(split.read_text())
    for s in d.values():
        for x in s:
            x[2] = "Annual Crop" if x[1] == 0 else x[2]  # not CoOp's name for AnnualCrop
    split.write_text(json.dumps(d))
    assert datatools.main(["check", "eurosat", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    first_bad = str(tmp_path / "eurosat" / "2750" / "AnnualCrop")
    assert "class names: 20 of 30 follow CoOp's naming rule; e.g. " + first_bad in out
    bad = tmp_path / "oxford_flowers" / "jpg" / "image_00001.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(data.CorruptImageError, match=str(bad)):
        loader.open_image(str(bad))
    assert datatools.main(["check", "oxford_flowers", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "BAD cannot read image " + str(bad) in out and "1 unreadable" in out
    assert datatools.main(["check", "oxford_flowers", "--root", str(tmp_path), "--sample", "5"]) in (0, 1)
    assert "opened 5 images" in capsys.readouterr().out
    assert datatools.main(["check", "dtd", "--root", str(tmp_path)]) == 1  # missing dataset: a message, not a trace
    assert "dataset folder not found" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        datatools.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "check" in out and "toy" in out and "caltech101" in out and "DATASETS.md" in out


def test_class_balanced_sampler():
    """official_optim's sampler: consecutive pairs share a class, every sample once per epoch, seeded."""
    labels = [i % 5 for i in range(23)]  # 5 classes, uneven counts
    s = loader.EpochSampler(len(labels), True, seed=3, labels=labels, per_class=2)
    s.epoch = 1
    order = [i for i, _ in s]
    assert sorted(order) == list(range(23))
    # counts 5, 5, 5, 4, 4 -> 10 full pairs first (each one class), the 3 leftover images last
    assert all(labels[a] == labels[b] for a, b in zip(order[0:20:2], order[1:20:2]))
    assert order == [i for i, _ in s]  # same seed and epoch: same order
    s.epoch = 2
    assert order != [i for i, _ in s]


# ---- read-only datasets, masks that do not fit, toy roots


def test_read_only_dataset_caches_in_the_user_cache_folder(tmp_path, monkeypatch, caplog):
    root = tmp_path / "shared"
    make_fake(str(root), "food101", per={"train": 9, "val": 5, "test": 2})
    dataset = str(root / "food-101")
    local = data.load_benchmark("food101", root, shots=4, seed=1)  # written while the folder was writable
    assert local.meta["fewshot_cache"] == data.fewshot_cache_path(dataset, 4, 1)
    monkeypatch.setenv("DAPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "can_write", lambda folder: not os.path.abspath(folder).startswith(dataset))
    assert data.load_benchmark("food101", root, shots=4, seed=1).meta["cache_hit"]  # still read from the dataset
    with caplog.at_level(logging.INFO, logger="dapt"):
        new = data.load_benchmark("food101", root, shots=2, seed=1)
    path = new.meta["fewshot_cache"]
    assert path.startswith(str(tmp_path / "cache" / "food-101-")) and path.endswith("split_fewshot/shot_2-seed_1.json")
    assert f"few-shot split cached at {path} (the dataset folder {dataset} cannot be written)" in caplog.text
    assert not os.path.exists(data.fewshot_cache_path(dataset, 2, 1))
    again = data.load_benchmark("food101", root, shots=2, seed=1)
    assert again.meta["cache_hit"] and again.meta["fewshot_cache"] == path and again.train == new.train
    monkeypatch.delenv("DAPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.user_cache_root() == str(tmp_path / "xdg" / "dapt")


def test_can_write_follows_permissions_and_missing_folders(tmp_path):
    assert data.can_write(str(tmp_path / "not" / "yet"))  # the nearest existing parent decides
    if os.geteuid() != 0:  # permissions do not bind root
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        assert not data.can_write(str(ro)) and not data.can_write(str(ro / "split_fewshot"))
        os.chmod(ro, 0o755)


def toy_with_masks(tmp_path):
    root = tmp_path / "toyroot"
    toy.make_toy(str(root), per_class={"train": 2, "val": 1, "test": 1})
    return str(root), str(root / "toy")


def test_masks_whose_size_differs_are_counted_and_listed(tmp_path, caplog, capsys):
    root, d = toy_with_masks(tmp_path)
    b = data.load_benchmark("toy", root, shots=0)
    masks = [loader.mask_path(d, p) for p, _, _ in b.train[:3]]
    for m in masks:
        Image.open(m).resize((16, 16)).save(m)
    tf = loader.build_transform(True, size=32)
    with caplog.at_level(logging.WARNING, logger="dapt"):
        batches = loader.build_loader(b.train, tf, 8, train=True, masks=True, dataset_dir=d)
    assert f"3 of {len(b.train)} masks differ in size from their image (e.g. {masks[0]}: 16x16, image 32x32)" \
        in caplog.text
    assert next(iter(batches))["fg_mask"].shape[-2:] == (32, 32)  # resized to the image, as before
    assert datatools.main(["check", "toy", "--root", root]) == 0  # a size that differs is reported, not an error
    out = capsys.readouterr().out
    assert f"MASK SIZE {masks[0]}: 16x16, image 32x32" in out and "3 mask(s) differ in size from their image" in out


def test_check_exits_non_zero_on_missing_training_masks_and_names_them(tmp_path, capsys):
    root, d = toy_with_masks(tmp_path)
    b = data.load_benchmark("toy", root, shots=0)
    gone = loader.mask_path(d, b.train[5][0])
    os.remove(gone)
    os.remove(loader.mask_path(d, b.test[0][0]))  # test images need no mask
    assert datatools.main(["check", "toy", "--root", root]) == 1
    out = capsys.readouterr().out
    assert f"MISSING MASK {gone}" in out and "1 training image(s) have no mask" in out
    assert "1 val / test image(s) have no mask (fine" in out


def test_toy_root_that_does_not_exist(tmp_path, monkeypatch, capsys):
    with pytest.raises(data.DatasetNotFoundError, match=r"data root .*typo does not exist: to write the toy "
                                                        r"benchmark there, run python datatools.py toy --root .*typo"):
        data.load_benchmark("toy", tmp_path / "typo")
    assert not os.path.exists(tmp_path / "typo")
    monkeypatch.chdir(tmp_path)  # the default root DATA is created on first use
    real = toy.make_toy
    monkeypatch.setattr(toy, "make_toy", lambda root: real(root, per_class={"train": 1, "val": 1, "test": 1}))
    assert len(data.load_benchmark("toy", "DATA", shots=0).classnames) == 24 and os.path.isdir(tmp_path / "DATA")
