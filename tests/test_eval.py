"""eval.py: re-evaluating a saved run (new classes, another dataset) and the seed tables against hand
computations."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import data
import eval as evaluation
import runs
import tables
from conftest import run_folder, train_toy


def test_eval_run_reproduces_new_class_accuracy(toy_root, tmp_path):
    result = train_toy(toy_root, tmp_path, "coop", "--lr", "0.05", "--batch", "8", epochs=2)
    d = run_folder(tmp_path, "coop")
    out = evaluation.main(["run", d, "--subsample", "new"])
    assert out[d]["toy"] == pytest.approx(result["accuracy"]["new"])
    with open(os.path.join(d, "eval_toy_new.json")) as f:  # the toy's correlated test split is scored too
        assert json.load(f)["splits"]["test_corr"]["accuracy"] == pytest.approx(result["accuracy"]["new_corr"])


def test_cross_dataset_evaluation(toy_root, tmp_path):
    """A toy run evaluated on another dataset (a tiny fake EuroSAT in the CoOp layout, 64 px images): its class
    names and template replace the run's, images are resized to the run's CLIP resolution."""
    train_toy(toy_root, tmp_path / "runs", "coop", "--lr", "0.05", "--batch", "8", epochs=1)
    d = run_folder(tmp_path / "runs", "coop")
    root = tmp_path / "data"
    names = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
             "Residential", "River", "SeaLake"]
    split = {"train": [], "val": [], "test": []}
    rng = np.random.default_rng(0)
    for label, name in enumerate(names):
        os.makedirs(root / "eurosat" / "2750" / name)
        for i, s in enumerate(["train", "val", "test", "test"]):  # every image in one list; 2 test images per class
            rel = f"{name}/{name}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "eurosat" / "2750" / rel)
            split[s].append([rel, label, name])
    with open(root / "eurosat" / "split_zhou_EuroSAT.json", "w") as f:
        json.dump(split, f)
    out = evaluation.main(["run", d, "--dataset", "eurosat", "--root", str(root)])
    with open(os.path.join(d, "eval_eurosat_all.json")) as f:
        record = json.load(f)
    assert record["images"] == 20 and record["trained_on"] == "toy" and record["accuracy"] == out[d]["eurosat"]
    # the accuracy is the share of the 20 test images whose top-1 EuroSAT class (eval.py predict) is the true one
    eurosat = data.load_benchmark("eurosat", str(root), shots=0, subsample="all")
    rows = evaluation.predict([p for p, _, _ in eurosat.test], run_dir=d, classes=eurosat.classnames, topk=1,
                              echo=lambda line: None)
    right = sum(top[0][0] == eurosat.classnames[y] for (_, top), (_, y, _) in zip(rows, eurosat.test))
    assert out[d]["eurosat"] == pytest.approx(100 * right / len(eurosat.test))


def fake_result(root, method, dataset, seed, base, new, **extra):
    d = run_folder(root, method, "--seed", str(seed), dataset=dataset, shots=16)
    os.makedirs(d)
    runs.write_json(os.path.join(d, "result.json"), dict(
        method=method, dataset=dataset, setting="b2n", shots=16, seed=seed, tag="",
        accuracy=dict(base=base, new=new, hm=0, **extra)))


def test_eval_table_matches_hand_computation(tmp_path):
    fake_result(tmp_path, "coop", "dtd", 1, 80.0, 50.0)
    fake_result(tmp_path, "coop", "dtd", 2, 82.0, 54.0)
    fake_result(tmp_path, "coop", "eurosat", 1, 90.0, 60.0)
    b2n, fs = tables.table(str(tmp_path))
    row = b2n["coop"]["rows"]["dtd"]
    assert (row["base"], row["new"]) == (81.0, 52.0)
    assert row["base_std"] == pytest.approx(math.sqrt(2))  # sample std of 80, 82
    assert row["hm"] == pytest.approx(2 * 81 * 52 / (81 + 52))
    avg = b2n["coop"]["average"]
    assert (avg["base"], avg["new"]) == (85.5, 56.0)
    assert avg["hm"] == pytest.approx(2 * 85.5 * 56 / (85.5 + 56))  # HM of the averages, not mean of HMs
    md = open(tmp_path / "table.md").read()
    assert "| coop | dtd | 81.00 ± 1.41 | 52.00 ± 2.83 | 63.34 | 2 |" in md
    assert "table.csv" in os.listdir(tmp_path) and fs == {}


def test_eval_table_further_test_splits(tmp_path):
    """base_corr / new_corr (the toy's test_corr split): mean ± std, and the gap per seed (corr - test)."""
    fake_result(tmp_path, "maple", "toy", 1, 80.0, 50.0, base_corr=86.0, new_corr=51.0)
    fake_result(tmp_path, "maple", "toy", 2, 82.0, 54.0, base_corr=84.0, new_corr=54.0)
    fake_result(tmp_path, "coop", "dtd", 1, 70.0, 40.0)  # no further split: no row
    tables.table(str(tmp_path))
    md = open(tmp_path / "table.md").read()
    assert "| maple | toy | b2n | 16 | base | 81.00 ± 1.41 | test_corr | 85.00 ± 1.41 | +4.00 ± 2.83 | 2 |" in md
    assert "| maple | toy | b2n | 16 | new | 52.00 ± 2.83 | test_corr | 52.50 ± 2.12 | +0.50 ± 0.71 | 2 |" in md
    assert "| coop | dtd | b2n" not in md
    rows = open(tmp_path / "table_splits.csv").read().splitlines()
    assert len(rows) == 3 and rows[1].startswith("b2n:test_corr,maple,toy,16,base,81.0000,1.4142,85.0000")
