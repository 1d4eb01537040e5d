"""From benchmark items to batches: images, torchvision's transforms without torchvision, foreground masks, a
sampler and a loader whose draws are a pure function of (seed, epoch, sample index), and the features pass of a
method's `prepare`.

What is here (protocol.md section 5):
- `open_image`, and torchvision's RandomResizedCrop / flip / Resize / CenterCrop semantics written with Pillow +
  torch (`build_transform`), the same geometry applied to foreground masks (`Transform.pair`);
- foreground masks: where they live, their encoding (white on black or label images, detected or declared),
  binarisation;
- `build_loader`: the augmentation of sample i in epoch e uses a torch.Generator seeded from (seed, e, i) (blake2b),
  never a per-worker stream, so a run is reproducible for any number of worker processes; class-balanced batches;
  each process's part of a global batch under torchrun;
- `features_function`: what `PromptModel.prepare` calls to get features of the training images, cached on disk.

Deliberately left out: what a benchmark is (data.py), other augmentations than CoOp's, mask creation.
"""
import hashlib
import logging
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from clip import CLIP_MEAN, CLIP_STD
from data import (CorruptImageError, DataError, DataValueError, MissingImageError, MissingMaskError, by_class,
                  cache_dirs, first_per_class, sample_per_class, writable_cache)
from files import load_torch_file, save_torch

log = logging.getLogger("dapt")

# ----------------------------------------------------------------------------------------------------------
# images and transforms (protocol §5): torchvision's semantics with Pillow + torch


_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def rrc_params(width, height, scale, ratio, generator=None):
    """RandomResizedCrop box (top, left, h, w): the draws and their order are torchvision's get_params."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    return rrc_fallback(width, height, ratio)


def rrc_fallback(width, height, ratio):
    """Central crop clamped to the ratio range, after 10 rejected draws."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# Small images (the toy's 32 px) are decoded once per process and kept: decoding a PNG took a quarter of a toy
# training epoch. Keyed by path, size and mtime (a replaced file is read again); callers never modify the image
# (every transform returns a new one). Real datasets' images are larger and are never kept.
SMALL_IMAGE_PX, SMALL_IMAGE_CACHE_MAX = 64, 200_000


_SMALL_IMAGES = {}


