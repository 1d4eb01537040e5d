"""Sweeps: a paper's table as one command. `python sweep.py PLAN... [--resume] [--jobs N] [--gpus 0,2,5]` trains every
run of the plan files that is not finished, with one progress line per run; `--emit slurm DIR` writes them as a Slurm
array job instead (`--emit commands` prints the plain commands for any other scheduler).

A plan is a text file with one run per line, written as train.py arguments ('#' starts a comment; a line ending
in '\' goes on), and a small grid syntax:
  NAME = words      a variable: $NAME or ${NAME} in later lines is replaced by the words
  {a,b,c}           one run per value; several groups give every combination (the leftmost varies slowest)
  {key}             the value of --key in the same run once expanded ({seed}, {dataset}), or the sweep's {out}
                    and {root} (e.g. --host-run {out}/b2n/{dataset}/coop-fvg/shots16_seed{seed})
  torchrun ... train.py ARGS   one run in several processes on one machine (torchrun's own flags, e.g.
                    --nproc_per_node 4: it gets that many GPUs; --standalone unless the line names a rendezvous)
The sweep's --root, --out and --device apply to every line that does not give them. Finished runs (result.json)
are skipped, unfinished ones resumed with --resume; --jobs N trains N runs at a time, each in its own process, and on a
machine with GPUs each job gets its own (CUDA_VISIBLE_DEVICES; N defaults to the number of GPUs).
Deliberately not here: what a run does (train.py), tables of the results (eval.py).
"""
import argparse
import datetime
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import namedtuple

import torch

import files
import train
from prompting import ConfigError
from runs import RunError, RunLock, read_json, read_result, run_dir_of

log = logging.getLogger("dapt")

TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")

# ----------------------------------------------------------------------------------------------------------
# the plan language


PLAN_VARIABLE = re.compile(r"^([A-Za-z_]\w*)\s*=\s*(.*)$")


