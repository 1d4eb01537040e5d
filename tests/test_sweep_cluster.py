"""From a laptop to a cluster (sweep.py): one GPU per job (CUDA_VISIBLE_DEVICES from a pool, torchrun lines get as
many as they ask for), a plan as a Slurm array job (--emit slurm: the script, one run per index, re-emitting after
some runs finished), running an index or an emitted command by hand, and tasks that wait for the runs they name.
No GPU is needed: the GPU ids are checked in the environment each job receives."""
import json
import os
import re
import shlex
import subprocess
import sys
import time
import types

import pytest

import runs
import sweep
from conftest import cli_error, run_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_PY = os.path.join(REPO, "sweep.py")


def quick(random_toy, shots=2):
    """Plan arguments of a quick toy run on the random CLIP: 1 epoch, no warm-up, `shots` shots."""
    root, clip_path = random_toy
    return (f"--dataset toy --subsample base --shots {shots} --clip {clip_path} --epochs 1 --warmup-epochs 0 "
            f"--log-every 1000 --batch 8 --root {root}")


def finish(run_dir, accuracy=50.0):
    """Mark a run folder finished (a readable result.json), without training it."""
    runs.write_json(os.path.join(run_dir, "result.json"), {"accuracy": {"all": accuracy}})


def result_of(run_dir):
    return os.path.isfile(os.path.join(run_dir, "result.json"))


class FakeJobs:
    """subprocess.Popen for sweep.py's job loop: records each job's command and CUDA_VISIBLE_DEVICES, checks that no
    two jobs running at the same time hold the same GPU, and finishes each job (result.json) after a few polls."""

    def __init__(self, run_dirs):
        self.run_dirs, self.started, self.active, self.most = run_dirs, [], {}, 0
        jobs = self

        class Popen:
            def __init__(self, cmd, stdout=None, stderr=None, env=None):
                self.cmd, self.polls, self.returncode = cmd, 0, None
                self.gpus = env["CUDA_VISIBLE_DEVICES"].split(",")
                held = [g for other in jobs.active.values() for g in other]
                assert not set(self.gpus) & set(held), f"{self.gpus} given while {held} are in use"
                assert len(set(self.gpus)) == len(self.gpus)
                jobs.active[id(self)] = self.gpus
                jobs.most = max(jobs.most, len(jobs.active))
                jobs.started.append((cmd, self.gpus))

            def poll(self):
                self.polls += 1
                if self.polls >= 3 and self.returncode is None:
                    finish(jobs.run_dirs[tuple(self.cmd)])
                    del jobs.active[id(self)]
                    self.returncode = 0
                return self.returncode

        self.Popen = Popen


def fake_jobs(monkeypatch, plan, out):
    """FakeJobs for the runs of `plan` (into `out`), installed in sweep.py, with its loop's sleeps skipped."""
    jobs = FakeJobs({tuple(sweep.command(r)): r.run_dir for r in sweep.plan_runs(plan, out)})
    monkeypatch.setattr(sweep.subprocess, "Popen", jobs.Popen)
    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(sleep=lambda s: None, time=time.time))
    return jobs


# ----------------------------------------------------------------------------------------------------------
# one GPU per job


