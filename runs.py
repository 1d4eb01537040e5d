"""A run folder: what train.py writes there and how a run is read back; random states; torchrun's processes.

    <out>/<setting>/<dataset>/<method><tag>/shots<K>_seed<S>/
        config.json     every constant the run resolved to (written first)   log.txt        the log (appended)
        metrics.jsonl   one line per finished epoch                          checkpoint.pt  the reported model
        resume.pt       the last epoch: parameters, optimizer, random states best.pt        best_val selection
        result.json     written last: the run is finished                    train.lock     held while training

What is here: the folder's state for a command (new, resume, finished; a changed config is an error), its lock,
logging into it, every write atomic and on rank 0 only, the random states a run seeds and resume.pt carries,
`load_run` (a trained run, ready for inference, without any training code), the end-of-run summary, and the
helpers of a run spread over several processes by torchrun (rank 0 reads and writes the folder).
Deliberately not here: training (train.py), what a model is (classic.py, dapt.py), tables (eval.py).
"""
import contextlib
import datetime
import json
import logging
import os
import platform
import random
import re
import sys

try:
    import fcntl  # the run folder's lock (Linux, macOS)
except ImportError:  # pragma: no cover
    fcntl = None
try:
    import triton  # its version is recorded
except ImportError:  # pragma: no cover
    triton = None

import numpy
import PIL
import torch
import torch.distributed as dist

import files
from clip_load import load_clip
from dapt import build_model
from files import CheckpointError
from prompting import ConfigError
from toy import toy_clip

log = logging.getLogger("dapt")


class RunError(RuntimeError):
    """A run that cannot start or go on (its folder, a non-finite loss); the message says what to do."""


class NonFiniteLoss(RunError):
    pass


# ----------------------------------------------------------------------------------------------------------
# the folder: its path, atomic files (rank 0 only), logging, its state for a command, its lock


def run_dir_of(out, cfg):
    amount = f"frac{cfg['data_fraction']:g}" if cfg.get("data_fraction", 1.0) < 1 else f"shots{cfg['shots']}"
    return os.path.join(out, cfg["setting"], cfg["dataset"], cfg["method"] + cfg["tag"], f"{amount}_seed{cfg['seed']}")


def atomic_save(obj, path):
    """torch.save, atomically (files.save_torch); under torchrun only rank 0 writes (every run file goes through
    here or write_json)."""
    if is_main():
        files.save_torch(obj, path)


def write_json(path, obj):
    """A run folder's JSON file (indented), atomically, on rank 0 only."""
    if is_main():
        files.write_json(path, obj, indent=1)


def read_json(path, what="file"):
    """A JSON file of a run folder; RunError naming the file if it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path}: no such {what}") from None
    except ValueError as e:
        raise RunError(f"{path}: not a readable JSON {what} ({e})") from None


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record is written (not as it was when the handler was made)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


class Warnings(logging.Handler):
    """Keeps the warnings logged during a run (result.json and the end summary list them: nothing only in the log)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


def run_warnings():
    """The warnings logged since setup_logging, in order, each once."""
    return [m for h in log.handlers if isinstance(h, Warnings) for m in h.messages]


def setup_logging(run_dir):
    """Human-readable log: run_dir/log.txt and stderr (info and up), until close_logging (the end of the run); the
    warnings are kept for the result (run_warnings)."""
    log.setLevel(logging.INFO)
    close_logging()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.FileHandler(os.path.join(run_dir, "log.txt")), _Stderr(), Warnings()]
    for h in handlers:
        h.setFormatter(fmt)
        h._dapt_run = True
        log.addHandler(h)


def close_logging():
    """Detach the run's handlers: what is logged after a run never lands in its log.txt."""
    for h in list(log.handlers):
        if getattr(h, "_dapt_run", False):
            log.removeHandler(h)
            h.close()