def _plan_substitute(text, variables, where):
    def value(m):
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise ConfigError(f"{where}: ${name} is not defined above (NAME = words)")
        return variables[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def _brace_expand(text):
    m = re.search(r"\{([^{}]*,[^{}]*)\}", text)
    if m is None:
        return [text]
    return [out for option in m.group(1).split(",")
            for out in _brace_expand(text[:m.start()] + option + text[m.end():])]


def expand_plan(text, out="runs", root="DATA", where="plan"):
    """Plan text -> [(line number, argv of one run)] in order (see the section comment)."""
    variables, runs, pending, start = {}, [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        start = start or number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending, n, start = (pending + line).strip(), "", start, 0
        if not line:
            continue
        m = PLAN_VARIABLE.match(line)
        if m and not line.startswith("-"):
            variables[m.group(1)] = _plan_substitute(m.group(2).strip(), variables, f"{where}:{n}")
            continue
        for combo in _brace_expand(_plan_substitute(line, variables, f"{where}:{n}")):
            tokens = shlex.split(combo)
            given = {t[2:].replace("-", "_"): v for t, v in zip(tokens, tokens[1:]) if t.startswith("--")}
            given = {**given, "out": given.get("out", out), "root": given.get("root", root)}

            def ref(m, given=given, n=n):
                if m.group(1) not in given:
                    raise ConfigError(f"{where}:{n}: {{{m.group(1)}}} refers to --{m.group(1)}, which this line does "
                                      "not set")
                return given[m.group(1)]
            runs.append((n, [re.sub(r"\{(\w+)\}", ref, t) for t in tokens]))
    return runs


def run_status(run_dir):
    """done (a readable result.json), unfinished (started: config.json or resume.pt, no readable result) or todo."""
    if read_result(run_dir) is not None:
        return "done"
    if any(os.path.exists(os.path.join(run_dir, f)) for f in ("config.json", "resume.pt")):
        return "unfinished"
    return "todo"


def _summary(result):
    return " ".join(f"{k} {v:.2f}" for k, v in result["accuracy"].items() if isinstance(v, (int, float)))


# ----------------------------------------------------------------------------------------------------------
# a plan's runs: every line parsed and resolved before anything runs

# one run of a plan: its plan line, train.py's argv, the parsed args (args.cfg: its config), its folder, its state
# (done / unfinished / todo), the torchrun launcher (its tokens, [] for a plain run) and the GPUs it asks for
Run = namedtuple("Run", "line argv args run_dir status launcher gpus")


def launcher_of(tokens):
    """(torchrun's tokens, train.py's tokens, processes per node) of a plan line; ([], tokens, 1) without torchrun."""
    if not tokens or tokens[0] != "torchrun":
        return [], tokens, 1
    if "train.py" not in tokens:
        raise ConfigError(f"a torchrun line names the script: torchrun --nproc_per_node N train.py ARGS (got "
                          f"{' '.join(tokens)})")
    k = tokens.index("train.py")
    launcher, nproc = tokens[1:k], 1
    for i, t in enumerate(launcher):
        value = t.partition("=")[2] or (launcher[i + 1] if i + 1 < len(launcher) else "")
        if t.startswith(("--nproc_per_node", "--nproc-per-node")):
            nproc = int(value) if value.isdigit() else 1
        if t.startswith("--nnodes") and value not in ("1", "1:1"):  # the other nodes would never join a sweep's job
            raise ConfigError(f"torchrun --nnodes {value}: a plan's runs each run on one machine; start a run on "
                              "several nodes with its own torchrun on each node (docs/runs.md, several nodes)")
    return launcher, tokens[k + 1:], nproc


def plan_runs(plan, out="runs", root="DATA", device=None):
    """[Run] of a plan file, in order; ConfigError naming the line for one that cannot run, or for two lines that
    give the same run folder. --root, --out and --device (when given) apply to the lines that do not set them."""
    with open(plan) as f:
        text = f.read()
    runs, seen = [], {}
    for n, tokens in expand_plan(text, out, root, os.path.basename(plan)):
        try:
            launcher, tokens, nproc = launcher_of(tokens)  # --device: train.py's default (CUDA when it sees a GPU)
            argv = tokens + [x for flag, v in (("--root", root), ("--out", out), ("--device", device))
                             if v is not None and flag not in tokens for x in (flag, v)]
            args = train.parse_args(argv)
        except SystemExit:  # argparse printed its message
            raise ConfigError(f"{plan}:{n}: cannot read the arguments {' '.join(tokens)}") from None
        except ConfigError as e:
            raise ConfigError(f"{plan}:{n}: {e}") from None
        d = run_dir_of(args.out, args.cfg)
        if d in seen:
            raise ConfigError(f"{plan}: lines {seen[d]} and {n} give the same run {d}; tell them apart with --tag")
        seen[d] = n
        runs.append(Run(n, argv, args, d, run_status(d), launcher, nproc if launcher else 1))
    return runs


def needs_of(runs):
    """{i: [j, ...]}: the runs whose folders run i's arguments name (--host-run): they must finish first."""
    where = {os.path.abspath(r.run_dir): j for j, r in enumerate(runs)}
    named = lambda r: dict.fromkeys(where.get(os.path.abspath(t)) for t in r.argv if t)  # noqa: E731
    return {i: [j for j in named(r) if j is not None and j != i] for i, r in enumerate(runs)}


# torchrun flags that say where its processes meet; a line without any of them runs on one machine (--standalone)
RENDEZVOUS = ("--standalone", "--nnodes", "--rdzv_endpoint", "--rdzv-endpoint", "--master_addr", "--master-addr",
              "--master_port", "--master-port")


def command(run, resume=False):
    """The process that trains a run: python train.py ARGS, or python -m torch.distributed.run (torchrun) ... .
    A torchrun line that names no rendezvous gets --standalone (a free port of its own), so torchrun runs started at
    once on one machine (jobs, array tasks) do not meet on torchrun's default port 29500."""
    argv = run.argv + (["--resume"] if resume and "--resume" not in run.argv else [])
    if run.launcher:
        alone = [] if any(t.split("=")[0] in RENDEZVOUS for t in run.launcher) else ["--standalone"]
        return [sys.executable, "-m", "torch.distributed.run", *alone, *run.launcher, TRAIN_PY, *argv]
    return [sys.executable, TRAIN_PY, *argv]


def visible_gpus(gpus=None):
    """The GPU ids jobs are spread over: --gpus "0,2,5" (or a list of ids), else every GPU this process sees ([]
    without CUDA)."""
    if gpus:
        given = gpus if isinstance(gpus, (list, tuple)) else str(gpus).split(",")
        try:
            ids = [int(g) for g in given]
        except ValueError:
            raise ConfigError(f"--gpus {gpus!r}: expected GPU ids such as 0,2,5") from None
        if len(set(ids)) != len(ids) or min(ids) < 0:
            raise ConfigError(f"--gpus {gpus!r}: expected distinct GPU ids >= 0, such as 0,2,5")
        return ids
    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g for g in env.split(",") if g.strip()] if env else []
    return [int(g) if g.strip().isdigit() else g for g in ids] or list(range(torch.cuda.device_count()))


# ----------------------------------------------------------------------------------------------------------
# running a plan here: one process, or N at a time (each with its own GPUs)


def sweep(plan, out="runs", root="DATA", device=None, resume=False, dry_run=False, echo=print, jobs=1, gpus=None):
    """Train every run of a plan file that has no result yet, with one progress line per run (and an ETA from the
    runs trained so far), also appended to <out>/sweep.log. Every line is parsed and resolved before anything
    runs. jobs 1 without GPUs: one run after the other in this process; otherwise `python train.py` processes, N at
    a time (the first run trains alone, as it makes the shared caches; a run whose arguments name another run's
    folder, as --host-run does, waits for it), each given its own GPUs (`gpus`: ids, CUDA_VISIBLE_DEVICES) when
    there are any. -> {"done": n, "trained": n, "failed": [(run dir, error)], "skipped": n}."""
    planned = plan_runs(plan, out, root, device)
    gpu_ids = [] if gpus == [] else visible_gpus(gpus)
    to_train = [r.status == "todo" or (r.status == "unfinished" and resume) for r in planned]
    counts = {s: sum(r.status == s for r in planned) for s in ("done", "unfinished", "todo")}
    log_path = os.path.join(out, "sweep.log")

    def say(msg):
        echo(msg)
        if not dry_run:
            os.makedirs(out, exist_ok=True)
            with open(log_path, "a") as f:
                f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {msg}\n")
    say(f"sweep {plan}: {len(planned)} runs: {counts['done']} done, {counts['unfinished']} unfinished, "
        f"{counts['todo']} to train" + (" (dry run)" if dry_run else "")
        + (f", {jobs} at a time" if jobs > 1 and not dry_run else "")
        + (f" on GPUs {','.join(map(str, gpu_ids))}" if gpu_ids and not dry_run else ""))
    stats, times, t_sweep = dict(done=0, trained=0, failed=[], skipped=0), [], time.time()
    heads = [f"[{i + 1}/{len(planned)}] {r.run_dir}:" for i, r in enumerate(planned)]
    for i, r in enumerate(planned):
        if r.status == "done":
            stats["done"] += 1
            say(f"{heads[i]} done")
        elif not to_train[i]:
            stats["skipped"] += 1
            say(f"{heads[i]} unfinished, skipped (pass --resume to continue it)")
        elif dry_run:
            say(f"{heads[i]} would {'resume' if r.status == 'unfinished' else 'train'}")
    if dry_run:
        return stats

    def finished(i, result=None, error=None, seconds=0.0):
        if error:
            stats["failed"].append((planned[i].run_dir, error))
            what = f"FAILED ({error.splitlines()[0] if error else ''})"
        else:
            stats["trained"] += 1
            times.append(seconds)
            how = "resumed" if planned[i].status == "unfinished" else "trained"
            what = f"{how} in {seconds:.0f}s, {_summary(result)}"
        left = len(todo) + len(running)
        # ETA: the mean run time so far, shared by the workers
        eta = (datetime.timedelta(seconds=int(statistics.fmean(times) * left / max(1, min(jobs, left or 1))))
               if times else "?")
        say(f"{heads[i]} {what} | {left} to go, ETA {eta}")

    todo, running = [i for i in range(len(planned)) if to_train[i]], {}
    if jobs <= 1 and not gpu_ids and not any(r.launcher for r in planned):
        while todo:
            i = todo.pop(0)
            r = planned[i]
            t0 = time.time()
            try:
                result = train.train(r.args.cfg, root=r.args.root, out=r.args.out, device=r.args.device,
                                     resume=r.status == "unfinished")
            except KeyboardInterrupt:
                say(f"{heads[i]} interrupted; run the sweep again with --resume to continue")
                raise
            except Exception as e:  # one failed run (an error, a NaN, out of memory) does not stop the table
                log.exception("sweep: %s failed", r.run_dir)
                finished(i, error=f"{type(e).__name__}: {e}")
            else:
                finished(i, result, seconds=time.time() - t0)
    else:
        _sweep_parallel(planned, todo, running, max(jobs, 1), finished, say, heads, gpu_ids)
    say(f"sweep {plan}: {stats['done']} were done, {stats['trained']} trained, {len(stats['failed'])} failed, "
        f"{stats['skipped']} unfinished skipped ({time.time() - t_sweep:.0f}s)")
    return stats


def _sweep_parallel(planned, todo, running, jobs, finished, say, heads, gpu_ids=()):
    """The process loop of sweep: child processes `python train.py ARGS` (or torchrun), their log in the run folder's
    log.txt, their stdout and stderr in <run folder>.sweep.txt (removed when the run succeeds). With GPUs, a job
    starts when as many GPUs as it asks for are free, and gets them as CUDA_VISIBLE_DEVICES."""
    dirs = [r.run_dir for r in planned]
    needs = needs_of(planned)
    ok = {i for i, r in enumerate(planned) if r.status == "done"}
    free = list(gpu_ids)
    failed, first = set(), True
    for i in todo:
        if gpu_ids and planned[i].gpus > len(gpu_ids):
            raise ConfigError(f"{dirs[i]} asks for {planned[i].gpus} GPUs, the sweep has {len(gpu_ids)}")
    try:
        while todo or running:
            for i in [i for i in todo if any(j in failed for j in needs[i])]:
                todo.remove(i)
                failed.add(i)
                gone = ", ".join(dirs[j] for j in needs[i] if j in failed)
                finished(i, error=f"RunError: a run it needs failed ({gone})")
            ready = [i for i in todo if all(j in ok for j in needs[i])]
            while ready and len(running) < (1 if first else jobs):
                i = ready[0]
                if gpu_ids and planned[i].gpus > len(free):
                    break  # waits for GPUs
                ready.pop(0)
                todo.remove(i)
                mine = [free.pop(0) for _ in range(planned[i].gpus)] if gpu_ids else []
                env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ",".join(map(str, mine))} if gpu_ids else {}))
                os.makedirs(os.path.dirname(dirs[i]), exist_ok=True)
                out = open(dirs[i] + ".sweep.txt", "w")
                proc = subprocess.Popen(command(planned[i], planned[i].status == "unfinished"), stdout=out,
                                        stderr=subprocess.STDOUT, env=env)
                running[i] = (proc, out, time.time(), mine)
                if mine:
                    say(f"{heads[i]} started on GPU {','.join(map(str, mine))} (CUDA_VISIBLE_DEVICES)")
            if not running and todo:  # waiting on runs that can never start (not in this plan, not done)
                for i in list(todo):
                    todo.remove(i)
                    finished(i, error="RunError: the run folder(s) it names are not finished: "
                                      + ", ".join(dirs[j] for j in needs[i] if j not in ok))
                break
            time.sleep(0.2)
            for i, (proc, out, t0, mine) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[i]
                out.close()
                free += mine
                first = False
                path = dirs[i] + ".sweep.txt"
                if proc.returncode == 0 and read_result(dirs[i]) is not None:
                    ok.add(i)
                    os.remove(path)
                    finished(i, read_json(os.path.join(dirs[i], "result.json"), "run result"), seconds=time.time() - t0)
                else:
                    failed.add(i)
                    with open(path) as f:
                        lines = [ln.strip() for ln in f if ln.strip()]
                    errors = [ln for ln in lines if ln.startswith("error:")]  # the child's own one-line error
                    last = errors[-1] if errors else lines[-1] if lines else "no output"
                    finished(i, error=f"exit code {proc.returncode}: {last} (all of it: {path})")
    except KeyboardInterrupt:
        for proc, _, _, _ in running.values():
            proc.terminate()  # its resume.pt holds the last finished epoch
        for i, (proc, _, _, _) in running.items():
            proc.wait()
            say(f"{heads[i]} interrupted; run the sweep again with --resume to continue")
        raise


