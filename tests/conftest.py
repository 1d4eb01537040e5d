"""Test configuration: Triton kernels run in interpreter mode on the CPU; torch computes on one thread.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at collection time. One thread
(the toy runs' default, train.py's config key threads) makes every number independent of the machine's core
count, and the suite fast on shared cores; DAPT_TEST_THREADS=N overrides it.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import struct  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import clip as clip_module  # noqa: E402
import clip_load  # noqa: E402

torch.set_num_threads(int(os.environ.get("DAPT_TEST_THREADS", "1")))

# A small toy benchmark and a briefly pretrained toy CLIP, shared by every end-to-end test of the session.
# The real toy CLIP recipe (toy.TOY_PRETRAIN) takes minutes; tests only need a CLIP that runs through the
# same code paths, so the recipe is shortened here for the whole session (it is part of the cache key).
TEST_TOY_PRETRAIN = dict(steps=20, images=600, batch=64, warmup=5)
TEST_TOY_PER_CLASS = dict(train=16, val=4, test=6)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """<root> holding toy/ (16 train, 4 val, 6 test images per class) and toy_clip/toy_clip.pt."""
    import toy

    toy.TOY_PRETRAIN.update(TEST_TOY_PRETRAIN)
    root = str(tmp_path_factory.mktemp("toydata"))
    toy.make_toy(root, seed=0, per_class=TEST_TOY_PER_CLASS)
    toy.pretrain_toy_clip(root, quiet=True)
    return root


@pytest.fixture
def toy_copy(toy_root, tmp_path):
    """A private copy of the session's toy root (for tests that change or delete files in it)."""
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(toy_root, dst)
    return str(dst)


def clip_features(model):
    """(image, text) features of a CLIP on fixed inputs; token ids written by hand (<sot> a photo of a <eot>)."""
    import torch

    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=g)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :6] = torch.tensor([49406, 320, 1125, 539, 320, 49407])
    tokens[1, :4] = torch.tensor([49406, 2368, 1929, 49407])
    with torch.no_grad():
        return model.encode_image(images.to(model.dtype)).float(), model.encode_text(tokens).float()


def interrupt_at_epoch(monkeypatch, epoch):
    """Make train.py's epoch `epoch` raise KeyboardInterrupt (Ctrl-C); returns a function that undoes it."""
    import train

    real = train.train_one_epoch

    def interrupted(cfg, model, opt, scaler, loader, e, *a):
        if e == epoch:
            raise KeyboardInterrupt
        return real(cfg, model, opt, scaler, loader, e, *a)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    return lambda: monkeypatch.setattr(train, "train_one_epoch", real)


def cli_error(capsys, main, argv):
    """Run a command line's main(argv) that must fail with one clear line: returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


# A small random CLIP with OpenAI's names (real BPE vocabulary, 77 tokens), built through the project's CLIP class.
SMALL_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                    transformer_layers=2)


def random_clip(config=SMALL_CONFIG, seed=0):
    """A CLIP with OpenAI's initialisation drawn under a seed, without touching the global random state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = clip_module.CLIP(**config)
    return model.eval()


def save_safetensors(tensors, path, metadata=None):
    """Write name -> tensor as a .safetensors file (clip.read_safetensors and the safetensors package read it)."""
    codes = {v: k for k, v in clip_load.SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # keeps the data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for c in chunks:
            f.write(c)


# A random toy-shaped CLIP (2 layers per tower, 32 px, patch 8) and a batch with box foreground masks: the method
# tests check wiring (which tensors get gradients, masks, schedules), not accuracy.
TINY_TOY_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                       context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                       transformer_layers=2)
NAMES = ["red circle", "red square", "blue circle", "green cross"]


def make_clip(seed=0):
    return random_clip(TINY_TOY_CONFIG, seed=seed)


def toy_batch(B=4, seed=0, patch=8):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 32, 32, generator=g)
    m = torch.zeros(B, 1, 32, 32)
    for b in range(B):  # a box of foreground per image
        i, j = torch.randint(0, 16, (2,), generator=g).tolist()
        m[b, :, i:i + 14, j:j + 14] = 1
    return {"image": x, "label": torch.arange(B) % len(NAMES), "fg_mask": m,
            "fg_frac": F.avg_pool2d(m, patch).flatten(1)}


def grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def random_toy(tmp_path_factory):
    """(root holding a tiny toy benchmark: 4 train / 1 val / 2 test images per class, a random toy CLIP's path)."""
    import toy

    root = tmp_path_factory.mktemp("toydata")
    toy.make_toy(str(root), per_class={"train": 4, "val": 1, "test": 2})
    path = str(root / "random_toy_clip.pt")
    torch.save(make_clip().state_dict(), path)
    return str(root), path


def run_random_toy(random_toy, out, *args):
    """train.main on the random toy: base classes, 4 shots, no warm-up."""
    import train

    root, clip_path = random_toy
    return train.main(["--dataset", "toy", "--root", root, "--out", str(out), "--clip", clip_path, "--subsample",
                       "base", "--shots", "4", "--warmup-epochs", "0", "--log-every", "1000", *args])


def metrics_of(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(Benchmark of 4 classes x 3 random images, a random small CLIP, {train?: transform}) for the dapt-dist and
    DA-VPT units (prototypes, k-means, the block loop)."""
    import numpy as np
    from PIL import Image

    import data
    import loader

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
    tfs = {train: loader.build_transform(train, size=32) for train in (True, False)}
    return bench, random_clip(seed=0), tfs


def run_toy_b2n(root, out, method, *extra, epochs=5):
    """12 base classes x 2 shots = 24 images in one batch without augmentation: one full-batch step per epoch,
    so the epoch losses measure training, not the draw of crops (the test CLIP is only briefly pretrained)."""
    argv = ["--method", method, "--dataset", "toy", "--root", root, "--out", str(out), "--subsample", "base",
            "--shots", "2", "--epochs", str(epochs), "--batch", "24", "--rrc-scale", "1,1", "--rrc-ratio", "1,1",
            "--hflip", "0", *extra]
    import train

    return train.main(argv)


def b2n_run_dir(out, method):
    return os.path.join(str(out), "b2n", "toy", method, "shots2_seed1")
