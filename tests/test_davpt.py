"""DA-VPT (`davpt`, methods.md §11): the cosine k-means class -> proxy map, the model's block loop against plain
VPT-deep and the samples it exposes, DA-VPT+ bias tuning, the linear head, the official recipe switch, and a run
on the toy benchmark that re-clusters each epoch and resumes with its map. The Proxy-Anchor formula is tested in
test_kernels.py."""
import math
import os

import pytest
import torch
from PIL import Image

import dapt
import data
import loader
import recipes
import train
from conftest import FULL_BATCH, interrupt_at_epoch, metrics_of, run_folder, train_toy


def test_cosine_kmeans_covers_every_class_and_is_seeded():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 8, generator=g) * 3
    x = torch.cat([centres[i] + 0.1 * torch.randn(5, 8, generator=g) for i in range(3)])  # 3 tight groups
    a1, c1 = dapt.cosine_kmeans(x, 3, torch.Generator().manual_seed(1))
    a2, c2 = dapt.cosine_kmeans(x, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a1, a2) and torch.equal(c1, c2)  # same seed, same map
    assert a1.shape == (15,) and set(a1.tolist()) == {0, 1, 2}
    for i in range(3):  # each group lands in one cluster, the groups in different ones
        assert len(set(a1[5 * i:5 * i + 5].tolist())) == 1
    a3, c3 = dapt.cosine_kmeans(x, 3, None, init=c1)  # warm start from converged centroids: unchanged
    assert torch.equal(a3, a1)
    for k in range(3):  # centroid = member mean
        torch.testing.assert_close(c1[k], x[a1 == k].mean(0))


def davpt_model(clip, names, **over):
    cfg = recipes.resolve_config("davpt", "toy", over)
    return dapt.DAVPT(clip, names, cfg)


def test_davpt_map_prepare_stable_and_identity(tiny):
    bench, clip, tfs = tiny
    maps = []
    for _ in range(2):
        model = davpt_model(clip, bench.classnames, n_proxies=2)
        with pytest.raises(RuntimeError, match="prepare"):  # C > M: no map before the data is seen
            model.loss(dict(image=None, label=torch.tensor([0])), 0)
        model.prepare(loader.features_function(bench, {"train": tfs[True], "test": tfs[False]}, 1, "cpu"))
        maps.append(model.proxy_map.class_to_proxy.clone())
    assert torch.equal(maps[0], maps[1])  # same seed, same map
    assert maps[0].shape == (4,) and maps[0].max() < 2 and maps[0].min() >= 0
    assert len(set(maps[0].tolist())) == 2  # k-means on 4 class means with 2 random init points: both used
    model = davpt_model(clip, bench.classnames)  # C = 4 < M = 10: M := C, identity
    model.prepare(loader.features_function(bench, {"train": tfs[True], "test": tfs[False]}, 1, "cpu"))
    assert model.proxy_map.M == 4 and model.proxy_map.class_to_proxy.tolist() == [0, 1, 2, 3]
    assert [p.shape[0] for p in model.deep_prompts] == [8, 4]  # 2 blocks; the last is guided: M proxies


def eight_names():
    return [f"thing{i}" for i in range(8)]


