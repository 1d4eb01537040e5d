"""Kernel benchmark: each Triton kernel against its PyTorch reference measured in the same run.

    python -m kernels.bench [--device cuda|cpu] [--small]
    python -m kernels.bench --report [--out bench-report] [--budget 360]   # the one-shot GPU report, <= 6 minutes

Attention (forward + backward) at ViT-B/16 shapes: batch 3 views x 32 images, 12 heads, length 197 + {2, 8, 16}
prompts, head dim 64, bfloat16, under two key masks: DAPT's token views (per image the full view, its foreground
view and its background view; the foreground is the toy benchmark's object mask, a centred object cropped and
scaled to cover 25-60 % of the 14 x 14 patches, `dapt_view_masks`) and the half-hidden mask (7 of the 14 patch
rows hidden, top or bottom). CLS and prompts are always visible. Each table says the share of 64-key blocks the
kernel skips. Compared: the eager reference (kernels.attention_reference), SDPA with a boolean mask,
FlexAttention with a block mask built from the key mask (torch.compile'd at the first length only: it compiles
per length; skipped with a note where unavailable), and the Triton kernel. Losses (forward + backward): batch
32 / 256, 100 / 1000 classes, dim 512, float32 features; reference = the loss's `*_reference`
(kernels/losses.py). Train steps of coop / maple / dapt / ivlp / promptsrc / mmrl against the full-length eager
reference.

Columns: median time of one forward + backward (CUDA events on the GPU, perf_counter on the CPU), ratio to the
reference of the same table, peak memory above what the inputs hold (torch.cuda.max_memory_allocated; n/a on
the CPU). On the CPU (--small, the default without CUDA) the shapes are cut down and Triton is not timed: there it
runs in the interpreter, which is a correctness tool, not a speed measure.
--report first checks every kernel against its reference on the device (forward and gradients, odd lengths,
masked and causal, bfloat16 / float16, float32 in one small case; the timing tables are not run if a check
fails), then runs the tables within a hard budget (--budget seconds from the start, default 360: a row starts
only when the time it may take is left, and a table whose time is up says what it skipped), and rewrites
<out>/bench-<date>-<device>.md (a dated block to paste into BENCHMARKS.md) and .json (every row) after every
table, so a crash or a kill keeps what was measured. Deliberately left out: autotuning sweeps, plots.
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections import namedtuple

import numpy as np
import torch
import torch.nn.functional as F

try:
    import triton
    from triton.testing import do_bench  # CUDA timing (the interpreter has no timer)
except ImportError:  # pragma: no cover
    triton = do_bench = None

import clip as clip_module
import dapt
import kernels
import recipes
import toy
from kernels.attention import attention_reference, visible_key_blocks


Table = namedtuple("Table", "title header rows")


class Budget:
    """The report's clock: `seconds` from its start (math.inf outside --report). A row starts only when at least
    the time it may take is left (`allows(need)`); what did not start is named in its table."""
    clock = staticmethod(time.monotonic)

    def __init__(self, seconds=math.inf):
        self.seconds, self.t0 = seconds, self.clock()

    def elapsed(self):
        return self.clock() - self.t0

    def left(self):
        return self.seconds - self.elapsed()

    def allows(self, need=5.0):
        return self.left() >= need

    def note(self):
        return f"skipped: the {self.seconds:g} s budget is spent ({self.elapsed():.0f} s in)"


class Report(list):
    """The tables so far. With a writer (--report), every table appended rewrites the Markdown and JSON files."""

    def __init__(self, write=None):
        super().__init__()
        self.write, self.paths = write, None

    def append(self, table):
        super().append(table)
        if self.write is not None:
            self.paths = self.write(self)


def emit(tables, title, header, rows):
    """Print a table now (progress on a long run) and keep it for the report (which writes its files)."""
    print(fmt_table(title, header, rows), flush=True)
    tables.append(Table(title, header, rows))
    return tables


def markdown(table):
    """A Table as a Markdown section."""
    rows = [table.header, ["---"] * len(table.header)] + table.rows
    return "\n".join([f"### {table.title}", ""] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def fmt_table(title, header, rows):
    """A plain aligned text table (first and last columns left-aligned, numbers right-aligned)."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([f"\n## {title}", line(header), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def measure(fn, device, reps):
    """(median milliseconds, peak MiB above the memory in use before the call or None on the CPU). On CUDA the
    time is triton.testing.do_bench's (CUDA events, L2 cache flushed between calls, `reps` times ~ 4 ms budget);
    on the CPU the median of `reps` perf_counter timings after one warm-up call."""
    fn()  # warm-up: compilation, autotuning caches, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return do_bench(fn, warmup=max(reps, 5), rep=4 * max(reps, 5), return_mode="median"), peak
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None


