"""Tests for kgcoop, dapt (methods.md §8) and fvgpt (§9), and train.py's data_fraction.

A random toy-shaped CLIP (2 layers per tower, 32 px, patch 8) stands in for the pretrained one: these tests check
the wiring (which tensors get gradients, masks, schedules, runs), not accuracy. The end-to-end runs use a tiny
generated toy benchmark in tmp_path.
"""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import clip as clip_module
import dapt
import data
import train

CONFIG = dict(train.TOY_CONFIG, vision_layers=2, transformer_layers=2)
NAMES = ["red circle", "red square", "blue circle", "green cross"]


def make_clip(seed=0):
    return clip_module.random_clip(CONFIG, seed=seed)


def dapt_model(seed=0, **over):
    cfg = train.resolve_config("dapt", "toy", dict(dict(subsample="base"), **over))
    torch.manual_seed(seed)
    return dapt.DAPT(make_clip(seed), NAMES, cfg)


def toy_batch(B=4, seed=0, patch=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 32, 32, generator=g)
    m = torch.zeros(B, 1, 32, 32)
    for b in range(B):  # a box of foreground per image
        i, j = torch.randint(0, 16, (2,), generator=g).tolist()
        m[b, :, i:i + 14, j:j + 14] = 1
    return {"image": x, "label": torch.arange(B) % len(NAMES), "fg_mask": m,
            "fg_frac": F.avg_pool2d(m, patch).flatten(1)}


def grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------
# losses and gradients


def test_pull_push_equals_triplet_margin_loss():
    g = torch.Generator().manual_seed(0)
    a, p, n = (F.normalize(torch.randn(16, 32, generator=g), dim=-1) for _ in range(3))
    for margin in (1.5, 0.3):
        ref = F.triplet_margin_loss(a, p, n, margin=margin, p=2, eps=1e-6, swap=False)
        assert torch.allclose(dapt.pull_push_loss(a, p, n, margin=margin), ref, atol=1e-6)


def test_dapt_views_are_detached_in_pull_push():
    model, batch = dapt_model(), toy_batch()
    terms, _ = model.loss_terms(batch, epoch=0)
    assert set(terms) == {"cls", "v"}
    terms["v"].backward()
    got = grads(model)
    # reference: only the full view carries gradients
    model.zero_grad(set_to_none=True)
    x, m = batch["image"], batch["fg_mask"]
    z = model.image_features(x)
    with torch.no_grad():
        zf, zb = model.image_features(x * m), model.image_features(x * (1 - m))
    dapt.pull_push_loss(z, zf, zb, margin=1.5).backward()
    ref = grads(model)
    assert got["host.couplings.0.weight"].abs().sum() > 0
    for n in ref:
        if ref[n] is None:
            assert got[n] is None or got[n].abs().sum() == 0, n
        else:
            assert torch.allclose(got[n], ref[n], atol=1e-6, rtol=1e-4), n


def test_dapt_foreground_alignment_trains_text_side_only():
    model, batch = dapt_model(), toy_batch()
    terms, _ = model.loss_terms(batch, epoch=7)
    assert set(terms) == {"cls", "f", "b"}
    terms["f"].backward()
    g = grads(model)
    assert g["host.ctx"] is not None and g["host.ctx"].abs().sum() > 0  # text context
    assert g["host.compound_prompts"].abs().sum() > 0  # deep text prompts (text path)
    for i in range(len(model.host.couplings)):  # the image path (coupling maps) gets nothing
        assert g[f"host.couplings.{i}.weight"] is None or g[f"host.couplings.{i}.weight"].abs().sum() == 0
    # L_b reaches the image side through the background view and the text side through the background texts
    model.zero_grad(set_to_none=True)
    terms, _ = model.loss_terms(batch, epoch=7)
    terms["b"].backward()
    g = grads(model)
    assert g["host.couplings.0.weight"].abs().sum() > 0 and g["host.compound_prompts"].abs().sum() > 0


