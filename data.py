"""Benchmark data: the CoOp datasets and protocol, image + mask transforms, loaders, and the offline toy benchmark.

What is here (protocol.md sections 2-5, 8 and 12; toy.md):
- the 11 CoOp benchmarks + 4 ImageNet variants read from the CoOp folder layout and split files (`DATASETS`,
  `load_benchmark`), and the generated `toy` benchmark in the same layout (written by toy.py, names re-exported;
  `ensure_toy` rebuilds it on a new TOY_VERSION);
- Dassl's few-shot sampler reproduced exactly (Python `random`, one private `random.Random(seed)`), cached as
  portable JSON with relative paths (`<dataset>/split_fewshot/shot_{K}-seed_{S}.json`), plus an importer for
  Dassl's pickled caches that does not need Dassl (`import_dassl_pickle`);
- CoOp's base-to-novel class subsampling;
- torchvision's RandomResizedCrop / flip / Resize / CenterCrop semantics written with Pillow + torch
  (`build_transform`), the same geometry applied to foreground masks (`Transform.pair`);
- a DataLoader whose augmentations are a pure function of (seed, epoch, sample index), so results do not depend
  on the number of worker processes (`build_loader`);
- `python data.py check DATASET --root DATA` and `python data.py toy --root DATA`.

Decisions worth knowing: shots <= 0 (0 or -1) means the full split; ImageNet's val list is empty (CoOp reuses
its test set as val; we never select on test); Benchmark.classnames have '_' replaced by spaces; the toy benchmark
is 32 x 32 px and is meant to be used with build_transform(..., size=32) (any size works); the augmentation of
sample i in epoch e uses a torch.Generator seeded from (seed, e, i) (blake2b), never a per-worker stream.

Deliberately left out: downloading datasets or split files (the user fetches them once, see CoOp's DATASETS.md;
split files are never regenerated), Dassl / torchvision / yacs, other augmentations than CoOp's, mask creation.
"""
import argparse
import copyreg
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from toy import (  # noqa: F401  (the toy benchmark lives in toy.py; these names stay public here)
    TOY_COLOURS, TOY_SHAPES, TOY_SCENES, TOY_CLASSNAMES, TOY_CAPTION_TEMPLATES, TOY_SIZE,
    TOY_VERSION, TOY_JITTER, TOY_PER_CLASS, TOY_SPURIOUS, TOY_TINT, TOY_PRETRAIN_MIX,
    toy_caption, toy_tint, toy_render, toy_pretrain_images, toy_preferred_scenes, toy_version, make_toy)

log = logging.getLogger("dapt")

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ----------------------------------------------------------------------------------------------------------
# templates (protocol §8)

IMAGENET_TEMPLATES = [t.strip() for t in """
a bad photo of a {}. | a photo of many {}. | a sculpture of a {}. | a photo of the hard to see {}. |
a low resolution photo of the {}. | a rendering of a {}. | graffiti of a {}. | a bad photo of the {}. |
a cropped photo of the {}. | a tattoo of a {}. | the embroidered {}. | a photo of a hard to see {}. |
a bright photo of a {}. | a photo of a clean {}. | a photo of a dirty {}. | a dark photo of the {}. |
a drawing of a {}. | a photo of my {}. | the plastic {}. | a photo of the cool {}. | a close-up photo of a {}. |
a black and white photo of the {}. | a painting of the {}. | a painting of a {}. |
a pixelated photo of the {}. | a sculpture of the {}. | a bright photo of the {}. | a cropped photo of a {}. |
a plastic {}. | a photo of the dirty {}. | a jpeg corrupted photo of a {}. | a blurry photo of the {}. |
a photo of the {}. | a good photo of the {}. | a rendering of the {}. | a {} in a video game. |
a photo of one {}. | a doodle of a {}. | a close-up photo of the {}. | a photo of a {}. | the origami {}. |
the {} in a video game. | a sketch of a {}. | a doodle of the {}. | a origami {}. |
a low resolution photo of a {}. | the toy {}. | a rendition of the {}. | a photo of the clean {}. |
a photo of a large {}. | a rendition of a {}. | a photo of a nice {}. | a photo of a weird {}. |
a blurry photo of a {}. | a cartoon {}. | art of a {}. | a sketch of the {}. | a embroidered {}. |
a pixelated photo of a {}. | itap of the {}. | a jpeg corrupted photo of the {}. | a good photo of a {}. |
a plushie {}. | a photo of the nice {}. | a photo of the small {}. | a photo of the weird {}. |
the cartoon {}. | art of the {}. | a drawing of the {}. | a photo of the large {}. |
a black and white photo of a {}. | the plushie {}. | a dark photo of a {}. | itap of a {}. |
graffiti of the {}. | a toy {}. | itap of my {}. | a photo of a cool {}. | a photo of a small {}. |
a tattoo of the {}.
""".replace("\n", " ").split("|")]
SELECT_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                    "a {} in a video game.", "art of the {}.", "a photo of the small {}."]

# ----------------------------------------------------------------------------------------------------------
# the datasets (protocol §2)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    folder: str          # <root>/<folder>
    image_dir: str       # relative to the folder ("" = the folder itself); split paths are relative to it
    split: str           # split file name, or what the listing is built from
    template: str
    n_classes: int
    kind: str            # json | fgvc | imagenet | listing | toy
    counts: tuple = ()   # (train, val, test) from the CoOp paper (unverified: a mismatch is only a warning)
    image_size: int = 224
    test_only: bool = False
    layout: str = ""     # what the user must have on disk (printed when it is missing)


_PHOTO = "a photo of a {}."
DATASETS = {d.name: d for d in [
    DatasetInfo("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", _PHOTO, 100,
                "json", (4128, 1649, 2465), layout="101_ObjectCategories/<class>/image_*.jpg"),
    DatasetInfo("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
                "a photo of a {}, a type of pet.", 37, "json", (2944, 736, 3669), layout="images/*.jpg, annotations/"),
    DatasetInfo("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json", _PHOTO, 196, "json",
                (6509, 1635, 8041), layout="cars_train/*.jpg, cars_test/*.jpg, devkit/"),
    DatasetInfo("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                "a photo of a {}, a type of flower.", 102, "json", (4093, 1633, 2463),
                layout="jpg/image_*.jpg, imagelabels.mat, cat_to_name.json"),
    DatasetInfo("food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food.", 101,
                "json", (50500, 20200, 30300), layout="images/<class>/*.jpg"),
    DatasetInfo("fgvc_aircraft", "fgvc_aircraft", "images", "images_variant_{train,val,test}.txt + variants.txt",
                "a photo of a {}, a type of aircraft.", 100, "fgvc", (3334, 3333, 3333),
                layout="images/<id>.jpg, variants.txt, images_variant_train.txt, images_variant_val.txt, "
                       "images_variant_test.txt (from fgvc-aircraft-2013b/data)"),
    DatasetInfo("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", _PHOTO, 397, "json", (15880, 3970, 19850),
                layout="SUN397/<letter>/<class>/.../*.jpg"),
    DatasetInfo("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture.", 47, "json",
                (2820, 1128, 1692), layout="images/<class>/*.jpg"),
    DatasetInfo("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.", 10,
                "json", (13500, 5400, 8100), layout="2750/<class>/*.jpg"),
    DatasetInfo("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
                "a photo of a person doing {}.", 101, "json", (7639, 1898, 3783),
                layout="UCF-101-midframes/<Action_Name>/<video>.jpg"),
    DatasetInfo("imagenet", "imagenet", "images", "classnames.txt + folder listing", _PHOTO, 1000, "imagenet",
                (1281167, 0, 50000), layout="images/train/<wnid>/*.JPEG, images/val/<wnid>/*.JPEG, classnames.txt"),
    DatasetInfo("imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val", "classnames.txt + listing",
                _PHOTO, 1000, "listing", (0, 0, 10000), test_only=True,
                layout="imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg, classnames.txt"),
    DatasetInfo("imagenet_sketch", "imagenet-sketch", "images", "classnames.txt + listing", _PHOTO, 1000,
                "listing", (0, 0, 50889), test_only=True, layout="images/<wnid>/*.JPEG, classnames.txt"),
    DatasetInfo("imagenet_a", "imagenet-adversarial", "imagenet-a", "classnames.txt + listing", _PHOTO, 200,
                "listing", (0, 0, 7500), test_only=True, layout="imagenet-a/<wnid>/*.jpg, classnames.txt"),
    DatasetInfo("imagenet_r", "imagenet-rendition", "imagenet-r", "classnames.txt + listing", _PHOTO, 200,
                "listing", (0, 0, 30000), test_only=True, layout="imagenet-r/<wnid>/*.jpg, classnames.txt"),
    DatasetInfo("toy", "toy", "images", "split_toy.json", _PHOTO, 24, "toy", (1440, 480, 2400), image_size=32,
                layout="images/<class>/*.png, mask/images/<class>/*.png, split_toy.json (python data.py toy)"),
]}

# raw name -> CoOp class name, for building or checking names from folders / listings (protocol §2)
_CALTECH_RENAME = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
_CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
_EUROSAT_RENAME = {"AnnualCrop": "Annual Crop Land", "Forest": "Forest",
                   "HerbaceousVegetation": "Herbaceous Vegetation Land", "Highway": "Highway or Road",
                   "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
                   "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
                   "SeaLake": "Sea or Lake"}


def coop_classname(name, raw):
    """CoOp's class name for a raw folder / list entry of dataset `name` (None: a folder CoOp ignores)."""
    if name == "caltech101":
        return None if raw in _CALTECH_IGNORED else _CALTECH_RENAME.get(raw, raw)
    if name == "eurosat":
        return _EUROSAT_RENAME[raw]
    if name == "ucf101":  # ApplyEyeMakeup (and the folder Apply_Eye_Makeup) -> Apply_Eye_Makeup
        return "_".join(re.findall("[A-Z][^A-Z]*", raw.replace("_", "")))
    if name == "sun397":  # /a/apartment_building/outdoor -> outdoor apartment_building
        return " ".join(raw.strip("/").split("/")[1:][::-1])
    if name == "oxford_pets":  # Abyssinian_12.jpg -> abyssinian
        return "_".join(os.path.splitext(os.path.basename(raw))[0].split("_")[:-1]).lower()
    return raw

# ----------------------------------------------------------------------------------------------------------
# errors: each says what is wrong, where, and what to do


