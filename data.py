"""What a benchmark is: the CoOp datasets and their protocol, plain class-folder datasets, few-shot and base / new
subsets. `load_benchmark(name, root, shots, seed, subsample)` -> a `Benchmark` of (image path, label, class name)
items, its class names and template.

What is here (protocol.md sections 2-4, 8 and 12; toy.md):
- the 11 CoOp benchmarks + 4 ImageNet variants read from the CoOp folder layout and split files (`DATASETS`), the
  generated `toy` benchmark in the same layout (toy.py writes it; `load_benchmark` makes it on first use), and
  plain class-folder datasets (`--dataset folder --root DIR`) with a drawn, kept split file;
- per-class sampling, all of it: Dassl's few-shot sampler reproduced exactly (Python `random`, one private
  `random.Random(seed)`), cached as portable JSON with relative paths (`<dataset>/split_fewshot/shot_{K}-seed_{S}.json`,
  or a user cache folder for read-only datasets), a class-balanced fraction of the training split
  (`--data-fraction`), and k images per class (DA-VPT's first clustering);
- CoOp's base-to-novel class subsampling.

Decisions worth knowing: shots <= 0 (0 or -1) means the full split; ImageNet's val list is empty (CoOp reuses
its test set as val; we never select on test); Benchmark.classnames have '_' replaced by spaces.
Deliberately left out: images and batches (loader.py), the data tools' command line (datatools.py), downloading
datasets or split files (the user fetches them once, see CoOp's DATASETS.md; split files are never regenerated),
Dassl / torchvision / yacs.
"""
import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field

import torch

from files import sha256_file, write_json
from toy import ensure_toy

log = logging.getLogger("dapt")

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"

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
                layout="images/<class>/*.png, mask/images/<class>/*.png, split_toy.json (python datatools.py toy)"),
]}

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
            + ("Create it with: python datatools.py toy --root " + root if info.name == "toy" else
               f"Download the images and the split file as described in CoOp's DATASETS.md ({COOP_DATASETS_MD}); "
               "split files are never generated by this code.")
            + f"\nCheck it with: python datatools.py check {info.name} --root {root}")

# ----------------------------------------------------------------------------------------------------------
# reading full splits: lists of (path relative to the image dir, label, classname)


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
    if not isinstance(d, dict):
        raise SplitFileError(f"split file {path} is not a JSON object with train / val / test lists; download it again")
    out = {}
    for s in ("train", "val", "test"):
        if s not in d:
            raise SplitFileError(f"split file {path} has no '{s}' list; expected "
                                 '{"train"|"val"|"test": [[rel_path, label, classname], ...]}')
        out[s] = split_items(d[s], f"{path} ({s})")
    for s in sorted(k for k in d if k.startswith("test_")):
        out[s] = split_items(d[s], f"{path} ({s})")
    seen = {}
    for s, items in out.items():  # a file in two lists (train and test): the split leaks
        for p, _, _ in items:
            if seen.setdefault(p, s) != s:
                raise SplitFileError(f"split file {path}: {p} is in both '{seen[p]}' and '{s}'; every image belongs "
                                     "to one list (download the split file again, or fix it)")
    return out


def split_items(raw, where):
    """[[rel_path, label, classname], ...] of a split or few-shot file -> [(rel_path, label, classname)], checked: a
    list of triples, paths relative and inside the image folder (no '..', not absolute), no path twice."""
    if not isinstance(raw, list):
        raise SplitFileError(f"{where}: expected a list of [rel_path, label, classname]")
    out, seen = [], set()
    for item in raw:
        try:
            p, y, c = item
            item = (str(p), int(y), str(c))
        except (TypeError, ValueError):
            raise SplitFileError(f"{where}: {item!r} is not [rel_path, label, classname]") from None
        p = item[0].replace("\\", "/")
        if not p or os.path.isabs(p) or p.startswith("/") or ".." in p.split("/"):
            raise SplitFileError(f"{where}: path {item[0]!r} is not inside the dataset's image folder (paths are "
                                 "relative to it, without '..')")
        if p in seen:
            raise SplitFileError(f"{where}: {item[0]} is listed twice")
        seen.add(p)
        out.append(item)
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
        return read_split_json(path), path, sha256_file(path)
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
            h.update(sha256_file(path).encode())
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
    return split, os.path.join(dataset_dir, "classnames.txt"), _listing_sha(split)  # digest of the listing


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
# per-class sampling: Dassl's few-shot sampler (generate_fewshot_dataset, protocol §3), a class-balanced fraction,
# k images per class