# ----------------------------------------------------------------------------------------------------------
# a plan for a scheduler: --emit slurm DIR (an array job, one run per index) or --emit commands

TASKS = "tasks.json"


def _scheduled(runs):
    """The unfinished runs of `runs` (several plans' runs: a run two plans share once), every run after the runs it
    names (so array tasks started in index order seldom wait); ConfigError for two different runs in one folder."""
    kept = {}
    for r in runs:
        d = os.path.abspath(r.run_dir)
        if d in kept and kept[d].args.cfg != r.args.cfg:
            a, b = kept[d].args.cfg, r.args.cfg
            keys = ", ".join(sorted(k for k in {**a, **b} if a.get(k) != b.get(k)))
            raise ConfigError(f"two lines of the plans give the same run {r.run_dir} with different configs ({keys}); "
                              "tell them apart with --tag")
        kept.setdefault(d, r)
    unique = list(kept.values())
    needs, ordered, placed = needs_of(unique), [], set()
    waiting = [i for i, r in enumerate(unique) if r.status != "done"]
    while waiting:
        ready = [i for i in waiting if all(j in placed or unique[j].status == "done" for j in needs[i])] or waiting
        i = ready[0]  # (a cycle: plan order; its tasks fail clearly)
        waiting.remove(i)
        placed.add(i)
        ordered.append(i)
    return [unique[i] for i in ordered], {i_new: [os.path.abspath(unique[j].run_dir) for j in needs[i]]
                                           for i_new, i in enumerate(ordered)}


