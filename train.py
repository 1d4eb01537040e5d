"""Train one prompt-tuning method on one dataset, shot count, seed and class subset; evaluate it; write a run.

    python train.py --method dapt --dataset toy             # offline: the toy benchmark and the toy CLIP
    python train.py --method coop --dataset caltech101 --root DATA --shots 16 --seed 1 --subsample base
    python train.py --method coop --dataset toy --lr 0.01 --epochs 20    # any config key: --key value
    python train.py --method dapt --help                    # every config key of a method, its default and type
    torchrun --nproc_per_node 8 train.py --method maple --dataset imagenet --root DATA    # one run, 8 processes

Read in order: parse (the config: recipes.py), build (data, backbone, model, its one-off set-up), fit (epochs,
checkpoints, resume), evaluate (every test split, base and new), main. The run folder and what it holds are
runs.py's; a method is used only through the PromptModel protocol (prompting.py), so this file never opens one.
Deliberately not here: the models (classic.py, dapt.py), the recipes (recipes.py), sweeps of many runs (sweep.py),
evaluation of saved runs and tables (eval.py).
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import data
import dapt
import kernels
import recipes
from clip_load import CheckpointError, load_clip
import files
from files import sha256_file
from loader import build_loader, build_transform, features_function, mask_path, resolve_mask_encoding
from prompting import ConfigError
from tables import hm
from runs import (NonFiniteLoss, RunError, RunLock, ZERO_SHOT_MARGIN, all_sum, atomic_save, below_zero_shot,
                  clip_weights, close_logging, describe, finished_result, folder_state, host_model, is_main, kept_rng,
                  log_to_file, on_main, open_run, precision_of, read_json, read_metrics, read_run_file, restore,
                  rng_state, run_dir_of, run_warnings, seed_everything, set_rng_state, start_parallel, stop_parallel,
                  torch_threads, versions, world, write_json)
from toy import toy_clip_record

log = logging.getLogger("dapt")

# ----------------------------------------------------------------------------------------------------------
# parse: the command line into a run config (recipes.py)


FLAGS = ("--resume", "--show-config", "--debug", "--help", "-h")  # the flags that take no value
COMMAND = ("method", "dataset", "root", "out", "device", "resume", "show_config", "debug")  # not config keys


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are ConfigErrors: one `error:` line and exit code 1, like every other error."""

    def error(self, message):
        raise ConfigError(re.sub(r"^argument (--[\w-]+)(/[\w-]+)?: ", r"\1: ", message))  # "--lr: cannot read ..."


def parse_args(argv):
    """argv -> argparse namespace with .cfg, the resolved run config (recipes.resolve_config). Every config key is a
    typed flag `--key value` (or --key=value; a value may start with '-', e.g. --tag -h1); `--help` with --method
    lists them with their defaults. An unknown key is an error that names the valid ones."""
    argv = list(argv)
    joined, i = [], 0
    while i < len(argv):  # --key value -> --key=value, so that a value starting with '-' is never read as a flag
        if argv[i].startswith("--") and "=" not in argv[i] and argv[i] not in FLAGS and i + 1 < len(argv):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    p = Parser(
        prog="train.py", usage="%(prog)s --method M --dataset D [--root ROOT] [--out OUT] [--resume] [--key value ...]",
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Config keys: --key value; `python train.py --method M --help` lists every key of method M with its "
               "default (precedence: recipes.py).")
    p.add_argument("--method", required=True, help=f"one of {', '.join(recipes.RECIPES)}")
    p.add_argument("--dataset", required="-h" not in joined and "--help" not in joined,
                   help=f"one of {', '.join(data.DATASETS)} (toy works offline)")
    p.add_argument("--root", default="DATA", help="data root holding the dataset folders; for --dataset folder the "
                   "dataset itself (default %(default)s)")
    p.add_argument("--out", default="runs", help="where run folders go (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default %(default)s")
    p.add_argument("--resume", action="store_true", help="continue the run in its folder from its last epoch")
    p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (errors are one line)")
    head = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # what decides the rows: method, dataset, ...
    for key in ("method", "dataset", "root", "host", "setting", "subsample", "shots"):
        head.add_argument(f"--{key}")
    first, _ = head.parse_known_args(joined)
    if first.method in recipes.RECIPES and (first.dataset is None or first.dataset in data.DATASETS):
        rows = {k: v for k, v in (("host", first.host), ("setting", first.setting), ("subsample", first.subsample))
                if v is not None}
        if first.shots is not None and first.shots.lstrip("-").isdigit():
            rows["shots"] = int(first.shots)
        try:
            recipes.add_config_flags(p, recipes.resolve_config(first.method, first.dataset, rows, first.root or "DATA"))
        except ConfigError:
            if "-h" not in joined and "--help" not in joined:
                raise  # a bad --setting / --subsample / --host names its value
    args, unknown = p.parse_known_args(joined)
    flags = sorted({u.split("=")[0] for u in unknown if u.startswith("--")})
    if flags:  # unknown config keys: the error names the valid ones
        recipes.resolve_config(args.method, args.dataset, {f[2:].replace("-", "_"): None for f in flags})
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = {k: v for k, v in vars(args).items() if k not in COMMAND}  # the config keys given (SUPPRESS)
    args.cfg = recipes.resolve_config(args.method, args.dataset, overrides, args.root)
    return args


