"""Train one prompt-tuning method on one dataset, shot count, seed and class subset; evaluate it; write a run.

    python train.py --method coop --dataset caltech101 --root DATA --shots 16 --seed 1 --subsample base
    python train.py --method dapt --dataset toy            # offline: toy benchmark + toy CLIP (pretrained here)
    python train.py --method coop --dataset toy --lr 0.01 --epochs 20   # any config key: --key value
    python train.py sweep plans/toy_b2n.txt --resume       # a whole table: one run per plan line, done ones skipped

A run folder `<out>/<setting>/<dataset>/<method><tag>/shots<K>_seed<S>/` holds `config.json` (every
preprocessing and optimisation constant), `log.txt`, `metrics.jsonl` (one line per epoch, counted from 1),
`checkpoint.pt` (learnable parameters + config + class names of the model the result reports: the selected epoch's
with best_val), `resume.pt` (the last epoch's parameters, optimizer, loss scaler and random
states for --resume), `best.pt` (best_val selection), `result.json` (written last: the run is finished) and
`train.lock` (held while a process trains there). Its .pt files hold data only (read with weights_only=True).
The same command on a finished run prints its result; --resume continues a run only with its own config.

Configuration is plain values, in this order: COMMON (the run), the model's `defaults` (dapt.py, beside each
class), the method's RECIPES row for the setting, DATASET_OVERRIDES, `--key value` from the command line, then
SWITCHES (a boolean key that swaps in a whole recipe). Unknown keys are errors.
Deliberately not here: the models (dapt.py), multi-GPU, schedulers other than the protocol's, evaluation tables
(eval.py).
"""
import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import time

try:
    import fcntl  # the run folder's lock (Linux, macOS)
except ImportError:  # pragma: no cover
    fcntl = None

import numpy
import PIL
import torch
import torch.distributed as dist
import torch.nn.functional as F

import clip as clip_module
import data
import dapt
import kernels
from dapt import ConfigError

log = logging.getLogger("dapt")

# ----------------------------------------------------------------------------------------------------------
# configuration: one visible table (methods.md, protocol.md §7); model keys live beside the models (dapt.py)

COMMON = dict(
    shots=16, subsample="all", setting="",  # setting "" = b2n when subsample != all, else fewshot
    data_fraction=1.0,  # < 1: a class-balanced fraction of the FULL train split (shots set to 0; DAPT's 3rd setting)
    clip="ViT-B/16",  # a name (ViT-B/16, ViT-B/32, ViT-L/14) or a checkpoint path; toy: the toy CLIP
    # transforms (protocol §5); image_size 0 = the dataset's (224; toy 32)
    image_size=0, rrc_scale=(0.08, 1.0), rrc_ratio=(0.75, 4 / 3), interpolation="bicubic", hflip=0.5,
    resize_only=False, allow_missing_masks=False,
    mask_encoding="",  # white | label; "" = <dataset>/mask/ENCODING, else detected from the mask files (recorded)
    mask_quirk=False,  # masks read as DAPT's official loader: red channel, label rule, bicubic resizing
    class_balanced=0,  # k > 0: training batches of k images per class (DA-VPT's official recipe uses 2)
    # optimisation (protocol §6); schedule per_step: linear warm-up then cosine to min_lr, per update
    optimizer="sgd", lr=0.002, momentum=0.9, weight_decay=5e-4, batch=32, epochs=10,
    warmup_epochs=1, warmup_lr=1e-5, schedule="cosine", min_lr=0.0, grad_clip=0.0, selection="last",
    dassl_drop_last=False, precision="auto", attn="auto", workers=2, test_batch=100, log_every=20, tag="",
    threads=0,  # CPU threads of torch while the run trains and evaluates; 0 = torch's default (the toy's: 1)
)  # seed and text_savings are model keys every model has (dapt.PromptModel.defaults)

# Per method and setting (fewshot / b2n / xd; "all" = any): optimisation and the setting's model keys.
# `epochs` may be a {shots: epochs} table.
COOP_FS_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
FVG_KEY = dict(fvg_host_recipe="")  # see SWITCHES
# MMRL (methods.md §6c): AdamW 1e-3 (Dassl defaults: wd 5e-4, betas 0.9 / 0.999), warm-up 1 epoch at 1e-5, RRC
# scale (0.5, 1), test batch 250, the dataset's template
MMRL_OPTIM = dict(template="", optimizer="adamw", lr=1e-3, weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5,
                  rrc_scale=(0.5, 1.0), test_batch=250)
