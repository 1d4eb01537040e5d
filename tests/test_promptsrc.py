"""IVLP and PromptSRC (methods.md §6b, §6): prompt layout against a hand-written tower loop, trainable counts at
ViT-B/16 widths, the official initial draws, the loss terms and GPA against their formulas, DAPT and FVG-PT on a
PromptSRC host, and a toy run that resumes exactly with the GPA aggregate."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import classic
import clip as clip_module
import dapt
import prompting
import recipes
from conftest import (NAMES, SMALL_CONFIG, epoch_losses, interrupt_at_epoch, make_clip, official_clip_draws, perturbed,
                      random_clip, run_folder, toy_batch, train_toy)


def cfg_of(method, **kw):
    return dict(recipes.resolve_config(method, "toy", {"subsample": "base"}), **kw)


def tower_text(model):
    """IVLP text features by a hand-written loop over the text blocks (full 77 positions, no savings)."""
    clip, n = model.clip, model.cfg["n_ctx_text"]
    x, eot = model.prompts(model.ctx)
    x = x + clip.positional_embedding.to(x.dtype)
    for i, block in enumerate(clip.transformer.resblocks):
        if 0 < i < model.J_t:
            x = torch.cat([x[:, :1], model.text_prompts[i - 1].expand(len(x), -1, -1), x[:, 1 + n:]], 1)
        x = block(x, causal=True)
    return dapt.normalize(clip.ln_final(x[torch.arange(len(x)), eot]) @ clip.text_projection)


def tower_image(model, images):
    """IVLP image features by a hand-written loop: V_0 after the patches before ln_pre, P^v_i replace the last n_v."""
    v, P = model.clip.visual, model.image_prompts
    x = v.ln_pre(torch.cat([v.embed(images), P[0].expand(len(images), -1, -1)], 1))
    n = P.shape[1]
    for i, block in enumerate(v.transformer.resblocks):
        if 0 < i < model.J_v:
            x = torch.cat([x[:, :-n], P[i].expand(len(images), -1, -1)], 1)
        x = block(x)
    return dapt.normalize(v.ln_post(x[:, 0]) @ v.proj)


# ----------------------------------------------------------------------------------------------------------
# layout, sizes, initial values


@pytest.mark.parametrize("method,extra", [("ivlp", {}), ("promptsrc", {}), ("ivlp", dict(n_ctx_text=8))])
def test_prompts_reach_each_block_as_the_hand_written_loop(method, extra):
    clip = random_clip(dict(SMALL_CONFIG, vision_layers=3, transformer_layers=3))
    model = perturbed(dapt.build_model(method, clip, NAMES, cfg_of(method, **extra)))
    assert model.J_t == model.J_v == 3 and model.text_prompts.shape[0] == 2 and model.image_prompts.shape[0] == 3
    images = toy_batch()["image"]
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(), tower_text(model), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.image_features(images), tower_image(model, images), rtol=1e-5, atol=1e-6)
        T_all = model.text_features(dapt.tokenize(["a clean origami sky."]))
        torch.testing.assert_close(T_all[:len(NAMES)], model.text_features(), rtol=1e-5, atol=1e-6)
    init = extra.get("n_ctx_text", 2 if method == "ivlp" else 4)
    assert model.prompts.ctx_init == ("a photo of a" if init <= 4 else None)  # > 4 context vectors: random, "X"


def test_trainable_counts_at_vit_b16():
    """methods.md §6 / §6b: 2+2 depth 12: 30,720; 4+4 depth 9: 46,080 (cross-dataset depth 3: 15,360); deep
    language prompting 4+0 depth 12/0: 24,576 and the image tower is CLIP's."""
    with torch.device("meta"):
        big = clip_module.CLIP(**clip_module.VIT_B16_CONFIG)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    off = dict(official_init=False)
    assert count(dapt.IVLP(big, NAMES, off)) == 30_720
    assert count(dapt.PromptSRC(big, NAMES, off)) == 46_080
    xd = recipes.resolve_config("promptsrc", "imagenet", {"setting": "xd"})
    assert count(dapt.PromptSRC(big, NAMES, dict(xd, official_init=False))) == 15_360
    lang = dapt.IVLP(big, NAMES, dict(off, n_ctx_text=4, n_ctx_vision=0, prompt_depth_vision=0))
    assert count(lang) == 24_576 and not lang.changes_image_tower and lang.visual_prompts() is None
    with pytest.raises(dapt.ConfigError, match="prompt-depth-text"):
        dapt.IVLP(big, NAMES, dict(off, prompt_depth_text=0))