def to_rgb(im):
    """A Pillow image of any mode -> the 8-bit RGB image a viewer shows. EXIF orientation is applied (a phone JPEG
    stands upright); 16-bit integer images (I;16*, and I, as Pillow opens 16-bit PNGs) are scaled from their 0..65535
    range to 0..255 (v / 257, rounded), float images (F) from [0, 1], or clipped to [0, 255] when values pass 1;
    alpha is dropped (as Dassl's read_image: the colour under it stays); palette, 1-bit, grey, CMYK and the rest go
    through Pillow's conversion."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I"):
        a = np.asarray(im).astype(np.float64) / 257.0
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        im = Image.fromarray(np.clip(np.round(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def open_image(path):
    """The image at `path` as 8-bit RGB (to_rgb: every mode Pillow opens, EXIF orientation applied)."""
    try:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns)
        hit = _SMALL_IMAGES.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        with Image.open(path) as im:
            small = max(im.size) <= SMALL_IMAGE_PX
            im = to_rgb(im)
        if small and len(_SMALL_IMAGES) < SMALL_IMAGE_CACHE_MAX:
            _SMALL_IMAGES[path] = (key, im)
        return im
    except FileNotFoundError:
        raise MissingImageError(f"image not found: {path}") from None
    except Exception as e:  # PIL raises several types for truncated / non-image files
        raise CorruptImageError(f"cannot read image {path} ({type(e).__name__}: {e}); replace or re-extract "
                                "the file, or remove it from the split") from None


class Transform:
    """PIL image -> normalised FloatTensor [3, size, size]; `pair` also maps a mask with the same geometry.

    train: RandomResizedCrop(size, scale, ratio, interpolation) -> horizontal flip (p = hflip);
    test: shorter side -> size (long side truncated) -> centre crop (top = round((H - size) / 2), ties to even);
    resize_only: aspect-distorting resize to size x size, no augmentation (the FVG-PT host quirk);
    then [0, 1] CHW float32 -> (x - mean) / std. Randomness comes from the generator given to the call, else
    the one given at construction, else torch's global generator."""

    def __init__(self, train, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic",
                 hflip=0.5, mean=CLIP_MEAN, std=CLIP_STD, resize_only=False, mask_interpolation="nearest",
                 generator=None):
        for k in (interpolation, mask_interpolation):
            if k not in _RESAMPLE:
                raise DataValueError(f"interpolation {k!r} not in {sorted(_RESAMPLE)}")
        self.train, self.size, self.scale, self.ratio = bool(train), int(size), tuple(scale), tuple(ratio)
        self.interpolation, self.hflip, self.resize_only = interpolation, float(hflip), bool(resize_only)
        self.mean, self.std, self.mask_interpolation = tuple(mean), tuple(std), mask_interpolation
        self.generator = generator
        self._mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]

    def constants(self):
        """Every preprocessing constant, for the run log (protocol §12.2)."""
        if self.resize_only:
            geometry = f"resize to {self.size}x{self.size} (aspect distorting), no augmentation"
        elif self.train:
            geometry = "RandomResizedCrop -> RandomHorizontalFlip"
        else:
            geometry = "resize shorter side (long side truncated) -> center crop (round half to even)"
        return dict(train=self.train, size=self.size, geometry=geometry, scale=list(self.scale),
                    ratio=list(self.ratio), interpolation=self.interpolation, hflip=self.hflip if self.train else 0.0,
                    mean=list(self.mean), std=list(self.std), resize_only=self.resize_only,
                    mask_interpolation=self.mask_interpolation, convert="RGB (loader.to_rgb: EXIF orientation, 16-bit "
                                                                          "and float images to 8 bits, alpha dropped)")

    def params(self, width, height, generator=None):
        """The geometric ops for an image of this size: [("crop", (left, top, right, bottom)), ("resize", (w, h)),
        ("flip",)] in order of application."""
        g = generator if generator is not None else self.generator
        S = self.size
        if self.resize_only:
            return [("resize", (S, S))]
        if self.train:
            i, j, h, w = rrc_params(width, height, self.scale, self.ratio, g)
            ops = [("crop", (j, i, j + w, i + h)), ("resize", (S, S))]
            if torch.rand(1, generator=g) < self.hflip:
                ops.append(("flip",))
            return ops
        short, long = min(width, height), max(width, height)
        new_long = int(S * long / short)
        nw, nh = (S, new_long) if width <= height else (new_long, S)
        top, left = int(round((nh - S) / 2.0)), int(round((nw - S) / 2.0))
        return [("resize", (nw, nh)), ("crop", (left, top, left + S, top + S))]

    @staticmethod
    def apply(img, ops, resample):
        for op in ops:
            if op[0] == "crop":
                img = img.crop(op[1])
            elif op[0] == "resize":
                img = img.resize(op[1], resample)
            else:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img

    def to_tensor(self, img):
        """uint8 HWC -> float [0, 1] CHW -> normalised (torchvision's to_tensor + normalize, float32)."""
        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return x.float().div(255).sub_(self._mean).div_(self._std)

    def __call__(self, img, generator=None):
        img = img if img.mode == "RGB" else img.convert("RGB")
        ops = self.params(img.width, img.height, generator)
        return self.to_tensor(self.apply(img, ops, _RESAMPLE[self.interpolation]))

    def pair(self, img, mask, generator=None, encoding="white"):
        """(image, mask image) -> (FloatTensor [3, S, S], FloatTensor [1, S, S] in {0, 1}) with one geometry.

        The mask becomes a uint8 score image (white: mean RGB rounded half up, label: channel 0 / palette index,
        official: the red channel of the RGB conversion), is resized to the image if needed and follows the image's
        crop / resize / flip, both with `mask_interpolation`, then is binarised (white: score/255 > 0.5; label and
        official: 1 <= score <= 254)."""
        img = img if img.mode == "RGB" else img.convert("RGB")
        score = mask_score(mask, encoding)
        if score.size != img.size:
            score = score.resize(img.size, _RESAMPLE[self.mask_interpolation])
        ops = self.params(img.width, img.height, generator)
        x = self.to_tensor(self.apply(img, ops, _RESAMPLE[self.interpolation]))
        s = np.asarray(self.apply(score, ops, _RESAMPLE[self.mask_interpolation]))
        return x, torch.from_numpy(binarise(s, encoding)).float()[None]


