"""The baseline prompt models on a small random CLIP: prompt layouts, exact text-side savings, batching,
deep prompts, and which parameters are trainable."""
import json
import os

import pytest
import torch

import clip as clip_module
import dapt
import eval as evaluation
import data
import prompting
import recipes
from conftest import NAMES as TOY_NAMES, SMALL_CONFIG, random_clip, toy_batch

NAMES = ["red circle", "blue square", "green_triangle", "yellow cross"]


@pytest.fixture(scope="module")
def clip():
    return random_clip(SMALL_CONFIG, seed=0)


def cfg_of(method, **kw):
    cfg = recipes.resolve_config(method, "caltech101", {"subsample": "base"})
    cfg.update(kw)
    return cfg


def test_text_prompts_layout(clip):
    p = dapt.TextPrompts(clip, NAMES, n_ctx=4, ctx_init="a photo of a")
    assert p.classnames[2] == "green triangle"  # "_" -> " "
    tokens = dapt.tokenize([f"a photo of a {n}." for n in p.classnames])
    torch.testing.assert_close(p.init_vectors, clip.embed_text(tokens[:1])[0, 1:5])
    x, eot = p(torch.zeros(4, 64))
    assert torch.equal(eot, tokens.argmax(-1))
    assert (x[:, 1:5] == 0).all() and torch.equal(x[:, 5:], clip.embed_text(tokens)[:, 5:])
    assert p.prefix_len == 5  # SOS + 4 context slots are identical across classes
    maple = dapt.TextPrompts(clip, NAMES, n_ctx=2, ctx_init="a photo of a")
    assert maple.prefix_len == 5  # SOS + 2 learnable + frozen "of a"


@pytest.mark.parametrize("position", ["middle", "front"])
def test_class_token_positions(clip, position):
    p = dapt.TextPrompts(clip, ["red circle", "cat"], n_ctx=4, position=position)
    marker = torch.arange(4.0)[:, None].expand(4, 64) + 10
    x, _ = p(marker)
    for c, name in enumerate(["red circle", "cat"]):
        n_name = int(dapt.tokenize(name)[0].argmax()) - 1
        slots = (x[c, :, 0] >= 10).nonzero().flatten().tolist()
        half = 2 if position == "middle" else 0
        expect = list(range(1, 1 + half)) + list(range(1 + half + n_name, 5 + n_name))
        assert slots == expect
        assert x[c, slots, 0].tolist() == [10.0, 11.0, 12.0, 13.0]  # context order kept


@pytest.mark.parametrize("method,extra", [("coop", {}), ("coop", {"csc": True, "ctx_init": ""}), ("maple", {}), ("cocoop", {})])
def test_text_savings_is_exact(clip, method, extra):
    torch.manual_seed(0)
    model = dapt.build_model(method, clip, NAMES, cfg_of(method, **extra))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.1)
    images = torch.randn(3, 3, 32, 32)
    model.cfg["text_savings"] = True
    fast = model(images)
    fast_t = model.text_features()
    model.cfg["text_savings"] = False
    slow = model(images)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    if fast_t is not None:
        torch.testing.assert_close(fast_t, model.text_features(), rtol=1e-5, atol=1e-6)
    x, eot = model.prompts(model.ctx if method != "cocoop" else model.ctx)
    if method != "cocoop":  # the sequences cut at the last EOT give the full-length features too
        full = clip.encode_text_embeddings(x, eot, cut=False, **({} if method != "maple" else dict(
            deep_prompts=[None] + list(model.compound_prompts), prompt_slice=slice(1, 3))))
        torch.testing.assert_close(dapt.normalize(full), slow_text(model), rtol=1e-5, atol=1e-6)


def slow_text(model):
    model.cfg["text_savings"] = False
    return model.text_features()


def test_encode_text_cut_is_exact(clip):
    tokens = dapt.tokenize(["a photo of a cat.", "a much longer caption of a small red circle on stripes."])
    torch.testing.assert_close(clip.encode_text(tokens), clip.encode_text(tokens, cut=False), rtol=1e-5, atol=1e-6)


