"""The Triton kernels compiled ahead of time for the GPUs users have, without a GPU: every kernel configuration the
dispatchers pick at the shapes the models use, for sm_80 (A100; its code runs on the sm_86 / sm_89 consumer
cards) and sm_90 (H100 / H200), with shared memory checked against each architecture's limit, registers against
the SM's 64K and zero spills in half precision (ptxas's report); and the launch grids of a 100-class CoCoOp text
pass checked against CUDA's grid limits.

How: triton compiles without a GPU when its active driver is replaced by a stand-in that reports the target
(`StandIn`) and a kernel is launched with warmup=True (compile, no launch). Launches are intercepted, not
rewritten (`launches`): the real autograd functions of kernels/attention.py and kernels/losses.py run on meta
tensors (shapes and dtypes, no memory), their device-dependent choices (`attention._config`, `_compute_dtypes`,
`losses._prec`) made as for CUDA tensors, and each launch is compiled (or only recorded) instead of run. ptxas
(shipped with triton) reads each kernel's PTX again with -v for registers and spills. TRITON_INTERPRET=1 (the
suite's CPU mode) makes triton.jit interpret everything, triton's own library included, so the compilation runs
in a child process without it: `python tests/test_gpu_compile.py ARCH` prints one JSON line per kernel.
Left out: timing and numerics (tests/test_gpu_kernels.py, on a GPU), sm_100 (Blackwell).

The configurations, chosen to keep the suite's time (53 kernels per architecture: 60-90 s cold with both
architectures in parallel on 2 cores shared with another job, about 20 s once triton's cache holds them): bfloat16
at ViT-B/16 (12 heads x 197 + 2 tokens, with and without a key mask), ViT-L/14 (16 heads x 257 + 16, key mask; a
head count divisible by 16 specialises apart), the text tower (8 heads, 77 tokens causal; cut at 22 tokens, one key
block; the shared-prefix pass, 5 queries over 22 keys) and the toy CLIP (1 head, 17 + 2 tokens with a key mask; 9
text tokens), all at head dim 64 (every CLIP here); float16 at ViT-B/16 with a key mask and the 77-token text
(float16 compiles as bfloat16 does); one float32 case, ViT-B/16 with a key mask in full precision, and its TF32
twin (what auto picks where torch allows TF32); the four losses in float32, the pull-push and the dispersions also
in bfloat16 (as autocast hands them over). Shapes that specialise alike compile once. Triton 3.6 and 3.9 both
pass (the GPU image's and this project's).
"""
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import attention as attn  # noqa: E402
from kernels import losses  # noqa: E402

# Largest shared memory one block may use (bytes, opt-in), per compute capability: the CUDA C programming guide's
# table. sm_80 code also runs on sm_86 / sm_89 (RTX 30xx / 40xx), which allow 99 KB: half precision must fit there.
SHARED_LIMIT = {80: 166912, 86: 101376, 90: 232448}
REGISTERS_PER_SM = 65536
GRID_LIMIT = (2**31 - 1, 65535, 65535)  # CUDA's grid limits, axes 0, 1, 2
LAUNCHED = {attn: ("_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq"),
            losses: ("_pull_push_fwd", "_pull_push_bwd", "_inter_fwd", "_inter_bwd", "_intra_fwd", "_intra_bwd",
                     "_proxy_fwd", "_proxy_bwd")}  # the kernels launched from Python (the others are device functions)
HALF = (torch.bfloat16, torch.float16)
SHAPES = {  # what: (B, H, Lq, Lk, causal, key_mask), head dim 64
    "ViT-B/16 token view": (2, 12, 199, 199, False, True),
    "ViT-B/16 dense": (2, 12, 199, 199, False, False),
    "ViT-L/14 token view": (2, 16, 273, 273, False, True),
    "text, 77 tokens": (2, 8, 77, 77, True, False),
    "text, cut": (2, 8, 22, 22, True, False),
    "text, shared prefix": (2, 8, 5, 22, True, False),
    "toy token view": (2, 1, 19, 19, False, True),
    "toy text": (2, 1, 9, 9, True, False),
}
FP16 = ("ViT-B/16 token view", "text, 77 tokens")  # float16 compiles as bfloat16 does: the two main shapes


