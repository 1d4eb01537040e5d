"""Inference on images: runs.load_run rebuilds a run from its checkpoint (weights_only) with the run's accuracy,
`eval.py predict` (a run, other classes, zero-shot CLIP without a run), and attention pictures whose maps are
checked against a direct computation from a block's q and k."""
import csv
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dapt
import data
import eval as evaluation
import train
import runs
from conftest import NAMES, SMALL_CONFIG, make_clip, make_folder_dataset, random_clip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder dataset with masks, a tiny random CLIP, and one-epoch runs: coop (few-shot), dapt (masks, base),
    dapt -g (Grad-CAM, base), coop (base; the host) and fvgpt on it."""
    tmp = tmp_path_factory.mktemp("inference")
    d = make_folder_dataset(tmp / "mine", per_class=6)
    clip_path = str(tmp / "tiny.pt")
    torch.save(make_clip().state_dict(), clip_path)
    out = str(tmp / "runs")
    common = ["--dataset", "folder", "--root", d, "--out", out, "--clip", clip_path, "--epochs", "1",
              "--warmup-epochs", "0", "--workers", "0", "--log-every", "1000", "--shots", "2"]
    done = {}  # name -> (result, run folder)
    for name, args in {"coop": ["--method", "coop", "--lr", "0.05"],
                       "dapt": ["--method", "dapt", "--subsample", "base"],
                       "dapt-g": ["--method", "dapt", "--subsample", "base", "--cue", "gradcam", "--tag", "-g"],
                       "host": ["--method", "coop", "--subsample", "base", "--tag", "-host"]}.items():
        result = train.main(args + common)
        done[name] = (result, result["run_dir"])
    result = train.main(["--method", "fvgpt", "--subsample", "base", "--host-run", done["host"][1]] + common)
    done["fvgpt"] = (result, result["run_dir"])
    return d, clip_path, done


def test_load_run_reproduces_the_runs_accuracy(trained):
    d, _, done = trained
    for name, (result, run_dir) in done.items():
        model = runs.load_run(run_dir)
        assert isinstance(model, dapt.PromptModel) and not model.training
        assert model.classnames == result["classnames"][result["subsample"]]
        cfg = result["config"]
        bench = data.load_benchmark("folder", d, shots=2, seed=1, subsample=cfg["subsample"])
        _, tf = train.transforms_of(cfg, model.clip.visual.input_resolution)
        loader = train.make_loader(cfg, bench, bench.test, tf, False, model, model.clip.visual.patch_size)
        acc, _ = train.evaluate(model, loader, "cpu")
        assert acc == pytest.approx(result["accuracy"][result["subsample"]]), name
    with pytest.raises(dapt.CheckpointError, match="checkpoint.pt: file not found"):
        runs.load_run(os.path.join(d, "red_circle"))


def test_predict_prints_and_writes_the_top_k(trained, tmp_path, capsys):
    d, clip_path, done = trained
    run_dir = done["coop"][1]
    out = str(tmp_path / "pred.csv")
    rows = evaluation.main(["predict", run_dir, os.path.join(d, "red_circle"), os.path.join(d, "blue_square",
                            "img_00.png"), "--topk", "3", "--out", out])
    assert len(rows) == 7 and capsys.readouterr().out.count(": ") >= 7
    with open(out) as f:
        table = list(csv.reader(f))
    assert table[0] == ["image", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"] and len(table) == 8
    probs = [float(x) for x in table[1][2::2]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    # the same probabilities as the model's softmax on the test view
    model, _, tf = evaluation.predictor(run_dir)
    x = tf(Image.open(rows[0][0]))[None]
    p = model(x).softmax(-1)[0]
    assert rows[0][1][0][1] == pytest.approx(p.max().item(), abs=1e-6)
    # other classes for the run; zero-shot CLIP without a run
    names = tmp_path / "classes.txt"
    names.write_text("# my classes\nred circle\npurple star\nblue square\n")
    rows = evaluation.main(["predict", run_dir, os.path.join(d, "red_circle", "img_01.png"), "--classes-file",
                            str(names), "--topk", "5"])
    assert {c for c, _ in rows[0][1]} == {"red circle", "purple star", "blue square"}
    rows = evaluation.main(["predict", "--method", "zsclip", "--clip", clip_path, os.path.join(d, "red_circle"),
                            "--classes", "red circle,blue square", "--topk", "1"])
    assert len(rows) == 6 and all(len(top) == 1 for _, top in rows)
    with pytest.raises(SystemExit):
        evaluation.main(["predict", "--method", "zsclip", "--clip", clip_path, os.path.join(d, "red_circle")])
    assert "needs --classes" in capsys.readouterr().err


def direct_cls_row(visual, images, prompts=None, block=-1):
    """The CLS query's attention row of a block, computed by hand from its weights: [B, L], mean over heads."""
    blk = visual.transformer.resblocks[block]
    x = visual.run(images, prompts, stop=len(visual.transformer.resblocks) + block if block < 0 else block)
    h = blk.ln_1(x)
    q, k, _ = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
    B, L, W = h.shape
    H = blk.attn.heads
    q, k = q.view(B, L, H, W // H).transpose(1, 2), k.view(B, L, H, W // H).transpose(1, 2)
    return ((q[:, :, 0:1] @ k.transpose(-1, -2)) / math.sqrt(W // H)).softmax(-1).mean(1)[:, 0]


@torch.no_grad()
def test_cls_attention_equals_a_direct_computation():
    clip = random_clip(dict(SMALL_CONFIG, vision_layers=3), seed=3)
    for blk in clip.visual.transformer.resblocks:  # several heads: the mean over heads is checked too
        blk.attn.heads = 4
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vpt = dapt.VPT(clip, NAMES, {"n_prompts": 3})  # deep prompts: the row has 1 + 16 + 3 keys
    for prompts, block in ((None, -1), (None, 0), (vpt.visual_prompts(), -1)):
        attn = clip.visual.transformer.resblocks[block].attn
        _, row = evaluation.cls_attention(attn, lambda: clip.visual(images, prompts))
        assert row.shape == (2, 1 + 16 + (3 if prompts else 0))
        assert torch.allclose(row, direct_cls_row(clip.visual, images, prompts, block), atol=1e-6)
        assert torch.allclose(row.sum(-1), torch.ones(2), atol=1e-5)
        patches = evaluation.patch_map(row, clip.visual.grid)
        assert patches.shape == (2, 4, 4) and (patches.sum((1, 2)) <= 1 + 1e-6).all()
        assert ((patches.sum((1, 2)) < 1 - 1e-4) if prompts else torch.ones(2, dtype=torch.bool)).all()


def test_attention_pictures(trained, tmp_path):
    d, _, done = trained
    images = [os.path.join(d, "red_circle", "img_00.png"), os.path.join(d, "yellow_cross", "img_01.png")]
    for name, panels, cue in (("coop", 3, None), ("dapt", 4, "mask"), ("dapt-g", 4, "gradcam"), ("fvgpt", 4, "mask")):
        out = str(tmp_path / name)
        records = evaluation.main(["attention", done[name][1], *images, "--out", out])
        assert len(records) == 2
        for r in records:
            png = Image.open(r["png"])
            assert png.size[0] == panels * (224 + 8) + 8 and png.size[1] > 224
            maps = np.load(r["npz"])
            for key in ("zero_shot", "tuned"):
                assert maps[key].shape == (4, 4) and 0 < maps[key].sum() <= 1 + 1e-6 and (maps[key] >= 0).all()
            assert r["cue_kind"] == cue
            if cue:
                assert maps["cue"].shape == (32, 32) and 0 <= maps["cue"].min() and maps["cue"].max() <= 1
            if cue == "mask":  # the mask file of the image, as the test transform sees it
                m = np.asarray(Image.open(os.path.join(d, "mask", os.path.relpath(r["image"], d)))) >= 128
                assert (maps["cue"] == m).all()
        if name == "coop":  # CoOp leaves the image tower unchanged: the same map as zero-shot CLIP
            assert np.allclose(maps["zero_shot"], maps["tuned"])
