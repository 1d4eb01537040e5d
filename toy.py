"""The offline toy benchmark (toy.md, v2): coloured shapes on named scenes, in a "tinted" photo domain, with a
class-scene link in train / val / test_corr, written in the CoOp layout with exact foreground masks.

What is here: the renderer (`toy_render`: scenes, shapes, tint), `make_toy`, which writes `<root>/toy/`
deterministically for a seed, and `ensure_toy`, which makes it on first use and again when TOY_VERSION changes (data.py
reads it like any CoOp dataset); the toy CLIP: its pretraining images (`toy_pretrain_images`) and captions
(`toy_caption`), its contrastive pretraining (`pretrain_toy_clip`, cached on disk) and its zero-shot check.

Left out: randomness from global generators (every draw comes from a generator seeded here; the caller's random
state is left as it was).
"""
import json
import logging
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip import CLIP, CLIP_MEAN, CLIP_STD
from clip_load import build_clip, write_safetensors
from files import CheckpointError, sha256_file, write_json
from prompting import encode_texts, normalize, tensors_digest
from tokenizer import tokenize

log = logging.getLogger("dapt")

# What makes it a miniature of the real setting (issue 14):
# - domain shift: the toy CLIP sees plain photos and tinted ones (hue rotated, captioned "a tinted photo of
#   ..."); every benchmark image is tinted while the hand-crafted prompt stays "a photo of a {}.", so learned
#   context has something to absorb, as with real CLIP on a downstream dataset;
# - context: pretraining captions name the scene half of the time (and some images are scenes alone), so the
#   image features encode the background and a class-correlated scene is a real shortcut; some pretraining
#   objects sit on a blank grey background (isolated objects, which real CLIP has seen plenty of), so a
#   foreground-only view is an image the toy CLIP can read;
# - two test splits: "test" has scenes independent of the class, "test_corr" keeps the training correlation
#   (the difference of a model's accuracies on them is what it learned from the context).

# Base colours (the first three) are 30 degrees of hue apart, the new ones 50-100: the tint moves a base colour
# half-way to its neighbour, so zero-shot CLIP is weaker on base than on new classes (as on the real benchmarks,
# 69.3 vs 74.2 on average) and learned context has a base-class confusion to fix.
TOY_COLOURS = {"red": (225, 45, 45), "orange": (230, 135, 40), "yellow": (225, 215, 45), "green": (45, 190, 60),
               "blue": (50, 90, 230), "purple": (155, 60, 215)}
TOY_SHAPES = ("circle", "square", "triangle", "cross")
TOY_SCENES = ("grass", "sky", "water", "wall", "road", "sand", "snow", "forest", "night", "tiles", "mud", "gravel")
TOY_CLASSNAMES = [f"{c} {s}" for c in TOY_COLOURS for s in TOY_SHAPES]  # base = the first 3 colours, new = the rest
# {d}: "" or "tinted "; {c}: the class or scene phrase; {s}: "" or " on <scene>"
TOY_CAPTION_TEMPLATES = ["a {d}photo of a {c}{s}.", "a {d}{c}{s}.", "a {d}picture of a {c}{s}.",
                         "a {d}photo of the {c}{s}.", "a {d}snapshot of a {c}{s}.", "a {d}photo of my {c}{s}."]
TOY_SIZE = 32
TOY_VERSION = 3  # bump when anything below changes: the toy data and the toy CLIP's cache key include it
TOY_JITTER = 4.0  # object centre offset (px); larger offsets left a 4-layer ViT at chance on shape after 1200 steps
TOY_PER_CLASS = {"train": 60, "val": 20, "test": 100, "test_corr": 100}
TOY_SPURIOUS = 0.9  # P(the class's preferred scene) in train, val and test_corr
TOY_TINT = 15.0  # hue rotation (degrees) of the tinted domain; every benchmark image is tinted
# sha256 of split_toy.json as make_toy(root, seed=0) writes it: the toy the docs' numbers were measured on
# (python datatools.py toy --root DATA --check compares a local copy with it and the shipped toy CLIP with its own)
TOY_SPLIT_SHA256 = "72cb163e08fad40d3c102d2b5849e0e29fbc86fb707179e3f7bd391315b43ef4"
# pretraining: P(tinted image), P(a scene alone), P(a blank grey background instead of a scene),
# P(caption names the scene)
TOY_PRETRAIN_MIX = dict(tinted=0.4, scene_only=0.1, blank=0.1, name_scene=0.5)
_YY, _XX = np.mgrid[0:TOY_SIZE, 0:TOY_SIZE].astype(np.float32) + 0.5  # pixel centres


