"""Evaluate saved runs and aggregate seeds into the papers' tables.

    python eval.py table runs/                          # base / new / HM and few-shot tables (Markdown + CSV)
    python eval.py compare 'runs/fewshot/toy/maple/shots16_seed*' 'runs/fewshot/toy/dapt/shots16_seed*'  # paired
    python eval.py run RUN_DIR --dataset oxford_pets    # cross-dataset transfer of a trained run
    python eval.py run RUN_DIR --dataset imagenetv2 imagenet_sketch imagenet_a imagenet_r   # domain shift
    python eval.py run RUN_DIR --subsample new          # re-evaluate base / new / all from the checkpoint
    python eval.py predict RUN_DIR photos/ --topk 3     # top-k classes per image (--classes a,b,c: others)
    python eval.py predict --method zsclip --clip ViT-B/16 cat.jpg --classes cat,dog   # zero-shot, no run
    python eval.py attention RUN_DIR img.jpg --out pics # CLS attention: zero-shot CLIP beside the tuned model

Tables follow protocol.md §4: per dataset, the mean (and standard deviation) over seeds; HM = 2BN/(B+N) of
the seed-averaged base and new accuracies; the average row averages base and new over datasets first and
takes the HM of those two averages (as the papers do), not the mean of per-dataset HMs. `table` also writes
runs.csv (one row per run) and flags possible seed collapses.
Deliberately not here: training and sweeps (train.py), the models (dapt.py).
"""
import argparse
import csv
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import dapt
import data
import recipes
import tables
import train
from loader import mask_path, open_image, open_mask, resolve_mask_encoding
from prompting import ConfigError, encode_texts, normalize
from runs import RunError, load_run, read_json, read_metrics, read_result, run_clip, torch_threads, write_json


# ----------------------------------------------------------------------------------------------------------
# evaluating one run on other classes / datasets


def trained_run(run_dir, device="cpu"):
    """(model, cfg, data root the run was trained with) of a run folder: runs.load_run (every file read with
    weights_only=True; a toy run's CLIP from its own data root)."""
    if not os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        raise RunError(f"{run_dir}: no checkpoint.pt (is this a run folder of train.py, and did it finish an epoch?)")
    model = load_run(run_dir, device)
    return model, model.cfg, model.run_root


def target_template(cfg, bench):
    """The template a run's model uses on `bench`'s dataset: the run's own when it was given by hand (it differs
    from what recipes.py resolves for the run's method and dataset), else the target dataset's."""
    changed = tables.changed_keys(dict(config=cfg))
    return cfg["template"] if changed and "template" in changed else bench.template


def evaluate_run(run_dir, datasets=None, subsample="all", root=None, device="cpu"):
    """Accuracy of a trained run on the test split of each dataset (default: its own), with the classes of
    `subsample`; written to run_dir/eval_<dataset>_<subsample>.json and returned as {dataset: acc}. Runs with
    the run's thread count (config key threads)."""
    config = os.path.join(run_dir, "config.json")
    threads = read_json(config, "run config").get("threads", 0) if os.path.exists(config) else 0
    with torch_threads(threads):
        return _evaluate_run(run_dir, datasets, subsample, root, device)


def _evaluate_run(run_dir, datasets, subsample, root, device):
    model, cfg, run_root = trained_run(run_dir, device)
    root = root or run_root  # the datasets' root (--root), else the run's
    out = {}
    for name in datasets or [cfg["dataset"]]:
        bench = data.load_benchmark(name, root, shots=cfg["shots"], seed=cfg["seed"], subsample=subsample)
        model.set_dataset(name, target_template(cfg, bench))  # zsclip, MMRL: the template and prediction rule
        model.set_classnames(bench.classnames)
        _, test_tf = train.transforms_of(cfg, model.clip.visual.input_resolution)
        splits = train.evaluate_splits(cfg, model, bench, test_tf, device)  # and further ones (the toy's test_corr)
        acc, n = splits.pop("test")
        record = dict(run=run_dir, method=cfg["method"], trained_on=cfg["dataset"], dataset=name, subsample=subsample,
                      seed=cfg["seed"], shots=cfg["shots"], accuracy=acc, images=n,
                      splits={k: dict(accuracy=a, images=m) for k, (a, m) in splits.items()})
        write_json(os.path.join(run_dir, f"eval_{name}_{subsample}.json"), record)
        print(f"{run_dir}: {name} ({subsample}) {acc:.2f}% on {n} images"
              + "".join(f"; {k} {a:.2f}% on {m} images" for k, (a, m) in splits.items()))
        out[name] = acc
    return out