def log_to_file(level, message):
    """A record for the run's log.txt only (for what the command line prints itself)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for h in log.handlers:
        if getattr(h, "_dapt_run", False) and isinstance(h, logging.FileHandler):
            h.handle(record)


# config.json holds the run config plus what it resolved to; these keys describe the machine and the data
# copy, not the run, and may differ when a run is resumed or its command repeated.
RECORD_ONLY = ("root", "device", "transform_train", "transform_test", "trainable_values", "benchmark", "versions",
               "attention_resolved", "world_size", "clip_sha256")


def precision_of(cfg, device):
    """(name, weights dtype, autocast dtype or None, loss scaling) — protocol §6: fp32 on the CPU."""
    p = cfg["precision"]
    if p == "auto":
        p = "bf16" if str(device).startswith("cuda") else "fp32"
    if p not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision {p!r}: expected auto, fp32, bf16 or fp16")
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[p]
    return p, dtype, (None if p == "fp32" else dtype), p == "fp16"


def config_changes(cfg, saved, device):
    """{key: (value in the run's config.json, value now)} for every key that differs (the resolved precision
    too, since it follows the device)."""
    now = json.loads(json.dumps(dict(cfg, precision_resolved=precision_of(cfg, device)[0]), default=str))
    then = {k: v for k, v in saved.items() if k not in RECORD_ONLY}
    absent = "(absent)"
    return {k: (then.get(k, absent), now.get(k, absent)) for k in sorted(set(now) | set(then))
            if then.get(k, absent) != now.get(k, absent)}


def read_result(run_dir):
    """result.json of a run folder as a dict, or None when it is missing or unreadable (a run is finished only with a
    readable result; an empty or broken one is reported by the callers and the run evaluated again)."""
    path = os.path.join(run_dir, "result.json")
    if not os.path.exists(path):
        return None
    try:
        result = read_json(path, "run result")
    except RunError as e:
        log.warning("%s: the run is evaluated again (add --resume)", e)
        return None
    return result if isinstance(result, dict) and isinstance(result.get("accuracy"), dict) else None


def data_changes(saved, identity):
    """{key: (in the run, now)} for the data identity (data.identity: dataset folder, split sha256) of a run's
    config.json (its "benchmark" entry) against `identity()`, which is called only when the run records one."""
    then = {k: (saved.get("benchmark") or {}).get(k) for k in ("dataset_dir", "split_sha256")}
    if identity is None or not any(then.values()):
        return {}
    now = identity()
    return {k: (then[k], now[k]) for k in then if then[k] is not None and then[k] != now[k]}


def folder_state(run_dir, cfg, device, resume, identity=None):
    """What a run folder holds for this command, reading only: "new" (nothing, or a run that never finished an
    epoch: it starts over), "resume" (--resume on a run with finished epochs) or "finished" (a readable result.json;
    the same config). What identifies a run: its config keys (not RECORD_ONLY) and its data, identity() -> the
    dataset folder and the split file's sha256 (data.identity). Raises RunError for a changed config or data of a
    run with progress or with --resume (listing the keys), for an unfinished run without --resume, and when another
    process holds the folder's lock."""
    cfg_path = os.path.join(run_dir, "config.json")
    holder = RunLock.holder(run_dir)
    if holder:
        raise RunError(f"{run_dir}: another process (pid {holder}) is training or evaluating in this folder (it holds "
                       f"{os.path.join(run_dir, 'train.lock')}); wait for it to end, or use --tag or --out")
    finished = read_result(run_dir) is not None
    progress = os.path.exists(os.path.join(run_dir, "resume.pt"))
    if not os.path.exists(cfg_path):
        if finished or progress:
            raise RunError(f"{run_dir} holds a run's files but no config.json, so this command cannot tell whether it "
                           "is the same run; nothing was changed: use --tag or --out, or restore config.json")
        return "new"
    saved = read_json(cfg_path, "run config")
    changes = config_changes(cfg, saved, device)
    if resume or progress or finished:
        changes.update(data_changes(saved, identity))
    if changes and (resume or progress or finished):
        listed = "; ".join(f"{k} {a!r} in the run, {b!r} now" for k, (a, b) in changes.items())
        what = "finished run" if finished else "run"
        raise RunError(f"{run_dir} holds a {what} with another config ({listed}). Nothing was changed: a run keeps "
                       "the config and data it started with; use --tag or --out for a new run"
                       + ("; re-evaluate a finished run with python eval.py run RUN_DIR" if finished else ""))
    if finished:
        return "finished"
    if progress and not resume:
        done = len(read_metrics(run_dir))
        raise RunError(f"{run_dir} holds an unfinished run ({done} of {cfg['epochs']} epochs done): add --resume to "
                       "continue it, or use --tag or --out for a new run")
    return "resume" if progress else "new"


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished_result(run_dir):
    result = read_json(os.path.join(run_dir, "result.json"), "run result")
    return dict(result, run_dir=run_dir, already_finished=True)


def open_run(run_dir, state, resume):
    """Logging to the run folder's log.txt (appended); says what the folder held."""
    setup_logging(run_dir)
    for name in os.listdir(run_dir):  # what a kill during an atomic write left (files.atomic_write's <file>.tmp<pid>)
        if re.fullmatch(r".+\.tmp\d+", name):
            os.remove(os.path.join(run_dir, name))
    if state == "resume":
        log.info("resuming the run in %s", run_dir)
    elif os.path.exists(os.path.join(run_dir, "config.json")):
        for name in ("metrics.jsonl", "checkpoint.pt", "best.pt"):  # what an unfinished first epoch left
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
        log.info("%s held a run that finished no epoch: starting it over%s", run_dir,
                 " (--resume: nothing to resume)" if resume else "")


class RunLock:
    """An exclusive lock on <run_dir>/train.lock while a process trains there (fcntl.flock: the system releases
    it when the process ends, however it ends). A second process gets a RunError naming the holder's pid."""

    def __init__(self, run_dir):
        self.run_dir, self.path, self.file = run_dir, os.path.join(run_dir, "train.lock"), None

    def __enter__(self):
        os.makedirs(self.run_dir, exist_ok=True)
        if fcntl is None:
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip()
            self.file.close()
            raise RunError(f"{self.run_dir}: another process{f' (pid {holder})' if holder else ''} is training or "
                           f"evaluating in this folder (it holds {self.path}); wait for it to end, or use --tag or "
                           "--out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()

    @staticmethod
    def holder(run_dir):
        """The pid (text) of another process holding run_dir's lock, or None (this process's own lock included);
        creates nothing."""
        path = os.path.join(run_dir, "train.lock")
        if fcntl is None or not os.path.exists(path):
            return None
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                pid = f.read().strip()
                return None if pid == str(os.getpid()) else (pid or "unknown")  # this process's own lock is fine
            fcntl.flock(f, fcntl.LOCK_UN)
        return None


@contextlib.contextmanager
def torch_threads(n):
    """torch.set_num_threads(n) inside the block (0: torch's default, untouched), the previous count after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def versions(device):
    v = dict(python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__,
             pillow=PIL.__version__, platform=platform.platform(),
             cpu_capability=torch.backends.cpu.get_cpu_capability())  # the CPU kernels torch chose: another, other bits
    v["triton"] = triton.__version__ if triton is not None else None
    if str(device).startswith("cuda"):
        v["gpu"] = torch.cuda.get_device_name(device)
    return v


# ----------------------------------------------------------------------------------------------------------
# random states: a run seeds them right before its model is built, and resume.pt carries them


def seed_everything(seed):
    """torch (CPU and every CUDA device), numpy and Python's random, from the run seed."""
    torch.manual_seed(seed)
    numpy.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(device):
    """Every random state a run draws from, as tensors, lists and numbers (resume.pt loads with weights_only)."""
    kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = dict(torch=torch.get_rng_state(),
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(numpy.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), gauss=float(gauss)),
                 python=dict(version=version, internal=list(internal), gauss_next=gauss_next))
    if str(device).startswith("cuda") and torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    n, p = state["numpy"], state["python"]
    numpy.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(numpy.uint32), n["pos"], n["has_gauss"],
                            n["gauss"]))
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


