"""On a GPU (skipped, saying so, without one: tests/conftest.py): the Triton kernels compiled and run on CUDA against
their references at the sizes the models use. tests/test_kernels.py runs its small cases (every length, head dim,
dtype, mask kind; the losses in float32 / float16 / bfloat16) on CUDA there too; this file adds what only a GPU
shows: the kernels are compiled, not interpreted; kernels.bench.check_kernels at full size (its report runs it
again before timing); DAPT's token views at ViT-B/16 through the dispatcher; the launch grid of CoCoOp's 100-class
text pass (160,000 programs on axis 0); offsets past 2^31; float32 under TF32. Tolerances: the largest error
relative to the largest reference value, bfloat16 4e-2, float16 1e-2, TF32 1e-2 (as tests/test_kernels.py).
Left out: timing (python -m kernels.bench --report), the training path (tests/test_gpu_runs.py).
"""
import os

import pytest
import torch

import kernels
from kernels import attention as attn
from kernels import bench

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
TOL = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # float32: under TF32


def relerr(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def randn(*shape, dtype, seed=0):
    """Drawn on the GPU (the large cases would take seconds on the CPU), reproducible per seed."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=CUDA, dtype=torch.float32).to(dtype)


def output_and_grads(fn, q, k, v, do):
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def reference(q, k, v, do, key_mask=None, causal=False):
    """attention_reference in float32 on the inputs as rounded to their dtype: output and the three gradients."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    return output_and_grads(lambda q, k, v: attn.attention_reference(q, k, v, key_mask, causal=causal), *leaves,
                            do.float())


def test_kernels_are_compiled_for_cuda_tensors():
    """Triton's interpreter applies to CPU tensors only: with a GPU, conftest.py leaves TRITON_INTERPRET unset and
    the kernels are compiled JIT functions (set by hand, it would run CUDA tensors through the interpreter)."""
    from triton.runtime.jit import JITFunction
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET: the GPU tests need compiled kernels"
    assert isinstance(attn._attn_fwd, JITFunction) and isinstance(kernels.losses._proxy_fwd, JITFunction)


def test_every_kernel_against_its_reference_at_full_size():
    """kernels.bench.check_kernels on CUDA: attention at 3 x 4 heads, head dim 64, L = 199 / 213 and 77 / 53 causal,
    with and without a key mask, bfloat16 and float16 (float32 in one case), forward and gradients; the four losses
    at (33, 101) and (256, 1000)."""
    check = bench.check_kernels(CUDA)
    failed = [r for r in check.rows if r[-1] != "PASS"]
    assert len(check.rows) >= 30 and not failed, failed
    assert {r[1] for r in check.rows} == {"bfloat16", "float16", "float32"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dapt_token_views_at_vit_b16(dtype, monkeypatch):
    """A DAPT step's image-tower attention with token views: 3 views x 32 images, 12 heads, 197 + 2 tokens, head dim
    64, the full / foreground / background key masks of kernels.bench.dapt_view_masks, through the dispatcher
    (auto: the kernel for a key mask in half precision)."""
    masks, _ = bench.dapt_view_masks(32, 2)
    masks = masks.to(CUDA)
    q, k, v, do = (randn(96, 12, 199, 64, dtype=dtype, seed=i) for i in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    calls = []
    real = attn.triton_attention
    monkeypatch.setattr(attn, "triton_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = output_and_grads(lambda q, k, v: kernels.masked_attention(q, k, v, masks), q, k, v, do)
    assert calls == [1]
    for name, g, r in zip(("output", "dq", "dk", "dv"), got, reference(q, k, v, do, masks)):
        assert g.dtype == dtype and relerr(g, r) <= TOL[dtype], (name, relerr(g, r))


def test_cocoop_text_pass_at_100_classes():
    """The launch that failed from about 82 classes: CoCoOp's per-image text pass, text_chunk = 20,000 sequences (200
    images x 100 classes) x 8 heads = 160,000 programs on grid axis 0 (CUDA allows 65,535 on axes 1 and 2), 77
    tokens causal, bfloat16, forward and backward; the first and the last sequences match the reference."""
    B, H, L, D = 20000, 8, 77, 64
    q, k, v, do = (randn(B, H, L, D, dtype=torch.bfloat16, seed=i) for i in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    got = output_and_grads(lambda q, k, v: kernels.masked_attention(q, k, v, causal=True, backend="triton"),
                           q, k, v, do)
    torch.cuda.synchronize()
    for part in (slice(0, 4), slice(B - 4, B)):
        ref = reference(q[part], k[part], v[part], do[part], causal=True)
        for name, g, r in zip(("output", "dq", "dk", "dv"), got, ref):
            assert relerr(g[part], r) <= TOL[torch.bfloat16], (part, name, relerr(g[part], r))


def test_offsets_past_2_31():
    """(batch x heads) x keys x head dim past 2^31 elements: 2,100 x 16 heads x 1,024 keys x 64 = 2.2e9, so the
    last heads' outputs and gradients are written at offsets an int32 cannot hold; they match the reference."""
    B, H, L, D = 2100, 16, 1024, 64
    assert B * H * L * D > 2**31
    need = 9 * B * H * L * D * 2  # q, k, v, do, o, dq, dk, dv in bfloat16 and the reference's slices
    free = torch.cuda.mem_get_info()[0]
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB are free")
    q, k, v, do = (randn(B, H, L, D, dtype=torch.bfloat16, seed=i) for i in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    got = output_and_grads(lambda q, k, v: kernels.masked_attention(q, k, v, backend="triton"), q, k, v, do)
    part = slice(B - 2, B)
    for name, g, r in zip(("output", "dq", "dk", "dv"), got, reference(q[part], k[part], v[part], do[part])):
        assert relerr(g[part], r) <= TOL[torch.bfloat16], (name, relerr(g[part], r))


@pytest.fixture
def tf32():
    """torch.set_float32_matmul_precision("high") for the test; after it, the settings of a fresh process (full
    precision, the new API's "none" in both places)."""
    torch.set_float32_matmul_precision("high")
    yield
    torch.backends.fp32_precision = "none"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.fp32_precision = "none"


def test_float32_goes_to_sdpa_and_to_the_kernel_under_tf32(tf32, monkeypatch):
    """float32 with a key mask: SDPA by default (full-precision dots cannot use tensor cores), the kernel with TF32
    dots where torch allows TF32 (here); forced with backend="triton" at full precision, the kernel's small tiles."""
    masks, _ = bench.dapt_view_masks(4, 2)
    masks = masks.to(CUDA)
    q, k, v, do = (randn(12, 12, 199, 64, dtype=torch.float32, seed=i) for i in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    calls = []
    real = attn.triton_attention
    monkeypatch.setattr(attn, "triton_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = output_and_grads(lambda q, k, v: kernels.masked_attention(q, k, v, masks), q, k, v, do)
    assert calls == [1] and attn._compute_dtypes(torch.float32, CUDA)[1] == "tf32"
    for name, g, r in zip(("output", "dq", "dk", "dv"), got, reference(q, k, v, do, masks)):
        assert relerr(g, r) <= TOL[torch.float32], (name, relerr(g, r))
    torch.set_float32_matmul_precision("highest")
    kernels.masked_attention(q, k, v, masks)
    assert calls == [1]  # full precision: SDPA