# ----------------------------------------------------------------------------------------------------------
# inference on image files: top-k classes of a trained run, or of zero-shot CLIP without a run


def image_files(paths):
    """The image files among `paths`, folders searched recursively (data.images_below), in the order given."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += [os.path.join(p, f) for f in data.images_below(p)]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise data.MissingImageError(f"{p}: no such image file or folder")
    if not out:
        raise data.DataValueError(f"no image files ({', '.join(data.FOLDER_IMAGE_EXTENSIONS)}) in {', '.join(paths)}")
    return out


def seed_list(text):
    """--seeds "1-3" or "4,5,6" -> a set of seeds (None: every seed)."""
    if not text:
        return None
    try:
        seeds = set()
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds.update(range(int(lo), int(hi or lo) + 1))
        return seeds
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected a range 1-3 or a list 4,5,6") from None


def class_list(classes=None, classes_file=None):
    """--classes "a,b,c" or --classes-file F (one class per line; '#' comments) -> list, or None for the run's."""
    if classes and classes_file:
        raise ConfigError("give --classes or --classes-file, not both")
    if classes_file:
        with open(classes_file, encoding="utf-8") as f:
            names = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    elif classes:
        names = [c.strip() for c in classes.split(",") if c.strip()]
    else:
        return None
    if len(names) < 2:
        raise ConfigError(f"at least two classes are needed to classify, got {names}")
    return names


def finished_run(run_dir, device="cpu", root=None, allow_unfinished=False, echo=print):
    """runs.load_run of a finished run (a readable result.json); an unfinished one is an error unless
    allow_unfinished, and then it says which epoch its checkpoint.pt holds."""
    if not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        raise RunError(f"{run_dir} is not a run folder of train.py with a checkpoint (no checkpoint.pt); for zero-shot "
                       "CLIP without a run pass --method zsclip --clip NAME --classes a,b,c")
    if read_result(run_dir) is None:
        done, cfg = len(read_metrics(run_dir)), read_json(os.path.join(run_dir, "config.json"), "run config") \
            if os.path.isfile(os.path.join(run_dir, "config.json")) else {}
        what = f"epoch {done} of {cfg.get('epochs', '?')}"
        if not allow_unfinished:
            raise RunError(f"{run_dir} is an unfinished run (its checkpoint.pt holds {what}, there is no result.json): "
                           "finish it (its train.py command with --resume), or pass --allow-unfinished to use that "
                           "checkpoint anyway")
        echo(f"warning: {run_dir} is unfinished: using its checkpoint.pt, {what} (--allow-unfinished)")
    return load_run(run_dir, device, root)


def predictor(run_dir=None, clip=None, root=None, classes=None, template="a photo of a {}.", device="cpu",
              allow_unfinished=False, echo=print):
    """(model on its class list, run config, test transform): a trained run (finished_run; `classes` replaces
    its classes), or without a run zero-shot CLIP `clip` (a name or a path; "toy" = the shipped toy CLIP) on
    `classes` with `template`."""
    if run_dir:
        model = finished_run(run_dir, device, root, allow_unfinished, echo)
        cfg = model.cfg
        if classes:
            model.set_classnames(classes)
    else:
        if not classes:
            raise ConfigError("zero-shot prediction without a run needs --classes or --classes-file")
        cfg = dict(recipes.COMMON, clip=clip or recipes.COMMON["clip"], method="zsclip", template=template)
        model = dapt.ZeroShotCLIP(run_clip(cfg, root or "DATA", device), classes, cfg).eval()
    _, test_tf = train.transforms_of(cfg, model.clip.visual.input_resolution)
    return model, cfg, test_tf