def toy_caption(classname, k=0, scene=None, tinted=False):
    """Template k, e.g. "a tinted photo of a red circle on grass."; classname None: the scene alone
    ("a photo of a grass scene.")."""
    t = TOY_CAPTION_TEMPLATES[k % len(TOY_CAPTION_TEMPLATES)]
    if classname is None:
        return t.format(d="tinted " if tinted else "", c=f"{scene} scene", s="")
    return t.format(d="tinted " if tinted else "", c=classname, s=f" on {scene}" if scene else "")


def _toy_scene(rng, scene):
    """[32, 32, 3] float background: a named scene drawn procedurally, its colours jittered; None: blank grey."""
    x, y, n = _XX, _YY, TOY_SIZE
    col = lambda c: np.clip(np.array(c, np.float32) + rng.uniform(-20, 20, 3), 0, 255)  # noqa: E731
    if scene is None:  # an isolated object (product shot, clip art): what DAPT's foreground view looks like
        return np.broadcast_to(col(rng.uniform(50, 200, 1).repeat(3)), (n, n, 3)).copy()
    if scene == "grass":  # short vertical blades of two greens
        a, b = col((45, 95, 30)), col((115, 165, 60))
        w = np.repeat(rng.random((n // 4, n)), 4, axis=0) > 0.55
    elif scene == "sky":  # deep blue at the top to pale at the horizon, white clouds
        a, b = col((70, 120, 210)), col((175, 205, 240))
        w = np.clip(y / n + rng.uniform(-0.2, 0.2), 0, 1)
        for _ in range(rng.integers(1, 4)):
            cx, cy, rx, ry = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(4, 9), rng.uniform(2, 4)
            w = np.where(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1, 1.6, w)  # 1.6: whiter than b
    elif scene == "water":  # horizontal waves
        a, b = col((20, 70, 130)), col((70, 150, 190))
        p, q, amp, ph = rng.uniform(4, 7), rng.uniform(8, 16), rng.uniform(0.5, 2), rng.uniform(0, 2 * np.pi)
        w = 0.5 + 0.5 * np.sin(2 * np.pi * (y + amp * np.sin(2 * np.pi * x / q + ph)) / p)
    elif scene == "wall":  # bricks in running bond, light mortar
        a, b = col((160, 80, 55)), col((205, 200, 190))
        h = int(rng.integers(4, 7))
        oy, ox = rng.integers(0, h), rng.integers(0, 2 * h)
        row = (y + oy) // h
        w = ((y + oy) % h < 1) | ((x + ox + (row % 2) * h) % (2 * h) < 1)
    elif scene == "road":  # noisy asphalt with a dashed line
        a, b = col((65, 65, 70)), col((235, 225, 200))
        w = (rng.random((n, n)) * 0.25).astype(np.float32)
        ly, dash, off = rng.uniform(4, n - 4), rng.integers(4, 8), rng.integers(0, 8)
        w = np.where((np.abs(y - ly) < 1.5) & ((x + off) % (2 * dash) < dash), 1.0, w)
    elif scene == "sand":  # speckled beige with faint diagonal ripples
        a, b = col((195, 170, 120)), col((235, 215, 170))
        a0 = rng.uniform(0, np.pi)
        w = 0.3 + 0.3 * np.sin((np.cos(a0) * x + np.sin(a0) * y) / rng.uniform(1.5, 3)) + 0.4 * rng.random((n, n))
    elif scene == "snow":  # white with soft blue-grey drifts
        a, b = col((200, 210, 225)), col((250, 250, 252))
        w = np.kron(rng.random((n // 8, n // 8)), np.ones((8, 8))) * 0.5 + 0.5 * rng.random((n, n)) ** 4
        w = 1 - w * 0.8
    elif scene == "forest":  # dark undergrowth behind brown trunks
        a, b = col((25, 60, 30)), col((95, 65, 40))
        w = np.zeros((n, n), bool)
        for _ in range(rng.integers(3, 6)):
            w |= np.abs(x - rng.uniform(0, n)) < rng.uniform(1, 2.5)
    elif scene == "night":  # dark blue sky with stars
        a, b = col((15, 20, 55)), col((240, 240, 200))
        w = rng.random((n, n)) < 0.04
    elif scene == "tiles":  # light square tiles, dark grout
        a, b = col((225, 225, 215)), col((110, 110, 110))
        p = int(rng.integers(6, 10))
        ox, oy = rng.integers(0, p, 2)
        w = ((x + ox) % p < 1) | ((y + oy) % p < 1)
    elif scene == "mud":  # dark brown blotches
        a, b = col((70, 50, 35)), col((120, 95, 70))
        w = np.kron(rng.random((n // 4, n // 4)), np.ones((4, 4))) * 0.7 + 0.3 * rng.random((n, n))
    else:  # gravel: grey pebbles of several shades
        a, b = col((95, 90, 85)), col((175, 170, 160))
        w = np.full((n, n), 0.4, np.float32)
        for _ in range(25):
            cx, cy, r = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(1.2, 3)
            w = np.where((x - cx) ** 2 + (y - cy) ** 2 < r * r, rng.random(), w)
    w = np.asarray(w, np.float32)[..., None]
    return np.clip(a * (1 - w) + b * w, 0, 255)


def _toy_shape(shape, cx, cy, s):
    """Boolean [32, 32] pixel mask of a shape with centre (cx, cy) and half-extent s."""
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= s * s
    if shape == "square":
        return (np.abs(dx) <= 0.8 * s) & (np.abs(dy) <= 0.8 * s)
    if shape == "triangle":  # apex up, base at cy + 0.8 s
        t = (dy + s) / (1.8 * s)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * s)
    return ((np.abs(dx) <= s / 3) & (np.abs(dy) <= s)) | ((np.abs(dy) <= s / 3) & (np.abs(dx) <= s))


def toy_tint(img, degrees=TOY_TINT):
    """Rotate the hue of float RGB pixels [..., 3] about the grey axis (Rodrigues' formula; grey stays grey)."""
    t = np.radians(degrees)
    k = np.full(3, 1 / np.sqrt(3))
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    R = np.cos(t) * np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * np.outer(k, k)
    return np.clip(img @ R.T, 0, 255)


def toy_render(rng, label, scene, tinted=True, distractor_p=0.3):
    """One toy image: uint8 [32, 32, 3] and its exact foreground mask bool [32, 32] (the main object only).
    label -1: the scene alone (empty mask)."""
    colours = list(TOY_COLOURS)
    img = _toy_scene(rng, scene)
    m = np.zeros((TOY_SIZE, TOY_SIZE), bool)
    if label >= 0:
        ci, si = divmod(label, len(TOY_SHAPES))
        if rng.random() < distractor_p:  # a small shape of another colour, drawn under the object
            dc = colours[(ci + rng.integers(1, len(colours))) % len(colours)]
            dm = _toy_shape(TOY_SHAPES[rng.integers(len(TOY_SHAPES))], *rng.uniform(4, 28, 2), rng.uniform(3, 5))
            img[dm] = TOY_COLOURS[dc]
        s = rng.uniform(8, 12)  # half-size: the object spans 16-24 of the 32 px
        cx, cy = TOY_SIZE / 2 + rng.uniform(-TOY_JITTER, TOY_JITTER, 2)  # near the centre: shape stays learnable
        m = _toy_shape(TOY_SHAPES[si], cx, cy, s)
        img[m] = np.clip(np.array(TOY_COLOURS[colours[ci]]) + rng.integers(-20, 21, 3), 0, 255)
    if tinted:
        img = toy_tint(img)
    return img.round().astype(np.uint8), m


def toy_pretrain_images(n, seed):
    """The toy CLIP's pretraining images, made in memory with their own generator: every class on every scene
    (scene independent of the class) or on a blank grey background, plain or tinted, some scenes alone
    (proportions: TOY_PRETRAIN_MIX).

    -> (uint8 [n, 32, 32, 3], int64 [n] class index into TOY_CLASSNAMES or -1 for a scene alone,
        int64 [n] scene index into TOY_SCENES or -1 for a blank background, bool [n] tinted)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    mix = TOY_PRETRAIN_MIX
    u = rng.random(n)
    labels = np.where(u < mix["scene_only"], -1, rng.integers(0, len(TOY_CLASSNAMES), n))
    scenes = np.where(u >= 1 - mix["blank"], -1, rng.integers(0, len(TOY_SCENES), n))
    tinted = rng.random(n) < mix["tinted"]
    images = np.empty((n, TOY_SIZE, TOY_SIZE, 3), np.uint8)
    for k in range(n):
        scene = TOY_SCENES[scenes[k]] if scenes[k] >= 0 else None
        images[k], _ = toy_render(rng, int(labels[k]), scene, bool(tinted[k]))
    return images, labels.astype(np.int64), scenes.astype(np.int64), tinted


def toy_preferred_scenes(seed=0):
    """Class -> its preferred scene in train / val / test_corr (each scene preferred by one base and one new class)."""
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    half, S = len(TOY_CLASSNAMES) // 2, len(TOY_SCENES)
    return [TOY_SCENES[int(t) % S] for part in (rng.permutation(half), rng.permutation(half)) for t in part]


def toy_version(dataset_dir):
    """TOY_VERSION of the toy benchmark in dataset_dir (from toy_meta.json); None if absent or unreadable."""
    try:
        with open(os.path.join(dataset_dir, "toy_meta.json")) as f:
            return json.load(f).get("version")
    except (OSError, ValueError):
        return None


def make_toy(root, seed=0, per_class=None):
    """Write <root>/toy in the CoOp layout: images/<class>/<split>_<i>.png, mask/images/... (white fg PNG),
    mask/ENCODING, split_toy.json ("train", "val", "test" and "test_corr"), toy_meta.json (version, settings,
    preferred scene per class, scene per image). Every image is tinted. Deterministic for the seed; written to
    a temporary folder and renamed, so an interrupted run leaves nothing half-made. -> the dataset folder."""
    per_class = dict(per_class or TOY_PER_CLASS)
    per_class.setdefault("test_corr", per_class["test"])
    out = os.path.join(os.path.abspath(root), "toy")
    tmp = f"{out}.tmp{os.getpid()}"
    rng = np.random.Generator(np.random.PCG64(seed))
    prefer = toy_preferred_scenes(seed)
    split, scenes = {}, {}
    for name in TOY_CLASSNAMES:
        os.makedirs(os.path.join(tmp, "images", name.replace(" ", "_")), exist_ok=True)
        os.makedirs(os.path.join(tmp, "mask", "images", name.replace(" ", "_")), exist_ok=True)
    total, done, t0, shown = sum(per_class.values()) * len(TOY_CLASSNAMES), 0, time.time(), time.time()
    log.info("writing the toy benchmark: %d images and masks into %s", total, out)
    for s in ("train", "val", "test", "test_corr"):
        split[s] = []
        for y, name in enumerate(TOY_CLASSNAMES):
            done += per_class[s]
            if time.time() - shown > 5:  # progress with an ETA every 5 seconds
                spent, shown = time.time() - t0, time.time()
                log.info("  toy benchmark: %d of %d images (%.0f s, ETA %.0f s)", done, total, spent,
                         spent / done * (total - done))
            for i in range(per_class[s]):
                if s != "test" and rng.random() < TOY_SPURIOUS:
                    scene = prefer[y]
                elif s != "test":  # one of the other scenes
                    others = [t for t in TOY_SCENES if t != prefer[y]]
                    scene = others[rng.integers(len(others))]
                else:
                    scene = TOY_SCENES[rng.integers(len(TOY_SCENES))]
                img, m = toy_render(rng, y, scene)
                rel = f"{name.replace(' ', '_')}/{s}_{i:03d}.png"
                Image.fromarray(img).save(os.path.join(tmp, "images", rel), compress_level=1)
                Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(tmp, "mask", "images", rel),
                                                               compress_level=1)
                split[s].append([rel, y, name])
                scenes[rel] = scene
    with open(os.path.join(tmp, "mask", "ENCODING"), "w") as f:
        f.write("white\n")
    with open(os.path.join(tmp, "split_toy.json"), "w") as f:
        json.dump(split, f)
    with open(os.path.join(tmp, "toy_meta.json"), "w") as f:
        json.dump({"version": TOY_VERSION, "seed": seed, "per_class": per_class, "size": TOY_SIZE,
                   "spurious": TOY_SPURIOUS, "tint": TOY_TINT, "preferred_scene": dict(zip(TOY_CLASSNAMES, prefer)),
                   "scene": scenes}, f)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(out):
            raise
    log.info("toy benchmark written to %s (%s per class)", out, per_class)
    return out


def ensure_toy(root):
    """<root>/toy generated if missing, regenerated if it was made by another TOY_VERSION. -> the folder."""
    out = os.path.join(os.path.abspath(root), "toy")
    if os.path.isdir(out) and toy_version(out) == TOY_VERSION:
        return out
    if os.path.isdir(out):
        log.warning("toy benchmark in %s is version %s, this code makes version %d: regenerating it",
                    out, toy_version(out), TOY_VERSION)
        shutil.rmtree(out)
    else:
        log.info("toy benchmark not found under %s: generating it (python datatools.py toy --root %s)", root, root)
    return make_toy(root)


# ----------------------------------------------------------------------------------------------------------
# the toy CLIP (toy.md): contrastive pretraining of a small CLIP on toy captions, cached on disk

TOY_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=64, vision_patch_size=8,
                  context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                  transformer_layers=4)


# lr 1e-3 / weight decay 0.01: with 3e-3 / 0.1 the towers stayed at a colour-only solution (25-43% zero-shot).
# 3000 steps of 128: about 7 min on one core (issue 14 allows 10); 94-96 % zero-shot on held-out images.
TOY_PRETRAIN = dict(seed=0, steps=3000, batch=128, lr=1e-3, weight_decay=0.01, warmup=100, images=20000)


# The toy CLIP ships with the repository (made by pretrain_toy_clip with TOY_PRETRAIN at one thread; the json
# beside it holds its recipe, sha256, zero-shot accuracies and the digests regeneration is checked against).
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TOY_CLIP = os.path.join(ASSETS, "toy_clip.safetensors")
TOY_CLIP_RECORD = os.path.join(ASSETS, "toy_clip.json")
_CHECKED = {}  # (path, size, mtime) -> sha256 of the shipped file, checked once per process


def toy_clip_record():
    with open(TOY_CLIP_RECORD) as f:
        return json.load(f)


def toy_clip():
    """The shipped toy CLIP's path, its sha256 checked against assets/toy_clip.json (once per process): a file that
    differs (damaged, a Git LFS pointer, another recipe) is refused, saying how to get the right one."""
    expected = toy_clip_record()["sha256"]
    if not os.path.isfile(TOY_CLIP):
        raise CheckpointError(f"{TOY_CLIP} is missing: restore it (git checkout -- assets/) or make it again with "
                              "python datatools.py toy-clip --out assets/toy_clip.safetensors (about 5 minutes)")
    st = os.stat(TOY_CLIP)
    key = (TOY_CLIP, st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = sha256_file(TOY_CLIP)
    if _CHECKED[key] != expected:
        raise CheckpointError(f"{TOY_CLIP} has sha256 {_CHECKED[key]}, the shipped toy CLIP has {expected}: restore it "
                              "(git checkout -- assets/) or make it again with python datatools.py toy-clip")
    return TOY_CLIP


def toy_caption_table():
    """Every pretraining caption, tokenized, and its attributes. Row ((t * K + k) * (C + 1) + y + 1) * (S + 1) + s + 1
    is template k of class y (-1: the scene alone) naming scene s (-1: none), tinted t (0 / 1).
    -> (tokens [2 K (C + 1) (S + 1), 77], attributes [rows, 3] = (class, scene, tinted))."""
    C, S, K = len(TOY_CLASSNAMES), len(TOY_SCENES), len(TOY_CAPTION_TEMPLATES)
    texts, attrs = [], []
    for t in (0, 1):
        for k in range(K):
            for y in range(-1, C):
                for s in range(-1, S):
                    scene = TOY_SCENES[s] if s >= 0 else ("" if y >= 0 else "no")  # "no scene": never drawn
                    texts.append(toy_caption(TOY_CLASSNAMES[y] if y >= 0 else None, k, scene, bool(t)))
                    attrs.append((y, s, t))
    return tokenize(texts), torch.tensor(attrs)


def toy_recipe(steps=None, patch=None):
    """TOY_PRETRAIN with the architecture (TOY_CONFIG; `patch`: another patch size, a variant with more patches)."""
    config = dict(TOY_CONFIG, **({"vision_patch_size": patch} if patch else {}))
    return dict(TOY_PRETRAIN, config=config, toy_version=TOY_VERSION, steps=steps or TOY_PRETRAIN["steps"])


def pretrain_toy_clip(path, steps=None, quiet=False, patch=None):
    """Pretrain the toy CLIP with TOY_PRETRAIN (steps: fewer, for tests) and write it to `path` (safetensors, float32)
    with <path>.json beside it (recipe, sha256, zero-shot accuracies, seconds); a file with the same recipe is kept.
    -> path. Deterministic for the recipe, the thread count and the CPU kernels torch uses; draws from its own
    generators (the caller's random state is left as it was).

    Contrastive image-caption training on toy images generated in memory (toy_pretrain_images: plain and
    tinted photos, scenes independent of the class). Each image gets a caption drawn this step (random
    template; the scene named half of the time; "tinted" iff the image is); positives are every caption of the
    batch that is true of the image (same class, same domain, the same scene if one is named; a blank background
    is never named), a symmetric InfoNCE with soft targets, learnable temperature capped at 100 as OpenAI's;
    AdamW + cosine. patch: another patch size (4 on the 32 px images: 64 patches instead of 16)."""
    recipe, meta_path = toy_recipe(steps, patch), os.path.splitext(path)[0] + ".json"
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("recipe") == json.loads(json.dumps(recipe)):
                return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    say = (lambda *a: None) if quiet else log.info  # a run's log (log.txt and the terminal), or the tools' output
    say(f"pretraining the toy CLIP ({recipe['steps']} steps) into {path} ...")
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):  # model set-up draws from the global generator: its state is restored
        state, acc = _pretrain_toy_clip(recipe, say, t0)
    say("toy CLIP zero-shot accuracy on held-out images: " + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items()))
    write_safetensors(state, path, metadata=dict(recipe=json.dumps(recipe)))
    write_json(meta_path, dict(recipe=recipe, sha256=sha256_file(path), zero_shot_accuracy=acc,
                               seconds=round(time.time() - t0, 1),
                               cpu_capability=torch.backends.cpu.get_cpu_capability(),
                               torch=torch.__version__, threads=torch.get_num_threads()), indent=1)
    return path


def toy_clip_digest(steps, recipe=None):
    """sha256 of the toy CLIP's weights after the first `steps` steps of `recipe` (default TOY_PRETRAIN): the same
    trajectory as a full pretraining (its schedule counts the recipe's steps), cut short, for checking that this
    code and machine reproduce the shipped file's start."""
    with torch.random.fork_rng(devices=[]):
        state, _ = _pretrain_toy_clip(recipe or toy_recipe(), lambda *a: None, time.time(), stop=steps)
    return tensors_digest(state)


def _pretrain_toy_clip(recipe, say, t0, stop=None):
    """The training loop of pretrain_toy_clip -> (state dict with the full token embedding, zero-shot accuracies;
    None when stopped after `stop` steps)."""
    images, labels, scenes, tinted = (torch.as_tensor(a)
                                      for a in toy_pretrain_images(recipe["images"], recipe["seed"]))
    tokens, cap_attrs = toy_caption_table()
    C, S, K = len(TOY_CLASSNAMES), len(TOY_SCENES), len(TOY_CAPTION_TEMPLATES)
    # The captions use a few dozen of the 49408 BPE ids: train a model whose embedding table holds only those
    # rows (ids remapped in sorted order, so end-of-text stays the largest id), then put them back into the
    # full table, whose other rows keep their initialisation. Same result for the toy captions, 20x less work.
    used, tokens = torch.unique(tokens, sorted=True, return_inverse=True)
    torch.manual_seed(recipe["seed"])  # inside the caller's fork_rng
    config = recipe["config"]
    model = CLIP(**dict(config, vocab_size=len(used))).train()
    full_embedding = torch.empty(config["vocab_size"], config["transformer_width"]).normal_(std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    g = torch.Generator().manual_seed(recipe["seed"])
    name_scene = TOY_PRETRAIN_MIX["name_scene"]
    for step in range(recipe["steps"] if stop is None else stop):
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
            spent = time.time() - t0
            eta = spent / (step + 1) * (recipe["steps"] - step - 1)
            say(f"  toy CLIP step {step + 1}/{recipe['steps']} loss {loss.item():.4f} ({spent:.0f} s, ETA {eta:.0f} s)")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full_embedding[used] = state["token_embedding.weight"]
    state["token_embedding.weight"] = full_embedding
    return state, None if stop is not None else toy_zero_shot_accuracy(build_clip(state))


def toy_images_to_tensor(images):
    """uint8 [N, H, W, 3] -> CLIP-normalised float [N, 3, H, W] (the toy images are already 32 px)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def toy_zero_shot_accuracy(model, n=2400, seed=12345):
    """Zero-shot accuracy (%) on held-out pretraining-style images: all classes with "a photo of a {}." on plain
    and on tinted images, with "a tinted photo of a {}." on tinted images, and the scene of plain images (one
    caption "a photo of a <its class> on <scene>." per scene): does the image feature encode the background?"""
    images, labels, scenes, tinted = (torch.as_tensor(a) for a in toy_pretrain_images(n, seed=seed))
    img = normalize(model.encode_image(toy_images_to_tensor(images)))
    texts = lambda template, names: encode_texts(model, [template.format(c) for c in names])  # noqa: E731
    plain = (img @ texts("a photo of a {}.", TOY_CLASSNAMES).t()).argmax(-1)
    tint = (img @ texts("a tinted photo of a {}.", TOY_CLASSNAMES).t()).argmax(-1)
    S = len(TOY_SCENES)
    T = texts("a photo of a {}.", [f"{c} on {s}" for c in TOY_CLASSNAMES for s in TOY_SCENES])
    T = T.view(-1, S, img.shape[1])
    obj = (labels >= 0) & (scenes >= 0)
    scene = torch.einsum("be,bse->bs", img[obj], T[labels[obj]]).argmax(-1)
    acc = lambda hit: round(100.0 * hit.float().mean().item(), 2)  # noqa: E731
    obj_any = labels >= 0
    return dict(plain=acc((plain == labels)[obj_any & ~tinted]),
                tinted_plain_prompt=acc((plain == labels)[obj_any & tinted]),
                tinted=acc((tint == labels)[obj_any & tinted]), scene=acc((scene == scenes[obj])[~tinted[obj]]))
