"""Test configuration and the helpers the test files share (no test file imports another).

Triton kernels run in interpreter mode on the CPU: TRITON_INTERPRET must be set before anything imports triton, so
it is set here, at collection time, where torch sees no CUDA device (triton decides per process: where it sees one,
the kernels compile and tests/test_kernels.py runs them on CUDA tensors). Devices: every test runs on the CPU as on
a machine without a GPU (its goldens are float32 CPU numbers) except those marked `gpu` (tests/test_gpu_*.py:
skipped, saying so, without a GPU) or `any_device` (tests/test_kernels.py). Torch computes on one thread (the toy
runs' default, train.py's config key threads): every number is independent of the machine's core count, and the
suite is fast on shared cores; DAPT_TEST_THREADS=N overrides it.

Sections: the session's toy data; one small random CLIP and a toy batch for the unit tests; reference code for the
official initial draws; small datasets; toy runs (train.py's command line, the run it trains, the folder it writes).
"""
import os
import sys

import torch  # imports no triton

HAS_CUDA = torch.cuda.is_available()  # asked once, before a test hides the GPU (cpu_unless_marked)
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

import clip as clip_module  # noqa: E402
import clip_load  # noqa: E402
import data  # noqa: E402
import loader  # noqa: E402
import runs  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(int(os.environ.get("DAPT_TEST_THREADS", "1")))

# ----------------------------------------------------------------------------------------------------------
# devices: the CPU for every test, CUDA for the GPU tests where there is a GPU


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on CUDA (tests/test_gpu_*.py); skipped, saying so, without a GPU")
    config.addinivalue_line("markers", "any_device: runs the kernels where triton runs them (the interpreter on the "
                            "CPU, CUDA on a GPU machine); not pinned to the CPU")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="no CUDA device here: the GPU tests run on a GPU machine (python gpu_check.py)")
    for item in items:
        if not HAS_CUDA and item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked(request, monkeypatch):
    """On a GPU machine, every test not marked gpu / any_device runs as without a GPU: train.py, eval.py and
    sweep.py default to CUDA (bfloat16) where torch.cuda.is_available(), and the suite's goldens and tolerances are
    float32 CPU numbers. Child processes (torchrun, killed runs, sweep jobs) get CUDA_VISIBLE_DEVICES="" (this
    process has already counted its GPUs, HAS_CUDA, so the variable no longer changes what it sees)."""
    if HAS_CUDA and not any(request.node.get_closest_marker(m) for m in ("gpu", "any_device")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


# ----------------------------------------------------------------------------------------------------------
# the session's toy data

# A small toy benchmark shared by every end-to-end test of the session; its runs use the shipped toy CLIP
# (--clip toy: assets/toy_clip.safetensors).
TEST_TOY_PER_CLASS = dict(train=16, val=4, test=6)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """<root> holding toy/ (16 train, 4 val, 6 test images per class)."""
    root = str(tmp_path_factory.mktemp("toydata"))
    toy.make_toy(root, seed=0, per_class=TEST_TOY_PER_CLASS)
    return root


@pytest.fixture
def toy_copy(toy_root, tmp_path):
    """A private copy of the session's toy root (for tests that change or delete files in it)."""
    dst = tmp_path / "data"
    shutil.copytree(toy_root, dst)
    return str(dst)


# ----------------------------------------------------------------------------------------------------------
# one small random CLIP, and a toy batch for the method tests

# The one small CLIP of the tests: OpenAI's names (real BPE vocabulary, 77 tokens), toy-shaped (2 layers per tower,
# 32 px, patch 8, width 64), built through the project's CLIP class. Tests that need more layers derive from it:
# dict(SMALL_CONFIG, vision_layers=3, transformer_layers=3).
SMALL_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                    transformer_layers=2)
NAMES = ["red circle", "red square", "blue circle", "green cross"]