def emit(runs, kind, folder=None, echo=print, partition=None, gpus_per_task=None, cpus_per_task=4, mem="32G",
         time_limit="24:00:00", max_parallel=None, name="dapt-sweep"):
    """Write (slurm) or print (commands) the unfinished runs of `runs` (finished ones are left out, unfinished ones
    resume; a run that names another run's folder comes after it). commands: one command line per run. slurm:
    <folder>/tasks.json (index -> run, the runs it needs), commands.txt (the command of each index), sweep.sbatch (a
    Slurm array: #SBATCH --array=0-(n-1), one run per index through `python sweep.py --task <folder> INDEX`, which
    waits for the runs it needs and adds --resume when its folder holds progress; its output in logs/JOB_INDEX.out)
    and logs/. gpus_per_task defaults to what the runs ask for (1, torchrun's process count; 0 when every run says
    --device cpu). Re-submitting after a failure (emit again, then sbatch) runs only what is left. -> the runs."""
    todo, needs = _scheduled(runs)
    if kind == "commands":
        for r in todo:
            echo(shlex.join(command(r, r.status == "unfinished")))
        return todo
    if not todo:
        echo(f"every run of the plan is finished: nothing to emit to {folder}")
        return todo
    folder = os.path.abspath(folder)
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    tasks = []
    for k, r in enumerate(todo):
        d, host = os.path.abspath(r.run_dir), r.args.cfg.get("host_run")
        outside = [os.path.abspath(host)] if host and os.path.abspath(host) not in needs[k] + [d] else []
        tasks.append(dict(index=k, line=r.line, run_dir=d, argv=r.argv, launcher=r.launcher, gpus=r.gpus,
                          needs=needs[k] + outside))
    files.write_json(os.path.join(folder, TASKS), dict(repo=os.path.dirname(TRAIN_PY), cwd=os.getcwd(), tasks=tasks),
                     indent=1)
    with open(os.path.join(folder, "commands.txt"), "w") as f:
        f.writelines(f"{shlex.join(command(r, r.status == 'unfinished'))}\n" for r in todo)
    cpu = all(r.args.device == "cpu" and "--device" in r.argv for r in todo)  # said on the line or by --device
    gpus = gpus_per_task if gpus_per_task is not None else 0 if cpu else max(r.gpus for r in todo)
    sbatch = os.path.join(folder, "sweep.sbatch")
    head = f"# a dapt sweep (python sweep.py ... --emit slurm): {len(todo)} runs, one per array index, in {TASKS}"
    run_index = (f"exec {shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))} --task "
                 f'{shlex.quote(folder)} "$SLURM_ARRAY_TASK_ID"')
    lines = ["#!/bin/bash", head, f"#SBATCH --job-name={name}",
             f"#SBATCH --array=0-{len(todo) - 1}" + (f"%{max_parallel}" if max_parallel else ""),
             *([f"#SBATCH --partition={partition}"] if partition else []),
             *([f"#SBATCH --gres=gpu:{gpus}"] if gpus else []),  # --gpus-per-task 0: CPU-only tasks
             f"#SBATCH --cpus-per-task={cpus_per_task}", f"#SBATCH --mem={mem}", f"#SBATCH --time={time_limit}",
             f"#SBATCH --output={os.path.join(folder, 'logs', '%A_%a.out')}",  # JOB_INDEX.out: a re-submission's own
             "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", run_index, ""]
    with open(sbatch, "w") as f:
        f.write("\n".join(lines))
    waits = sum(any(read_result(d) is None for d in t["needs"]) for t in tasks)
    echo(f"wrote {sbatch}: {len(todo)} runs (array 0-{len(todo) - 1}), "
         f"{len({os.path.abspath(r.run_dir) for r in runs}) - len(todo)} finished ones left out"
         + (f"; {waits} wait for the runs they name" if waits else "")
         + f". Submit: sbatch {sbatch}")
    return todo