@pytest.mark.parametrize("n_ctx_text", [4, 8])
def test_official_init_replays_the_official_draw_order(n_ctx_text):
    """official_init = the official build's draws from the seed: VPT after conv1, VPT_shallow inside blocks
    0 < i < J, a random ctx (fp16) after the whole CLIP; the global generator is left alone."""
    clip = make_clip()
    c, state = clip.config, torch.random.get_rng_state()
    model = dapt.PromptSRC(clip, NAMES, dict(seed=3, n_ctx_text=n_ctx_text, prompt_depth_text=2, prompt_depth_vision=2))
    assert torch.equal(torch.random.get_rng_state(), state)
    draw = lambda n, W: lambda: nn.init.normal_(torch.empty(n, W), std=0.02)  # noqa: E731
    with torch.random.fork_rng():
        torch.manual_seed(3)
        ref = official_clip_draws(c, vpt=draw(4, 64), image_deep=lambda i: draw(4, 64) if i == 1 else None,
                                  text_deep=lambda i: draw(n_ctx_text, 64) if i == 1 else None)
        ctx = torch.empty(n_ctx_text, 64, dtype=torch.float16).normal_(std=0.02).float()
    assert torch.equal(model.image_prompts[0], ref[0]) and torch.equal(model.image_prompts[1], ref[1])
    assert torch.equal(model.text_prompts[0], ref[2])
    assert torch.equal(model.ctx, ctx) if n_ctx_text > 4 else torch.equal(model.ctx, model.prompts.init_vectors)
    fresh = dapt.PromptSRC(clip, NAMES, dict(seed=3, official_init=False))
    assert not torch.equal(fresh.image_prompts, model.image_prompts)

# ----------------------------------------------------------------------------------------------------------
# loss terms and GPA


def test_promptsrc_loss_terms_equal_the_formulas():
    clip = make_clip()
    model = perturbed(dapt.PromptSRC(clip, NAMES, cfg_of("promptsrc")))
    batch = toy_batch()
    x, y = batch["image"], batch["label"]
    loss, stats = model.loss(batch, 0)
    assert len(classic.PROMPTSRC_TEMPLATES) == 60 and classic.PROMPTSRC_TEMPLATES[0] == "a photo of a {}."
    assert set(classic.PROMPTSRC_TEMPLATES) == set(prompting.IMAGENET_TEMPLATES[:60])
    with torch.no_grad():
        raw = torch.stack([clip.encode_text(dapt.tokenize([t.format(n) for n in NAMES]))
                           for t in classic.PROMPTSRC_TEMPLATES])
        T0 = F.normalize(raw.mean(0), dim=-1)  # raw features averaged, then normalised
        z0 = F.normalize(clip.encode_image(x), dim=-1)
        T, z, s = model.text_features(), model.image_features(x), clip.logit_scale.exp()
        l, l0 = s * z @ T.t(), s * z0 @ T0.t()
        p0 = l0.softmax(-1)
        kl = (p0 * (p0.log() - l.log_softmax(-1))).sum() / l.numel()
        expect = dict(L_cls=F.cross_entropy(l, y), L_scl_text=(T - T0).abs().mean(), L_scl_image=(z - z0).abs().mean(),
                      L_scl_logits=kl)
    for k, v in expect.items():
        assert float(stats[k]) == pytest.approx(v.item(), rel=1e-4, abs=1e-7), k
    total = expect["L_cls"] + 25 * expect["L_scl_text"] + 10 * expect["L_scl_image"] + kl
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.clip.parameters())


def test_gpa_weights_and_aggregate():
    w = classic.gpa_weights(20, 15, 1)  # methods.md §6: e = 13..17 -> 0.054, 0.242, 0.399, 0.242, 0.054
    assert sum(w) == pytest.approx(1.0, abs=1e-12)
    assert w[12:17] == pytest.approx([0.0540, 0.2420, 0.3989, 0.2420, 0.0540], abs=1e-4)
    assert classic.gpa_weights(10, 15, 1)[-2:] == pytest.approx([0.0041, 0.9959], abs=1e-4)  # FVG-PT's host config
    g = [math.exp(-0.5 * ((e - 30) / 30) ** 2) for e in range(1, 51)]
    assert classic.gpa_weights(50, 30, 30) == pytest.approx([x / sum(g) for x in g], rel=1e-12)
    clip = make_clip()
    model = dapt.PromptSRC(clip, NAMES, dict(epochs=3, gpa_mean=2.0, gpa_std=1.5))
    w = model.gpa_w
    values = [{n: torch.randn(p.shape) for n, p in model.named_parameters() if p.requires_grad} for _ in range(3)]
    for e in range(3):
        if e == 2:  # a second model resumes from the first one's state after epoch 2
            other = dapt.PromptSRC(clip, NAMES, dict(epochs=3, gpa_mean=2.0, gpa_std=1.5))
            other.load_checkpoint(dict(params=model.trainable_state(), extra=model.extra_state()))
        for m in [model] + ([other] if e == 2 else []):
            m.load_trainable_state(values[e])
            m.epoch_end(e)
        if e < 2:  # the prompts are the epoch's own until the last epoch
            assert torch.equal(model.ctx, values[e]["ctx"]) and model.extra_state()["gpa_epochs"] == e + 1
    for n, p in model.trainable_state().items():
        torch.testing.assert_close(p, sum(w[e] * values[e][n] for e in range(3)), rtol=1e-6, atol=1e-7)
        assert torch.equal(p, dict(other.named_parameters())[n]) and torch.equal(p, model.extra_state()["gpa"][n])
    model.epoch_end(3)  # past the last epoch: nothing changes
    assert torch.equal(model.ctx, other.ctx)