# ----------------------------------------------------------------------------------------------------------
# build: data, backbone, model and its one-off set-up, loaders, optimizer


def load_backbone(cfg, root, device):
    """The run's CLIP on `device` in its precision's dtype."""
    name = clip_weights(cfg, root)  # the toy CLIP ships in assets/ (its sha256 checked)
    _, dtype, _, _ = precision_of(cfg, device)
    model = load_clip(name, device=device, dtype=dtype)
    model.set_attention(cfg["attn"])
    return model


def transforms_of(cfg, resolution):
    """Train / test transforms; the size is --image-size, else the CLIP's input resolution (a toy CLIP on a 224 px
    dataset evaluates at 32 px)."""
    kw = dict(size=cfg["image_size"] or resolution, scale=tuple(cfg["rrc_scale"]), ratio=tuple(cfg["rrc_ratio"]),
              interpolation=cfg["interpolation"], hflip=cfg["hflip"],
              mask_interpolation="bicubic" if cfg["mask_quirk"] else "nearest")  # DAPT's official quirk
    return build_transform(True, resize_only=cfg["resize_only"], **kw), build_transform(False, **kw)


def make_loader(cfg, bench, items, transform, train, model, patch_size):
    masks = train and model.needs_masks
    return build_loader(
        items, transform, cfg["batch"] if train else cfg["test_batch"], train=train, workers=cfg["workers"],
        seed=cfg["seed"], masks=masks, dataset_dir=bench.meta["dataset_dir"],
        mask_encoding=bench.meta.get("mask_encoding"), allow_missing_masks=cfg["allow_missing_masks"],
        patch_size=patch_size if masks else None, dassl_drop_last=cfg["dassl_drop_last"],
        class_balanced=cfg["class_balanced"] if train else 0, shard=world())


def build_run(cfg, root, device):
    """(benchmark, model on device with float32 prompts, train / test transforms, precision name, the time when the
    data and the backbone were ready).

    The random states are seeded from the run seed right before the model is built, after the data, the
    backbone and their caches (toy data, toy CLIP pretraining, few-shot splits), and the model's one-off set-up
    runs with the states kept: a run's result depends on its config and seed, not on what was cached before."""
    load = lambda: data.load_benchmark(cfg["dataset"], root, shots=cfg["shots"], seed=cfg["seed"],  # noqa: E731
                                       subsample=cfg["subsample"])
    on_main(lambda: load() and None)  # rank 0 makes what is missing (toy data, split caches), then every rank reads
    bench = load()
    if cfg["data_fraction"] < 1:
        bench = data.data_fraction_split(bench, cfg["data_fraction"], cfg["seed"])
    clip = load_backbone(cfg, root, device)
    precision = precision_of(cfg, device)[0]
    seed_everything(cfg["seed"])
    host = host_model(cfg, clip, bench.classnames) if cfg["method"] == "fvgpt" else None
    model = dapt.build_model(cfg["method"], clip, bench.classnames, cfg, host=host).to(device)
    train_tf, test_tf = transforms_of(cfg, clip.visual.input_resolution)
    if model.needs_masks:  # the mask encoding, resolved once and recorded (config.json's benchmark entry)
        d = bench.meta["dataset_dir"]
        enc, how = resolve_mask_encoding(d, [mask_path(d, p) for p, _, _ in bench.train],
                                         "official" if cfg["mask_quirk"] else cfg["mask_encoding"])
        bench.meta = dict(bench.meta, mask_encoding=enc,
                          mask_encoding_source="--mask-quirk" if cfg["mask_quirk"] else how)
    ready = time.time()  # the data and the backbone are ready: the run's own time starts
    if cfg["epochs"] > 0:  # one-off set-up from the training images (dapt-dist prototypes, DA-VPT clusters)
        with kept_rng(device):
            model.prepare(features_function(bench, {"train": train_tf, "test": test_tf}, cfg["seed"], device))
    for p in model.parameters():  # prompt parameters and optimizer state in float32 (protocol §6)
        if p.requires_grad:
            p.data = p.data.float()
    return bench, model, train_tf, test_tf, precision, ready