@contextlib.contextmanager
def kept_rng(device):
    """Work inside the block leaves every random state as it found it (set-up whose draws could depend on
    caches must not shift the run's)."""
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state)


# ----------------------------------------------------------------------------------------------------------
# torchrun --nproc_per_node N train.py ... trains one run in N processes: every process holds the model and takes its
# part of each global batch, DistributedDataParallel averages the gradients, rank 0 reads and writes the run folder


def world():
    """(rank, number of processes): (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    return world()[0] == 0


# How long a collective may wait for the other processes: rank 0 alone makes what is missing on first use (toy data,
# the toy CLIP when it is not shipped, few-shot splits, feature caches) while the others wait in a broadcast, which
# the backends' default (10 minutes for NCCL) could end. $DAPT_DIST_TIMEOUT_MIN sets it.
DIST_TIMEOUT_MIN = 120


def start_parallel(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on the CPU) with a collective
    timeout of DIST_TIMEOUT_MIN minutes (logged); on CUDA each process takes the GPU of its LOCAL_RANK. Returns this
    process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    minutes = float(os.environ.get("DAPT_DIST_TIMEOUT_MIN", DIST_TIMEOUT_MIN))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))
    if is_main():
        print(f"torchrun: {dist.get_world_size()} processes ({dist.get_backend()}), collective timeout {minutes:g} min "
              "($DAPT_DIST_TIMEOUT_MIN)", file=sys.stderr, flush=True)
    return device


def stop_parallel():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_main(fn):
    """fn() on rank 0 (the one that reads and writes the run folder), its value (or its error) on every rank."""
    if world()[1] == 1:
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # the other ranks raise the same error instead of waiting forever
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def all_sum(t):
    """Sum of a tensor over the processes, in place (the tensor itself outside torchrun); it travels through the
    backend's device (CUDA for NCCL, the CPU for gloo)."""
    if world()[1] > 1:
        moved = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(moved)
        if moved is not t:
            t.copy_(moved)
    return t


