"""The data tools' command line: check a dataset without training, write the toy benchmark, draw a folder dataset's
split again, carry few-shot splits to another machine, import Dassl's few-shot pickles.

    python datatools.py check caltech101 --root DATA [--sample 500]
    python datatools.py check folder --root MY_IMAGES
    python datatools.py toy --root DATA
    python datatools.py folder-split --root MY_IMAGES --force [--seed S --fractions 0.7,0.1,0.2]
    python datatools.py export-splits caltech101 --root DATA --out splits
    python datatools.py import-splits splits --root DATA

Deliberately not here: what a benchmark is (data.py), images and masks (loader.py), the toy generator (toy.py).
"""
import argparse
import copyreg
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys

import numpy as np
import torch

from data import (COOP_DATASETS_MD, DATASETS, DataError, DataValueError, DatasetNotFoundError, FOLDER_FRACTIONS,
                  FOLDER_SPLIT_FILE, FOLDER_SPLIT_SEED, SplitFileError, _FOLDER_INFO, _layout_help, _listdir,
                  _load_fewshot, _read_lines, cache_dirs, can_write, check_fewshot, fewshot_cache_path,
                  find_folder_split, folder_cache_dir, load_benchmark, make_folder_split, read_full_split,
                  writable_cache)
from files import sha256_file, write_json
from loader import (CorruptImageError, MissingImageError, check_mask_encoding, mask_path, mask_size_mismatches,
                    open_image, resolve_mask_encoding)
from toy import (TOY_CLIP, TOY_SPLIT_SHA256, TOY_VERSION, make_toy, pretrain_toy_clip, toy_clip_record,
                 toy_version)

log = logging.getLogger("dapt")

# ----------------------------------------------------------------------------------------------------------
# checking a dataset without training

# raw name -> CoOp class name, for checking the names of a split against its folders / listings (protocol §2)
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


def folder_report(dataset_dir):
    """Lines for `python datatools.py check folder`: layout, where the split, class names and template came from."""
    info = _FOLDER_INFO.get(os.path.abspath(dataset_dir), {})
    template, source = info.get("template", ("?", "?"))
    lines = [f"  layout: {'one folder per class' if info.get('layout') == 'classes' else 'train/ val/ test/ sub-trees'}"
             f"; split: {info.get('split')}", f"  class names from: {info.get('classnames')}",
             f"  template: '{template}' ({source})"]
    if info.get("skipped"):
        lines.append(f"  skipped (no images): {', '.join(info['skipped'][:10])}")
    return lines


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