def random_clip(config=SMALL_CONFIG, seed=0):
    """A CLIP with OpenAI's initialisation drawn under a seed, without touching the global random state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = clip_module.CLIP(**config)
    return model.eval()


def make_clip(seed=0):
    """random_clip(SMALL_CONFIG, seed): the method tests check wiring (which tensors get gradients, masks,
    schedules), not accuracy."""
    return random_clip(SMALL_CONFIG, seed=seed)


def toy_batch(B=4, seed=0, patch=8):
    """A batch of B random 32 px images of the NAMES classes, each with a box of foreground as its mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 32, 32, generator=g)
    m = torch.zeros(B, 1, 32, 32)
    for b in range(B):  # a box of foreground per image
        i, j = torch.randint(0, 16, (2,), generator=g).tolist()
        m[b, :, i:i + 14, j:j + 14] = 1
    return {"image": x, "label": torch.arange(B) % len(NAMES), "fg_mask": m,
            "fg_frac": F.avg_pool2d(m, patch).flatten(1)}


def grads(model):
    """name -> a copy of the gradient (None if there is none) of every trainable parameter."""
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}


def perturbed(model, std=0.05, seed=0):
    """The model with every trainable tensor moved by N(0, std^2), so prompts are not at a special point."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))
    return model


def clip_features(model):
    """(image, text) features of a CLIP on fixed inputs; token ids written by hand (<sot> a photo of a <eot>)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=g)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :6] = torch.tensor([49406, 320, 1125, 539, 320, 49407])
    tokens[1, :4] = torch.tensor([49406, 2368, 1929, 49407])
    with torch.no_grad():
        return model.encode_image(images.to(model.dtype)).float(), model.encode_text(tokens).float()


# ----------------------------------------------------------------------------------------------------------
# reference code for the official initial draws (IVLP, PromptSRC, MMRL)


