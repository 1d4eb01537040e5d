"""torchrun: one run trained data-parallel by 2 CPU processes (gloo) equals the single-process run up to float
summation order (the processes' batches together are the single process's batch; gradients are averaged over it),
writes one run folder (rank 0), and a run resumes in another process count: 1 -> 2 (a single process's unfinished
run continued by torchrun) and 2 -> 1 (torchrun's unfinished run continued by a single process), each equal to the
uninterrupted single-process run and saying in its log that the count changed. The collective timeout
(runs.DIST_TIMEOUT_MIN, $DAPT_DIST_TIMEOUT_MIN) is logged by rank 0. On a GPU machine the processes are kept on the
CPU (CUDA_VISIBLE_DEVICES is emptied for them: tests/conftest.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import runs

from conftest import epoch_losses, interrupt_at_epoch, run_folder, toy_argv, train_random_toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--batch", "8", "--lr", "0.05"]  # 4 shots, 3 epochs (toy_argv's defaults)


# train.py's main with its epoch `epoch` interrupted (Ctrl-C) in every process: a torchrun run left unfinished
CUT_AT_EPOCH = """import sys
sys.path.insert(0, {repo!r})
import train
real = train.train_one_epoch
def cut(cfg, model, opt, scaler, loader, epoch, *a):
    if epoch == {epoch}:
        raise KeyboardInterrupt
    return real(cfg, model, opt, scaler, loader, epoch, *a)
train.train_one_epoch = cut
train.main(sys.argv[1:])
"""


def torchrun(random_toy, out, method, *args, procs=2, script=None, ok=True):
    """train.py (or `script`) under torchrun in `procs` processes: the command line train_random_toy runs in this
    process. -> (stdout, stderr); ok: the command must succeed (else: must fail)."""
    root, clip_path = random_toy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           script or os.path.join(REPO, "train.py"), *toy_argv(root, out, method, "--clip", clip_path,
                                                               "--warmup-epochs", "0", "--log-every", "1000", *args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == ok, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, done.stderr


def compare(single, parallel):
    a, b = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)["params"] for d in (single, parallel))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5)
    la, lb = epoch_losses(single), epoch_losses(parallel)
    assert lb == pytest.approx(la, rel=1e-5) and len(la) == 3


def test_two_processes_equal_one(random_toy, tmp_path):
    train_random_toy(random_toy, tmp_path / "one", "dapt", *ARGS)
    printed, errors = torchrun(random_toy, tmp_path / "two", "dapt", *ARGS)
    one, two = run_folder(tmp_path / "one", "dapt"), run_folder(tmp_path / "two", "dapt")
    compare(one, two)
    assert printed.count("run folder:") == 1  # rank 0 reports
    assert errors.count(f"collective timeout {runs.DIST_TIMEOUT_MIN:g} min") == 1  # rank 0 says it, once
    with open(os.path.join(two, "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(one, "result.json")) as f:
        assert result["accuracy"] == pytest.approx(json.load(f)["accuracy"], abs=100 / 24 + 1e-9)  # <= 1 image
    assert result["samples_per_epoch"] == 48  # the global batch, every image once


def resumed_in_other_count(folder, saved, now):
    """The run folder says what happened: config.json keeps the count it started with, result.json the count
    that finished it, and log.txt warns once that the count changed."""
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["world_size"] == saved
    with open(os.path.join(folder, "result.json")) as f:
        assert json.load(f)["world_size"] == now
    with open(os.path.join(folder, "log.txt")) as f:
        assert f.read().count(f"resuming a run started in {saved} process(es) in {now}") == 1


def test_resume_one_process_to_two(random_toy, tmp_path, monkeypatch):
    train_random_toy(random_toy, tmp_path / "one", "coop", *ARGS)
    interrupt_at_epoch(monkeypatch, 2)  # a single process stops in the third epoch
    with pytest.raises(SystemExit):
        train_random_toy(random_toy, tmp_path / "cut", "coop", *ARGS)
    torchrun(random_toy, tmp_path / "cut", "coop", *ARGS, "--resume")
    compare(run_folder(tmp_path / "one", "coop"), run_folder(tmp_path / "cut", "coop"))
    resumed_in_other_count(run_folder(tmp_path / "cut", "coop"), 1, 2)


def test_resume_two_processes_to_one(random_toy, tmp_path):
    train_random_toy(random_toy, tmp_path / "one", "coop", *ARGS)
    script = tmp_path / "cut_at_epoch.py"
    script.write_text(CUT_AT_EPOCH.format(repo=REPO, epoch=2))
    torchrun(random_toy, tmp_path / "cut", "coop", *ARGS, script=str(script), ok=False)  # both stop in epoch 3
    cut = run_folder(tmp_path / "cut", "coop")
    assert os.path.isfile(os.path.join(cut, "resume.pt")) and not os.path.isfile(os.path.join(cut, "result.json"))
    assert len(torch.load(os.path.join(cut, "resume.pt"), weights_only=True)["rng"]) == 2  # one state per process
    train_random_toy(random_toy, tmp_path / "cut", "coop", *ARGS, "--resume")
    compare(run_folder(tmp_path / "one", "coop"), cut)
    resumed_in_other_count(cut, 2, 1)
