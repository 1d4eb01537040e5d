"""Make tests/golden/fewshot_caltech101.json: Dassl's few-shot subsets of the real Caltech101 split.

The procedure is written out here independently of data.py, as Dassl runs it (dassl/data/datasets/
base_dataset.py `generate_fewshot_dataset` + `split_dataset_by_label`, called from CoOp's datasets/caltech101.py):
the global `random` is seeded with the run seed, train is sampled with K shots, then val with min(K, 4);
per label, in order of first appearance, `random.sample(items, K)` or every item of a smaller class.

    python tests/make_fewshot_goldens.py [path/to/split_zhou_Caltech101.json]

Default input: ../shared/data/split_zhou_Caltech101.json beside the repository. Output: for every K in
{1, 2, 4, 8, 16} and seed in {1, 2, 3}, the selected relative paths, grouped by class folder to keep the file
small: {"K=16,seed=1": {"train": {"<class folder>": [prefix, suffix, [middle, ...]]}, "val": {...}}} where
each selected file name is prefix + middle + suffix (prefix / suffix: the longest common ones of that class's
selected names, e.g. "image_", ".jpg"); folders and files in selection order. Plus the split file's sha256.
"""
import hashlib
import json
import os
import random
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
SPLIT = os.path.join(HERE, "..", "..", "shared", "data", "split_zhou_Caltech101.json")
OUT = os.path.join(HERE, "golden", "fewshot_caltech101.json")


def dassl_fewshot(data_source, num_shots):
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item[1]].append(item)
    dataset = []
    for label, items in tracker.items():
        dataset.extend(random.sample(items, num_shots) if len(items) >= num_shots else items)
    return dataset


def group(items):
    out = {}
    for path, _, _ in items:
        folder, name = path.split("/", 1)
        out.setdefault(folder, []).append(name)
    for folder, names in out.items():
        pre = os.path.commonprefix(names)
        suf = os.path.commonprefix([n[len(pre):][::-1] for n in names])[::-1]
        out[folder] = [pre, suf, [n[len(pre):len(n) - len(suf)] for n in names]]
    return out


def main(split_path=SPLIT):
    with open(split_path, "rb") as f:
        raw = f.read()
    split = json.loads(raw)
    golden = {"split_sha256": hashlib.sha256(raw).hexdigest()}
    for k in (1, 2, 4, 8, 16):
        for seed in (1, 2, 3):
            random.seed(seed)
            train = dassl_fewshot(split["train"], k)
            val = dassl_fewshot(split["val"], min(k, 4))
            golden[f"K={k},seed={seed}"] = {"train": group(train), "val": group(val)}
    with open(OUT, "w") as f:
        json.dump(golden, f, separators=(",", ":"))
    print(OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