RECIPES = {
    "zsclip": {"all": dict(epochs=0, template="")},  # template "" = the dataset's
    "coop": {"fewshot": dict(batch=32, lr=0.002, epochs=COOP_FS_EPOCHS),
             "b2n": dict(n_ctx=4, ctx_init="a photo of a", batch=32, lr=0.002, epochs=200)},
    "cocoop": {"all": dict(batch=1, lr=0.002, epochs=10)},
    "vpt": {"all": dict(batch=4, lr=0.0025, epochs=5)},
    "maple": {"fewshot": dict(batch=4, lr=0.0035, epochs=10), "b2n": dict(batch=4, lr=0.0035, epochs=5),
              "xd": dict(prompt_depth=3, batch=4, lr=0.0026, epochs=2)},
    "kgcoop": {"all": dict(template="", batch=4, lr=0.0035, epochs=10)},
    # DAPT (methods.md §8) on its host (MaPLe by default; --host)
    # both official B2N configs select the best validation epoch; vit_b16_base.yaml says batch 1, the config the
    # official docs/RUN.md names batch 4 (ours; --batch 1 for the other)
    "dapt": {"fewshot": dict(batch=4, lr=0.0035, epochs=10, selection="best_val"),
             "b2n": dict(batch=4, lr=0.0035, epochs=5, selection="best_val")},
    # FVG-PT (methods.md §9): stage 2 on a finished host run; optimisation as the FVG-PT CoOp host config
    "fvgpt": {"all": dict(FVG_KEY, host_run="", batch=4, lr=0.0035, epochs=10)},
    # methods.md §10: lr / betas per dataset below
    "dapt-dist": {"all": dict(batch=32, lr=0.002, epochs=COOP_FS_EPOCHS)},
    # methods.md §11: our VPT-deep recipe; official_optim switches to the released one (SWITCHES)
    "davpt": {"all": dict(official_optim=False, batch=4, lr=0.0025, epochs=5)},
    # methods.md §6b: the MaPLe repository's IVLP baseline (configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml;
    # cross-dataset: scripts/independent-vlp/xd_train_ivlp.sh trains it on ImageNet); no released few-shot recipe
    "ivlp": {"all": dict(batch=4, lr=0.0035, epochs=5)},
    # methods.md §6 (muzairkhattak/PromptSRC configs/trainers/PromptSRC/): the last (= GPA) model; few-shot GPA per
    # dataset in DATASET_OVERRIDES; fvg_host_recipe (SWITCHES): FVG-PT's host config
    "promptsrc": {"b2n": dict(FVG_KEY, batch=4, lr=0.0025, epochs=20),  # vit_b16_c2_ep20_batch4_4+4ctx.yaml
                  "fewshot": dict(FVG_KEY, gpa_mean=30.0, gpa_std=30.0, batch=4, lr=0.0025, epochs=50),  # few_shot.yaml
                  "xd": dict(FVG_KEY, prompt_depth_text=3, prompt_depth_vision=3, gpa_mean=6.0, gpa_std=10.0, batch=4,
                             lr=0.0025, epochs=20)},  # vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml
    # methods.md §6c (yunncheng/MMRL configs/trainers/MMRL/*.yaml, scripts/mmrl/*.sh); lambda and d_r per dataset,
    # ImageNet's own config in DATASET_OVERRIDES
    "mmrl": {"b2n": dict(MMRL_OPTIM, **FVG_KEY, batch=4, epochs=10),  # vit_b16.yaml
             "fewshot": dict(MMRL_OPTIM, **FVG_KEY, batch=32, epochs=50),  # vit_b16_few_shot.yaml
             "xd": dict(MMRL_OPTIM, **FVG_KEY, batch=32, epochs=1, warmup_epochs=0, reg_weight=0.2)},  # + the .sh
}
# DAPT on these hosts trains with the host's recipe (its RECIPES rows and DATASET_OVERRIDES), as DAPT on MaPLe uses
# MaPLe's: the DAPT + PromptSRC recipe was not released (our decision, README)
HOST_RECIPE = {("dapt", "promptsrc"), ("dapt", "mmrl")}
# A boolean key that swaps in a whole recipe (a string key: the recipe its value names); keys given explicitly
# (--key value) still win.
SWITCHES = {
    # DA-VPT's released recipe (methods.md §11), with its class-balanced sampler (2 images per class)
    # (Noahsark/DA-VPT configs/fgvc/vitb_cub200: lr 5e-4, head weight decay 5.0, re-clustering from epoch index 1)
    "official_optim": dict(optimizer="adamw", lr=5e-4, weight_decay=0.05, wd_head=5.0, decay_class_embedding=True,
                           epochs=100, warmup_epochs=10, warmup_lr=1e-8, schedule="timm_cosine", min_lr=1e-9,
                           grad_clip=10.0, batch=32, class_balanced=2, kmeans_sampling="official",
                           recluster_from=1),
    # FVG-PT's configs for its hosts (JREion/FVG-PT run_tuning.py 114-136), for the host run (stage 1) and for fvgpt
    # on it (stage 2: FVGPT_<host>/ = <host>/, byte-identical): --fvg-host-recipe <host method>. A string switch
    # applies the recipe its value names (keys this run has); the value must be the run's (fvgpt: its host run's) method
    "fvg_host_recipe": {
        "promptsrc": dict(batch=32, lr=0.0025, epochs=10),  # PromptSRC/vit_b16_c2_ep10_batch32_4+4ctx.yaml, GPA 15 / 1
        # MMRL/vit_b16.yaml on every dataset, without MMRL's per-dataset table (FVG-PT's train.py merges none)
        "mmrl": dict(MMRL_OPTIM, batch=4, epochs=10, reg_weight=1.0, rep_dim=512),
    },
}
# (method, dataset) -> overrides, or (method, dataset, setting) for one setting only (applied after the others);
# "*" matches every method.
DATASET_OVERRIDES = {
    ("coop", "imagenet"): dict(epochs=50),
    # KgCoOp's own template table differs from CoOp's zero-shot one on DTD only (htyao89/KgCoOp, FVG-PT's copy)
    ("kgcoop", "dtd"): dict(template="a photo of a {}, a type of texture."),
    # toy images are 32 px: a crop of 8% of the area often misses the object, so crops keep >= 50% (logged).
    # One thread: sums are reduced in another order with more threads, so toy numbers would differ per machine
    # (and on shared cores several threads are slower).
    ("*", "toy"): dict(clip="toy", workers=0, rrc_scale=(0.5, 1.0), threads=1),
    # dapt-dist (methods.md §10, V, official configs; the same for every shot count). The official prompts are
    # fp16 parameters; ours are fp32 masters trained with the same published SGD lr (unmeasured on real CLIP).
    # Caution from the toy lr sweep (README method notes; toy v1): in fp32 on the toy CLIP, lr >= 0.2 collapses the
    # class text features (L_inter 0.2 -> 0.7-0.95) and costs accuracy; 0.002 trains. Toy row: Caltech101's
    # betas (a small set of object categories) with CoOp's lr 0.002, chosen by that sweep.
    ("dapt-dist", "imagenet"): dict(lr=2.0, beta_v=0.01, beta_t=0.01, epochs=50),
    ("dapt-dist", "caltech101"): dict(lr=0.2, beta_v=10.0, beta_t=0.01),
    ("dapt-dist", "oxford_pets"): dict(lr=0.02, beta_v=10.0, beta_t=0.1),
    ("dapt-dist", "stanford_cars"): dict(lr=0.002, beta_v=100.0, beta_t=0.1),
    ("dapt-dist", "oxford_flowers"): dict(lr=0.002, beta_v=10.0, beta_t=0.01),
    ("dapt-dist", "food101"): dict(lr=20.0, beta_v=10.0, beta_t=0.01),
    ("dapt-dist", "fgvc_aircraft"): dict(lr=2.0, beta_v=100.0, beta_t=0.01),
    ("dapt-dist", "sun397"): dict(lr=20.0, beta_v=100.0, beta_t=0.01),
    ("dapt-dist", "dtd"): dict(lr=20.0, beta_v=100.0, beta_t=0.01),
    ("dapt-dist", "eurosat"): dict(lr=20.0, beta_v=100.0, beta_t=10.0),
    ("dapt-dist", "ucf101"): dict(lr=20.0, beta_v=0.1, beta_t=0.1),
    ("dapt-dist", "toy"): dict(lr=0.002, beta_v=10.0, beta_t=0.01),
}
# PromptSRC few-shot GPA (configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml 42-47: 30 / 30 in the
# row for ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397; 45 / 5 for these)
DATASET_OVERRIDES.update({("promptsrc", d, "fewshot"): dict(gpa_mean=45.0, gpa_std=5.0)
                          for d in ("stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat")})
