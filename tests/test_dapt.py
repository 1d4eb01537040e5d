"""DAPT (methods.md §8): the loss terms and which tensors they train, the staged schedule, the background-text
slicing quirk, Grad-CAM cues, token-level views, DAPT on every host through the PromptModel protocol, and an
end-to-end run on a tiny toy benchmark with a random CLIP."""
import os
import shutil
import json

import pytest
import torch
import torch.nn.functional as F

import dapt
import train
import recipes
from conftest import NAMES, cli_error, epoch_losses, grads, make_clip, run_folder, toy_batch, train_random_toy


def dapt_model(seed=0, **over):
    cfg = recipes.resolve_config("dapt", "toy", dict(dict(subsample="base"), **over))
    torch.manual_seed(seed)
    return dapt.build_model("dapt", make_clip(seed), NAMES, cfg)


def terms_of(model, batch, epoch):
    """DAPT's active terms at `epoch`, unweighted: {name: value}."""
    terms, _, _ = model.view_terms(batch, epoch)
    return {k: t for k, (_, t) in terms.items()}

# ----------------------------------------------------------------------------------------------------------
# losses and gradients


def test_dapt_views_are_detached_in_pull_push():
    model, batch = dapt_model(), toy_batch()
    terms = terms_of(model, batch, 0)
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
    terms = terms_of(model, batch, 7)
    assert set(terms) == {"cls", "f", "b"}
    terms["f"].backward()
    g = grads(model)
    assert g["host.ctx"] is not None and g["host.ctx"].abs().sum() > 0  # text context
    assert g["host.compound_prompts"].abs().sum() > 0  # deep text prompts (text path)
    for i in range(len(model.host.couplings)):  # the image path (coupling maps) gets nothing
        assert g[f"host.couplings.{i}.weight"] is None or g[f"host.couplings.{i}.weight"].abs().sum() == 0
    # L_b reaches the image side through the background view and the text side through the background texts
    model.zero_grad(set_to_none=True)
    terms = terms_of(model, batch, 7)
    terms["b"].backward()
    g = grads(model)
    assert g["host.couplings.0.weight"].abs().sum() > 0 and g["host.compound_prompts"].abs().sum() > 0


def test_dapt_background_pseudo_label_is_argmax():
    model, batch = dapt_model(), toy_batch()
    with torch.no_grad():
        T_fg, T_bg = model.split_texts(model.host.text_features(model.bg_tokens))
        zb = model.image_features(batch["image"] * (1 - batch["fg_mask"]))
        logits = model.logit_scale * zb @ T_bg.t()
        expected = F.cross_entropy(logits, logits.argmax(-1))
        terms = terms_of(model, batch, 9)
    assert T_fg.shape[0] == len(NAMES) and T_bg.shape[0] == 32
    assert torch.allclose(terms["b"], expected, atol=1e-5)


def test_staged_schedule_switches_at_the_configured_epoch():
    batch = toy_batch()
    model = dapt_model()
    for epoch, keys in ((0, {"cls", "v"}), (6, {"cls", "v"}), (7, {"cls", "f", "b"}), (12, {"cls", "f", "b"})):
        with torch.no_grad():
            assert set(terms_of(model, batch, epoch)) == keys, epoch
    model = dapt_model(dapt_switch_epoch=2)
    with torch.no_grad():
        assert set(terms_of(model, batch, 1)) == {"cls", "v"}
        assert set(terms_of(model, batch, 2)) == {"cls", "f", "b"}
    model = dapt_model(dapt_schedule="joint")
    with torch.no_grad():
        assert set(terms_of(model, batch, 0)) == {"cls", "v", "f", "b"}
    # weighted sum as configured
    model = dapt_model()
    with torch.no_grad():
        torch.manual_seed(0)
        loss, stats = model.loss(batch, 0)
    assert loss.item() == pytest.approx(float(stats["L_cls"] + 0.8 * stats["L_v"]), rel=1e-5)


def test_bg_slice_quirk_columns():
    model = dapt_model(bg_slice_quirk=True)
    with torch.no_grad():
        T_all = model.host.text_features(model.bg_tokens)
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


def official_gradcam(model, images, labels, T_all):
    """The official DAPT-G map written out directly (Ferenas/DAPT trainers/util.py GradCAM.forward_train):
    A = ln_1 output of the last image block; S = sum_b logit[b, y_b] / (B (C + 32)) over all C + 32 texts;
    w_b = mean over the patches of dS/dA; cam = ReLU(A w) on the patch grid, bilinear (align_corners) to the image;
    / (batch max + 1e-6); >= 0.5."""
    v, seen = model.clip.visual, {}
    last = v.transformer.resblocks[-1]

    def keep(module, inputs, out):
        out.retain_grad()
        seen["A"] = out

    hook = last.ln_1.register_forward_hook(keep)
    with torch.enable_grad():
        f = dapt.normalize(v(images, model.visual_prompts()))
        logits = model.logit_scale * f @ T_all.t()
        score = (logits * F.one_hot(labels, T_all.shape[0])).mean()
        score.backward()
    hook.remove()
    A, dA, g = seen["A"].detach(), seen["A"].grad, v.grid
    w = dA[:, 1:1 + g * g].mean(1, keepdim=True)
    cam = torch.relu((A[:, 1:1 + g * g] * w).sum(-1)).view(-1, 1, g, g)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=True)
    cam = cam / (cam.max() + 1e-6)
    return (cam >= 0.5).float(), cam


