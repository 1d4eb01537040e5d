"""Sweeps: a paper's table as one command. `python sweep.py PLAN... [--resume] [--jobs N]` trains every run of the
plan files that is not finished, with one progress line per run.

A plan is a text file with one run per line, written as train.py arguments ('#' starts a comment; a line ending
in '\' goes on), and a small grid syntax:
  NAME = words      a variable: $NAME or ${NAME} in later lines is replaced by the words
  {a,b,c}           one run per value; several groups give every combination (the leftmost varies slowest)
  {key}             the value of --key in the same run once expanded ({seed}, {dataset}), or the sweep's {out}
                    and {root} (e.g. --host-run {out}/b2n/{dataset}/coop-fvg/shots16_seed{seed})
The sweep's --root, --out and --device apply to every line that does not give them. Finished runs (result.json)
are skipped, unfinished ones resumed with --resume; --jobs N trains N runs at a time, each in its own process.
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

import torch

import train
from prompting import ConfigError
from runs import read_json, run_dir_of

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

            def ref(m, given=given):
                if m.group(1) not in given:
                    raise ConfigError(f"{where}:{n}: {{{m.group(1)}}} refers to --{m.group(1)}, which this line does "
                                      "not set")
                return given[m.group(1)]
            runs.append((n, [re.sub(r"\{(\w+)\}", ref, t) for t in tokens]))
    return runs


# ----------------------------------------------------------------------------------------------------------
# running a plan


def run_status(run_dir):
    """done (result.json), unfinished (started: config.json or resume.pt, no result) or todo."""
    if os.path.exists(os.path.join(run_dir, "result.json")):
        return "done"
    if any(os.path.exists(os.path.join(run_dir, f)) for f in ("config.json", "resume.pt")):
        return "unfinished"
    return "todo"


def _summary(result):
    return " ".join(f"{k} {v:.2f}" for k, v in result["accuracy"].items() if isinstance(v, (int, float)))


def sweep(plan, out="runs", root="DATA", device=None, resume=False, dry_run=False, echo=print, jobs=1):
    """Train every run of a plan file that has no result yet, with one progress line per run (and an ETA from the
    runs trained so far), also appended to <out>/sweep.log. Every line is parsed and resolved before anything
    runs. jobs 1: one run after the other in this process; jobs N: N `python train.py` processes at a time (the
    first run trains alone, as it makes the shared caches; a run whose arguments name another run's folder, as
    --host-run does, waits for it). -> {"done": n, "trained": n, "failed": [(run dir, error)], "skipped": n}."""
    with open(plan) as f:
        text = f.read()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    planned, seen = [], {}
    for n, tokens in expand_plan(text, out, root, os.path.basename(plan)):
        argv = tokens + [x for flag, v in (("--root", root), ("--out", out), ("--device", device))
                         if flag not in tokens for x in (flag, v)]
        try:
            args = train.parse_args(argv)
        except SystemExit:  # argparse printed its message
            raise ConfigError(f"{plan}:{n}: cannot read the arguments {' '.join(tokens)}") from None
        except ConfigError as e:
            raise ConfigError(f"{plan}:{n}: {e}") from None
        d = run_dir_of(args.out, args.cfg)
        if d in seen:
            raise ConfigError(f"{plan}: lines {seen[d]} and {n} give the same run {d}; tell them apart with --tag")
        seen[d] = n
        planned.append((args, d, run_status(d), argv))
    to_train = [st == "todo" or (st == "unfinished" and resume) for _, _, st, _ in planned]
    counts = {s: sum(st == s for _, _, st, _ in planned) for s in ("done", "unfinished", "todo")}
    log_path = os.path.join(out, "sweep.log")

    def say(msg):
        echo(msg)
        if not dry_run:
            os.makedirs(out, exist_ok=True)
            with open(log_path, "a") as f:
                f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {msg}\n")
    say(f"sweep {plan}: {len(planned)} runs: {counts['done']} done, {counts['unfinished']} unfinished, "
        f"{counts['todo']} to train" + (" (dry run)" if dry_run else "")
        + (f", {jobs} at a time" if jobs > 1 and not dry_run else ""))
    stats, times, t_sweep = dict(done=0, trained=0, failed=[], skipped=0), [], time.time()
    heads = [f"[{i + 1}/{len(planned)}] {d}:" for i, (_, d, _, _) in enumerate(planned)]
    for i, (args, d, st, _) in enumerate(planned):
        if st == "done":
            stats["done"] += 1
            say(f"{heads[i]} done")
        elif not to_train[i]:
            stats["skipped"] += 1
            say(f"{heads[i]} unfinished, skipped (pass --resume to continue it)")
        elif dry_run:
            say(f"{heads[i]} would {'resume' if st == 'unfinished' else 'train'}")
    if dry_run:
        return stats

    def finished(i, result=None, error=None, seconds=0.0):
        st = planned[i][2]
        if error:
            stats["failed"].append((planned[i][1], error))
            what = f"FAILED ({error.splitlines()[0] if error else ''})"
        else:
            stats["trained"] += 1
            times.append(seconds)
            what = f"{'resumed' if st == 'unfinished' else 'trained'} in {seconds:.0f}s, {_summary(result)}"
        left = len(todo) + len(running)
        # ETA: the mean run time so far, shared by the workers
        eta = (datetime.timedelta(seconds=int(statistics.fmean(times) * left / max(1, min(jobs, left or 1))))
               if times else "?")
        say(f"{heads[i]} {what} | {left} to go, ETA {eta}")

    todo, running = [i for i in range(len(planned)) if to_train[i]], {}
    if jobs <= 1:
        while todo:
            i = todo.pop(0)
            args, d, st, _ = planned[i]
            t0 = time.time()
            try:
                result = train.train(args.cfg, root=args.root, out=args.out, device=args.device, resume=st == "unfinished")
            except KeyboardInterrupt:
                say(f"{heads[i]} interrupted; run the sweep again with --resume to continue")
                raise
            except Exception as e:  # one failed run (an error, a NaN, out of memory) does not stop the table
                log.exception("sweep: %s failed", d)
                finished(i, error=f"{type(e).__name__}: {e}")
            else:
                finished(i, result, seconds=time.time() - t0)
    else:
        _sweep_parallel(planned, todo, running, jobs, finished, say, heads)
    say(f"sweep {plan}: {stats['done']} were done, {stats['trained']} trained, {len(stats['failed'])} failed, "
        f"{stats['skipped']} unfinished skipped ({time.time() - t_sweep:.0f}s)")
    return stats


def _sweep_parallel(planned, todo, running, jobs, finished, say, heads):
    """The jobs > 1 loop of sweep: child processes `python train.py ARGS` (their log goes to the run folder's
    log.txt; stdout and stderr to <run folder>.sweep.txt, removed when the run succeeds)."""
    dirs = [d for _, d, _, _ in planned]
    names = lambda t, d: os.path.normpath(t) == os.path.normpath(d)  # noqa: E731  (an argument that is a run folder)
    needs = {i: [j for j, d in enumerate(dirs) if j != i and any(names(t, d) for t in planned[i][3])] for i in todo}
    ok = {i for i, (_, _, st, _) in enumerate(planned) if st == "done"}
    failed, first = set(), True
    try:
        while todo or running:
            for i in [i for i in todo if any(j in failed for j in needs[i])]:
                todo.remove(i)
                failed.add(i)
                gone = ", ".join(dirs[j] for j in needs[i] if j in failed)
                finished(i, error=f"RunError: a run it needs failed ({gone})")
            ready = [i for i in todo if all(j in ok for j in needs[i])]
            while ready and len(running) < (1 if first else jobs):
                i = ready.pop(0)
                todo.remove(i)
                argv = planned[i][3] + (["--resume"] if planned[i][2] == "unfinished" else [])
                os.makedirs(os.path.dirname(dirs[i]), exist_ok=True)
                out = open(dirs[i] + ".sweep.txt", "w")
                running[i] = (subprocess.Popen([sys.executable, TRAIN_PY, *argv], stdout=out,
                                               stderr=subprocess.STDOUT), out, time.time())
            if not running and todo:  # waiting on runs that can never start (not in this plan, not done)
                for i in list(todo):
                    todo.remove(i)
                    finished(i, error="RunError: the run folder(s) it names are not finished: "
                                      + ", ".join(dirs[j] for j in needs[i] if j not in ok))
                break
            time.sleep(0.2)
            for i, (proc, out, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[i]
                out.close()
                first = False
                path = dirs[i] + ".sweep.txt"
                if proc.returncode == 0 and os.path.exists(os.path.join(dirs[i], "result.json")):
                    ok.add(i)
                    os.remove(path)
                    finished(i, read_json(os.path.join(dirs[i], "result.json"), "run result"), seconds=time.time() - t0)
                else:
                    failed.add(i)
                    with open(path) as f:
                        lines = [ln.strip() for ln in f if ln.strip()]
                    last = lines[-1] if lines else "no output"
                    finished(i, error=f"exit code {proc.returncode}: {last} (all of it: {path})")
    except KeyboardInterrupt:
        for proc, _, _ in running.values():
            proc.terminate()  # its resume.pt holds the last finished epoch
        for i, (proc, _, _) in running.items():
            proc.wait()
            say(f"{heads[i]} interrupted; run the sweep again with --resume to continue")
        raise


def sweep_main(argv):
    p = argparse.ArgumentParser(prog="sweep.py", allow_abbrev=False,
                                description="Train every run of one or more plan files (plans/*.txt); finished runs "
                                            "are skipped, unfinished ones resumed with --resume.")
    p.add_argument("plans", nargs="+", metavar="PLAN")
    p.add_argument("--root", default="DATA", help="data root for lines without --root (default DATA)")
    p.add_argument("--out", default="runs", help="run folders for lines without --out (default runs)")
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue unfinished runs (else they are skipped)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time, each in its own process (default 1; "
                   "toy runs use one thread each, so up to the number of cores)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    failed = []
    try:
        for plan in a.plans:
            failed += sweep(plan, a.out, a.root, a.device, a.resume, a.dry_run, jobs=a.jobs)["failed"]
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
