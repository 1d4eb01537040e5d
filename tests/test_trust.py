"""Whether a run can be trusted, end to end on the toy benchmark: no file of a run folder or cache can run code, a
run folder never lies (a changed config is refused, a finished run is never rewritten, one process at a time), a
result depends only on its config and seed (also across a kill and --resume), guards flag broken models, read-only
datasets work, and the end of a run says what its numbers are."""
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch

import clip_load
import dapt
import data
import datatools
import eval as evaluation
import recipes
import toy
import train
from conftest import (TEST_TOY_PER_CLASS, cli_error, epoch_losses, interrupt_at_epoch, metrics_of, run_folder,
                      toy_argv, train_toy)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COOP = ["--lr", "0.05", "--batch", "8"]


class Payload:
    """Unpickling it runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant(path, marker):
    """Rewrite a torch file with a payload inside its otherwise unchanged content."""
    state = torch.load(path, weights_only=True) if os.path.exists(path) else {}
    state["note"] = Payload(marker)
    torch.save(state, path)


def snapshot(folder):
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def runs(toy_root, tmp_path_factory):
    """A finished coop run (1 epoch) and an unfinished one (best-val selection, stopped after 2 of 3 epochs)."""
    out = tmp_path_factory.mktemp("trust_runs")
    train_toy(toy_root, out / "finished", "coop", *COOP, epochs=1)
    with pytest.MonkeyPatch.context() as mp:
        interrupt_at_epoch(mp, 2)
        with pytest.raises(SystemExit):
            train_toy(toy_root, out / "unfinished", "coop", *COOP, "--selection", "best_val", epochs=3)
    return out


def fails(capsys, fn, *args, **kw):
    """fn(*args, **kw) must end like a command line with an error: (exit code, stderr)."""
    return cli_error(capsys, lambda _: fn(*args, **kw), None)


def error_line(err):
    """The one error line a command line printed last (after the run's log lines, if it had started)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: ")
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


def copy_of(runs, name, tmp_path):
    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name, run_folder(tmp_path / name, "coop")


# ----------------------------------------------------------------------------------------------------------
# no file runs code


def test_payload_is_real(tmp_path):
    path, marker = tmp_path / "x.pt", tmp_path / "marker"
    plant(path, marker)
    torch.load(path, weights_only=False)  # what the project did before: the code runs
    assert marker.exists()


@pytest.mark.parametrize("kind", ["checkpoint", "host", "resume", "best", "prototypes", "toy_clip"])
def test_planted_payload_never_runs_and_the_error_names_the_file(kind, runs, toy_root, tmp_path, capsys, monkeypatch,
                                                                 request):
    marker = tmp_path / "marker"
    if kind in ("checkpoint", "host"):
        out, d = copy_of(runs, "finished", tmp_path)
        target = os.path.join(d, "checkpoint.pt")
        plant(target, marker)
        if kind == "checkpoint":
            code, err = cli_error(capsys, evaluation.main, ["run", d])
        else:
            code, err = fails(capsys, train_toy, toy_root, tmp_path / "fvg", "fvgpt", "--host-run", d, epochs=1)
    elif kind in ("resume", "best"):
        out, d = copy_of(runs, "unfinished", tmp_path)
        target = os.path.join(d, f"{kind}.pt")
        plant(target, marker)
        if kind == "best":  # the best epoch stays the saved one, so best.pt is read after the last epoch
            monkeypatch.setattr(train, "evaluate", lambda *a, **k: (-1.0, 0))
        code, err = fails(capsys, train_toy, toy_root, out, "coop", *COOP, "--selection", "best_val", "--resume",
                          epochs=3)
    elif kind == "toy_clip":  # a state-dict CLIP named with --clip
        target = str(tmp_path / "clip.pt")
        plant(target, marker)
        code, err = fails(capsys, train_toy, toy_root, tmp_path / "runs", "coop", "--clip", target, epochs=1)
    else:  # dapt-dist's prototype cache in the dataset folder
        toy_copy = request.getfixturevalue("toy_copy")
        cfg = recipes.resolve_config("dapt-dist", "toy", dict(subsample="base", shots=4))
        digest = dapt.state_digest(train.load_backbone(cfg, toy_copy, "cpu").visual)[:16]
        view = "train" if cfg["proto_train_view"] else "test"
        name = f"features_clip-image-{digest}_{view}_shot_4-seed_1-base.pt"
        target = os.path.join(toy_copy, "toy", "split_fewshot", name)
        plant(target, marker)
        code, err = fails(capsys, train_toy, toy_copy, tmp_path / "runs", "dapt-dist", epochs=1)
    assert code == 1 and not marker.exists()
    assert error_line(err).startswith(f"error: {target}: torch.load(weights_only=True) refused it (it holds the "
                                      "global exec), which could run code")


def test_every_file_a_run_writes_loads_with_weights_only(runs):
    for name in ("finished", "unfinished"):
        d = run_folder(runs / name, "coop")
        for f in ("checkpoint.pt", "resume.pt", "best.pt"):
            if os.path.exists(os.path.join(d, f)):
                state = torch.load(os.path.join(d, f), weights_only=True)
                assert "params" in state
    state = torch.load(os.path.join(run_folder(runs / "unfinished", "coop"), "resume.pt"), weights_only=True)
    assert set(state["rng"]) >= {"torch", "numpy", "python"} and state["epoch"] == 1  # 2 epochs done


# ----------------------------------------------------------------------------------------------------------
# a run folder never lies


def test_a_changed_config_is_refused_listing_the_keys_and_nothing_is_written(runs, toy_root, tmp_path, capsys):
    out, d = copy_of(runs, "finished", tmp_path)
    before = snapshot(out)
    code, err = fails(capsys, train_toy, toy_root, out, "coop", "--lr", "0.002", "--batch", "8", "--resume", epochs=1)
    assert code == 1 and "holds a finished run with another config (lr 0.05 in the run, 0.002 now)" in err
    assert "eval.py run" in err and len(err.strip().splitlines()) == 1  # refused before anything is logged
    code, err = fails(capsys, train_toy, toy_root, out, "coop", *COOP, "--n-ctx", "16", epochs=1)  # without --resume
    assert code == 1 and "n_ctx 4 in the run, 16 now" in err
    assert snapshot(out) == before
    out, d = copy_of(runs, "unfinished", tmp_path)
    before = snapshot(out)
    code, err = fails(capsys, train_toy, toy_root, out, "coop", *COOP, "--selection", "best_val", "--resume",
                          "--n-ctx", "2", "--epochs", "5", epochs=None)
    assert code == 1 and "epochs 3 in the run, 5 now; n_ctx 4 in the run, 2 now" in err
    code, err = fails(capsys, train_toy, toy_root, out, "coop", *COOP, "--selection", "best_val", epochs=3)
    assert code == 1 and "unfinished run (2 of 3 epochs done): add --resume" in err
    assert snapshot(out) == before


def test_the_same_command_on_a_finished_run_prints_its_result_and_rewrites_nothing(runs, toy_root, tmp_path, capsys):
    out, d = copy_of(runs, "finished", tmp_path)
    before = snapshot(out)
    with open(os.path.join(d, "result.json")) as f:
        saved = json.load(f)
    for extra in ([], ["--resume"]):
        result = train_toy(toy_root, out, "coop", *COOP, *extra, epochs=1)
        printed = capsys.readouterr().out
        assert result["already_finished"] and result["accuracy"] == saved["accuracy"]
        assert "already finished: nothing was retrained" in printed and f"run folder: {d}" in printed
        assert re.search(rf"  base +{saved['accuracy']['base']:6.2f}  72 test images", printed)
    assert snapshot(out) == before


def test_one_process_at_a_time(runs, toy_root, tmp_path, capsys):
    out, d = copy_of(runs, "unfinished", tmp_path)
    with open(os.path.join(d, "train.lock"), "a+") as held:  # another process training there
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write("4242\n")
        held.flush()
        code, err = fails(capsys, train_toy, toy_root, out, "coop", *COOP, "--selection", "best_val", "--resume",
                              epochs=3)
    assert code == 1 and f"{d}: another process (pid 4242) is training or evaluating in this folder" in err
    assert len(metrics_of(d)) == 2


# ----------------------------------------------------------------------------------------------------------
# a result depends only on its config and seed


def test_fresh_and_warm_data_root_give_identical_results(toy_root, tmp_path):
    """dapt-dist (random context and prompts, feature cache): the first run on a new data root writes the few-shot
    and feature caches; the second finds them all. Same numbers, to the bit."""
    root = str(tmp_path / "fresh")
    toy.make_toy(root, seed=0, per_class=TEST_TOY_PER_CLASS)  # what python datatools.py toy does, smaller
    assert not os.path.exists(os.path.join(root, "toy", "split_fewshot"))
    args = ["--lr", "0.01", "--batch", "16"]
    cold = train_toy(root, tmp_path / "a", "dapt-dist", *args, epochs=2)
    assert len(os.listdir(os.path.join(root, "toy", "split_fewshot"))) == 2  # the few-shot split, the features
    torch.manual_seed(99)  # whatever state the process is in
    warm = train_toy(root, tmp_path / "b", "dapt-dist", *args, epochs=2)
    assert cold["accuracy"] == warm["accuracy"]
    a, b = run_folder(tmp_path / "a", "dapt-dist"), run_folder(tmp_path / "b", "dapt-dist")
    assert metrics_of(a) == metrics_of(b)
    pa, pb = (torch.load(os.path.join(x, "checkpoint.pt"), weights_only=True)["params"] for x in (a, b))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


KILL = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import dapt, train
real, calls = dapt.VPT.loss, []
def loss(self, batch, epoch):
    calls.append(epoch)
    if calls.count(1) == 3:  # the third step of the second epoch: killed, no handler runs
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, batch, epoch)
dapt.VPT.loss = loss
train.main({argv!r})
"""


def test_killed_dropout_run_resumes_bit_exactly(toy_root, tmp_path):
    clip_path = toy.toy_clip()  # the shipped toy CLIP, by its path
    extra = ["--lr", "0.05", "--batch", "8", "--prompt-dropout", "0.1", "--clip", clip_path]
    full = train_toy(toy_root, tmp_path / "full", "vpt", *extra)
    cut = toy_argv(toy_root, tmp_path / "cut", "vpt", *extra)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", KILL.format(repo=REPO, argv=cut)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    d = run_folder(tmp_path / "cut", "vpt")
    assert len(metrics_of(d)) == 1 and not os.path.exists(os.path.join(d, "result.json"))
    resumed = train.main(cut + ["--resume"])  # the lock died with the process
    assert resumed["accuracy"] == full["accuracy"]
    assert metrics_of(d) == metrics_of(run_folder(tmp_path / "full", "vpt"))
    pa, pb = (torch.load(os.path.join(x, "checkpoint.pt"), weights_only=True)["params"]
              for x in (d, run_folder(tmp_path / "full", "vpt")))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


# ----------------------------------------------------------------------------------------------------------
# threads; what the end of a run says


def test_end_of_run_says_what_each_number_is(toy_root, tmp_path, capsys, monkeypatch):
    seen = []
    real = dapt.CoOp.loss
    monkeypatch.setattr(dapt.CoOp, "loss", lambda self, b, e: (seen.append(torch.get_num_threads()), real(self, b, e))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a process with another thread count: the toy run still trains on one
    try:
        result = train_toy(toy_root, tmp_path, "coop", *COOP, "--selection", "best_val", epochs=2)
        assert set(seen) == {1} and torch.get_num_threads() == 2  # the run's threads, the caller's after
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr().out
    d = run_folder(tmp_path, "coop")
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["threads"] == 1
    assert recipes.COMMON["threads"] == 0 and recipes.resolve_config("coop", "toy", {"threads": 4})["threads"] == 4
    # epochs from 1 everywhere a person reads them
    m = metrics_of(d)
    assert [e["epoch"] for e in m] == [1, 2]
    best = max(m, key=lambda e: e["val_acc"])  # the first of equals, as the selection
    assert result["selected_epoch"] == best["epoch"]
    with open(os.path.join(d, "log.txt")) as f:
        log = f.read()
    assert f"best val accuracy {best['val_acc']:.2f} at epoch {best['epoch']} of 2" in log and "epoch 1/2 done" in log
    assert result["test_images"] == {"base": 72, "new": 72, "base_corr": 72, "new_corr": 72}
    assert "72 test_corr images of the 12 base classes" in printed  # the toy's correlated test split
    assert f"epoch {best['epoch']} of 2): top-1 accuracy in % on the test split" in printed
    assert "base " in printed and "72 test images of the 12 base classes" in printed
    assert "72 test images of the 12 new classes (same checkpoint)" in printed and "harmonic mean" in printed
    assert f"run folder: {d}" in printed
    # the zero-shot reference is --method zsclip on the same test images
    ref = result["zero_shot_reference"]
    zs = train_toy(toy_root, tmp_path / "zs", "zsclip", epochs=None)
    assert ref == zs["accuracy"] and "zero-shot CLIP on the same test images (--method zsclip): base" in printed


# ----------------------------------------------------------------------------------------------------------
# guards


def test_exploded_parameters_and_chance_accuracy_are_flagged(toy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "PARAM_RMS_LIMIT", 1e-3)  # every trained context is "exploded" under this bound
    result = train_toy(toy_root, tmp_path, "coop", *COOP, epochs=1)
    assert "exploded_parameters" in result["flags"] and result["param_rms_max"] > 1e-3
    with open(os.path.join(run_folder(tmp_path, "coop"), "result.json")) as f:
        assert json.load(f)["flags"] == result["flags"]
    with open(os.path.join(run_folder(tmp_path, "coop"), "log.txt")) as f:
        assert "trained parameter 'ctx' has an RMS value of" in f.read()
    assert "WARNING: trained parameter 'ctx'" in capsys.readouterr().out


def test_accuracy_at_chance_after_training_is_flagged():
    model = torch.nn.Linear(2, 2)
    names = {"all": [str(i) for i in range(24)]}
    assert train.health(model, {"all": 5.0}, {"all": 960}, names, trained=True)["flags"] == ["accuracy_at_chance"]
    assert train.health(model, {"all": 5.0}, {"all": 960}, names, trained=False)["flags"] == []
    assert train.health(model, {"all": 9.0}, {"all": 960}, names, trained=True)["flags"] == []  # 3 SE above 4.17


def test_nan_in_the_first_epoch_says_no_checkpoint_exists(toy_root, tmp_path, capsys, monkeypatch):
    real = dapt.CoOp.loss
    monkeypatch.setattr(dapt.CoOp, "loss", lambda self, b, e: (lambda l, s: (l * float("nan"), s))(*real(self, b, e)))
    code, err = fails(capsys, train_toy, toy_root, tmp_path, "coop", *COOP, epochs=2)
    line = error_line(err)
    assert code == 1 and "loss is nan at epoch 1, step 1" in line and "no checkpoint exists" in line
    d = run_folder(tmp_path, "coop")
    assert not any(os.path.exists(os.path.join(d, f)) for f in ("checkpoint.pt", "resume.pt", "result.json"))
    monkeypatch.setattr(dapt.CoOp, "loss", real)
    result = train_toy(toy_root, tmp_path, "coop", *COOP, epochs=2)  # the same command starts it over
    assert len(epoch_losses(d)) == 2
    with open(os.path.join(d, "result.json")) as f:
        assert json.load(f)["accuracy"] == result["accuracy"]


# ----------------------------------------------------------------------------------------------------------
# one clear line from every command line, --debug for the traceback


def test_wrong_checkpoint_tensor_is_one_line_and_debug_shows_the_traceback(toy_root, tmp_path, capsys):
    sd = clip_load.read_safetensors(toy.toy_clip())
    sd["ln_final.weight"] = torch.ones(32)
    path = str(tmp_path / "bad.pt")
    torch.save(sd, path)
    argv = ["--method", "coop", "--dataset", "toy", "--root", toy_root, "--out", str(tmp_path), "--clip", path]
    code, err = cli_error(capsys, train.main, argv)
    assert code == 1 and "tensor 'ln_final.weight' has shape [32], but token_embedding.weight [49408, 64]" in \
        error_line(err)
    with pytest.raises(dapt.CheckpointError, match="ln_final.weight"):
        train.main(argv + ["--debug"])
    code, err = cli_error(capsys, evaluation.main, ["run", str(tmp_path)])
    assert code == 1 and "no checkpoint.pt" in error_line(err)


def test_data_command_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert datatools.main(["toy", "--root", str(tmp_path / "file")]) == 1  # a file where the root should be
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    with pytest.raises(OSError):
        datatools.main(["toy", "--root", str(tmp_path / "file"), "--debug"])


# ----------------------------------------------------------------------------------------------------------
# read-only datasets


def test_read_only_dataset_caches_go_to_the_user_cache(toy_copy, tmp_path, monkeypatch, caplog):
    dataset = os.path.join(toy_copy, "toy")
    cache = tmp_path / "user_cache"
    monkeypatch.setenv("DAPT_CACHE", str(cache))
    modes = {}
    for d, dirs, files in os.walk(dataset):
        for x in [d] + [os.path.join(d, f) for f in files]:
            modes[x] = os.stat(x).st_mode
            os.chmod(x, modes[x] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:  # permissions do not bind root: the folder is read-only as far as os.access says
        real = data.can_write
        monkeypatch.setattr(data, "can_write", lambda f: not os.path.abspath(f).startswith(dataset) and real(f))
    before = snapshot(dataset)
    try:
        with caplog.at_level("INFO", logger="dapt"):
            result = train_toy(toy_copy, tmp_path / "runs", "dapt-dist", "--lr", "0.01", shots=3, epochs=1)
    finally:
        for x, mode in modes.items():
            os.chmod(x, mode)
    assert snapshot(dataset) == before
    with open(os.path.join(run_folder(tmp_path / "runs", "dapt-dist", shots=3), "result.json")) as f:
        assert json.load(f)["accuracy"] == result["accuracy"]  # the run finished
    written = sorted(os.path.relpath(os.path.join(d, f), cache) for d, _, fs in os.walk(cache) for f in fs)
    assert len(written) == 2 and written[0].startswith("toy-") and "split_fewshot/features_clip-image-" in written[0] \
        and written[0].endswith("_shot_3-seed_1-base.pt") and written[1].endswith("split_fewshot/shot_3-seed_1.json")
    assert "(the dataset folder" in caplog.text and "cannot be written)" in caplog.text