@torch.no_grad()
def predict(paths, run_dir=None, clip=None, root=None, classes=None, template="a photo of a {}.", topk=5,
            out=None, device="cpu", batch=32, echo=print, allow_unfinished=False):
    """Top-k classes with probabilities (softmax of the model's logits) for every image among `paths`;
    printed one line per image and, with `out`, written as CSV (image, class_1, prob_1, ..., class_k, prob_k).
    -> [(image path, [(class, probability), ...])]."""
    if not (isinstance(topk, int) and topk >= 1):
        raise ConfigError(f"--topk {topk}: expected a number of classes >= 1")
    files = image_files(paths)
    model, cfg, tf = predictor(run_dir, clip, root, classes, template, device, allow_unfinished, echo)
    autocast = train.precision_of(cfg, device)[2] if run_dir else None
    names, k = list(model.classnames), min(topk, len(model.classnames))
    rows = []
    with torch.autocast(device_type=torch.device(device).type, dtype=autocast, enabled=autocast is not None):
        T = model.text_features()
        for i in range(0, len(files), batch):
            chunk = files[i:i + batch]
            x = torch.stack([tf(open_image(p)) for p in chunk]).to(device)
            prob = model(x, text_features=T).float().softmax(-1)
            p, idx = prob.topk(k, dim=-1)
            for f, pp, ii in zip(chunk, p.tolist(), idx.tolist()):
                rows.append((f, [(names[j], v) for j, v in zip(ii, pp)]))
                echo(f"{f}: " + ", ".join(f"{c} {v:.3f}" for c, v in rows[-1][1]))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image"] + [h for r in range(1, k + 1) for h in (f"class_{r}", f"prob_{r}")])
            w.writerows([f] + [x for c, v in top for x in (c, f"{v:.6f}")] for f, top in rows)
        echo(f"wrote {out}")
    return rows

# ----------------------------------------------------------------------------------------------------------
# attention pictures: the CLS query's attention over the patches, zero-shot CLIP beside the tuned model
#
# The map is one block's attention row of the CLS query (default: the last block), softmax(q_cls k^T / sqrt(d))
# averaged over the heads, read at the patch keys: a [grid, grid] map that sums to at most 1 (the rest goes to
# CLS itself and to prompt tokens). It is not attention rollout: with deep prompts the prompt tokens are replaced
# between blocks, so a rollout through them is not defined; the last block's row is what the CLS output reads.


def cls_attention(attn, forward):
    """(forward()'s output, [B, L] attention row of the CLS query in the FIRST call of the clip.Attention module
    `attn` during forward(), averaged over heads). Read from the q, k the module computes (its `capture`), so
    prompts, biases (DA-VPT+) and masks of the model are the ones used; nothing is copied from the block loop."""
    seen = []

    def pre_hook(module, args, kwargs):
        if not seen:
            seen.append(kwargs)
            if kwargs.get("capture") is None:
                kwargs["capture"] = {}
        return args, kwargs

    handle = attn.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        out = forward()
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the attention block was not called by forward()")
    kw = seen[0]
    q, k = kw["capture"]["q"].float(), kw["capture"]["k"].float()  # [B, H, L, d]
    scores = (q[:, :, :1] @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, 1, L]
    if kw.get("key_mask") is not None:
        km = kw["key_mask"]
        km = torch.nn.functional.pad(km, (0, scores.shape[-1] - km.shape[1]), value=True)
        scores = scores.masked_fill(~km[:, None, None, :], float("-inf"))
    if kw.get("attn_mask") is not None:
        scores = scores.masked_fill(~kw["attn_mask"][:1].to(scores.device)[None, None], float("-inf"))
    return out, scores.softmax(-1).mean(1)[:, 0]


def patch_map(row, grid):
    """[B, L] CLS attention row -> [B, grid, grid] over the patch keys (row-major, as the ViT's patches)."""
    return row[:, 1:1 + grid * grid].reshape(-1, grid, grid)


def _unfrozen_clip(model):
    """Whether training changed CLIP's own tensors (DA-VPT+ with bias_extra): then zero-shot needs a fresh CLIP."""
    return any(n.startswith("clip.") for n, p in model.named_parameters() if p.requires_grad)


def _colormap(v):
    """[..] values in [0, 1] -> uint8 [.., 3]: dark blue -> blue -> cyan -> yellow -> red."""
    stops = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    rgb = np.array([[0, 0, 96], [0, 64, 255], [0, 230, 230], [255, 230, 0], [230, 0, 0]], dtype=np.float64)
    return np.stack([np.interp(v, stops, rgb[:, c]) for c in range(3)], -1).astype(np.uint8)


