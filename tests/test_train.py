"""train.py and eval.py end to end on the toy benchmark: every baseline trains, runs resume exactly, the schedule
is the protocol's formula, a NaN stops cleanly, tables match hand computations, bad arguments are clear errors."""
import json
import math
import os
import re

import pytest
import torch

import dapt
import data
import eval as evaluation
import train
import recipes
import runs
from conftest import cli_error, epoch_losses, interrupt_at_epoch, run_folder, train_toy


BASELINES = {  # a learning rate high enough that a few steps on 48 images move the loss
    "coop": ["--lr", "0.05", "--batch", "8"],
    # fixed views and no warm-up: with random crops of 48 images the epoch losses of 3 epochs are too noisy
    "cocoop": ["--lr", "0.05", "--batch", "2", "--rrc-scale", "1,1", "--rrc-ratio", "1,1", "--hflip", "0",
               "--warmup-epochs", "0"],
    "vpt": ["--lr", "0.05", "--batch", "8"],
    "maple": ["--lr", "0.05", "--batch", "8"],
    # the knowledge term holds the prompts near "a photo of a": fixed views, one full batch per epoch
    "kgcoop": ["--batch", "48", "--rrc-scale", "1,1", "--rrc-ratio", "1,1", "--hflip", "0"],
}


@pytest.mark.parametrize("method", list(BASELINES))
def test_baseline_trains_and_writes_result(toy_root, tmp_path, method):
    epochs = {"cocoop": 3, "kgcoop": 6}.get(method, 4)
    result = train_toy(toy_root, tmp_path, method, *BASELINES[method], epochs=epochs)
    d = run_folder(tmp_path, method)
    losses = epoch_losses(d)
    assert len(losses) == epochs
    assert losses[-1] < losses[0], f"{method}: loss did not fall: {losses}"
    with open(os.path.join(d, "result.json")) as f:
        saved = json.load(f)
    assert saved["accuracy"] == pytest.approx(result["accuracy"])
    assert set(saved["accuracy"]) == {"base", "new", "hm", "base_corr", "new_corr"}
    scale = [1.0, 1.0] if "--rrc-scale" in BASELINES[method] else [0.5, 1.0]  # the toy override unless set here
    assert saved["config"]["transform_train"]["scale"] == scale  # recorded in the run
    assert saved["samples_per_epoch"] == 12 * 4  # 12 base classes x 4 shots, nothing dropped
    for name in ("config.json", "log.txt", "checkpoint.pt", "resume.pt"):
        assert os.path.exists(os.path.join(d, name))
    ckpt = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)
    assert set(ckpt) == {"params", "config", "classnames", "extra"}
    assert ckpt["classnames"] == saved["classnames"]["base"]
    assert all(not k.startswith("clip.") for k in ckpt["params"])  # learnable parameters only


def test_zero_shot_run(toy_root, tmp_path):
    """A zero-shot run trains nothing, and its accuracy is the share of test images whose top-1 class, predicted
    from the image files by `eval.py predict` with the run's folder, is the true one."""
    result = train_toy(toy_root, tmp_path, "zsclip", subsample="all", epochs=None)
    assert result["config"]["epochs"] == 0
    bench = data.load_benchmark("toy", toy_root, shots=0, subsample="all")
    rows = evaluation.predict([p for p, _, _ in bench.test], run_dir=run_folder(tmp_path, "zsclip", subsample="all"),
                              topk=1, echo=lambda line: None)
    right = sum(top[0][0] == bench.classnames[y] for (_, top), (_, y, _) in zip(rows, bench.test))
    assert result["test_images"]["all"] == len(bench.test) == 24 * 6
    assert result["accuracy"]["all"] == pytest.approx(100 * right / len(bench.test))


def test_zero_shot_select_ensemble(toy_root):
    cfg = recipes.resolve_config("zsclip", "toy", {"ensemble": "select"})
    clip = train.load_backbone(cfg, toy_root, "cpu")
    model = dapt.build_model("zsclip", clip, ["red circle", "blue square"], cfg)
    assert len(model.templates) == 8 and model.templates[-1] == "a photo of a {}."


