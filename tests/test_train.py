"""train.py and eval.py end to end on the toy benchmark: every baseline trains, runs resume exactly, the schedule
is the protocol's formula, a NaN stops cleanly, tables match hand computations, bad arguments are clear errors."""
import json
import math
import os

import pytest
import torch

import dapt
import eval as evaluation
import train
from conftest import interrupt_at_epoch


def run(toy_root, out, method, *extra, subsample="base", shots=4, epochs=3):
    argv = ["--method", method, "--dataset", "toy", "--root", toy_root, "--out", str(out), "--subsample", subsample,
            "--shots", str(shots), *(["--epochs", str(epochs)] if epochs is not None else []), *extra]
    return train.main(argv)


def epoch_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def run_dir(out, method, setting="b2n", shots=4, seed=1, tag=""):
    return os.path.join(str(out), setting, "toy", method + tag, f"shots{shots}_seed{seed}")


BASELINES = {  # a learning rate high enough that a few steps on 48 images move the loss
    "coop": ["--lr", "0.05", "--batch", "8"],
    "cocoop": ["--lr", "0.05", "--batch", "2"],
    "vpt": ["--lr", "0.05", "--batch", "8"],
    "maple": ["--lr", "0.05", "--batch", "8"],
    # the knowledge term holds the prompts near "a photo of a": fixed views, one full batch per epoch
    "kgcoop": ["--batch", "48", "--rrc-scale", "1,1", "--rrc-ratio", "1,1", "--hflip", "0"],
}


@pytest.mark.parametrize("method", list(BASELINES))
def test_baseline_trains_and_writes_result(toy_root, tmp_path, method):
    epochs = {"cocoop": 3, "kgcoop": 6}.get(method, 4)
    result = run(toy_root, tmp_path, method, *BASELINES[method], epochs=epochs)
    d = run_dir(tmp_path, method)
    losses = epoch_losses(d)
    assert len(losses) == epochs
    assert losses[-1] < losses[0], f"{method}: loss did not fall: {losses}"
    with open(os.path.join(d, "result.json")) as f:
        saved = json.load(f)
    assert saved["accuracy"] == pytest.approx(result["accuracy"])
    assert set(saved["accuracy"]) == {"base", "new", "hm"}
    scale = [1.0, 1.0] if "--rrc-scale" in BASELINES[method] else [0.5, 1.0]  # the toy override unless set here
    assert saved["config"]["transform_train"]["scale"] == scale  # recorded in the run
    assert saved["samples_per_epoch"] == 12 * 4  # 12 base classes x 4 shots, nothing dropped
    for name in ("config.json", "log.txt", "checkpoint.pt", "resume.pt"):
        assert os.path.exists(os.path.join(d, name))
    ckpt = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)
    assert set(ckpt) == {"params", "config", "classnames", "extra"}
    assert ckpt["classnames"] == saved["classnames"]["base"]
    assert all(not k.startswith("clip.") for k in ckpt["params"])  # learnable parameters only


def test_zero_shot_run(toy_root, tmp_path):
    result = run(toy_root, tmp_path, "zsclip", subsample="all", epochs=None)
    assert 0 <= result["accuracy"]["all"] <= 100
    assert result["config"]["epochs"] == 0


def test_eval_run_reproduces_new_class_accuracy(toy_root, tmp_path):
    result = run(toy_root, tmp_path, "coop", "--lr", "0.05", "--batch", "8", epochs=2)
    d = run_dir(tmp_path, "coop")
    out = evaluation.main(["run", d, "--subsample", "new"])
    assert out[d]["toy"] == pytest.approx(result["accuracy"]["new"])
    assert os.path.exists(os.path.join(d, "eval_toy_new.json"))