def test_dapt_background_pseudo_label_is_argmax():
    model, batch = dapt_model(), toy_batch()
    with torch.no_grad():
        T_fg, T_bg = model.split_texts(model.all_text_features())
        zb = model.image_features(batch["image"] * (1 - batch["fg_mask"]))
        logits = model.logit_scale * zb @ T_bg.t()
        expected = F.cross_entropy(logits, logits.argmax(-1))
        terms, _ = model.loss_terms(batch, epoch=9)
    assert T_fg.shape[0] == len(NAMES) and T_bg.shape[0] == 32
    assert torch.allclose(terms["b"], expected, atol=1e-5)


def test_staged_schedule_switches_at_the_configured_epoch():
    batch = toy_batch()
    model = dapt_model()
    for epoch, keys in ((0, {"cls", "v"}), (6, {"cls", "v"}), (7, {"cls", "f", "b"}), (12, {"cls", "f", "b"})):
        with torch.no_grad():
            assert set(model.loss_terms(batch, epoch)[0]) == keys, epoch
    model = dapt_model(dapt_switch_epoch=2)
    with torch.no_grad():
        assert set(model.loss_terms(batch, 1)[0]) == {"cls", "v"}
        assert set(model.loss_terms(batch, 2)[0]) == {"cls", "f", "b"}
    model = dapt_model(dapt_schedule="joint")
    with torch.no_grad():
        assert set(model.loss_terms(batch, 0)[0]) == {"cls", "v", "f", "b"}
    # weighted sum as configured
    model = dapt_model()
    with torch.no_grad():
        torch.manual_seed(0)
        loss, stats = model.loss(batch, 0)
    assert loss.item() == pytest.approx(stats["L_cls"] + 0.8 * stats["L_v"], rel=1e-5)


def test_bg_slice_quirk_columns():
    model = dapt_model(bg_slice_quirk=True)
    with torch.no_grad():
        T_all = model.all_text_features()
        T_fg, T_bg = model.split_texts(T_all)
        assert T_fg.shape[0] == len(NAMES) + 7 and T_bg.shape[0] == 25
        assert model(toy_batch()["image"]).shape == (4, len(NAMES) + 7)  # argmax over C + 7 at test time
        model.set_classnames(NAMES[:3])
        assert model.text_features().shape[0] == 3 + 7


# ----------------------------------------------------------------------------------------------------------
# Grad-CAM cues