def official_clip_draws(c, vpt=None, image_deep=None, text_deep=None, after_proj=None):
    """Reference for dapt.clip_draws / replay: the official CLIP.__init__ order written with real modules
    (nn.MultiheadAttention, nn.Linear, nn.Embedding, the text tower's initialize_parameters), so the test does not
    share the counting of the code under test. The callables draw what a prompted copy keeps."""
    kept, Wv, Wt, E, p = [], c["vision_width"], c["transformer_width"], c["embed_dim"], c["vision_patch_size"]

    def blocks(W, L, heads, deep):
        for i in range(L):
            nn.MultiheadAttention(W, heads), nn.Linear(W, 4 * W), nn.Linear(4 * W, W)
            if deep is not None and deep(i) is not None:
                kept.append(deep(i)())

    nn.Conv2d(3, Wv, p, p, bias=False)
    if vpt is not None:
        kept.append(vpt())
    torch.randn(Wv), torch.randn((c["image_resolution"] // p) ** 2 + 1, Wv)
    blocks(Wv, c["vision_layers"], max(Wv // 64, 1), image_deep)
    torch.randn(Wv, E)
    if after_proj is not None:
        kept.append(after_proj())
    blocks(Wt, c["transformer_layers"], c["transformer_heads"], text_deep)
    emb = nn.Embedding(c["vocab_size"], Wt)
    nn.init.normal_(emb.weight, std=0.02), nn.init.normal_(torch.empty(c["context_length"], Wt), std=0.01)
    for _ in range(c["transformer_layers"]):
        for shape in ((3 * Wt, Wt), (Wt, Wt), (4 * Wt, Wt), (Wt, 4 * Wt)):
            nn.init.normal_(torch.empty(shape))
    nn.init.normal_(torch.empty(Wt, E))
    return kept


# ----------------------------------------------------------------------------------------------------------
# small datasets


@pytest.fixture(scope="module")
def random_toy(tmp_path_factory):
    """(root holding a tiny toy benchmark: 4 train / 1 val / 2 test images per class, a random toy CLIP's path)."""
    root = tmp_path_factory.mktemp("toydata")
    toy.make_toy(str(root), per_class={"train": 4, "val": 1, "test": 2})
    path = str(root / "random_toy_clip.pt")
    torch.save(make_clip().state_dict(), path)
    return str(root), path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(Benchmark of 4 classes x 3 random images, a random small CLIP, {train?: transform}) for the dapt-dist and
    DA-VPT units (prototypes, k-means, the block loop)."""
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
    tfs = {is_train: loader.build_transform(is_train, size=32) for is_train in (True, False)}
    return bench, random_clip(seed=0), tfs


FOLDERS = ["blue_square", "green_triangle", "red_circle", "yellow_cross"]  # the classes of make_folder_dataset


def make_folder_dataset(root, per_class=10, masks=True, parts=None, seed=0):
    """A tiny class-folder dataset of toy images (32 px) with white-on-black masks in DIR/mask/; parts: e.g.
    {"train": 6, "test": 4} for the sub-tree layout instead of one folder per class."""
    rng = np.random.Generator(np.random.PCG64(seed))
    layout = parts or {"": per_class}
    for folder in FOLDERS:
        label = toy.TOY_CLASSNAMES.index(folder.replace("_", " "))
        for part, n in layout.items():
            for i in range(n):
                rel = os.path.join(part, folder, f"img_{i:02d}.png")
                img, m = toy.toy_render(rng, label, toy.TOY_SCENES[i % len(toy.TOY_SCENES)])
                os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
                Image.fromarray(img).save(os.path.join(root, rel))
                if masks:
                    os.makedirs(os.path.dirname(os.path.join(root, "mask", rel)), exist_ok=True)
                    Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(root, "mask", rel))
    return str(root)


# ----------------------------------------------------------------------------------------------------------
# toy runs: train.py's command line, the run it trains, the folder it writes


def toy_argv(root, out, method, *extra, dataset="toy", subsample="base", shots=4, epochs=3):
    """train.py's command line for a run of `method` on `dataset` (the data root `root`; None leaves it out) into
    `out`; `extra` flags come last and win. epochs=None keeps the recipe's."""
    return ["--method", method, "--dataset", dataset, *(["--root", str(root)] if root is not None else []),
            "--out", str(out), "--subsample", subsample, "--shots", str(shots),
            *(["--epochs", str(epochs)] if epochs is not None else []), *extra]


def train_toy(root, out, method, *extra, **kw):
    """Train (and evaluate) the run toy_argv(root, out, method, *extra, **kw) with train.main; -> its result."""
    return train.main(toy_argv(root, out, method, *extra, **kw))


def train_random_toy(random_toy, out, method, *extra, **kw):
    """train_toy on the random_toy fixture: its random CLIP, no warm-up epoch, no step log lines."""
    root, clip_path = random_toy
    return train_toy(root, out, method, "--clip", clip_path, "--warmup-epochs", "0", "--log-every", "1000", *extra,
                     **kw)


# With shots=2: 12 base classes x 2 shots = 24 images in one batch without augmentation, one full-batch step per
# epoch, so the epoch losses measure training, not the draw of crops (the test CLIP is only briefly pretrained).
FULL_BATCH = ("--batch", "24", "--rrc-scale", "1,1", "--rrc-ratio", "1,1", "--hflip", "0")


def run_folder(out, method, *extra, **kw):
    """The folder the run train_toy(root, out, method, *extra, **kw) writes (the same arguments, no root):
    runs.run_dir_of on the config train.py resolves from that command line."""
    return runs.run_dir_of(str(out), train.parse_args(toy_argv(None, out, method, *extra, **kw)).cfg)


def metrics_of(folder):
    """The per-epoch records of a run folder's metrics.jsonl."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def epoch_losses(folder):
    """The training loss of each epoch of a run folder."""
    return [m["loss"] for m in metrics_of(folder)]


def interrupt_at_epoch(monkeypatch, epoch):
    """Make train.py's epoch `epoch` raise KeyboardInterrupt (Ctrl-C); returns a function that undoes it."""
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