def test_cross_dataset_evaluation(toy_root, tmp_path):
    """A toy run evaluated on another dataset (a tiny fake EuroSAT in the CoOp layout, 64 px images): its class
    names and template replace the run's, images are resized to the run's CLIP resolution."""
    import numpy as np
    from PIL import Image

    run(toy_root, tmp_path / "runs", "coop", "--lr", "0.05", "--batch", "8", epochs=1)
    d = run_dir(tmp_path / "runs", "coop")
    root = tmp_path / "data"
    names = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
             "Residential", "River", "SeaLake"]
    split = {"train": [], "val": [], "test": []}
    rng = np.random.default_rng(0)
    for label, name in enumerate(names):
        os.makedirs(root / "eurosat" / "2750" / name)
        for i in range(2):
            rel = f"{name}/{name}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "eurosat" / "2750" / rel)
            for s in split:
                split[s].append([rel, label, name])
    with open(root / "eurosat" / "split_zhou_EuroSAT.json", "w") as f:
        json.dump(split, f)
    out = evaluation.main(["run", d, "--dataset", "eurosat", "--root", str(root)])
    assert 0 <= out[d]["eurosat"] <= 100
    with open(os.path.join(d, "eval_eurosat_all.json")) as f:
        record = json.load(f)
    assert record["images"] == 20 and record["trained_on"] == "toy"


def test_zero_shot_select_ensemble(toy_root):
    cfg = train.resolve_config("zsclip", "toy", {"ensemble": "select"})
    clip = train.load_backbone(cfg, toy_root, "cpu")
    model = train.build_model(cfg, clip, ["red circle", "blue square"])
    assert len(model.templates) == 8 and model.templates[-1] == "a photo of a {}."


def test_only_prompt_parameters_change(toy_root, tmp_path):
    cfg = train.resolve_config("maple", "toy", dict(subsample="base", shots=4, epochs=2, lr=0.05, batch=8))
    clip_before = {k: v.clone() for k, v in train.load_backbone(cfg, toy_root, "cpu").state_dict().items()}
    train.train(cfg, root=toy_root, out=str(tmp_path))
    d = run_dir(tmp_path, "maple")
    model, _, _ = evaluation.load_run(d)
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, clip_before[k]), f"frozen CLIP weight {k} changed"
    trained = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)["params"]
    assert set(trained) == {"ctx", "compound_prompts"} | {f"couplings.{i}.{w}" for i in range(4) for w in ("weight", "bias")}
    fresh = train.build_model(cfg, train.load_backbone(cfg, toy_root, "cpu"), ["a", "b"])
    assert not torch.equal(trained["compound_prompts"], fresh.compound_prompts)  # it did train


def test_resume_matches_uninterrupted_run(toy_root, tmp_path, monkeypatch):
    extra = ["--lr", "0.05", "--batch", "8"]
    run(toy_root, tmp_path / "full", "coop", *extra, epochs=4)
    # the interrupted run: Ctrl-C during the third epoch leaves the checkpoint of the second
    restore = interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(SystemExit) as e:
        run(toy_root, tmp_path / "cut", "coop", *extra, epochs=4)
    assert e.value.code == 130
    d = run_dir(tmp_path / "cut", "coop")
    assert not os.path.exists(os.path.join(d, "result.json"))
    assert torch.load(os.path.join(d, "resume.pt"), weights_only=False)["epoch"] == 1
    restore()
    with pytest.raises(SystemExit, match="--resume"):  # refusing to overwrite a run silently
        run(toy_root, tmp_path / "cut", "coop", *extra, epochs=4)
    resumed = run(toy_root, tmp_path / "cut", "coop", *extra, "--resume", epochs=4)
    full = torch.load(os.path.join(run_dir(tmp_path / "full", "coop"), "checkpoint.pt"), weights_only=False)
    cut = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)
    torch.testing.assert_close(cut["params"]["ctx"], full["params"]["ctx"], rtol=0, atol=1e-6)
    assert len(epoch_losses(d)) == 4
    with open(os.path.join(run_dir(tmp_path / "full", "coop"), "result.json")) as f:
        assert resumed["accuracy"] == pytest.approx(json.load(f)["accuracy"])


