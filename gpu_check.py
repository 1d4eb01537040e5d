"""The first command on a GPU machine: the test suite and the benchmark report, results in one folder, within 8
minutes, with the machine's own python (no network, nothing installed).

    python3 gpu_check.py                    # writes gpu-report/; commit that folder
    python3 gpu_check.py --only gpu bench   # again, only the GPU tests and the report (e.g. after a fix)

What it does (times on one H100 with 16 cores; the minutes are a hard limit, the parts are cut to fit):
1. environment.txt: python, torch and its CUDA, triton, numpy, the GPU (nvidia-smi), and `pip install --dry-run
   --no-index -r requirements.txt`, which must find everything installed and install nothing (a few seconds);
2. two pytest processes at once: `cpu`, the suite as on a machine without a GPU (`-m "not gpu and not any_device"`:
   tests/conftest.py keeps those tests on the CPU; 2-3 minutes), and `gpu`, the tests that run on CUDA (`-m "gpu or
   any_device"`: tests/test_gpu_*.py and test_kernels.py; the toy runs write toy_runs.json here; 2-3 minutes,
   mostly compiling kernels); each writes pytest-<group>.txt (its output) and .xml (JUnit);
3. when `gpu` is done: `python -m kernels.bench --report` into this folder with the time left (at most its default
   360 s; 4-5 minutes here), which rewrites bench-<date>-<gpu>.md / .json after every table (bench.txt: its output);
4. summary.md: per group the passed / failed / skipped counts and the failures by name, the toy runs' loss
   differences and peak memory, the report's files, the times; the exit status is 0 only if nothing failed.
A group still running at its limit is stopped (its output so far is kept and the summary says so). Without pytest
the suite cannot run (installing it needs the network): the summary says so and the report still runs. Without a
GPU it runs all the same (the GPU tests skip, the report times the CPU): a dry run of this script.
Left out: installing or downloading anything, retries, more than one GPU.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.abspath(__file__))
GROUPS = {"cpu": "not gpu and not any_device", "gpu": "gpu or any_device"}


def run(cmd, **kw):
    """stdout + stderr of a short command, or why it could not run."""
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, **kw)
        failed = "" if done.returncode == 0 else f"\n(exit status {done.returncode})"
        return (done.stdout + done.stderr).strip() + failed
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{cmd[0]}: {e}"


def environment(out):
    """environment.txt; returns a dict for the summary."""
    code = ("import torch, json; c = torch.cuda.is_available(); print(json.dumps(dict(torch=torch.__version__, "
            "cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0) if c else None, capability="
            "torch.cuda.get_device_capability(0) if c else None, memory_gib=round(torch.cuda.get_device_properties(0)"
            ".total_memory / 2**30, 1) if c else None)))")
    info = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout)
    for name in ("triton", "numpy", "PIL", "pytest"):
        spec = importlib.util.find_spec(name)
        info[name] = None
        if spec is not None:
            info[name] = run([sys.executable, "-c", f"import {name}; print({name}.__version__)"]).splitlines()[-1]
    info["python"] = platform.python_version()
    pip = run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-r", "requirements.txt"])
    info["requirements"] = ("satisfied, nothing to install" if "Would install" not in pip and "exit status" not in pip
                            else "NOT satisfied: see environment.txt")
    with open(os.path.join(out, "environment.txt"), "w") as f:
        f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')}\n{json.dumps(info, indent=1)}\n\n"
                f"$ nvidia-smi\n{run(['nvidia-smi'])}\n\n"
                f"$ pip install --dry-run --no-index -r requirements.txt\n{pip}\n")
    return info


def start(cmd, log_path, env=None):
    """A child in its own process group (so a stop reaches its own children: torchrun, toy runs), output to a file."""
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(proc, started, until):
    """Wait for proc until the time `until` (time.monotonic()); stop it there. -> 'done after N s' | 'stopped at
    the limit after N s'."""
    try:
        proc.wait(timeout=max(until - time.monotonic(), 1))
        how = "done"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        how = "stopped at the limit"
    return f"{how} after {time.monotonic() - started:.0f} s"


