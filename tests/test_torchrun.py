"""torchrun: one run trained data-parallel by 2 CPU processes (gloo) equals the single-process run up to float
summation order (the processes' batches together are the single process's batch; gradients are averaged over it),
writes one run folder (rank 0), and resumes a run a single process left unfinished."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import interrupt_at_epoch, run_random_toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--shots", "4", "--epochs", "3", "--batch", "8", "--lr", "0.05", "--warmup-epochs", "0"]


def torchrun(random_toy, out, *args, procs=2):
    root, clip_path = random_toy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           os.path.join(REPO, "train.py"), "--dataset", "toy", "--root", root, "--out", str(out), "--clip", clip_path,
           "--subsample", "base", "--log-every", "1000", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def folder(out, method):
    return os.path.join(str(out), "b2n", "toy", method, "shots4_seed1")


def compare(single, parallel):
    a, b = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)["params"] for d in (single, parallel))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5)
    la, lb = ([json.loads(line)["loss"] for line in open(os.path.join(d, "metrics.jsonl"))] for d in (single, parallel))
    assert lb == pytest.approx(la, rel=1e-5) and len(la) == 3


def test_two_processes_equal_one(random_toy, tmp_path):
    run_random_toy(random_toy, tmp_path / "one", "--method", "dapt", "--log-every", "1000", *ARGS)
    printed = torchrun(random_toy, tmp_path / "two", "--method", "dapt", *ARGS)
    compare(folder(tmp_path / "one", "dapt"), folder(tmp_path / "two", "dapt"))
    assert printed.count("run folder:") == 1  # rank 0 reports
    with open(os.path.join(folder(tmp_path / "two", "dapt"), "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(folder(tmp_path / "one", "dapt"), "result.json")) as f:
        assert result["accuracy"] == pytest.approx(json.load(f)["accuracy"], abs=100 / 24 + 1e-9)  # <= 1 image
    assert result["samples_per_epoch"] == 48  # the global batch, every image once


def test_torchrun_resumes_a_run(random_toy, tmp_path, monkeypatch):
    run_random_toy(random_toy, tmp_path / "one", "--method", "coop", "--log-every", "1000", *ARGS)
    interrupt_at_epoch(monkeypatch, 2)  # a single process stops in the third epoch
    with pytest.raises(SystemExit):
        run_random_toy(random_toy, tmp_path / "cut", "--method", "coop", "--log-every", "1000", *ARGS)
    torchrun(random_toy, tmp_path / "cut", "--method", "coop", *ARGS, "--resume")
    compare(folder(tmp_path / "one", "coop"), folder(tmp_path / "cut", "coop"))