def _failed_mark(folder, index):
    """The file that says task `index` of this array job (SLURM_ARRAY_JOB_ID; 'local' by hand) failed."""
    return os.path.join(folder, "logs", f"{os.environ.get('SLURM_ARRAY_JOB_ID', 'local')}_{index}.failed")


def task(folder, index, poll=30.0, echo=print):
    """Run the array index `index` of an emitted plan (what sweep.sbatch calls): wait until the runs it names are
    finished, then train it (with --resume when its folder holds progress). A run it needs that is neither finished,
    nor a task of the plan, nor being trained elsewhere, or whose task failed in this array job, is a RunError; a
    failed task leaves logs/JOB_INDEX.failed for the tasks that wait on it. -> the process's exit code."""
    spec = read_json(os.path.join(folder, TASKS), "sweep task list")
    tasks = spec["tasks"]
    if not str(index).isdigit() or int(index) >= len(tasks):
        raise ConfigError(f"task {index}: {folder} holds tasks 0-{len(tasks) - 1}")
    k, code, why = int(index), None, "stopped"
    t, of = tasks[k], {u["run_dir"]: u["index"] for u in tasks}
    if os.path.exists(_failed_mark(folder, k)):
        os.remove(_failed_mark(folder, k))  # a retry in the same job
    try:
        for need in t["needs"]:
            told = False
            while read_result(need) is None:
                j = of.get(need)
                if j is not None and os.path.exists(_failed_mark(folder, j)):
                    where = (f" (its log: {_failed_mark(folder, j)[:-len('.failed')]}.out)"
                             if "SLURM_ARRAY_JOB_ID" in os.environ else "")
                    raise RunError(f"task {k} ({t['run_dir']}) needs {need}, whose task {j} failed{where}")
                if j is None and RunLock.holder(need) is None:
                    raise RunError(f"task {k} ({t['run_dir']}) needs {need}, which is not finished, not in this plan "
                                   "and not being trained: train it first, or add it to the plan")
                if not told:
                    echo(f"task {k}: waiting for {need} (task {j}; every {poll:g} s)" if j is not None else
                         f"task {k}: waiting for {need} (trained by another process; every {poll:g} s)")
                    told = True
                time.sleep(poll)
        run = Run(t["line"], t["argv"], None, t["run_dir"], run_status(t["run_dir"]), t["launcher"], t["gpus"])
        cmd = command(run, run.status == "unfinished")
        echo(f"task {k}: {shlex.join(cmd)}")
        code = subprocess.call(cmd, cwd=spec.get("cwd"))
        why = f"exit code {code}"
        return code
    except RunError as e:
        why = str(e)
        raise
    finally:
        if code != 0:
            os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
            with open(_failed_mark(folder, k), "w") as f:
                f.write(f"{t['run_dir']}: {why}\n")