# ----------------------------------------------------------------------------------------------------------
# Dassl's few-shot pickles, read without Dassl (no code is executed)


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
    folder when the dataset is read-only, see cache_dirs), which `load_benchmark` then uses.
    -> {"train": [(rel, label, classname)], "val": [...]}"""
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
        write_json(os.path.join(cache_dirs(dataset_dir)[1], f"shot_{shots}-seed_{seed}.json"),
                    {"train": [list(x) for x in out["train"]], "val": [list(x) for x in out["val"]],
                     "meta": {"K": shots, "seed": seed, "split_file": os.path.basename(split_file),
                              "split_sha256": sha, "sampler": "dassl-pickle", "few_classes": [],
                              "imported_from": os.path.abspath(path)}})
    return out


# ----------------------------------------------------------------------------------------------------------
# portable few-shot splits: export on one machine, import on another


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
        raise DatasetNotFoundError(f"{dataset_dir} not found: python datatools.py toy --root {root}")
    if not os.path.isdir(dataset_dir):
        raise DatasetNotFoundError(f"dataset folder not found: {dataset_dir}\n" + _layout_help(info, str(root)))
    full, split_file, sha = read_full_split(info, dataset_dir)
    target = os.path.join(out, _export_name(name, dataset_dir))
    os.makedirs(target, exist_ok=True)
    files = []
    if info.kind == "folder" and os.path.isfile(split_file):  # a drawn split travels with its few-shot splits
        with open(split_file) as fh:
            drawn = json.load(fh)
        write_json(os.path.join(target, FOLDER_SPLIT_FILE), drawn)
        files.append(FOLDER_SPLIT_FILE)
    for k in shots:
        for s in seeds:
            train, val, short, cpath, _ = _load_fewshot(info, dataset_dir, full, split_file, sha, k, s, True)
            sampler = "dassl-v1"
            if cpath and os.path.isfile(cpath):
                with open(cpath) as fh:
                    sampler = json.load(fh).get("meta", {}).get("sampler", sampler)
            fname = f"shot_{k}-seed_{s}.json"
            write_json(os.path.join(target, fname), {
                "dataset": name, "K": k, "seed": s, "train": [list(x) for x in train], "val": [list(x) for x in val],
                "meta": {"split_file": os.path.basename(split_file), "split_sha256": sha, "sampler": sampler,
                         "few_classes": [list(x) for x in short], "paths": "relative to the image folder"}})
            files.append(fname)
    with open(os.path.join(target, CHECKSUMS), "w") as fh:
        fh.writelines(f"{sha256_file(os.path.join(target, f))}  {f}\n" for f in files)
    log.info("exported %d few-shot splits of %s to %s", len(files), name, target)
    return target


def _verified_files(folder):
    """{file name: parsed JSON} of an export folder, every file checked against its SHA256SUMS."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        raise SplitFileError(f"{path} not found: not a folder written by python datatools.py export-splits")
    out = {}
    for ln in _read_lines(path):
        digest, _, fname = ln.partition("  ")
        fpath = os.path.join(folder, fname)
        if os.path.basename(fname) != fname or not os.path.isfile(fpath):
            raise SplitFileError(f"{path} lists {fname!r}, which is not in {folder}")
        if sha256_file(fpath) != digest:
            raise SplitFileError(f"{fpath}: sha256 differs from {CHECKSUMS} (changed or damaged in transit); "
                                 "export it again")
        with open(fpath) as fh:
            try:
                out[fname] = json.load(fh)
            except ValueError as e:
                raise SplitFileError(f"{fpath}: not valid JSON ({e}); export it again") from None
        if not isinstance(out[fname], dict):
            raise SplitFileError(f"{fpath}: not a JSON object; expected a file written by python datatools.py "
                                 "export-splits")
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
                             "python datatools.py export-splits")
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
        full_val = [] if info.kind == "imagenet" else full["val"]
        for fname, d in sorted(splits.items()):
            where = os.path.join(folder, fname)
            missing = [k for k in ("K", "seed", "train", "val", "meta") if k not in d]
            if missing:
                raise SplitFileError(f"{where}: no {', '.join(map(repr, missing))} entry; expected a file written by "
                                     "python datatools.py export-splits")
            if fname != f"shot_{d['K']}-seed_{d['seed']}.json":
                raise SplitFileError(f"{where}: the file name does not match its K {d['K']!r} and seed {d['seed']!r}")
            train = check_fewshot(d["train"], full["train"], d["K"], f"{where} (train)")  # the local split's items,
            val = check_fewshot(d["val"], full_val, min(d["K"], 4), f"{where} (val)") if full_val else []  # k per class
            gone = [p for p, _, _ in train + val if not os.path.isfile(os.path.join(image_dir, p))]
            if gone:
                raise SplitFileError(f"{where}: {len(gone)} image(s) are missing under {image_dir}, e.g. {gone[0]}; "
                                     "the two copies of the dataset differ")
            m = d["meta"] if isinstance(d["meta"], dict) else {}
            if m.get("split_sha256") != sha:
                log.warning("%s: the exporting machine's split differs (sha256 %s... vs %s... here); every item was "
                            "found with the same label and class name, so it is imported", fname,
                            str(m.get("split_sha256"))[:12], sha[:12])
            target = writable_cache(cache_dirs(dataset_dir)[1], dataset_dir)
            path = os.path.join(target, os.path.basename(fewshot_cache_path(dataset_dir, d["K"], d["seed"])))
            write_json(path, {"train": d["train"], "val": d["val"], "meta": {
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
    write_json(path, split)
    log.info("folder split installed at %s", path)
    return path


# ----------------------------------------------------------------------------------------------------------
# command line


def toy_check(root):
    """Whether ROOT/toy and the toy CLIP are the ones the docs' numbers were made with (their sha256); -> exit code."""
    split = os.path.join(root, "toy", "split_toy.json")
    problems = 0
    if not os.path.isfile(split):
        print(f"{split}: not found (python datatools.py toy --root {root} makes it)")
        problems += 1
    else:
        got = sha256_file(split)
        same = got == TOY_SPLIT_SHA256
        problems += not same
        print(f"{split}: sha256 {got} " + ("= the published toy (version %d)" % TOY_VERSION if same else
              f"differs from the published {TOY_SPLIT_SHA256}: another TOY_VERSION or seed, or edited files"))
    record = toy_clip_record()
    got = sha256_file(TOY_CLIP) if os.path.isfile(TOY_CLIP) else "(missing)"
    same = got == record["sha256"]
    problems += not same
    print(f"{TOY_CLIP}: sha256 {got} " + ("= the shipped toy CLIP" if same else f"differs from the shipped "
                                          f"{record['sha256']}: restore it (git checkout -- assets/)"))
    return 1 if problems else 0


def toy_clip_command(out, steps=None, patch=None):
    """Pretrain the toy CLIP into `out` at one thread and say whether it is the shipped file, bit for bit."""
    torch.set_num_threads(1)  # the shipped file was made at one thread
    path = pretrain_toy_clip(out, steps=steps, patch=patch)
    if patch:
        print(f"{path}: a variant with patch {patch} (train with --clip {path})")
        return 0
    got, shipped = sha256_file(path), toy_clip_record()["sha256"]
    print(f"{path}: sha256 {got}" + (" = the shipped toy CLIP, bit for bit" if got == shipped else
          f"; the shipped one has {shipped}" + (" (fewer steps: not the shipped recipe)" if steps else
                                                 " (this machine's CPU kernels: "
                                                 f"{torch.backends.cpu.get_cpu_capability()}, the shipped file's: "
                                                 "AVX512)")))
    return 0 if got == shipped or steps else 1


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="datatools.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark data tools: validate a dataset in the CoOp layout or a plain class-folder dataset, "
                    "write the offline toy benchmark, export / import few-shot splits.",
        epilog="datasets: " + ", ".join(DATASETS) + f"\nlayouts and downloads: {COOP_DATASETS_MD}\n"
               "examples:\n  python datatools.py toy --root DATA\n"
               "  python datatools.py check caltech101 --root DATA --sample 500\n"
               "  python datatools.py check folder --root MY_IMAGES      # one sub-folder per class\n"
               "  python datatools.py export-splits caltech101 --root DATA --out splits\n"
               "  python datatools.py import-splits splits --root DATA")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", allow_abbrev=False, help="validate a dataset: split file, class names, open every "
                       "image (or --sample N of them), count masks; prints a summary, trains nothing")
    c.add_argument("dataset", choices=list(DATASETS), metavar="DATASET",
                   help="one of: " + ", ".join(DATASETS))
    c.add_argument("--root", required=True, help="folder holding the dataset folders (e.g. DATA); for folder: "
                   "the dataset itself")
    c.add_argument("--sample", type=int, default=None, help="open only N randomly chosen images")
    t = sub.add_parser("toy", allow_abbrev=False, help="write the toy benchmark to ROOT/toy (seconds); --check: "
                       "compare a local toy and the shipped toy CLIP with the published sha256")
    t.add_argument("--check", action="store_true", help="say whether ROOT/toy and the toy CLIP are the published ones")
    tc = sub.add_parser("toy-clip", allow_abbrev=False, help="pretrain the toy CLIP again (about 5 minutes on one "
                        "core) and compare it with the shipped assets/toy_clip.safetensors")
    tc.add_argument("--out", required=True, help="where to write it (.safetensors)")
    tc.add_argument("--steps", type=int, default=None, help="fewer steps (a quick look; not the shipped recipe)")
    tc.add_argument("--patch", type=int, default=None, help="another patch size (4: 64 patches of the 32 px images, "
                    "a variant; not the shipped toy CLIP)")
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
    for command in (c, t, tc, fs, e, i):
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
        if a.cmd == "toy" and a.check:
            return toy_check(a.root)
        if a.cmd == "toy-clip":
            return toy_clip_command(a.out, a.steps, a.patch)
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