def run_rows(candidates, device, reps, ref_name, budget=None, need=None):
    """candidates: name -> fn (or a string: a note printed instead of a time). The ratio is to ref_name. A row
    starts only where `budget` allows `need[name]` seconds (default 5; a first compile needs more)."""
    budget, need = budget or Budget(), need or {}
    results = {}
    for name, fn in candidates.items():
        if isinstance(fn, str):
            results[name] = fn
            continue
        if not budget.allows(need.get(name, 5.0)):
            results[name] = budget.note()
            continue
        try:
            results[name] = measure(fn, device, reps)
        except Exception as e:  # an unavailable backend is a note in the table, not a crash
            results[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    ref_ms = results[ref_name][0] if isinstance(results[ref_name], tuple) else None
    rows = []
    for name, r in results.items():
        if isinstance(r, str):
            rows.append([name, "-", "-", "-", r])
        else:
            ms, peak = r
            ratio = "-" if ref_ms is None else f"{ref_ms / ms:.2f}x"
            rows.append([name, f"{ms:.3f}", ratio, "n/a" if peak is None else f"{peak:.1f}", ""])
    return rows


def _flex(key_mask, B, L, device):
    """FlexAttention with a block mask from key_mask, compiled; or a string saying why it is unavailable."""
    if device.type != "cuda":
        return "skipped: FlexAttention needs torch.compile, timed on CUDA only"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return f"skipped: torch.nn.attention.flex_attention unavailable ({e})"
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: key_mask[b, kv_idx], B, None, L, L, device=device)
    flex = torch.compile(flex_attention)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def dapt_view_masks(n_images, n_prompts, grid=14, seed=0):
    """DAPT's token views of `n_images` images as key masks bool [3 n_images, 1 + grid^2 + n_prompts]: per image the
    full view (everything visible), the foreground view and the background view (dapt.views_key_mask: CLS and
    prompts visible, a patch in the foreground when half of it is object). The objects are the toy benchmark's
    masks (toy.toy_render: a shape near the centre spanning 16-24 of 32 px), cropped to the central 24 px and
    scaled to the patch grid, kept where the foreground covers 25-60 % of the patches (as a real foreground
    does) -> (masks, foreground fractions [n_images])."""
    rng = np.random.Generator(np.random.PCG64(seed))
    fracs = []
    while len(fracs) < n_images:
        _, m = toy.toy_render(rng, len(fracs) % len(toy.TOY_CLASSNAMES), toy.TOY_SCENES[len(fracs) % 12])
        crop = torch.tensor(m[4:28, 4:28], dtype=torch.float32)[None, None]
        frac = F.interpolate(crop, size=(grid, grid), mode="area").flatten(1)  # [1, grid^2]
        if 0.25 <= (frac >= 0.5).float().mean().item() <= 0.60:
            fracs.append(frac)
    fg, bg = dapt.views_key_mask(torch.cat(fracs))  # [n, 1 + grid^2] each
    full = torch.ones_like(fg)
    masks = F.pad(torch.cat([full, fg, bg]), (0, n_prompts), value=True)
    return masks, fg[:, 1:].float().mean(1)


