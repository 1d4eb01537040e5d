"""Paired comparisons of runs (`python eval.py compare A B`), checked against values computed by hand, and the
collapse flag against zero-shot CLIP on the same test images (result.json, the end summary, eval.py table)."""
import csv
import os

import pytest

import eval as evaluation
import recipes
import runs
import tables
import train
from conftest import train_toy


def result(root, method, seed, accuracy, dataset="toy", shots=16, reference=None, epochs=10):
    """A finished run's folder holding only result.json (what compare and table read)."""
    d = os.path.join(root, "fewshot", dataset, method, f"shots{shots}_seed{seed}")
    os.makedirs(d)
    cfg = dict(recipes.resolve_config(method, dataset, {"shots": shots}), seed=seed, epochs=epochs)
    runs.write_json(os.path.join(d, "result.json"), dict(
        method=method, dataset=dataset, setting="fewshot", shots=shots, seed=seed, tag="", subsample="all",
        accuracy=accuracy, config=cfg, selected_epoch=epochs, zero_shot_reference=reference or {}))
    return d


def test_t_quantiles_are_students():
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (8, 2.306), (30, 2.042)):
        assert tables.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)


def test_two_seeds_by_hand(tmp_path, capsys):
    r = str(tmp_path)
    for seed, (a, b) in enumerate(((80.0, 78.0), (84.0, 79.0)), 1):
        result(r, "maple", seed, dict(all=a, all_corr=a + 4))
        result(r, "dapt", seed, dict(all=b, all_corr=b + 1))
    rows = tables.compare(os.path.join(r, "fewshot/toy/maple/*"), os.path.join(r, "fewshot/toy/dapt/*"),
                          out=str(tmp_path / "c.csv"))
    row = {x[3]: dict(zip(rows[0], x)) for x in rows[1:]}
    # differences 2 and 5: mean 3.5, std 2.1213, t(0.975, 1) = 12.706 -> 3.5 +- 12.706 * 2.1213 / sqrt(2) = 19.06
    assert float(row["all"]["diff_mean"]) == pytest.approx(3.5)
    assert float(row["all"]["diff_std"]) == pytest.approx(2.12132, abs=1e-4)
    assert float(row["all"]["t95_low"]) == pytest.approx(3.5 - 19.0593, abs=2e-3)
    assert float(row["all"]["t95_high"]) == pytest.approx(3.5 + 19.0593, abs=2e-3)
    assert row["all"]["boot95_low"] == "nan" and row["all"]["agree"] == "2/2"
    assert row["all"]["verdict"] == "no measurable difference"  # the interval includes 0
    assert float(row["all_gap"]["diff_mean"]) == pytest.approx(3.0)  # gap 4 vs 1 on both seeds: sd 0, interval [3, 3]
    assert row["all_gap"]["verdict"] == "maple > dapt" and row["all_gap"]["diffs"] == "3.0000 3.0000"
    assert list(csv.reader(open(tmp_path / "c.csv")))[1:] == [[str(c) for c in x] for x in rows[1:]]
    assert "maple vs dapt: fewshot, toy, 16 shots, seeds 1, 2" in capsys.readouterr().out


def test_equal_runs_and_many_seeds(tmp_path):
    r = str(tmp_path)
    for seed in range(1, 10):
        result(r, "coop", seed, dict(all=70.0 + seed))
        result(r, "zsclip", seed, dict(all=70.0 + seed))
        result(r, "vpt", seed, dict(all=60.0 + seed + (seed % 2)))  # 10 or 9 below coop: 9 of 9 agree
    rows = tables.compare(os.path.join(r, "fewshot/toy/coop/*"), f"{r}:zsclip")
    same = dict(zip(rows[0], rows[1]))
    assert float(same["diff_mean"]) == 0 and same["verdict"] == "no measurable difference" and same["agree"] == "9/9"
    rows = tables.compare(f"{r}:coop", f"{r}:vpt")
    far = dict(zip(rows[0], rows[1]))
    diffs = [10.0 - (s % 2) for s in range(1, 10)]
    assert float(far["diff_mean"]) == pytest.approx(sum(diffs) / 9, abs=1e-4) and far["agree"] == "9/9"
    low, high = float(far["boot95_low"]), float(far["boot95_high"])  # a bootstrap from 8 seeds on
    assert 9.0 <= low < sum(diffs) / 9 < high <= 10.0 and far["verdict"] == "coop > vpt"
    assert tables.compare(f"{r}:coop", f"{r}:vpt", seeds={1, 2, 3})[1][10] == "1 2 3"  # --seeds