def test_each_job_gets_its_own_gpus_and_a_torchrun_line_as_many_as_it_asks(tmp_path, monkeypatch, capsys):
    plan, out = tmp_path / "plan.txt", str(tmp_path / "runs")
    plan.write_text("R = --dataset toy --subsample base --shots 2 --epochs 1\n"
                    "--method coop $R --seed {1,2,3,4,5}\n"
                    "torchrun --nproc_per_node 2 train.py --method coop $R --seed 6\n")
    jobs = fake_jobs(monkeypatch, str(plan), out)
    assert sweep.sweep_main([str(plan), "--out", out, "--gpus", "0,2,5"]) == 0  # --jobs: one per GPU
    printed = capsys.readouterr().out
    assert "3 at a time on GPUs 0,2,5" in printed and jobs.most == 3
    assert len(jobs.started) == 6 and all(set(g) <= {"0", "2", "5"} for _, g in jobs.started)
    plain = [g for cmd, g in jobs.started if "torch.distributed.run" not in cmd]
    (launcher, pair), = [(cmd, g) for cmd, g in jobs.started if "torch.distributed.run" in cmd]
    assert len(plain) == 5 and all(len(g) == 1 for g in plain) and len(pair) == 2
    assert launcher[3:6] == ["--standalone", "--nproc_per_node", "2"]  # a free port of its own on a shared machine
    assert f"started on GPU {','.join(pair)} (CUDA_VISIBLE_DEVICES)" in printed
    assert all(result_of(r.run_dir) for r in sweep.plan_runs(str(plan), out))
    # a line asking for more GPUs than the sweep has is an error before anything starts
    plan.write_text("torchrun --nproc_per_node 3 train.py --method coop --dataset toy --seed 7\n")
    with pytest.raises(sweep.ConfigError, match="asks for 3 GPUs, the sweep has 2"):
        sweep.sweep(str(plan), out=out, gpus=[0, 1], echo=lambda m: None)


def test_gpu_ids_and_torchrun_rendezvous():
    assert sweep.visible_gpus("0,2,5") == [0, 2, 5] and sweep.visible_gpus([3, 1]) == [3, 1]
    for bad in ("0,x", "1,1", "-1"):
        with pytest.raises(sweep.ConfigError, match="--gpus"):
            sweep.visible_gpus(bad)
    launcher, argv, nproc = sweep.launcher_of(["torchrun", "--nproc-per-node=4", "--rdzv_endpoint", "h:29400",
                                               "train.py", "--method", "coop"])
    assert nproc == 4 and argv == ["--method", "coop"]
    run = sweep.Run(1, argv, None, "d", "todo", launcher, nproc)
    assert "--standalone" not in sweep.command(run)  # its own rendezvous is kept
    with pytest.raises(sweep.ConfigError, match="names the script"):
        sweep.launcher_of(["torchrun", "--nproc_per_node", "2", "--method", "coop"])
    with pytest.raises(sweep.ConfigError, match="--nnodes 2: a plan's runs each run on one machine"):
        sweep.launcher_of(["torchrun", "--nnodes", "2", "--nproc_per_node", "4", "train.py", "--method", "coop"])


def test_jobs_on_gpus_end_to_end_each_log_names_its_device(random_toy, tmp_path):
    """Four real runs, 2 at a time on GPUs 0 and 1 (torch sees no CUDA here: the children run on the CPU with the
    CUDA_VISIBLE_DEVICES they were given): each run's log names the id the sweep gave it, and runs that overlapped
    in time never had the same one."""
    plan, out, lines = tmp_path / "plan.txt", str(tmp_path / "runs"), []
    plan.write_text(f"--method {{zsclip,coop}} {quick(random_toy)} --seed {{1,2}}\n")
    stats = sweep.sweep(str(plan), out=out, echo=lines.append, jobs=2, gpus=[0, 1])
    assert stats["trained"] == 4 and not stats["failed"] and "2 at a time on GPUs 0,1" in lines[0]
    planned, given, active, most = sweep.plan_runs(str(plan), out), {}, {}, 0
    for line in lines:  # the sweep's own account of what ran when, in order
        m = re.match(r"\[(\d+)/4\] .*: (started on GPU (\d+)|trained in)", line)
        if m and m.group(3):
            assert m.group(3) not in active.values(), line
            active[m.group(1)] = given[m.group(1)] = m.group(3)
            most = max(most, len(active))
        elif m:
            del active[m.group(1)]
    assert len(given) == 4 and most == 2
    for k, gpu in given.items():
        with open(os.path.join(planned[int(k) - 1].run_dir, "log.txt")) as f:
            log = f.read()
        assert re.search(rf"run .* on cpu, CUDA_VISIBLE_DEVICES={gpu}\n", log), log[:500]