def test_gradcam_quirk_equals_the_official_formula():
    model, batch = dapt_model(cue="gradcam", gradcam_quirk=True), toy_batch(B=3)
    with torch.no_grad():
        T_all = model.host.text_features(model.bg_tokens)  # C classes + 32 backgrounds
    m_ref, cam_ref = official_gradcam(model, batch["image"], batch["label"], T_all)
    model.zero_grad(set_to_none=True)
    m, cam = model.gradcam(batch["image"], batch["label"], T_all, return_cam=True)
    torch.testing.assert_close(cam, cam_ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(m, m_ref) and cam.max() == pytest.approx(1.0, abs=1e-3)
    model.cfg["gradcam_quirk"] = False  # ours: per image, the 1e-6 negligible
    _, ours = model.gradcam(batch["image"], batch["label"], T_all[:len(NAMES)], return_cam=True)
    assert torch.all(ours.flatten(1).max(1)[0] > 0.999) and not torch.allclose(ours, cam, atol=1e-3)


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
# token-level views and hosts


def test_token_view_key_masks():
    frac = torch.tensor([[0.0, 0.49, 0.5, 1.0], [1.0, 1.0, 0.2, 0.0]])
    fg, bg = dapt.views_key_mask(frac, threshold=0.5)
    assert fg.shape == bg.shape == (2, 1 + 4) and fg.dtype == torch.bool  # CLS + patches; prompts stay visible
    assert fg[:, 0].all() and bg[:, 0].all()
    assert fg[0, 1:5].tolist() == [False, False, True, True] and fg[1, 1:5].tolist() == [True, True, False, False]
    assert torch.equal(fg[:, 1:5], ~bg[:, 1:5])


def test_token_views_use_the_key_mask():
    model, batch = dapt_model(decouple="token"), toy_batch()
    x = batch["image"]
    with torch.no_grad():
        full = model.image_features(x)
        all_visible = model.image_features(x, key_mask=torch.ones(4, 1 + 16, dtype=torch.bool))
        fg, bg = dapt.views_key_mask(batch["fg_frac"])
        z = model.encode_views({"full": (x, None), "fg": (x, fg), "bg": (x, bg)}, ["full", "fg", "bg"])
        ref_fg = model.image_features(x, key_mask=fg)
    assert torch.allclose(full, all_visible, atol=1e-5)
    assert torch.allclose(z["full"], full, atol=1e-5) and torch.allclose(z["fg"], ref_fg, atol=1e-5)
    assert not torch.allclose(z["fg"], z["bg"], atol=1e-3)
    loss, _ = model.loss(batch, 0)
    loss.backward()
    assert model.host.couplings[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("host", dapt.DAPT.hosts)
@pytest.mark.parametrize("decouple", ["pixel", "token"])
def test_dapt_on_every_host(host, decouple):
    """DAPT composes with each host through the PromptModel protocol only: the same code path for every host."""
    batch = toy_batch()
    model = dapt_model(host=host, dapt_schedule="joint", decouple=decouple)
    assert type(model.host) is dapt.METHODS[host] and model.changes_image_tower == model.host.changes_image_tower
    loss, stats = model.loss(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and {"L_cls", "L_v", "L_f", "L_b"} <= set(stats)
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(n.startswith("host.") for n in trained)  # only the host's prompts learn
    with torch.no_grad():
        assert model(batch["image"]).shape == (4, len(NAMES))

# ----------------------------------------------------------------------------------------------------------
# end to end on a tiny toy benchmark


def test_dapt_and_fvgpt_train_end_to_end(random_toy, tmp_path, capsys):
    out = str(tmp_path / "runs")
    res = train_random_toy(random_toy, out, "dapt", "--lr", "0.05", epochs=4)
    folder = run_folder(out, "dapt")
    losses = epoch_losses(folder)
    assert losses[-1] < losses[0], losses
    assert os.path.exists(os.path.join(folder, "result.json"))
    assert set(res["accuracy"]) == {"base", "new", "hm", "base_corr", "new_corr"}
    bench = res["config"]["benchmark"]  # the toy declares its masks white on black (mask/ENCODING): recorded
    assert bench["mask_encoding"] == "white"
    assert bench["mask_encoding_source"].endswith(os.path.join("mask", "ENCODING"))
    assert res["config"]["selection"] == "best_val"  # DAPT base-to-novel selects on the validation split (official)
    ckpt, best = (torch.load(os.path.join(folder, f), weights_only=True) for f in ("checkpoint.pt", "best.pt"))
    assert all(torch.equal(ckpt["params"][k], best["params"][k]) for k in best["params"])  # the reported model
    # fvgpt on a CoOp host trained here
    train_random_toy(random_toy, out, "coop", "--batch", "4", "--lr", "0.01", epochs=2)
    host = run_folder(out, "coop")
    res = train_random_toy(random_toy, out, "fvgpt", "--host-run", host, "--lr", "0.05", epochs=4)
    folder = run_folder(out, "fvgpt")
    losses = epoch_losses(folder)
    assert losses[-1] < losses[0], losses
    assert res["config"]["host_run"] == host and os.path.exists(os.path.join(folder, "result.json"))
    with pytest.raises(SystemExit) as e:
        train_random_toy(random_toy, out, "fvgpt", "--host-run", host, "--seed", "2", epochs=1)
    assert e.value.code == 1 and "seed" in capsys.readouterr().err


def test_missing_mask_is_a_clear_error(random_toy, tmp_path, capsys):
    root, clip_path = random_toy
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(root, "toy"), copy / "toy")
    split = json.load(open(copy / "toy" / "split_toy.json"))
    rel = split["train"][0][0]
    os.remove(copy / "toy" / "mask" / "images" / rel)
    code, err = cli_error(capsys, train.main, ["--dataset", "toy", "--root", str(copy), "--out",
                                               str(tmp_path / "runs"), "--clip", clip_path, "--method", "dapt",
                                               "--shots", "0", "--epochs", "1"])
    assert code == 1 and "mask" in err and rel in err