def test_only_prompt_parameters_change(toy_root, tmp_path):
    cfg = recipes.resolve_config("maple", "toy", dict(subsample="base", shots=4, epochs=2, lr=0.05, batch=8))
    clip_before = {k: v.clone() for k, v in train.load_backbone(cfg, toy_root, "cpu").state_dict().items()}
    train.train(cfg, root=toy_root, out=str(tmp_path))
    d = run_folder(tmp_path, "maple")
    model, _, _ = evaluation.trained_run(d)
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, clip_before[k]), f"frozen CLIP weight {k} changed"
    trained = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)["params"]
    assert set(trained) == {"ctx", "compound_prompts"} | {f"couplings.{i}.{w}" for i in range(4) for w in ("weight", "bias")}
    fresh = dapt.build_model("maple", train.load_backbone(cfg, toy_root, "cpu"), ["a", "b"], cfg)
    assert not torch.equal(trained["compound_prompts"], fresh.compound_prompts)  # it did train


def test_resume_matches_uninterrupted_run(toy_root, tmp_path, monkeypatch, capsys):
    extra = ["--lr", "0.05", "--batch", "8"]
    train_toy(toy_root, tmp_path / "full", "coop", *extra, epochs=4)
    # the interrupted run: Ctrl-C during the third epoch leaves the checkpoint of the second
    restore = interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(SystemExit) as e:
        train_toy(toy_root, tmp_path / "cut", "coop", *extra, epochs=4)
    assert e.value.code == 130
    d = run_folder(tmp_path / "cut", "coop")
    assert not os.path.exists(os.path.join(d, "result.json"))
    assert torch.load(os.path.join(d, "resume.pt"), weights_only=True)["epoch"] == 1
    restore()
    with pytest.raises(SystemExit) as e:  # refusing to overwrite a run silently
        train_toy(toy_root, tmp_path / "cut", "coop", *extra, epochs=4)
    assert e.value.code == 1 and "--resume" in capsys.readouterr().err
    resumed = train_toy(toy_root, tmp_path / "cut", "coop", *extra, "--resume", epochs=4)
    full = torch.load(os.path.join(run_folder(tmp_path / "full", "coop"), "checkpoint.pt"), weights_only=True)
    cut = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)
    assert torch.equal(cut["params"]["ctx"], full["params"]["ctx"])  # exact: the random states are restored too
    assert epoch_losses(d) == epoch_losses(run_folder(tmp_path / "full", "coop"))
    with open(os.path.join(run_folder(tmp_path / "full", "coop"), "result.json")) as f:
        assert resumed["accuracy"] == pytest.approx(json.load(f)["accuracy"])


def test_nan_loss_stops_and_keeps_last_checkpoint(toy_root, tmp_path, monkeypatch, capsys):
    extra = ["--lr", "0.05", "--batch", "8"]
    real = dapt.CoOp.loss

    def nan_in_second_epoch(self, batch, epoch):
        loss, stats = real(self, batch, epoch)
        return (loss * float("nan") if epoch == 1 else loss), stats

    monkeypatch.setattr(dapt.CoOp, "loss", nan_in_second_epoch)
    with pytest.raises(SystemExit) as e:
        train_toy(toy_root, tmp_path, "coop", *extra, epochs=3)
    assert e.value.code == 1 and "non-finite loss: loss is nan at epoch 2, step 1" in capsys.readouterr().err
    d = run_folder(tmp_path, "coop")
    ckpt = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)
    assert torch.isfinite(ckpt["params"]["ctx"]).all()
    assert torch.load(os.path.join(d, "resume.pt"), weights_only=True)["epoch"] == 0
    assert not os.path.exists(os.path.join(d, "result.json"))
    with open(os.path.join(d, "log.txt")) as f:
        assert "last good checkpoint" in f.read()


