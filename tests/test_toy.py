"""The toy benchmark v2 (docs/toy.md): scenes, tinted domain, the two test splits, versioned caches; the shipped toy
CLIP (its sha256 checked, its pretraining reproducible and leaving the global random state alone)."""
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import datatools
import files
import train
import toy

SMALL = {"train": 3, "val": 2, "test": 2, "test_corr": 2}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_toy_caption():
    assert toy.toy_caption("red circle") == "a photo of a red circle."  # the benchmark's own template
    assert toy.toy_caption("red circle", 0, "grass", True) == "a tinted photo of a red circle on grass."
    assert toy.toy_caption(None, 1, "sky") == "a sky scene."
    captions = {toy.toy_caption(c, k, s, t) for c in toy.TOY_CLASSNAMES for k in range(len(toy.TOY_CAPTION_TEMPLATES))
                for s in (None,) + toy.TOY_SCENES for t in (False, True)}
    assert len(captions) == len(toy.TOY_CLASSNAMES) * len(toy.TOY_CAPTION_TEMPLATES) * (len(toy.TOY_SCENES) + 1) * 2


def test_tint_is_a_hue_rotation():
    grey = np.full((2, 3), 117.0)
    np.testing.assert_allclose(toy.toy_tint(grey), grey, atol=1e-9)  # grey stays grey
    c = np.array([[200.0, 60.0, 60.0]])
    np.testing.assert_allclose(np.linalg.norm(toy.toy_tint(c) - 117), np.linalg.norm(c - 117), rtol=0.2)
    np.testing.assert_allclose(toy.toy_tint(toy.toy_tint(c, 30), -30), c, atol=1e-9)
    assert toy.toy_tint(c)[0, 1] > c[0, 1]  # red turns towards yellow