# ----------------------------------------------------------------------------------------------------------
# on hosts, and end to end


@pytest.mark.parametrize("method", ["promptsrc", "ivlp"])
def test_fvgpt_on_promptsrc_and_ivlp_hosts(method):
    clip = make_clip()
    host = dapt.build_model(method, clip, NAMES, cfg_of(method))
    model = dapt.FVGPT(host, NAMES, cfg_of("fvgpt"))
    loss, _ = model.loss(toy_batch(), 0)
    loss.backward()
    assert all(p.grad is None for p in model.host.parameters()) and model.adapter_v[0].weight.grad.abs().sum() > 0


def test_dapt_promptsrc_keeps_the_host_terms_and_gpa():
    cfg = recipes.resolve_config("dapt", "toy", {"subsample": "base", "host": "promptsrc", "dapt_schedule": "joint"})
    assert (cfg["lr"], cfg["epochs"], cfg["gpa_mean"]) == (0.0025, 20, 15.0)  # PromptSRC's B2N recipe (HOST_RECIPE)
    model = dapt.build_model("dapt", make_clip(), NAMES, dict(cfg, epochs=2))
    loss, stats = model.loss(toy_batch(), 0)
    assert {"L_cls", "L_scl_text", "L_scl_image", "L_scl_logits", "L_v", "L_f", "L_b"} <= set(stats)
    model.epoch_end(0)
    assert model.extra_state()["gpa_epochs"] == 1  # the host's GPA runs through DAPT


def test_promptsrc_trains_and_resumes_with_the_gpa_aggregate(toy_root, tmp_path, monkeypatch):
    extra = ["--lr", "0.05", "--batch", "8", "--gpa-mean", "2", "--gpa-std", "1.5"]
    result = train_toy(toy_root, tmp_path / "full", "promptsrc", *extra, epochs=3)
    d = run_folder(tmp_path / "full", "promptsrc")
    losses = epoch_losses(d)
    assert losses[-1] < losses[0], losses
    assert set(result["accuracy"]) == {"base", "new", "hm", "base_corr", "new_corr"}
    full = torch.load(os.path.join(d, "checkpoint.pt"), weights_only=False)
    assert full["extra"]["gpa_epochs"] == 3
    for n, p in full["params"].items():  # the saved (and evaluated) model is the aggregate
        assert torch.equal(p, full["extra"]["gpa"][n]), n
    restore = interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(SystemExit):
        train_toy(toy_root, tmp_path / "cut", "promptsrc", *extra, epochs=3)
    restore()
    cut_dir = run_folder(tmp_path / "cut", "promptsrc")
    assert torch.load(os.path.join(cut_dir, "resume.pt"), weights_only=False)["extra"]["gpa_epochs"] == 2
    resumed = train_toy(toy_root, tmp_path / "cut", "promptsrc", *extra, "--resume", epochs=3)
    cut = torch.load(os.path.join(cut_dir, "checkpoint.pt"), weights_only=False)
    for n in full["params"]:
        torch.testing.assert_close(cut["params"][n], full["params"][n], rtol=0, atol=1e-6)
    assert resumed["accuracy"] == pytest.approx(result["accuracy"])


def test_ivlp_trains_end_to_end(toy_root, tmp_path):
    result = train_toy(toy_root, tmp_path, "ivlp", "--lr", "0.05", "--batch", "8", epochs=3)
    losses = epoch_losses(run_folder(tmp_path, "ivlp"))
    assert losses[-1] < losses[0], losses
    assert result["config"]["trainable_values"] == 2 * 64 + 3 * 2 * 64 + 4 * 2 * 64  # ctx, P^t 1-3, V_0 + P^v 1-3