def record_config(cfg, run_dir, root, device, bench, model, train_tf, test_tf, precision, state="new"):
    """config.json: the run config and every constant it resolved to (transforms, sizes, versions). A resumed
    run keeps the config.json it started with (this process's versions go to the log)."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record = dict(cfg, root=os.path.abspath(root), device=str(device), precision_resolved=precision,
                  attention_resolved=kernels.describe_backend(cfg["attn"], torch.device(device).type),
                  transform_train=train_tf.constants(), transform_test=test_tf.constants(),
                  trainable_values=n_params, benchmark=bench.meta, world_size=world()[1], versions=versions(device),
                  **({"clip_sha256": toy_clip_record()["sha256"]} if cfg["clip"] == "toy" else {}))
    log.info("run %s (%d process%s) on %s%s%s", run_dir, world()[1], "" if world()[1] == 1 else "es", device,
             f" ({torch.cuda.get_device_name(device)})" if str(device).startswith("cuda") else "",
             f", CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in os.environ
             else "")
    log_to_file(logging.INFO, "config " + json.dumps({k: v for k, v in record.items() if k != "benchmark"},
                                                      default=str))
    log.info("config: %d keys in %s (python train.py ... --show-config prints them)", len(record),
             os.path.join(run_dir, "config.json"))
    log.info("attention (--attn %s): %s; precision %s", cfg["attn"], record["attention_resolved"], precision)
    if state == "resume":
        record = read_json(os.path.join(run_dir, "config.json"), "run config")
        if record.get("world_size", 1) != world()[1]:
            log.warning("resuming a run started in %d process(es) in %d: the gradients are averaged over the same "
                        "global batches, so the result equals an uninterrupted run only up to float summation order",
                        record.get("world_size", 1), world()[1])
    else:
        write_json(os.path.join(run_dir, "config.json"), record)
    log.info("data: %d train / %d val / %d test images, %d classes; trainable values: %d",
             len(bench.train), len(bench.val), len(bench.test), len(bench.classnames), n_params)
    return record


def make_optimizer(cfg, model):
    params = model.param_groups()  # the model's own groups, e.g. no weight decay on biases
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise ConfigError(f"--optimizer {cfg['optimizer']!r}: expected sgd or adamw")


# ----------------------------------------------------------------------------------------------------------
# fit: the epochs, a checkpoint after each, resume, model selection (protocol §6: Dassl's schedules)


def lr_at(cfg, epoch, step=0, steps_per_epoch=1):
    """The learning rate of this epoch (and step). cosine (Dassl, stepped per epoch): warmup_lr for warmup_epochs,
    then lr (1 + cos(pi (e - W) / E)) / 2. Per update, with a linear warm-up from warmup_lr over W epochs' steps:
    per_step: then min_lr + (lr - min_lr)(1 + cos(pi (t - W) / (T - W))) / 2; timm_cosine (timm's
    CosineLRScheduler with warmup_prefix=False, DA-VPT's): min_lr + (lr - min_lr)(1 + cos(pi t / T)) / 2, the
    cosine counted over all T steps including the warm-up."""
    E, W, lr0 = cfg["epochs"], cfg["warmup_epochs"], cfg["lr"]
    if cfg["schedule"] in ("per_step", "timm_cosine"):
        t, warm, total = epoch * steps_per_epoch + step, W * steps_per_epoch, E * steps_per_epoch
        if t < warm:
            return cfg["warmup_lr"] + (lr0 - cfg["warmup_lr"]) * t / max(warm, 1)
        phase = t / max(total, 1) if cfg["schedule"] == "timm_cosine" else (t - warm) / max(total - warm, 1)
        return cfg["min_lr"] + (lr0 - cfg["min_lr"]) * (1 + math.cos(math.pi * phase)) / 2
    if cfg["schedule"] != "cosine":
        raise ConfigError(f"--schedule {cfg['schedule']!r}: expected cosine, per_step or timm_cosine")
    if epoch < W:
        return cfg["warmup_lr"]
    return lr0 * (1 + math.cos(math.pi * (epoch - W) / E)) / 2


# A trained tensor whose root-mean-square value exceeds this has diverged: prompts and adapters start at RMS
# values of about 0.001-0.3 and stayed below 0.4 in the test suite's toy runs of every method but FVG-PT, whose
# residual scales reach 7-15 in its unstable toy runs (README); coop at lr 1e9 reached 1e15 with a finite loss.
# Above it, the log warns and result.json is flagged (exploded_parameters).
PARAM_RMS_LIMIT = 100.0


def fit(cfg, run_dir, model, bench, train_tf, test_tf, device, resume):
    """The epochs (from resume.pt with --resume: parameters, optimizer, loss scaler and every random state), a
    checkpoint after each, then the selected epoch's parameters in the model. Epochs are counted from 1 in
    everything a person reads (log, metrics.jsonl, result.json). Returns (best-validation record
    {"epoch", "val_acc"} or None, training samples per epoch)."""
    ckpt_path, resume_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "resume.pt")
    _, _, autocast_dtype, scale_loss = precision_of(cfg, device)
    patch = model.clip.visual.patch_size
    epochs = cfg["epochs"] if cfg["method"] != "zsclip" else 0
    if epochs == 0:
        atomic_save(checkpoint_of(model, cfg), ckpt_path)
        return None, 0
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"method {cfg['method']} has no trainable parameters")
    opt = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=scale_loss)
    loader = make_loader(cfg, bench, bench.train, train_tf, True, model, patch)
    loss_of = data_parallel(model, device)  # model.loss; under torchrun through DistributedDataParallel
    val_loader = None
    if cfg["selection"] == "best_val":
        if bench.val:
            val_loader = make_loader(cfg, bench, bench.val, test_tf, False, model, patch)
        else:
            log.warning("selection=best_val but %s has no val split: using the last epoch", cfg["dataset"])
    done, best, exploded = 0, None, False  # done: finished epochs
    if resume:
        state = read_run_file(resume_path, device)
        restore(model, state, resume_path)
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        done, best = state["epoch"] + 1, state.get("best")
        rng = state["rng"]  # under torchrun a list: one state per process (another count: rank modulo the saved)
        set_rng_state(rng[world()[0] % len(rng)] if isinstance(rng, list) else rng)  # last: nothing above draws
        lines = read_metrics(run_dir)  # an epoch written after resume.pt was saved is trained again
        if len(lines) != done and is_main():
            with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in lines if m["epoch"] <= done)
        log.info("resumed after epoch %d of %d", done, epochs)
    try:
        for epoch in range(done, epochs):  # epoch: 0-based inside the loop (schedules), epoch + 1 where read
            stats = train_one_epoch(cfg, model, opt, scaler, loader, epoch, device, autocast_dtype, loss_of)
            model.epoch_end(epoch, loader)
            if val_loader is not None:
                stats["val_acc"], _ = evaluate(model, val_loader, device, autocast_dtype)
                if best is None or stats["val_acc"] > best["val_acc"]:
                    best = dict(epoch=epoch + 1, val_acc=stats["val_acc"])
                    atomic_save(checkpoint_of(model, cfg), os.path.join(run_dir, "best.pt"))
            name, stats["param_rms"] = param_rms(model)
            if stats["param_rms"] > PARAM_RMS_LIMIT and not exploded:
                exploded = True
                log.warning("epoch %d: trained parameter %r has an RMS value of %.3g, above %g: the parameters are "
                            "diverging although the loss is finite (lower --lr)", epoch + 1, name, stats["param_rms"],
                            PARAM_RMS_LIMIT)
            atomic_save(checkpoint_of(model, cfg), ckpt_path)
            if is_main():
                with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(dict(epoch=epoch + 1, **stats)) + "\n")
            rng = rng_state(device)
            if world()[1] > 1:  # every process's own states (its dropout draws differ)
                rng = [None] * world()[1]
                dist.all_gather_object(rng, rng_state(device))
            atomic_save(dict(params=model.trainable_state(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                             epoch=epoch, best=best, extra=model.extra_state(), rng=rng), resume_path)
            done = epoch + 1
            log.info("epoch %d/%d done: %s", epoch + 1, epochs, ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    except KeyboardInterrupt:
        log.warning("interrupted: %s", f"epoch {done} is saved in {run_dir}; continue with --resume" if done else
                    f"no epoch finished, nothing to resume in {run_dir}; run the command again")
        raise
    except NonFiniteLoss as e:
        if done == 0:
            msg = (f"{e}. Stopped in the first epoch: no checkpoint exists (no epoch finished). Lower --lr or check "
                   "the inputs, then run the command again (the folder holds no progress, it starts over)")
        else:
            msg = (f"{e}. Stopped; the last good checkpoint (epoch {done}) is kept in {run_dir}. --resume would repeat "
                   "the same steps (it is exact): lower --lr or check the inputs in a new run (--tag or --out)")
        raise NonFiniteLoss(f"non-finite loss: {msg}") from None
    if best is not None and cfg["selection"] == "best_val":
        path = os.path.join(run_dir, "best.pt")
        on_main(lambda: None)  # rank 0 has written it
        restore(model, read_run_file(path, device), path)  # parameters and extra state (DA-VPT's map)
        atomic_save(checkpoint_of(model, cfg), ckpt_path)  # checkpoint.pt: the model the result reports
        log.info("model selection: best val accuracy %.2f at epoch %d of %d", best["val_acc"], best["epoch"], epochs)
    return best, loader.samples_per_epoch


def param_rms(model):
    """(name, RMS value) of the trained tensor with the largest root-mean-square value."""
    with torch.no_grad():
        values = [(n, p.detach().float().pow(2).mean().sqrt().item()) for n, p in model.named_parameters()
                  if p.requires_grad and p.numel()]
    return max(values, key=lambda v: v[1], default=("", 0.0))


def checkpoint_of(model, cfg):
    return dict(params=model.trainable_state(), config=cfg, classnames=list(model.classnames),
                extra=model.extra_state())


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Loss(nn.Module):
    """model.loss as a module's forward: what DistributedDataParallel wraps, so that it sees every step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, epoch):
        return self.model.loss(batch, epoch)


def data_parallel(model, device):
    """The training loss: model.loss in one process; under torchrun model.loss through DistributedDataParallel,
    which averages the processes' gradients in backward (bucketed, overlapped with it; buffers are not broadcast:
    every process builds the same frozen ones). Parameters that a step does not use get zero gradients
    (find_unused_parameters), as without DDP they get none."""
    if world()[1] == 1:
        return model.loss
    device = torch.device(device)
    return DistributedDataParallel(Loss(model), device_ids=[device] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=True)


def train_one_epoch(cfg, model, opt, scaler, loader, epoch, device, autocast_dtype, loss_of=None):
    """One epoch; returns its averaged stats. Nothing reads a value back from the device per step: the loss, its
    stats and the first non-finite loss stay tensors until a progress line is logged (every log_every steps and
    at the epoch's end), so a GPU never waits for the host (the fp16 GradScaler's own inf check aside). A
    non-finite loss stops the run at that check, before the epoch's checkpoint is written."""
    model.train()
    loader.set_epoch(epoch)
    steps = len(loader)
    lr = lr_at(cfg, epoch)
    sums, seen = {}, 0  # the loss and its stats, summed over the samples as float64 tensors
    bad_step = bad_loss = None  # the first step with a non-finite loss (-1: none yet) and that loss, as tensors
    t0 = last_print = time.time()
    for step, batch in enumerate(loader):
        if cfg["schedule"] != "cosine":  # per update
            lr = lr_at(cfg, epoch, step, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = to_device(batch, device)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, stats = (loss_of or model.loss)(batch, epoch)
        value = loss.detach().float()
        n = len(batch["label"])
        if world()[1] > 1:  # DDP averages the processes' gradients: weight each by its share of the global batch,
            loss = loss * (n * world()[1] / all_sum(torch.tensor(float(n), device=value.device)))  # the batch mean
        if bad_step is None:
            bad_step, bad_loss = torch.full_like(value, -1, dtype=torch.long), torch.zeros_like(value)
        first = ~torch.isfinite(value) & (bad_step < 0)
        bad_step, bad_loss = torch.where(first, step, bad_step), torch.where(first, value, bad_loss)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["grad_clip"]:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_value_([p for p in model.parameters() if p.requires_grad], cfg["grad_clip"])
        scaler.step(opt)
        scaler.update()
        for k, v in dict(loss=value, **stats).items():
            sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64) * n
        seen += n
        now = time.time()
        if step == steps - 1 or (step + 1) % cfg["log_every"] == 0 or now - last_print > 30:
            if int(all_sum((bad_step >= 0).float())) > 0:  # any process: every process stops together
                raise NonFiniteLoss(f"loss is {float(bad_loss)} at epoch {epoch + 1}, step {int(bad_step) + 1} "
                                    f"(lr {lr_at(cfg, epoch, int(bad_step), steps):.3g})")
            ips = seen / max(now - t0, 1e-9)
            per_step = (now - t0) / (step + 1)
            eta = (steps - step - 1) * per_step + (cfg["epochs"] - epoch - 1) * steps * per_step
            log.info("epoch %d/%d step %d/%d loss %.4f lr %.3e %.1f img/s eta %s", epoch + 1, cfg["epochs"], step + 1,
                     steps, float(value), lr, ips, datetime.timedelta(seconds=int(eta)))
            last_print = now
    seen = int(all_sum(torch.tensor(float(seen))))  # every process's samples (a CPU tensor: gloo and NCCL)
    avg = {k: float(all_sum(v)) / max(seen, 1) for k, v in sums.items()}
    return dict(loss=avg.pop("loss", 0.0), train_acc=100 * avg.pop("acc", 0.0), lr=lr, samples=int(seen), **avg)


# ----------------------------------------------------------------------------------------------------------
# evaluate: every test split of the run's classes, base and new from one checkpoint, guards on the result


@torch.no_grad()
def evaluate(model, loader, device, autocast_dtype=None):
    """Top-1 accuracy (%) of model over a loader; class text features computed once."""
    model.eval()
    correct = total = 0
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        T = model.text_features()
        for batch in loader:
            batch = to_device(batch, device)
            pred = model(batch["image"], text_features=T).argmax(-1)
            correct = correct + (pred == batch["label"]).sum()  # a tensor: read once, at the end
            total += len(pred)
    model.train()
    counts = all_sum(torch.stack([torch.as_tensor(correct, device=device), torch.as_tensor(total, device=device)]))
    correct, total = int(counts[0]), int(counts[1])  # under torchrun each process evaluated its part
    return 100.0 * correct / max(total, 1), total


def evaluate_splits(cfg, model, bench, test_tf, device):
    """Top-1 accuracy (%) and image count on bench's test split and on each further one (the toy's test_corr):
    {"test": (acc, n), "test_corr": (acc, n), ...}. The model's class names must be bench's."""
    autocast_dtype, patch = precision_of(cfg, device)[2], model.clip.visual.patch_size
    return {split: evaluate(model, make_loader(cfg, bench, items, test_tf, False, model, patch), device, autocast_dtype)
            for split, items in [("test", bench.test), *sorted(bench.extra_tests.items())]}


def evaluate_settings(cfg, model, bench, root, test_tf, device):
    """Test accuracy on the run's classes; for a base run also on the new classes with the same checkpoint.
    A further test split of the benchmark ("test_corr" of the toy) is scored too, as "<subset>_corr".
    {subset: top-1 %, "hm": ..., "classnames": {subset: names}, "images": {subset: test images}}."""
    acc, classnames, images = {}, {}, {}

    def score(name, b):  # the test split of b and its further test splits
        for split, (a, n) in evaluate_splits(cfg, model, b, test_tf, device).items():
            key = name if split == "test" else f"{name}_{split.removeprefix('test_')}"
            acc[key], images[key], classnames[key] = a, n, list(b.classnames)

    score(cfg["subsample"], bench)
    if cfg["subsample"] == "base":
        new = data.load_benchmark(cfg["dataset"], root, shots=cfg["shots"], seed=cfg["seed"], subsample="new")
        model.set_classnames(new.classnames)
        score("new", new)
        model.set_classnames(bench.classnames)
        acc["hm"] = hm(acc["base"], acc["new"])
    acc = {k: acc[k] for k in sorted(acc, key=lambda k: "_" in k)}  # base, new, hm, then base_corr, new_corr
    acc["classnames"], acc["images"] = classnames, images
    return acc


CHANCE_MARGIN = 5.0  # points above chance that are never called chance, however few the test images


def at_chance(acc, images, classes):
    """Whether a top-1 accuracy (%) on `images` test images of `classes` classes is at (or below) chance: at most
    chance + min(3 binomial standard errors at chance, CHANCE_MARGIN points). Never above chance + 5 points, so a
    model right on a small test set (100 % of 6 images) is not flagged; 0 % (below chance) is."""
    p = 1 / max(classes, 1)
    se = 100 * math.sqrt(p * (1 - p) / max(images, 1))
    return acc <= 100 * p + min(3 * se, CHANCE_MARGIN)


def health(model, accuracies, images, classnames, trained, reference=None):
    """Guards on the final model: {"flags": names, "warnings": sentences, "param_rms_max": value}. Flags:
    exploded_parameters (a trained tensor's RMS value > PARAM_RMS_LIMIT), accuracy_at_chance (after training
    with lr > 0, a subset's accuracy at or below chance: at_chance), below_zero_shot (after training, a subset's
    accuracy more than runs.ZERO_SHOT_MARGIN points below zero-shot CLIP's on the same images, `reference`)."""
    flags, warnings = [], []
    name, rms = param_rms(model)
    if rms > PARAM_RMS_LIMIT:
        flags.append("exploded_parameters")
        warnings.append(f"trained parameter {name!r} has an RMS value of {rms:.3g}, above {PARAM_RMS_LIMIT:g}: "
                        "training diverged although the loss stayed finite (lower --lr)")
    chance = [k for k in images if trained and at_chance(accuracies[k], images[k], len(classnames[k]))]
    if chance:
        flags.append("accuracy_at_chance")
        warnings.append("accuracy at chance after training: " + ", ".join(
            f"{k} {accuracies[k]:.2f} % with {len(classnames[k])} classes (chance {100 / len(classnames[k]):.2f} %)"
            for k in chance) + "; check the data, the backbone and --lr")
    below = below_zero_shot(accuracies, reference) if trained and reference else []
    if below:
        flags.append("below_zero_shot")
        warnings.append("far below zero-shot CLIP on the same test images: " + ", ".join(
            f"{k} {a:.2f} vs {z:.2f} ({a - z:+.1f} points)" for k, a, z in below)
            + f" (more than {ZERO_SHOT_MARGIN:g} points: a collapse on these classes?)")
    for w in warnings:
        log.warning("%s", w)
    return dict(flags=flags, warnings=warnings, param_rms_max=rms)


def zero_shot_reference(cfg, root, bench, test_tf, device):
    """The accuracy of zero-shot CLIP (--method zsclip with this run's data, backbone and evaluation settings) on
    the same test images, {subset: top-1 %}: computed once per dataset, class subset, backbone and test transform,
    and kept in the dataset's cache folder (zero_shot_<sha256 of that key>.json) and in this process."""
    keys = ("subsample", "setting", "shots", "seed", "clip", "data_fraction", "precision", "attn", "workers",
            "test_batch", "threads")
    zcfg = recipes.resolve_config("zsclip", cfg["dataset"], {k: cfg[k] for k in keys}, root)
    weights = clip_weights(zcfg, root)
    stat = os.stat(weights) if os.path.isfile(weights) else None
    what = [{k: v for k, v in zcfg.items() if k not in ("shots", "seed", "data_fraction", "workers", "test_batch",
                                                         "threads", "setting")},  # what the test images' scores need
            weights, stat and stat.st_size, torch.device(device).type, test_tf.constants(),
            [os.path.relpath(p, bench.meta["dataset_dir"]) for p, _, _ in bench.test], bench.meta["split_sha256"]]
    key = hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:16]
    folders, write_to = data.cache_dirs(bench.meta["dataset_dir"])
    name = f"zero_shot_{key}.json"
    if key not in _ZERO_SHOT:  # runs of one process (a sweep, the tests) share it
        found = [p for p in (os.path.join(d, name) for d in folders) if os.path.isfile(p)]
        if found:
            _ZERO_SHOT[key] = read_json(found[0], "zero-shot reference")["accuracy"]
        else:
            with kept_rng(device):
                model = dapt.build_model("zsclip", load_backbone(zcfg, root, device), bench.classnames, zcfg)
                acc = evaluate_settings(zcfg, model.to(device), bench, root, test_tf, device)
            acc.pop("classnames"), acc.pop("images")
            _ZERO_SHOT[key] = acc
            if is_main() and data.can_write(write_to):
                files.write_json(os.path.join(write_to, name), dict(accuracy=acc, key=what), indent=1)
    log.info("zero-shot reference (--method zsclip on the same test images): %s", json.dumps(_ZERO_SHOT[key]))
    return dict(_ZERO_SHOT[key])