def test_gradcam_masks_shape_values_normalisation():
    model, batch = dapt_model(cue="gradcam"), toy_batch(B=3)
    assert not model.needs_masks
    with torch.no_grad():
        T = model.text_features()
    m, cam = model.gradcam(batch["image"], batch["label"], T, return_cam=True)
    assert m.shape == (3, 1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    peaks = cam.flatten(1).max(1)[0]
    assert torch.all((peaks > 0.99) & (peaks <= 1.0))  # per-image max normalisation
    assert torch.equal(m, (cam >= 0.5).float())
    assert all(p.grad is None for p in model.parameters())  # parameters untouched
    model.cfg["gradcam_batch_max"] = True
    _, cam_b = model.gradcam(batch["image"], batch["label"], T, return_cam=True)
    assert cam_b.max() == pytest.approx(1.0, abs=1e-4) and cam_b.flatten(1).max(1)[0].min() < 0.999


def test_gradcam_follows_the_given_image():
    """Zero positional embeddings make the tower equivariant to permuting patches: reversing the patch columns
    of the input must reverse the CAM's columns (the CAM is computed on the tensor the step trains on)."""
    model, batch = dapt_model(cue="gradcam"), toy_batch(B=2)
    with torch.no_grad():
        model.clip.visual.positional_embedding.zero_()
        T = model.text_features()
    x = batch["image"]
    g, p = 4, 8
    tiles = x.view(2, 3, g, p, g, p).flip(4)  # reverse the order of patch columns, keep each patch as is
    x_perm = tiles.reshape(2, 3, 32, 32)
    _, cam = model.gradcam(x, batch["label"], T, return_cam=True)
    _, cam_perm = model.gradcam(x_perm, batch["label"], T, return_cam=True)
    assert torch.allclose(cam_perm, cam.flip(-1), atol=1e-4)
    assert not torch.allclose(cam_perm, cam, atol=1e-3)


def test_dapt_gradcam_loss_runs_without_mask_batch():
    model, batch = dapt_model(cue="gradcam"), toy_batch()
    batch = {k: batch[k] for k in ("image", "label")}
    loss, stats = model.loss(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and 0 < stats["fg_area"] < 1


# ----------------------------------------------------------------------------------------------------------
# token-level views


def test_token_view_key_masks():
    frac = torch.tensor([[0.0, 0.49, 0.5, 1.0], [1.0, 1.0, 0.2, 0.0]])
    fg, bg = dapt.views_key_mask(frac, n_prompts=2, threshold=0.5)
    assert fg.shape == bg.shape == (2, 1 + 4 + 2) and fg.dtype == torch.bool
    assert fg[:, 0].all() and bg[:, 0].all() and fg[:, -2:].all() and bg[:, -2:].all()
    assert fg[0, 1:5].tolist() == [False, False, True, True] and fg[1, 1:5].tolist() == [True, True, False, False]
    assert torch.equal(fg[:, 1:5], ~bg[:, 1:5])


def test_token_views_use_the_key_mask():
    model, batch = dapt_model(decouple="token"), toy_batch()
    x = batch["image"]
    with torch.no_grad():
        L = 1 + 16 + model.n_prompts()
        full = model.image_features(x)
        all_visible = model.image_features(x, key_mask=torch.ones(4, L, dtype=torch.bool))
        fg, bg = dapt.views_key_mask(batch["fg_frac"], model.n_prompts())
        z = model.encode_views({"full": (x, None), "fg": (x, fg), "bg": (x, bg)}, ["full", "fg", "bg"])
        ref_fg = model.image_features(x, key_mask=fg)
    assert torch.allclose(full, all_visible, atol=1e-5)
    assert torch.allclose(z["full"], full, atol=1e-5) and torch.allclose(z["fg"], ref_fg, atol=1e-5)
    assert not torch.allclose(z["fg"], z["bg"], atol=1e-3)
    loss, _ = model.loss(batch, 0)
    loss.backward()
    assert model.host.couplings[0].weight.grad.abs().sum() > 0


def test_dapt_hosts_coop_and_vpt():
    batch = toy_batch()
    for host, n in (("coop", 0), ("vpt", 8)):
        model = dapt_model(host=host, dapt_schedule="joint")
        assert model.n_prompts() == n
        loss, stats = model.loss(batch, 0)
        loss.backward()
        assert torch.isfinite(loss) and {"L_v", "L_f", "L_b"} <= set(stats)


# ----------------------------------------------------------------------------------------------------------
# KgCoOp and FVG-PT units


def test_kgcoop_term_is_zero_at_the_template_init():
    cfg = train.resolve_config("kgcoop", "toy", {})
    model = dapt.KgCoOp(make_clip(), NAMES, dict(cfg, template="a photo of a {}."))
    loss, stats = model.loss(toy_batch(), 0)
    assert abs(stats["kg"]) < 1e-5  # ctx = "a photo of a" reproduces the template prompt exactly
    with torch.no_grad():
        model.ctx.add_(0.5 * torch.randn_like(model.ctx))
    loss2, stats2 = model.loss(toy_batch(), 0)
    assert stats2["kg"] > 1e-3
    loss2.backward()
    assert model.ctx.grad.abs().sum() > 0


def fvgpt_model(**over):
    cfg = train.resolve_config("fvgpt", "toy", dict(dict(subsample="base"), **over))
    clip = make_clip()
    host = dapt.CoOp(clip, NAMES, train.resolve_config("coop", "toy", {"subsample": "base"}))
    return dapt.FVGPT(host, NAMES, cfg)


def test_fvgpt_trains_only_adapters_and_gates_and_switches_prediction():
    model = fvgpt_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.split(".")[0] in ("adapter_v", "adapter_t", "alpha_v", "alpha_t", "frg", "brg") for n in trainable)
    assert model.text_only_host and model.mode == "fdc"
    batch = toy_batch()
    loss, stats = model.loss(batch, 0)
    loss.backward()
    assert model.adapter_v[0].weight.grad.abs().sum() > 0 and model.brg[0].weight.grad.abs().sum() > 0
    assert model.frg[0].weight.grad.abs().sum() > 0  # through L_RG
    assert model.host.ctx.grad is None
    x = batch["image"]
    with torch.no_grad():
        f = dapt.normalize(model.host.image_features(x))
        assert torch.allclose(model(x), model.fdc_logits(f, model.host_text()), atol=1e-4)
        model.set_classnames(NAMES[:2])
        assert model.mode == "pc" and model(x).shape == (4, 2)
        model.set_classnames(NAMES)
        assert model.mode == "fdc"
        model.cfg["predict_mode"] = "pc"
        model.set_classnames(NAMES)
        assert model.mode == "pc"


# ----------------------------------------------------------------------------------------------------------
# end to end on a tiny toy benchmark


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toydata")
    data.make_toy(str(root), per_class={"train": 4, "val": 1, "test": 2})
    path = str(root / "random_toy_clip.pt")
    torch.save(make_clip().state_dict(), path)
    return str(root), path


def run(toy_root, out, *args):
    root, clip_path = toy_root
    return train.main(["--dataset", "toy", "--root", root, "--out", str(out), "--clip", clip_path, "--subsample",
                       "base", "--shots", "4", "--warmup-epochs", "0", "--log-every", "1000", *args])


def losses_of(out, method, tag=""):
    folder = os.path.join(out, "b2n", "toy", method + tag, "shots4_seed1")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f], folder