def test_davpt_loop_equals_vpt_deep_and_exposes_samples(tiny):
    bench, clip, tfs = tiny
    model = davpt_model(clip, eight_names(), n_proxies=8)  # 8 proxies = 8 prompts: the plain VPT-deep sequence
    images = torch.stack([tfs[False](Image.open(p)) for p, _, _ in bench.train[:3]])
    p = list(model.deep_prompts)
    with torch.no_grad():
        vpt = dapt.normalize(clip.visual(images, dapt.VisualPrompts(p[0], [None] + p[1:], ln_pre=True)))
        ours = model.image_features(images)
    torch.testing.assert_close(ours, vpt, rtol=1e-5, atol=1e-6)
    # the guided block's samples: patch mean of the block input, and the CLS query W_q ln_1(x_cls) + b_q
    blk = clip.visual.transformer.resblocks[1]
    seen = {}
    hook = blk.ln_1.register_forward_hook(lambda m, i, o: seen.update(x=i[0], h=o))
    mapped = torch.tensor([0, 5, 7])
    for kind in ("mean", "attn_slot"):
        model.cfg["patch_sample"] = kind
        with torch.no_grad():
            _, guided = model.encode(images, mapped)
        proxies, patch, q = guided[0]
        assert proxies is model.deep_prompts[1]
        W, N = 64, 16
        torch.testing.assert_close(q, seen["h"][:, 0] @ blk.attn.in_proj_weight[:W].t() + blk.attn.in_proj_bias[:W])
        if kind == "mean":
            torch.testing.assert_close(patch, seen["x"][:, 1:1 + N].mean(1))
        else:  # one head: softmax(q k^T / sqrt(W)) v at the query of prompt slot k_i (before out_proj)
            qkv = seen["h"] @ blk.attn.in_proj_weight.t() + blk.attn.in_proj_bias
            qq, kk, vv = qkv.split(W, dim=-1)
            att = torch.softmax(qq @ kk.transpose(1, 2) / math.sqrt(W), -1) @ vv  # [B, L, W]
            torch.testing.assert_close(patch, att[torch.arange(3), 1 + N + mapped], rtol=1e-5, atol=1e-6)
    # proxy_mask: prompt queries see only patches. Deep prompts are replaced before every block, so the CLS
    # feature is unchanged; the attention output at the prompt slots changes.
    model.cfg["proxy_mask"] = True
    with torch.no_grad():
        masked, guided_masked = model.encode(images, mapped)
    hook.remove()
    torch.testing.assert_close(masked, ours, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(guided_masked[0][1], patch)


def test_davpt_bias_tuning_head_and_state(tiny):
    bench, clip, tfs = tiny
    images = torch.stack([tfs[False](Image.open(p)) for p, _, _ in bench.train[:2]])
    plain = davpt_model(clip, bench.classnames)
    plus = davpt_model(clip, bench.classnames, bias_tuning=True)
    plus.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        plus.deep_prompts.load_state_dict(plain.deep_prompts.state_dict())
        torch.testing.assert_close(plus.image_features(images), plain.image_features(images))  # same start
    names = [n for n, p in plus.named_parameters() if p.requires_grad]
    assert names == [f"deep_prompts.{i}" for i in range(2)] + [f"bias_k.{i}" for i in range(2)] + [f"bias_v.{i}" for i in range(2)]
    loss, _ = plus.loss(dict(image=images, label=torch.tensor([0, 3])), 0)
    loss.backward()
    for i in range(2):
        assert plus.deep_prompts[i].grad.abs().sum() > 0 and plus.bias_v[i].grad.abs().max() > 1e-4
        # the K bias adds q . b_k to every logit of a query's row: softmax ignores it, so its gradient is only
        # rounding noise (DA-VPT+'s K slice is inert; only V, a per-block constant after attention, trains)
        assert plus.bias_k[i].grad.abs().max() < 1e-4 * plus.bias_v[i].grad.abs().max()
    assert all(b.attn.in_proj_bias.grad is None for b in clip.visual.transformer.resblocks)  # q slice frozen
    groups = plus.param_groups()
    assert [len(g["params"]) for g in groups] == [2, 4] and groups[1]["weight_decay"] == 0.0
    extra = davpt_model(clip, bench.classnames, bias_tuning=True, bias_extra=True)
    unfrozen = {n for n, p in extra.named_parameters() if p.requires_grad}
    assert "clip.visual.class_embedding" in unfrozen and "clip.visual.transformer.resblocks.1.ln_1.weight" in unfrozen
    assert len(unfrozen) == 2 + 4 + 1 + 2 * 5
    for p in clip.parameters():  # the fixture's CLIP is shared: freeze it again
        p.requires_grad_(False)
    # linear head: logits from Linear(width -> C) on ln_post(CLS); all-class settings only
    lin = davpt_model(clip, bench.classnames, head="linear")
    assert lin.linear.bias.abs().sum() == 0 and lin.linear.weight.std() < 0.03
    assert lin(images).shape == (2, 4) and lin.text_features() is None
    with pytest.raises(ValueError, match="new classes"):
        lin.set_classnames(["a", "b"])
    with pytest.raises(ValueError, match="subsample all"):
        davpt_model(clip, bench.classnames, head="linear", subsample="base")
    # the map and centroids round-trip through extra_state
    a = davpt_model(clip, bench.classnames, n_proxies=2)
    a.prepare(loader.features_function(bench, {"train": tfs[True], "test": tfs[False]}, 1, "cpu"))
    b = davpt_model(clip, bench.classnames, n_proxies=2)
    b.load_extra_state(a.extra_state())
    assert torch.equal(b.proxy_map.class_to_proxy, a.proxy_map.class_to_proxy)
    assert torch.equal(b.proxy_map.centroids, a.proxy_map.centroids)


def test_official_optim_preset():
    cfg = recipes.resolve_config("davpt", "caltech101", dict(official_optim=True, lr=1e-3))
    assert (cfg["optimizer"], cfg["weight_decay"], cfg["epochs"], cfg["batch"], cfg["grad_clip"]) == ("adamw", 0.05, 100, 32, 10.0)
    assert cfg["lr"] == 1e-3  # an explicit key wins over the preset (CUB's 5e-4)
    assert (cfg["class_balanced"], cfg["wd_head"], cfg["decay_class_embedding"]) == (2, 5.0, True)
    assert (cfg["kmeans_sampling"], cfg["recluster_from"], cfg["schedule"]) == ("official", 1, "timm_cosine")
    assert recipes.resolve_config("davpt", "caltech101", {})["optimizer"] == "sgd"
    assert recipes.resolve_config("dapt-dist", "eurosat", {})["lr"] == 20.0


def test_timm_cosine_equals_the_official_schedule():
    """timm CosineLRScheduler(t_initial=100 * 187, warmup_t=10 * 187, warmup_lr_init=1e-8, lr_min=1e-9,
    warmup_prefix=False) at lr 5e-4, stepped per update (DA-VPT's CUB config, 187 steps per epoch): values measured
    on the official scheduler."""
    cfg = recipes.resolve_config("davpt", "caltech101", dict(official_optim=True))
    lr = lambda t: train.lr_at(cfg, t // 187, t % 187, 187)
    for t, expect in ((0, 1.0e-8), (1, 2.77e-7), (2, 5.45e-7), (1869, 4.99733e-4), (1870, 4.87764e-4),
                      (1871, 4.87751e-4), (9350, 2.50001e-4)):
        assert lr(t) == pytest.approx(expect, rel=2e-3), t  # the published digits; per_step differs by 2.4 %
    per_step = dict(cfg, schedule="per_step")  # ours: the cosine starts at the end of the warm-up
    assert train.lr_at(per_step, 10, 0, 187) == pytest.approx(5e-4)


def test_davpt_official_recipe_pieces(tiny):
    bench, clip, tfs = tiny
    for p in clip.parameters():
        p.requires_grad_(False)
    cfg = recipes.resolve_config("davpt", "caltech101", dict(official_optim=True, head="linear", bias_tuning=True,
                                                             bias_extra=True))
    model = dapt.DAVPT(clip, bench.classnames, cfg)
    groups = model.param_groups()
    head = [g for g in groups if g.get("weight_decay") == 5.0]
    assert len(head) == 1 and head[0]["params"] == [model.linear.weight]  # wd_head
    decayed = next(g for g in groups if "weight_decay" not in g)["params"]  # the run's 0.05
    assert any(p is clip.visual.class_embedding for p in decayed)  # timm's 3-D cls_token is decayed
    assert not any(p is model.linear.weight for p in decayed)
    assert all(p.dim() <= 1 for p in next(g for g in groups if g.get("weight_decay") == 0.0)["params"])
    for p in clip.parameters():  # the fixture's CLIP is shared: freeze it again
        p.requires_grad_(False)
    # the mapping sampler: 10 per class by random.sample; a class with 3 images gives each 3 times + one more
    items = [(f"x{i}", i % 2, "c") for i in range(3)] + [(f"y{i}", 1, "c") for i in range(20)]
    picked = data.sample_per_class(items, 10, seed=1)
    by0 = [p for p, y, _ in picked if y == 0]
    by1 = [p for p, y, _ in picked if y == 1]
    assert len(by0) == 10 and sorted(set(by0)) == ["x0", "x2"] and sorted(by0.count(x) for x in set(by0)) == [5, 5]
    assert len(by1) == 10 and len(set(by1)) == 10
    assert data.sample_per_class(items, 10, seed=1) == picked
    # re-clustering only from recluster_from on; prompt_norm l2 normalises every block's prompts
    model = dapt.DAVPT(clip, bench.classnames, dict(cfg, head="text", bias_tuning=False, bias_extra=False,
                                                    n_proxies=2, prompt_norm="l2"))
    model.prepare(loader.features_function(bench, {"train": tfs[True], "test": tfs[False]}, 1, "cpu"))
    calls = []
    model.proxy_map.update = lambda epoch: calls.append(epoch)
    for epoch in range(3):
        model.epoch_end(epoch)
    assert calls == [1, 2]
    vp = model.visual_prompts()
    assert torch.allclose(vp.first.norm(dim=-1), torch.ones(8)) and torch.allclose(vp.deep[-1].norm(dim=-1), torch.ones(2))


# ----------------------------------------------------------------------------------------------------------
# end to end on the toy benchmark


def test_davpt_trains_reclusters_and_resumes(toy_root, tmp_path, monkeypatch):
    extra = [*FULL_BATCH, "--lr", "0.05", "--n-proxies", "4"]
    calls = []
    real_cluster = dapt.ProxyMap.cluster

    def spy(self, means, init=None):
        calls.append(init is not None)
        return real_cluster(self, means, init)

    monkeypatch.setattr(dapt.ProxyMap, "cluster", spy)
    train_toy(toy_root, tmp_path / "full", "davpt", *extra, shots=2, epochs=5)
    assert calls == [False] + [True] * 5  # initial map, then one re-clustering per epoch
    d_full = run_folder(tmp_path / "full", "davpt", shots=2)
    m = metrics_of(d_full)
    # the task loss falls; the total need not: each re-clustering moves the Proxy-Anchor targets
    assert m[-1]["L_task"] < m[0]["L_task"], [e["L_task"] for e in m]
    assert all(math.isfinite(e["L_pa_patch"]) and math.isfinite(e["L_pa_cls"]) for e in m)
    assert os.path.exists(os.path.join(d_full, "result.json"))
    # interrupted after two epochs, then resumed: the map is restored, the result equals the full run's
    restore = interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(SystemExit):
        train_toy(toy_root, tmp_path / "cut", "davpt", *extra, shots=2, epochs=5)
    restore()
    d_cut = run_folder(tmp_path / "cut", "davpt", shots=2)
    saved = torch.load(os.path.join(d_cut, "resume.pt"), weights_only=False)["extra"]
    loaded = []
    real_load = dapt.DAVPT.load_extra_state
    monkeypatch.setattr(dapt.DAVPT, "load_extra_state", lambda self, s: (real_load(self, s), loaded.append(
        self.proxy_map.class_to_proxy.clone())))
    train_toy(toy_root, tmp_path / "cut", "davpt", *extra, "--resume", shots=2, epochs=5)
    assert torch.equal(loaded[0], saved["class_to_proxy"])
    full = torch.load(os.path.join(d_full, "checkpoint.pt"), weights_only=False)
    cut = torch.load(os.path.join(d_cut, "checkpoint.pt"), weights_only=False)
    assert torch.equal(full["extra"]["class_to_proxy"], cut["extra"]["class_to_proxy"])
    for k in full["params"]:
        torch.testing.assert_close(cut["params"][k], full["params"][k], rtol=0, atol=1e-6)