def test_cocoop_batched_equals_per_image_loop(clip):
    torch.manual_seed(1)
    model = dapt.CoCoOp(clip, NAMES, cfg_of("cocoop"))
    images = torch.randn(3, 3, 32, 32)
    batched = model(images)
    looped = torch.cat([model(images[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, model(images, chunk=1), rtol=1e-5, atol=1e-5)  # chunked text calls


def test_vpt_deep_prompts_replace_each_layer(clip):
    torch.manual_seed(2)
    model = dapt.VPT(clip, NAMES, cfg_of("vpt"))
    assert model.image_prompts.shape == (2, 8, 64)  # depth 12 clamped to the 2 layers of the small CLIP
    images = torch.randn(2, 3, 32, 32)
    z = model.image_features(images)
    with torch.no_grad():
        model.image_prompts[1].add_(1.0)  # the second layer's tokens matter ...
    assert not torch.allclose(z, model.image_features(images))
    shallow = dapt.VPT(clip, NAMES, cfg_of("vpt", vpt_depth=1))
    assert shallow.image_prompts.shape == (1, 8, 64)
    # prompts carry no positional embedding: their order does not change the CLS output
    z1 = shallow.image_features(images)
    with torch.no_grad():
        shallow.image_prompts.copy_(shallow.image_prompts.flip(1))
    torch.testing.assert_close(z1, shallow.image_features(images), rtol=1e-5, atol=1e-6)


def test_xavier_init_bound(clip):
    p = dapt.init_image_prompts((1, 16, 768), "xavier", 16)
    assert p.abs().max() <= 0.0625 + 1e-7 and p.abs().max() > 0.05


def test_trainable_parameters(clip):
    counts = {}
    for method in ("coop", "cocoop", "vpt", "maple"):
        model = dapt.build_model(method, clip, NAMES, cfg_of(method))
        assert all(not p.requires_grad for p in model.clip.parameters())
        counts[method] = {n for n, p in model.named_parameters() if p.requires_grad}
    assert counts["coop"] == {"ctx"}
    assert counts["cocoop"] == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                                "meta_net.linear2.bias"}
    assert counts["vpt"] == {"image_prompts"}
    assert counts["maple"] == {"ctx", "compound_prompts", "couplings.0.weight", "couplings.0.bias",
                               "couplings.1.weight", "couplings.1.bias"}


def test_maple_size_at_vit_b16():
    """MaPLe at ViT-B/16 widths trains about 3.55 M values (methods.md §5); built on the meta device."""
    with torch.device("meta"):
        big = clip_module.CLIP(**clip_module.VIT_B16_CONFIG)
    model = dapt.MaPLe(big, ["cat", "dog"], cfg_of("maple"))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 2 * 512 + 8 * 2 * 512 + 9 * (512 * 768 + 768) == 3_555_072


def test_zero_shot_ensemble_is_renormalised_mean(clip):
    model = dapt.ZeroShotCLIP(clip, NAMES, {"ensemble": "select", "template": "{} texture.", "dataset": "dtd"})
    templates = list(prompting.SELECT_TEMPLATES) + ["{} texture."]  # CoOp's 7, plus the dataset's own
    assert model.templates == templates
    each = [dapt.encode_texts(clip, [t.format(n.replace("_", " ")) for n in NAMES]) for t in templates]
    torch.testing.assert_close(model.text_features(), dapt.normalize(sum(each) / len(templates)))
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4)


def test_kgcoop_term_is_zero_at_the_template_init():
    cfg = recipes.resolve_config("kgcoop", "toy", {})
    model = dapt.KgCoOp(random_clip(SMALL_CONFIG), TOY_NAMES, dict(cfg, template="a photo of a {}."))
    loss, stats = model.loss(toy_batch(), 0)
    assert abs(stats["L_kg"]) < 1e-5  # ctx = "a photo of a" reproduces the template prompt exactly
    with torch.no_grad():
        model.ctx.add_(0.5 * torch.randn_like(model.ctx))
    loss2, stats2 = model.loss(toy_batch(), 0)
    assert stats2["L_kg"] > 1e-3
    loss2.backward()
    assert model.ctx.grad.abs().sum() > 0


def test_class_token_positions_equal_official_coop():
    """CoOp middle / front: every position of every class's sequence and the EOT read position equal the official
    PromptLearner's (names ending in ")", "?", "'", digits, non-ASCII; 4 and 16 context slots; with an init phrase)."""
    golden = json.load(open(os.path.join(os.path.dirname(__file__), "golden", "coop_positions.json")))
    clip = random_clip()
    groups = {}
    for case in golden["cases"]:
        groups.setdefault((case["n_ctx"], case["ctx_init"], case["position"]), []).append(case)
    differs = 0
    for (n, init, position), cases in groups.items():
        names = [c["classname"] for c in cases]
        p = dapt.TextPrompts(clip, names, n_ctx=n, ctx_init=init or None, position=position)
        for c, case in enumerate(cases):
            got = p.tokens[c].tolist()
            for slot in p.ctx_pos[c].tolist():
                got[slot] = -1
            assert got[:case["eot"] + 1] == case["tokens"], (case["classname"], n, init, position)
            assert int(p.eot[c]) == case["eot"], case["classname"]
        if position != "end" and not init:  # the separate layout differs exactly for names ending in punctuation
            sep = dapt.TextPrompts(clip, names, n_ctx=n, position=position, layout="separate")
            for c, case in enumerate(cases):
                ends_in_punct = not case["classname"][-1].isalnum()
                same = torch.equal(sep.tokens[c], p.tokens[c]) and int(sep.eot[c]) == int(p.eot[c])
                assert same != ends_in_punct, case["classname"]
                differs += not same
    assert differs > 0


def test_coop_csc_with_init_phrase_is_refused(clip):
    with pytest.raises(dapt.ConfigError, match="ignores CSC"):
        dapt.CoOp(clip, NAMES, {"csc": True, "ctx_init": "a photo of a", "n_ctx": 4})
    assert dapt.CoOp(clip, NAMES, {"csc": True}).ctx.shape == (4, 16, 64)  # random init: one context per class


def test_select_ensemble_adds_the_dataset_template_except_on_imagenet(clip):
    counts = {}
    for name in ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r", "dtd"):
        cfg = recipes.resolve_config("zsclip", name, {"ensemble": "select"})
        model = dapt.ZeroShotCLIP(clip, NAMES, cfg)
        counts[name] = len(model.templates)
        if name != "imagenet":
            assert model.templates[-1] == data.DATASETS[name].template
    assert counts == {"imagenet": 7, "imagenetv2": 8, "imagenet_sketch": 8, "imagenet_a": 8, "imagenet_r": 8, "dtd": 8}


def test_kgcoop_uses_its_own_template_table():
    """KgCoOp's t0 templates equal CoOp's zero-shot table except DTD (KgCoOp: "a photo of a {}, a type of texture.")."""
    for name, info in data.DATASETS.items():
        template = recipes.resolve_config("kgcoop", name, {})["template"]
        assert template == ("a photo of a {}, a type of texture." if name == "dtd" else info.template), name
    assert recipes.resolve_config("zsclip", "dtd", {})["template"] == "{} texture."


def test_maple_initialisation_follows_the_official_draws(clip):
    """MaPLe's couplings: F_0, then the deep prompts, then one Linear cloned into F_1..F_{J-1} (identical at step 0),
    drawn in that order so one torch seed gives the official initial values."""
    torch.manual_seed(5)
    model = dapt.MaPLe(clip, NAMES, cfg_of("maple"))
    F = model.couplings
    assert len(F) == 2 and torch.equal(F[1].weight, model.couplings[-1].weight)
    torch.manual_seed(5)
    f0 = torch.nn.Linear(64, 64)
    P = torch.empty(1, 2, 64).normal_(std=0.02)
    shared = torch.nn.Linear(64, 64)
    assert torch.equal(F[0].weight, f0.weight) and torch.equal(F[0].bias, f0.bias)
    assert torch.equal(model.compound_prompts, P)
    assert torch.equal(F[1].weight, shared.weight) and torch.equal(F[1].bias, shared.bias)
    assert not torch.equal(F[0].weight, F[1].weight)
    big = dapt.MaPLe(clip_module.CLIP(**dict(SMALL_CONFIG, vision_layers=4, transformer_layers=4)), NAMES, cfg_of("maple"))
    assert all(torch.equal(f.weight, big.couplings[1].weight) for f in big.couplings[1:])  # F_1..F_3 identical
    assert big.couplings[1].weight.data_ptr() != big.couplings[2].weight.data_ptr()  # but separate tensors


def test_zero_shot_takes_a_cross_dataset_targets_template(clip):
    """The caller says which template the next dataset gets (eval.py: the target's own, or the run's when it was
    given by hand); "select" adds it to CoOp's 7 everywhere but on ImageNet itself."""
    cfg = recipes.resolve_config("zsclip", "dtd", {})
    model = dapt.ZeroShotCLIP(clip, NAMES, cfg)
    assert model.templates == ["{} texture."]
    model.set_dataset("eurosat", data.DATASETS["eurosat"].template)
    assert model.templates == [data.DATASETS["eurosat"].template]
    select = dapt.ZeroShotCLIP(clip, NAMES, recipes.resolve_config("zsclip", "imagenet", {"ensemble": "select"}))
    assert len(select.templates) == 7
    select.set_dataset("imagenetv2", data.DATASETS["imagenetv2"].template)  # CoOp's rule on the target: 8 templates
    assert len(select.templates) == 8 and select.templates[-1] == data.DATASETS["imagenetv2"].template


def test_a_template_given_by_hand_stays_on_other_datasets():
    """eval.py's choice for a cross-dataset target: the run's template when it was given by hand (it differs from
    what recipes.py resolves), else the target dataset's."""
    target = data.Benchmark([], [], [], ["x"], data.DATASETS["eurosat"].template)
    own = recipes.resolve_config("zsclip", "dtd", {})
    assert evaluation.target_template(own, target) == data.DATASETS["eurosat"].template
    given = recipes.resolve_config("zsclip", "dtd", {"template": "itap of a {}."})
    assert evaluation.target_template(given, target) == "itap of a {}."


def class_default_features(clip):
    """A `features` function as train.py hands it to prepare: fn over a few random images of the 4 classes."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.arange(8) % len(TOY_NAMES)

    def features(fn, view="train", per_class=0, sampling="first", cache=None):
        with torch.no_grad():
            return fn(images).float(), labels
    return features


@pytest.mark.parametrize("method", sorted(dapt.METHODS))
def test_every_method_builds_from_its_class_defaults_alone(method):
    """A method lifts out: dapt.build_model(method, clip, classnames) with no config at all (the class defaults; no
    recipe, dataset or run code) gives a model whose loss and backward run on a small random CLIP (ViT-B/16's
    depth, 12 blocks per tower, as the defaults assume: MMRL's representation blocks are 6-12)."""
    clip = random_clip(dict(SMALL_CONFIG, vision_layers=12, transformer_layers=12))
    model = dapt.build_model(method, clip, TOY_NAMES)
    assert model.cfg == {**type(model).defaults, **model.cfg} and set(model.cfg) == set(type(model).defaults)
    model.prepare(class_default_features(clip))  # dapt-dist's prototypes, DA-VPT's clusters; a no-op elsewhere
    batch = toy_batch()
    trained = [p for p in model.parameters() if p.requires_grad]
    if method == "zsclip":
        assert not trained and model(batch["image"]).shape == (4, len(TOY_NAMES))
        return
    loss, stats = model.loss(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and "acc" in stats
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for p in clip.parameters() if not p.requires_grad)