class DataError(Exception):
    """Base of the data errors below (command lines print them as one line)."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    pass


class SplitFileError(DataError, FileNotFoundError):
    pass


class MissingImageError(DataError, FileNotFoundError):
    pass


class CorruptImageError(DataError, OSError):
    pass


class EmptyClassError(DataError, ValueError):
    pass


class MissingMaskError(DataError, FileNotFoundError):
    pass


class DataValueError(DataError, ValueError):
    """A data option or file content that cannot work (subsample, shots, mask encoding, ...)."""


def _layout_help(info, root):
    if info.kind == "folder":
        return _folder_help(root)
    return (f"expected layout:\n  {os.path.join(root, info.folder)}/\n    {info.layout}\n"
            + (f"    {info.split}\n" if info.kind == "json" and info.name != "toy" else "")
            + ("Create it with: python data.py toy --root " + root if info.name == "toy" else
               f"Download the images and the split file as described in CoOp's DATASETS.md ({COOP_DATASETS_MD}); "
               "split files are never generated by this code.")
            + f"\nCheck it with: python data.py check {info.name} --root {root}")

# ----------------------------------------------------------------------------------------------------------
# reading full splits: lists of (path relative to the image dir, label, classname)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _listdir(path):
    """Sorted non-hidden entries (Dassl's listdir_nohidden, sorted: protocol §3 deviation for ImageNet)."""
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


def read_split_json(path):
    """A CoOp split file -> {"train", "val", "test"} lists of (rel_path, label, classname), plus any further list
    whose key starts with "test_" (an extra test split, e.g. the toy's "test_corr")."""
    if not os.path.isfile(path):
        raise SplitFileError(
            f"split file not found: {path}\nIt comes with the dataset (CoOp's DATASETS.md, {COOP_DATASETS_MD}); "
            "put it in the dataset folder under exactly this name. Split files are the ground truth and are "
            "never regenerated (their creation used unseeded shuffles).")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise SplitFileError(f"split file {path} is not valid JSON ({e}); download it again") from None
    out = {}
    for s in ("train", "val", "test"):
        if s not in d:
            raise SplitFileError(f"split file {path} has no '{s}' list; expected "
                                 '{"train"|"val"|"test": [[rel_path, label, classname], ...]}')
        out[s] = [(str(p), int(y), str(c)) for p, y, c in d[s]]
    for s in sorted(k for k in d if k.startswith("test_")):
        if not isinstance(d[s], list):
            raise SplitFileError(f"split file {path}: '{s}' is not a list of [rel_path, label, classname]")
        out[s] = [(str(p), int(y), str(c)) for p, y, c in d[s]]
    return out


def _read_lines(path):
    if not os.path.isfile(path):
        raise SplitFileError(f"list file not found: {path}\nFGVCAircraft needs variants.txt and "
                             "images_variant_{train,val,test}.txt from fgvc-aircraft-2013b/data in the dataset "
                             f"folder (CoOp's DATASETS.md, {COOP_DATASETS_MD}).")
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def _read_classnames(dataset_dir):
    """classnames.txt: lines `<wnid> <class name>` -> ordered dict wnid -> name."""
    path = os.path.join(dataset_dir, "classnames.txt")
    if not os.path.isfile(path):
        raise SplitFileError(f"classnames.txt not found: {path}\nEvery ImageNet-family folder needs a copy "
                             f"(lines '<wnid> <class name>'; CoOp's DATASETS.md, {COOP_DATASETS_MD}).")
    out = {}
    with open(path) as f:
        for ln in f:
            parts = ln.strip().split(" ")
            if parts[0]:
                out[parts[0]] = " ".join(parts[1:])
    return out


def _list_class_folders(top, folders, labels, names):
    items = []
    for folder, y, c in zip(folders, labels, names):
        with os.scandir(os.path.join(top, folder)) as it:  # d_type, no stat per file (1.28 M on ImageNet)
            files = sorted(e.name for e in it if not e.name.startswith(".") and e.is_file())
        if not files:
            raise EmptyClassError(f"class folder {os.path.join(top, folder)} ('{c}') holds no images; "
                                  "the dataset copy is incomplete: extract it again")
        items += [(f"{folder}/{n}", y, c) for n in files]
    return items


def read_full_split(info, dataset_dir):
    """-> ({"train","val","test"} rel items, split file path, sha256 of the split source)."""
    image_dir = os.path.join(dataset_dir, info.image_dir)
    if info.kind == "folder":  # a plain class-folder dataset (read_folder_split)
        return read_folder_split(dataset_dir)
    if info.kind in ("json", "toy"):
        path = os.path.join(dataset_dir, info.split)
        return read_split_json(path), path, _sha256(path)
    if info.kind == "fgvc":
        variants = _read_lines(os.path.join(dataset_dir, "variants.txt"))
        lab = {c: i for i, c in enumerate(variants)}
        split, h = {}, hashlib.sha256()
        for s in ("train", "val", "test"):
            path = os.path.join(dataset_dir, f"images_variant_{s}.txt")
            split[s] = []
            for ln in _read_lines(path):
                im, c = ln.split(" ", 1)
                if c not in lab:
                    raise SplitFileError(f"{path}: variant '{c}' is not in variants.txt")
                split[s].append((f"{im}.jpg", lab[c], c))
            h.update(_sha256(path).encode())
        return split, os.path.join(dataset_dir, "variants.txt"), h.hexdigest()
    # ImageNet family: folder listings + classnames.txt
    cnames = _read_classnames(dataset_dir)
    split = {"train": [], "val": [], "test": []}
    if info.name == "imagenetv2":  # folders 0..999 in classnames.txt order
        wnids = list(cnames)
        folders = [str(i) for i in range(len(wnids))]
        split["test"] = _list_class_folders(image_dir, folders, range(len(wnids)), [cnames[w] for w in wnids])
    else:
        for s, sub in ([("train", "train"), ("test", "val")] if info.kind == "imagenet" else [("test", "")]):
            top = os.path.join(image_dir, sub)
            if not os.path.isdir(top):
                raise DatasetNotFoundError(f"{top} not found\n" + _layout_help(info, os.path.dirname(dataset_dir)))
            folders = [n for n in _listdir(top) if os.path.isdir(os.path.join(top, n))]  # skips README.txt
            missing = [w for w in folders if w not in cnames]
            if missing:
                raise SplitFileError(f"{os.path.join(dataset_dir, 'classnames.txt')} has no line for folder(s) "
                                     f"{missing[:5]}; use the classnames.txt from CoOp's DATASETS.md")
            items = _list_class_folders(top, folders, range(len(folders)), [cnames[w] for w in folders])
            split[s] = [(f"{sub}/{p}" if sub else p, y, c) for p, y, c in items]
    h = hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()  # digest of the listing
    return split, os.path.join(dataset_dir, "classnames.txt"), h


def _classnames_of(items, where):
    """Labels must be 0..n-1, each with one name (Dassl's get_lab2cname, plus checks)."""
    names = {}
    for _, y, c in items:
        if names.setdefault(y, c) != c:
            raise SplitFileError(f"{where}: label {y} has two class names, '{names[y]}' and '{c}'")
    labels = sorted(names)
    if labels != list(range(len(labels))):
        gap = sorted(set(range(labels[-1] + 1)) - set(labels)) if labels else [0]
        raise EmptyClassError(f"{where}: no images for label(s) {gap[:10]} (labels must be 0..n-1 and every "
                              "class needs training images); the split file is damaged: download it again")
    return [names[y] for y in labels]

# ----------------------------------------------------------------------------------------------------------
# few-shot sampling (Dassl's generate_fewshot_dataset) and the JSON cache (protocol §3)


def fewshot_sample(items, k, rng):
    """Group by label in order of first appearance; per group random.sample(group, k), or all of a smaller group.

    -> (sampled items, [(label, classname, n)] of classes with fewer than k items)."""
    groups = {}
    for it in items:
        groups.setdefault(it[1], []).append(it)
    out, short = [], []
    for y, g in groups.items():
        if len(g) >= k:
            out.extend(rng.sample(g, k))
        else:
            out.extend(g)
            short.append((y, g[0][2], len(g)))
    return out, short


def fewshot_split(train, val, shots, seed):
    """Dassl's order: train with K, then val with min(K, 4), one random stream seeded with `seed`."""
    rng = random.Random(seed)
    train, short = fewshot_sample(train, shots, rng)
    val, _ = fewshot_sample(val, min(shots, 4), rng) if val else ([], [])
    return train, val, short


def fewshot_cache_path(dataset_dir, shots, seed):
    """The few-shot cache in the dataset folder (see cache_dirs for read-only datasets)."""
    return os.path.join(dataset_dir, "split_fewshot", f"shot_{shots}-seed_{seed}.json")


def user_cache_root():
    """Caches of read-only datasets: $DAPT_CACHE, else $XDG_CACHE_HOME/dapt, else ~/.cache/dapt."""
    return os.environ.get("DAPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dapt")


def can_write(folder):
    """Whether new files can be made in `folder` (or, when it does not exist yet, in its nearest existing parent):
    permissions and read-only mounts, as os.access sees them."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return os.access(folder, os.W_OK | os.X_OK)


def cache_dirs(dataset_dir):
    """(folders a cache file is looked for in, in order; the folder a new one is written to). A dataset's caches
    (few-shot splits, dapt-dist prototypes) live in <dataset_dir>/split_fewshot when that can be written, else in
    the user cache folder <user_cache_root()>/<dataset folder>-<12 hex of the sha256 of its absolute path>/
    split_fewshot, so read-only shared datasets work; caches already in the dataset folder are read either way."""
    dataset_dir = os.path.abspath(dataset_dir)
    local = os.path.join(dataset_dir, "split_fewshot")
    key = hashlib.sha256(dataset_dir.encode()).hexdigest()[:12]
    user = os.path.join(user_cache_root(), f"{os.path.basename(dataset_dir)}-{key}", "split_fewshot")
    return [local, user], (local if can_write(local) else user)


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # atomic: parallel seeds never read a half-written cache


def _load_fewshot(info, dataset_dir, full, split_file, sha, shots, seed, cache):
    """-> (train, val, short classes, cache path or None, cache hit). The cache is looked for in cache_dirs."""
    name = os.path.basename(fewshot_cache_path(dataset_dir, shots, seed))
    folders, write_to = cache_dirs(dataset_dir)
    for path in [os.path.join(d, name) for d in folders] if cache else []:
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            d = json.load(f)
        m = d.get("meta", {})
        if (m.get("K"), m.get("seed"), m.get("split_sha256")) == (shots, seed, sha) and \
                m.get("sampler") in ("dassl-v1", "dassl-pickle"):
            log.info("few-shot split from cache %s (%s)", path, m["sampler"])
            tr = [tuple(x) for x in d["train"]]
            return tr, [tuple(x) for x in d["val"]], m.get("few_classes", []), path, True
        log.warning("few-shot cache %s does not match (K, seed, split sha256, sampler) = (%d, %d, %s, dassl-v1): "
                    "regenerating it", path, shots, seed, sha[:12])
    train, val, short = fewshot_split(full["train"], [] if info.kind == "imagenet" else full["val"], shots, seed)
    path = os.path.join(write_to, name)
    if cache:
        _write_json(path, {"train": [list(x) for x in train], "val": [list(x) for x in val],
                           "meta": {"K": shots, "seed": seed, "split_file": os.path.basename(split_file),
                                    "split_sha256": sha, "sampler": "dassl-v1", "few_classes": short}})
        if write_to != folders[0]:
            log.info("few-shot split cached at %s (the dataset folder %s cannot be written)", path, dataset_dir)
    return train, val, short, (path if cache else None), False


class _DatumStub:
    """Stands in for dassl.data.datasets.base_dataset.Datum when reading Dassl's pickles (attributes only)."""


class _DasslUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name == "Datum" and module.startswith("dassl."):
            return _DatumStub
        if (module, name) in (("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")):
            return copyreg._reconstructor  # old pickle protocols rebuild plain objects with it
        if (module, name) in (("builtins", "object"), ("__builtin__", "object")):
            return object
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a Dassl few-shot pickle "
                                     "(only Datum objects are expected)")


