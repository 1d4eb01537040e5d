"""Distribution-aware PT (`dapt-dist`, methods.md §10): the cached class prototypes against a hand computation, the
model's shapes and loss, and a run on the toy benchmark. The dispersion losses' formulas are tested in
test_kernels.py."""
import json
import math
import os

import pytest
import torch
from PIL import Image

import dapt
import loader
import recipes
from conftest import FULL_BATCH, metrics_of, random_clip, run_folder, train_toy


def prototypes(clip, bench, tfs, seed=1, view="test"):
    """dapt-dist's prepare through the features function train.py hands it; -> the prototypes [C, E]."""
    model = dapt.DistributionAwarePT(clip, bench.classnames, {"proto_train_view": view == "train", "seed": seed})
    model.prepare(loader.features_function(bench, {"train": tfs[True], "test": tfs[False]}, seed, "cpu"))
    return model.prototypes


def test_prototypes_equal_hand_computation_and_are_cached(tiny, monkeypatch):
    bench, clip, tfs = tiny
    protos = prototypes(clip, bench, tfs)
    with torch.no_grad():
        feats = [clip.encode_image(tfs[False](Image.open(p))[None])[0] for p, _, _ in bench.train]
    feats = [f / f.norm() for f in feats]
    for c in range(4):
        hand = sum(f for f, (_, y, _) in zip(feats, bench.train) if y == c) / 3  # mean, not re-normalised
        torch.testing.assert_close(protos[c], hand, rtol=1e-5, atol=1e-6)
    assert protos.norm(dim=-1).max() < 1  # random images of a class differ: the mean is shorter than 1
    digest = dapt.state_digest(clip.visual)[:16]
    name = f"features_clip-image-{digest}_test_shot_3-seed_1-all.pt"
    path = os.path.join(bench.meta["dataset_dir"], "split_fewshot", name)
    cached = torch.load(path, weights_only=True)
    assert cached["record"]["transform"] == tfs[False].constants() and cached["record"]["seed"] == 1

    def no_features(*a, **k):
        raise AssertionError("recomputed although the cache matches")

    with monkeypatch.context() as m:  # a matching cache is read, not recomputed
        m.setattr(loader, "image_features", no_features)
        torch.testing.assert_close(prototypes(clip, bench, tfs), protos)
    # another seed (recorded in the file) makes it again; other weights get another file
    again = prototypes(clip, bench, tfs, seed=2)
    torch.testing.assert_close(again, protos)  # the test view does not depend on the seed
    assert torch.load(path, weights_only=True)["record"]["seed"] == 2
    other = random_clip(seed=1)
    assert dapt.state_digest(other.visual) != dapt.state_digest(clip.visual)
    # the official option: one random training view per image, deterministic for the seed
    v1 = prototypes(clip, bench, tfs, view="train")
    os.remove(path.replace("_test_", "_train_"))
    v2 = prototypes(clip, bench, tfs, view="train")
    torch.testing.assert_close(v1, v2)
    assert not torch.allclose(v1, protos)


def test_dapt_dist_model_shapes_and_loss(tiny):
    bench, clip, tfs = tiny
    cfg = recipes.resolve_config("dapt-dist", "toy", {})
    model = dapt.DistributionAwarePT(clip, bench.classnames, cfg)
    assert model.ctx.shape == (16, 64) and model.image_prompts.shape == (16, 64)
    assert model.image_prompts.abs().max() <= math.sqrt(6 / (3 * 8 ** 2 + 64))  # xavier bound, patch 8
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16 * 64 * 2
    torch.manual_seed(3)  # the official draw order: image prompts first, then the text context
    model = dapt.DistributionAwarePT(clip, bench.classnames, cfg)
    torch.manual_seed(3)
    torch.testing.assert_close(model.image_prompts, dapt.init_image_prompts((16, 64), "xavier", 8), rtol=0, atol=0)
    torch.testing.assert_close(model.ctx, torch.empty(16, 64).normal_(std=0.02), rtol=0, atol=0)
    assert cfg["proto_train_view"] is True
    images = torch.stack([tfs[False](Image.open(p)) for p, _, _ in bench.train[:4]])
    batch = dict(image=images, label=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="prepare"):
        model.loss(batch, 0)
    model.prepare(loader.features_function(bench, {"train": tfs[True], "test": tfs[False]}, 1, "cpu"))
    loss, stats = model.loss(batch, 0)
    expect = stats["L_cls"] + cfg["beta_v"] * stats["L_intra"] + cfg["beta_t"] * stats["L_inter"]
    assert loss.item() == pytest.approx(float(expect), rel=1e-5)
    z = model.image_features(images)
    assert float(stats["L_intra"]) == pytest.approx(((z - model.prototypes[batch["label"]]) ** 2).mean().item(), rel=1e-5)

# ----------------------------------------------------------------------------------------------------------
# end to end on the toy benchmark


def test_dapt_dist_trains_on_toy(toy_root, tmp_path):
    result = train_toy(toy_root, tmp_path, "dapt-dist", *FULL_BATCH, "--lr", "0.002", shots=2, epochs=6)
    d = run_folder(tmp_path, "dapt-dist", shots=2)
    m = metrics_of(d)
    assert m[-1]["loss"] < m[0]["loss"], [e["loss"] for e in m]
    assert {"L_cls", "L_intra", "L_inter"} <= set(m[0])
    with open(os.path.join(d, "result.json")) as f:
        assert set(json.load(f)["accuracy"]) == {"base", "new", "hm", "base_corr", "new_corr"}
    assert result["config"]["trainable_values"] == 2 * 16 * 64
    cache = os.listdir(os.path.join(toy_root, "toy", "split_fewshot"))
    # official default: the prototypes come from one training augmentation of each few-shot image
    assert any(n.startswith("features_clip-image-") and n.endswith("_train_shot_2-seed_1-base.pt") for n in cache)