# ----------------------------------------------------------------------------------------------------------
# a plan as a Slurm array job


def emitted(folder):
    """(tasks.json's tasks, commands.txt's lines, sweep.sbatch's lines) of an emitted plan."""
    with open(os.path.join(folder, "tasks.json")) as f:
        tasks = json.load(f)["tasks"]
    with open(os.path.join(folder, "commands.txt")) as f:
        commands = f.read().splitlines()
    with open(os.path.join(folder, "sweep.sbatch")) as f:
        script = f.read().splitlines()
    return tasks, commands, script


def test_emit_slurm_writes_an_array_of_the_unfinished_runs_one_per_index(tmp_path, capsys):
    plan, out, folder = tmp_path / "plan.txt", str(tmp_path / "runs"), str(tmp_path / "slurm")
    plan.write_text("R = --dataset toy --subsample base --shots 2 --epochs 1\n"
                    "--method fvgpt $R --seed 1 --host-run {out}/b2n/toy/coop-fvg/shots2_seed1\n"  # before its host
                    "--method coop $R --seed 1 --ctx-init '' --tag -fvg\n"
                    "--method {zsclip,coop} $R --seed {1,2}\n"
                    "torchrun --nproc_per_node 2 train.py --method coop $R --seed 3\n")
    planned = {os.path.abspath(r.run_dir): r for r in sweep.plan_runs(str(plan), out)}
    done, started = run_folder(out, "zsclip", shots=2), run_folder(out, "coop", "--seed", "2", shots=2)
    finish(done)
    os.makedirs(started)
    open(os.path.join(started, "config.json"), "w").write("{}")  # unfinished: its task resumes it
    flags = ["--partition", "gpu", "--cpus-per-task", "8", "--mem", "64G", "--time", "2:00:00", "--max-parallel", "3"]
    assert sweep.sweep_main([str(plan), "--out", out, "--emit", "slurm", folder, *flags]) == 0
    assert "6 runs (array 0-5), 1 finished ones left out; 1 wait for the runs they name" in capsys.readouterr().out
    tasks, commands, script = emitted(folder)
    assert script[0] == "#!/bin/bash" and [ln for ln in script if ln.startswith("#SBATCH")] == [
        "#SBATCH --job-name=dapt-sweep", "#SBATCH --array=0-5%3", "#SBATCH --partition=gpu",
        "#SBATCH --gres=gpu:2",  # what the plan asks for: its torchrun line's 2 processes
        "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G", "#SBATCH --time=2:00:00",
        f"#SBATCH --output={folder}/logs/%A_%a.out"]
    assert script[-1] == f'exec {sys.executable} {SWEEP_PY} --task {folder} "$SLURM_ARRAY_TASK_ID"'
    assert os.path.isdir(os.path.join(folder, "logs"))
    # every unfinished run exactly once, one per index; a run after the run it names
    assert [t["index"] for t in tasks] == list(range(6))
    assert sorted(t["run_dir"] for t in tasks) == sorted(d for d in planned if d != os.path.abspath(done))
    order = [t["run_dir"] for t in tasks]
    host, fvg = (os.path.abspath(run_folder(out, m, *x, shots=2)) for m, x in (("coop", ("--tag", "-fvg")),
                                                                               ("fvgpt", ())))
    assert order.index(host) < order.index(fvg) and [t["needs"] for t in tasks if t["run_dir"] == fvg] == [[host]]
    assert commands == [shlex.join(sweep.command(planned[d], resume=d == os.path.abspath(started))) for d in order]
    assert [c.endswith("--resume") for c in commands] == [d == os.path.abspath(started) for d in order]
    # emitted again after two more runs finished: only the rest, renumbered; default resources
    finish(host)
    finish(started)
    sweep.emit(sweep.plan_runs(str(plan), out), "slurm", folder, echo=lambda m: None)
    tasks, commands, script = emitted(folder)
    assert len(tasks) == len(commands) == 4 and {host, os.path.abspath(started)}.isdisjoint(t["run_dir"] for t in tasks)
    assert "#SBATCH --array=0-3" in script and "#SBATCH --cpus-per-task=4" in script and "#SBATCH --mem=32G" in script
    assert not any("--partition" in ln for ln in script)
    # a CPU plan asks for no GPU; everything finished writes nothing
    cpu_plan = tmp_path / "cpu.txt"
    cpu_plan.write_text("--method coop --dataset toy --subsample base --seed 9 --device cpu\n")
    sweep.emit(sweep.plan_runs(str(cpu_plan), out), "slurm", folder, echo=lambda m: None)
    assert not any("--gres" in ln for ln in emitted(folder)[2]) and "#SBATCH --array=0-0" in emitted(folder)[2]
    finish(sweep.plan_runs(str(cpu_plan), out)[0].run_dir)
    said = []
    assert sweep.emit(sweep.plan_runs(str(cpu_plan), out), "slurm", folder, echo=said.append) == []
    assert "every run of the plan is finished" in said[0]