def _overlay(image, value_map, size, dim=None):
    """image uint8 [S, S, 3] -> PIL [size, size]: value_map ([g, g] or [S, S], >= 0) as a heat overlay scaled to
    its max (patch grids drawn as blocks); dim: a {0, 1} [S, S] mask whose 0 area is darkened instead."""
    base = Image.fromarray(image).resize((size, size), Image.BICUBIC)
    if dim is not None:
        m = np.asarray(Image.fromarray((dim * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)) / 255.0
        return Image.fromarray((np.asarray(base) * (0.2 + 0.8 * m[..., None])).astype(np.uint8))
    v = np.asarray(value_map, dtype=np.float64)
    v = v / v.max() if v.max() > 0 else v
    heat = Image.fromarray(_colormap(v)).resize((size, size), Image.NEAREST if v.shape[0] < image.shape[0]
                                                else Image.BILINEAR)
    return Image.blend(base, heat, 0.55)


def _panel_sheet(panels, size):
    """[(title lines, PIL image)] -> one PIL image: the panels side by side, the titles above them."""
    font = ImageFont.load_default()
    line_h = 14
    n_lines = max(len(t) for t, _ in panels)
    sheet = Image.new("RGB", (len(panels) * (size + 8) + 8, size + 16 + n_lines * line_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (title, img) in enumerate(panels):
        x = 8 + i * (size + 8)
        for j, t in enumerate(title):
            draw.text((x, 4 + j * line_h), t, fill="black", font=font)
        sheet.paste(img, (x, 8 + n_lines * line_h))
    return sheet


@torch.no_grad()
def attention_pictures(run_dir, paths, out, block=-1, root=None, device="cpu", size=224, echo=print,
                       allow_unfinished=False):
    """Write <out>/<image stem>.png per image: the image (as the model sees it: the test transform), zero-shot
    CLIP's CLS attention (block `block`, see cls_attention), the tuned model's, and for DAPT / FVG-PT the training
    cue: the mask file (DIR/mask/...) of an image of the run's dataset, or DAPT-G's Grad-CAM (for the tuned model's
    predicted class, thresholded as in training). The maps go to <stem>.npz as well.
    -> [dict(image, png, npz, zero_shot [g, g], tuned [g, g], cue [S, S] or None, cue_kind)]."""
    files = image_files(paths)
    model = finished_run(run_dir, device, root, allow_unfinished, echo)
    cfg, visual = model.cfg, model.clip.visual
    _, tf = train.transforms_of(cfg, visual.input_resolution)
    zs_clip = run_clip(cfg, model.run_root, device) if _unfrozen_clip(model) else model.clip
    autocast = train.precision_of(cfg, device)[2]  # as evaluation: bf16 / fp16 weights run under autocast

    def amp():
        return torch.autocast(device_type=torch.device(device).type, dtype=autocast, enabled=autocast is not None)
    with amp():
        zs_T = encode_texts(zs_clip, [f"a photo of a {c}." for c in model.classnames])
        T = model.text_features()
    tuned_tower = model.host if isinstance(model, dapt.FVGPT) else model
    n_blocks = len(visual.transformer.resblocks)
    if not -n_blocks <= block < n_blocks:
        raise ConfigError(f"--block {block}: the image tower has {n_blocks} blocks (0..{n_blocks - 1}, or -1 "
                               "= the last)")
    b = block % n_blocks
    dataset_dir = os.path.normpath(os.path.join(model.run_root or "", data.DATASETS[cfg["dataset"]].folder)) \
        if cfg.get("dataset") in data.DATASETS else None
    cue_kind = ("gradcam" if cfg.get("cue") == "gradcam" else "mask") if isinstance(model, dapt.DAPT) else \
        ("mask" if isinstance(model, dapt.FVGPT) else None)
    os.makedirs(out, exist_ok=True)
    records, used = [], set()
    for path in files:
        img = open_image(path)
        mask = None
        if cue_kind == "mask" and dataset_dir and os.path.abspath(path).startswith(dataset_dir + os.sep):
            mpath = mask_path(dataset_dir, os.path.abspath(path))
            if os.path.isfile(mpath):
                enc, _ = resolve_mask_encoding(dataset_dir, [mpath], "official" if cfg.get("mask_quirk")
                                                    else cfg.get("mask_encoding", ""))
                x, mask = tf.pair(img, open_mask(mpath), encoding=enc)
        if mask is None:
            x = tf(img)
        x = x[None].to(device)
        with amp():
            zs_logits, zs_row = cls_attention(zs_clip.visual.transformer.resblocks[b].attn, lambda: (
                zs_clip.logit_scale.exp() * normalize(zs_clip.visual(x)) @ zs_T.t()))
            logits, row = cls_attention(model.clip.visual.transformer.resblocks[b].attn,
                                        lambda: model(x, text_features=T))
        pred = int(logits.argmax(-1))
        cue, cue_title = None, []
        if cue_kind == "gradcam":
            with torch.enable_grad(), amp():
                m, cam = model.gradcam(x, torch.tensor([pred], device=device),
                                       model.host.text_features(model.bg_tokens) if cfg.get("gradcam_quirk") else T,
                                       return_cam=True)
            cue, cue_dim = cam[0, 0].float().cpu().numpy(), m[0, 0].float().cpu().numpy()
            cue_title = ["Grad-CAM cue (DAPT-G)", f"for '{model.classnames[pred]}'",
                         f">= {cfg['gradcam_threshold']}: {cue_dim.mean():.0%} of the image"]
        elif cue_kind == "mask":
            if mask is not None:
                cue = cue_dim = mask[0].numpy()
                cue_title = ["mask cue (training)", f"foreground {cue_dim.mean():.0%}"]
            else:
                cue_title = ["mask cue: no mask file", "(images of the run's", "dataset only)"]
        g = visual.grid
        zs_map, tuned_map = patch_map(zs_row, g)[0].cpu(), patch_map(row, g)[0].cpu()
        shown = ((x[0].float().cpu() * tf._std + tf._mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
        shown = shown.astype(np.uint8)
        zs_p, p = zs_logits.float().softmax(-1)[0], logits.float().softmax(-1)[0]
        zs_pred = int(zs_p.argmax())
        tag = f"{cfg['method']}{cfg.get('tag', '')}"
        panels = [([os.path.basename(path)[:32], f"{shown.shape[0]} px, block {b + 1}/{n_blocks}"],
                   Image.fromarray(shown).resize((size, size), Image.BICUBIC)),
                  (["zero-shot CLIP: CLS attention", f"'{model.classnames[zs_pred]}' {zs_p[zs_pred]:.2f}",
                    f"on patches: {zs_map.sum():.2f}"], _overlay(shown, zs_map.numpy(), size)),
                  ([f"{tag}: CLS attention" + ("" if tuned_tower.changes_image_tower else " (tower unchanged)"),
                    f"'{model.classnames[pred]}' {p[pred]:.2f}", f"on patches: {tuned_map.sum():.2f}"],
                   _overlay(shown, tuned_map.numpy(), size))]
        if cue_kind:
            panels.append((cue_title, _overlay(shown, cue, size) if cue_kind == "gradcam" else
                           (_overlay(shown, None, size, dim=cue) if cue is not None else
                            Image.new("RGB", (size, size), "lightgray"))))
        stem = os.path.splitext(os.path.basename(path))[0]
        while stem in used:
            stem += "_"
        used.add(stem)
        png, npz = os.path.join(out, stem + ".png"), os.path.join(out, stem + ".npz")
        _panel_sheet(panels, size).save(png)
        np.savez(npz, image=shown, zero_shot=zs_map.numpy(), tuned=tuned_map.numpy(),
                 **({"cue": cue} if cue is not None else {}))
        records.append(dict(image=path, png=png, npz=npz, zero_shot=zs_map, tuned=tuned_map, cue=cue,
                            cue_kind=cue_kind, prediction=model.classnames[pred]))
        echo(f"{path} -> {png}")
    return records

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="aggregate result.json files below a folder", allow_abbrev=False)
    t.add_argument("root")
    t.add_argument("--out", help="where table.md / table.csv go (default: the root)")
    c = sub.add_parser("compare", allow_abbrev=False, help="paired comparison of two sets of runs, seed by seed: "
                       "means, the difference with 95 %% intervals (Student t; bootstrap from 8 seeds), seeds agreeing")
    c.add_argument("a", help="a glob of run folders (quote it: 'runs/b2n/toy/maple/shots16_seed*') or ROOT:METHOD")
    c.add_argument("b", help="the other side, the same way")
    c.add_argument("--seeds", help="only these seeds: 1-3, or 4,5,6")
    c.add_argument("--out", help="also write the rows as CSV")
    r = sub.add_parser("run", help="evaluate trained runs on datasets / class subsets", allow_abbrev=False)
    r.add_argument("runs", nargs="+")
    r.add_argument("--dataset", nargs="*", help="target datasets (default: the run's own)")
    r.add_argument("--subsample", default="all", choices=["all", "base", "new"])
    r.add_argument("--root", help="data root (default: the one the run was trained with)")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    q = sub.add_parser("predict", allow_abbrev=False, help="top-k classes of images (files or folders) with "
                       "probabilities, from a trained run or zero-shot CLIP (--method zsclip --clip NAME)")
    q.add_argument("paths", nargs="+", metavar="RUN_DIR IMAGE_OR_FOLDER", help="a run folder, then images or folders "
                   "(with --method zsclip: images only)")
    q.add_argument("--method", choices=["zsclip"], help="zero-shot CLIP without a run (needs --classes)")
    q.add_argument("--clip", default=recipes.COMMON["clip"], help="with --method zsclip: a CLIP name or checkpoint "
                   "path; toy = the shipped toy CLIP (assets/toy_clip.safetensors)")
    q.add_argument("--template", default="a photo of a {}.", help="with --method zsclip (default: %(default)s)")
    q.add_argument("--classes", help="comma-separated class names replacing the run's")
    q.add_argument("--classes-file", help="one class name per line, replacing the run's")
    q.add_argument("--topk", type=int, default=5, help="classes per image (>= 1; default %(default)s)")
    q.add_argument("--out", help="also write a CSV: image, class_1, prob_1, ...")
    q.add_argument("--root", help="data root of a toy CLIP (default: the run's, or DATA)")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = sub.add_parser("attention", allow_abbrev=False, help="PNG per image: the image, zero-shot CLIP's and the "
                       "tuned model's CLS attention (last block, mean over heads), DAPT / FVG-PT's training cue")
    a.add_argument("run")
    a.add_argument("images", nargs="+", help="image files or folders")
    a.add_argument("--out", required=True, help="folder for <image>.png and <image>.npz (the maps)")
    a.add_argument("--block", type=int, default=-1, help="which block's CLS attention row (default: the last)")
    a.add_argument("--root", help="data root (default: the one the run was trained with)")
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for command in (q, a):
        command.add_argument("--allow-unfinished", action="store_true", help="use an unfinished run's last saved epoch "
                             "(without it an unfinished run is an error)")
    for command in (t, c, r, q, a):
        command.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "table":
            return tables.table(args.root, args.out)
        if args.command == "compare":
            return tables.compare(args.a, args.b, seed_list(args.seeds), args.out)
        if args.command == "predict":
            run_dir, paths = (None, args.paths) if args.method else (args.paths[0], args.paths[1:])
            if not paths:
                raise ConfigError("predict RUN_DIR IMAGE_OR_FOLDER...: no images given (zero-shot without a "
                                  "run: --method zsclip --clip NAME IMAGE... --classes a,b,c)")
            if run_dir and not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
                raise ConfigError(f"{run_dir} is not a run folder (no checkpoint.pt); for zero-shot CLIP without "
                                  "a run pass --method zsclip --clip NAME --classes a,b,c")
            return predict(paths, run_dir, args.clip, args.root, class_list(args.classes, args.classes_file),
                           args.template, args.topk, args.out, args.device, allow_unfinished=args.allow_unfinished)
        if args.command == "attention":
            return attention_pictures(args.run, args.images, args.out, args.block, args.root, args.device,
                                      allow_unfinished=args.allow_unfinished)
        return {run: evaluate_run(run, args.dataset, args.subsample, args.root, args.device) for run in args.runs}
    except train.USER_ERRORS + (OSError,) as e:  # one message, no traceback (--debug shows it)
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
