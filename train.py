"""Train one prompt-tuning method on one dataset, shot count, seed and class subset; evaluate it; write a run.

    python train.py --method coop --dataset caltech101 --root DATA --shots 16 --seed 1 --subsample base
    python train.py --method dapt --dataset toy            # offline: toy benchmark + toy CLIP (pretrained here)
    python train.py --method coop --dataset toy --lr 0.01 --epochs 20   # any config key: --key value

A run folder `<out>/<setting>/<dataset>/<method><tag>/shots<K>_seed<S>/` holds `config.json` (every
preprocessing and optimisation constant), `log.txt`, `metrics.jsonl` (one line per epoch), `checkpoint.pt`
(learnable parameters + config + class names), `resume.pt` (optimizer state for --resume) and `result.json`.

Configuration is plain values: COMMON, then the method's row of METHOD_DEFAULTS for the setting, then
DATASET_OVERRIDES, then `--key value` from the command line. Unknown keys are errors.
Deliberately not here: multi-GPU, schedulers other than the protocol's, evaluation tables (eval.py).
"""
import argparse
import datetime
import json
import logging
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

import clip as clip_module
import data
import dapt

log = logging.getLogger("dapt")

# ----------------------------------------------------------------------------------------------------------
# configuration: one visible table (methods.md, protocol.md §7)

COMMON = dict(
    shots=16, seed=1, subsample="all", setting="",  # setting "" = b2n when subsample != all, else fewshot
    data_fraction=1.0,  # < 1: a class-balanced fraction of the FULL train split (shots set to 0; DAPT's 3rd setting)
    clip="ViT-B/16",  # a name (ViT-B/16, ViT-B/32, ViT-L/14) or a checkpoint path; toy: the toy CLIP
    # transforms (protocol §5); image_size 0 = the dataset's (224; toy 32)
    image_size=0, rrc_scale=(0.08, 1.0), rrc_ratio=(0.75, 4 / 3), interpolation="bicubic", hflip=0.5,
    resize_only=False, mask_encoding="", allow_missing_masks=False,
    class_balanced=0,  # k > 0: training batches of k images per class (DA-VPT's official recipe uses 2)
    # optimisation (protocol §6)
    optimizer="sgd", lr=0.002, momentum=0.9, weight_decay=5e-4, batch=32, epochs=10,
    warmup_epochs=1, warmup_lr=1e-5, schedule="cosine", selection="last", dassl_drop_last=False,
    precision="auto", attn="auto", text_savings=True, workers=2, test_batch=100, log_every=20, tag="",
)