_ZERO_SHOT = {}


# ----------------------------------------------------------------------------------------------------------
# main: one run, start to end


def train(cfg, root="DATA", out="runs", device="cpu", resume=False):
    """Train and evaluate one run; returns the result dict (also written to result.json) with "run_dir" added.
    A finished run with the same config and data is not retrained: its result.json is returned, nothing is written.
    A command that fails before the run's config.json is written leaves no folder behind."""
    run_dir = run_dir_of(out, cfg)
    identity = lambda: data.identity(cfg["dataset"], root)  # noqa: E731  (the data a run was made on)
    if on_main(lambda: folder_state(run_dir, cfg, device, resume, identity)) == "finished":  # reads only
        return on_main(lambda: finished_result(run_dir))
    created = run_dir  # the top folder this command creates (removed again if the run fails before config.json)
    while not os.path.isdir(os.path.dirname(os.path.abspath(created))):
        created = os.path.dirname(os.path.abspath(created))
    created = None if os.path.isdir(run_dir) else created
    try:
        with RunLock(run_dir) if is_main() else contextlib.nullcontext(), torch_threads(cfg["threads"]):
            state = on_main(lambda: folder_state(run_dir, cfg, device, resume, identity))  # another may have finished
            if state == "finished":
                return on_main(lambda: finished_result(run_dir))
            if is_main():  # rank 0 logs to the run folder (the other processes of a torchrun log warnings only)
                open_run(run_dir, state, resume)
            try:
                result = run(cfg, run_dir, root, device, state)
            except USER_ERRORS as e:  # the command line prints it; the log keeps it too
                log_to_file(logging.ERROR, f"error: {e}")
                raise
            finally:
                close_logging()
    except BaseException:
        if created and is_main() and not os.path.exists(os.path.join(run_dir, "config.json")):
            shutil.rmtree(created, ignore_errors=True)  # only its log and lock: nothing to keep
        raise
    return dict(result, run_dir=run_dir)