def import_dassl_pickle(path, name, root=None, prefix=None):
    """Read Dassl's `split_fewshot/shot_{K}-seed_{S}.pkl` without Dassl (no code is executed).

    Absolute paths are made relative to the dataset's image dir: `prefix` is stripped if given, else
    everything up to the last `/<image dir name>/` component. With `root`, the split is written as our JSON
    cache `<root>/<folder>/split_fewshot/shot_{K}-seed_{S}.json` (K, S parsed from the file name; the user cache
    folder when the dataset is read-only, see cache_dirs), which `load_benchmark` then uses. -> {"train": [(rel, label, classname)], "val": [...]}"""
    info = DATASETS[name]
    with open(path, "rb") as f:
        d = _DasslUnpickler(f).load()
    anchor = "/" + os.path.basename(info.image_dir or info.folder) + "/"

    def rel(p):
        p = p.replace("\\", "/")
        if prefix is not None:
            if not p.startswith(prefix):
                raise DataValueError(f"{path}: image path {p} does not start with prefix {prefix}")
            return p[len(prefix):].lstrip("/")
        if anchor not in p:
            raise DataValueError(f"{path}: image path {p} contains no '{anchor}'; pass prefix=<the old image dir>")
        return p[p.rindex(anchor) + len(anchor):]

    out = {s: [(rel(x._impath), int(x._label), str(x._classname)) for x in d.get(s, [])] for s in ("train", "val")}
    if root is not None:
        m = re.match(r"shot_(-?\d+)-seed_(\d+)\.pkl$", os.path.basename(path))
        if not m:
            raise DataValueError(f"{path}: expected a file name shot_<K>-seed_<S>.pkl to know K and the seed")
        dataset_dir = os.path.join(root, info.folder)
        _, split_file, sha = read_full_split(info, dataset_dir)
        shots, seed = int(m.group(1)), int(m.group(2))
        _write_json(os.path.join(cache_dirs(dataset_dir)[1], f"shot_{shots}-seed_{seed}.json"),
                    {"train": [list(x) for x in out["train"]], "val": [list(x) for x in out["val"]],
                     "meta": {"K": shots, "seed": seed, "split_file": os.path.basename(split_file),
                              "split_sha256": sha, "sampler": "dassl-pickle", "few_classes": [],
                              "imported_from": os.path.abspath(path)}})
    return out

# ----------------------------------------------------------------------------------------------------------
# base-to-novel (CoOp's subsample_classes) and load_benchmark


def subsample_classes(train, val, test, subsample="all"):
    """Labels of the train list sorted; base = first ceil(n/2), new = the rest; filter and relabel from 0.

    -> (train, val, test, {old label: new label} or None)."""
    if subsample not in ("all", "base", "new"):
        raise DataValueError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}")
    if subsample == "all":
        return train, val, test, None
    labels = sorted({y for _, y, _ in (train or test)})  # test-only sets (domain shift): their own labels
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: i for i, y in enumerate(selected)}
    f = lambda items: [(p, relabel[y], c) for p, y, c in items if y in relabel]  # noqa: E731
    return f(train), f(val), f(test), relabel


DEFAULT_ROOT = "DATA"  # the command lines' default --root; the only one created on first use (toy)


@dataclass
class Benchmark:
    train: list        # [(absolute image path, label, classname as in the split file)]
    val: list
    test: list
    classnames: list   # indexed by label; '_' -> ' ' (ready for the template)
    template: str
    meta: dict = field(default_factory=dict)
    extra_tests: dict = field(default_factory=dict)  # further test splits of the split file: {"test_corr": items}


def load_benchmark(name, root, shots=16, seed=1, subsample="all", cache=True):
    """One benchmark's train / val / test items for (K, seed, setting), following protocol §2-4.

    shots <= 0 (0 or -1) means the full split (as Dassl's num_shots < 1). Few-shot subsets are sampled before
    base/new subsampling and cached as JSON (relative paths) under <dataset>/split_fewshot/ (cache_dirs). ImageNet
    has no val split (its val folder is the test set): val = []. ImageNetV2/-Sketch/-A/-R are test-only.
    The toy benchmark is generated when missing, in an existing root or in the default root DATA; a root that does
    not exist is an error (a mistyped --root would otherwise regenerate everything)."""
    if name not in DATASETS:
        raise DataValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    given_root = os.path.normpath(str(root))
    root = os.path.abspath(os.path.expanduser(str(root)))
    dataset_dir = os.path.normpath(os.path.join(root, info.folder))  # folder: root itself
    if info.kind == "toy":
        if not os.path.isdir(dataset_dir) and not os.path.isdir(root) and given_root != DEFAULT_ROOT:
            raise DatasetNotFoundError(f"data root {root} does not exist: to write the toy benchmark there, run "
                                       f"python data.py toy --root {given_root} (the default root {DEFAULT_ROOT} "
                                       "is created on first use)")  # a mistyped root must not regenerate it all
        ensure_toy(root)  # generated when missing, rebuilt when made by another TOY_VERSION
    if not os.path.isdir(dataset_dir):
        raise DatasetNotFoundError(f"dataset folder not found: {dataset_dir}\n" + _layout_help(info, root))
    image_dir = os.path.join(dataset_dir, info.image_dir)
    if not os.path.isdir(image_dir):
        raise DatasetNotFoundError(f"image folder not found: {image_dir}\n" + _layout_help(info, root))
    full, split_file, sha = read_full_split(info, dataset_dir)
    where = os.path.basename(split_file)
    all_names = _classnames_of(full["test"] if info.test_only else full["train"], where)
    if info.kind not in ("toy", "folder") and len(all_names) != info.n_classes:
        log.warning("%s: %d classes found, %d expected (protocol §2)", name, len(all_names), info.n_classes)

    train, val, test, short, cpath, hit = full["train"], full["val"], full["test"], [], None, False
    if info.kind == "imagenet":
        val = []
        log.info("imagenet has no val split (its val folder is the test set): val = []")
    if info.test_only:
        train, val = [], []
        if shots > 0:
            log.info("%s is test-only (domain shift): shots=%d ignored", name, shots)
    elif shots > 0:
        train, val, short, cpath, hit = _load_fewshot(info, dataset_dir, full, split_file, sha, shots, seed, cache)
        for y, c, n in short:
            log.warning("%s: class %d '%s' has %d < %d training images: all of them kept (as Dassl)",
                        name, y, c, n, shots)
    elif shots == 0 or shots == -1:
        counts = (len(train), len(val), len(test))
        if info.counts and info.name != "toy" and counts != tuple(info.counts):
            log.warning("%s: train/val/test = %s images, CoOp paper says %s (unverified; check the copy)",
                        name, counts, tuple(info.counts))
    else:
        raise DataValueError(f"shots must be >= 1, or 0 / -1 for the full split; got {shots}")

    train, val, test, relabel = subsample_classes(train, val, test, subsample)
    extra = {k: v if relabel is None else [(p, relabel[y], c) for p, y, c in v if y in relabel]
             for k, v in full.items() if k.startswith("test_")}
    classnames = _classnames_of(test if info.test_only else train, where + f" ({subsample} classes)")
    test_names = _classnames_of(test, where + " test") if test else []
    if test_names and test_names != classnames:
        raise SplitFileError(f"{where}: test and train disagree on class names/labels; download the split again")
    template = folder_template(dataset_dir)[0] if info.kind == "folder" else info.template
    absolute = lambda items: [(os.path.join(image_dir, p), y, c) for p, y, c in items]  # noqa: E731
    train, val, test = absolute(train), absolute(val), absolute(test)
    extra = {k: absolute(v) for k, v in extra.items()}
    missing = [p for p, _, _ in train + val + test + sum(extra.values(), []) if not os.path.isfile(p)]
    if missing:
        raise MissingImageError(f"{len(missing)} image(s) listed in {split_file} are missing, e.g. {missing[0]}\n"
                                "The dataset copy is incomplete or in the wrong folder: " + _layout_help(info, root))
    meta = dict(name=name, root=root, dataset_dir=dataset_dir, image_dir=image_dir, shots=shots, seed=seed,
                subsample=subsample, split_file=split_file, split_sha256=sha,
                counts=dict(train=len(train), val=len(val), test=len(test), **{k: len(v) for k, v in extra.items()}),
                n_classes=len(classnames),
                few_classes=[list(s) for s in short], fewshot_cache=cpath, cache_hit=hit,
                image_size=info.image_size, template=template,
                label_map=None if relabel is None else {int(k): v for k, v in relabel.items()})
    log.info("%s %s shots=%d seed=%d: %d classes, train %d / val %d / test %d", name, subsample, shots, seed,
             len(classnames), len(train), len(val), len(test))
    return Benchmark(train, val, test, [c.replace("_", " ") for c in classnames], template, meta, extra)

