"""FVG-PT (methods.md §9): only the adapters and gates train, the prediction switch (z_FDC on the training
classes, z_PC elsewhere), and FVG-PT on every host through one code path."""
import pytest
import torch

import dapt
import recipes
from conftest import NAMES, make_clip, toy_batch


def fvgpt_model(**over):
    cfg = recipes.resolve_config("fvgpt", "toy", dict(dict(subsample="base"), **over))
    clip = make_clip()
    host = dapt.CoOp(clip, NAMES, recipes.resolve_config("coop", "toy", {"subsample": "base"}))
    return dapt.FVGPT(host, NAMES, cfg)


def test_fvgpt_trains_only_adapters_and_gates_and_switches_prediction():
    model = fvgpt_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.split(".")[0] in ("adapter_v", "adapter_t", "alpha_v", "alpha_t", "frg", "brg") for n in trainable)
    assert not model.host.changes_image_tower and model.mode == "fdc"
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


@pytest.mark.parametrize("host", ["coop", "kgcoop", "maple", "vpt", "dapt"])
def test_fvgpt_on_every_host(host):
    """FVG-PT on each host through one code path: the host stays frozen, f0 is frozen CLIP's feature exactly when
    the host changes the image tower."""
    clip = make_clip()
    host_model = dapt.build_model(host, clip, NAMES, recipes.resolve_config(host, "toy", {"subsample": "base"}))
    model = dapt.FVGPT(host_model, NAMES, recipes.resolve_config("fvgpt", "toy", {"subsample": "base"}))
    batch = toy_batch()
    loss, _ = model.loss(batch, 0)
    loss.backward()
    assert all(p.grad is None for p in model.host.parameters())
    assert model.adapter_v[0].weight.grad.abs().sum() > 0
    x = batch["image"]
    f, _, f0 = model.frozen_features(x)
    assert torch.equal(f, f0) != host_model.changes_image_tower
    torch.testing.assert_close(f0, dapt.normalize(clip.encode_image(x)))


def test_fvgpt_scores_another_dataset_with_the_calibrated_logits():
    """A domain-shift target with the training class list (ImageNet-V2 / Sketch) is scored with z_PC, as every
    cross-dataset target; the training dataset's own classes with z_FDC."""
    model = fvgpt_model()
    assert model.mode == "fdc"
    model.set_dataset("imagenetv2", "a photo of a {}.")
    model.set_classnames(NAMES)
    assert model.mode == "pc"
    model.set_dataset("toy", "a photo of a {}.")
    model.set_classnames(NAMES)
    assert model.mode == "fdc"