# ----------------------------------------------------------------------------------------------------------
# a trained run, ready for inference: rebuilt from its checkpoint alone (no training code)


def read_run_file(path, device="cpu"):
    """checkpoint.pt / best.pt / resume.pt of a run folder, read with torch.load(weights_only=True): plain dicts,
    lists, tensors, numbers and strings only, so a planted file cannot run code (errors name the file)."""
    state = files.load_torch_file(path, map_location=device,
                                  expected="a checkpoint.pt / best.pt / resume.pt written by train.py")
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        raise CheckpointError(f"{path}: not a run file of train.py (expected a dict with the trained 'params')")
    return state


def restore(model, state, path):
    """model.load_checkpoint(state) with the file named when it does not fit the model."""
    try:
        model.load_checkpoint(state)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: does not fit the {type(model).__name__} model of this config ({e})") from None


def clip_weights(cfg, root):
    """What load_clip reads for a run's `clip` key: a name or a path; "toy" = the shipped toy CLIP (toy.toy_clip:
    assets/toy_clip.safetensors, its sha256 checked)."""
    return toy_clip() if cfg["clip"] == "toy" else cfg["clip"]


def run_clip(cfg, root=None, device="cpu", dtype=None):
    """The CLIP a run was trained on (clip_weights). dtype None: float32 on the CPU; elsewhere the run's precision
    (bfloat16 for auto, as train.py)."""
    name = clip_weights(cfg, root)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else \
            {"fp32": torch.float32, "fp16": torch.float16}.get(cfg.get("precision"), torch.bfloat16)
    clip = load_clip(name, device=device, dtype=dtype)
    clip.set_attention(cfg.get("attn", "auto"))
    return clip