class StandIn:
    """The driver triton asks for the target, device and stream while it compiles: a GPU of compute capability
    `arch` (warp size 32). Its device key keeps these kernels apart from a real GPU's in triton's in-memory cache."""

    def __init__(self, arch):
        self.arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return f"aot-sm{self.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def launches(arch=None):
    """Within the block the kernels choose as for CUDA tensors, and every kernel launch is recorded as (kernel name,
    grid, compiled kernel or None) instead of run: compiled for compute capability `arch` (warmup) when given."""
    cuda = torch.device("cuda")
    saved = dict(config=attn._config, dtypes=attn._compute_dtypes, prec=losses._prec)
    attn._config = lambda d, dtype, device: saved["config"](d, dtype, cuda)
    attn._compute_dtypes = lambda dtype, device: saved["dtypes"](dtype, cuda)
    losses._prec = lambda device: saved["prec"](cuda)
    kernels = [getattr(m, name) for m, names in LAUNCHED.items() for name in names]
    seen = []
    for kernel in kernels:  # an instance attribute: kernel[grid](...) launches through self.run
        def run(*args, grid, warmup, kernel=kernel, **kwargs):
            compiled = None if arch is None else type(kernel).run(kernel, *args, grid=grid, warmup=True, **kwargs)
            seen.append((kernel.fn.__name__, tuple(grid), compiled))
        kernel.run = run
    if arch is not None:
        from triton.runtime import driver
        driver.set_active(StandIn(arch))
    try:
        yield seen
    finally:
        attn._config, attn._compute_dtypes, losses._prec = saved["config"], saved["dtypes"], saved["prec"]
        for kernel in kernels:
            del kernel.run
        if arch is not None:
            driver.set_active(None)  # unset: the next use finds the machine's own driver, as before


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)


def attention_pass(B, H, Lq, Lk, dtype, causal=False, key_mask=False, D=64):
    """Forward + backward of triton_attention on meta tensors laid out as clip.Attention.qkv hands them over (views
    of one [B, L, 3, H, D] projection; the shared-prefix pass concatenates the keys, so there k and v are
    contiguous)."""
    q = meta(B, Lq, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4)[0]
    if Lq == Lk:
        k, v = meta(B, Lk, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4)[1:]
    else:
        k, v = meta(B, H, Lk, D, dtype=dtype), meta(B, H, Lk, D, dtype=dtype)
    mask = torch.ones(B, Lk, dtype=torch.bool, device="meta") if key_mask else None
    o = attn.triton_attention(q, k, v, mask, causal=causal)
    torch.autograd.grad(o, (q, k, v), torch.empty_like(o), allow_unused=True)


def loss_passes(dtype, B=32, C=100, D=512):
    """Forward + backward of each loss's autograd function on meta tensors (the dispatchers' wrappers only check
    and normalise; proxy-anchor hands float32 over whatever it is given)."""
    labels = torch.empty(B, dtype=torch.int64, device="meta")
    out = [losses._PullPush.apply(meta(B, D, dtype=dtype), meta(B, D, dtype=dtype), meta(B, D, dtype=dtype), 1.5),
           losses._InterDispersion.apply(meta(C, D, dtype=dtype), 2.0),
           losses._IntraDispersion.apply(meta(B, D, dtype=dtype), meta(C, D, dtype=dtype), labels)]
    if dtype == torch.float32:
        out += list(losses._ProxyAnchor.apply(meta(B, D), meta(C, D), labels, 32.0, 0.1, 1.0))
    torch.autograd.backward([t.sum() for t in out])