# MMRL lambda per dataset in every setting (trainers/config.py 5-41), EuroSAT d_r 2048; ImageNet: vit_b16_imagenet.yaml
# (B2N and few-shot), the cross-dataset row keeps its own (scripts/mmrl/cross_datasets_train.sh: lambda 0.2)
DATASET_OVERRIDES.update({("mmrl", d): dict(reg_weight=w) for d, w in (
    ("stanford_cars", 7.0), ("fgvc_aircraft", 6.0), ("sun397", 6.0), ("dtd", 6.0), ("food101", 5.0),
    ("oxford_flowers", 4.0), ("ucf101", 3.0), ("caltech101", 0.5), ("oxford_pets", 0.2))})
DATASET_OVERRIDES.update({
    ("mmrl", "eurosat"): dict(reg_weight=0.01, rep_dim=2048),
    ("mmrl", "imagenet"): dict(reg_weight=0.5, batch=32, epochs=5),
    ("mmrl", "imagenet", "xd"): dict(reg_weight=0.2, batch=32, epochs=1, warmup_epochs=0),
    # the toy CLIP's last block: 5 tokens beside 16 patches weigh more than beside 196; inserted from block 3 of 4
    # they start at 67.5 % on the toy's base test (zero-shot 83.75), from block 4 at 82.5 (seed 1, README)
    ("mmrl", "toy"): dict(rep_layers=(-1,)),
})


def setting_of(cfg):
    return cfg["setting"] or ("b2n" if cfg["subsample"] != "all" else "fewshot")


SETTINGS = ("fewshot", "b2n", "xd")
AT_LEAST_0 = ("epochs", "lr", "warmup_epochs", "warmup_lr", "min_lr", "momentum", "weight_decay", "grad_clip",
              "workers", "threads", "class_balanced")
AT_LEAST_1 = ("batch", "test_batch", "log_every")


def check_values(cfg):
    """ConfigError for values no run can use: an unknown setting or subsample, negative counts and rates."""
    if cfg["setting"] not in ("", *SETTINGS):
        raise ConfigError(f"--setting {cfg['setting']!r}: expected one of {', '.join(SETTINGS)} (or leave it out: b2n "
                          "with --subsample base / new, else fewshot)")
    if cfg["subsample"] not in ("all", "base", "new"):
        raise ConfigError(f"--subsample {cfg['subsample']!r}: expected all, base or new")
    for keys, low in ((AT_LEAST_0, 0), (AT_LEAST_1, 1)):
        for key in keys:
            value = cfg.get(key, low)
            if not isinstance(value, dict) and not value >= low:  # also refuses NaN
                raise ConfigError(f"--{key.replace('_', '-')} {value}: expected a value >= {low}")


def resolve_config(method, dataset, overrides):
    """COMMON <- the model's defaults <- RECIPES[method][setting] <- DATASET_OVERRIDES <- overrides (typed)
    <- SWITCHES that are on. Raises ConfigError for unknown methods, datasets and keys."""
    if method not in RECIPES:
        raise ConfigError(f"unknown method {method!r}: expected one of {', '.join(RECIPES)}")
    if dataset not in data.DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}: expected one of {', '.join(data.DATASETS)}")
    cfg = dict(dapt.model_defaults(method, overrides.get("host")), **COMMON, method=method, dataset=dataset)
    for key in ("subsample", "setting", "shots", "host"):  # the setting (and DAPT's host) decide which row applies
        if key in overrides:
            cfg[key] = overrides[key]
    check_values(cfg)  # the setting decides the row: an unknown one must not fall back to another
    recipe = cfg["host"] if (method, cfg.get("host")) in HOST_RECIPE else method  # whose rows apply
    rows = RECIPES[recipe]
    setting = setting_of(cfg)
    cfg.update(rows.get(setting) or rows.get("all") or rows.get("b2n" if setting == "xd" else "fewshot"))
    for key, extra in sorted(DATASET_OVERRIDES.items(), key=lambda kv: len(kv[0])):  # setting rows last
        m, d, s = key if len(key) == 3 else (*key, setting)
        if d == dataset and m in ("*", recipe) and s == setting:
            cfg.update(extra)
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} for method {method!r}. Valid keys: {', '.join(sorted(cfg))}")
    cfg.update(overrides)
    for key, switch in SWITCHES.items():
        value = cfg.get(key)
        if value and isinstance(value, str):  # a string switch: the recipe its value names, keys this run has
            if value not in switch or (method != "fvgpt" and value != recipe):
                raise ConfigError(f"--{key.replace('_', '-')} {value!r}: expected the run's method (fvgpt: its host "
                                  f"run's), one of {', '.join(switch)}")
            switch = {k: v for k, v in switch[value].items() if k in cfg}
        if value:
            cfg.update({k: v for k, v in switch.items() if k not in overrides})
    if not 0 < cfg["data_fraction"] <= 1:
        raise ConfigError(f"--data-fraction {cfg['data_fraction']}: expected a value in (0, 1]")
    if cfg["data_fraction"] < 1:
        cfg["shots"] = 0  # the fraction is drawn from the full train split
    if isinstance(cfg["epochs"], dict):
        table = cfg["epochs"]
        cfg["epochs"] = table.get(cfg["shots"], table[max(k for k in table if k <= max(cfg["shots"], 1))])
    if cfg.get("template") == "":  # "" = the dataset's hand-crafted template (zsclip, kgcoop; protocol §8)
        cfg["template"] = data.DATASETS[dataset].template
    cfg["setting"] = setting_of(cfg)
    check_values(cfg)
    return cfg