# Per method and setting (fewshot / b2n / xd). `epochs` may be a {shots: epochs} table.
COOP_FS_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
METHOD_DEFAULTS = {
    "zsclip": {"all": dict(epochs=0, template="", ensemble="")},
    "coop": {
        "fewshot": dict(n_ctx=16, ctx_init="", csc=False, class_token_position="end", batch=32, lr=0.002,
                        epochs=COOP_FS_EPOCHS),
        "b2n": dict(n_ctx=4, ctx_init="a photo of a", csc=False, class_token_position="end", batch=32,
                    lr=0.002, epochs=200),
    },
    "cocoop": {"all": dict(n_ctx=4, ctx_init="a photo of a", class_token_position="end", batch=1, lr=0.002,
                           epochs=10, text_chunk=20000)},
    "vpt": {"all": dict(n_prompts=8, vpt_depth=12, prompt_init="normal", prompt_ln_pre=True, prompt_dropout=0.0,
                        batch=4, lr=0.0025, epochs=5)},
    "maple": {
        "fewshot": dict(n_ctx=2, ctx_init="a photo of a", prompt_depth=9, batch=4, lr=0.0035, epochs=10),
        "b2n": dict(n_ctx=2, ctx_init="a photo of a", prompt_depth=9, batch=4, lr=0.0035, epochs=5),
        "xd": dict(n_ctx=2, ctx_init="a photo of a", prompt_depth=3, batch=4, lr=0.0026, epochs=2),
    },
    # methods.md §10: CoOp context 16 + VPT-shallow 16 (xavier, after ln_pre); lr / betas per dataset below
    "dapt-dist": {"all": dict(n_ctx=16, ctx_init="", csc=False, class_token_position="end", n_prompts=16,
                              prompt_init="xavier", prompt_ln_pre=False, beta_v=0.1, beta_t=0.1, dispersion_t=2.0,
                              proto_train_view=False, batch=32, lr=0.002, epochs=COOP_FS_EPOCHS)},
    # methods.md §11: VPT-deep 8/layer, M proxies in the guided blocks ("-1" = last; "9,10,11"), our VPT recipe
    "davpt": {"all": dict(n_prompts=8, prompt_init="normal", prompt_ln_pre=True, n_proxies=10, guided_layers="-1",
                          beta_patch=0.05, lambda_cls=0.05, pa_alpha=32.0, pa_delta=0.1, pa_scale=1.0,
                          paper_norm=False, patch_sample="mean", proxy_mask=False, bias_tuning=False,
                          bias_extra=False, head="text", kmeans_images=10, kmeans_iters=20, kmeans_tol=1e-4,
                          official_optim=False, min_lr=0.0, grad_clip=0.0, batch=4, lr=0.0025, epochs=5)},
}
# A boolean key that switches a whole recipe; keys given explicitly (--key value) still win.
OPTION_PRESETS = {
    # DA-VPT's released recipe (methods.md §11), with its class-balanced sampler (2 images per class)
    "official_optim": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, epochs=100, warmup_epochs=10,
                           warmup_lr=1e-8, schedule="per_step", min_lr=1e-9, grad_clip=10.0, batch=32,
                           class_balanced=2),
}
# DAPT (methods.md §8): a host's keys (MaPLe by default; CoOp, VPT) + the views, cues, losses and schedule
DAPT_KEYS = dict(
    host="maple", cue="masks", decouple="pixel", dapt_schedule="staged", dapt_switch_epoch=7, dapt_w_v=0.8,
    dapt_w_f=0.1, dapt_w_b=0.5, dapt_margin=1.5, bg_template="a clean origami {}.", bg_slice_quirk=False,
    gradcam_threshold=0.5, gradcam_batch_max=False, decouple_threshold=0.5, mask_bicubic=False,
    n_ctx=2, ctx_init="a photo of a", prompt_depth=9, csc=False, class_token_position="end",  # maple / coop host
    n_prompts=8, vpt_depth=12, prompt_init="normal", prompt_ln_pre=True, prompt_dropout=0.0,  # vpt host
    batch=4, lr=0.0035)