def test_dapt_and_fvgpt_train_end_to_end(toy_root, tmp_path):
    out = str(tmp_path / "runs")
    res = run(toy_root, out, "--method", "dapt", "--epochs", "4", "--lr", "0.05")
    losses, folder = losses_of(out, "dapt")
    assert losses[-1] < losses[0], losses
    assert os.path.exists(os.path.join(folder, "result.json")) and set(res["accuracy"]) == {"base", "new", "hm"}
    # fvgpt on a CoOp host trained here
    run(toy_root, out, "--method", "coop", "--epochs", "2", "--batch", "4", "--lr", "0.01")
    _, host = losses_of(out, "coop")
    res = run(toy_root, out, "--method", "fvgpt", "--host-run", host, "--epochs", "4", "--lr", "0.05")
    losses, folder = losses_of(out, "fvgpt")
    assert losses[-1] < losses[0], losses
    assert res["config"]["host_run"] == host and os.path.exists(os.path.join(folder, "result.json"))
    with pytest.raises(SystemExit, match="seed"):
        run(toy_root, out, "--method", "fvgpt", "--host-run", host, "--seed", "2", "--epochs", "1")


def test_missing_mask_is_a_clear_error(toy_root, tmp_path):
    root, clip_path = toy_root
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(root, "toy"), copy / "toy")
    split = json.load(open(copy / "toy" / "split_toy.json"))
    rel = split["train"][0][0]
    os.remove(copy / "toy" / "mask" / "images" / rel)
    with pytest.raises(data.MissingMaskError, match="mask"):
        train.main(["--dataset", "toy", "--root", str(copy), "--out", str(tmp_path / "runs"), "--clip", clip_path,
                    "--method", "dapt", "--shots", "0", "--epochs", "1"])


def test_data_fraction(toy_root, tmp_path):
    root, _ = toy_root
    cfg = train.resolve_config("coop", "toy", {"data_fraction": 0.5})
    assert cfg["shots"] == 0 and "frac0.5_seed1" in train.run_dir_of("runs", cfg)
    with pytest.raises(SystemExit):
        train.resolve_config("coop", "toy", {"data_fraction": 0.0})
    counts = {}
    for seed in (1, 2):
        bench = data.load_benchmark("toy", root, shots=0, seed=seed)
        full = len(bench.train)
        bench = train.data_fraction_split(bench, 0.5, seed)
        per_class = {}
        for _, label, _ in bench.train:
            per_class[label] = per_class.get(label, 0) + 1
        assert set(per_class.values()) == {2} and len(per_class) == 24  # round(0.5 * 4) of every class
        assert bench.meta["data_fraction"] == 0.5 and bench.meta["train_full"] == full
        counts[seed] = [p for p, _, _ in bench.train]
    assert counts[1] != counts[2]
    again = train.data_fraction_split(data.load_benchmark("toy", root, shots=0, seed=1), 0.5, 1)
    assert [p for p, _, _ in again.train] == counts[1]
    small = train.data_fraction_split(data.load_benchmark("toy", root, shots=0, seed=1), 0.01, 1)
    assert len(small.train) == 24  # at least one per class
