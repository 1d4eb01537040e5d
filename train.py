"""Train one prompt-tuning method on one dataset, shot count, seed and class subset; evaluate it; write a run.

    python train.py --method coop --dataset caltech101 --root DATA --shots 16 --seed 1 --subsample base
    python train.py --method dapt --dataset toy            # offline: toy benchmark + toy CLIP (pretrained here)
    python train.py --method coop --dataset toy --lr 0.01 --epochs 20   # any config key: --key value
    python train.py sweep plans/toy_b2n.txt --resume       # a whole table: one run per plan line, done ones skipped

A run folder `<out>/<setting>/<dataset>/<method><tag>/shots<K>_seed<S>/` holds `config.json` (every
preprocessing and optimisation constant), `log.txt`, `metrics.jsonl` (one line per epoch), `checkpoint.pt`
(learnable parameters + config + class names), `resume.pt` (optimizer state for --resume) and `result.json`.

Configuration is plain values, in this order: COMMON (the run), the model's `defaults` (dapt.py, beside each
class), the method's RECIPES row for the setting, DATASET_OVERRIDES, `--key value` from the command line, then
SWITCHES (a boolean key that swaps in a whole recipe). Unknown keys are errors.
Deliberately not here: the models (dapt.py), multi-GPU, schedulers other than the protocol's, evaluation tables
(eval.py).
"""
import argparse
import datetime
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time

import numpy
import PIL
import torch
import torch.nn.functional as F

import clip as clip_module
import data
import dapt
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
)  # seed and text_savings are model keys every model has (dapt.PromptModel.defaults)

# Per method and setting (fewshot / b2n / xd; "all" = any): optimisation and the setting's model keys.
# `epochs` may be a {shots: epochs} table.
COOP_FS_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
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
    "fvgpt": {"all": dict(host_run="", batch=4, lr=0.0035, epochs=10)},
    # methods.md §10: lr / betas per dataset below
    "dapt-dist": {"all": dict(batch=32, lr=0.002, epochs=COOP_FS_EPOCHS)},
    # methods.md §11: our VPT-deep recipe; official_optim switches to the released one (SWITCHES)
    "davpt": {"all": dict(official_optim=False, batch=4, lr=0.0025, epochs=5)},
}
# A boolean key that swaps in a whole recipe; keys given explicitly (--key value) still win.
SWITCHES = {
    # DA-VPT's released recipe (methods.md §11), with its class-balanced sampler (2 images per class)
    # (Noahsark/DA-VPT configs/fgvc/vitb_cub200: lr 5e-4, head weight decay 5.0, re-clustering from epoch index 1)
    "official_optim": dict(optimizer="adamw", lr=5e-4, weight_decay=0.05, wd_head=5.0, decay_class_embedding=True,
                           epochs=100, warmup_epochs=10, warmup_lr=1e-8, schedule="timm_cosine", min_lr=1e-9,
                           grad_clip=10.0, batch=32, class_balanced=2, kmeans_sampling="official",
                           recluster_from=1),
}
# (method, dataset) -> overrides; "*" matches every method.
DATASET_OVERRIDES = {
    ("coop", "imagenet"): dict(epochs=50),
    # KgCoOp's own template table differs from CoOp's zero-shot one on DTD only (htyao89/KgCoOp, FVG-PT's copy)
    ("kgcoop", "dtd"): dict(template="a photo of a {}, a type of texture."),
    # toy images are 32 px: a crop of 8% of the area often misses the object, so crops keep >= 50% (logged)
    ("*", "toy"): dict(clip="toy", workers=0, rrc_scale=(0.5, 1.0)),
    # dapt-dist (methods.md §10, V, official configs; the same for every shot count). The official prompts are
    # fp16 parameters; ours are fp32 masters trained with the same published SGD lr (unmeasured on real CLIP).
    # Caution from the toy lr sweep (results/dist_davpt.md): in fp32 on the toy CLIP, lr >= 0.2 collapses the
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


def setting_of(cfg):
    return cfg["setting"] or ("b2n" if cfg["subsample"] != "all" else "fewshot")


def resolve_config(method, dataset, overrides):
    """COMMON <- the model's defaults <- RECIPES[method][setting] <- DATASET_OVERRIDES <- overrides (typed)
    <- SWITCHES that are on. Raises ConfigError for unknown methods, datasets and keys."""
    if method not in RECIPES:
        raise ConfigError(f"unknown method {method!r}: expected one of {', '.join(RECIPES)}")
    if dataset not in data.DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}: expected one of {', '.join(data.DATASETS)}")
    cfg = dict(dapt.model_defaults(method, overrides.get("host")), **COMMON, method=method, dataset=dataset)
    for key in ("subsample", "setting", "shots"):  # the setting decides which row applies
        if key in overrides:
            cfg[key] = overrides[key]
    rows = RECIPES[method]
    setting = setting_of(cfg)
    cfg.update(rows.get(setting) or rows.get("all") or rows.get("b2n" if setting == "xd" else "fewshot"))
    for (m, d), extra in DATASET_OVERRIDES.items():
        if d == dataset and m in ("*", method):
            cfg.update(extra)
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} for method {method!r}. Valid keys: {', '.join(sorted(cfg))}")
    cfg.update(overrides)
    for key, switch in SWITCHES.items():
        if cfg.get(key):
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
# lr 1e-3 / weight decay 0.01: with 3e-3 / 0.1 the towers stayed at a colour-only solution (25-43% zero-shot)
TOY_PRETRAIN = dict(seed=0, steps=600, batch=128, lr=1e-3, weight_decay=0.01, warmup=50, images=8000)