def ptxas_report(compiled, arch):
    """(registers, spill store bytes, spill load bytes) of a compiled kernel: the ptxas triton uses, with -v."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                              os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out).groups())
    return regs, stores, loads


def tf32(fn):
    """fn run where torch allows TF32 (torch.set_float32_matmul_precision("high")): float32 takes the TF32 tiles."""
    def run():
        torch.set_float32_matmul_precision("high")
        try:
            fn()
        finally:
            torch.set_float32_matmul_precision("highest")
    return run


def compile_all(arch):
    """Every configuration above compiled for `arch`: one dict per distinct compiled kernel (the first shape that
    needed it)."""
    rows, done = [], set()
    with launches(arch) as seen:
        cases = [(name, dtype, lambda s=shape, dt=dtype: attention_pass(*s[:4], dt, *s[4:]))
                 for dtype in HALF for name, shape in SHAPES.items() if dtype == torch.bfloat16 or name in FP16]
        vit_b = lambda: attention_pass(2, 12, 199, 199, torch.float32, key_mask=True)  # noqa: E731
        cases += [("ViT-B/16 token view", torch.float32, vit_b), ("ViT-B/16, TF32", torch.float32, tf32(vit_b))]
        cases += [("losses", dtype, lambda dt=dtype: loss_passes(dt)) for dtype in (torch.float32, torch.bfloat16)]
        for what, dtype, fn in cases:
            del seen[:]
            fn()
            for name, grid, compiled in seen:
                if id(compiled) in done:  # the same specialisation: compiled once
                    continue
                done.add(id(compiled))
                regs, stores, loads = ptxas_report(compiled, arch)
                meta_ = compiled.metadata
                rows.append(dict(arch=arch, kernel=name, dtype=str(dtype)[6:], shape=what, shared=meta_.shared,
                                 warps=meta_.num_warps, stages=meta_.num_stages, registers=regs, spill_stores=stores,
                                 spill_loads=loads))
    return rows


def problems(rows):
    """What breaks a limit, one line each: shared memory over the architecture's (half-precision attention also over
    the 99 KB of sm_86 / sm_89), registers x threads over 64K, any spill in half precision."""
    out = []
    for r in rows:
        line = (f"sm_{r['arch']} {r['kernel']} {r['dtype']} {r['shape']}: shared {r['shared']} B, {r['registers']} "
                f"registers x {32 * r['warps']} threads, spills {r['spill_stores']}/{r['spill_loads']} B")
        half_attention = r["dtype"] in ("bfloat16", "float16") and r["kernel"].startswith("_attn")
        consumer = half_attention and r["arch"] == 80 and r["shared"] > SHARED_LIMIT[86]  # sm_80 code on sm_86 / 89
        if r["shared"] > SHARED_LIMIT[r["arch"]] or consumer:
            out.append("shared memory over the limit: " + line)
        if r["registers"] * 32 * r["warps"] > REGISTERS_PER_SM:
            out.append("registers over the SM's 64K: " + line)
        if (r["spill_stores"] or r["spill_loads"]) and r["dtype"] in ("bfloat16", "float16"):
            out.append("spills in half precision: " + line)
    return out


def test_every_kernel_configuration_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton", reason="the kernels need triton (Linux); the references run without it")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.time()
    children = {arch: subprocess.Popen([sys.executable, os.path.abspath(__file__), str(arch)], env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE) for arch in (80, 90)}
    rows = []
    for arch, child in children.items():
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, f"sm_{arch}: compilation failed\n{err[-4000:]}"
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print(f"\n{len(rows)} kernels compiled in {time.time() - t0:.0f} s")
    for r in rows:
        print(f"sm_{r['arch']} {r['kernel']:<16} {r['dtype']:<8} {r['shape']:<20} shared {r['shared']:>6} B  "
              f"{r['registers']:>3} regs x {32 * r['warps']:>3}  stages {r['stages']}  spills "
              f"{r['spill_stores']}/{r['spill_loads']} B")
    for arch in (80, 90):
        names = {r["kernel"] for r in rows if r["arch"] == arch}
        assert names == {n for ns in LAUNCHED.values() for n in ns}, names  # every kernel, forward and backward
        assert {r["dtype"] for r in rows if r["arch"] == arch and r["kernel"] == "_attn_fwd"} == {
            "bfloat16", "float16", "float32"}
    assert not problems(rows), "\n".join(problems(rows))


def test_limits_are_checked():
    """The check itself fails where it should (a spilling half-precision kernel, shared memory over sm_86's 99 KB
    for half-precision attention, registers over 64K)."""
    ok = dict(arch=80, kernel="_attn_fwd", dtype="bfloat16", shape="x", shared=57344, warps=4, stages=3,
              registers=148, spill_stores=0, spill_loads=0)
    assert problems([ok]) == []
    assert problems([dict(ok, dtype="float32", spill_stores=8, spill_loads=8)]) == []
    assert len(problems([dict(ok, spill_stores=8)])) == 1
    assert len(problems([dict(ok, shared=110000)])) == 1 and problems([dict(ok, shared=110000, arch=90)]) == []
    assert len(problems([dict(ok, registers=255, warps=16)])) == 1


def test_cocoop_text_pass_grids_fit_cuda_limits():
    """CoCoOp's per-image text pass at 100 classes: text_chunk = 20,000 sequences (200 images x 100 classes) of 8
    heads per call. The grids the kernels are launched with (recorded, not run) stay within CUDA's limits, forward
    and backward, causal and with a key mask: batch x heads on axis 0 (160,000 programs; tests/test_gpu_kernels.py
    launches this shape on a GPU)."""
    with launches() as seen:
        attention_pass(20000, 8, 77, 77, torch.bfloat16, causal=True)
        attention_pass(20000, 8, 77, 77, torch.bfloat16, key_mask=True)
    assert {name for name, _, _ in seen} == set(LAUNCHED[attn])
    for name, grid, _ in seen:
        assert grid[0] == 160000 and 1 <= grid[1] <= 3, (name, grid)  # 77 tokens: 2 blocks of 64, 3 of 32
        assert all(g <= limit for g, limit in zip(grid, GRID_LIMIT)), (name, grid)


if __name__ == "__main__":  # the child process of the first test: python tests/test_gpu_compile.py ARCH
    for row in compile_all(int(sys.argv[1])):
        print(json.dumps(row), flush=True)