def sweep_main(argv):
    p = argparse.ArgumentParser(prog="sweep.py", allow_abbrev=False,
                                description="Train every run of one or more plan files (plans/*.txt); finished runs "
                                            "are skipped, unfinished ones resumed with --resume.")
    p.add_argument("plans", nargs="*", metavar="PLAN")
    p.add_argument("--root", default="DATA", help="data root for lines without --root (default DATA)")
    p.add_argument("--out", default="runs", help="run folders for lines without --out (default runs)")
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue unfinished runs (else they are skipped)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at a time, each in its own process (default: "
                   "the number of GPUs, else 1; toy runs use one thread each, so up to the number of cores)")
    p.add_argument("--gpus", help="GPU ids the jobs are spread over, e.g. 0,2,5 (default: every visible GPU; each "
                   "job gets its own as CUDA_VISIBLE_DEVICES, a torchrun line as many as it asks for)")
    p.add_argument("--emit", nargs="+", metavar=("slurm DIR | commands", ""), help="instead of training: write a Slurm "
                   "array job to DIR (one run per index; sbatch DIR/sweep.sbatch), or print one command per unfinished "
                   "run (for any other scheduler)")
    g = p.add_argument_group("--emit slurm")
    g.add_argument("--partition")
    g.add_argument("--gpus-per-task", type=int, help="#SBATCH --gres=gpu:N; default: what the plan's lines ask for "
                   "(1, or torchrun's count; 0 when every line runs with --device cpu)")
    g.add_argument("--cpus-per-task", type=int, default=4, help="default 4")
    g.add_argument("--mem", default="32G", help="per run (default 32G)")
    g.add_argument("--time", default="24:00:00", help="per run (Slurm's --time; default 24:00:00)")
    g.add_argument("--max-parallel", type=int, help="array tasks at a time (%%N)")
    p.add_argument("--task", nargs=2, metavar=("DIR", "INDEX"), help="run one index of an emitted plan (sweep.sbatch "
                   "calls this)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = p.parse_args(argv)
    try:
        if a.task:
            return task(*a.task, echo=lambda m: print(m, flush=True))  # before the child's own output
        if not a.plans:
            p.error("give one or more PLAN files (or --task DIR INDEX)")
        if a.emit and (a.emit[0] not in ("slurm", "commands") or len(a.emit) != (2 if a.emit[0] == "slurm" else 1)):
            raise ConfigError(f"--emit {' '.join(a.emit)}: expected --emit slurm DIR or --emit commands")
        gpu_ids = visible_gpus(a.gpus)
        jobs = a.jobs if a.jobs is not None else max(1, len(gpu_ids))
        if jobs < 1:
            p.error(f"--jobs must be >= 1, got {jobs}")
        if a.emit:
            runs = [r for plan in a.plans for r in plan_runs(plan, a.out, a.root, a.device)]
            emit(runs, a.emit[0], a.emit[1] if len(a.emit) > 1 else None, partition=a.partition,
                 gpus_per_task=a.gpus_per_task, cpus_per_task=a.cpus_per_task, mem=a.mem, time_limit=a.time,
                 max_parallel=a.max_parallel)
            return 0
        failed = []
        for plan in a.plans:
            failed += sweep(plan, a.out, a.root, a.device, a.resume, a.dry_run, jobs=jobs, gpus=gpu_ids)["failed"]
    except train.USER_ERRORS as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if failed:
        print(f"{len(failed)} run(s) failed: " + "; ".join(d for d, _ in failed), file=sys.stderr)
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    sys.exit(sweep_main(sys.argv[1:]))