def test_toy_pretrain_images():
    x, y, s, t = toy.toy_pretrain_images(400, seed=5)
    assert x.dtype == np.uint8 and x.shape == (400, 32, 32, 3) and y.dtype == s.dtype == np.int64 and t.dtype == bool
    assert set(y.tolist()) == set(range(-1, len(toy.TOY_CLASSNAMES))) and set(s.tolist()) == set(range(-1, len(toy.TOY_SCENES)))
    assert 0.04 < (y < 0).mean() < 0.17 and 0.04 < (s < 0).mean() < 0.17 and 0.3 < t.mean() < 0.5  # TOY_PRETRAIN_MIX
    assert not ((y < 0) & (s < 0)).any()  # a scene alone always has a scene
    x2, y2, s2, t2 = toy.toy_pretrain_images(400, seed=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and np.array_equal(s, s2) and np.array_equal(t, t2)
    assert not np.array_equal(x, toy.toy_pretrain_images(400, seed=6)[0])


def test_toy_splits_scenes_and_masks(tmp_path):
    d = toy.make_toy(tmp_path, per_class={"train": 20, "val": 10, "test": 20, "test_corr": 20})
    split = json.load(open(os.path.join(d, "split_toy.json")))
    meta = json.load(open(os.path.join(d, "toy_meta.json")))
    assert meta["version"] == toy.TOY_VERSION == toy.toy_version(d)
    C, half = len(toy.TOY_CLASSNAMES), len(toy.TOY_CLASSNAMES) // 2
    assert {k: len(v) for k, v in split.items()} == {"train": 20 * C, "val": 10 * C, "test": 20 * C, "test_corr": 20 * C}
    prefer, scene = meta["preferred_scene"], meta["scene"]
    for part in (list(prefer.values())[:half], list(prefer.values())[half:]):  # base, new: every scene used, evenly
        counts = [part.count(t) for t in toy.TOY_SCENES]
        assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    rate = {k: np.mean([scene[p] == prefer[c] for p, _, c in v]) for k, v in split.items()}
    assert 0.85 < rate["train"] < 0.95 and 0.82 < rate["val"] < 0.97 and 0.85 < rate["test_corr"] < 0.95
    assert abs(rate["test"] - 1 / len(toy.TOY_SCENES)) < 0.05  # independent of the class
    assert all(len(set(scene[p] for p, y, _ in split["test"] if y == k)) >= 6 for k in range(C))
    # masks cover exactly the object, whose colour is the tinted class colour (jitter 20 per channel)
    tinted = {c: toy.toy_tint(np.array(v, float)) for c, v in toy.TOY_COLOURS.items()}
    for p, y, c in split["train"][::37] + split["test_corr"][::41]:
        a = np.asarray(Image.open(os.path.join(d, "images", p))).astype(float)
        m = np.asarray(Image.open(os.path.join(d, "mask", "images", p))) > 127
        assert 0.03 < m.mean() < 0.6
        assert np.linalg.norm(a[m] - tinted[c.split()[0]], axis=-1).max() <= 36


def test_toy_deterministic(tmp_path):
    a = toy.make_toy(tmp_path / "a", seed=3, per_class=SMALL)
    b = toy.make_toy(tmp_path / "b", seed=3, per_class=SMALL)
    c = toy.make_toy(tmp_path / "c", seed=4, per_class=SMALL)
    read = lambda d, r: open(os.path.join(d, r), "rb").read()  # noqa: E731
    assert read(a, "split_toy.json") == read(b, "split_toy.json")
    rel = "images/red_circle/test_corr_001.png"
    assert read(a, rel) == read(b, rel) and read(a, rel) != read(c, rel)
    assert not any(n.startswith("toy.tmp") for n in os.listdir(tmp_path / "a"))


def test_ensure_toy_regenerates_an_old_version(tmp_path, monkeypatch, caplog):
    real = toy.make_toy
    monkeypatch.setattr(toy, "make_toy", lambda root: real(root, per_class=SMALL))
    d = toy.ensure_toy(tmp_path)
    assert toy.toy_version(d) == toy.TOY_VERSION
    stamp = os.stat(os.path.join(d, "split_toy.json")).st_mtime_ns
    assert toy.ensure_toy(tmp_path) == d and os.stat(os.path.join(d, "split_toy.json")).st_mtime_ns == stamp
    meta = json.load(open(os.path.join(d, "toy_meta.json")))
    json.dump(dict(meta, version=toy.TOY_VERSION - 1), open(os.path.join(d, "toy_meta.json"), "w"))
    os.remove(os.path.join(d, "images", "red_circle", "train_000.png"))  # old data: must not survive
    toy.ensure_toy(tmp_path)
    assert "regenerating" in caplog.text and toy.toy_version(d) == toy.TOY_VERSION
    assert os.path.isfile(os.path.join(d, "images", "red_circle", "train_000.png"))
    os.remove(os.path.join(d, "toy_meta.json"))  # a v1 folder had no version in it
    toy.ensure_toy(tmp_path)
    assert toy.toy_version(d) == toy.TOY_VERSION


def test_caption_table_attributes():
    tokens, attrs = toy.toy_caption_table()
    C, S, K = len(toy.TOY_CLASSNAMES), len(toy.TOY_SCENES), len(toy.TOY_CAPTION_TEMPLATES)
    assert tokens.shape == (2 * K * (C + 1) * (S + 1), 77)
    row = lambda t, k, y, s: ((t * K + k) * (C + 1) + y + 1) * (S + 1) + s + 1  # noqa: E731
    import dapt
    assert torch.equal(tokens[row(1, 0, 0, 0)], dapt.tokenize(["a tinted photo of a red circle on grass."])[0])
    assert torch.equal(tokens[row(0, 0, 9, -1)], dapt.tokenize([f"a photo of a {toy.TOY_CLASSNAMES[9]}."])[0])
    assert attrs[row(1, 2, -1, 3)].tolist() == [-1, 3, 1]


def test_pretraining_leaves_global_rng_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setitem(toy.TOY_PRETRAIN, "images", 200)
    monkeypatch.setitem(toy.TOY_PRETRAIN, "batch", 16)
    monkeypatch.setitem(toy.TOY_PRETRAIN, "warmup", 2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = toy.pretrain_toy_clip(str(tmp_path / "a.safetensors"), steps=3, quiet=True)
    assert torch.equal(torch.get_rng_state(), before)  # set-up work never consumes the run's random state
    b = toy.pretrain_toy_clip(str(tmp_path / "b.safetensors"), steps=3, quiet=True)
    assert files.sha256_file(a) == files.sha256_file(b)  # deterministic, to the bit
    meta = json.load(open(str(tmp_path / "a.json")))
    assert meta["recipe"]["toy_version"] == toy.TOY_VERSION and meta["sha256"] == files.sha256_file(a)
    assert set(meta["zero_shot_accuracy"]) == {"plain", "tinted_plain_prompt", "tinted", "scene"}
    # an old toy version in the recipe: pretrained again
    json.dump(dict(meta, recipe=dict(meta["recipe"], toy_version=toy.TOY_VERSION - 1)), open(tmp_path / "a.json", "w"))
    stamp = os.stat(a).st_mtime_ns
    toy.pretrain_toy_clip(a, steps=3, quiet=True)
    assert os.stat(a).st_mtime_ns != stamp
    assert json.load(open(tmp_path / "a.json"))["recipe"]["toy_version"] == toy.TOY_VERSION


def test_first_run_on_a_fresh_root_equals_a_warm_run(tmp_path, monkeypatch):
    """Generating the toy inside a run must not move the run's random state: the first run on a fresh root and the
    same run on the warm root give bit-identical results."""
    real = toy.make_toy
    monkeypatch.setattr(toy, "make_toy", lambda root: real(root, per_class=SMALL))
    args = ["--method", "coop", "--dataset", "toy", "--root", str(tmp_path / "data"), "--subsample", "base",
            "--shots", "2", "--epochs", "1", "--batch", "4", "--lr", "0.05", "--ctx-init", ""]  # random context
    (tmp_path / "data").mkdir()  # an existing root (a missing one other than DATA is refused)
    fresh = train.main(args + ["--out", str(tmp_path / "a")])
    warm = train.main(args + ["--out", str(tmp_path / "b")])
    assert fresh["accuracy"] == warm["accuracy"] and fresh["checkpoint_sha256"] == warm["checkpoint_sha256"]


def test_load_benchmark_rebuilds_an_old_toy_and_reads_test_corr(tmp_path, monkeypatch, caplog):
    """load_benchmark("toy") goes through ensure_toy (an old TOY_VERSION is rebuilt, not read), and the split
    file's "test_corr" list becomes Benchmark.extra_tests, relabelled with base / new like the test split."""
    real = toy.make_toy
    monkeypatch.setattr(toy, "make_toy", lambda root: real(root, per_class=SMALL))
    d = toy.ensure_toy(tmp_path)
    meta = json.load(open(os.path.join(d, "toy_meta.json")))
    json.dump(dict(meta, version=toy.TOY_VERSION - 1), open(os.path.join(d, "toy_meta.json"), "w"))
    b = data.load_benchmark("toy", tmp_path, shots=0, subsample="new")
    assert "regenerating" in caplog.text and toy.toy_version(d) == toy.TOY_VERSION
    corr = b.extra_tests["test_corr"]
    assert len(corr) == 12 * SMALL["test_corr"] and b.meta["counts"]["test_corr"] == len(corr)
    assert sorted({y for _, y, _ in corr}) == list(range(12))  # new classes relabelled from 0, as the test split
    assert {c.replace("_", " ") for _, _, c in corr} == set(b.classnames) == set(toy.TOY_CLASSNAMES[12:])
    assert all(os.path.isabs(p) and os.path.isfile(p) for p, _, _ in corr)
    assert set(data.load_benchmark("toy", tmp_path, shots=0).extra_tests) == {"test_corr"}


def test_a_further_test_split_must_be_a_list(tmp_path):
    path = tmp_path / "split.json"
    json.dump({"train": [], "val": [], "test": [["a.png", 0, "a"]], "test_x": {"a.png": 0}}, open(path, "w"))
    with pytest.raises(data.SplitFileError, match=r"\(test_x\): expected a list of \[rel_path, label, classname\]"):
        data.read_split_json(str(path))
    json.dump({"train": [], "val": [], "test": [], "test_x": [["b.png", 1, "b"]], "notes": "kept out"}, open(path, "w"))
    assert data.read_split_json(str(path))["test_x"] == [("b.png", 1, "b")] and "notes" not in data.read_split_json(str(path))


def test_the_shipped_toy_clip_is_checked_before_it_is_used(tmp_path, monkeypatch):
    record = toy.toy_clip_record()
    assert toy.toy_clip() == toy.TOY_CLIP and files.sha256_file(toy.TOY_CLIP) == record["sha256"]
    assert record["recipe"] == json.loads(json.dumps(toy.toy_recipe()))  # made with this code's recipe
    tampered = tmp_path / "toy_clip.safetensors"
    raw = bytearray(open(toy.TOY_CLIP, "rb").read())
    raw[-1] ^= 1  # one bit of one weight
    tampered.write_bytes(raw)
    monkeypatch.setattr(toy, "TOY_CLIP", str(tampered))
    with pytest.raises(files.CheckpointError, match=f"has sha256 .*, the shipped toy CLIP has {record['sha256']}"):
        toy.toy_clip()
    monkeypatch.setattr(toy, "TOY_CLIP", str(tmp_path / "gone.safetensors"))
    with pytest.raises(files.CheckpointError, match="is missing: restore it"):
        toy.toy_clip()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the recorded digest is of x86 AVX2 kernels")
def test_pretraining_again_follows_the_shipped_toy_clips_trajectory():
    """The shipped toy CLIP is pretrain_toy_clip(TOY_PRETRAIN) at one thread (datatools.py toy-clip checks the whole
    file, about 5 minutes); here its first 100 steps, with torch's AVX2 CPU kernels (another set of kernels rounds
    otherwise), give the weights whose sha256 assets/toy_clip.json records."""
    code = ("import sys, torch; sys.path.insert(0, %r); import toy; torch.set_num_threads(1); "
            "print(toy.toy_clip_digest(100))" % REPO)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == toy.toy_clip_record()["digests_after_100_steps"]["AVX2"]


def test_toy_check_compares_with_the_published_toy(tmp_path, capsys):
    toy.make_toy(str(tmp_path), per_class=dict(train=2, val=1, test=1))  # not the published size
    assert datatools.main(["toy", "--root", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "split_toy.json: sha256" in out and "differs from the published" in out and "= the shipped toy CLIP" in out