def junit(path):
    """(counts, failed test names) of a pytest JUnit file; (None, []) where it was not written."""
    if not os.path.isfile(path):
        return None, []
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return counts, failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-report", help="the folder for every result (default gpu-report)")
    p.add_argument("--minutes", type=float, default=8.0, help="hard limit for the whole check (default 8)")
    p.add_argument("--only", nargs="+", choices=["cpu", "gpu", "bench"], default=["cpu", "gpu", "bench"],
                   help="run only these parts (default: all)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    end = t0 + 60 * args.minutes - 20  # 20 s for the summary
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    info = environment(out)
    print(f"gpu_check: {info.get('gpu') or 'no GPU (a dry run)'}, torch {info['torch']}, triton {info['triton']}; "
          f"requirements.txt {info['requirements']}; results in {out}", flush=True)
    lines, status, procs = [], {}, {}
    have_pytest = info["pytest"] is not None
    if "gpu" in args.only and os.path.isfile(os.path.join(out, "toy_runs.json")):
        os.remove(os.path.join(out, "toy_runs.json"))  # the toy runs add to it: an earlier check's would mix in
    env = dict(os.environ, DAPT_GPU_REPORT=out, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py decides: the interpreter only where there is no GPU
    for group in [g for g in ("gpu", "cpu") if g in args.only]:
        if not have_pytest:
            status[group] = "not run: pytest is not installed (installing it needs the network)"
            continue
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "-m", GROUPS[group],
               "--junitxml", os.path.join(out, f"pytest-{group}.xml"),
               "--basetemp", tempfile.mkdtemp(prefix=f"gpu_check_{group}_"), "tests"]  # the two apart
        procs[group] = (start(cmd, os.path.join(out, f"pytest-{group}.txt"), env), time.monotonic())
        print(f"gpu_check: pytest -m '{GROUPS[group]}' started (pytest-{group}.txt)", flush=True)
    bench_seconds = 0
    if "bench" in args.only:  # the GPU group first (the report's kernels are then compiled), 150 s kept for it
        if "gpu" in procs:
            status["gpu"] = finish(*procs["gpu"], end - 150)
        bench_seconds = int(min(360, end - time.monotonic() - 30))
        cmd = [sys.executable, "-m", "kernels.bench", "--report", "--out", out, "--budget", str(bench_seconds)]
        print(f"gpu_check: python -m kernels.bench --report --budget {bench_seconds} (bench.txt)", flush=True)
        tb = time.monotonic()
        status["bench"] = finish(start(cmd, os.path.join(out, "bench.txt"), env), tb, tb + bench_seconds + 30)
    for group, (proc, started) in procs.items():
        if group not in status:
            status[group] = finish(proc, started, end)
    ok = True
    lines += [f"# gpu_check, {datetime.date.today().isoformat()}", "",
              f"{info.get('gpu') or 'no GPU'} (compute capability {info.get('capability')}, {info.get('memory_gib')} "
              f"GiB), torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, numpy {info['numpy']}, "
              f"Python {info['python']}; requirements.txt: {info['requirements']}. Whole check: "
              f"{time.monotonic() - t0:.0f} s (limit {60 * args.minutes:.0f} s).", ""]
    ok &= info["requirements"].startswith("satisfied")
    for group in [g for g in ("cpu", "gpu") if g in args.only]:
        counts, failed = junit(os.path.join(out, f"pytest-{group}.xml"))
        lines.append(f"## pytest -m '{GROUPS[group]}': {status[group]}")
        if counts is None:
            ok = False
            lines += ["", "No JUnit file: see " + (f"pytest-{group}.txt" if have_pytest else "above"), ""]
            continue
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        lines += ["", f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped "
                  f"(pytest-{group}.txt has the reasons)", ""] + [f"- FAILED {name}" for name in failed]
        ok &= not failed and status[group].startswith("done")
    toy = os.path.join(out, "toy_runs.json")
    if os.path.isfile(toy):
        with open(toy) as f:
            runs = json.load(f)
        lines += ["", "## toy runs: bfloat16 on CUDA against float32 on the CPU (tests/test_gpu_runs.py)", "",
                  "| family | loss rel. diff per epoch | peak MiB per step | s per epoch |", "|---|---|---|---|"]
        for family, r in runs.items():
            lines.append(f"| {family} | {', '.join(f'{d:.4f}' for d in r['loss_rel_diff'])} | "
                         f"{max(e['peak_mib'] for e in r['cuda_epochs']) if r['cuda_epochs'] else '-'} | "
                         f"{', '.join(str(e['seconds']) for e in r['cuda_epochs'])} |")
    if "bench" in args.only:
        written = sorted(f for f in os.listdir(out) if f.startswith("bench-") and f.endswith(".md"))
        lines += ["", f"## python -m kernels.bench --report --budget {bench_seconds}: {status['bench']}", "",
                  f"Files: {', '.join(written) or 'none (see bench.txt)'}. Paste the .md block into BENCHMARKS.md."]
        ok &= bool(written) and status["bench"].startswith("done")
    lines += ["", "Commit this folder (gpu-report/) as it is.", ""]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
