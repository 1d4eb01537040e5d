"""Test configuration: Triton kernels run in interpreter mode on the CPU.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, at collection time.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

# A small toy benchmark and a briefly pretrained toy CLIP, shared by every end-to-end test of the session.
# The real toy CLIP recipe (train.TOY_PRETRAIN) takes minutes; tests only need a CLIP that runs through the
# same code paths, so the recipe is shortened here for the whole session (it is part of the cache key).
TEST_TOY_PRETRAIN = dict(steps=20, images=600, batch=64, warmup=5)
TEST_TOY_PER_CLASS = dict(train=16, val=4, test=6)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """<root> holding toy/ (16 train, 4 val, 6 test images per class) and toy_clip/toy_clip.pt."""
    import data
    import train

    train.TOY_PRETRAIN.update(TEST_TOY_PRETRAIN)
    root = str(tmp_path_factory.mktemp("toydata"))
    data.make_toy(root, seed=0, per_class=TEST_TOY_PER_CLASS)
    train.pretrain_toy_clip(root, quiet=True)
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