def by_class(items):
    """{label: [items of that label]}, labels in order of first appearance, items in order (item[1] is the label)."""
    groups = {}
    for item in items:
        groups.setdefault(item[1], []).append(item)
    return groups


def fewshot_sample(items, k, rng):
    """Group by label in order of first appearance; per group random.sample(group, k), or all of a smaller group.

    -> (sampled items, [(label, classname, n)] of classes with fewer than k items)."""
    out, short = [], []
    for y, g in by_class(items).items():
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


def data_fraction_split(bench, fraction, seed):
    """Keep a class-balanced random fraction of bench.train: round(fraction * n_c) images of class c (>= 1),
    drawn with a generator seeded by the run seed. Recorded in bench.meta (config.json, result.json)."""
    groups, g, kept = by_class(bench.train), torch.Generator().manual_seed(seed), []
    for label in sorted(groups):
        items = groups[label]
        k = max(1, round(fraction * len(items)))
        kept += [items[i] for i in sorted(torch.randperm(len(items), generator=g)[:k].tolist())]
    bench.meta = dict(bench.meta, data_fraction=fraction, train_full=len(bench.train), train_kept=len(kept))
    bench.train = kept
    log.info("data_fraction %g: %d of %d training images (class-balanced, seed %d)", fraction, len(kept),
             bench.meta["train_full"], seed)
    return bench


def first_per_class(items, k):
    """The first k items of each class, in order."""
    seen, out = {}, []
    for item in items:
        if seen.get(item[1], 0) < k:
            seen[item[1]] = seen.get(item[1], 0) + 1
            out.append(item)
    return out