def half_hidden_masks(B, n_prompts, grid=14):
    """The half-hidden key mask bool [B, 1 + grid^2 + n_prompts]: 7 of the 14 patch rows hidden, the top half of
    even sequences and the bottom half of odd ones."""
    key_mask = torch.ones(B, 1 + grid * grid + n_prompts, dtype=torch.bool)
    patches = key_mask[:, 1:1 + grid * grid].view(B, grid, grid)  # raster order of the patch grid
    patches[0::2, :grid // 2] = False
    patches[1::2, grid // 2:] = False
    return key_mask


def bench_attention(device, small, reps, tables, budget=None):
    budget = budget or Budget()
    B, H, D = (6, 2, 64) if small else (96, 12, 64)  # 3 views x 32 images on the GPU
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    left = [(n, kind) for n in (2, 8, 16) for kind in ("DAPT token views", "half hidden")]
    while left:
        if not budget.allows(10):
            emit(tables, "attention fwd+bwd: the rest", ["shape", "note"], [[f"L=197+{n}, {kind}", budget.note()]
                                                                           for n, kind in left])
            return tables
        n_prompts, kind = left.pop(0)
        L = 197 + n_prompts
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, L, D, device=device, dtype=dtype)
        if kind == "half hidden":
            key_mask, what = half_hidden_masks(B, n_prompts).to(device), "7 of 14 patch rows hidden"
        else:
            key_mask, fg = dapt_view_masks(B // 3, n_prompts)
            key_mask = key_mask.to(device)
            what = f"full + foreground ({fg.min():.0%}-{fg.max():.0%} of the patches) + background views"
        mask4 = key_mask[:, None, None, :]
        first = n_prompts == 2
        impls = {
            "torch eager (reference)": lambda q, k, v: attention_reference(q, k, v, key_mask),
            "sdpa + bool mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask4),
            "flex_attention + block mask": _flex(key_mask, B, L, device) if first or device.type != "cuda" else
            "not timed: FlexAttention compiles per length (20-40 s each); timed at L=197+2",
            "triton masked_attention": (lambda q, k, v: kernels.masked_attention(q, k, v, key_mask, backend="triton"))
            if device.type == "cuda" else "not timed on CPU: the Triton interpreter is not a speed measure",
        }
        if device.type == "cuda":
            impls["triton, no mask (dense)"] = lambda q, k, v: kernels.masked_attention(q, k, v, backend="triton")

        def fwd_bwd(f):
            return lambda: torch.autograd.grad(f(q, k, v), (q, k, v), do)

        cands = {name: f if isinstance(f, str) else fwd_bwd(f) for name, f in impls.items()}
        _, cum = visible_key_blocks(key_mask, 64)
        skipped = 1 - cum[:, -1].float().mean().item() / (cum.shape[1] - 1)
        title = (f"attention fwd+bwd: B={B} H={H} L=197+{n_prompts} D={D} {str(dtype)[6:]}, {kind}: {what} "
                 f"({skipped:.1%} of 64-key blocks skipped), {device.type}")
        rows = run_rows(cands, device, reps, "torch eager (reference)", budget, {"flex_attention + block mask": 60})
        emit(tables, title, ["impl", "ms", "vs ref", "peak MiB", "note"], rows)
    return tables


def bench_losses(device, small, reps, tables, budget=None):
    budget = budget or Budget()
    on_gpu = device.type == "cuda"
    shapes = [(32, 100), (256, 1000)] if not small else [(32, 100)]
    D = 512
    for i, (Bn, C) in enumerate(shapes):
        if not budget.allows(10):
            emit(tables, "losses fwd+bwd: the rest", ["shape", "note"],
                 [[f"batch {b}, {c} classes", budget.note()] for b, c in shapes[i:]])
            return tables
        torch.manual_seed(0)
        feats = lambda n: F.normalize(torch.randn(n, D, device=device), dim=-1).requires_grad_()  # noqa: E731
        labels = torch.randint(0, C, (Bn,), device=device)
        cases = {
            "pull_push_loss": ([feats(Bn), feats(Bn), feats(Bn)], ()),
            "inter_dispersion_loss": ([feats(C)], ()),
            "intra_dispersion_loss": ([feats(Bn), feats(C)], (labels,)),
            "proxy_anchor_loss": ([feats(Bn), feats(C)], (labels,)),
        }
        rows = []
        for name, (inputs, extra) in cases.items():
            def step(f, inputs=inputs, extra=extra):
                return lambda: torch.autograd.grad(f(*inputs, *extra), inputs)

            fn = getattr(kernels, name)
            cands = {"torch eager (reference)": step(lambda *a, fn=fn: fn(*a, backend="torch")),
                     "triton": step(lambda *a, fn=fn: fn(*a, backend="triton")) if on_gpu else
                     "not timed on CPU (interpreter)"}
            for r in run_rows(cands, device, reps, "torch eager (reference)", budget):
                rows.append([f"{name}: {r[0]}"] + r[1:])
        title = f"losses fwd+bwd: batch {Bn}, {C} classes / proxies, dim {D}, float32, {device.type}"
        emit(tables, title, ["loss: impl", "ms", "vs ref", "peak MiB", "note"], rows)
    return tables


# 100 Caltech101 class names (CoOp split order), realistic name lengths for the text-side benchmark
CALTECH101 = (
    "face leopard motorbike accordion airplane anchor ant barrel bass beaver binocular bonsai brain brontosaurus "
    "buddha butterfly camera cannon car_side ceiling_fan cellphone chair chandelier cougar_body cougar_face crab "
    "crayfish crocodile crocodile_head cup dalmatian dollar_bill dolphin dragonfly electric_guitar elephant emu "
    "euphonium ewer ferry flamingo flamingo_head garfield gerenuk gramophone grand_piano hawksbill headphone "
    "hedgehog helicopter ibis inline_skate joshua_tree kangaroo ketch lamp laptop llama lobster lotus mandolin "
    "mayfly menorah metronome minaret nautilus octopus okapi pagoda panda pigeon pizza platypus pyramid revolver "
    "rhino rooster saxophone schooner scissors scorpion sea_horse snoopy soccer_ball stapler starfish stegosaurus "
    "stop_sign strawberry sunflower tick trilobite umbrella watch water_lilly wheelchair wild_cat windsor_chair "
    "wrench yin_yang").split()


def bench_text_side(device, small, reps, tables, budget=None):
    """CoOp's text side (16 shared context vectors, 100 classes), forward + backward into the context, at
    ViT-B/16 text-tower width (512, 8 heads; 12 layers, 2 with --small: the ratios are per token):
    the full 77 positions, cut at the last end-of-text token, and cut + the shared prefix run once."""
    budget = budget or Budget()
    assert len(CALTECH101) == 100
    if not budget.allows(10):
        return emit(tables, "CoOp text side", ["table", "note"], [["text side, 100 classes", budget.note()]])
    cfg = dict(clip_module.VIT_B16_CONFIG, vision_layers=1, vision_width=64, transformer_layers=2 if small else 12)
    torch.manual_seed(0)
    model = clip_module.CLIP(**cfg).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    prompts = dapt.TextPrompts(model, CALTECH101, n_ctx=16)
    ctx = torch.randn(16, 512, device=device, requires_grad=True)

    def step(cut, prefix):
        def fn():
            x, eot = prompts(ctx)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                z = model.encode_text_embeddings(x, eot, cut=cut, prefix_len=prompts.prefix_len if prefix else 0)
            z.float().square().sum().backward()
        return fn

    ref = "full 77 positions (reference)"
    candidates = {ref: step(False, False), "cut at last EOT": step(True, False),
                  "cut + shared prefix": step(True, True)}
    L = prompts.eot_range[1] + 1
    title = (f"CoOp text side, 100 classes, 16 context, {cfg['transformer_layers']} layers x 512, {device.type} "
             f"(forward + backward; longest sequence {L} positions, shared prefix {prompts.prefix_len})")
    return emit(tables, title, ["text side", "ms", "vs ref", "peak MiB", "note"],
                run_rows(candidates, device, reps, ref, budget))


def bench_train_step(device, small, reps, tables, budget=None,
                     methods=("coop", "maple", "dapt", "ivlp", "promptsrc", "mmrl")):
    """One optimizer step (forward, backward, SGD) of each method on random weights: images/s and peak memory.

    Full size: ViT-B/16 (random weights, bfloat16 on the GPU), 100 classes, batch 32 (dapt: 3 x 32 views).
    --small: a 4-layer, 256-wide CLIP on 64 px images, batch 8. Rows per method: the reference (eager attention,
    full-length text, dapt's three dense pixel-view passes) against SDPA / the Triton kernels + exact savings
    (and dapt's token-level views with the masked-attention kernel, which skips hidden patch blocks)."""
    budget = budget or Budget()
    if small:
        cfg_clip = dict(clip_module.VIT_B16_CONFIG, image_resolution=64, vision_layers=4, vision_width=256,
                        transformer_layers=4, transformer_width=256, transformer_heads=4, embed_dim=256)
        batch = 8
    else:
        cfg_clip, batch = clip_module.VIT_B16_CONFIG, 32
    torch.manual_seed(0)
    clip = clip_module.CLIP(**cfg_clip).to(device)
    if device.type == "cuda":
        clip = clip.to(torch.bfloat16)
    R, p = cfg_clip["image_resolution"], cfg_clip["vision_patch_size"]
    fg = torch.zeros(batch, 1, R, R, device=device)
    fg[:, :, R // 4: 3 * R // 4, R // 4: 3 * R // 4] = 1  # a centred object: a quarter of the area
    data_batch = dict(image=torch.randn(batch, 3, R, R, device=device), label=torch.arange(batch, device=device) % 100,
                      fg_mask=fg, fg_frac=F.avg_pool2d(fg, p).flatten(1))
    backends = ["eager", "sdpa"] + (["triton"] if device.type == "cuda" else [])
    methods = [m for m in methods if m in dapt.METHODS]
    for i, method in enumerate(methods):
        if not budget.allows(20):
            emit(tables, "train step: the rest", ["method", "note"], [[m, budget.note()] for m in methods[i:]])
            return tables
        variants = {f"{method}: eager attention, full-length text (reference)": dict(attn="eager", text_savings=False)}
        for b in backends[1:]:
            variants[f"{method}: {b} + exact text savings"] = dict(attn=b, text_savings=True)
        if method == "dapt":
            for b in backends[1:]:
                variants[f"{method}: {b} + savings, token-level views (not equivalent)"] = dict(
                    attn=b, text_savings=True, decouple="token")
        cands = {}
        for name, extra in variants.items():
            cfg = recipes.resolve_config(method, "caltech101", dict(subsample="base"))
            cfg.update(extra)
            if method == "mmrl" and small:  # the last 2 of the 4 blocks (6-12 of 12 at full size)
                cfg["rep_layers"] = (-2, -1)
            model = dapt.build_model(method, clip, CALTECH101, cfg).to(device)
            clip.set_attention(cfg["attn"])
            params = [q for q in model.parameters() if q.requires_grad]
            opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

            def step(model=model, opt=opt, attn=cfg["attn"]):
                clip.set_attention(attn)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss, _ = model.loss(data_batch, 0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            cands[name] = step
        ref = next(iter(cands))
        rows = []
        for r in run_rows(cands, device, reps, ref, budget, {n: 15 for n in cands}):
            ips = "-" if r[1] == "-" else f"{batch / (float(r[1]) / 1000):.1f}"
            rows.append([r[0], r[1], ips, r[2], r[3], r[4]])
        title = (f"train step, {method}, batch {batch}, {'small CLIP' if small else 'ViT-B/16'} random weights, "
                 f"100 classes, {device.type}")
        emit(tables, title, ["variant", "ms/step", "images/s", "vs ref", "peak MiB", "note"], rows)
    return tables


def check_kernels(device, small=False):
    """Every kernel against its reference on `device`: forward and gradients, odd lengths, masked and causal, in
    bfloat16 and float16; float32 attention in one small case (its full-precision kernels are the slow ones to
    compile, and the dispatcher sends float32 to SDPA). Returns a Table whose last column is PASS / FAIL
    (tolerances: float32 2e-4, bfloat16 3e-2, float16 5e-3, relative to the reference's largest value). small:
    tiny shapes (the CPU interpreter)."""
    tol = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    rows = []

    def compare(name, dtype, ref_fn, fn, inputs, grad_out):
        inputs = [x.detach().to(dtype).requires_grad_() for x in inputs]
        ref = ref_fn(*inputs)
        ref_grads = torch.autograd.grad(ref, inputs, grad_out.to(ref.dtype) if grad_out is not None else None)
        got = fn(*inputs)
        got_grads = torch.autograd.grad(got, inputs, grad_out.to(got.dtype) if grad_out is not None else None)
        err = [((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
               for a, b in zip((got, *got_grads), (ref, *ref_grads))]
        ok = max(err) <= tol[dtype]
        rows.append([name, str(dtype)[6:], f"{err[0]:.2e}", f"{max(err[1:]):.2e}", f"{tol[dtype]:.0e}",
                     "PASS" if ok else "FAIL"])

    B, H, D = (2, 1, 16) if small else (3, 4, 64)
    half = ((17 + 2, False), (13, True)) if small else ((197 + 2, False), (197 + 16, False), (77, True), (53, True))
    for dtype, lengths, masks in ((torch.bfloat16, half, (False, True)), (torch.float16, half, (False, True)),
                                  (torch.float32, ((13 if small else 53, True),), (True,))):
        for L, causal in lengths:
            q, k, v, do = (rand(B, H, L, D) for _ in range(4))
            mask = torch.rand(B, L, generator=g).to(device) < 0.5
            mask[:, 0] = True  # CLS always visible, as in the models
            for km in (mask if m else None for m in masks):
                name = f"masked_attention L={L}{' causal' if causal else ''}{' key mask' if km is not None else ''}"
                compare(name, dtype, lambda q, k, v: attention_reference(q, k, v, km, causal=causal),
                        lambda q, k, v: kernels.masked_attention(q, k, v, km, causal=causal, backend="triton"),
                        [q, k, v], do)
    for B, C in ((5, 7),) if small else ((33, 101), (256, 1000)):
        f = lambda n: F.normalize(rand(n, 32 if small else 512), dim=-1)  # noqa: E731
        labels = torch.randint(0, C, (B,), generator=g).to(device)
        cases = {"pull_push_loss": [f(B), f(B), f(B)], "inter_dispersion_loss": [f(C)],
                 "intra_dispersion_loss": [f(B), f(C)], "proxy_anchor_loss": [f(B), f(C)]}
        for name, inputs in cases.items():
            fn, extra = getattr(kernels, name), ((labels,) if len(inputs) == 2 else ())
            compare(f"{name} B={B} C={C}", torch.float32, lambda *x: fn(*x, *extra, backend="torch"),
                    lambda *x: fn(*x, *extra, backend="triton"), inputs, None)
    return Table(f"kernels against their references on {device.type} (forward, gradients)",
                 ["kernel", "dtype", "forward rel err", "gradient rel err", "tolerance", "check"], rows)


def environment(device):
    v = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(device) if device.type == "cuda"
             else platform.processor() or "cpu", torch=torch.__version__, cuda=torch.version.cuda,
             python=platform.python_version())
    v["triton"] = triton.__version__ if triton is not None else None
    return v


def write_report(tables, env, out, command, seconds=None):
    """<out>/bench-<date>-<device>.md (a dated block for BENCHMARKS.md) and .json; returns the two paths. Written
    to a temporary file and renamed, so a kill while writing leaves the previous complete files."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"bench-{env['date']}-{''.join(c if c.isalnum() else '-' for c in env['device'])}")
    took = "" if seconds is None else f" {seconds:.0f} s so far."
    lines = [f"## {env['device']}, {env['date']}", "",
             f"`{command}`: torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, Python {env['python']}. "
             f"Ratios are to the reference of the same table, measured in the same run.{took}", ""]
    for t in tables:
        lines += [markdown(t), ""]
    for path, text in ((stem + ".md", "\n".join(lines)),
                       (stem + ".json", json.dumps(dict(environment=env, command=command, seconds=seconds,
                                                        tables=[t._asdict() for t in tables]), indent=1))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return stem + ".md", stem + ".json"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="small shapes (the default on the CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on CUDA, 3 on the CPU)")
    p.add_argument("--report", action="store_true", help="check every kernel on the device first, then run every "
                   "table within --budget seconds, writing a Markdown block + JSON to --out after each table")
    p.add_argument("--out", default="bench-report", help="where --report writes (default bench-report)")
    p.add_argument("--budget", type=float, default=360, help="--report: seconds from the start (default 360); a row "
                   "starts only when the time it may take is left, the rest is listed as skipped")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernels/bench.py: --device cuda but torch sees no CUDA device; use --device cpu")
    device = torch.device(args.device)
    small = args.small or device.type == "cpu"
    reps = args.reps or (20 if device.type == "cuda" else 3)
    env = environment(device)
    print(f"# kernels.bench on {env['device']}, torch {env['torch']}, {'small' if small else 'full'} shapes, "
          f"median of {reps}")
    if device.type == "cpu":
        print("# Triton is not timed on the CPU: there it runs in the interpreter (a correctness tool, not a "
              "speed measure). Ratios are to the eager reference of the same table.")
    budget = Budget(args.budget if args.report else math.inf)
    command = "python -m kernels.bench --report" + (" --small" if args.small else "")
    tables = Report(lambda t: write_report(t, env, args.out, command, budget.elapsed()) if args.report else None)
    if args.report:
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            check = check_kernels(device, small)
            emit(tables, check.title, check.header, check.rows)
            if any(r[-1] != "PASS" for r in check.rows):
                print("# a kernel failed its check: the timing tables are not run", flush=True)
                return tables, tables.paths
        else:
            emit(tables, "kernels against their references", ["kernel", "check"],
                 [["all", "skipped: on the CPU the kernels run only under TRITON_INTERPRET=1 (tests/test_kernels.py)"]])
    for bench in (bench_attention, bench_losses, bench_text_side, bench_train_step):
        bench(device, small, reps, tables, budget)
    if not args.report:
        return tables
    print(f"# wrote {tables.paths[0]} and {tables.paths[1]} ({budget.elapsed():.0f} s)")
    return tables, tables.paths


if __name__ == "__main__":
    main()
