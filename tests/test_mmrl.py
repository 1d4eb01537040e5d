"""MMRL (methods.md §6c): text insertion after SOS and the EOT shift, both heads and the official token position,
the inference rule, the loss against its formula, trainable counts at ViT-B/16 widths, the official initial draws,
the recipe rows (per dataset, per setting, FVG-PT's host recipe), DAPT and FVG-PT on an MMRL host, a toy run."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import classic
import clip as clip_module
import dapt
import recipes
from conftest import (NAMES, SMALL_CONFIG, epoch_losses, make_clip, official_clip_draws, perturbed, random_clip,
                      run_folder, toy_batch, train_toy)

THREE = dict(SMALL_CONFIG, vision_layers=3, transformer_layers=3)  # rep layers (2, 3): insert, then replace


def mmrl(clip=None, **kw):
    cfg = dict(recipes.resolve_config("mmrl", "toy", {"subsample": "base"}), rep_layers=(2, 3), **kw)
    return perturbed(dapt.MMRL(clip or random_clip(THREE), NAMES, cfg), std=0.3)


def loop_text(model, tokens):
    """t = ln_final(h at EOT + K) @ text_projection, r^t inserted after SOS before block 1 and replaced before block 2,
    causal over the longer sequence: a hand-written loop over all 77 positions."""
    clip, R = model.clip, model.rep_tokens
    x = clip.embed_text(tokens) + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if i >= 1:
            r = model.r2t[i - 1](R).expand(len(x), -1, -1)
            x = torch.cat([x[:, :1], r, x[:, 1 + (len(R) if i > 1 else 0):]], 1)
        x = block(x, causal=True)
    return clip.ln_final(x[torch.arange(len(x)), tokens.argmax(-1) + len(R)]) @ clip.text_projection


def loop_heads(model, images, after_cls=False):
    """(f_c, f_r) by a hand-written loop; r^v after the patches (ours) or right after CLS (the official position)."""
    v, R = model.clip.visual, model.rep_tokens
    x, K = v.ln_pre(v.embed(images)), len(R)
    for i, block in enumerate(v.transformer.resblocks):
        if i >= 1:
            r = model.r2v[i - 1](R).expand(len(x), -1, -1)
            n = K if i > 1 else 0
            x = torch.cat([x[:, :1], r, x[:, 1 + n:]], 1) if after_cls else torch.cat([x[:, :x.shape[1] - n], r], 1)
        x = block(x)
    reps = x[:, 1:1 + K] if after_cls else x[:, -K:]
    return v.ln_post(x[:, 0]) @ v.proj, v.ln_post(reps).mean(1) @ model.proj_rep


def test_text_insertion_and_eot_shift():
    model = mmrl()
    assert model.rep_blocks == [1, 2] and model.first == 1
    with torch.no_grad():
        ref = dapt.normalize(loop_text(model, model.tokens))
        torch.testing.assert_close(model.text_features(), ref, rtol=1e-5, atol=1e-6)  # cut at the EOT + cached blocks
        torch.testing.assert_close(model.text_features(), ref, rtol=1e-5, atol=1e-6)  # from the cache
        model.cfg["text_savings"] = False
        torch.testing.assert_close(model.text_features(), ref, rtol=1e-5, atol=1e-6)
        extra = dapt.tokenize(["a clean origami sky.", "a clean origami road."])
        T_all = model.text_features(extra)
        torch.testing.assert_close(T_all[len(NAMES):], dapt.normalize(loop_text(model, extra)), rtol=1e-5, atol=1e-6)


def test_heads_and_inference_rule():
    model = mmrl()
    x = toy_batch()["image"]
    with torch.no_grad():
        f_c, f_r = model.heads(x)
        ref_c, ref_r = loop_heads(model, x)
        torch.testing.assert_close(f_c, ref_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f_r, ref_r, rtol=1e-5, atol=1e-5)
        off_c, off_r = loop_heads(model, x, after_cls=True)  # the official position: equal up to summation order
        torch.testing.assert_close(f_c, off_c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f_r, off_r, rtol=1e-4, atol=1e-5)
        T = model.text_features()
        l_c, l_r = 100 * dapt.normalize(f_c) @ T.t(), 100 * dapt.normalize(f_r) @ T.t()
        assert model.mode == "fusion"  # the training class list
        torch.testing.assert_close(model(x), 0.7 * l_c + 0.3 * l_r, rtol=1e-5, atol=1e-4)
        g = dapt.normalize(0.7 * dapt.normalize(f_c) + 0.3 * dapt.normalize(f_r))
        torch.testing.assert_close(model.image_features(x), g, rtol=1e-5, atol=1e-6)  # ranks classes as l_f does
        assert torch.equal((g @ T.t()).argmax(-1), model(x).argmax(-1))
        model.set_classnames(NAMES[:3])  # new classes: l_c
        assert model.mode == "cls" and model.T0.shape[0] == 3
        torch.testing.assert_close(model(x), l_c[:, :3], rtol=1e-5, atol=1e-4)
        model.set_dataset("imagenetv2", "itap of a {}.")  # another dataset, even with the training list: l_c, its
        # template
        model.set_classnames(NAMES)
        assert model.mode == "cls" and model.template == "itap of a {}."
        model.set_dataset("toy", "a photo of a {}.")
        model.set_classnames(NAMES)
        assert model.mode == "fusion"
        model.cfg["predict_mode"] = "rep"
        model.set_classnames(NAMES)
        torch.testing.assert_close(model(x), l_r, rtol=1e-5, atol=1e-4)


def test_loss_terms_equal_the_formula():
    clip = random_clip(THREE)
    model = mmrl(clip, reg_weight=3.0)
    batch = toy_batch()
    x, y = batch["image"], batch["label"]
    loss, stats = model.loss(batch, 0)
    with torch.no_grad():
        f_c, f_r = model.heads(x)
        T = model.text_features()
        z0 = F.normalize(clip.encode_image(x), dim=-1)
        T0 = F.normalize(clip.encode_text(dapt.tokenize([model.cfg["template"].format(n) for n in NAMES])), dim=-1)
        l_c, l_r = 100 * dapt.normalize(f_c) @ T.t(), 100 * dapt.normalize(f_r) @ T.t()
        expect = dict(L_cls=F.cross_entropy(l_c, y), L_rep=F.cross_entropy(l_r, y),
                      L_reg_img=1 - F.cosine_similarity(f_c, z0).mean(),
                      L_reg_text=1 - F.cosine_similarity(T, T0).mean())
    for k, v in expect.items():
        assert float(stats[k]) == pytest.approx(v.item(), rel=1e-4, abs=1e-6), k
    total = 0.7 * expect["L_cls"] + 0.3 * expect["L_rep"] + 3.0 * (expect["L_reg_img"] + expect["L_reg_text"])
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in clip.parameters())  # proj, text_projection and CLIP frozen


def test_trainable_counts_at_vit_b16_and_official_init(monkeypatch):
    monkeypatch.setattr(classic, "encode_texts", lambda clip, texts: torch.zeros(len(texts), 512))  # T0: no meta pass
    with torch.device("meta"):
        big = clip_module.CLIP(**clip_module.VIT_B16_CONFIG)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(dapt.MMRL(big, NAMES, dict(official_init=False))) == 4_992_256  # methods.md §6c
    assert count(dapt.MMRL(big, NAMES, dict(official_init=False, rep_dim=2048))) == 18_762_496  # EuroSAT
    clip, state = make_clip(), torch.random.get_rng_state()
    model = dapt.MMRL(clip, NAMES, dict(seed=5, rep_layers=(1, 2)))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(model.r2v[0].weight, model.r2v[1].weight) and torch.equal(model.r2t[0].bias, model.r2t[1].bias)
    with torch.random.fork_rng():  # the CLIP with proj_rep, the zero-shot CLIP, then R and one Linear per tower
        torch.manual_seed(5)
        proj_rep = official_clip_draws(clip.config, after_proj=lambda: 64 ** -0.5 * torch.randn(64, 64))[0]
        official_clip_draws(clip.config, after_proj=lambda: torch.randn(64, 64))
        R = nn.init.normal_(torch.empty(5, 512), std=0.02)
        lin_v, lin_t = nn.Linear(512, 64), nn.Linear(512, 64)
    assert torch.equal(model.proj_rep, proj_rep) and torch.equal(model.rep_tokens, R)
    assert torch.equal(model.r2v[1].weight, lin_v.weight) and torch.equal(model.r2t[0].bias, lin_t.bias)
    with pytest.raises(dapt.ConfigError, match="rep-layers"):
        dapt.MMRL(clip, NAMES, dict(rep_layers=(6, 7)))
    assert dapt.MMRL(clip, NAMES, dict(rep_layers=(-1,), official_init=False)).rep_blocks == [1]  # counted from the end


def test_recipe_rows_per_dataset_and_setting():
    r = recipes.resolve_config
    assert r("mmrl", "stanford_cars", {"subsample": "base"})["reg_weight"] == 7.0
    assert r("mmrl", "stanford_cars", {"shots": 4})["reg_weight"] == 7.0  # every setting (trainers/config.py)
    cfg = r("mmrl", "eurosat", {"subsample": "base"})
    assert (cfg["reg_weight"], cfg["rep_dim"], cfg["template"]) == (0.01, 2048, "a centered satellite photo of {}.")
    cfg = r("mmrl", "imagenet", {"subsample": "base"})
    assert (cfg["batch"], cfg["epochs"], cfg["reg_weight"], cfg["optimizer"]) == (32, 5, 0.5, "adamw")
    cfg = r("mmrl", "imagenet", {"setting": "xd"})
    assert (cfg["batch"], cfg["epochs"], cfg["warmup_epochs"], cfg["reg_weight"]) == (32, 1, 0, 0.2)
    cfg = r("mmrl", "eurosat", {"subsample": "base", "fvg_host_recipe": "mmrl"})  # FVG-PT's: no per-dataset table
    assert (cfg["reg_weight"], cfg["rep_dim"], cfg["batch"], cfg["epochs"]) == (1.0, 512, 4, 10)
    assert r("promptsrc", "dtd", {"shots": 16})["gpa_mean"] == 45.0  # few-shot only
    assert r("promptsrc", "dtd", {"subsample": "base"})["gpa_mean"] == 15.0
    assert r("promptsrc", "caltech101", {"shots": 16})["gpa_std"] == 30.0
    cfg = r("promptsrc", "dtd", {"subsample": "base", "fvg_host_recipe": "promptsrc", "epochs": 12})
    assert (cfg["batch"], cfg["lr"], cfg["epochs"]) == (32, 0.0025, 12)  # an explicit key still wins
    cfg = r("fvgpt", "dtd", {"subsample": "base", "fvg_host_recipe": "mmrl"})
    assert (cfg["optimizer"], cfg["lr"], cfg["batch"], cfg["test_batch"]) == ("adamw", 1e-3, 4, 250)
    assert "reg_weight" not in cfg  # only the keys fvgpt has
    assert r("dapt", "eurosat", {"subsample": "base", "host": "mmrl"})["reg_weight"] == 0.01  # the host's rows
    assert r("dapt", "eurosat", {"subsample": "base"})["lr"] == 0.0035  # DAPT on MaPLe unchanged
    assert r("coop", "imagenet", {"shots": 16})["epochs"] == 50  # (method, dataset) rows still apply
    with pytest.raises(dapt.ConfigError, match="fvg-host-recipe"):
        r("promptsrc", "dtd", {"fvg_host_recipe": "mmrl"})


@pytest.mark.parametrize("decouple", ["pixel", "token"])
def test_dapt_and_fvgpt_on_an_mmrl_host(decouple):
    cfg = recipes.resolve_config("dapt", "toy", {"subsample": "base", "host": "mmrl", "dapt_schedule": "joint",
                                                "decouple": decouple})
    assert cfg["rep_layers"] == (-1,) and cfg["optimizer"] == "adamw"  # MMRL's toy row (HOST_RECIPE)
    model = dapt.build_model("dapt", make_clip(), NAMES, cfg)
    loss, stats = model.loss(toy_batch(), 0)
    loss.backward()
    assert {"L_cls", "L_rep", "L_reg_img", "L_reg_text", "L_v", "L_f", "L_b"} <= set(stats)
    assert model.host.proj_rep.grad.abs().sum() > 0 and model.host.r2t[0].weight.grad.abs().sum() > 0
    fvg_cfg = recipes.resolve_config("fvgpt", "toy", {"subsample": "base"})
    fvg = dapt.FVGPT(dapt.MMRL(make_clip(), NAMES, cfg), NAMES, fvg_cfg)
    loss, _ = fvg.loss(toy_batch(), 0)
    loss.backward()
    assert all(p.grad is None for p in fvg.host.parameters()) and fvg.adapter_v[0].weight.grad.abs().sum() > 0
    assert fvg.host.mode == "fusion"
    fvg.set_classnames(NAMES[:2])
    assert fvg.host.mode == "cls" and fvg.mode == "pc"


def test_mmrl_trains_and_fvgpt_runs_on_it(toy_root, tmp_path):
    result = train_toy(toy_root, tmp_path, "mmrl", "--batch", "8", epochs=3)
    d = run_folder(tmp_path, "mmrl")
    losses = epoch_losses(d)
    assert losses[-1] < losses[0], losses
    assert list(result["config"]["rep_layers"]) == [-1] and set(result["accuracy"]) == {"base", "new", "hm", "base_corr", "new_corr"}
    res = train_toy(toy_root, tmp_path, "fvgpt", "--host-run", d, "--fvg-host-recipe", "mmrl", epochs=1)
    assert res["config"]["optimizer"] == "adamw"
    assert os.path.exists(os.path.join(run_folder(tmp_path, "fvgpt"), "result.json"))