def sample_per_class(items, k, seed):
    """k items per class as DA-VPT's mapping sampler draws them (Dataset/mapping_sampler.py): random.sample of k
    when the class has at least k, else every item k // n times plus random.sample(k % n), shuffled. Classes in
    label order, one random.Random(seed): the official picks for the same seed."""
    rng, groups, out = random.Random(seed), by_class(items), []
    for y in sorted(groups):
        s = groups[y]
        if len(s) >= k:
            out += rng.sample(s, k)
        else:
            picked = s * (k // len(s)) + rng.sample(s, k % len(s))
            rng.shuffle(picked)
            out += picked
    return out


# ----------------------------------------------------------------------------------------------------------
# caches of a dataset (few-shot splits, dapt-dist's features): beside the data, or in a user folder


def check_fewshot(raw, full, k, where):
    """A few-shot list read from a file (a cache, an import, a hand-edited file), checked as Dassl's sampler makes it:
    items of the full split (same path, label and class name), none twice, and per class k items, or every item of
    a class that has fewer. -> [(rel_path, label, classname)]; SplitFileError naming the file otherwise."""
    items = split_items(raw, where)
    known = {p: (y, c) for p, y, c in full}
    odd = [p for p, y, c in items if known.get(p) != (y, c)]
    if odd:
        raise SplitFileError(f"{where}: {len(odd)} item(s) are not images of the dataset's split with that label and "
                             f"class name, e.g. {odd[0]}; delete the file to draw the split again")
    have = {y: len(g) for y, g in by_class(items).items()}
    for y, group in by_class(full).items():
        if have.get(y, 0) != min(k, len(group)):
            raise SplitFileError(f"{where}: class {y} '{group[0][2]}' has {have.get(y, 0)} item(s), but a {k}-shot "
                                 f"list holds min({k}, {len(group)}) = {min(k, len(group))} per class; delete the "
                                 "file to draw the split again")
    return items


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


def writable_cache(folder, dataset_dir):
    """`folder` (cache_dirs' choice), checked before a cache is written there: a DataValueError that names
    $DAPT_CACHE when neither the dataset folder nor the user cache folder can be written."""
    if not can_write(folder):
        raise DataValueError(f"cannot write a cache for {os.path.abspath(dataset_dir)}: neither the dataset folder nor "
                             f"the user cache folder {folder} can be written; set $DAPT_CACHE to a writable folder "
                             "(caches of read-only datasets go there)")
    return folder


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
            val_full = [] if info.kind == "imagenet" else full["val"]
            tr = check_fewshot(d.get("train"), full["train"], shots, f"{path} (train)")
            va = check_fewshot(d.get("val"), val_full, min(shots, 4), f"{path} (val)") if val_full else []
            return tr, va, m.get("few_classes", []), path, True
        log.warning("few-shot cache %s does not match (K, seed, split sha256, sampler) = (%d, %d, %s, dassl-v1): "
                    "regenerating it", path, shots, seed, sha[:12])
    train, val, short = fewshot_split(full["train"], [] if info.kind == "imagenet" else full["val"], shots, seed)
    path = os.path.join(write_to, name)
    if cache:
        writable_cache(write_to, dataset_dir)
        write_json(path, {"train": [list(x) for x in train], "val": [list(x) for x in val],
                           "meta": {"K": shots, "seed": seed, "split_file": os.path.basename(split_file),
                                    "split_sha256": sha, "sampler": "dassl-v1", "few_classes": short}})
        if write_to != folders[0]:
            log.info("few-shot split cached at %s (the dataset folder %s cannot be written)", path, dataset_dir)
    return train, val, short, (path if cache else None), False

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


def locate(name, root):
    """(DatasetInfo, absolute root, dataset folder, image folder) of dataset `name` under `root`, checked to exist.
    The toy benchmark is generated when missing, in an existing root or in the default root DATA; a root that does
    not exist is an error (a mistyped --root would otherwise regenerate everything)."""
    if name not in DATASETS:
        raise DataValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    given_root = os.path.normpath(str(root))
    root = os.path.abspath(os.path.expanduser(str(root)))
    if os.path.exists(root) and not os.path.isdir(root):
        raise DatasetNotFoundError(f"--root {given_root} is a file, not a folder: give the folder that holds the "
                                   + ("dataset's class folders" if info.kind == "folder" else "dataset folders"))
    dataset_dir = os.path.normpath(os.path.join(root, info.folder))  # folder: root itself
    if info.kind == "toy":
        if not os.path.isdir(dataset_dir) and not os.path.isdir(root) and given_root != DEFAULT_ROOT:
            raise DatasetNotFoundError(f"data root {root} does not exist: to write the toy benchmark there, run "
                                       f"python datatools.py toy --root {given_root} (the default root {DEFAULT_ROOT} "
                                       "is created on first use)")  # a mistyped root must not regenerate it all
        ensure_toy(root)  # generated when missing, rebuilt when made by another TOY_VERSION
    if not os.path.isdir(dataset_dir):
        raise DatasetNotFoundError(f"dataset folder not found: {dataset_dir}\n" + _layout_help(info, root))
    image_dir = os.path.join(dataset_dir, info.image_dir)
    if not os.path.isdir(image_dir):
        raise DatasetNotFoundError(f"image folder not found: {image_dir}\n" + _layout_help(info, root))
    return info, root, dataset_dir, image_dir


def identity(name, root):
    """What identifies a dataset's data for a run: {"dataset_dir": its absolute folder, "split_sha256": the sha256 of
    its split file (or listing, or a folder dataset's drawn split)}; a run on other data is another run."""
    info, _, dataset_dir, _ = locate(name, root)
    return dict(dataset_dir=dataset_dir, split_sha256=read_full_split(info, dataset_dir)[2])


def load_benchmark(name, root, shots=16, seed=1, subsample="all", cache=True):
    """One benchmark's train / val / test items for (K, seed, setting), following protocol §2-4.

    shots <= 0 (0 or -1) means the full split (as Dassl's num_shots < 1). Few-shot subsets are sampled before
    base/new subsampling and cached as JSON (relative paths) under <dataset>/split_fewshot/ (cache_dirs), checked
    when read (check_fewshot). ImageNet has no val split (its val folder is the test set): val = [].
    ImageNetV2/-Sketch/-A/-R are test-only. The dataset is found by `locate` (the toy made on first use)."""
    info, root, dataset_dir, image_dir = locate(name, root)
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
            f"Check it with: python datatools.py check folder --root {root}")


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
    target = d if can_write(d) else writable_cache(folder_cache_dir(d), d)
    path = os.path.join(target, FOLDER_SPLIT_FILE)
    write_json(path, split)
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
                            "the split file is kept (python datatools.py folder-split --root %s --force draws a new "
                            "one)",
                            d, path, len(now - listed), len(listed - now), d)
        else:
            info["classnames"] = path + " (a user split file, names as written)"
    info["template"] = folder_template(d)
    _FOLDER_INFO[d] = info
    sha = hashlib.sha256(json.dumps({s: split[s] for s in ("train", "val", "test")}).encode()).hexdigest()
    return split, path, sha