def test_seeds_that_do_not_pair_are_an_error_naming_them(tmp_path, capsys):
    r = str(tmp_path)
    for seed in (1, 2, 3):
        result(r, "coop", seed, dict(all=70.0))
    for seed in (1, 4):
        result(r, "kgcoop", seed, dict(all=70.0))
    with pytest.raises(runs.RunError, match="seeds do not pair: only in coop: 2, 3; only in kgcoop: 4"):
        tables.compare(f"{r}:coop", f"{r}:kgcoop")
    with pytest.raises(SystemExit):
        evaluation.main(["compare", f"{r}:coop", f"{r}:nothing"])
    assert capsys.readouterr().err.startswith(f"error: {r}:nothing: no finished run")
    assert len(tables.compare(f"{r}:coop", f"{r}:kgcoop", seeds=evaluation.seed_list("1"))) == 2


def test_a_run_far_below_zero_shot_is_flagged_everywhere(tmp_path):
    reference = dict(base=76.3, new=87.5)
    accuracy = dict(base=92.0, new=66.2, hm=77.0)  # new: 21.3 points below zero-shot (MaPLe seed 4 of the toy)
    model = type("M", (), {"named_parameters": lambda self: []})()
    checks = train.health(model, accuracy, {"base": 1200, "new": 1200}, {"base": ["a"] * 12, "new": ["a"] * 12},
                          trained=True, reference=reference)
    assert checks["flags"] == ["below_zero_shot"] and "new 66.20 vs 87.50 (-21.3 points)" in checks["warnings"][0]
    ordinary = train.health(model, dict(base=92.0, new=77.3), {"base": 1200, "new": 1200},
                            {"base": ["a"] * 12, "new": ["a"] * 12}, trained=True, reference=reference)
    assert ordinary["flags"] == []  # CoOp's ordinary new-class loss on the toy (up to 10.2 points) is not a collapse
    r = str(tmp_path)
    d = result(r, "maple", 4, accuracy, reference=reference)
    for seed in (1, 2):
        result(r, "maple", seed, dict(base=90.0, new=80.0, hm=84.7), reference=reference)
    flags = tables.collapse_flags(tables.collect(r))
    assert any("new 66.20 is 21.3 points below zero-shot CLIP's 87.50" in why for why in flags[d])


def test_the_zero_shot_reference_is_zsclips_accuracy_and_is_read_back_from_its_cache(toy_copy, tmp_path, monkeypatch):
    """A trained run's zero_shot_reference is what --method zsclip scores on the same test images; it is written
    once to the dataset's cache folder and read from there by a later process (here: the process memo cleared)."""
    monkeypatch.setattr(train, "_ZERO_SHOT", {})  # this test's memo: the tampered value below stays in it
    zs = train_toy(toy_copy, tmp_path / "zs", "zsclip", epochs=None)
    coop = train_toy(toy_copy, tmp_path / "a", "coop", epochs=1)
    assert {k: coop["zero_shot_reference"][k] for k in ("base", "base_corr")} == \
        {k: zs["accuracy"][k] for k in ("base", "base_corr")}
    cached = [f for f in os.listdir(os.path.join(toy_copy, "toy", "split_fewshot")) if f.startswith("zero_shot_")]
    assert len(cached) == 1
    path = os.path.join(toy_copy, "toy", "split_fewshot", cached[0])
    record = runs.read_json(path, "zero-shot reference")
    record["accuracy"]["base"] = 1.5  # a value no model scores here: only the file can have given it
    runs.write_json(path, record)
    monkeypatch.setattr(train, "_ZERO_SHOT", {})
    again = train_toy(toy_copy, tmp_path / "b", "coop", "--seed", "2", epochs=1)
    assert again["zero_shot_reference"]["base"] == 1.5