def parse_value(key, text, default):
    """Type a command-line value by its default's type."""
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, (tuple, list)):
            return tuple(float(x) for x in text.split(","))
        if isinstance(default, dict):
            return int(text)
        return text
    except ValueError:
        raise ConfigError(f"--{key.replace('_', '-')}: cannot read {text!r} as {type(default).__name__}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Any config key can be set with --key value (see --show-config); unknown keys are errors.")
    p.add_argument("--method", required=True, help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--dataset", required=True, help="a name of data.DATASETS (toy works offline)")
    p.add_argument("--root", default="DATA", help="data root holding the dataset folders (default DATA)")
    p.add_argument("--out", default="runs", help="where run folders go (default runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="continue the run in its folder from its last epoch")
    p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (errors are one line)")
    # config keys are taken out first, so a value that starts with "-" (e.g. --tag -h1) is never read as a flag
    fixed = {a for action in p._actions for a in action.option_strings}
    overrides, known, i = {}, [], 0
    while i < len(argv):
        if argv[i].startswith("--") and argv[i] not in fixed and "=" not in argv[i]:
            if i + 1 >= len(argv):
                p.error(f"{argv[i]} needs a value (--key value)")
            overrides[argv[i][2:].replace("-", "_")] = argv[i + 1]
            i += 2
        else:
            known.append(argv[i])
            i += 1
    args = p.parse_args(known)
    base = resolve_config(args.method, args.dataset, {k: overrides[k] for k in ("host",) if k in overrides})
    typed = {}
    for k, v in overrides.items():
        if k not in base:
            resolve_config(args.method, args.dataset, {k: v})  # raises the unknown-key error
        typed[k] = parse_value(k, v, base[k])
    args.cfg = resolve_config(args.method, args.dataset, typed)
    return args


# ----------------------------------------------------------------------------------------------------------
# schedule (protocol §6)


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


# ----------------------------------------------------------------------------------------------------------
# the toy CLIP (toy.md): contrastive pretraining of a small CLIP on toy captions, cached on disk

TOY_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
                  context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                  transformer_layers=4)
# lr 1e-3 / weight decay 0.01: with 3e-3 / 0.1 the towers stayed at a colour-only solution (25-43% zero-shot).
# 3000 steps of 128: about 7 min on one core (issue 14 allows 10); 94-96 % zero-shot on held-out images.
TOY_PRETRAIN = dict(seed=0, steps=3000, batch=128, lr=1e-3, weight_decay=0.01, warmup=100, images=20000)


def toy_clip_path(root):
    return os.path.join(root, "toy_clip", "toy_clip.pt")


def toy_caption_table():
    """Every pretraining caption, tokenized, and its attributes. Row ((t * K + k) * (C + 1) + y + 1) * (S + 1) + s + 1
    is template k of class y (-1: the scene alone) naming scene s (-1: none), tinted t (0 / 1).
    -> (tokens [2 K (C + 1) (S + 1), 77], attributes [rows, 3] = (class, scene, tinted))."""
    C, S, K = len(data.TOY_CLASSNAMES), len(data.TOY_SCENES), len(data.TOY_CAPTION_TEMPLATES)
    texts, attrs = [], []
    for t in (0, 1):
        for k in range(K):
            for y in range(-1, C):
                for s in range(-1, S):
                    scene = data.TOY_SCENES[s] if s >= 0 else ("" if y >= 0 else "no")  # "no scene": never drawn
                    texts.append(data.toy_caption(data.TOY_CLASSNAMES[y] if y >= 0 else None, k, scene, bool(t)))
                    attrs.append((y, s, t))
    return dapt.tokenize(texts), torch.tensor(attrs)


def pretrain_toy_clip(root, steps=None, quiet=False):
    """Pretrain (or load from cache) the toy CLIP; returns the checkpoint path. Deterministic for the recipe and
    the thread count; uses its own generators (the global random state is left as it was: issue 11).

    Contrastive image-caption training on toy images generated in memory (data.toy_pretrain_images: plain and
    tinted photos, scenes independent of the class). Each image gets a caption drawn this step (random
    template; the scene named half of the time; "tinted" iff the image is); positives are every caption of the
    batch that is true of the image (same class, same domain, the same scene if one is named; a blank background
    is never named), a symmetric InfoNCE with soft targets, learnable temperature capped at 100 as OpenAI's;
    AdamW + cosine. Zero-shot accuracies are written beside the weights (toy_clip.json)."""
    path = toy_clip_path(root)
    recipe = dict(TOY_PRETRAIN, config=TOY_CONFIG, toy_version=data.TOY_VERSION, steps=steps or TOY_PRETRAIN["steps"])
    meta_path = path.replace(".pt", ".json")
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("recipe") == json.loads(json.dumps(recipe)):
                return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"pretraining the toy CLIP ({recipe['steps']} steps, cached at {path}) ...")
    t0 = time.time()
    # set-up work: building and initialising models draws from the global generator, so it runs in a fork whose
    # state is thrown away; a run's result then does not depend on whether its root was fresh (issue 11)
    with torch.random.fork_rng(devices=[]):
        state, acc = _pretrain_toy_clip(recipe, say, t0)
    say("toy CLIP zero-shot accuracy on held-out images: " + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items()))
    atomic_save(state, path)
    write_json(meta_path, dict(recipe=recipe, zero_shot_accuracy=acc, seconds=round(time.time() - t0, 1)))
    return path