def _host_run_dir(host_run, run_dir):
    """An fvgpt run's host folder: as recorded (relative to where training ran), else found from an ancestor of
    the fvgpt run's folder (a runs/ tree moved or read from another working directory)."""
    if os.path.isfile(os.path.join(host_run, "checkpoint.pt")) or run_dir is None or os.path.isabs(host_run):
        return host_run
    here = os.path.abspath(run_dir)
    while os.path.dirname(here) != here:
        here = os.path.dirname(here)
        for depth in range(len(host_run.split(os.sep))):  # drop leading parts: runs/b2n/... under another root
            candidate = os.path.join(here, *host_run.split(os.sep)[depth:])
            if os.path.isfile(os.path.join(candidate, "checkpoint.pt")):
                return candidate
    return host_run


def host_model(cfg, clip, classnames, run_dir=None):
    """The frozen first-stage model of an fvgpt run: its host run's checkpoint (cfg["host_run"]) on `clip`, checked
    to be a finished run on the same data and backbone."""
    host_dir = _host_run_dir(cfg["host_run"], run_dir)
    path = os.path.join(host_dir, "checkpoint.pt")
    if not cfg["host_run"] or not os.path.exists(path):
        raise ConfigError(f"fvgpt needs --host-run RUN_DIR, a finished run folder of train.py holding checkpoint.pt "
                          f"(got {cfg['host_run']!r}); train the host first, e.g. --method coop --subsample base")
    ckpt = read_run_file(path, clip.logit_scale.device)
    host_cfg = ckpt.get("config")
    if not isinstance(host_cfg, dict) or "method" not in host_cfg:
        raise RunError(f"{path}: holds no run config; expected the checkpoint.pt of a finished train.py run")
    if host_cfg["method"] == "fvgpt":
        raise ConfigError(f"{cfg['host_run']}: the host of fvgpt cannot be an fvgpt run")
    if cfg.get("fvg_host_recipe") and cfg["fvg_host_recipe"] != host_cfg["method"]:
        raise ConfigError(f"fvgpt --fvg-host-recipe {cfg['fvg_host_recipe']} but the host run {cfg['host_run']} is "
                          f"{host_cfg['method']}")
    for key, default in (("dataset", None), ("subsample", None), ("shots", None), ("seed", None), ("clip", None),
                         ("data_fraction", 1.0)):
        if host_cfg.get(key, default) != cfg.get(key, default):
            raise ConfigError(f"fvgpt: {key} = {cfg.get(key)!r} but the host run {cfg['host_run']} has "
                              f"{host_cfg.get(key, default)!r}; stage 2 trains on the host's data and backbone")
    return model_of_checkpoint(ckpt, clip, classnames, host_dir, path)


def model_of_checkpoint(ckpt, clip, classnames=None, run_dir=None, path=None):
    """The prompt model of a checkpoint dict of train.py (params, config, classnames, extra) on `clip`, its
    learned state restored, prompt parameters in float32, eval mode. FVG-PT is composed with its host run's model."""
    cfg, classnames = ckpt["config"], list(classnames or ckpt["classnames"])
    host = host_model(cfg, clip, classnames, run_dir) if cfg["method"] == "fvgpt" else None
    model = build_model(cfg["method"], clip, classnames, cfg, host=host).to(clip.logit_scale.device)
    for p in model.parameters():  # as train.py builds it: prompt parameters in float32
        if p.requires_grad:
            p.data = p.data.float()
    restore(model, ckpt, path or os.path.join(run_dir or ".", "checkpoint.pt"))
    return model.eval()