METHOD_DEFAULTS.update({
    "kgcoop": {"all": dict(n_ctx=4, ctx_init="a photo of a", csc=False, class_token_position="end", template="",
                           kg_weight=2.0, batch=4, lr=0.0035, epochs=10)},
    "dapt": {"fewshot": dict(DAPT_KEYS, epochs=10, selection="best_val"), "b2n": dict(DAPT_KEYS, epochs=5)},
    # FVG-PT (methods.md §9): stage 2 on a finished host run; optimisation as the FVG-PT CoOp host config
    "fvgpt": {"all": dict(host_run="", predict_mode="auto", mask_fill="black", fvgpt_bottleneck=64,
                          fvgpt_gate_hidden=32, fvgpt_scale=100.0, fvgpt_lambda_base=10.0, fvgpt_lambda_new=1.0,
                          fvgpt_lambda_rg=1.0, fvgpt_tau=2.0, fvgpt_delta=0.0, fvgpt_area=(0.02, 0.98),
                          fvgpt_alpha_init=1e-3, fvgpt_use_kl=True, no_detach_r=False, batch=4, lr=0.0035,
                          epochs=10)},
})
# (method, dataset) -> overrides; "*" matches every method.
DATASET_OVERRIDES = {
    ("coop", "imagenet"): dict(epochs=50),
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
    """COMMON <- METHOD_DEFAULTS[method][setting] <- DATASET_OVERRIDES <- overrides (already typed)."""
    if method not in METHOD_DEFAULTS:
        raise SystemExit(f"unknown method {method!r}: expected one of {', '.join(METHOD_DEFAULTS)}")
    if dataset not in data.DATASETS:
        raise SystemExit(f"unknown dataset {dataset!r}: expected one of {', '.join(data.DATASETS)}")
    cfg = dict(COMMON, method=method, dataset=dataset)
    for key in ("subsample", "setting", "shots"):  # the setting decides which row applies
        if key in overrides:
            cfg[key] = overrides[key]
    rows = METHOD_DEFAULTS[method]
    setting = setting_of(cfg)
    row = rows.get(setting) or rows.get("all") or rows.get("b2n" if setting == "xd" else "fewshot")
    cfg.update(row)
    for (m, d), extra in DATASET_OVERRIDES.items():
        if d == dataset and m in ("*", method):
            cfg.update(extra)
    known = set(cfg)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"unknown config key(s) {unknown} for method {method!r}. Valid keys: {', '.join(sorted(known))}")
    cfg.update(overrides)
    for key, preset in OPTION_PRESETS.items():
        if cfg.get(key):
            cfg.update({k: v for k, v in preset.items() if k not in overrides})
    if not 0 < cfg["data_fraction"] <= 1:
        raise SystemExit(f"--data-fraction {cfg['data_fraction']}: expected a value in (0, 1]")
    if cfg["data_fraction"] < 1:
        cfg["shots"] = 0  # the fraction is drawn from the full train split
    if isinstance(cfg["epochs"], dict):
        table = cfg["epochs"]
        cfg["epochs"] = table.get(cfg["shots"], table[max(k for k in table if k <= max(cfg["shots"], 1))])
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
        raise SystemExit(f"--{key.replace('_', '-')}: cannot read {text!r} as {type(default).__name__}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="Any config key can be set with --key value (see --show-config); unknown keys are errors.")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHOD_DEFAULTS)}")
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
    base = resolve_config(args.method, args.dataset, {})
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
    """Constant warm-up at warmup_lr for warmup_epochs, then cosine: lr0 (1 + cos(pi (e - W) / E)) / 2,
    stepped per epoch (Dassl) or, with schedule=per_step, per update (linear warm-up then cosine)."""
    E, W, lr0 = cfg["epochs"], cfg["warmup_epochs"], cfg["lr"]
    if cfg["schedule"] == "per_step":
        t, warm, total = epoch * steps_per_epoch + step, W * steps_per_epoch, E * steps_per_epoch
        if t < warm:
            return cfg["warmup_lr"] + (lr0 - cfg["warmup_lr"]) * t / max(warm, 1)
        return cfg.get("min_lr", 0.0) + (lr0 - cfg.get("min_lr", 0.0)) * (1 + math.cos(math.pi * (t - warm) / max(total - warm, 1))) / 2
    if cfg["schedule"] != "cosine":
        raise SystemExit(f"schedule {cfg['schedule']!r}: expected cosine or per_step")
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
    images, labels, scenes, tinted = (torch.as_tensor(a) for a in data.toy_pretrain_images(recipe["images"], recipe["seed"]))
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
        lr = recipe["lr"] * min(1.0, (step + 1) / recipe["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / recipe["steps"]))
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
    T = texts("a photo of a {}.", [f"{c} on {s}" for c in data.TOY_CLASSNAMES for s in data.TOY_SCENES]).view(-1, S, img.shape[1])
    obj = (labels >= 0) & (scenes >= 0)
    scene = torch.einsum("be,bse->bs", img[obj], T[labels[obj]]).argmax(-1)
    acc = lambda hit: round(100.0 * hit.float().mean().item(), 2)  # noqa: E731
    obj_any = labels >= 0
    return dict(plain=acc((plain == labels)[obj_any & ~tinted]), tinted_plain_prompt=acc((plain == labels)[obj_any & tinted]),
                tinted=acc((tint == labels)[obj_any & tinted]), scene=acc((scene == scenes[obj])[~tinted[obj]]))


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
    import numpy
    import PIL

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
    """(weights dtype, autocast dtype or None, loss scaling) — protocol §6: fp32 on the CPU."""
    p = cfg["precision"]
    if p == "auto":
        p = "bf16" if str(device).startswith("cuda") else "fp32"
    if p not in ("fp32", "bf16", "fp16"):
        raise SystemExit(f"precision {p!r}: expected auto, fp32, bf16 or fp16")
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
              mask_interpolation="bicubic" if cfg.get("mask_bicubic") else "nearest")  # DAPT's official quirk
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


def load_host(cfg, clip, classnames, bench=None):
    """The frozen first-stage model of an fvgpt run: cfg["host_run"]'s checkpoint on this run's CLIP."""
    path = os.path.join(cfg["host_run"], "checkpoint.pt")
    if not cfg["host_run"] or not os.path.exists(path):
        raise SystemExit(f"fvgpt needs --host-run RUN_DIR, a finished run folder of train.py holding checkpoint.pt "
                         f"(got {cfg['host_run']!r}); train the host first, e.g. --method coop --subsample base")
    ckpt = torch.load(path, map_location=clip.logit_scale.device, weights_only=False)
    host_cfg = ckpt["config"]
    if host_cfg["method"] == "fvgpt":
        raise SystemExit(f"{cfg['host_run']}: the host of fvgpt cannot be an fvgpt run")
    for key, default in (("dataset", None), ("subsample", None), ("shots", None), ("seed", None), ("clip", None),
                         ("data_fraction", 1.0)):
        if host_cfg.get(key, default) != cfg.get(key, default):
            raise SystemExit(f"fvgpt: {key} = {cfg.get(key)!r} but the host run {cfg['host_run']} has "
                             f"{host_cfg.get(key, default)!r}; stage 2 trains on the host's data and backbone")
    host = build_model(host_cfg, clip, classnames, bench)
    host.load_checkpoint(ckpt)
    return host


def build_model(cfg, clip, classnames, bench=None):
    cls = dapt.METHODS[cfg["method"]]
    model_cfg = dict(cfg)
    if cfg["method"] == "fvgpt":
        return dapt.FVGPT(load_host(cfg, clip, classnames, bench), classnames, model_cfg)
    if cfg["method"] in ("zsclip", "kgcoop"):  # kgcoop: t0 from the dataset template (only the loss reads it)
        model_cfg["template"] = cfg["template"] or (bench.template if bench else "a photo of a {}.")
        if cfg.get("ensemble") == "imagenet80":
            model_cfg["templates"] = list(data.IMAGENET_TEMPLATES)
        elif cfg.get("ensemble") == "select":  # CoOp's zsclip: the 7 select templates (+ the dataset's own outside ImageNet)
            own = [] if cfg["dataset"].startswith("imagenet") else [model_cfg["template"]]
            model_cfg["templates"] = list(data.SELECT_TEMPLATES) + own
        elif cfg.get("ensemble"):
            raise SystemExit(f"--ensemble {cfg['ensemble']!r}: expected imagenet80 or select")
    return cls(clip, classnames, model_cfg)


def make_loader(cfg, bench, items, transform, train, model, patch_size):
    masks = train and getattr(model, "needs_masks", False)
    return data.build_loader(
        items, transform, cfg["batch"] if train else cfg["test_batch"], train=train, workers=cfg["workers"],
        seed=cfg["seed"], masks=masks, dataset_dir=bench.meta["dataset_dir"],
        mask_encoding=cfg["mask_encoding"] or None, allow_missing_masks=cfg["allow_missing_masks"],
        patch_size=patch_size if masks else None, dassl_drop_last=cfg["dassl_drop_last"],
        class_balanced=cfg["class_balanced"] if train else 0)


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
# training


class NonFiniteLoss(RuntimeError):
    pass


def train(cfg, root="DATA", out="runs", device="cpu", resume=False):
    """Train and evaluate one run; returns the result dict (also written to result.json)."""
    run_dir = run_dir_of(out, cfg)
    ckpt_path, resume_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "resume.pt")
    if os.path.exists(os.path.join(run_dir, "config.json")) and not resume:
        if os.path.exists(os.path.join(run_dir, "result.json")) or os.path.exists(resume_path):
            raise SystemExit(f"{run_dir} already holds a run: pass --resume to continue it, or choose --out / --tag")
    os.makedirs(run_dir, exist_ok=True)
    setup_logging(run_dir)
    torch.manual_seed(cfg["seed"])
    t_start = time.time()

    bench = data.load_benchmark(cfg["dataset"], root, shots=cfg["shots"], seed=cfg["seed"], subsample=cfg["subsample"])
    if cfg["data_fraction"] < 1:
        bench = data_fraction_split(bench, cfg["data_fraction"], cfg["seed"])
    clip = load_backbone(cfg, root, device)
    precision, _, autocast_dtype, scale_loss = precision_of(cfg, device)
    model = build_model(cfg, clip, bench.classnames, bench).to(device)
    train_tf, test_tf = transforms_of(cfg, bench, clip.visual.input_resolution)
    if hasattr(model, "prepare") and cfg["epochs"] > 0:  # one-off set-up from the training images (dapt.PromptModel)
        model.prepare(bench, train_tf, test_tf, device)
    patch = clip.visual.patch_size
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    for p in params:  # prompt parameters and optimizer state in float32 (protocol §6)
        p.data = p.data.float()

    config_record = dict(cfg, root=os.path.abspath(root), device=str(device), precision_resolved=precision,
                         transform_train=train_tf.constants(), transform_test=test_tf.constants(),
                         trainable_values=n_params, benchmark=bench.meta, versions=versions(device))
    write_json(os.path.join(run_dir, "config.json"), config_record)
    log.info("run %s", run_dir)
    log.info("config %s", json.dumps({k: v for k, v in config_record.items() if k != "benchmark"}, default=str))
    log.info("data: %d train / %d val / %d test images, %d classes; trainable values: %d",
             len(bench.train), len(bench.val), len(bench.test), len(bench.classnames), n_params)

    epochs = cfg["epochs"] if cfg["method"] != "zsclip" else 0
    opt = None
    if epochs > 0:
        if not params:
            raise SystemExit(f"method {cfg['method']} has no trainable parameters")
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

    loader = make_loader(cfg, bench, bench.train, train_tf, True, model, patch) if epochs > 0 else None
    val_loader = None
    if cfg["selection"] == "best_val":
        if bench.val:
            val_loader = make_loader(cfg, bench, bench.val, test_tf, False, model, patch)
        else:
            log.warning("selection=best_val but %s has no val split: using the last epoch", cfg["dataset"])
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    try:
        for epoch in range(start_epoch, epochs):
            stats = train_one_epoch(cfg, model, opt, scaler, loader, epoch, device, autocast_dtype)
            model.epoch_end(epoch, loader)
            if val_loader is not None:
                stats["val_acc"], _ = evaluate(model, val_loader, device, autocast_dtype)
                if best is None or stats["val_acc"] > best["val_acc"]:
                    best = dict(epoch=epoch, val_acc=stats["val_acc"])
                    atomic_save(checkpoint_of(model, cfg, bench), os.path.join(run_dir, "best.pt"))
            atomic_save(checkpoint_of(model, cfg, bench), ckpt_path)
            atomic_save(dict(params=model.trainable_state(), optimizer=opt.state_dict(), epoch=epoch, best=best,
                             extra=model.extra_state()), resume_path)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(dict(epoch=epoch, **stats)) + "\n")
            log.info("epoch %d/%d done: %s", epoch + 1, epochs, ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    except KeyboardInterrupt:
        log.warning("interrupted: the last completed epoch is saved in %s; continue with --resume", run_dir)
        raise SystemExit(130)
    except NonFiniteLoss as e:
        log.error("%s. Stopped; the last good checkpoint (previous epoch) is kept in %s", e, run_dir)
        raise SystemExit(f"non-finite loss: {e}")

    if best is not None and cfg["selection"] == "best_val":
        state = torch.load(os.path.join(run_dir, "best.pt"), map_location=device, weights_only=False)
        model.load_checkpoint(state)  # parameters and extra state (DA-VPT's map) of the best epoch
        log.info("model selection: best val accuracy %.2f at epoch %d", best["val_acc"], best["epoch"])
    if epochs == 0:
        atomic_save(checkpoint_of(model, cfg, bench), ckpt_path)

    accuracies = evaluate_settings(cfg, model, bench, root, test_tf, device, autocast_dtype, patch)
    result = dict(
        method=cfg["method"], dataset=cfg["dataset"], setting=cfg["setting"], shots=cfg["shots"], seed=cfg["seed"],
        subsample=cfg["subsample"], tag=cfg["tag"], data_fraction=cfg["data_fraction"], accuracy=accuracies, classnames=accuracies.pop("classnames"),
        config=config_record, samples_per_epoch=loader.samples_per_epoch if loader else 0,
        selected_epoch=best["epoch"] if best else (epochs - 1), checkpoint_sha256=clip_module.file_sha256(ckpt_path),
        seconds=round(time.time() - t_start, 1), finished=datetime.datetime.now().isoformat(timespec="seconds"))
    write_json(os.path.join(run_dir, "result.json"), result)
    log.info("result: %s", json.dumps(result["accuracy"]))
    return result


def make_optimizer(cfg, model):
    if hasattr(model, "param_groups"):  # the model's own groups, e.g. no weight decay on biases (dapt.PromptModel)
        params = model.param_groups()
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise SystemExit(f"optimizer {cfg['optimizer']!r}: expected sgd or adamw")


def checkpoint_of(model, cfg, bench):
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
        if cfg["schedule"] == "per_step":
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
        if cfg.get("grad_clip"):
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


def evaluate_settings(cfg, model, bench, root, test_tf, device, autocast_dtype, patch):
    """Test accuracy on the run's classes; for a base run also on the new classes with the same checkpoint."""
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


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.show_config:
        print(json.dumps(args.cfg, indent=1, default=str))
        return None
    result = train(args.cfg, root=args.root, out=args.out, device=args.device, resume=args.resume)
    acc = result["accuracy"]
    print(" ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    return result


if __name__ == "__main__":
    main()