def test_emit_takes_a_run_two_plans_share_once_and_refuses_two_runs_in_one_folder(tmp_path, capsys):
    a, b, out = tmp_path / "a.txt", tmp_path / "b.txt", str(tmp_path / "runs")
    a.write_text("--method coop --dataset toy --seed {1,2}\n")
    b.write_text("--method coop --dataset toy --seed {2,3}\n")
    assert sweep.sweep_main([str(a), str(b), "--out", out, "--emit", "commands"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [re.search(r"--seed (\d)", ln).group(1) for ln in printed] == ["1", "2", "3"]
    b.write_text("--method coop --dataset toy --seed 2 --lr 0.5\n")  # the same folder, another run
    code, err = cli_error(capsys, sweep.sweep_main, [str(a), str(b), "--out", out, "--emit", "slurm", str(tmp_path)])
    assert code == 1 and "the same run" in err and "(lr)" in err and "--tag" in err
    code, err = cli_error(capsys, sweep.sweep_main, [str(a), "--emit", "pbs"])
    assert code == 1 and "expected --emit slurm DIR or --emit commands" in err


# ----------------------------------------------------------------------------------------------------------
# running an index, or an emitted command, by hand


def test_an_index_run_by_hand_trains_that_run_and_waits_for_the_run_it_names(random_toy, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    plan, out, folder = tmp_path / "plan.txt", str(tmp_path / "runs"), str(tmp_path / "slurm")
    plan.write_text(f"R = {quick(random_toy)}\n"
                    "--method fvgpt $R --seed 1 --host-run {out}/b2n/toy/coop-fvg/shots2_seed1\n"
                    "--method coop $R --seed 1 --ctx-init '' --tag -fvg\n"
                    "--method zsclip $R --seed 1\n")
    sweep.emit(sweep.plan_runs(str(plan), out), "slurm", folder, echo=lambda m: None)
    tasks = {os.path.basename(os.path.dirname(t["run_dir"])): t for t in emitted(folder)[0]}
    assert [tasks[m]["index"] for m in ("coop-fvg", "fvgpt", "zsclip")] == [0, 1, 2]
    # what sweep.sbatch runs for index 2, typed by hand: that run, and no other, is trained
    done = subprocess.run([sys.executable, SWEEP_PY, "--task", folder, "2"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.startswith("task 2: ") and "train.py --method zsclip" in done.stdout
    assert [result_of(tasks[m]["run_dir"]) for m in ("coop-fvg", "fvgpt", "zsclip")] == [False, False, True]
    # index 1 names index 0's folder (--host-run): it waits until that run is finished (here: trained meanwhile)
    said = []

    def echo(msg):
        said.append(msg)
        if msg.startswith("task 1: waiting"):
            assert sweep.task(folder, 0, echo=said.append) == 0  # another array task, as Slurm would run it

    assert sweep.task(folder, 1, poll=0.01, echo=echo) == 0
    host, fvg = tasks["coop-fvg"]["run_dir"], tasks["fvgpt"]["run_dir"]
    assert said[0] == f"task 1: waiting for {host} (task 0; every 0.01 s)" and said[1].startswith("task 0: ")
    assert said[2].startswith("task 1: ") and "--host-run" in said[2] and result_of(host) and result_of(fvg)
    assert os.path.getmtime(os.path.join(fvg, "config.json")) >= os.path.getmtime(os.path.join(host, "result.json"))
    assert sweep.task(folder, 2, echo=said.append) == 0 and "--resume" not in said[-1]  # finished: exits at once
    code, err = cli_error(capsys, sweep.sweep_main, ["--task", folder, "3"])
    assert code == 1 and "holds tasks 0-2" in err


def test_a_task_fails_clearly_when_the_run_it_needs_failed_or_is_not_in_the_plan(random_toy, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    root = random_toy[0]
    plan, out, folder = tmp_path / "plan.txt", str(tmp_path / "runs"), str(tmp_path / "slurm")
    plan.write_text(f"R = {quick(random_toy)}\n"
                    f"--method coop $R --seed 2 --clip {root}/missing.pt --tag -bad\n"
                    "--method fvgpt $R --seed 2 --host-run {out}/b2n/toy/coop-bad/shots2_seed2\n"
                    "--method fvgpt $R --seed 3 --host-run {out}/elsewhere/coop/shots2_seed3\n")
    sweep.emit(sweep.plan_runs(str(plan), out), "slurm", folder, echo=lambda m: None)
    # index 2 names a folder that is neither finished, nor in the plan, nor being trained
    with pytest.raises(runs.RunError, match="elsewhere/coop/shots2_seed3, which is not finished, not in this plan"):
        sweep.task(folder, 2, echo=lambda m: None)
    # the host (index 0) fails in array job 7: in job 7, index 1 stops at once instead of waiting for it
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    assert sweep.task(folder, 0, echo=lambda m: None) == 1
    assert open(os.path.join(folder, "logs", "7_0.failed")).read().endswith("exit code 1\n")
    code, err = cli_error(capsys, sweep.sweep_main, ["--task", folder, "1"])
    assert code == 1 and "whose task 0 failed (its log: " in err and "logs/7_0.out" in err
    assert os.path.exists(os.path.join(folder, "logs", "7_1.failed"))  # and says so to the tasks waiting on it
    # a re-submission (job 8) runs the host again: index 1 waits for it, not for job 7's failure
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "8")

    class Waits(Exception):
        pass

    def stop(msg):
        raise Waits(msg)

    with pytest.raises(Waits, match="task 1: waiting for"):
        sweep.task(folder, 1, poll=0.01, echo=stop)


def test_emit_commands_prints_one_command_per_unfinished_run_that_trains_it_by_hand(random_toy, tmp_path, capsys):
    plan, out = tmp_path / "plan.txt", str(tmp_path / "runs")
    plan.write_text(f"--method zsclip {quick(random_toy)} --seed {{1,2,3}}\n")
    first = sweep.plan_runs(str(plan), out)[0].run_dir
    finish(first)
    assert sweep.sweep_main([str(plan), "--out", out, "--emit", "commands"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2
    assert all(ln.startswith(f"{sys.executable} {REPO}/train.py --method zsclip") for ln in printed)
    done = subprocess.run(shlex.split(printed[1]), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [result_of(r.run_dir) for r in sweep.plan_runs(str(plan), out)] == [True, False, True]
    sweep.sweep_main([str(plan), "--out", out, "--emit", "commands"])
    assert capsys.readouterr().out.splitlines() == printed[:1]
