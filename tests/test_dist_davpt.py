"""Distribution-aware PT (`dapt-dist`, methods.md §10) and DA-VPT (`davpt`, §11): the three losses against
direct float64 evaluations of their formulas (values and gradients), the cosine k-means class -> proxy map,
the cached class prototypes against a hand computation, and both methods end to end on the toy benchmark
(loss falls, result written, DA-VPT re-clusters each epoch and resume restores its map)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import clip as clip_module
import dapt
from conftest import interrupt_at_epoch
import data
import train

# ----------------------------------------------------------------------------------------------------------
# losses: explicit loops over pairs / samples / proxies in float64


def inter_by_loops(w, t):
    C, total, pairs = w.shape[0], 0.0, 0
    for i in range(C):
        for j in range(i + 1, C):
            total = total + torch.exp(-t * ((w[i] - w[j]) ** 2).sum())
            pairs += 1
    return total * (2.0 / (C * (C - 1)))


def intra_by_loops(z, protos, labels):
    B, D = z.shape
    total = 0.0
    for b in range(B):
        for d in range(D):
            total = total + (z[b, d] - protos[labels[b], d]) ** 2
    return total / (B * D)


def proxy_anchor_by_loops(x, p, labels, alpha, delta, scale, paper_norm=False):
    M = p.shape[0]
    pos_sum, neg_sum, with_pos = 0.0, 0.0, 0
    for k in range(M):
        pos, neg, has_pos = 0.0, 0.0, False
        for i in range(x.shape[0]):
            sim = scale * (x[i] @ p[k]) / (x[i].norm() * p[k].norm())
            if int(labels[i]) == k:
                pos = pos + torch.exp(-alpha * (sim - delta))
                has_pos = True
            else:
                neg = neg + torch.exp(alpha * (sim + delta))
        pos_sum = pos_sum + torch.log(1 + torch.as_tensor(pos, dtype=torch.float64))
        neg_sum = neg_sum + torch.log(1 + torch.as_tensor(neg, dtype=torch.float64))
        with_pos += has_pos
    return pos_sum / (max(with_pos, 1) if paper_norm else M) + neg_sum / M


def check_value_and_grads(ours, ref, inputs, rtol=1e-5):
    """Same value and same gradients w.r.t. every input (the references compute in float32)."""
    torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=1e-7)
    g_ours = torch.autograd.grad(ours, inputs)
    g_ref = torch.autograd.grad(ref, inputs)
    for a, b in zip(g_ours, g_ref):
        assert b.abs().max() > 0
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_inter_dispersion_equals_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.functional.normalize(torch.randn(6, 9, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    for t in (2.0, 0.5):
        check_value_and_grads(dapt.inter_dispersion_loss(w, t=t), inter_by_loops(w, t), [w])
    assert dapt.inter_dispersion_loss(w[:1]).item() == 0.0  # one class: no pair


def test_intra_dispersion_equals_formula():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 2, 1, 0])
    check_value_and_grads(dapt.intra_dispersion_loss(z, protos, labels), intra_by_loops(z, protos, labels), [z, protos])


@pytest.mark.parametrize("labels, scale, paper_norm", [
    ([0, 1, 1, 2, 0, 2, 1], 1.0, False),  # proxy 3 has no positive in the batch: counts in 1/M only
    ([0, 1, 1, 2, 0, 2, 1], 1.0, True),   # the paper's normalisation: over the 3 proxies with positives
    ([2, 2, 2, 2, 2, 2, 2], 1.0, False),  # one class in the batch
    ([3, 0, 1, 2, 3, 0, 1], 5.0, False),  # a larger cosine scale
])
def test_proxy_anchor_equals_formula(labels, scale, paper_norm):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(labels)
    ours = dapt.proxy_anchor_loss(x, p, y, alpha=32.0, delta=0.1, scale=scale, paper_norm=paper_norm)
    ref = proxy_anchor_by_loops(x, p, y, 32.0, 0.1, scale, paper_norm)
    assert torch.isfinite(ours)
    check_value_and_grads(ours, ref, [x, p])


# ----------------------------------------------------------------------------------------------------------
# a tiny benchmark: random CLIP + a few generated images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    items = []
    for y in range(4):
        for i in range(3):
            path = root / "images" / f"c{y}_{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
            items.append((str(path), y, f"class{y}"))
    names = [f"class{y}" for y in range(4)]
    meta = dict(dataset_dir=str(root), shots=3, seed=1, subsample="all")
    bench = data.Benchmark(items, [], [], names, "a photo of a {}.", meta)
    tfs = {train: data.build_transform(train, size=32) for train in (True, False)}
    return bench, clip_module.random_clip(seed=0), tfs


def test_prototypes_equal_hand_computation_and_are_cached(tiny, monkeypatch):
    bench, clip, tfs = tiny
    protos = dapt.class_prototypes(clip, bench, tfs[False], seed=1, device="cpu", view="test")
    with torch.no_grad():
        feats = [clip.encode_image(tfs[False](Image.open(p))[None])[0] for p, _, _ in bench.train]
    feats = [f / f.norm() for f in feats]
    for c in range(4):
        hand = sum(f for f, (_, y, _) in zip(feats, bench.train) if y == c) / 3  # mean, not re-normalised
        torch.testing.assert_close(protos[c], hand, rtol=1e-5, atol=1e-6)
    assert protos.norm(dim=-1).max() < 1  # random images of a class differ: the mean is shorter than 1
    digest = dapt.state_digest(clip.visual)[:16]
    path = os.path.join(bench.meta["dataset_dir"], "split_fewshot", f"prototypes_shot_3-seed_1-all_{digest}_test.pt")
    cached = torch.load(path, weights_only=False)
    assert cached["record"]["transform"] == tfs[False].constants() and cached["record"]["seed"] == 1

    def no_features(*a, **k):
        raise AssertionError("recomputed although the cache matches")

    with monkeypatch.context() as m:  # a matching cache is read, not recomputed
        m.setattr(dapt, "image_features_of", no_features)
        torch.testing.assert_close(dapt.class_prototypes(clip, bench, tfs[False], 1, "cpu", "test"), protos)
    # another seed (recorded in the file) regenerates; other weights get another file
    again = dapt.class_prototypes(clip, bench, tfs[False], seed=2, device="cpu", view="test")
    torch.testing.assert_close(again, protos)  # the test view does not depend on the seed
    assert torch.load(path, weights_only=False)["record"]["seed"] == 2
    other = clip_module.random_clip(seed=1)
    assert dapt.state_digest(other.visual) != dapt.state_digest(clip.visual)
    # the official option: one random training view per image, deterministic for the seed
    v1 = dapt.class_prototypes(clip, bench, tfs[True], seed=1, device="cpu", view="train")
    os.remove(path.replace("_test.pt", "_train.pt"))
    v2 = dapt.class_prototypes(clip, bench, tfs[True], seed=1, device="cpu", view="train")
    torch.testing.assert_close(v1, v2)
    assert not torch.allclose(v1, protos)


def test_dapt_dist_model_shapes_and_loss(tiny):
    bench, clip, tfs = tiny
    cfg = train.resolve_config("dapt-dist", "toy", {})
    model = dapt.DistributionAwarePT(clip, bench.classnames, cfg)
    assert model.ctx.shape == (16, 64) and model.image_prompts.shape == (16, 64)
    assert model.image_prompts.abs().max() <= math.sqrt(6 / (3 * 8 ** 2 + 64))  # xavier bound, patch 8
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16 * 64 * 2
    images = torch.stack([tfs[False](Image.open(p)) for p, _, _ in bench.train[:4]])
    batch = dict(image=images, label=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="prepare"):
        model.loss(batch, 0)
    model.prepare(bench, tfs[True], tfs[False], "cpu")
    loss, stats = model.loss(batch, 0)
    expect = stats["ce"] + cfg["beta_v"] * stats["intra"] + cfg["beta_t"] * stats["inter"]
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    z = model.image_features(images)
    assert stats["intra"] == pytest.approx(((z - model.prototypes[batch["label"]]) ** 2).mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# DA-VPT: k-means map, model pieces


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
    cfg = train.resolve_config("davpt", "toy", over)
    return dapt.DAVPT(clip, names, cfg)


def test_davpt_map_prepare_stable_and_identity(tiny):
    bench, clip, tfs = tiny
    maps = []
    for _ in range(2):
        model = davpt_model(clip, bench.classnames, n_proxies=2)
        with pytest.raises(RuntimeError, match="prepare"):  # C > M: no map before the data is seen
            model.loss(dict(image=None, label=torch.tensor([0])), 0)
        model.prepare(bench, tfs[True], tfs[False], "cpu")
        maps.append(model.class_to_proxy.clone())
    assert torch.equal(maps[0], maps[1])  # same seed, same map
    assert maps[0].shape == (4,) and maps[0].max() < 2 and maps[0].min() >= 0
    assert len(set(maps[0].tolist())) == 2  # k-means on 4 class means with 2 random init points: both used
    model = davpt_model(clip, bench.classnames)  # C = 4 < M = 10: M := C, identity
    model.prepare(bench, tfs[True], tfs[False], "cpu")
    assert model.M == 4 and model.class_to_proxy.tolist() == [0, 1, 2, 3]
    assert [p.shape[0] for p in model.deep_prompts] == [8, 4]  # 2 blocks; the last is guided: M proxies


def eight_names():
    return [f"thing{i}" for i in range(8)]


def test_davpt_loop_equals_vpt_deep_and_exposes_samples(tiny):
    bench, clip, tfs = tiny
    model = davpt_model(clip, eight_names(), n_proxies=8)  # 8 proxies = 8 prompts: the plain VPT-deep sequence
    images = torch.stack([tfs[False](Image.open(p)) for p, _, _ in bench.train[:3]])
    p = list(model.deep_prompts)
    with torch.no_grad():
        vpt = dapt.normalize(clip.visual(images, prompts=p[0], prompt_ln_pre=True, deep_prompts=[None] + p[1:]))
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
    a.prepare(bench, tfs[True], tfs[False], "cpu")
    b = davpt_model(clip, bench.classnames, n_proxies=2)
    b.load_extra_state(a.extra_state())
    assert torch.equal(b.class_to_proxy, a.class_to_proxy) and torch.equal(b.centroids, a.centroids)


def test_official_optim_preset():
    cfg = train.resolve_config("davpt", "caltech101", dict(official_optim=True, lr=5e-4))
    assert (cfg["optimizer"], cfg["weight_decay"], cfg["epochs"], cfg["batch"], cfg["grad_clip"]) == ("adamw", 0.05, 100, 32, 10.0)
    assert cfg["lr"] == 5e-4  # an explicit key wins over the preset
    assert cfg["class_balanced"] == 2
    assert train.lr_at(cfg, 0, 0, 10) == pytest.approx(1e-8)
    assert train.lr_at(cfg, 99, 9, 10) == pytest.approx(1e-9, abs=1e-8)
    assert train.resolve_config("davpt", "caltech101", {})["optimizer"] == "sgd"
    assert train.resolve_config("dapt-dist", "eurosat", {})["lr"] == 20.0


def test_class_balanced_sampler():
    """official_optim's sampler: consecutive pairs share a class, every sample once per epoch, seeded."""
    import data

    labels = [i % 5 for i in range(23)]  # 5 classes, uneven counts
    s = data.EpochSampler(len(labels), True, seed=3, labels=labels, per_class=2)
    s.epoch = 1
    order = [i for i, _ in s]
    assert sorted(order) == list(range(23))
    # counts 5, 5, 5, 4, 4 -> 10 full pairs first (each one class), the 3 leftover images last
    assert all(labels[a] == labels[b] for a, b in zip(order[0:20:2], order[1:20:2]))
    assert order == [i for i, _ in s]  # same seed and epoch: same order
    s.epoch = 2
    assert order != [i for i, _ in s]


