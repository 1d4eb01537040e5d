"""Run recipes: what a run of train.py uses for every key, as visible tables, and the one function that resolves them.

A run's config is plain values, resolved in one order, later entries winning:

    COMMON  <  the model class's `defaults` (classic.py, dapt.py)  <  the method's RECIPES row for the setting
            <  its DATASET_OVERRIDES rows  <  --key value on the command line  (<  SWITCHES that are on)

SWITCHES: a boolean key that swaps in a whole recipe (DA-VPT's `--official-optim true`), or a string key that applies
the recipe its value names (`--fvg-host-recipe mmrl`); keys given on the command line still win over a switch.
Derived keys are resolved here and nowhere else: `template` "" (the dataset's hand-crafted template, a folder
dataset's from DIR/template.txt), `epochs` given per shot count, `setting` "" (b2n with --subsample base / new, else
fewshot), `shots` with --data-fraction. `python train.py --method M --show-config` prints the result; `--help` lists
every key of a method with its default and type.
Deliberately not here: the models' own keys (beside each class), running anything (train.py).
"""
import argparse

import dapt
import data
from kernels import ATTN_BACKENDS
from prompting import ConfigError

# ----------------------------------------------------------------------------------------------------------
# the tables (methods.md, protocol.md §7)

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


# ----------------------------------------------------------------------------------------------------------
# resolving a run's config


def setting_of(cfg):
    return cfg["setting"] or ("b2n" if cfg["subsample"] != "all" else "fewshot")


SETTINGS = ("fewshot", "b2n", "xd")


AT_LEAST_0 = ("epochs", "lr", "warmup_epochs", "warmup_lr", "min_lr", "momentum", "weight_decay", "grad_clip",
              "workers", "threads", "class_balanced")


AT_LEAST_1 = ("batch", "test_batch", "log_every")


CHOICES = dict(attn=(*ATTN_BACKENDS, "torch"), precision=("auto", "fp32", "bf16", "fp16"), optimizer=("sgd", "adamw"),
               schedule=("cosine", "per_step", "timm_cosine"), selection=("last", "best_val"),
               interpolation=("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"))


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
    if not cfg["shots"] >= -1:
        raise ConfigError(f"--shots {cfg['shots']}: expected K >= 1 images per class, or 0 (or -1) for the full split")
    for key, options in CHOICES.items():  # the run's own choices (the models check theirs when they are built)
        if key in cfg and cfg[key] not in options:
            raise ConfigError(f"--{key.replace('_', '-')} {cfg[key]!r}: expected one of {', '.join(options)}")


def resolve_config(method, dataset, overrides, root=None):
    """The run config: COMMON < the model's defaults < RECIPES[method][setting] < DATASET_OVERRIDES < overrides
    (typed values) < SWITCHES that are on, then the derived keys. dataset None: no dataset row, `template` stays ""
    (the dataset's). root: the data root, for a folder dataset's template (DIR/template.txt). Raises ConfigError for
    unknown methods, datasets and keys (naming the valid ones)."""
    if method not in RECIPES:
        raise ConfigError(f"unknown method {method!r}: expected one of {', '.join(RECIPES)}")
    if dataset is not None and dataset not in data.DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}: expected one of {', '.join(data.DATASETS)}")
    cfg = {**COMMON, **dapt.model_defaults(method, overrides.get("host")), "method": method, "dataset": dataset}
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
        raise ConfigError(f"unknown config key(s) {', '.join('--' + k.replace('_', '-') for k in unknown)} for method "
                          f"{method!r}. Valid keys: {', '.join(sorted(k for k in cfg if k not in FIXED))} "
                          f"(python train.py --method {method} --help lists them with their defaults)")
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
    # derived keys
    if not 0 < cfg["data_fraction"] <= 1:
        raise ConfigError(f"--data-fraction {cfg['data_fraction']}: expected a value in (0, 1]")
    if cfg["data_fraction"] < 1:
        cfg["shots"] = 0  # the fraction is drawn from the full train split
    if isinstance(cfg["epochs"], dict):  # per shot count
        table = cfg["epochs"]
        cfg["epochs"] = table.get(cfg["shots"], table[max(k for k in table if k <= max(cfg["shots"], 1))])
    if cfg.get("template") == "" and dataset is not None:  # the dataset's hand-crafted template (protocol §8)
        if dataset != "folder":
            cfg["template"] = data.DATASETS[dataset].template
        elif root is not None:  # a folder dataset's: DIR/template.txt, else data.FOLDER_TEMPLATE
            cfg["template"] = data.folder_template(root)[0]
    cfg["setting"] = setting_of(cfg)
    check_values(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# the command line: every config key is a typed --key flag (argparse)

FIXED = ("method", "dataset")  # chosen by --method / --dataset themselves
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def value_type(key, default):
    """argparse type of a key, read off its default's type ("a,b" lists for tuples; an int for per-shot tables)."""
    def typed(text):
        try:
            if isinstance(default, bool):
                if text.lower() in TRUE + FALSE:
                    return text.lower() in TRUE
                raise ValueError
            if isinstance(default, (int, dict)):  # dict: epochs per shot count; one number sets it
                return int(text)
            if isinstance(default, float):
                return float(text)
            if isinstance(default, (tuple, list)):
                kind = type(default[0]) if default and not isinstance(default[0], bool) else float
                return tuple(kind(x) for x in text.split(","))
            return text
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {text!r} as {type_name(default)}") from None
    typed.__name__ = type_name(default)
    return typed


def type_name(default):
    if isinstance(default, bool):
        return "true|false"
    if isinstance(default, dict):
        return "int (default: per shot count)"
    if isinstance(default, (tuple, list)):
        return "comma-separated " + (type(default[0]).__name__ if default else "float")
    return type(default).__name__


def metavar(default):
    if isinstance(default, bool):
        return "true|false"
    if isinstance(default, (tuple, list)):
        return ",".join([(type(default[0]).__name__ if default else "float").upper()] * 2)
    return "INT" if isinstance(default, dict) else type(default).__name__.upper()


def add_config_flags(parser, cfg):
    """One --key flag per config key of cfg (a resolved config), typed by its value, help = its default."""
    group = parser.add_argument_group(f"config keys of --method {cfg['method']} (defaults resolved for "
                                      f"{'--dataset ' + cfg['dataset'] if cfg['dataset'] else 'no dataset'}; "
                                      "precedence: recipes.py)")
    for key in sorted(k for k in cfg if k not in FIXED):
        group.add_argument(f"--{key.replace('_', '-')}", dest=key, type=value_type(key, cfg[key]),
                           default=argparse.SUPPRESS, metavar=metavar(cfg[key]),
                           help=f"default {cfg[key]!r}")
    return parser