def toy_clip_path(root):
    return os.path.join(root, "toy_clip", "toy_clip.pt")


def pretrain_toy_clip(root, steps=None, quiet=False):
    """Pretrain (or load from cache) the toy CLIP; returns the checkpoint path. Deterministic for the recipe.

    Contrastive image-caption training (symmetric InfoNCE, learnable temperature capped at 100 as OpenAI's)
    on clean toy images of all classes generated in memory, AdamW + cosine. The zero-shot accuracy on
    held-out clean images is written beside the weights (toy_clip.json)."""
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
    images, labels, _ = data.toy_pretrain_images(recipe["images"], seed=recipe["seed"])
    x_all, labels = toy_images_to_tensor(images), torch.as_tensor(labels)
    # every caption of every class, [K templates, 24 classes, 77]
    C, K = len(data.TOY_CLASSNAMES), len(data.TOY_CAPTION_TEMPLATES)
    captions = dapt.tokenize([data.toy_caption(c, k) for k in range(K) for c in data.TOY_CLASSNAMES]).view(K, C, -1)
    # The captions use a few dozen of the 49408 BPE ids: train a model whose embedding table holds only those
    # rows (ids remapped in sorted order, so end-of-text stays the largest id), then put them back into the
    # full table, whose other rows keep their initialisation. Same result for the toy captions, 20x less work.
    used, captions = torch.unique(captions, sorted=True, return_inverse=True)
    torch.manual_seed(recipe["seed"])
    model = dapt.CLIP(**dict(TOY_CONFIG, vocab_size=len(used))).train()
    full_embedding = torch.empty(TOY_CONFIG["vocab_size"], TOY_CONFIG["transformer_width"]).normal_(std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    g = torch.Generator().manual_seed(recipe["seed"])
    t0 = time.time()
    for step in range(recipe["steps"]):
        lr = recipe["lr"] * min(1.0, (step + 1) / recipe["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / recipe["steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(x_all), (recipe["batch"],), generator=g)
        y = labels[idx]
        # one caption per class this step (a random template each): images [B] x captions [C] contrastive loss,
        # image -> its class's caption, caption -> the images of its class (uniform over them)
        k = torch.randint(K, (C,), generator=g)
        img = F.normalize(model.encode_image(x_all[idx]), dim=-1)  # [B, E]
        txt = F.normalize(model.encode_text(captions[k, torch.arange(C)]), dim=-1)  # [C, E]
        logits = model.logit_scale.exp() * img @ txt.t()  # [B, C]
        present = torch.zeros(C, dtype=torch.bool).index_fill_(0, y, True)
        target_t = F.one_hot(y, C).t()[present].float()  # [C', B]
        loss_t = torch.sum(-target_t / target_t.sum(1, keepdim=True) * F.log_softmax(logits.t()[present], 1), 1).mean()
        loss = (F.cross_entropy(logits, y) + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == recipe["steps"] - 1:
            say(f"  toy CLIP step {step}/{recipe['steps']} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full_embedding[used] = state["token_embedding.weight"]
    state["token_embedding.weight"] = full_embedding
    model = dapt.build_clip(state)
    acc = toy_zero_shot_accuracy(model)
    say(f"toy CLIP zero-shot accuracy on clean held-out images: {acc:.2f}%")
    atomic_save(state, path)
    write_json(meta_path, dict(recipe=recipe, zero_shot_clean_accuracy=acc, seconds=round(time.time() - t0, 1)))
    return path


def toy_images_to_tensor(images):
    """uint8 [N, H, W, 3] -> CLIP-normalised float [N, 3, H, W] (the toy images are already 32 px)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(data.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(data.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def toy_zero_shot_accuracy(model, n=2400, seed=12345):
    images, labels, _ = data.toy_pretrain_images(n, seed=seed)
    T = dapt.encode_texts(model, [f"a photo of a {c}." for c in data.TOY_CLASSNAMES])
    img = dapt.normalize(model.encode_image(toy_images_to_tensor(images)))
    return 100.0 * ((img @ T.t()).argmax(-1) == torch.as_tensor(labels)).float().mean().item()


# ----------------------------------------------------------------------------------------------------------
# runs: folders, atomic files, logging


def run_dir_of(out, cfg):
    amount = f"frac{cfg['data_fraction']:g}" if cfg.get("data_fraction", 1.0) < 1 else f"shots{cfg['shots']}"
    return os.path.join(out, cfg["setting"], cfg["dataset"], cfg["method"] + cfg["tag"], f"{amount}_seed{cfg['seed']}")


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def setup_logging(run_dir):
    """Human-readable log: run_dir/log.txt and stderr (info and up)."""
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        if getattr(h, "_dapt_run", False):
            log.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.FileHandler(os.path.join(run_dir, "log.txt")), logging.StreamHandler(sys.stderr)]
    for h in handlers:
        h.setFormatter(fmt)
        h._dapt_run = True
        log.addHandler(h)


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
        name = pretrain_toy_clip(root)
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
    ckpt = torch.load(path, map_location=clip.logit_scale.device, weights_only=False)
    host_cfg = ckpt["config"]
    if host_cfg["method"] == "fvgpt":
        raise ConfigError(f"{cfg['host_run']}: the host of fvgpt cannot be an fvgpt run")
    for key, default in (("dataset", None), ("subsample", None), ("shots", None), ("seed", None), ("clip", None),
                         ("data_fraction", 1.0)):
        if host_cfg.get(key, default) != cfg.get(key, default):
            raise ConfigError(f"fvgpt: {key} = {cfg.get(key)!r} but the host run {cfg['host_run']} has "
                              f"{host_cfg.get(key, default)!r}; stage 2 trains on the host's data and backbone")
    host = build_model(host_cfg, clip, classnames)
    host.load_checkpoint(ckpt)
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
        class_balanced=cfg["class_balanced"] if train else 0)


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
            correct += (pred == batch["label"]).sum().item()
            total += len(pred)
    model.train()
    return 100.0 * correct / max(total, 1), total


# ----------------------------------------------------------------------------------------------------------
# one run: open the folder, build, fit, select, evaluate


class RunError(RuntimeError):
    """A run that cannot start or go on (its folder, a non-finite loss); the message says what to do."""


class NonFiniteLoss(RunError):
    pass


def train(cfg, root="DATA", out="runs", device="cpu", resume=False):
    """Train and evaluate one run; returns the result dict (also written to result.json)."""
    run_dir = open_run(cfg, out, resume)
    torch.manual_seed(cfg["seed"])
    t_start = time.time()
    bench, model, train_tf, test_tf, precision = build_run(cfg, root, device)
    record = record_config(cfg, run_dir, root, device, bench, model, train_tf, test_tf, precision)
    best, samples = fit(cfg, run_dir, model, bench, train_tf, test_tf, device, resume)
    accuracies = evaluate_settings(cfg, model, bench, root, test_tf, device)
    result = dict(
        method=cfg["method"], dataset=cfg["dataset"], setting=cfg["setting"], shots=cfg["shots"], seed=cfg["seed"],
        subsample=cfg["subsample"], tag=cfg["tag"], data_fraction=cfg["data_fraction"], accuracy=accuracies,
        classnames=accuracies.pop("classnames"), config=record, samples_per_epoch=samples,
        selected_epoch=best["epoch"] if best else (cfg["epochs"] - 1),
        checkpoint_sha256=clip_module.file_sha256(os.path.join(run_dir, "checkpoint.pt")),
        seconds=round(time.time() - t_start, 1), finished=datetime.datetime.now().isoformat(timespec="seconds"))
    write_json(os.path.join(run_dir, "result.json"), result)
    log.info("result: %s", json.dumps(result["accuracy"]))
    return result


def open_run(cfg, out, resume):
    """The run folder, created, with logging to its log.txt; an existing run needs --resume."""
    run_dir = run_dir_of(out, cfg)
    if os.path.exists(os.path.join(run_dir, "config.json")) and not resume:
        if os.path.exists(os.path.join(run_dir, "result.json")) or os.path.exists(os.path.join(run_dir, "resume.pt")):
            raise RunError(f"{run_dir} already holds a run: pass --resume to continue it, or choose --out / --tag")
    os.makedirs(run_dir, exist_ok=True)
    setup_logging(run_dir)
    return run_dir


def build_run(cfg, root, device):
    """(benchmark, model on device with float32 prompts, train / test transforms, precision name)."""
    bench = data.load_benchmark(cfg["dataset"], root, shots=cfg["shots"], seed=cfg["seed"], subsample=cfg["subsample"])
    if cfg.get("template") == "":  # a folder dataset's template is known once it is read (DIR/template.txt)
        cfg["template"] = bench.template
    if cfg["data_fraction"] < 1:
        bench = data_fraction_split(bench, cfg["data_fraction"], cfg["seed"])
    clip = load_backbone(cfg, root, device)
    precision = precision_of(cfg, device)[0]
    model = build_model(cfg, clip, bench.classnames).to(device)
    train_tf, test_tf = transforms_of(cfg, bench, clip.visual.input_resolution)
    if model.needs_masks:  # the mask encoding, resolved once and recorded (config.json's benchmark entry)
        d = bench.meta["dataset_dir"]
        enc, how = data.resolve_mask_encoding(d, [data.mask_path(d, p) for p, _, _ in bench.train],
                                              "official" if cfg["mask_quirk"] else cfg["mask_encoding"])
        bench.meta = dict(bench.meta, mask_encoding=enc, mask_encoding_source=how)
    if cfg["epochs"] > 0:  # one-off set-up from the training images (dapt-dist prototypes, DA-VPT clusters)
        model.prepare(bench, train_tf, test_tf, device)
    for p in model.parameters():  # prompt parameters and optimizer state in float32 (protocol §6)
        if p.requires_grad:
            p.data = p.data.float()
    return bench, model, train_tf, test_tf, precision


def record_config(cfg, run_dir, root, device, bench, model, train_tf, test_tf, precision):
    """config.json: the run config and every constant it resolved to (transforms, sizes, versions)."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record = dict(cfg, root=os.path.abspath(root), device=str(device), precision_resolved=precision,
                  transform_train=train_tf.constants(), transform_test=test_tf.constants(),
                  trainable_values=n_params, benchmark=bench.meta, versions=versions(device))
    write_json(os.path.join(run_dir, "config.json"), record)
    log.info("run %s", run_dir)
    log.info("config %s", json.dumps({k: v for k, v in record.items() if k != "benchmark"}, default=str))
    log.info("data: %d train / %d val / %d test images, %d classes; trainable values: %d",
             len(bench.train), len(bench.val), len(bench.test), len(bench.classnames), n_params)
    return record


def fit(cfg, run_dir, model, bench, train_tf, test_tf, device, resume):
    """The epochs (from resume.pt with --resume), a checkpoint after each, then the selected epoch's parameters
    in the model. Returns (best-validation record or None, training samples per epoch)."""
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
    scaler = torch.amp.GradScaler(enabled=scale_loss)
    start_epoch, best = 0, None
    if resume and os.path.exists(resume_path):
        state = torch.load(resume_path, map_location=device, weights_only=False)
        model.load_checkpoint(state)
        opt.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"] + 1, state.get("best")
        log.info("resumed from epoch %d", state["epoch"])
    elif resume:
        log.info("--resume: no resume.pt in %s, starting from epoch 0", run_dir)
    loader = make_loader(cfg, bench, bench.train, train_tf, True, model, patch)
    val_loader = None
    if cfg["selection"] == "best_val":
        if bench.val:
            val_loader = make_loader(cfg, bench, bench.val, test_tf, False, model, patch)
        else:
            log.warning("selection=best_val but %s has no val split: using the last epoch", cfg["dataset"])
    try:
        for epoch in range(start_epoch, epochs):
            stats = train_one_epoch(cfg, model, opt, scaler, loader, epoch, device, autocast_dtype)
            model.epoch_end(epoch, loader)
            if val_loader is not None:
                stats["val_acc"], _ = evaluate(model, val_loader, device, autocast_dtype)
                if best is None or stats["val_acc"] > best["val_acc"]:
                    best = dict(epoch=epoch, val_acc=stats["val_acc"])
                    atomic_save(checkpoint_of(model, cfg), os.path.join(run_dir, "best.pt"))
            atomic_save(checkpoint_of(model, cfg), ckpt_path)
            atomic_save(dict(params=model.trainable_state(), optimizer=opt.state_dict(), epoch=epoch, best=best,
                             extra=model.extra_state()), resume_path)
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(dict(epoch=epoch, **stats)) + "\n")
            log.info("epoch %d/%d done: %s", epoch + 1, epochs, ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    except KeyboardInterrupt:
        log.warning("interrupted: the last completed epoch is saved in %s; continue with --resume", run_dir)
        raise
    except NonFiniteLoss as e:
        log.error("%s. Stopped; the last good checkpoint (previous epoch) is kept in %s", e, run_dir)
        raise NonFiniteLoss(f"non-finite loss: {e}") from None
    if best is not None and cfg["selection"] == "best_val":
        state = torch.load(os.path.join(run_dir, "best.pt"), map_location=device, weights_only=False)
        model.load_checkpoint(state)  # parameters and extra state (DA-VPT's map) of the best epoch
        log.info("model selection: best val accuracy %.2f at epoch %d", best["val_acc"], best["epoch"])
    return best, loader.samples_per_epoch


def checkpoint_of(model, cfg):
    return dict(params=model.trainable_state(), config=cfg, classnames=list(model.classnames),
                extra=model.extra_state())


def train_one_epoch(cfg, model, opt, scaler, loader, epoch, device, autocast_dtype):
    model.train()
    loader.set_epoch(epoch)
    steps = len(loader)
    lr = lr_at(cfg, epoch)
    total_loss = total_acc = seen = 0.0
    parts = {}  # the loss's other stats (e.g. its terms), averaged over the epoch
    t0 = last_print = time.time()
    for step, batch in enumerate(loader):
        if cfg["schedule"] != "cosine":  # per update
            lr = lr_at(cfg, epoch, step, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = to_device(batch, device)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, stats = model.loss(batch, epoch)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                                f"(lr {lr:.3g}); lower --lr or check the inputs")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["grad_clip"]:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_value_([p for p in model.parameters() if p.requires_grad], cfg["grad_clip"])
        scaler.step(opt)
        scaler.update()
        n = len(batch["label"])
        total_loss += loss.item() * n
        total_acc += stats.get("acc", 0.0) * n
        for k, v in stats.items():
            if k != "acc":
                parts[k] = parts.get(k, 0.0) + v * n
        seen += n
        now = time.time()
        if step == steps - 1 or (step + 1) % cfg["log_every"] == 0 or now - last_print > 30:
            ips = seen / max(now - t0, 1e-9)
            eta = (steps - step - 1) * (now - t0) / (step + 1) + (cfg["epochs"] - epoch - 1) * steps * (now - t0) / (step + 1)
            log.info("epoch %d/%d step %d/%d loss %.4f lr %.3e %.1f img/s eta %s", epoch + 1, cfg["epochs"], step + 1,
                     steps, loss.item(), lr, ips, datetime.timedelta(seconds=int(eta)))
            last_print = now
    return dict(loss=total_loss / max(seen, 1), train_acc=100 * total_acc / max(seen, 1), lr=lr, samples=int(seen),
                **{k: v / max(seen, 1) for k, v in parts.items()})


def evaluate_settings(cfg, model, bench, root, test_tf, device):
    """Test accuracy on the run's classes; for a base run also on the new classes with the same checkpoint."""
    autocast_dtype, patch = precision_of(cfg, device)[2], model.clip.visual.patch_size
    acc, classnames = {}, {}
    name = cfg["subsample"]
    loader = make_loader(cfg, bench, bench.test, test_tf, False, model, patch)
    acc[name], _ = evaluate(model, loader, device, autocast_dtype)
    classnames[name] = list(bench.classnames)
    if cfg["subsample"] == "base":
        new = data.load_benchmark(cfg["dataset"], root, shots=cfg["shots"], seed=cfg["seed"], subsample="new")
        model.set_classnames(new.classnames)
        acc["new"], _ = evaluate(model, make_loader(cfg, new, new.test, test_tf, False, model, patch), device, autocast_dtype)
        classnames["new"] = list(new.classnames)
        model.set_classnames(bench.classnames)
        acc["hm"] = hm(acc["base"], acc["new"])
    acc["classnames"] = classnames
    return acc


def hm(base, new):
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


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


def sweep(plan, out="runs", root="DATA", device=None, resume=False, dry_run=False, echo=print):
    """Train every run of a plan file that has no result yet, one after the other, with one progress line per run
    (and an ETA from the runs trained so far), also appended to <out>/sweep.log. Every line is parsed and
    resolved before anything runs. -> {"done": n, "trained": n, "failed": [(run dir, error)], "skipped": n}."""
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
        planned.append((args, d, run_status(d)))
    to_train = [st == "todo" or (st == "unfinished" and resume) for _, _, st in planned]
    counts = {s: sum(st == s for _, _, st in planned) for s in ("done", "unfinished", "todo")}
    log_path = os.path.join(out, "sweep.log")

    def say(msg):
        echo(msg)
        if not dry_run:
            os.makedirs(out, exist_ok=True)
            with open(log_path, "a") as f:
                f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {msg}\n")
    say(f"sweep {plan}: {len(planned)} runs: {counts['done']} done, {counts['unfinished']} unfinished, "
        f"{counts['todo']} to train" + (" (dry run)" if dry_run else ""))
    stats, times = dict(done=0, trained=0, failed=[], skipped=0), []
    for i, (args, d, st) in enumerate(planned):
        head = f"[{i + 1}/{len(planned)}] {d}:"
        if st == "done":
            stats["done"] += 1
            say(f"{head} done")
            continue
        if not to_train[i]:
            stats["skipped"] += 1
            say(f"{head} unfinished, skipped (pass --resume to continue it)")
            continue
        if dry_run:
            say(f"{head} would {'resume' if st == 'unfinished' else 'train'}")
            continue
        t0 = time.time()
        try:
            result = train(args.cfg, root=args.root, out=args.out, device=args.device, resume=st == "unfinished")
        except KeyboardInterrupt:
            say(f"{head} interrupted; run the sweep again with --resume to continue")
            raise
        except Exception as e:  # one failed run (an error, a NaN, out of memory) does not stop the table
            log.exception("sweep: %s failed", d)
            stats["failed"].append((d, f"{type(e).__name__}: {e}"))
            what = f"FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        else:
            stats["trained"] += 1
            times.append(time.time() - t0)
            what = f"{'resumed' if st == 'unfinished' else 'trained'} in {times[-1]:.0f}s, {_summary(result)}"
        left = sum(to_train[i + 1:])
        eta = datetime.timedelta(seconds=int(statistics.fmean(times) * left)) if times else "?"
        say(f"{head} {what} | {left} to go, ETA {eta}")
    say(f"sweep {plan}: {stats['done']} were done, {stats['trained']} trained, {len(stats['failed'])} failed, "
        f"{stats['skipped']} unfinished skipped")
    return stats


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
    a = p.parse_args(argv)
    failed = []
    try:
        for plan in a.plans:
            failed += sweep(plan, a.out, a.root, a.device, a.resume, a.dry_run)["failed"]
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if failed:
        print(f"{len(failed)} run(s) failed: " + "; ".join(d for d, _ in failed), file=sys.stderr)
        raise SystemExit(1)
    return 0


# the project's own errors: one line and exit code 1 from main(), no traceback
USER_ERRORS = (ConfigError, RunError, clip_module.CheckpointError, data.DataError)


def main(argv=None):
    if (sys.argv[1:] if argv is None else argv)[:1] == ["sweep"]:  # python train.py sweep PLAN (sweep_main)
        return sweep_main((sys.argv[1:] if argv is None else argv)[1:])
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.show_config:
            print(json.dumps(args.cfg, indent=1, default=str))
            return None
        result = train(args.cfg, root=args.root, out=args.out, device=args.device, resume=args.resume)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    acc = result["accuracy"]
    print(" ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    return result


if __name__ == "__main__":
    main()