def load_run(run_dir, device="cpu", root=None, dtype=None):
    """A trained run of train.py (its folder) -> the PromptModel, ready for inference on its own classes
    (model.set_classnames(names) for others; model(images) -> logits). The CLIP is the run's (`run_clip`; a
    toy run's the shipped toy CLIP; `root`, defaulting to the data root recorded in config.json, is where the run's
    data is). Every file is read with torch.load(weights_only=True). model.run_dir, model.run_root and model.cfg
    describe the run."""
    ckpt = read_run_file(os.path.join(run_dir, "checkpoint.pt"), device)
    if not isinstance(ckpt, dict) or not {"params", "config", "classnames"} <= set(ckpt):
        raise CheckpointError(f"{os.path.join(run_dir, 'checkpoint.pt')} is not a checkpoint of train.py "
                              "(expected params, config and classnames)")
    if root is None and os.path.isfile(os.path.join(run_dir, "config.json")):
        root = read_json(os.path.join(run_dir, "config.json"), "run config").get("root")
    model = model_of_checkpoint(ckpt, run_clip(ckpt["config"], root, device, dtype), run_dir=run_dir)
    model.run_dir, model.run_root = run_dir, root
    return model


# ----------------------------------------------------------------------------------------------------------
# the end of a run, for a person

# A trained run this many points below zero-shot CLIP on the same test images has collapsed on those classes (the
# toy, seeds 1-9: CoOp loses up to 10.2 points on new classes, 12.7 on their test_corr images; the collapses seen,
# CoCoOp seed 6 and MaPLe seed 4, lose 18.5 and 21.3 on new classes; docs/toy.md).
ZERO_SHOT_MARGIN = 15.0


def below_zero_shot(accuracy, reference, margin=ZERO_SHOT_MARGIN):
    """[(subset, accuracy, zero-shot accuracy)] of the subsets (base, new, all and their further splits; not hm)
    whose accuracy is more than `margin` points below the zero-shot reference on the same images."""
    return [(k, a, reference[k]) for k, a in accuracy.items()
            if k != "hm" and isinstance(a, (int, float)) and k in reference and reference[k] - a > margin]


def describe(result):
    """The end of a run, for a person: what each number is, the zero-shot reference, warnings, the folder."""
    acc, images, names = result["accuracy"], result.get("test_images", {}), result.get("classnames", {})
    cfg = result.get("config", {})
    lines = []
    if result.get("already_finished"):
        lines.append("this run had already finished: nothing was retrained or rewritten (python eval.py run RUN_DIR "
                     "evaluates it again)")
    amount = (f"{result['data_fraction']:g} of the training data" if result.get("data_fraction", 1) < 1
              else f"{result['shots']} shots")
    trained = (f"epoch {result['selected_epoch']} of {cfg['epochs']}" if result.get("selected_epoch")
               else "no training")
    lines.append(f"{result['method']}{result.get('tag') or ''} on {result['dataset']} ({result['setting']}, {amount}, "
                 f"seed {result['seed']}, {trained}): top-1 accuracy in % on the test split")
    w = max(map(len, acc), default=4)
    for k, v in acc.items():
        if k == "hm":
            what = "harmonic mean of base and new"
        else:
            n, (subset, _, split) = len(names.get(k, [])), k.partition("_")  # "base_corr": base classes, test_corr
            what = (f"{images[k]} test{'_' + split if split else ''} images of the {n} "
                    f"{'' if subset == 'all' else subset + ' '}classes" if k in images else f"{n} {k} classes")
            what += " (same checkpoint)" if subset == "new" else ""
        lines.append(f"  {k:<{w}} {v:6.2f}  {what}")
    ref = result.get("zero_shot_reference")
    if ref:
        lines.append("  zero-shot CLIP on the same test images (--method zsclip): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in ref.items()))
    for w in result.get("warnings", []):
        lines.append(f"  WARNING: {w}")
    lines.append(f"run folder: {result['run_dir']}")
    return "\n".join(lines)