def _pretrain_toy_clip(recipe, say, t0):
    """The training loop of pretrain_toy_clip -> (state dict with the full token embedding, zero-shot accuracies)."""
    images, labels, scenes, tinted = (torch.as_tensor(a)
                                      for a in data.toy_pretrain_images(recipe["images"], recipe["seed"]))
    tokens, cap_attrs = toy_caption_table()
    C, S, K = len(data.TOY_CLASSNAMES), len(data.TOY_SCENES), len(data.TOY_CAPTION_TEMPLATES)
    # The captions use a few dozen of the 49408 BPE ids: train a model whose embedding table holds only those
    # rows (ids remapped in sorted order, so end-of-text stays the largest id), then put them back into the
    # full table, whose other rows keep their initialisation. Same result for the toy captions, 20x less work.
    used, tokens = torch.unique(tokens, sorted=True, return_inverse=True)
    torch.manual_seed(recipe["seed"])  # inside the caller's fork_rng
    model = dapt.CLIP(**dict(TOY_CONFIG, vocab_size=len(used))).train()
    full_embedding = torch.empty(TOY_CONFIG["vocab_size"], TOY_CONFIG["transformer_width"]).normal_(std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    g = torch.Generator().manual_seed(recipe["seed"])
    name_scene = data.TOY_PRETRAIN_MIX["name_scene"]
    for step in range(recipe["steps"]):
        warm = min(1.0, (step + 1) / recipe["warmup"])
        lr = recipe["lr"] * warm * 0.5 * (1 + math.cos(math.pi * step / recipe["steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(images), (recipe["batch"],), generator=g)
        y, s, t = labels[idx], scenes[idx], tinted[idx].long()
        # this step's caption of each image: a random template, the scene named half of the time (always for a
        # scene alone)
        k = torch.randint(K, (len(idx),), generator=g)
        named = ((torch.rand(len(idx), generator=g) < name_scene) | (y < 0)) & (s >= 0)
        rows = ((t * K + k) * (C + 1) + y + 1) * (S + 1) + torch.where(named, s + 1, 0)
        cy, cs, ct = cap_attrs[rows].unbind(1)
        positive = (y[:, None] == cy) & (t[:, None] == ct) & ((cs == -1) | (s[:, None] == cs))  # [B images, B captions]
        img = F.normalize(model.encode_image(toy_images_to_tensor(images[idx])), dim=-1)
        txt = F.normalize(model.encode_text(tokens[rows]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        p = positive.float()
        loss_i = -(p / p.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
        loss_t = -(p / p.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 250 == 0 or step == recipe["steps"] - 1:
            say(f"  toy CLIP step {step}/{recipe['steps']} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full_embedding[used] = state["token_embedding.weight"]
    state["token_embedding.weight"] = full_embedding
    return state, toy_zero_shot_accuracy(dapt.build_clip(state))


def toy_images_to_tensor(images):
    """uint8 [N, H, W, 3] -> CLIP-normalised float [N, 3, H, W] (the toy images are already 32 px)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(data.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(data.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def toy_zero_shot_accuracy(model, n=2400, seed=12345):
    """Zero-shot accuracy (%) on held-out pretraining-style images: all classes with "a photo of a {}." on plain
    and on tinted images, with "a tinted photo of a {}." on tinted images, and the scene of plain images (one
    caption "a photo of a <its class> on <scene>." per scene): does the image feature encode the background?"""
    images, labels, scenes, tinted = (torch.as_tensor(a) for a in data.toy_pretrain_images(n, seed=seed))
    img = dapt.normalize(model.encode_image(toy_images_to_tensor(images)))
    texts = lambda template, names: dapt.encode_texts(model, [template.format(c) for c in names])  # noqa: E731
    plain = (img @ texts("a photo of a {}.", data.TOY_CLASSNAMES).t()).argmax(-1)
    tint = (img @ texts("a tinted photo of a {}.", data.TOY_CLASSNAMES).t()).argmax(-1)
    S = len(data.TOY_SCENES)
    T = texts("a photo of a {}.", [f"{c} on {s}" for c in data.TOY_CLASSNAMES for s in data.TOY_SCENES])
    T = T.view(-1, S, img.shape[1])
    obj = (labels >= 0) & (scenes >= 0)
    scene = torch.einsum("be,bse->bs", img[obj], T[labels[obj]]).argmax(-1)
    acc = lambda hit: round(100.0 * hit.float().mean().item(), 2)  # noqa: E731
    obj_any = labels >= 0
    return dict(plain=acc((plain == labels)[obj_any & ~tinted]),
                tinted_plain_prompt=acc((plain == labels)[obj_any & tinted]),
                tinted=acc((tint == labels)[obj_any & tinted]), scene=acc((scene == scenes[obj])[~tinted[obj]]))


# ----------------------------------------------------------------------------------------------------------
# runs: folders, atomic files, logging


def run_dir_of(out, cfg):
    amount = f"frac{cfg['data_fraction']:g}" if cfg.get("data_fraction", 1.0) < 1 else f"shots{cfg['shots']}"
    return os.path.join(out, cfg["setting"], cfg["dataset"], cfg["method"] + cfg["tag"], f"{amount}_seed{cfg['seed']}")


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file. Under
    torchrun only rank 0 writes (every run file goes through here or write_json)."""
    if not is_main():
        return
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    if not is_main():
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record is written (not as it was when the handler was made)."""

    stream = property(lambda self: sys.stderr, lambda self, value: None)


def setup_logging(run_dir):
    """Human-readable log: run_dir/log.txt and stderr (info and up), until close_logging (the end of the run)."""
    log.setLevel(logging.INFO)
    close_logging()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.FileHandler(os.path.join(run_dir, "log.txt")), _Stderr()]
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


def read_json(path, what="file"):
    """A JSON file of a run folder; RunError naming the file if it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path}: no such {what}") from None
    except ValueError as e:
        raise RunError(f"{path}: not a readable JSON {what} ({e})") from None


# config.json holds the run config plus what it resolved to; these keys describe the machine and the data
# copy, not the run, and may differ when a run is resumed or its command repeated.
RECORD_ONLY = ("root", "device", "transform_train", "transform_test", "trainable_values", "benchmark", "versions",
               "attention_resolved")


def config_changes(cfg, saved, device):
    """{key: (value in the run's config.json, value now)} for every key that differs (the resolved precision
    too, since it follows the device)."""
    now = json.loads(json.dumps(dict(cfg, precision_resolved=precision_of(cfg, device)[0]), default=str))
    then = {k: v for k, v in saved.items() if k not in RECORD_ONLY}
    absent = "(absent)"
    return {k: (then.get(k, absent), now.get(k, absent)) for k in sorted(set(now) | set(then))
            if then.get(k, absent) != now.get(k, absent)}


def folder_state(run_dir, cfg, device, resume):
    """What a run folder holds for this command, reading only: "new" (nothing, or a run that never finished an
    epoch: it starts over), "resume" (--resume on a run with finished epochs) or "finished" (result.json; the
    same config). Raises RunError for a changed config of a run with progress or with --resume (listing the
    keys), and for an unfinished run without --resume."""
    cfg_path = os.path.join(run_dir, "config.json")
    finished = os.path.exists(os.path.join(run_dir, "result.json"))
    progress = os.path.exists(os.path.join(run_dir, "resume.pt"))
    if not os.path.exists(cfg_path):
        if finished or progress:
            raise RunError(f"{run_dir} holds a run's files but no config.json, so this command cannot tell whether it "
                           "is the same run; nothing was changed: use --tag or --out, or restore config.json")
        return "new"
    changes = config_changes(cfg, read_json(cfg_path, "run config"), device)
    if changes and (resume or progress or finished):
        listed = "; ".join(f"{k} {a!r} in the run, {b!r} now" for k, (a, b) in changes.items())
        what = "finished run" if finished else "run"
        raise RunError(f"{run_dir} holds a {what} with another config ({listed}). Nothing was changed: a run keeps "
                       "the config it started with; use --tag or --out for a new run"
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
            raise RunError(f"{self.run_dir}: another process{f' (pid {holder})' if holder else ''} is training in this "
                           f"folder (it holds {self.path}); wait for it to end, or use --tag or --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


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


def log_to_file(level, message):
    """A record for the run's log.txt only (for what the command line prints itself)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for h in log.handlers:
        if getattr(h, "_dapt_run", False) and isinstance(h, logging.FileHandler):
            h.handle(record)


def versions(device):
    v = dict(python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__,
             pillow=PIL.__version__, platform=platform.platform())
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    if str(device).startswith("cuda"):
        v["gpu"] = torch.cuda.get_device_name(device)
    return v


# ----------------------------------------------------------------------------------------------------------
# data parallel: torchrun --nproc_per_node N train.py ... trains one run in N processes (DDP semantics: every
# process holds the model, takes its part of each global batch, and the gradients are averaged; rank 0 writes)


def world():
    """(rank, number of processes): (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    return world()[0] == 0


def start_parallel(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on the CPU); on CUDA each
    process takes the GPU of its LOCAL_RANK. Returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
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


def average_gradients(params, n):
    """DDP's gradient: the mean over the global batch, sum_r n_r grad_r / sum_r n_r with n_r this process's
    samples (the processes' batches can differ by one sample). The counts stay tensors (no host read)."""
    count = all_sum(torch.tensor(float(n), device=params[0].device))
    for p in params:
        if p.grad is not None:
            p.grad.mul_(n)
            all_sum(p.grad)
            p.grad.div_(count)


# ----------------------------------------------------------------------------------------------------------
# building the pieces of a run


def precision_of(cfg, device):
    """(name, weights dtype, autocast dtype or None, loss scaling) — protocol §6: fp32 on the CPU."""
    p = cfg["precision"]
    if p == "auto":
        p = "bf16" if str(device).startswith("cuda") else "fp32"
    if p not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision {p!r}: expected auto, fp32, bf16 or fp16")
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[p]
    return p, dtype, (None if p == "fp32" else dtype), p == "fp16"


def load_backbone(cfg, root, device):
    name = cfg["clip"]
    if name == "toy":
        name = on_main(lambda: pretrain_toy_clip(root))  # under torchrun: rank 0 pretrains, the others wait
    _, dtype, _, _ = precision_of(cfg, device)
    model = dapt.load_clip(name, device=device, dtype=dtype)
    model.set_attention(cfg["attn"])
    return model


def transforms_of(cfg, bench, resolution=None):
    """Train / test transforms; the size is --image-size, else the CLIP's input resolution (a toy CLIP on a
    224 px dataset evaluates at 32 px), else the dataset's."""
    size = cfg["image_size"] or resolution or bench.meta["image_size"]
    kw = dict(size=size, scale=tuple(cfg["rrc_scale"]), ratio=tuple(cfg["rrc_ratio"]),
              interpolation=cfg["interpolation"], hflip=cfg["hflip"],
              mask_interpolation="bicubic" if cfg["mask_quirk"] else "nearest")  # DAPT's official quirk
    train_tf = data.build_transform(True, resize_only=cfg["resize_only"], **kw)
    test_tf = data.build_transform(False, **kw)
    return train_tf, test_tf


def data_fraction_split(bench, fraction, seed):
    """Keep a class-balanced random fraction of bench.train: round(fraction * n_c) images of class c (>= 1),
    drawn with a generator seeded by the run seed. Recorded in bench.meta (config.json, result.json)."""
    by_class = {}
    for item in bench.train:
        by_class.setdefault(item[1], []).append(item)
    g = torch.Generator().manual_seed(seed)
    kept = []
    for label in sorted(by_class):
        items = by_class[label]
        k = max(1, round(fraction * len(items)))
        kept += [items[i] for i in sorted(torch.randperm(len(items), generator=g)[:k].tolist())]
    bench.meta = dict(bench.meta, data_fraction=fraction, train_full=len(bench.train), train_kept=len(kept))
    bench.train = kept
    log.info("data_fraction %g: %d of %d training images (class-balanced, seed %d)", fraction, len(kept),
             bench.meta["train_full"], seed)
    return bench


def load_host(cfg, clip, classnames):
    """The frozen first-stage model of an fvgpt run: cfg["host_run"]'s checkpoint on this run's CLIP."""
    path = os.path.join(cfg["host_run"], "checkpoint.pt")
    if not cfg["host_run"] or not os.path.exists(path):
        raise ConfigError(f"fvgpt needs --host-run RUN_DIR, a finished run folder of train.py holding checkpoint.pt "
                          f"(got {cfg['host_run']!r}); train the host first, e.g. --method coop --subsample base")
    ckpt = dapt.read_run_file(path, clip.logit_scale.device)
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
    host = build_model(host_cfg, clip, classnames)
    dapt.restore(host, ckpt, path)
    return host


def build_model(cfg, clip, classnames):
    """The run's prompt model: dapt.METHODS[method] with the run config (fvgpt: on its host run's model)."""
    if cfg["method"] == "fvgpt":
        return dapt.FVGPT(load_host(cfg, clip, classnames), classnames, cfg)
    return dapt.METHODS[cfg["method"]](clip, classnames, cfg)


def make_loader(cfg, bench, items, transform, train, model, patch_size):
    masks = train and model.needs_masks
    return data.build_loader(
        items, transform, cfg["batch"] if train else cfg["test_batch"], train=train, workers=cfg["workers"],
        seed=cfg["seed"], masks=masks, dataset_dir=bench.meta["dataset_dir"],
        mask_encoding=bench.meta.get("mask_encoding"), allow_missing_masks=cfg["allow_missing_masks"],
        patch_size=patch_size if masks else None, dassl_drop_last=cfg["dassl_drop_last"],
        class_balanced=cfg["class_balanced"] if train else 0, shard=world())


def make_optimizer(cfg, model):
    params = model.param_groups()  # the model's own groups, e.g. no weight decay on biases
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise ConfigError(f"--optimizer {cfg['optimizer']!r}: expected sgd or adamw")


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, loader, device, autocast_dtype=None):
    """Top-1 accuracy (%) of model over a loader; class text features computed once."""
    model.eval()
    correct = total = 0
    with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
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


# ----------------------------------------------------------------------------------------------------------
# one run: open the folder, build, fit, select, evaluate


class RunError(RuntimeError):
    """A run that cannot start or go on (its folder, a non-finite loss); the message says what to do."""


class NonFiniteLoss(RunError):
    pass


def train(cfg, root="DATA", out="runs", device="cpu", resume=False):
    """Train and evaluate one run; returns the result dict (also written to result.json) with "run_dir" added.
    A finished run with the same config is not retrained: its result.json is returned, nothing is written."""
    run_dir = run_dir_of(out, cfg)
    if on_main(lambda: folder_state(run_dir, cfg, device, resume)) == "finished":  # reads only: writes nothing
        return on_main(lambda: finished_result(run_dir))
    with RunLock(run_dir) if is_main() else contextlib.nullcontext(), torch_threads(cfg["threads"]):
        state = on_main(lambda: folder_state(run_dir, cfg, device, resume))  # again: another may have finished
        if state == "finished":
            return on_main(lambda: finished_result(run_dir))
        if is_main():  # rank 0 logs to the run folder (the other processes of a torchrun log warnings only)
            open_run(run_dir, state, resume)
        try:
            t_start = time.time()
            bench, model, train_tf, test_tf, precision = build_run(cfg, root, device)
            record = record_config(cfg, run_dir, root, device, bench, model, train_tf, test_tf, precision, state)
            best, samples = fit(cfg, run_dir, model, bench, train_tf, test_tf, device, state == "resume")
            result = finish_run(cfg, run_dir, root, device, bench, model, test_tf, record, best, samples, t_start)
        except USER_ERRORS as e:  # the command line prints it; the log keeps it too
            log_to_file(logging.ERROR, f"error: {e}")
            raise
        finally:
            close_logging()
    return dict(result, run_dir=run_dir)


def finish_run(cfg, run_dir, root, device, bench, model, test_tf, record, best, samples, t_start):
    """Evaluate, check, and write result.json (the mark of a finished run)."""
    accuracies = evaluate_settings(cfg, model, bench, root, test_tf, device)
    classnames, images = accuracies.pop("classnames"), accuracies.pop("images")
    trained = cfg["method"] != "zsclip" and cfg["epochs"] > 0 and cfg["lr"] > 0
    checks = health(model, accuracies, images, classnames, trained)
    result = dict(
        method=cfg["method"], dataset=cfg["dataset"], setting=cfg["setting"], shots=cfg["shots"], seed=cfg["seed"],
        subsample=cfg["subsample"], tag=cfg["tag"], data_fraction=cfg["data_fraction"], accuracy=accuracies,
        test_images=images, classnames=classnames, config=record, samples_per_epoch=samples,
        selected_epoch=best["epoch"] if best else (cfg["epochs"] if cfg["method"] != "zsclip" else 0), **checks,
        checkpoint_sha256=on_main(lambda: clip_module.file_sha256(os.path.join(run_dir, "checkpoint.pt"))),
        seconds=round(time.time() - t_start, 1), finished=datetime.datetime.now().isoformat(timespec="seconds"))
    if cfg["dataset"] == "toy":
        result["zero_shot_reference"] = zero_shot_reference(cfg, root, bench, test_tf, device)
    write_json(os.path.join(run_dir, "result.json"), result)
    log.info("result: %s", json.dumps(result["accuracy"]))
    return result


def finished_result(run_dir):
    result = read_json(os.path.join(run_dir, "result.json"), "run result")
    return dict(result, run_dir=run_dir, already_finished=True)


def open_run(run_dir, state, resume):
    """Logging to the run folder's log.txt (appended); says what the folder held."""
    setup_logging(run_dir)
    if state == "resume":
        log.info("resuming the run in %s", run_dir)
    elif os.path.exists(os.path.join(run_dir, "config.json")):
        for name in ("metrics.jsonl", "checkpoint.pt", "best.pt"):  # what an unfinished first epoch left
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
        log.info("%s held a run that finished no epoch: starting it over%s", run_dir,
                 " (--resume: nothing to resume)" if resume else "")


def build_run(cfg, root, device):
    """(benchmark, model on device with float32 prompts, train / test transforms, precision name).

    The random states are seeded from the run seed right before the model is built, after the data, the
    backbone and their caches (toy data, toy CLIP pretraining, few-shot splits), and the model's one-off set-up
    runs with the states kept: a run's result depends on its config and seed, not on what was cached before."""
    load = lambda: data.load_benchmark(cfg["dataset"], root, shots=cfg["shots"], seed=cfg["seed"],  # noqa: E731
                                       subsample=cfg["subsample"])
    on_main(lambda: load() and None)  # rank 0 makes what is missing (toy data, split caches), then every rank reads
    bench = load()
    if cfg.get("template") == "":  # a folder dataset's template is known once it is read (DIR/template.txt)
        cfg["template"] = bench.template
    if cfg["data_fraction"] < 1:
        bench = data_fraction_split(bench, cfg["data_fraction"], cfg["seed"])
    clip = load_backbone(cfg, root, device)
    precision = precision_of(cfg, device)[0]
    seed_everything(cfg["seed"])
    model = build_model(cfg, clip, bench.classnames).to(device)
    train_tf, test_tf = transforms_of(cfg, bench, clip.visual.input_resolution)
    if model.needs_masks:  # the mask encoding, resolved once and recorded (config.json's benchmark entry)
        d = bench.meta["dataset_dir"]
        enc, how = data.resolve_mask_encoding(d, [data.mask_path(d, p) for p, _, _ in bench.train],
                                              "official" if cfg["mask_quirk"] else cfg["mask_encoding"])
        bench.meta = dict(bench.meta, mask_encoding=enc, mask_encoding_source="--mask-quirk" if cfg["mask_quirk"] else how)
    if cfg["epochs"] > 0:  # one-off set-up from the training images (dapt-dist prototypes, DA-VPT clusters)
        with kept_rng(device):
            model.prepare(bench, train_tf, test_tf, device)
    for p in model.parameters():  # prompt parameters and optimizer state in float32 (protocol §6)
        if p.requires_grad:
            p.data = p.data.float()
    return bench, model, train_tf, test_tf, precision


def record_config(cfg, run_dir, root, device, bench, model, train_tf, test_tf, precision, state="new"):
    """config.json: the run config and every constant it resolved to (transforms, sizes, versions). A resumed
    run keeps the config.json it started with (this process's versions go to the log)."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record = dict(cfg, root=os.path.abspath(root), device=str(device), precision_resolved=precision,
                  attention_resolved=kernels.describe_backend(cfg["attn"], torch.device(device).type),
                  transform_train=train_tf.constants(), transform_test=test_tf.constants(),
                  trainable_values=n_params, benchmark=bench.meta, versions=versions(device))
    log.info("run %s", run_dir)
    log.info("config %s", json.dumps({k: v for k, v in record.items() if k != "benchmark"}, default=str))
    log.info("attention (--attn %s): %s; precision %s", cfg["attn"], record["attention_resolved"], precision)
    if state == "resume":
        record = read_json(os.path.join(run_dir, "config.json"), "run config")
    else:
        write_json(os.path.join(run_dir, "config.json"), record)
    log.info("data: %d train / %d val / %d test images, %d classes; trainable values: %d",
             len(bench.train), len(bench.val), len(bench.test), len(bench.classnames), n_params)
    return record


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
    val_loader = None
    if cfg["selection"] == "best_val":
        if bench.val:
            val_loader = make_loader(cfg, bench, bench.val, test_tf, False, model, patch)
        else:
            log.warning("selection=best_val but %s has no val split: using the last epoch", cfg["dataset"])
    done, best, exploded = 0, None, False  # done: finished epochs
    if resume:
        state = dapt.read_run_file(resume_path, device)
        dapt.restore(model, state, resume_path)
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        done, best = state["epoch"] + 1, state.get("best")
        rng = state["rng"]  # under torchrun a list: one state per process
        set_rng_state(rng[world()[0]] if isinstance(rng, list) else rng)  # last: nothing above draws
        lines = read_metrics(run_dir)  # an epoch written after resume.pt was saved is trained again
        if len(lines) != done and is_main():
            with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in lines if m["epoch"] <= done)
        log.info("resumed after epoch %d of %d", done, epochs)
    try:
        for epoch in range(done, epochs):  # epoch: 0-based inside the loop (schedules), epoch + 1 where read
            stats = train_one_epoch(cfg, model, opt, scaler, loader, epoch, device, autocast_dtype)
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
            msg = (f"{e}. Stopped in the first epoch: no checkpoint exists (no epoch finished). Lower --lr or check the "
                   "inputs, then run the command again (the folder holds no progress, it starts over)")
        else:
            msg = (f"{e}. Stopped; the last good checkpoint (epoch {done}) is kept in {run_dir}. --resume would repeat "
                   "the same steps (it is exact): lower --lr or check the inputs in a new run (--tag or --out)")
        raise NonFiniteLoss(f"non-finite loss: {msg}") from None
    if best is not None and cfg["selection"] == "best_val":
        path = os.path.join(run_dir, "best.pt")
        on_main(lambda: None)  # rank 0 has written it
        dapt.restore(model, dapt.read_run_file(path, device), path)  # parameters and extra state (DA-VPT's map)
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


def train_one_epoch(cfg, model, opt, scaler, loader, epoch, device, autocast_dtype):
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
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, stats = model.loss(batch, epoch)
        value = loss.detach().float()
        if bad_step is None:
            bad_step, bad_loss = torch.full_like(value, -1, dtype=torch.long), torch.zeros_like(value)
        first = ~torch.isfinite(value) & (bad_step < 0)
        bad_step, bad_loss = torch.where(first, step, bad_step), torch.where(first, value, bad_loss)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        n = len(batch["label"])
        if world()[1] > 1:
            average_gradients([p for p in model.parameters() if p.requires_grad], n)
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
            eta = (steps - step - 1) * (now - t0) / (step + 1) + (cfg["epochs"] - epoch - 1) * steps * (now - t0) / (step + 1)
            log.info("epoch %d/%d step %d/%d loss %.4f lr %.3e %.1f img/s eta %s", epoch + 1, cfg["epochs"], step + 1,
                     steps, float(value), lr, ips, datetime.timedelta(seconds=int(eta)))
            last_print = now
    seen = int(all_sum(torch.tensor(float(seen))))  # every process's samples (a CPU tensor: gloo and NCCL)
    avg = {k: float(all_sum(v)) / max(seen, 1) for k, v in sums.items()}
    return dict(loss=avg.pop("loss", 0.0), train_acc=100 * avg.pop("acc", 0.0), lr=lr, samples=int(seen), **avg)


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


def at_chance(acc, images, classes):
    """Whether a top-1 accuracy (%) is within 3 standard errors of guessing one of `classes` on `images` images."""
    p = 1 / max(classes, 1)
    return acc <= 100 * (p + 3 * math.sqrt(p * (1 - p) / max(images, 1)))


def health(model, accuracies, images, classnames, trained):
    """Guards on the final model: {"flags": names, "warnings": sentences, "param_rms_max": value}. Flags:
    exploded_parameters (a trained tensor's RMS value > PARAM_RMS_LIMIT), accuracy_at_chance (after training
    with lr > 0, a subset's accuracy within 3 standard errors of 100 / classes)."""
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
    for w in warnings:
        log.warning("%s", w)
    return dict(flags=flags, warnings=warnings, param_rms_max=rms)


def zero_shot_reference(cfg, root, bench, test_tf, device):
    """Toy runs: the accuracy of zero-shot CLIP (--method zsclip with this run's data, backbone and
    evaluation settings) on the same test images, {subset: top-1 %}."""
    keys = ("subsample", "setting", "shots", "seed", "clip", "data_fraction", "precision", "attn", "workers",
            "test_batch", "threads")
    zcfg = resolve_config("zsclip", cfg["dataset"], {k: cfg[k] for k in keys})
    weights = toy_clip_path(root) if zcfg["clip"] == "toy" else zcfg["clip"]
    stat = os.stat(weights) if os.path.isfile(weights) else None
    key = json.dumps([zcfg, os.path.abspath(root), weights, stat and (stat.st_size, stat.st_mtime_ns), str(device),
                      [p for p, _, _ in bench.test], test_tf.constants()], default=str)
    if key not in _ZERO_SHOT:  # runs of one process (a sweep, the tests) share it
        with kept_rng(device):
            model = build_model(zcfg, load_backbone(zcfg, root, device), bench.classnames).to(device)
            acc = evaluate_settings(zcfg, model, bench, root, test_tf, device)
        acc.pop("classnames"), acc.pop("images")
        _ZERO_SHOT[key] = acc
    log.info("zero-shot reference (--method zsclip on the same test images): %s", json.dumps(_ZERO_SHOT[key]))
    return dict(_ZERO_SHOT[key])


_ZERO_SHOT = {}


def hm(base, new):
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


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
        lines.append("  zero-shot toy CLIP on the same test images (--method zsclip): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in ref.items()))
    for w in result.get("warnings", []):
        lines.append(f"  WARNING: {w}")
    lines.append(f"run folder: {result['run_dir']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# sweeps: a paper table as one command, `python train.py sweep PLAN [--resume]` (plans/*.txt)
#
# A plan is a text file with one run per line, written as train.py arguments ('#' starts a comment; a line
# ending in '\' goes on), and a small grid syntax:
#   NAME = words      a variable: $NAME or ${NAME} in later lines is replaced by the words
#   {a,b,c}           one run per value; several groups give every combination (the leftmost varies slowest)
#   {key}             the value of --key in the same run once expanded ({seed}, {dataset}), or the sweep's {out}
#                     and {root} (e.g. --host-run {out}/b2n/{dataset}/coop-fvg/shots16_seed{seed})
# The sweep's --root, --out and --device apply to every line that does not give them. Finished runs (result.json)
# are skipped, unfinished ones resumed with --resume, runs are trained one after the other in this process.

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
            args = parse_args(argv)
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
                result = train(args.cfg, root=args.root, out=args.out, device=args.device, resume=st == "unfinished")
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
                running[i] = (subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdout=out,
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
    p = argparse.ArgumentParser(prog="train.py sweep", allow_abbrev=False,
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
    except USER_ERRORS as e:
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


# the project's own errors, and the file system's (permissions, disk full): one message and exit code 1 from
# main(), no traceback (--debug shows it)
USER_ERRORS = (ConfigError, RunError, clip_module.CheckpointError, data.DataError, OSError)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:  # python train.py sweep PLAN... (sweep_main)
        return sweep_main(argv[1:])
    try:
        args = parse_args(argv)
        if args.show_config:
            print(json.dumps(args.cfg, indent=1, default=str))
            return None
        device = start_parallel(args.device)  # torchrun: one run in WORLD_SIZE processes
        result = train(args.cfg, root=args.root, out=args.out, device=device, resume=args.resume)
        rank0 = is_main()
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        if is_main():
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        stop_parallel()
    if rank0:
        print(describe(result))
    return result


if __name__ == "__main__":
    main()
