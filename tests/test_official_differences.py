"""The table of where our defaults differ from the official code, in docs/methods.md between the markers
<!-- official-differences --> and <!-- /official-differences -->: every flag it lists is a config key of its
method, differs from the default, and changes behaviour (a probe per key; a flag without a probe fails)."""
import os
import re
import shlex

import pytest
import torch

import dapt
import train
import loader
import recipes
import runs
from conftest import NAMES, SMALL_CONFIG, random_clip, run_folder, toy_batch, train_random_toy

METHODS_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "methods.md")


def table_flags():
    """[(method, key, value text)] of the flags column of the official-differences table of docs/methods.md."""
    with open(METHODS_DOC, encoding="utf-8") as f:
        text = f.read()
    body = text[text.index("<!-- official-differences -->"):text.index("<!-- /official-differences -->")]
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    out = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        method = re.search(r"`([\w-]+)`", cells[0])
        method = method.group(1) if method else "coop"  # "all (Dassl-based)"
        for code in re.findall(r"`([^`]*)`", cells[3]):
            words = shlex.split(code)
            for i, w in enumerate(words):
                if w.startswith("--"):
                    out.append((method, w[2:].replace("-", "_"), words[i + 1]))
    return out


FLAGS = table_flags()


def model_loss(method, cfg, batch, seed=0, names=NAMES):
    clip = random_clip(SMALL_CONFIG)
    torch.manual_seed(seed)
    model = dapt.build_model(method, clip, names, cfg)
    with torch.no_grad():  # move every prompt off its initial value, so that each term is non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.loss(batch, epoch=0)[0]


def fvgpt_loss_changes(key, value):
    clip = random_clip(SMALL_CONFIG)
    host = dapt.CoOp(clip, NAMES, recipes.resolve_config("coop", "toy", {"subsample": "base"}))
    cfg = recipes.resolve_config("fvgpt", "toy", {"subsample": "base"})
    losses = []
    for c in (cfg, dict(cfg, **{key: value})):
        torch.manual_seed(0)
        model = dapt.FVGPT(host, NAMES, c)
        with torch.no_grad():
            model.alpha_v.fill_(0.5)
            losses.append(model.loss(toy_batch(), 0)[0])
    return not torch.equal(*losses)


def run_key_changes(method, key, value):
    """A run key: what train.py derives from it changes."""
    base = recipes.resolve_config(method, "toy", {"subsample": "base"})
    new = dict(base, **{key: value})
    if key == "precision":
        return runs.precision_of(base, "cpu") != runs.precision_of(new, "cpu")
    if key == "dassl_drop_last":
        items = [(f"img{i}.png", i % 2, "c") for i in range(10)]
        tf = loader.build_transform(True, size=32)
        n = [loader.build_loader(items, tf, 4, train=True, dassl_drop_last=c["dassl_drop_last"]).samples_per_epoch
             for c in (base, new)]
        return n[0] != n[1]
    if key in ("lr", "epochs", "batch", "official_optim"):
        if key == "official_optim":
            new = recipes.resolve_config(method, "toy", {"subsample": "base", key: value})
        sched = [[train.lr_at(c, e, 0, 10) for e in range(5)] + [c["batch"], c["optimizer"]] for c in (base, new)]
        return sched[0] != sched[1]
    if key in ("resize_only", "mask_quirk"):
        return [t.constants() for t in train.transforms_of(base, 32)] != \
            [t.constants() for t in train.transforms_of(new, 32)]
    raise KeyError(key)


@pytest.mark.parametrize("method, key, value", FLAGS, ids=[f"{m}-{k}" for m, k, _ in FLAGS])
def test_listed_flag_exists_and_changes_behaviour(method, key, value, random_toy, tmp_path):
    cfg = recipes.resolve_config(method, "toy", {"subsample": "base"})
    assert key in cfg, f"--{key} is not a config key of {method}"
    typed = recipes.value_type(key, cfg[key])(value)
    assert typed != cfg[key], f"--{key} {value} is the default of {method}"
    if key in ("precision", "dassl_drop_last", "lr", "epochs", "batch", "official_optim", "resize_only", "mask_quirk"):
        assert run_key_changes(method, key, typed)
    elif key == "mask_encoding":  # the toy's masks are declared white: label reads them otherwise
        root, _ = random_toy
        d = os.path.join(root, "toy")
        assert loader.resolve_mask_encoding(d, [], "")[0] != loader.resolve_mask_encoding(d, [], typed)[0]
    elif key == "selection":  # a DAPT run keeps a best.pt only when it selects on the validation split
        kept = []
        for tag, extra in (("-a", []), ("-b", ["--selection", value])):
            train_random_toy(random_toy, tmp_path, method, "--tag", tag, *extra, epochs=1)
            kept.append(os.path.exists(os.path.join(run_folder(tmp_path, method, "--tag", tag), "best.pt")))
        assert kept == [True, False]
    elif key == "proto_train_view":
        views = []

        def features(fn, view="train", **kw):  # what prepare asks train.py for
            views.append(view)
            return torch.zeros(4, 64), torch.arange(4)
        for c in (cfg, dict(cfg, proto_train_view=typed)):
            dapt.DistributionAwarePT(random_clip(SMALL_CONFIG), NAMES, c).prepare(features)
        assert views == ["train", "test"]
    elif key == "template":  # KgCoOp's t0
        clip = random_clip(SMALL_CONFIG)
        t0 = [dapt.KgCoOp(clip, NAMES, dict(cfg, template=t)).t0 for t in (cfg["template"], typed)]
        assert not torch.allclose(t0[0], t0[1])
    elif key == "class_token_layout":
        clip = random_clip(SMALL_CONFIG)
        tokens = [dapt.TextPrompts(clip, ["crane (bird)"], 4, position="middle", layout=v).tokens
                  for v in (cfg[key], typed)]
        assert not torch.equal(*tokens)
    elif method == "fvgpt":
        assert fvgpt_loss_changes(key, typed)
    else:  # a model key: the loss on the same batch and weights changes (in the setting where the key acts)
        needs = {"gradcam_quirk": {"cue": "gradcam"}, "proxy_mask": {"patch_sample": "attn_slot"}}.get(key, {})
        cfg, batch = dict(cfg, **needs), toy_batch()
        if key == "paper_norm":  # matters when a proxy has no positive in the batch
            batch["label"] = torch.tensor([0, 0, 1, 1])
        assert not torch.equal(model_loss(method, cfg, batch), model_loss(method, dict(cfg, **{key: typed}), batch))


def test_the_table_lists_the_quirk_flags():
    keys = {k for _, k, _ in FLAGS}
    assert {"bg_slice_quirk", "gradcam_quirk", "mask_quirk", "class_token_layout", "proto_train_view",
            "official_optim", "dassl_drop_last"} <= keys
    quirks = {k for m in dapt.METHODS if m != "fvgpt" for k in dapt.model_defaults(m) if k.endswith("_quirk")}
    quirks |= {k for k in recipes.COMMON if k.endswith("_quirk")}
    assert quirks <= keys, f"quirk flags missing from the table in docs/methods.md: {quirks - keys}"