def test_nan_loss_stops_and_keeps_last_checkpoint(toy_root, tmp_path, monkeypatch):
    extra = ["--lr", "0.05", "--batch", "8"]
    real = dapt.CoOp.loss

    def nan_in_second_epoch(self, batch, epoch):
        loss, stats = real(self, batch, epoch)
        return (loss * float("nan") if epoch == 1 else loss), stats

    monkeypatch.setattr(dapt.CoOp, "loss", nan_in_second_epoch)
    with pytest.raises(SystemExit, match="non-finite loss: loss is nan at epoch 2, step 1"):
        run(toy_root, tmp_path, "coop", *extra, epochs=3)
    d = run_dir(tmp_path, "coop")
    ckpt = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)
    assert torch.isfinite(ckpt["params"]["ctx"]).all()
    assert torch.load(os.path.join(d, "resume.pt"), weights_only=False)["epoch"] == 0
    assert not os.path.exists(os.path.join(d, "result.json"))
    with open(os.path.join(d, "log.txt")) as f:
        assert "last good checkpoint" in f.read()


def test_lr_schedule_equals_formula():
    cfg = train.resolve_config("maple", "caltech101", dict(subsample="base"))
    assert (cfg["epochs"], cfg["lr"], cfg["batch"]) == (5, 0.0035, 4)
    got = [train.lr_at(cfg, e) for e in range(5)]
    assert got == pytest.approx([1e-5, 3.5e-3, 3.166e-3, 2.291e-3, 1.209e-3], rel=1e-3)  # published MaPLe logs
    cfg = train.resolve_config("coop", "caltech101", dict(shots=16))
    E = cfg["epochs"]
    assert E == 200
    for e in range(E):
        expect = 1e-5 if e == 0 else 0.002 * (1 + math.cos(math.pi * (e - 1) / E)) / 2
        assert train.lr_at(cfg, e) == pytest.approx(expect, rel=1e-12)
    assert min(train.lr_at(cfg, e) for e in range(1, E)) > 0  # never reaches 0
    assert train.resolve_config("coop", "caltech101", dict(shots=1))["epochs"] == 50
    assert train.resolve_config("coop", "imagenet", dict(shots=16))["epochs"] == 50


def fake_result(root, method, dataset, seed, base, new):
    d = os.path.join(root, "b2n", dataset, method, f"shots16_seed{seed}")
    os.makedirs(d)
    train.write_json(os.path.join(d, "result.json"), dict(
        method=method, dataset=dataset, setting="b2n", shots=16, seed=seed, tag="",
        accuracy=dict(base=base, new=new, hm=0)))


def test_eval_table_matches_hand_computation(tmp_path):
    fake_result(tmp_path, "coop", "dtd", 1, 80.0, 50.0)
    fake_result(tmp_path, "coop", "dtd", 2, 82.0, 54.0)
    fake_result(tmp_path, "coop", "eurosat", 1, 90.0, 60.0)
    b2n, fs = evaluation.table(str(tmp_path))
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


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope", "--dataset", "toy"], "unknown method 'nope'"),
    (["--method", "coop", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["--method", "coop", "--dataset", "toy", "--n-cxt", "4"], r"unknown config key\(s\) \['n_cxt'\]"),
    (["--method", "coop", "--dataset", "toy", "--lr", "fast"], "--lr: cannot read 'fast' as float"),
])
def test_bad_arguments_are_clear_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.main(argv)


def test_values_starting_with_a_dash():
    args = train.parse_args(["--method", "coop", "--dataset", "toy", "--tag", "-h1", "--show-config"])
    assert args.cfg["tag"] == "-h1" and args.show_config


def test_argparse_abbreviations_are_off(capsys):
    with pytest.raises(SystemExit):
        train.main(["--meth", "coop", "--dataset", "toy"])