# ----------------------------------------------------------------------------------------------------------
# plain class-folder datasets: `--dataset folder --root DIR`, DIR being the dataset itself (issue 15)
#
#   DIR/<class>/**/<image>                          one sub-folder per class (images found recursively), or
#   DIR/train/<class>/..., DIR/test/<class>/...     ready-made sub-trees (DIR/val/<class>/... optional)
#   DIR/mask/<same relative path>                   optional foreground masks (same name, or same stem .png)
#   DIR/classnames.txt                              optional: lines "<folder> <class name>" (a tab also separates)
#   DIR/template.txt                                optional: the hand-crafted template, e.g. "a photo of a {}, a bird."
#
# Without sub-trees, a seeded class-stratified split (per class 50 % train / 20 % val / 30 % test, CoOp's
# read_and_split_data fractions) is written once as a CoOp-format split file DIR/split_folder.json, or in the
# user cache folder when DIR cannot be written; with train/ and test/ but no val/, val is 20 % of each train
# class (CoOp's split_trainval), written the same way. Labels follow the sorted folder names; class names are
# the folder names with '_' -> ' ' unless classnames.txt says otherwise (read on every load).

FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
FOLDER_RESERVED = ("mask", "split_fewshot")  # never class folders: the masks, the few-shot caches
FOLDER_SPLIT_FILE = "split_folder.json"
FOLDER_FRACTIONS = (0.5, 0.2, 0.3)  # train / val / test per class
FOLDER_VAL_FRACTION = 0.2  # val carved from train/ when there is no val/
FOLDER_SPLIT_SEED = 1
FOLDER_TEMPLATE = "a photo of a {}."
DATASETS["folder"] = DatasetInfo(
    "folder", "", "", FOLDER_SPLIT_FILE, "", 0, "folder",  # template "" = DIR/template.txt or FOLDER_TEMPLATE
    layout="<class>/**/*.jpg|png|... (or train/<class>/, val/<class>/, test/<class>/); optional mask/<same paths>, "
           "classnames.txt, template.txt")
_FOLDER_INFO = {}  # dataset dir -> how its split, names and template were found (read_folder_split; check)


def folder_cache_dir(dataset_dir):
    """Where a read-only folder dataset's split file goes: its user cache folder (cache_dirs)."""
    return os.path.dirname(cache_dirs(dataset_dir)[0][1])


def _folder_help(root):
    return (f"expected a folder dataset at {root}:\n  {root}/<class>/<images> (one sub-folder per class), or "
            f"{root}/train/<class>/..., {root}/test/<class>/... (val/ optional)\n  optional: mask/<same relative "
            "paths>, classnames.txt ('<folder> <class name>' lines), template.txt ('a photo of a {}.')\n"
            f"Check it with: python data.py check folder --root {root}")


def images_below(top):
    """Image files below `top` (recursive, hidden entries skipped), as sorted '/'-joined paths relative to top."""
    out = []
    for here, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(here, top)
        out += [n if rel == "." else f"{rel}/{n}".replace(os.sep, "/") for n in files
                if not n.startswith(".") and n.lower().endswith(FOLDER_IMAGE_EXTENSIONS)]
    return sorted(out)


def folder_listing(dataset_dir):
    """(layout "classes" | "subtrees", {part: {class folder: [paths relative to DIR]}}, skipped folders).

    part is "all" for one folder per class, else "train" / "val" / "test" (those present). Folders that hold no
    image (a stray cache or output folder) are skipped and reported, not classes."""
    d = dataset_dir
    if not os.path.isdir(d):
        raise DatasetNotFoundError(f"dataset folder not found: {d}\n" + _folder_help(d))
    subtrees = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(d, s))]
    if subtrees and ("train" not in subtrees or "test" not in subtrees):
        raise DataValueError(f"{d} has {'/, '.join(subtrees)}/ but the sub-tree layout needs both train/ and test/ "
                             "(val/ is optional); or put the class folders directly in it\n" + _folder_help(d))
    parts = {s: os.path.join(d, s) for s in subtrees} if subtrees else {"all": d}
    listing, skipped = {}, []
    for part, top in parts.items():
        listing[part] = {}
        for name in _listdir(top):
            if not os.path.isdir(os.path.join(top, name)) or (part == "all" and name in FOLDER_RESERVED):
                continue
            files = images_below(os.path.join(top, name))
            if files:
                prefix = "" if part == "all" else part + "/"
                listing[part][name] = [f"{prefix}{name}/{f}" for f in files]
            else:
                skipped.append(os.path.relpath(os.path.join(top, name), d))
    if not any(listing.values()):
        raise EmptyClassError(f"{d} holds no class folder with images ({', '.join(FOLDER_IMAGE_EXTENSIONS)})\n"
                              + _folder_help(d))
    return ("subtrees" if subtrees else "classes"), listing, skipped


def folder_classnames(dataset_dir, folders):
    """(class name per folder, source): the folder name with '_' -> ' ', or DIR/classnames.txt's name for it."""
    names = {f: f.replace("_", " ") for f in folders}
    path = os.path.join(dataset_dir, "classnames.txt")
    if not os.path.isfile(path):
        return [names[f] for f in folders], "folder names"
    unknown = []
    with open(path, encoding="utf-8") as fh:
        for ln in fh:
            ln = ln.strip()
            if not ln or ln.startswith("#"):
                continue
            folder, _, name = ln.partition("\t") if "\t" in ln else ln.partition(" ")
            if folder not in names:
                unknown.append(folder)
            elif name.strip():
                names[folder] = name.strip()
    if unknown:
        raise DataValueError(f"{path} names folder(s) {unknown[:5]} that are not class folders of {dataset_dir}; "
                             "each line is '<folder> <class name>'")
    out = [names[f] for f in folders]
    if len(set(out)) < len(out):
        log.warning("%s: several classes share a name: %s", path, sorted({n for n in out if out.count(n) > 1}))
    return out, path


def folder_template(dataset_dir):
    """(template, source): the first non-empty line of DIR/template.txt, else FOLDER_TEMPLATE."""
    path = os.path.join(dataset_dir, "template.txt")
    if not os.path.isfile(path):
        return FOLDER_TEMPLATE, "default"
    with open(path, encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh if ln.strip()]
    if not lines or lines[0].count("{}") != 1:
        raise DataValueError(f"{path}: expected one line holding '{{}}' once where the class name goes, "
                             "e.g. 'a photo of a {}, a type of bird.'")
    return lines[0], path


def _listing_sha(listing):
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def find_folder_split(dataset_dir):
    """The split file of a folder dataset: DIR/split_folder.json, else the user cache's copy, else None."""
    for folder in (dataset_dir, folder_cache_dir(dataset_dir)):
        path = os.path.join(folder, FOLDER_SPLIT_FILE)
        if os.path.isfile(path):
            return path
    return None


def _class_counts(n, fractions):
    """(n_train, n_val) of a class of n >= 2 images: rounded fractions, at least one train image and, when the
    test fraction is not 0, one test image (taken from val first)."""
    n_train = max(1, round(n * fractions[0]))
    n_val = min(round(n * fractions[1]), n - n_train)
    if fractions[2] > 0 and n_train + n_val >= n:
        n_val, n_train = (n_val - 1, n_train) if n_val else (n_val, n_train - 1)
    return n_train, n_val


def _stratified(files, rng, n_train, n_val):
    """One class's sorted files, shuffled by rng -> sorted (train, val, rest)."""
    files = list(files)
    rng.shuffle(files)
    parts = files[:n_train], files[n_train:n_train + n_val], files[n_train + n_val:]
    return [sorted(p) for p in parts]


def make_folder_split(dataset_dir, seed=FOLDER_SPLIT_SEED, fractions=FOLDER_FRACTIONS, force=False):
    """Draw and write the split file of a folder dataset (see the section comment); -> its path.

    One random.Random(seed) shuffles each class's sorted files in label order. Written beside the data, or in
    folder_cache_dir when DIR cannot be written (logged). An existing file is kept unless force."""
    d = os.path.abspath(dataset_dir)
    layout, listing, _ = folder_listing(d)
    if layout == "subtrees" and "val" in listing:
        raise DataValueError(f"{d} has train/, val/ and test/: its split is the sub-trees themselves, no split "
                             "file is drawn")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataValueError(f"split fractions {fractions}: expected train,val,test >= 0 summing to 1, train > 0")
    existing = find_folder_split(d)
    if existing and not force:
        log.info("folder split kept: %s (force=True / --force draws a new one)", existing)
        return existing
    rng = random.Random(seed)
    folders = sorted({f for part in listing.values() for f in part})
    names, _ = folder_classnames(d, folders)
    split = {"train": [], "val": [], "test": []}
    if layout == "classes":
        for y, f in enumerate(folders):
            if len(listing["all"][f]) < 2:
                raise EmptyClassError(f"class folder {os.path.join(d, f)} holds {len(listing['all'][f])} image; a "
                                      "class needs at least 2 (one to train on, one to test)")
            files = listing["all"][f]
            for s, part in zip(split, _stratified(files, rng, *_class_counts(len(files), fractions))):
                split[s] += [[p, y, names[y]] for p in part]
        how = dict(fractions=list(fractions))
    else:  # train/ and test/: val from train
        missing = [f for f in folders if f not in listing["train"] or f not in listing["test"]]
        if missing:
            raise EmptyClassError(f"class folder(s) {missing[:5]} of {d} lack images in train/ or test/; every class "
                                  "needs both")
        for y, f in enumerate(folders):
            files = listing["train"][f]
            k = min(round(len(files) * FOLDER_VAL_FRACTION), len(files) - 1)
            tr, va, _ = _stratified(files, rng, len(files) - k, k)
            split["train"] += [[p, y, names[y]] for p in tr]
            split["val"] += [[p, y, names[y]] for p in va]
            split["test"] += [[p, y, names[y]] for p in listing["test"][f]]
        how = dict(val_fraction_of_train=FOLDER_VAL_FRACTION)
    split["meta"] = dict(generator="dapt data.make_folder_split v1", seed=seed, layout=layout, folders=folders,
                         listing_sha256=_listing_sha(listing), **how)
    target = d if can_write(d) else folder_cache_dir(d)
    path = os.path.join(target, FOLDER_SPLIT_FILE)
    _write_json(path, split)
    log.info("folder split (seed %d) written %s: %s", seed,
             "beside the data" if target == d else f"to the user cache ({d} cannot be written)", path)
    return path


