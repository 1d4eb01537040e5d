"""data.py transforms, masks, loaders and the toy benchmark. Transform goldens come from torchvision
(tests/make_transform_goldens.py, run in a scratch venv; the inputs are regenerated here by formula)."""
import hashlib
import importlib.util
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import clip
import dapt
import datatools
import loader
import toy

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("mtg", os.path.join(HERE, "make_transform_goldens.py"))
mtg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mtg)
G = np.load(os.path.join(HERE, "golden", "transforms_torchvision.npz"))


def _u8(t, img):
    """Our geometry only: the PIL image before to_tensor, as uint8 [H, W, 3]."""
    return np.asarray(t.apply(img, t.params(img.width, img.height), Image.BICUBIC))


@pytest.mark.parametrize("k", range(len(mtg.SIZES)))
def test_test_transform_matches_torchvision(k):
    a = mtg.make_image(*mtg.SIZES[k])
    assert hashlib.sha256(a.tobytes()).hexdigest() == str(G[f"in_{k}_sha"])
    img = Image.fromarray(a)
    np.testing.assert_array_equal(_u8(loader.build_transform(False, size=32), img), G[f"test_{k}_32"])
    big = _u8(loader.build_transform(False, size=224), img)
    assert big.shape == (224, 224, 3) and hashlib.sha256(big.tobytes()).hexdigest() == str(G[f"test_{k}_224_sha"])
    x = loader.build_transform(False, size=16)(img)
    assert x.dtype == torch.float32 and x.shape == (3, 16, 16)
    np.testing.assert_allclose(x.numpy(), G[f"testnorm_{k}"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", range(len(mtg.SIZES)))
def test_random_resized_crop_matches_torchvision(k):
    W, H = mtg.SIZES[k]
    img = Image.fromarray(mtg.make_image(W, H))
    for (i, j, h, w), ref in zip(G[f"box_{k}"].tolist(), G[f"rrc_{k}"]):  # crop + resize for given boxes
        ops = [("crop", (j, i, j + w, i + h)), ("resize", (32, 32))]
        np.testing.assert_array_equal(np.asarray(loader.Transform.apply(img, ops, Image.BICUBIC)), ref)
    fb = [r for r in G["fallback"].tolist() if r[:2] == [W, H]][0]  # every draw rejected -> central fallback
    assert list(loader.rrc_fallback(W, H, (3 / 4, 4 / 3))) == fb[2:]
    assert list(loader.rrc_params(W, H, (2.0, 3.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(5))) == fb[2:]
    for w_, h_, seed, *box in G["params"].tolist():  # same draws in the same order as torchvision's get_params
        if (w_, h_) == (W, H):
            assert list(loader.rrc_params(W, H, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed))) == box
    t = loader.build_transform(True, size=32)
    for seed in range(2):  # whole train geometry (crop + flip) with a generator seeded like torch.manual_seed
        out = np.asarray(t.apply(img, t.params(W, H, torch.Generator().manual_seed(seed)), Image.BICUBIC))
        np.testing.assert_array_equal(out, G[f"train_{k}_{seed}"])


def test_fallback_cases():
    assert loader.rrc_fallback(30, 100, (3 / 4, 4 / 3)) == ((100 - 40) // 2, 0, 40, 30)  # narrow: h = round(w / (3/4))
    assert loader.rrc_fallback(100, 30, (3 / 4, 4 / 3)) == (0, (100 - 40) // 2, 30, 40)  # wide: w = round(h * 4/3)
    assert loader.rrc_fallback(50, 45, (3 / 4, 4 / 3)) == (0, 0, 45, 50)


def test_modes_convert_to_rgb_and_generator_reproducible():
    rgb = Image.fromarray(mtg.make_image(41, 29))
    t = loader.build_transform(True, size=24, scale=(0.5, 1.0))
    for mode in ("L", "P", "CMYK", "RGBA", "LA", "1", "I"):
        im = rgb.convert(mode)
        x = t(im, generator=torch.Generator().manual_seed(3))
        y = t(im.convert("RGB"), generator=torch.Generator().manual_seed(3))
        assert x.shape == (3, 24, 24) and torch.equal(x, y), mode
    a = t(rgb, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, t(rgb, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a, t(rgb, generator=torch.Generator().manual_seed(2)))
    stored = loader.build_transform(True, size=24, generator=torch.Generator().manual_seed(1))
    assert torch.equal(stored(rgb), loader.build_transform(True, size=24)(rgb, torch.Generator().manual_seed(1)))


def test_constants_and_resize_only():
    c = loader.build_transform(True, size=224, scale=(0.5, 1.0)).constants()
    assert c["scale"] == [0.5, 1.0] and c["ratio"] == [0.75, 4 / 3] and c["interpolation"] == "bicubic"
    assert c["mean"] == list(clip.CLIP_MEAN) and c["std"] == list(clip.CLIP_STD) and c["hflip"] == 0.5
    assert c["mask_interpolation"] == "nearest" and "RandomResizedCrop" in c["geometry"]
    assert "center crop" in loader.build_transform(False).constants()["geometry"]
    img = Image.fromarray(mtg.make_image(50, 20))
    r = loader.build_transform(True, size=16, resize_only=True)
    np.testing.assert_array_equal(_u8(r, img), np.asarray(img.resize((16, 16), Image.BICUBIC)))
    with pytest.raises(ValueError, match="interpolation"):
        loader.build_transform(True, interpolation="cubic")


def test_mask_follows_image_through_crop_and_flip():
    rng = np.random.default_rng(0)
    for trial in range(12):
        W, H = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        m = np.zeros((H, W), np.uint8)
        m[rng.integers(0, H // 2):rng.integers(H // 2, H), rng.integers(0, W // 3):rng.integers(W // 3, W)] = 255
        img = Image.fromarray(np.stack([m, 255 - m, m], -1))  # the image draws its own mask
        t = loader.build_transform(trial % 3 != 0, size=24, interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1))
        x, fg = t.pair(img, Image.fromarray(m), generator=torch.Generator().manual_seed(trial))
        assert fg.shape == (1, 24, 24) and set(fg.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(fg[0], x[0], rtol=0, atol=0)
        torch.testing.assert_close(fg[0], 1 - x[1], rtol=0, atol=0)
    # flips: a mask on the left half lands on the right half when the generator flips
    t = loader.build_transform(True, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    img = Image.new("RGB", (16, 16))
    left = np.zeros((16, 16), np.uint8)
    left[:, :8] = 255
    sides = {tuple(t.pair(img, Image.fromarray(left), torch.Generator().manual_seed(s))[1][0, 0, [0, 15]].tolist())
             for s in range(8)}
    assert sides == {(1.0, 0.0), (0.0, 1.0)}


def test_mask_encodings_and_resizing():
    img = Image.new("RGB", (8, 4))
    t = loader.build_transform(False, size=4)
    white = np.array([[0, 127, 128, 255]] * 4, np.uint8)  # mean/255 > 0.5  <=>  v >= 128 (JPEG-ish greys)
    _, m = t.pair(img, Image.fromarray(np.repeat(white, 2, 1)), encoding="white")
    assert m[0, 0].tolist() == [0, 0, 1, 1]  # centre crop (columns 2..5) of the row [0 0 127 127 128 128 255 255]
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 0] = (255, 255, 127)  # mean 212.3 -> fg; (255, 127, 0): mean 127.3 -> bg; (200, 200, 183): 194.3 -> fg
    rgb[0, 1], rgb[0, 2] = (255, 127, 0), (200, 200, 183)
    assert loader.binarise(loader.mask_score(Image.fromarray(rgb), "white"), "white").tolist() == [[1, 0, 1]]
    label = np.array([[0, 1, 7, 254, 255]], np.uint8)
    assert loader.binarise(loader.mask_score(Image.fromarray(label), "label"), "label").tolist() == [[0, 1, 1, 1, 0]]
    p = Image.fromarray(label, "P")  # palette masks: the index is the label
    p.putpalette([255 - i // 3 for i in range(768)])
    assert loader.binarise(loader.mask_score(p, "label"), "label").tolist() == [[0, 1, 1, 1, 0]]
    small = np.zeros((2, 4), np.uint8)  # a mask at another resolution is resized to the image (NEAREST)
    small[:, 2:] = 255
    t = loader.build_transform(False, size=4, mean=(0, 0, 0), std=(1, 1, 1))
    _, m = t.pair(Image.new("RGB", (4, 4)), Image.fromarray(small))
    assert m[0].tolist() == [[0, 0, 1, 1]] * 4
    with pytest.raises(ValueError, match="encoding"):
        loader.mask_score(p, "binary")


def test_masked_view_fills():
    img = Image.fromarray(mtg.make_image(16, 16))
    x = loader.build_transform(False, size=16)(img)[None]
    m = torch.zeros(1, 1, 16, 16)
    m[..., :8] = 1
    mean_fill = dapt.masked_view(x, m, "mean")
    assert torch.equal(mean_fill[..., :8], x[..., :8]) and (mean_fill[..., 8:] == 0).all()
    black = dapt.masked_view(x, 1 - m, "black")  # background view, foreground set to black before normalising
    ref = loader.build_transform(False, size=16)(Image.fromarray(np.concatenate(
        [np.zeros((16, 8, 3), np.uint8), mtg.make_image(16, 16)[:, 8:]], 1)))[None]
    torch.testing.assert_close(black, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="fill"):
        dapt.masked_view(x, m, "grey")


# ----------------------------------------------------------------------------------------------- toy + loaders


@pytest.fixture(scope="module")
def toy_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyroot")
    return data.load_benchmark("toy", root, shots=0)  # generates <root>/toy (once for this module)


def test_toy_benchmark(toy_bench, caplog):
    """The toy in the CoOp layout as load_benchmark reads it (scenes, tint and test_corr: tests/test_toy.py)."""
    d = toy_bench.meta["dataset_dir"]
    C, per = len(toy.TOY_CLASSNAMES), toy.TOY_PER_CLASS
    assert toy_bench.classnames == toy.TOY_CLASSNAMES and C >= 24 and toy_bench.classnames[0] == "red circle"
    assert (len(toy_bench.train), len(toy_bench.val), len(toy_bench.test)) == (per["train"] * C, per["val"] * C, per["test"] * C)
    assert toy_bench.template == "a photo of a {}." and toy_bench.meta["image_size"] == 32
    for p, y, c in toy_bench.train[::97] + toy_bench.test[::89]:
        im = Image.open(p)
        assert im.mode == "RGB" and im.size == (32, 32)
        mp = loader.mask_path(d, p)
        assert mp == os.path.join(d, "mask", os.path.relpath(p, d)) and mp.endswith(".png")
        assert 0.03 < (np.asarray(Image.open(mp)) > 127).mean() < 0.6
    assert open(os.path.join(d, "mask", "ENCODING")).read().strip() == "white"
    again = data.load_benchmark("toy", os.path.dirname(d), shots=4, seed=1, subsample="new")  # exists: no regeneration
    assert again.classnames == toy.TOY_CLASSNAMES[C // 2:] and len(again.train) == len(again.val) == C // 2 * 4


def test_toy_generated_on_first_use(tmp_path, monkeypatch, caplog):
    real = toy.make_toy
    monkeypatch.setattr(toy, "make_toy", lambda root: real(root, per_class={"train": 3, "val": 2, "test": 1}))
    with caplog.at_level(logging.INFO, logger="dapt"):
        b = data.load_benchmark("toy", tmp_path, shots=2, seed=1, subsample="base")
    assert "toy benchmark not found" in caplog.text and "generating it" in caplog.text
    half = len(toy.TOY_CLASSNAMES) // 2
    assert os.path.isfile(tmp_path / "toy" / "split_toy.json") and len(b.classnames) == half
    assert (len(b.train), len(b.val), len(b.test)) == (2 * half, 2 * half, half)


def test_toy_deterministic_and_cli(tmp_path):
    a = toy.make_toy(tmp_path / "a", seed=3, per_class={"train": 2, "val": 1, "test": 1})
    b = toy.make_toy(tmp_path / "b", seed=3, per_class={"train": 2, "val": 1, "test": 1})
    c = toy.make_toy(tmp_path / "c", seed=4, per_class={"train": 2, "val": 1, "test": 1})
    read = lambda d, r: open(os.path.join(d, r), "rb").read()  # noqa: E731
    assert read(a, "split_toy.json") == read(b, "split_toy.json")
    rel = "images/red_circle/train_001.png"
    assert read(a, rel) == read(b, rel) and read(a, rel) != read(c, rel)
    assert not any(n.startswith("toy.tmp") for n in os.listdir(tmp_path / "a"))
    assert datatools.main(["toy", "--root", str(tmp_path / "a")]) == 0  # exists: left alone without --force


def _epoch(loader):
    return [b for b in loader]


def test_loader_batches_masks_and_reproducibility(toy_bench):
    items = toy_bench.train[:10]
    t = loader.build_transform(True, size=32)
    kw = dict(masks=True, dataset_dir=toy_bench.meta["dataset_dir"], patch_size=8, seed=7)
    ld = loader.build_loader(items, t, 4, train=True, workers=0, **kw)
    b0 = _epoch(ld)
    assert [len(b["label"]) for b in b0] == [4, 4, 2] and ld.samples_per_epoch == 10  # nothing dropped
    assert sorted(torch.cat([b["index"] for b in b0]).tolist()) == list(range(10))
    b = b0[0]
    assert set(b) == {"image", "label", "index", "fg_mask", "fg_frac"}
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["fg_mask"].shape == (4, 1, 32, 32) and set(b["fg_mask"].unique().tolist()) <= {0.0, 1.0}
    assert b["fg_frac"].shape == (4, 16) and b["label"].dtype == torch.long
    ref = b["fg_mask"].reshape(4, 4, 8, 4, 8).mean((2, 4)).reshape(4, 16)  # row-major 8 x 8 patches
    torch.testing.assert_close(b["fg_frac"], ref)
    assert [items[i][1] for i in b["index"].tolist()] == b["label"].tolist()
    b1 = _epoch(ld)  # the next epoch: new order and new augmentations
    assert not torch.equal(torch.cat([x["index"] for x in b0]), torch.cat([x["index"] for x in b1]))
    ld.set_epoch(0)
    again = _epoch(ld)
    for u, v in zip(b0, again):
        assert all(torch.equal(u[k], v[k]) for k in u)
    # the worker count changes nothing
    ld2 = loader.build_loader(items, t, 4, train=True, workers=2, **kw)
    ld2.set_epoch(1)
    for u, v in zip(b1, _epoch(ld2)):
        assert all(torch.equal(u[k], v[k]) for k in u)
    # the test loader keeps the order; dassl_drop_last reproduces Dassl's dropped partial batch
    tl = loader.build_loader(items, loader.build_transform(False, size=32), 4, train=False)
    assert torch.cat([x["index"] for x in tl]).tolist() == list(range(10)) and "fg_mask" not in next(iter(tl))
    dl = loader.build_loader(items, t, 4, train=True, dassl_drop_last=True)
    assert [len(x["label"]) for x in dl] == [4, 4] and dl.samples_per_epoch == 8


def test_loader_mask_errors(toy_bench, tmp_path, caplog):
    items = toy_bench.train[:6]
    t = loader.build_transform(True, size=32)
    gone = loader.mask_path(toy_bench.meta["dataset_dir"], items[2][0])
    os.rename(gone, gone + ".bak")
    try:
        with pytest.raises(data.MissingMaskError, match="(?s)1 of 6 .*" + gone + ".*--allow-missing-masks true"):
            loader.build_loader(items, t, 3, train=True, masks=True, dataset_dir=toy_bench.meta["dataset_dir"])
        with caplog.at_level(logging.WARNING, logger="dapt"):
            ld = loader.build_loader(items, t, 3, train=False, masks=True, dataset_dir=toy_bench.meta["dataset_dir"],
                                   allow_missing_masks=True)
        assert ld.masks_missing == 1 and "1 of 6 masks missing" in caplog.text
        m = torch.cat([b["fg_mask"] for b in ld])
        assert m[2].min() == 1 and m[0].mean() < 0.9  # all ones only for the missing one
    finally:
        os.rename(gone + ".bak", gone)
    with pytest.raises(ValueError, match="dataset_dir"):
        loader.build_loader(items, t, 3, train=True, masks=True)
    caplog.clear()  # white masks read with the label rule: almost no foreground -> warning
    with caplog.at_level(logging.WARNING, logger="dapt"):
        loader.build_loader(items, t, 3, train=True, masks=True, dataset_dir=toy_bench.meta["dataset_dir"],
                          mask_encoding="label")
    assert "may be 'white' encoded" in caplog.text
    # ... and training on it stops at the first batch, naming the files and the flag
    ld = loader.build_loader(items, t, 3, train=True, masks=True, dataset_dir=toy_bench.meta["dataset_dir"],
                           mask_encoding="label")
    with pytest.raises(data.MissingMaskError, match="(?s)cover 0.000% .*'label' masks.*--mask-encoding white"):
        next(iter(ld))
    assert loader.build_loader(items, t, 3, train=True, masks=True, dataset_dir=toy_bench.meta["dataset_dir"]).dataset.encoding == "white"
    # a corrupt image fails with its path when loaded
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(data.CorruptImageError, match=str(bad)):
        next(iter(loader.build_loader([(str(bad), 0, "x")], t, 1, train=True)))


def write_masks(folder, arrays, mode=None):
    paths = []
    for i, a in enumerate(arrays):
        path = os.path.join(folder, f"m{i}.png")
        Image.fromarray(a, mode).save(path)
        paths.append(path)
    return paths


def test_mask_encoding_detected_from_the_files(tmp_path):
    obj = np.zeros((2, 8, 8), np.uint8)
    obj[:, 2:6, 2:6] = 1
    cases = {
        "white": [obj[0] * 255, obj[1] * 255],  # object white on black
        "label": [obj[0], obj[1]],  # {0, 1}
        "label void": [np.pad(np.pad(np.full((5, 5), 3, np.uint8), 1, constant_values=255), 1)],  # 255 borders
        "white antialiased": [np.pad(np.pad(np.full((8, 8), 255, np.uint8), 1, constant_values=60), 3)],  # grey edge
    }
    expected = {"white": "white", "label": "label", "label void": "label", "white antialiased": "white"}
    for name, arrays in cases.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        enc, why = loader.detect_mask_encoding(write_masks(str(d), arrays))
        assert enc == expected[name], (name, why)
    pal = tmp_path / "pal"
    pal.mkdir()
    assert loader.detect_mask_encoding(write_masks(str(pal), [obj[0]], "P"))[0] == "label"
    # an ENCODING file and an explicit request win over the detection
    (tmp_path / "ds" / "mask").mkdir(parents=True)
    (tmp_path / "ds" / "mask" / "ENCODING").write_text("label\n")
    assert loader.resolve_mask_encoding(str(tmp_path / "ds"), [])[0] == "label"
    assert loader.resolve_mask_encoding(str(tmp_path / "ds"), [], "white") == ("white", "--mask-encoding")
    with pytest.raises(data.DataError, match="mask-encoding 'binary'"):
        loader.resolve_mask_encoding(str(tmp_path / "ds"), [], "binary")


def test_mask_quirk_reads_like_the_official_loader():
    """DAPT's official loader: mask.convert("RGB"), resized to the image (PIL's default for RGB: bicubic), cropped
    and resized with the image's bicubic interpolation, red channel, then 255 -> 0 and >= 1 -> 1."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(rng.random((15, 20)) < 0.4, 255, 1).astype(np.uint8))  # half size, 1 / 255
    t = loader.build_transform(True, size=16, mask_interpolation="bicubic")
    g = torch.Generator().manual_seed(3)
    _, m = t.pair(img, mask, generator=g, encoding="official")
    ops = t.params(40, 30, torch.Generator().manual_seed(3))
    ref = loader.Transform.apply(mask.convert("RGB").resize(img.size, Image.BICUBIC), ops, Image.BICUBIC)
    red = np.asarray(ref)[..., 0].astype(np.float32)
    red[red == 255] = 0
    red[red > 1] = 1
    assert np.array_equal(m[0].numpy(), red)


def test_small_images_are_decoded_once_and_read_again_when_replaced(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(p)
    a = loader.open_image(str(p))
    assert loader.open_image(str(p)) is a  # the toy's 32 px images: decoded once per process
    Image.new("RGB", (32, 32), (0, 255, 0)).save(p)
    os.utime(p, ns=(1, 1))  # a replaced file (another mtime) is read again
    b = loader.open_image(str(p))
    assert b is not a and b.getpixel((0, 0)) == (0, 255, 0) and a.getpixel((0, 0)) == (255, 0, 0)
    big = tmp_path / "b.png"
    Image.new("RGB", (loader.SMALL_IMAGE_PX + 1, 8)).save(big)
    assert loader.open_image(str(big)) is not loader.open_image(str(big))  # larger images are never kept