def build_transform(train, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic", hflip=0.5,
                    mean=CLIP_MEAN, std=CLIP_STD, resize_only=False, mask_interpolation="nearest", generator=None):
    """The CoOp train (random) or test (deterministic) transform; see Transform. The toy benchmark uses size=32."""
    return Transform(train, size, scale, ratio, interpolation, hflip, mean, std, resize_only, mask_interpolation,
                     generator)


# ----------------------------------------------------------------------------------------------------------
# foreground masks (protocol §5)


MASK_ENCODINGS = ("white", "label", "official")  # official = label read off the red channel (DAPT's loader)


MIN_BATCH_FOREGROUND = 1e-3  # a training batch whose masks cover less than this fraction of its pixels is an error


def mask_path(dataset_dir, image_path):
    """<dataset_dir>/mask/<image path relative to dataset_dir>; if absent, the same stem with .png."""
    rel = os.path.relpath(image_path, dataset_dir)
    p = os.path.join(dataset_dir, "mask", rel)
    if not os.path.isfile(p):
        png = os.path.splitext(p)[0] + ".png"
        if os.path.isfile(png):
            return png
    return p


def read_mask_encoding(dataset_dir):
    """The one-word `<dataset_dir>/mask/ENCODING` file, or None when there is none."""
    path = os.path.join(dataset_dir, "mask", "ENCODING")
    if os.path.isfile(path):
        with open(path) as f:
            enc = f.read().strip().lower()
        if enc not in MASK_ENCODINGS:
            raise DataValueError(f"{path} says {enc!r}; it must be one word out of {MASK_ENCODINGS}")
        return enc
    return None


def detect_mask_encoding(paths, n=32):
    """(encoding, reason) from the values in the first n mask files: a palette image -> label (the indices are
    labels); only 0 and 255 -> white (object white on black, which the label rule would read as EMPTY); otherwise
    label when more pixels hold small values 1..127 (class indices; 255 = void borders) than 255, else white
    (anti-aliased or JPEG white masks: grey values only along the edges)."""
    values, low, full = set(), 0, 0
    for p in paths[:n]:
        m = open_mask(p)
        if m.mode == "P":
            return "label", f"{p} is a palette image (indices are labels)"
        a = np.asarray(m.convert("RGB"))[..., 0] if m.mode not in ("L", "1", "I", "I;16") else np.asarray(m)
        values.update(np.unique(a).tolist())
        low, full = low + int(((a >= 1) & (a <= 127)).sum()), full + int((a == 255).sum())
    seen = f"values {sorted(values)[:8]}{' ...' if len(values) > 8 else ''} in {min(n, len(paths))} mask files"
    if values <= {0, 255}:
        return "white", seen
    return ("label" if low > full else "white"), seen


def resolve_mask_encoding(dataset_dir, paths, requested=""):
    """(encoding, how it was chosen): the requested one, else <dataset_dir>/mask/ENCODING, else detected from
    the files (detect_mask_encoding). The run records both."""
    if requested:
        if requested not in MASK_ENCODINGS:
            raise DataValueError(f"--mask-encoding {requested!r}: expected one of {MASK_ENCODINGS} (or '' to detect)")
        return requested, "--mask-encoding"
    enc = read_mask_encoding(dataset_dir)
    if enc:
        return enc, os.path.join(dataset_dir, "mask", "ENCODING")
    existing = [p for p in paths if os.path.isfile(p)]
    if not existing:
        return "white", "no mask file found (default)"
    enc, why = detect_mask_encoding(existing)
    log.info("mask encoding '%s' detected: %s", enc, why)
    return enc, f"detected: {why}"