def run(cfg, run_dir, root, device, state):
    """Build, fit, evaluate: the phases of a run, each saying what an interrupt (Ctrl-C, SIGTERM) leaves."""
    t_start = time.time()
    try:
        bench, model, train_tf, test_tf, precision, ready = build_run(cfg, root, device)
    except KeyboardInterrupt:
        log.warning("interrupted while preparing the run (data, backbone, caches): nothing was trained; run the "
                    "command again")
        raise
    record = record_config(cfg, run_dir, root, device, bench, model, train_tf, test_tf, precision, state)
    best, samples = fit(cfg, run_dir, model, bench, train_tf, test_tf, device, state == "resume")
    try:
        return finish_run(cfg, run_dir, root, device, bench, model, test_tf, record, best, samples,
                          dict(seconds=time.time() - ready, setup_seconds=ready - t_start, start=ready))
    except KeyboardInterrupt:
        log.warning("interrupted during the final evaluation: every epoch is saved in %s; the same command with "
                    "--resume evaluates it (nothing is trained again)", run_dir)
        raise


def finish_run(cfg, run_dir, root, device, bench, model, test_tf, record, best, samples, times):
    """Evaluate, check, and write result.json (the mark of a finished run). times: seconds of the run (after the
    data and backbone were ready) and of its set-up (toy data, toy CLIP, caches made by this command)."""
    accuracies = evaluate_settings(cfg, model, bench, root, test_tf, device)
    classnames, images = accuracies.pop("classnames"), accuracies.pop("images")
    trained = cfg["method"] != "zsclip" and cfg["epochs"] > 0 and cfg["lr"] > 0
    reference = zero_shot_reference(cfg, root, bench, test_tf, device)
    checks = health(model, accuracies, images, classnames, trained, reference)
    result = dict(
        method=cfg["method"], dataset=cfg["dataset"], setting=cfg["setting"], shots=cfg["shots"], seed=cfg["seed"],
        subsample=cfg["subsample"], tag=cfg["tag"], data_fraction=cfg["data_fraction"], accuracy=accuracies,
        test_images=images, classnames=classnames, config=record, samples_per_epoch=samples,
        selected_epoch=best["epoch"] if best else (cfg["epochs"] if cfg["method"] != "zsclip" else 0), **checks,
        checkpoint_sha256=on_main(lambda: sha256_file(os.path.join(run_dir, "checkpoint.pt"))),
        seconds=round(time.time() - times["start"], 1), setup_seconds=round(times["setup_seconds"], 1),
        world_size=world()[1], zero_shot_reference=reference,
        finished=datetime.datetime.now().isoformat(timespec="seconds"))
    result["warnings"] = list(dict.fromkeys(result["warnings"] + run_warnings()))  # every warning of the run, once
    write_json(os.path.join(run_dir, "result.json"), result)
    log.info("result: %s", json.dumps(result["accuracy"]))
    return result


# the project's own errors, and the file system's (permissions, disk full): one message and exit code 1 from
# main(), no traceback (--debug shows it)
USER_ERRORS = (ConfigError, RunError, CheckpointError, data.DataError, OSError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending the job): handled as Ctrl-C, every phase says what it leaves."""


def terminate(signum, frame):
    raise Terminated()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    previous = signal.signal(signal.SIGTERM, terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        args = parse_args(argv)
        if args.show_config:
            print(json.dumps(args.cfg, indent=1, default=str))
            return None
        if str(args.device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; use "
                              "--device cpu, or install a CUDA build of torch on a machine with a GPU")
        device = start_parallel(args.device)  # torchrun: one run in WORLD_SIZE processes
        result = train(args.cfg, root=args.root, out=args.out, device=device, resume=args.resume)
        rank0 = is_main()
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        if is_main():
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:
        print("stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None
    finally:
        stop_parallel()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if rank0:
        print(describe(result))
    return result


if __name__ == "__main__":
    main()