def read_folder_split(dataset_dir):
    """A folder dataset's full split -> ({"train", "val", "test"} lists of (path rel. to DIR, label, classname),
    split source path, sha256 of the split's content with its class names). Draws the split file on first use.
    A split file without our meta (a CoOp-format file the user put there) is used as it is."""
    d = os.path.abspath(dataset_dir)
    layout, listing, skipped = folder_listing(d)
    folders = sorted({f for part in listing.values() for f in part})
    info = dict(layout=layout, skipped=skipped, folders=len(folders))
    if layout == "subtrees" and "val" in listing:
        missing = [f for f in folders if f not in listing["train"] or f not in listing["test"]]
        if missing:
            raise EmptyClassError(f"class folder(s) {missing[:5]} of {d} lack images in train/ or test/; every class "
                                  "needs both")
        names, info["classnames"] = folder_classnames(d, folders)
        label = {f: y for y, f in enumerate(folders)}
        split = {s: [(p, label[f], names[label[f]]) for f, files in listing[s].items() for p in files]
                 for s in ("train", "val", "test")}
        path, info["split"] = d, "the train/ val/ test/ sub-trees"
    else:
        path = find_folder_split(d) or make_folder_split(d)
        split = read_split_json(path)
        with open(path) as fh:
            meta = json.load(fh).get("meta") or {}
        info["split"] = path
        if meta.get("folders"):  # ours: names from the folders / classnames.txt as they are now
            names, info["classnames"] = folder_classnames(d, meta["folders"])
            split = {s: [(p, y, names[y]) for p, y, _ in items] for s, items in split.items()}
            if meta.get("listing_sha256") != _listing_sha(listing):
                listed = {p for items in split.values() for p, _, _ in items}
                now = {p for part in listing.values() for files in part.values() for p in files}
                log.warning("%s changed since %s was drawn: %d image(s) not in the split, %d listed image(s) gone; "
                            "the split file is kept (python data.py folder-split --root %s --force draws a new one)",
                            d, path, len(now - listed), len(listed - now), d)
        else:
            info["classnames"] = path + " (a user split file, names as written)"
    info["template"] = folder_template(d)
    _FOLDER_INFO[d] = info
    sha = hashlib.sha256(json.dumps({s: split[s] for s in ("train", "val", "test")}).encode()).hexdigest()
    return split, path, sha


def folder_report(dataset_dir):
    """Lines for `python data.py check folder`: layout, where the split, class names and template came from."""
    info = _FOLDER_INFO.get(os.path.abspath(dataset_dir), {})
    template, source = info.get("template", ("?", "?"))
    lines = [f"  layout: {'one folder per class' if info.get('layout') == 'classes' else 'train/ val/ test/ sub-trees'}"
             f"; split: {info.get('split')}", f"  class names from: {info.get('classnames')}",
             f"  template: '{template}' ({source})"]
    if info.get("skipped"):
        lines.append(f"  skipped (no images): {', '.join(info['skipped'][:10])}")
    return lines

# ----------------------------------------------------------------------------------------------------------
# portable few-shot splits: export on one machine, import on another (issue 15)