def mask_score(mask, encoding):
    """Mask image -> uint8 'L' image whose binarisation gives the foreground."""
    if encoding == "white":
        rgb = np.asarray(mask.convert("RGB"), dtype=np.int32)
        return Image.fromarray(((2 * rgb.sum(-1) + 3) // 6).astype(np.uint8))  # round(mean RGB), half up
    if encoding == "label":
        a = np.asarray(mask)
        a = a[..., 0] if a.ndim == 3 else a
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if encoding == "official":  # DAPT's loader: convert("RGB"), red channel (a palette image gives its colours)
        return Image.fromarray(np.asarray(mask.convert("RGB"))[..., 0].copy())
    raise DataValueError(f"mask encoding must be one of {MASK_ENCODINGS}, got {encoding!r}")


def binarise(score, encoding):
    """uint8 score array -> float32 {0, 1}: white fg = v/255 > 0.5 (v >= 128); label / official fg = 1 <= v <= 254."""
    s = np.asarray(score)
    fg = (s >= 128) if encoding == "white" else ((s >= 1) & (s <= 254))
    return fg.astype(np.float32)


def open_mask(path):
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError:
        raise MissingMaskError(f"mask not found: {path}") from None
    except Exception as e:
        raise CorruptImageError(f"cannot read mask {path} ({type(e).__name__}: {e})") from None


def mask_size_mismatches(pairs):
    """[(mask path, mask (w, h), image (w, h))] of the (image path, mask path) pairs whose sizes differ (headers
    only). Such masks are resized to their image with nearest neighbour when loaded (Transform.pair)."""
    out = []
    for image, mask in pairs:
        try:
            with Image.open(mask) as m, Image.open(image) as im:
                if m.size != im.size:
                    out.append((mask, m.size, im.size))
        except Exception as e:  # PIL raises several types for truncated / non-image files
            raise CorruptImageError(f"cannot read the size of {image} or its mask {mask} ({type(e).__name__}: "
                                    f"{e})") from None
    return out


def check_mask_encoding(paths, encoding, n=32):
    """Warn if most of the first n masks have a foreground fraction outside [0.02, 0.98] (wrong encoding?)."""
    fracs = [float(binarise(mask_score(open_mask(p), encoding), encoding).mean()) for p in paths[:n]]
    bad = sum(not 0.02 <= f <= 0.98 for f in fracs)
    if fracs and bad > len(fracs) / 2:
        other = "label" if encoding == "white" else "white"
        log.warning("%d of the first %d masks have a foreground fraction outside [0.02, 0.98] under the '%s' "
                    "encoding: the masks may be '%s' encoded (write the word into mask/ENCODING)",
                    bad, len(fracs), encoding, other)
    return fracs


# ----------------------------------------------------------------------------------------------------------
# loading: per-sample generators from (seed, epoch, index), so augmentations do not depend on the worker count


def sample_seed(seed, epoch, index):
    """A 63-bit seed for one (run seed, epoch, sample index); index -1 seeds the epoch's permutation, -2 the worker
    processes' base seed (Loader)."""
    h = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class ImageDataset(torch.utils.data.Dataset):
    """items -> dicts {"image", "label", "index"[, "fg_mask"[, "fg_frac"]]}; keys are (index, epoch) pairs."""

    def __init__(self, items, transform, seed=1, masks=None, encoding="white", patch_size=None):
        self.items, self.transform, self.seed = items, transform, seed
        self.masks, self.encoding, self.patch_size = masks, encoding, patch_size  # masks: paths (None = all ones)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label, _ = self.items[index]
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        img = open_image(path)
        out = {"label": torch.tensor(label, dtype=torch.long), "index": torch.tensor(index, dtype=torch.long)}
        if self.masks is None:
            out["image"] = self.transform(img, generator=g)
            return out
        mp = self.masks[index]
        mask = open_mask(mp) if mp is not None else Image.new("L", img.size, 255)
        out["image"], m = self.transform.pair(img, mask, generator=g,
                                              encoding=self.encoding if mp is not None else "white")
        out["fg_mask"] = m
        if self.patch_size:
            p = self.patch_size
            out["fg_frac"] = F.avg_pool2d(m[None], p).flatten()  # [(S/p)^2], row-major like ViT patches
        return out


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch): a fresh seeded permutation per epoch when shuffling, in order otherwise.

    per_class k > 0 (class-balanced, DA-VPT's released recipe): each class's shuffled indices are cut into chunks
    of k, the chunks are shuffled, and the epoch is their concatenation, so a batch of B holds about B / k classes
    with k images each; every sample is still used once per epoch.
    shard (rank, world) under torchrun: every process draws the same epoch order; in training each global batch
    of `batch` samples is cut into `world` contiguous parts and process `rank` takes its part (so the processes'
    batches together are the single process's batch; a last batch with fewer samples than processes is dropped,
    so that every process takes the same number of steps); in evaluation process `rank` takes every world-th
    sample."""

    def __init__(self, n, shuffle, seed, labels=None, per_class=0, shard=(0, 1), batch=1):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.labels, self.per_class, self.shard, self.batch = labels, per_class, shard, batch

    def __len__(self):
        return len(self.indices())

    def __iter__(self):
        return iter(self.indices())

    def indices(self):
        """This process's (index, epoch) pairs of the epoch, in order."""
        order, (rank, world) = self.order(), self.shard
        if world == 1:
            return order
        if not self.shuffle:
            return order[rank::world]
        mine = []
        for j in range(0, len(order), self.batch):
            chunk = order[j:j + self.batch]
            if len(chunk) < world:
                break
            q, r = divmod(len(chunk), world)
            start = rank * q + min(rank, r)
            mine += chunk[start:start + q + (rank < r)]
        return mine

    def order(self):
        """The whole epoch's (index, epoch) pairs: what a single process iterates."""
        e = self.epoch
        if not self.shuffle:
            return [(i, e) for i in range(self.n)]
        g = torch.Generator().manual_seed(sample_seed(self.seed, e, -1))
        if not self.per_class:
            return [(int(i), e) for i in torch.randperm(self.n, generator=g)]
        groups = {y: [i for i, _ in pairs] for y, pairs in by_class(list(enumerate(self.labels))).items()}
        chunks, rest = [], []
        for y in sorted(groups):
            idx = [groups[y][int(j)] for j in torch.randperm(len(groups[y]), generator=g)]
            k = len(idx) - len(idx) % self.per_class
            chunks += [idx[j:j + self.per_class] for j in range(0, k, self.per_class)]
            rest += idx[k:]  # a class's leftover images go last, so the full chunks stay aligned with batches
        order = [i for c in torch.randperm(len(chunks), generator=g) for i in chunks[int(c)]]
        return [(i, e) for i in order + [rest[int(j)] for j in torch.randperm(len(rest), generator=g)]]


class Loader(torch.utils.data.DataLoader):
    """A DataLoader with set_epoch(e); without it, each iter() advances the epoch by one. The generator that seeds
    the worker processes is reset from (seed, epoch) too, so an epoch is the same whether the run resumed or not."""

    def set_epoch(self, epoch):
        self._epoch = int(epoch)

    check_foreground = False

    def __iter__(self):
        self.sampler.epoch = self._epoch  # read when iteration starts; fixed until the next iter()
        if self.generator is not None:
            self.generator.manual_seed(sample_seed(self.sampler.seed, self._epoch, -2))
        self._epoch += 1
        batches = self.one_line_errors(super().__iter__()) if self.num_workers else super().__iter__()
        return self.foreground_checked(batches) if self.check_foreground else batches

    @staticmethod
    def one_line_errors(batches):
        """A data error in a worker process arrives wrapped in the worker's traceback (torch's ExceptionWrapper); it is
        raised again here as its own one-line message (a corrupt image names the file)."""
        try:
            yield from batches
        except DataError as e:
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            if len(lines) > 1 and "Traceback" in str(e):
                raise type(e)(lines[-1].split(": ", 1)[-1]) from None
            raise

    def foreground_checked(self, batches):
        """Training batches with masks: a batch whose foreground is (nearly) empty is an error naming its files
        (a wrong mask encoding reads every mask as empty; training on it would silently learn nothing)."""
        for batch in batches:
            frac = float(batch["fg_mask"].mean())
            if frac < MIN_BATCH_FOREGROUND:
                files = [self.dataset.masks[int(i)] for i in batch["index"][:3]]
                raise MissingMaskError(
                    f"the foreground masks of a training batch cover {frac:.3%} of its pixels, read as "
                    f"'{self.dataset.encoding}' masks (e.g. {', '.join(map(str, files))}): the masks are empty or "
                    f"their encoding is wrong. Check the files, or pass --mask-encoding white (object white on "
                    f"black) or label (object values 1..254)")
            yield batch


def _worker_init(worker_id):
    s = torch.initial_seed() % 2**32  # stray randomness in workers (not the augmentations) is seeded too
    random.seed(s)
    np.random.seed(s)


def build_loader(items, transform, batch_size, train, workers=0, seed=1, masks=False, dataset_dir=None,
                 mask_encoding=None, allow_missing_masks=False, patch_size=None, dassl_drop_last=False,
                 pin_memory=None, class_balanced=0, shard=(0, 1)):
    """A reproducible DataLoader over Benchmark items.

    Sample i of epoch e is transformed with a torch.Generator seeded by (seed, e, i), and epoch e's order is a
    permutation seeded by (seed, e): a run is reproducible for any `workers`. Every sample is used each epoch
    (last partial batch kept) unless dassl_drop_last (Dassl: drop_last when len(items) >= batch_size).
    masks=True pairs each image with <dataset_dir>/mask/<rel path> (mask_path); a missing mask is an error
    naming it, unless allow_missing_masks (all-ones mask, counted and logged). patch_size p adds fg_frac.
    class_balanced k > 0: training batches hold k images per class (EpochSampler). shard (rank, world): this
    process's part under torchrun (EpochSampler); a training batch_size is the global batch, each process loads
    batch_size / world of it."""
    rank, world = shard
    if train and batch_size % world:
        raise DataValueError(f"--batch {batch_size} is not a multiple of the {world} processes: the global batch is "
                             "split evenly across them (pick a batch that the process count divides)")
    encoding, mpaths = None, None
    if masks:
        if dataset_dir is None:
            raise DataValueError("masks=True needs dataset_dir (Benchmark.meta['dataset_dir'])")
        mpaths = [mask_path(dataset_dir, p) for p, _, _ in items]
        encoding, _ = resolve_mask_encoding(dataset_dir, mpaths, mask_encoding or "")
        missing = [m for m in mpaths if not os.path.isfile(m)]
        if missing and not allow_missing_masks:
            raise MissingMaskError(
                f"{len(missing)} of {len(mpaths)} foreground masks are missing, e.g. {missing[0]}\nMasks live at "
                f"<dataset>/mask/<image path relative to the dataset folder> (same name, or same stem with .png); "
                "see protocol §5 to convert released mask sets, or pass --allow-missing-masks true to use all-ones "
                "masks")
        if missing:
            log.warning("%d of %d masks missing: all-ones masks used for them (--allow-missing-masks true)",
                        len(missing), len(mpaths))
            mpaths = [m if os.path.isfile(m) else None for m in mpaths]
        check_mask_encoding([m for m in mpaths if m is not None], encoding)
        wrong = mask_size_mismatches([(p, m) for (p, _, _), m in zip(items, mpaths) if m is not None])
        if wrong:
            m0, ms, ims = wrong[0]
            log.warning("%d of %d masks differ in size from their image (e.g. %s: %dx%d, image %dx%d): each is resized "
                        "to its image with nearest neighbour; python datatools.py check lists them", len(wrong),
                        len(mpaths), m0, *ms, *ims)
    if patch_size and transform.size % patch_size:
        raise DataValueError(f"image size {transform.size} is not a multiple of patch size {patch_size}")
    ds = ImageDataset(items, transform, seed, mpaths, encoding, patch_size if masks else None)
    drop_last = bool(train and dassl_drop_last and len(items) >= batch_size)
    sampler = EpochSampler(len(items), bool(train), seed, [y for _, y, _ in items], class_balanced, shard, batch_size)
    loader = Loader(ds, batch_size=batch_size // world if train else batch_size, sampler=sampler,
                    num_workers=workers, drop_last=drop_last, worker_init_fn=_worker_init,
                    pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                    generator=torch.Generator().manual_seed(seed))
    loader._epoch = 0
    loader.check_foreground = bool(masks and train)
    tail = len(items) % batch_size
    dropped = tail if drop_last or (train and tail < world) else 0
    loader.samples_per_epoch = len(items) - dropped  # every process together
    if world > 1 and train and tail and tail < world and not drop_last:
        log.warning("%d processes: the last batch of %d sample(s) is dropped each epoch (fewer than the processes)",
                    world, tail)
    loader.masks_missing = sum(m is None for m in mpaths) if mpaths is not None else 0
    if drop_last and len(items) % batch_size:
        log.warning("dassl_drop_last: %d of %d samples dropped each epoch", len(items) % batch_size, len(items))
    return loader


# ----------------------------------------------------------------------------------------------------------
# features of the training images, for a method's one-off set-up (PromptModel.prepare)


@torch.no_grad()
def image_features(fn, items, transform, seed, device, batch=100, epoch=0):
    """fn(images) -> [N, D] features of Benchmark items in order (float32, on the CPU); a training transform draws its
    augmentation from the generator seeded by (seed, epoch, index), as the training loader does."""
    loader = build_loader(items, transform, batch, train=False, seed=seed, pin_memory=False)
    loader.set_epoch(epoch)
    return torch.cat([fn(b["image"].to(device)).float().cpu() for b in loader])


def features_function(bench, transforms, seed, device):
    """The `features` a method's prepare receives (prompting.PromptModel.prepare): features(fn, view="train",
    per_class=0, sampling="first", cache=None) -> (features [N, D] float32 on the CPU, labels [N]) of bench's training
    images under transforms[view] ({"train": ..., "test": ...}), each drawn as in epoch 0 with the run seed. With
    `cache` (a name that identifies fn's weights) the result is kept in the dataset's cache folder
    (data.cache_dirs) as features_<cache>_<view>_shot_K-seed_S-<subsample>.pt, which records the items, the transform
    constants, the seed and the sampling; a file that records anything else is made again. Read with
    weights_only=True (data only)."""
    def features(fn, view="train", per_class=0, sampling="first", cache=None):
        items = bench.train
        if per_class:
            if sampling not in ("first", "official"):
                raise DataValueError(f"per-class sampling {sampling!r}: expected first or official")
            items = (first_per_class(items, per_class) if sampling == "first"
                     else sample_per_class(items, per_class, seed))
        labels = torch.tensor([y for _, y, _ in items])
        tf = transforms[view]
        if not cache:
            return image_features(fn, items, tf, seed, device), labels
        m = bench.meta
        name = f"features_{cache}_{view}_shot_{m['shots']}-seed_{m['seed']}-{m['subsample']}.pt"
        folders, write_to = cache_dirs(m["dataset_dir"])
        record = dict(items=[(os.path.relpath(p, m["dataset_dir"]), int(y)) for p, y, _ in items], seed=seed,
                      transform=tf.constants(), view=view, per_class=per_class, sampling=sampling, fn=cache)
        for path in [os.path.join(d, name) for d in folders if os.path.exists(os.path.join(d, name))]:
            cached = load_torch_file(path, expected="a feature cache of train.py (delete it to make it again)")
            if isinstance(cached, dict) and cached.get("record") == record:
                log.info("features: loaded %s", path)
                return cached["features"], labels
            log.info("features: %s was made with other items / transform / seed: making it again", path)
        feats = image_features(fn, items, tf, seed, device)
        path = os.path.join(writable_cache(write_to, m["dataset_dir"]), name)
        os.makedirs(write_to, exist_ok=True)
        save_torch(dict(features=feats, record=record), path)
        log.info("features: %d images (%s view), cached at %s%s", len(items), view, path,
                 "" if write_to == folders[0] else " (the dataset folder cannot be written)")
        return feats, labels
    return features