# ----------------------------------------------------------------------------------------------------------
# end to end on the toy benchmark


def run(root, out, method, *extra, epochs=5):
    """12 base classes x 2 shots = 24 images in one batch without augmentation: one full-batch step per epoch,
    so the epoch losses measure training, not the draw of crops (the test CLIP is only briefly pretrained)."""
    argv = ["--method", method, "--dataset", "toy", "--root", root, "--out", str(out), "--subsample", "base",
            "--shots", "2", "--epochs", str(epochs), "--batch", "24", "--rrc-scale", "1,1", "--rrc-ratio", "1,1",
            "--hflip", "0", *extra]
    return train.main(argv)


def run_dir(out, method):
    return os.path.join(str(out), "b2n", "toy", method, "shots2_seed1")


def losses_of(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_dapt_dist_trains_on_toy(toy_root, tmp_path):
    result = run(toy_root, tmp_path, "dapt-dist", "--lr", "0.002", epochs=6)
    d = run_dir(tmp_path, "dapt-dist")
    m = losses_of(d)
    assert m[-1]["loss"] < m[0]["loss"], [e["loss"] for e in m]
    assert {"ce", "intra", "inter"} <= set(m[0])
    with open(os.path.join(d, "result.json")) as f:
        assert set(json.load(f)["accuracy"]) == {"base", "new", "hm"}
    assert result["config"]["trainable_values"] == 2 * 16 * 64
    cache = os.listdir(os.path.join(toy_root, "toy", "split_fewshot"))
    assert any(n.startswith("prototypes_shot_2-seed_1-base_") and n.endswith("_test.pt") for n in cache)


def test_davpt_trains_reclusters_and_resumes(toy_root, tmp_path, monkeypatch):
    extra = ["--lr", "0.05", "--n-proxies", "4"]
    calls = []
    real_cluster = dapt.DAVPT.cluster

    def spy(self, means, init=None):
        calls.append(init is not None)
        return real_cluster(self, means, init)

    monkeypatch.setattr(dapt.DAVPT, "cluster", spy)
    run(toy_root, tmp_path / "full", "davpt", *extra)
    assert calls == [False] + [True] * 5  # initial map, then one re-clustering per epoch
    d_full = run_dir(tmp_path / "full", "davpt")
    m = losses_of(d_full)
    # the task loss falls; the total need not: each re-clustering moves the Proxy-Anchor targets
    assert m[-1]["task"] < m[0]["task"], [e["task"] for e in m]
    assert all(math.isfinite(e["pa_patch"]) and math.isfinite(e["pa_cls"]) for e in m)
    assert os.path.exists(os.path.join(d_full, "result.json"))
    # interrupted after two epochs, then resumed: the map is restored, the result equals the full run's
    restore = interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(SystemExit):
        run(toy_root, tmp_path / "cut", "davpt", *extra)
    restore()
    d_cut = run_dir(tmp_path / "cut", "davpt")
    saved = torch.load(os.path.join(d_cut, "resume.pt"), weights_only=False)["extra"]
    loaded = []
    real_load = dapt.DAVPT.load_extra_state
    monkeypatch.setattr(dapt.DAVPT, "load_extra_state", lambda self, s: (real_load(self, s), loaded.append(
        self.class_to_proxy.clone())))
    run(toy_root, tmp_path / "cut", "davpt", *extra, "--resume")
    assert torch.equal(loaded[0], saved["class_to_proxy"])
    full = torch.load(os.path.join(d_full, "checkpoint.pt"), weights_only=False)
    cut = torch.load(os.path.join(d_cut, "checkpoint.pt"), weights_only=False)
    assert torch.equal(full["extra"]["class_to_proxy"], cut["extra"]["class_to_proxy"])
    for k in full["params"]:
        torch.testing.assert_close(cut["params"][k], full["params"][k], rtol=0, atol=1e-6)