EXPORT_SHOTS = (1, 2, 4, 8, 16)
EXPORT_SEEDS = (1, 2, 3)
CHECKSUMS = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` checks an export by hand


def _export_name(name, dataset_dir):
    return f"folder-{os.path.basename(os.path.normpath(dataset_dir))}" if name == "folder" else name


def export_splits(name, root, out, shots=EXPORT_SHOTS, seeds=EXPORT_SEEDS):
    """Write the few-shot splits of a dataset (every K in `shots` x seed in `seeds`, drawn now if not cached) to
    <out>/<dataset>/shot_{K}-seed_{S}.json with paths relative to the dataset's image folder, plus a drawn folder
    split (split_folder.json) and SHA256SUMS over the files. -> the export folder."""
    if name not in DATASETS:
        raise DataValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    if info.test_only:
        raise DataValueError(f"{name} is test-only: it has no few-shot splits")
    dataset_dir = os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(str(root))), info.folder))
    if info.kind == "toy" and not os.path.isdir(dataset_dir):
        raise DatasetNotFoundError(f"{dataset_dir} not found: python data.py toy --root {root}")
    if not os.path.isdir(dataset_dir):
        raise DatasetNotFoundError(f"dataset folder not found: {dataset_dir}\n" + _layout_help(info, str(root)))
    full, split_file, sha = read_full_split(info, dataset_dir)
    target = os.path.join(out, _export_name(name, dataset_dir))
    os.makedirs(target, exist_ok=True)
    files = []
    if info.kind == "folder" and os.path.isfile(split_file):  # a drawn split travels with its few-shot splits
        with open(split_file) as fh:
            drawn = json.load(fh)
        _write_json(os.path.join(target, FOLDER_SPLIT_FILE), drawn)
        files.append(FOLDER_SPLIT_FILE)
    for k in shots:
        for s in seeds:
            train, val, short, cpath, _ = _load_fewshot(info, dataset_dir, full, split_file, sha, k, s, True)
            sampler = "dassl-v1"
            if cpath and os.path.isfile(cpath):
                with open(cpath) as fh:
                    sampler = json.load(fh).get("meta", {}).get("sampler", sampler)
            fname = f"shot_{k}-seed_{s}.json"
            _write_json(os.path.join(target, fname), {
                "dataset": name, "K": k, "seed": s, "train": [list(x) for x in train], "val": [list(x) for x in val],
                "meta": {"split_file": os.path.basename(split_file), "split_sha256": sha, "sampler": sampler,
                         "few_classes": [list(x) for x in short], "paths": "relative to the image folder"}})
            files.append(fname)
    with open(os.path.join(target, CHECKSUMS), "w") as fh:
        fh.writelines(f"{_sha256(os.path.join(target, f))}  {f}\n" for f in files)
    log.info("exported %d few-shot splits of %s to %s", len(files), name, target)
    return target


def _verified_files(folder):
    """{file name: parsed JSON} of an export folder, every file checked against its SHA256SUMS."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        raise SplitFileError(f"{path} not found: not a folder written by python data.py export-splits")
    out = {}
    for ln in _read_lines(path):
        digest, _, fname = ln.partition("  ")
        fpath = os.path.join(folder, fname)
        if os.path.basename(fname) != fname or not os.path.isfile(fpath):
            raise SplitFileError(f"{path} lists {fname!r}, which is not in {folder}")
        if _sha256(fpath) != digest:
            raise SplitFileError(f"{fpath}: sha256 differs from {CHECKSUMS} (changed or damaged in transit); "
                                 "export it again")
        with open(fpath) as fh:
            out[fname] = json.load(fh)
    unlisted = sorted(set(n for n in os.listdir(folder) if n.endswith(".json")) - set(out))
    if unlisted:
        raise SplitFileError(f"{folder}: {unlisted[:3]} are not in {CHECKSUMS}; they cannot be checked")
    return out


def import_splits(src, root, force=False):
    """Install exported few-shot splits (export_splits) as this machine's few-shot caches, which load_benchmark
    then reads. `src` is an export folder or a folder of them; `root` the data root (for `folder`: the dataset
    itself). Checks: SHA256SUMS; every item is an image of the local split with the same label and class name;
    a drawn folder split is installed first (an existing, different one only with force). The local split's
    sha256 may differ (e.g. an ImageNet listing with extra files): logged. -> written cache paths."""
    folders = [src] if os.path.isfile(os.path.join(src, CHECKSUMS)) else sorted(
        os.path.join(src, n) for n in _listdir(src) if os.path.isfile(os.path.join(src, n, CHECKSUMS))) \
        if os.path.isdir(src) else []
    if not folders:
        raise SplitFileError(f"{src}: no {CHECKSUMS} in it or in its sub-folders; expected the output of "
                             "python data.py export-splits")
    written = []
    for folder in folders:
        files = _verified_files(folder)
        splits = {f: d for f, d in files.items() if f != FOLDER_SPLIT_FILE}
        names = {d.get("dataset") for d in splits.values()}
        if len(names) != 1 or next(iter(names)) not in DATASETS:
            raise SplitFileError(f"{folder}: expected few-shot splits of one known dataset, found "
                                 f"{sorted(map(str, names))}")
        name = names.pop()
        info = DATASETS[name]
        dataset_dir = os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(str(root))), info.folder))
        if not os.path.isdir(dataset_dir):
            raise DatasetNotFoundError(f"dataset folder not found: {dataset_dir}\n" + _layout_help(info, str(root)))
        if FOLDER_SPLIT_FILE in files:
            _install_folder_split(dataset_dir, files[FOLDER_SPLIT_FILE], force)
        full, split_file, sha = read_full_split(info, dataset_dir)
        image_dir = os.path.join(dataset_dir, info.image_dir)
        known = {p: (y, c) for p, y, c in full["train"] + full["val"]}
        for fname, d in sorted(splits.items()):
            items = [tuple(x) for x in d["train"] + d["val"]]
            bad = [p for p, y, c in items if known.get(p) != (y, c) or not os.path.isfile(os.path.join(image_dir, p))]
            if bad:
                raise SplitFileError(f"{os.path.join(folder, fname)}: {len(bad)} item(s) are not images of the local "
                                     f"{name} split with the same label and class name, e.g. {bad[0]} (under "
                                     f"{image_dir}); the two copies of the dataset differ")
            m = d["meta"]
            if m.get("split_sha256") != sha:
                log.warning("%s: the exporting machine's split differs (sha256 %s... vs %s... here); every item was "
                            "found with the same label and class name, so it is imported", fname,
                            str(m.get("split_sha256"))[:12], sha[:12])
            path = os.path.join(cache_dirs(dataset_dir)[1], os.path.basename(fewshot_cache_path(dataset_dir, d["K"], d["seed"])))
            _write_json(path, {"train": d["train"], "val": d["val"], "meta": {
                "K": d["K"], "seed": d["seed"], "split_file": os.path.basename(split_file), "split_sha256": sha,
                "sampler": m.get("sampler", "dassl-v1"), "few_classes": m.get("few_classes", []),
                "imported_from": os.path.abspath(os.path.join(folder, fname))}})
            written.append(path)
        log.info("imported %d few-shot splits of %s into %s", len(splits), name, dataset_dir)
    return written


def _install_folder_split(dataset_dir, split, force):
    d = os.path.abspath(dataset_dir)
    existing = find_folder_split(d)
    if existing:
        with open(existing) as fh:
            old = json.load(fh)
        same = all(old.get(s) == split.get(s) for s in ("train", "val", "test"))
        if same:
            return existing
        if not force:
            raise SplitFileError(f"{existing} differs from the exported {FOLDER_SPLIT_FILE}; pass --force to replace "
                                 "it (runs trained on the old split are then not comparable)")
    target = d if can_write(d) else folder_cache_dir(d)
    path = os.path.join(target, FOLDER_SPLIT_FILE)
    if existing and existing != path:
        os.remove(existing)
    _write_json(path, split)
    log.info("folder split installed at %s", path)
    return path


# ----------------------------------------------------------------------------------------------------------
# transforms (protocol §5): torchvision's semantics with Pillow + torch

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def rrc_params(width, height, scale, ratio, generator=None):
    """RandomResizedCrop box (top, left, h, w): the draws and their order are torchvision's get_params."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    return rrc_fallback(width, height, ratio)


def rrc_fallback(width, height, ratio):
    """Central crop clamped to the ratio range, after 10 rejected draws."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# Small images (the toy's 32 px) are decoded once per process and kept: decoding a PNG took a quarter of a toy
# training epoch. Keyed by path, size and mtime (a replaced file is read again); callers never modify the image
# (every transform returns a new one). Real datasets' images are larger and are never kept.
SMALL_IMAGE_PX, SMALL_IMAGE_CACHE_MAX = 64, 200_000
_SMALL_IMAGES = {}


def open_image(path):
    """Pillow image converted to RGB (grayscale, palette, CMYK, alpha: alpha is dropped, as Dassl's read_image)."""
    try:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns)
        hit = _SMALL_IMAGES.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        with Image.open(path) as im:
            small = max(im.size) <= SMALL_IMAGE_PX
            im = im.convert("RGB")
        if small and len(_SMALL_IMAGES) < SMALL_IMAGE_CACHE_MAX:
            _SMALL_IMAGES[path] = (key, im)
        return im
    except FileNotFoundError:
        raise MissingImageError(f"image not found: {path}") from None
    except Exception as e:  # PIL raises several types for truncated / non-image files
        raise CorruptImageError(f"cannot read image {path} ({type(e).__name__}: {e}); replace or re-extract "
                                "the file, or remove it from the split") from None


class Transform:
    """PIL image -> normalised FloatTensor [3, size, size]; `pair` also maps a mask with the same geometry.

    train: RandomResizedCrop(size, scale, ratio, interpolation) -> horizontal flip (p = hflip);
    test: shorter side -> size (long side truncated) -> centre crop (top = round((H - size) / 2), ties to even);
    resize_only: aspect-distorting resize to size x size, no augmentation (the FVG-PT host quirk);
    then [0, 1] CHW float32 -> (x - mean) / std. Randomness comes from the generator given to the call, else
    the one given at construction, else torch's global generator."""

    def __init__(self, train, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic",
                 hflip=0.5, mean=CLIP_MEAN, std=CLIP_STD, resize_only=False, mask_interpolation="nearest",
                 generator=None):
        for k in (interpolation, mask_interpolation):
            if k not in _RESAMPLE:
                raise DataValueError(f"interpolation {k!r} not in {sorted(_RESAMPLE)}")
        self.train, self.size, self.scale, self.ratio = bool(train), int(size), tuple(scale), tuple(ratio)
        self.interpolation, self.hflip, self.resize_only = interpolation, float(hflip), bool(resize_only)
        self.mean, self.std, self.mask_interpolation = tuple(mean), tuple(std), mask_interpolation
        self.generator = generator
        self._mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]

    def constants(self):
        """Every preprocessing constant, for the run log (protocol §12.2)."""
        if self.resize_only:
            geometry = f"resize to {self.size}x{self.size} (aspect distorting), no augmentation"
        elif self.train:
            geometry = "RandomResizedCrop -> RandomHorizontalFlip"
        else:
            geometry = "resize shorter side (long side truncated) -> center crop (round half to even)"
        return dict(train=self.train, size=self.size, geometry=geometry, scale=list(self.scale),
                    ratio=list(self.ratio), interpolation=self.interpolation, hflip=self.hflip if self.train else 0.0,
                    mean=list(self.mean), std=list(self.std), resize_only=self.resize_only,
                    mask_interpolation=self.mask_interpolation, convert="RGB")

    def params(self, width, height, generator=None):
        """The geometric ops for an image of this size: [("crop", (left, top, right, bottom)), ("resize", (w, h)),
        ("flip",)] in order of application."""
        g = generator if generator is not None else self.generator
        S = self.size
        if self.resize_only:
            return [("resize", (S, S))]
        if self.train:
            i, j, h, w = rrc_params(width, height, self.scale, self.ratio, g)
            ops = [("crop", (j, i, j + w, i + h)), ("resize", (S, S))]
            if torch.rand(1, generator=g) < self.hflip:
                ops.append(("flip",))
            return ops
        short, long = min(width, height), max(width, height)
        new_long = int(S * long / short)
        nw, nh = (S, new_long) if width <= height else (new_long, S)
        top, left = int(round((nh - S) / 2.0)), int(round((nw - S) / 2.0))
        return [("resize", (nw, nh)), ("crop", (left, top, left + S, top + S))]

    @staticmethod
    def apply(img, ops, resample):
        for op in ops:
            if op[0] == "crop":
                img = img.crop(op[1])
            elif op[0] == "resize":
                img = img.resize(op[1], resample)
            else:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img

    def to_tensor(self, img):
        """uint8 HWC -> float [0, 1] CHW -> normalised (torchvision's to_tensor + normalize, float32)."""
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return x.float().div(255).sub_(self._mean).div_(self._std)

    def __call__(self, img, generator=None):
        img = img if img.mode == "RGB" else img.convert("RGB")
        ops = self.params(img.width, img.height, generator)
        return self.to_tensor(self.apply(img, ops, _RESAMPLE[self.interpolation]))

    def pair(self, img, mask, generator=None, encoding="white"):
        """(image, mask image) -> (FloatTensor [3, S, S], FloatTensor [1, S, S] in {0, 1}) with one geometry.

        The mask becomes a uint8 score image (white: mean RGB rounded half up, label: channel 0 / palette index,
        official: the red channel of the RGB conversion), is resized to the image if needed and follows the image's
        crop / resize / flip, both with `mask_interpolation`, then is binarised (white: score/255 > 0.5; label and
        official: 1 <= score <= 254)."""
        img = img if img.mode == "RGB" else img.convert("RGB")
        score = mask_score(mask, encoding)
        if score.size != img.size:
            score = score.resize(img.size, _RESAMPLE[self.mask_interpolation])
        ops = self.params(img.width, img.height, generator)
        x = self.to_tensor(self.apply(img, ops, _RESAMPLE[self.interpolation]))
        s = np.asarray(self.apply(score, ops, _RESAMPLE[self.mask_interpolation]))
        return x, torch.from_numpy(binarise(s, encoding)).float()[None]


def build_transform(train, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic", hflip=0.5,
                    mean=CLIP_MEAN, std=CLIP_STD, resize_only=False, mask_interpolation="nearest", generator=None):
    """The CoOp train (random) or test (deterministic) transform; see Transform. The toy benchmark uses size=32."""
    return Transform(train, size, scale, ratio, interpolation, hflip, mean, std, resize_only, mask_interpolation,
                     generator)


# ----------------------------------------------------------------------------------------------------------
# foreground masks (protocol §5)

MASK_ENCODINGS = ("white", "label", "official")  # official = label read off the red channel (DAPT's loader)
MIN_BATCH_FOREGROUND = 1e-3  # a training batch whose masks cover less than this fraction of its pixels is an error


def mask_path(dataset_dir, image_path):
    """<dataset_dir>/mask/<image path relative to dataset_dir>; if absent, the same stem with .png."""
    rel = os.path.relpath(image_path, dataset_dir)
    p = os.path.join(dataset_dir, "mask", rel)
    if not os.path.isfile(p):
        png = os.path.splitext(p)[0] + ".png"
        if os.path.isfile(png):
            return png
    return p


def read_mask_encoding(dataset_dir):
    """The one-word `<dataset_dir>/mask/ENCODING` file, or None when there is none."""
    path = os.path.join(dataset_dir, "mask", "ENCODING")
    if os.path.isfile(path):
        with open(path) as f:
            enc = f.read().strip().lower()
        if enc not in MASK_ENCODINGS:
            raise DataValueError(f"{path} says {enc!r}; it must be one word out of {MASK_ENCODINGS}")
        return enc
    return None


def detect_mask_encoding(paths, n=32):
    """(encoding, reason) from the values in the first n mask files: a palette image -> label (the indices are
    labels); only 0 and 255 -> white (object white on black, which the label rule would read as EMPTY); otherwise
    label when more pixels hold small values 1..127 (class indices; 255 = void borders) than 255, else white
    (anti-aliased or JPEG white masks: grey values only along the edges)."""
    values, low, full = set(), 0, 0
    for p in paths[:n]:
        m = open_mask(p)
        if m.mode == "P":
            return "label", f"{p} is a palette image (indices are labels)"
        a = np.asarray(m.convert("RGB"))[..., 0] if m.mode not in ("L", "1", "I", "I;16") else np.asarray(m)
        values.update(np.unique(a).tolist())
        low, full = low + int(((a >= 1) & (a <= 127)).sum()), full + int((a == 255).sum())
    seen = f"values {sorted(values)[:8]}{' ...' if len(values) > 8 else ''} in {min(n, len(paths))} mask files"
    if values <= {0, 255}:
        return "white", seen
    return ("label" if low > full else "white"), seen


def resolve_mask_encoding(dataset_dir, paths, requested=""):
    """(encoding, how it was chosen): the requested one, else <dataset_dir>/mask/ENCODING, else detected from
    the files (detect_mask_encoding). The run records both."""
    if requested:
        if requested not in MASK_ENCODINGS:
            raise DataValueError(f"--mask-encoding {requested!r}: expected one of {MASK_ENCODINGS} (or '' to detect)")
        return requested, "--mask-encoding"
    enc = read_mask_encoding(dataset_dir)
    if enc:
        return enc, os.path.join(dataset_dir, "mask", "ENCODING")
    existing = [p for p in paths if os.path.isfile(p)]
    if not existing:
        return "white", "no mask file found (default)"
    enc, why = detect_mask_encoding(existing)
    log.info("mask encoding '%s' detected: %s", enc, why)
    return enc, f"detected: {why}"


def mask_score(mask, encoding):
    """Mask image -> uint8 'L' image whose binarisation gives the foreground."""
    if encoding == "white":
        rgb = np.asarray(mask.convert("RGB"), dtype=np.int32)
        return Image.fromarray(((2 * rgb.sum(-1) + 3) // 6).astype(np.uint8))  # round(mean RGB), half up
    if encoding == "label":
        a = np.asarray(mask)
        a = a[..., 0] if a.ndim == 3 else a
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if encoding == "official":  # DAPT's loader: convert("RGB"), red channel (a palette image gives its colours)
        return Image.fromarray(np.asarray(mask.convert("RGB"))[..., 0].copy())
    raise DataValueError(f"mask encoding must be one of {MASK_ENCODINGS}, got {encoding!r}")


def binarise(score, encoding):
    """uint8 score array -> float32 {0, 1}: white fg = v/255 > 0.5 (v >= 128); label / official fg = 1 <= v <= 254."""
    s = np.asarray(score)
    fg = (s >= 128) if encoding == "white" else ((s >= 1) & (s <= 254))
    return fg.astype(np.float32)


def masked_view(image, mask, fill="mean", mean=CLIP_MEAN, std=CLIP_STD):
    """Keep the pixels where mask = 1 (image [B, 3, H, W] normalised, mask [B, 1, H, W]); the others become
    the CLIP mean colour (fill="mean": 0 in normalised space, DAPT) or black (fill="black": 0 before
    normalisation, the FVG-PT figure). Background view: masked_view(image, 1 - mask, ...)."""
    if fill == "mean":
        return image * mask
    if fill == "black":
        m = torch.tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]
        s = torch.tensor(std, dtype=image.dtype, device=image.device)[:, None, None]
        return ((image * s + m) * mask - m) / s
    raise DataValueError(f"fill must be 'mean' or 'black', got {fill!r}")


def open_mask(path):
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError:
        raise MissingMaskError(f"mask not found: {path}") from None
    except Exception as e:
        raise CorruptImageError(f"cannot read mask {path} ({type(e).__name__}: {e})") from None


def mask_size_mismatches(pairs):
    """[(mask path, mask (w, h), image (w, h))] of the (image path, mask path) pairs whose sizes differ (headers
    only). Such masks are resized to their image with nearest neighbour when loaded (Transform.pair)."""
    out = []
    for image, mask in pairs:
        try:
            with Image.open(mask) as m, Image.open(image) as im:
                if m.size != im.size:
                    out.append((mask, m.size, im.size))
        except Exception as e:  # PIL raises several types for truncated / non-image files
            raise CorruptImageError(f"cannot read the size of {image} or its mask {mask} ({type(e).__name__}: "
                                    f"{e})") from None
    return out


def check_mask_encoding(paths, encoding, n=32):
    """Warn if most of the first n masks have a foreground fraction outside [0.02, 0.98] (wrong encoding?)."""
    fracs = [float(binarise(mask_score(open_mask(p), encoding), encoding).mean()) for p in paths[:n]]
    bad = sum(not 0.02 <= f <= 0.98 for f in fracs)
    if fracs and bad > len(fracs) / 2:
        other = "label" if encoding == "white" else "white"
        log.warning("%d of the first %d masks have a foreground fraction outside [0.02, 0.98] under the '%s' "
                    "encoding: the masks may be '%s' encoded (write the word into mask/ENCODING)",
                    bad, len(fracs), encoding, other)
    return fracs

# ----------------------------------------------------------------------------------------------------------
# loading: per-sample generators from (seed, epoch, index), so augmentations do not depend on the worker count


def sample_seed(seed, epoch, index):
    """A 63-bit seed for one (run seed, epoch, sample index); index -1 seeds the epoch's permutation, -2 the worker
    processes' base seed (Loader)."""
    h = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class ImageDataset(torch.utils.data.Dataset):
    """items -> dicts {"image", "label", "index"[, "fg_mask"[, "fg_frac"]]}; keys are (index, epoch) pairs."""

    def __init__(self, items, transform, seed=1, masks=None, encoding="white", patch_size=None):
        self.items, self.transform, self.seed = items, transform, seed
        self.masks, self.encoding, self.patch_size = masks, encoding, patch_size  # masks: paths (None = all ones)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label, _ = self.items[index]
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        img = open_image(path)
        out = {"label": torch.tensor(label, dtype=torch.long), "index": torch.tensor(index, dtype=torch.long)}
        if self.masks is None:
            out["image"] = self.transform(img, generator=g)
            return out
        mp = self.masks[index]
        mask = open_mask(mp) if mp is not None else Image.new("L", img.size, 255)
        out["image"], m = self.transform.pair(img, mask, generator=g,
                                              encoding=self.encoding if mp is not None else "white")
        out["fg_mask"] = m
        if self.patch_size:
            p = self.patch_size
            out["fg_frac"] = F.avg_pool2d(m[None], p).flatten()  # [(S/p)^2], row-major like ViT patches
        return out


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch): a fresh seeded permutation per epoch when shuffling, in order otherwise.

    per_class k > 0 (class-balanced, DA-VPT's released recipe): each class's shuffled indices are cut into chunks
    of k, the chunks are shuffled, and the epoch is their concatenation, so a batch of B holds about B / k classes
    with k images each; every sample is still used once per epoch.
    shard (rank, world) under torchrun: every process draws the same epoch order; in training each global batch
    of `batch` samples is cut into `world` contiguous parts and process `rank` takes its part (so the processes'
    batches together are the single process's batch; a last batch with fewer samples than processes is dropped,
    so that every process takes the same number of steps); in evaluation process `rank` takes every world-th
    sample."""

    def __init__(self, n, shuffle, seed, labels=None, per_class=0, shard=(0, 1), batch=1):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.labels, self.per_class, self.shard, self.batch = labels, per_class, shard, batch

    def __len__(self):
        return len(self.indices())

    def __iter__(self):
        return iter(self.indices())

    def indices(self):
        """This process's (index, epoch) pairs of the epoch, in order."""
        order, (rank, world) = self.order(), self.shard
        if world == 1:
            return order
        if not self.shuffle:
            return order[rank::world]
        mine = []
        for j in range(0, len(order), self.batch):
            chunk = order[j:j + self.batch]
            if len(chunk) < world:
                break
            q, r = divmod(len(chunk), world)
            start = rank * q + min(rank, r)
            mine += chunk[start:start + q + (rank < r)]
        return mine

    def order(self):
        """The whole epoch's (index, epoch) pairs: what a single process iterates."""
        e = self.epoch
        if not self.shuffle:
            return [(i, e) for i in range(self.n)]
        g = torch.Generator().manual_seed(sample_seed(self.seed, e, -1))
        if not self.per_class:
            return [(int(i), e) for i in torch.randperm(self.n, generator=g)]
        by_class = {}
        for i, y in enumerate(self.labels):
            by_class.setdefault(y, []).append(i)
        chunks, rest = [], []
        for y in sorted(by_class):
            idx = [by_class[y][int(j)] for j in torch.randperm(len(by_class[y]), generator=g)]
            k = len(idx) - len(idx) % self.per_class
            chunks += [idx[j:j + self.per_class] for j in range(0, k, self.per_class)]
            rest += idx[k:]  # a class's leftover images go last, so the full chunks stay aligned with batches
        order = [i for c in torch.randperm(len(chunks), generator=g) for i in chunks[int(c)]]
        return [(i, e) for i in order + [rest[int(j)] for j in torch.randperm(len(rest), generator=g)]]


class Loader(torch.utils.data.DataLoader):
    """A DataLoader with set_epoch(e); without it, each iter() advances the epoch by one. The generator that seeds
    the worker processes is reset from (seed, epoch) too, so an epoch is the same whether the run resumed or not."""

    def set_epoch(self, epoch):
        self._epoch = int(epoch)

    check_foreground = False

    def __iter__(self):
        self.sampler.epoch = self._epoch  # read when iteration starts; fixed until the next iter()
        if self.generator is not None:
            self.generator.manual_seed(sample_seed(self.sampler.seed, self._epoch, -2))
        self._epoch += 1
        batches = super().__iter__()
        return self.foreground_checked(batches) if self.check_foreground else batches

    def foreground_checked(self, batches):
        """Training batches with masks: a batch whose foreground is (nearly) empty is an error naming its files
        (a wrong mask encoding reads every mask as empty; training on it would silently learn nothing)."""
        for batch in batches:
            frac = float(batch["fg_mask"].mean())
            if frac < MIN_BATCH_FOREGROUND:
                files = [self.dataset.masks[int(i)] for i in batch["index"][:3]]
                raise MissingMaskError(
                    f"the foreground masks of a training batch cover {frac:.3%} of its pixels, read as "
                    f"'{self.dataset.encoding}' masks (e.g. {', '.join(map(str, files))}): the masks are empty or "
                    f"their encoding is wrong. Check the files, or pass --mask-encoding white (object white on "
                    f"black) or label (object values 1..254)")
            yield batch


def _worker_init(worker_id):
    s = torch.initial_seed() % 2**32  # stray randomness in workers (not the augmentations) is seeded too
    random.seed(s)
    np.random.seed(s)


def build_loader(items, transform, batch_size, train, workers=0, seed=1, masks=False, dataset_dir=None,
                 mask_encoding=None, allow_missing_masks=False, patch_size=None, dassl_drop_last=False,
                 pin_memory=None, class_balanced=0, shard=(0, 1)):
    """A reproducible DataLoader over Benchmark items.

    Sample i of epoch e is transformed with a torch.Generator seeded by (seed, e, i), and epoch e's order is a
    permutation seeded by (seed, e): a run is reproducible for any `workers`. Every sample is used each epoch
    (last partial batch kept) unless dassl_drop_last (Dassl: drop_last when len(items) >= batch_size).
    masks=True pairs each image with <dataset_dir>/mask/<rel path> (mask_path); a missing mask is an error
    naming it, unless allow_missing_masks (all-ones mask, counted and logged). patch_size p adds fg_frac.
    class_balanced k > 0: training batches hold k images per class (EpochSampler). shard (rank, world): this
    process's part under torchrun (EpochSampler); a training batch_size is the global batch, each process loads
    batch_size / world of it."""
    rank, world = shard
    if train and batch_size % world:
        raise DataValueError(f"--batch {batch_size} is not a multiple of the {world} processes: the global batch is "
                             "split evenly across them (pick a batch that the process count divides)")
    encoding, mpaths = None, None
    if masks:
        if dataset_dir is None:
            raise DataValueError("masks=True needs dataset_dir (Benchmark.meta['dataset_dir'])")
        mpaths = [mask_path(dataset_dir, p) for p, _, _ in items]
        encoding, _ = resolve_mask_encoding(dataset_dir, mpaths, mask_encoding or "")
        missing = [m for m in mpaths if not os.path.isfile(m)]
        if missing and not allow_missing_masks:
            raise MissingMaskError(
                f"{len(missing)} of {len(mpaths)} foreground masks are missing, e.g. {missing[0]}\nMasks live at "
                f"<dataset>/mask/<image path relative to the dataset folder> (same name, or same stem with .png); "
                "see protocol §5 to convert released mask sets, or pass allow_missing_masks to use all-ones masks")
        if missing:
            log.warning("%d of %d masks missing: all-ones masks used for them (allow_missing_masks)",
                        len(missing), len(mpaths))
            mpaths = [m if os.path.isfile(m) else None for m in mpaths]
        check_mask_encoding([m for m in mpaths if m is not None], encoding)
        wrong = mask_size_mismatches([(p, m) for (p, _, _), m in zip(items, mpaths) if m is not None])
        if wrong:
            m0, ms, ims = wrong[0]
            log.warning("%d of %d masks differ in size from their image (e.g. %s: %dx%d, image %dx%d): each is resized "
                        "to its image with nearest neighbour; python data.py check lists them", len(wrong),
                        len(mpaths), m0, *ms, *ims)
    if patch_size and transform.size % patch_size:
        raise DataValueError(f"image size {transform.size} is not a multiple of patch size {patch_size}")
    ds = ImageDataset(items, transform, seed, mpaths, encoding, patch_size if masks else None)
    drop_last = bool(train and dassl_drop_last and len(items) >= batch_size)
    sampler = EpochSampler(len(items), bool(train), seed, [y for _, y, _ in items], class_balanced, shard, batch_size)
    loader = Loader(ds, batch_size=batch_size // world if train else batch_size, sampler=sampler,
                    num_workers=workers, drop_last=drop_last, worker_init_fn=_worker_init,
                    pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                    generator=torch.Generator().manual_seed(seed))
    loader._epoch = 0
    loader.check_foreground = bool(masks and train)
    tail = len(items) % batch_size
    dropped = tail if drop_last or (train and tail < world) else 0
    loader.samples_per_epoch = len(items) - dropped  # every process together
    if world > 1 and train and tail and tail < world and not drop_last:
        log.warning("%d processes: the last batch of %d sample(s) is dropped each epoch (fewer than the processes)",
                    world, tail)
    loader.masks_missing = sum(m is None for m in mpaths) if mpaths is not None else 0
    if drop_last and len(items) % batch_size:
        log.warning("dassl_drop_last: %d of %d samples dropped each epoch", len(items) % batch_size, len(items))
    return loader

# ----------------------------------------------------------------------------------------------------------
# the toy benchmark: generated by toy.py (re-exported here), made on first use and rebuilt on a new TOY_VERSION


def ensure_toy(root):
    """<root>/toy generated if missing, regenerated if it was made by another TOY_VERSION. -> the folder."""
    out = os.path.join(os.path.abspath(root), "toy")
    if os.path.isdir(out) and toy_version(out) == TOY_VERSION:
        return out
    if os.path.isdir(out):
        log.warning("toy benchmark in %s is version %s, this code makes version %d: regenerating it",
                    out, toy_version(out), TOY_VERSION)
        shutil.rmtree(out)
    else:
        log.info("toy benchmark not found under %s: generating it (python data.py toy --root %s)", root, root)
    return make_toy(root)

# ----------------------------------------------------------------------------------------------------------
# command line


def check(name, root, sample=None, seed=0, out=print):
    """Validate a dataset without training: split / listing, class names, every image (or a sample), masks (when
    <dataset>/mask exists: missing ones among the training images, sizes that differ from the image's).
    -> number of problems (0 = fine): unreadable images and training images without a mask."""
    b = load_benchmark(name, root, shots=0, subsample="all")
    m = b.meta
    out(f"{name}: {m['dataset_dir']}\n  split: {m['split_file']} (sha256 {m['split_sha256'][:16]}...)")
    out(f"  classes: {len(b.classnames)} ({', '.join(b.classnames[:5])}{', ...' if len(b.classnames) > 5 else ''})")
    out(f"  images: train {len(b.train)}, val {len(b.val)}, test {len(b.test)}; template '{b.template}'")
    if name == "folder":
        for line in folder_report(m["dataset_dir"]):
            out(line)
    items = b.train + b.val + b.test
    if name in ("caltech101", "eurosat", "ucf101", "sun397", "oxford_pets"):  # names CoOp derives from paths
        raw = (lambda p: "/" + os.path.dirname(p)) if name == "sun397" else \
              (lambda p: os.path.basename(p)) if name == "oxford_pets" else (lambda p: p.split("/")[0])
        wrong = [(p, c) for p, _, c in items if coop_classname(name, raw(os.path.relpath(p, m["image_dir"]))) != c]
        out(f"  class names: {len(items) - len(wrong)} of {len(items)} follow CoOp's naming rule"
            + (f"; e.g. {wrong[0][0]} is labelled '{wrong[0][1]}'" if wrong else ""))
    if sample and sample < len(items):
        items = random.Random(seed).sample(items, sample)
    bad = []
    for p, _, _ in items:
        try:
            open_image(p)
        except (CorruptImageError, MissingImageError) as e:
            bad.append(str(e))
    for e in bad[:10]:
        out("  BAD " + e)
    out(f"  opened {len(items)} images: {len(items) - len(bad)} fine, {len(bad)} unreadable")
    problems = len(bad)
    mask_dir = os.path.join(m["dataset_dir"], "mask")
    if os.path.isdir(mask_dir):
        train = {p for p, _, _ in b.train}
        pairs = [(p, mask_path(m["dataset_dir"], p)) for p, _, _ in items]
        found = [(p, mp) for p, mp in pairs if os.path.isfile(mp)]
        missing = [mp for p, mp in pairs if not os.path.isfile(mp) and p in train]
        other = sum(not os.path.isfile(mp) and p not in train for p, mp in pairs)
        enc, how = resolve_mask_encoding(m["dataset_dir"], [mp for _, mp in found])
        fr = check_mask_encoding([mp for _, mp in found], enc)
        out(f"  masks: {len(found)} of {len(items)} found, encoding '{enc}' ({how})"
            + (f", mean foreground {np.mean(fr):.3f} over the first {len(fr)}" if fr else ""))
        for mp in missing[:10]:
            out("  MISSING MASK " + mp)
        if missing:
            out(f"  {len(missing)} training image(s) have no mask{' (10 listed)' if len(missing) > 10 else ''}: "
                "methods that use masks (dapt --cue masks) stop on them")
        if other:
            out(f"  {other} val / test image(s) have no mask (fine: masks are used for training images only)")
        wrong = mask_size_mismatches(found)
        for mp, ms, ims in wrong[:10]:
            out(f"  MASK SIZE {mp}: {ms[0]}x{ms[1]}, image {ims[0]}x{ims[1]}")
        if wrong:
            out(f"  {len(wrong)} mask(s) differ in size from their image{' (10 listed)' if len(wrong) > 10 else ''}: "
                "each is resized to its image with nearest neighbour when loaded")
        problems += len(missing)
    else:
        out(f"  masks: none under {mask_dir}")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="data.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark data tools: validate a dataset in the CoOp layout or a plain class-folder dataset, "
                    "write the offline toy benchmark, export / import few-shot splits.",
        epilog="datasets: " + ", ".join(DATASETS) + f"\nlayouts and downloads: {COOP_DATASETS_MD}\n"
               "examples:\n  python data.py toy --root DATA\n"
               "  python data.py check caltech101 --root DATA --sample 500\n"
               "  python data.py check folder --root MY_IMAGES      # one sub-folder per class\n"
               "  python data.py export-splits caltech101 --root DATA --out splits\n"
               "  python data.py import-splits splits --root DATA")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", allow_abbrev=False, help="validate a dataset: split file, class names, open every "
                       "image (or --sample N of them), count masks; prints a summary, trains nothing")
    c.add_argument("dataset", choices=list(DATASETS), metavar="DATASET",
                   help="one of: " + ", ".join(DATASETS))
    c.add_argument("--root", required=True, help="folder holding the dataset folders (e.g. DATA); for folder: "
                   "the dataset itself")
    c.add_argument("--sample", type=int, default=None, help="open only N randomly chosen images")
    t = sub.add_parser("toy", allow_abbrev=False, help="write the toy benchmark to ROOT/toy (seconds)")
    t.add_argument("--root", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="replace an existing ROOT/toy")
    fs = sub.add_parser("folder-split", allow_abbrev=False, help="draw the split file of a folder dataset again "
                        "(it is drawn on first use with seed 1 and 0.5,0.2,0.3)")
    fs.add_argument("--root", required=True, help="the folder dataset (one sub-folder per class)")
    fs.add_argument("--seed", type=int, default=FOLDER_SPLIT_SEED)
    fs.add_argument("--fractions", default=",".join(map(str, FOLDER_FRACTIONS)), help="train,val,test per class")
    fs.add_argument("--force", action="store_true", help="replace an existing split file")
    e = sub.add_parser("export-splits", allow_abbrev=False, help="write the few-shot splits (relative paths, "
                       "SHA256SUMS) for another machine: OUT/<dataset>/shot_K-seed_S.json")
    e.add_argument("dataset", choices=list(DATASETS), metavar="DATASET")
    e.add_argument("--root", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--shots", default=",".join(map(str, EXPORT_SHOTS)))
    e.add_argument("--seeds", default=",".join(map(str, EXPORT_SEEDS)))
    i = sub.add_parser("import-splits", allow_abbrev=False, help="install exported few-shot splits as this "
                       "machine's few-shot caches (checksums and every image checked)")
    i.add_argument("src", help="an export folder (holding SHA256SUMS) or a folder of them")
    i.add_argument("--root", required=True, help="data root (for folder: the dataset itself)")
    i.add_argument("--force", action="store_true", help="replace a different folder split file")
    for command in (c, t, fs, e, i):
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if a.cmd == "folder-split":
            print(make_folder_split(a.root, a.seed, [float(x) for x in a.fractions.split(",")], a.force))
            return 0
        if a.cmd == "export-splits":
            print(export_splits(a.dataset, a.root, a.out, [int(x) for x in a.shots.split(",")],
                                [int(x) for x in a.seeds.split(",")]))
            return 0
        if a.cmd == "import-splits":
            written = import_splits(a.src, a.root, a.force)
            print(f"imported {len(written)} few-shot splits" + (f" (e.g. {written[0]})" if written else ""))
            return 0
        if a.cmd == "toy":
            out = os.path.join(a.root, "toy")
            if os.path.isdir(out):
                if not a.force:
                    v = toy_version(out)
                    print(f"{out} exists; use --force to replace it" + ("" if v == TOY_VERSION else
                          f" (it is version {v}, this code makes version {TOY_VERSION}: toy runs rebuild it)"))
                    return 0
                shutil.rmtree(out)
            print(make_toy(a.root, a.seed))
            return 0
        return 1 if check(a.dataset, a.root, a.sample) else 0
    except (DataError, OSError) as e:  # the data errors, and the file system's (permissions, disk full)
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