def test_lr_schedule_equals_formula():
    cfg = recipes.resolve_config("maple", "caltech101", dict(subsample="base"))
    assert (cfg["epochs"], cfg["lr"], cfg["batch"]) == (5, 0.0035, 4)
    got = [train.lr_at(cfg, e) for e in range(5)]
    assert got == pytest.approx([1e-5, 3.5e-3, 3.166e-3, 2.291e-3, 1.209e-3], rel=1e-3)  # published MaPLe logs
    cfg = recipes.resolve_config("coop", "caltech101", dict(shots=16))
    E = cfg["epochs"]
    assert E == 200
    for e in range(E):
        expect = 1e-5 if e == 0 else 0.002 * (1 + math.cos(math.pi * (e - 1) / E)) / 2
        assert train.lr_at(cfg, e) == pytest.approx(expect, rel=1e-12)
    assert min(train.lr_at(cfg, e) for e in range(1, E)) > 0  # never reaches 0
    assert recipes.resolve_config("coop", "caltech101", dict(shots=1))["epochs"] == 50
    assert recipes.resolve_config("coop", "imagenet", dict(shots=16))["epochs"] == 50


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope", "--dataset", "toy"], "unknown method 'nope'"),
    (["--method", "coop", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["--method", "coop", "--dataset", "toy", "--n-cxt", "4"],
     r"unknown config key\(s\) --n-cxt for method 'coop'. Valid keys: .*n_ctx"),
    (["--method", "coop", "--dataset", "toy", "--lr", "fast"], "--lr: cannot read 'fast' as float"),
    (["--method", "coop", "--dataset", "toy", "--setting", "foo"], "--setting 'foo': expected one of fewshot, b2n, xd"),
    (["--method", "coop", "--dataset", "toy", "--epochs", "-2"], "--epochs -2: expected a value >= 0"),
    (["--method", "coop", "--dataset", "toy", "--lr", "-0.1"], "--lr -0.1: expected a value >= 0"),
    (["--method", "coop", "--dataset", "toy", "--batch", "0"], "--batch 0: expected a value >= 1"),
    (["--method", "coop", "--dataset", "toy", "--subsample", "novel"], "--subsample 'novel': expected all, base or new"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    code, err = cli_error(capsys, train.main, argv)
    assert code == 1 and re.search(message, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_mistyped_toy_root_is_one_clear_line(tmp_path, capsys):
    code, err = cli_error(capsys, train.main, ["--method", "coop", "--dataset", "toy", "--root", str(tmp_path / "DATA2"),
                                               "--out", str(tmp_path / "runs")])
    assert code == 1 and err.startswith(f"error: data root {tmp_path / 'DATA2'} does not exist") and "Traceback" not in err
    assert f"python datatools.py toy --root {tmp_path / 'DATA2'}" in err and not os.path.exists(tmp_path / "DATA2")


def test_values_starting_with_a_dash():
    args = train.parse_args(["--method", "coop", "--dataset", "toy", "--tag", "-h1", "--show-config"])
    assert args.cfg["tag"] == "-h1" and args.show_config


def test_argparse_abbreviations_are_off(capsys):
    with pytest.raises(SystemExit):
        train.main(["--meth", "coop", "--dataset", "toy"])


def test_data_fraction(random_toy):
    root, _ = random_toy  # 4 training images per class
    cfg = recipes.resolve_config("coop", "toy", {"data_fraction": 0.5})
    assert cfg["shots"] == 0 and "frac0.5_seed1" in runs.run_dir_of("runs", cfg)
    with pytest.raises(dapt.ConfigError, match="data-fraction"):
        recipes.resolve_config("coop", "toy", {"data_fraction": 0.0})
    counts = {}
    for seed in (1, 2):
        bench = data.load_benchmark("toy", root, shots=0, seed=seed)
        full = len(bench.train)
        bench = data.data_fraction_split(bench, 0.5, seed)
        per_class = {}
        for _, label, _ in bench.train:
            per_class[label] = per_class.get(label, 0) + 1
        assert set(per_class.values()) == {2} and len(per_class) == 24  # round(0.5 * 4) of every class
        assert bench.meta["data_fraction"] == 0.5 and bench.meta["train_full"] == full
        counts[seed] = [p for p, _, _ in bench.train]
    assert counts[1] != counts[2]
    again = data.data_fraction_split(data.load_benchmark("toy", root, shots=0, seed=1), 0.5, 1)
    assert [p for p, _, _ in again.train] == counts[1]
    small = data.data_fraction_split(data.load_benchmark("toy", root, shots=0, seed=1), 0.01, 1)
    assert len(small.train) == 24  # at least one per class
