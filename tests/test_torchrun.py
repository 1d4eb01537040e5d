"""torchrun: one run trained data-parallel by 2 CPU processes (gloo) equals the single-process run up to float
summation order (the processes' batches together are the single process's batch; gradients are averaged over it),
writes one run folder (rank 0), and resumes a run a single process left unfinished."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import epoch_losses, interrupt_at_epoch, run_folder, toy_argv, train_random_toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--batch", "8", "--lr", "0.05"]  # 4 shots, 3 epochs (toy_argv's defaults)


def torchrun(random_toy, out, method, *args, procs=2):
    """train.py under torchrun in `procs` processes: the command line train_random_toy runs in this process."""
    root, clip_path = random_toy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           os.path.join(REPO, "train.py"), *toy_argv(root, out, method, "--clip", clip_path, "--warmup-epochs", "0",
                                                     "--log-every", "1000", *args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def compare(single, parallel):
    a, b = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)["params"] for d in (single, parallel))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5)
    la, lb = epoch_losses(single), epoch_losses(parallel)
    assert lb == pytest.approx(la, rel=1e-5) and len(la) == 3


def test_two_processes_equal_one(random_toy, tmp_path):
    train_random_toy(random_toy, tmp_path / "one", "dapt", *ARGS)
    printed = torchrun(random_toy, tmp_path / "two", "dapt", *ARGS)
    one, two = run_folder(tmp_path / "one", "dapt"), run_folder(tmp_path / "two", "dapt")
    compare(one, two)
    assert printed.count("run folder:") == 1  # rank 0 reports
    with open(os.path.join(two, "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(one, "result.json")) as f:
        assert result["accuracy"] == pytest.approx(json.load(f)["accuracy"], abs=100 / 24 + 1e-9)  # <= 1 image
    assert result["samples_per_epoch"] == 48  # the global batch, every image once


def test_torchrun_resumes_a_run(random_toy, tmp_path, monkeypatch):
    train_random_toy(random_toy, tmp_path / "one", "coop", *ARGS)
    interrupt_at_epoch(monkeypatch, 2)  # a single process stops in the third epoch
    with pytest.raises(SystemExit):
        train_random_toy(random_toy, tmp_path / "cut", "coop", *ARGS)
    torchrun(random_toy, tmp_path / "cut", "coop", *ARGS, "--resume")
    compare(run_folder(tmp_path / "one", "coop"), run_folder(tmp_path / "cut", "coop"))
