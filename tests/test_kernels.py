"""Triton kernels against their PyTorch references, forward and gradients: under TRITON_INTERPRET=1 on CPU tensors
(tests/conftest.py sets it where torch sees no GPU), compiled on CUDA tensors where it is not set (a GPU machine:
triton's interpreter decides per process, so there these cases run on the GPU; tests/test_gpu_kernels.py adds the
full-size shapes). Inputs are drawn on the CPU and moved, so both devices check the same values.

backend="triton" is forced everywhere (backend=None on the CPU would pick the reference; that is tested too).
Shapes are small (batch 1-2, heads 1-2) because the interpreter runs every program in numpy; lengths are the
real ones (77 text, 197 + {2, 8, 16} image) plus toy lengths. Tolerances compare the largest error with the
largest reference value; low-precision kernels are compared with the float32 reference on the same rounded
inputs. Interpreter limitation: bfloat16 arithmetic is broken there (values are stored as uint16), so the
kernels convert bfloat16 tiles to float32 after loading on the CPU (see kernels/attention.py).
"""
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

import dapt
import kernels
from kernels import attention as attn
from kernels import losses

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # error / max |reference|
DEVICE = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")  # where the kernels run
pytestmark = pytest.mark.any_device  # not pinned to the CPU on a GPU machine (tests/conftest.py)


def assert_close(got, ref, dtype, what):
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs().max().item()
    bound = TOL[dtype] * max(ref.abs().max().item(), 1e-3)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def qkv(B, H, L, D, dtype, packed=False):
    if packed:  # the strided views clip.Attention.qkv hands over: [B, L, 3, H, D] permuted
        x = torch.randn(B, L, 3, H, D).to(DEVICE, dtype).permute(2, 0, 3, 1, 4)
        return [t.detach().requires_grad_() for t in x.unbind(0)]  # non-contiguous leaves
    return [torch.randn(B, H, L, D).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def image_mask(B, n_prompts, kind):
    """CLS + 196 patches + prompts; kind: 'half' (a random contiguous half of the patches hidden, like a
    foreground / background view), 'random' (each patch kept with p=0.5), 'only_cls_prompts'."""
    m = torch.ones(B, 197 + n_prompts, dtype=torch.bool)
    for b in range(B):
        if kind == "half":
            start = int(torch.randint(0, 98, ()))
            m[b, 1 + start:1 + start + 98] = False
        elif kind == "random":
            m[b, 1:197] = torch.rand(196) < 0.5
        else:
            m[b, 1:197] = False
    return m.to(DEVICE)


def check_attention(q, k, v, key_mask, causal, dtype):
    o = kernels.masked_attention(q, k, v, key_mask, causal=causal, backend="triton")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attn.attention_reference(q32, k32, v32, key_mask, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    assert o.dtype == dtype and o.shape == q.shape
    assert_close(o, ref, dtype, "output")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"d{name}")
    return o, grads


# (B, H, L, D, dtype, causal, mask): every length, head dim, dtype, causal flag and mask kind appears at least
# once; a full cross product would take minutes in the interpreter.
ATTN_CASES = [
    (1, 1, 17, 32, torch.float32, False, None),
    (1, 2, 21, 64, torch.float16, True, None),
    (2, 1, 77, 64, torch.float32, True, None),
    (1, 2, 77, 32, torch.bfloat16, True, "text"),
    (2, 1, 199, 64, torch.bfloat16, False, "half"),
    (1, 1, 205, 64, torch.float32, False, "random"),
    (1, 1, 213, 128, torch.float16, False, "half"),  # numpy float16 matmuls are slow: one head
    (1, 1, 213, 64, torch.float32, True, "half"),
    (2, 1, 21, 128, torch.bfloat16, False, "text"),
]


@pytest.mark.parametrize("B,H,L,D,dtype,causal,mask", ATTN_CASES)
def test_attention_matches_reference(B, H, L, D, dtype, causal, mask):
    torch.manual_seed(L * D + B)
    q, k, v = qkv(B, H, L, D, dtype, packed=L > 100)
    if mask == "text":  # padded text: the first tokens of each sequence visible
        key_mask = torch.arange(L)[None, :] < torch.randint(L // 2, L + 1, (B, 1))
        key_mask[:, 0] = True
        key_mask = key_mask.to(DEVICE)
    elif mask is not None:
        key_mask = image_mask(B, L - 197, mask)
    else:
        key_mask = None
    check_attention(q, k, v, key_mask, causal, dtype)


def test_attention_cross_lengths_causal():
    """Lq != Lk: causal aligns the last query with the last key, like the reference (tril(Lk - Lq))."""
    torch.manual_seed(1)
    q = torch.randn(1, 1, 17, 32).to(DEVICE).requires_grad_()
    k, v = (torch.randn(1, 1, 40, 32).to(DEVICE).requires_grad_() for _ in range(2))
    check_attention(q, k, v, (torch.rand(1, 40) < 0.7).to(DEVICE), True, torch.float32)


def test_attention_skips_fully_masked_blocks():
    """Only CLS + 16 prompts visible: the key blocks holding nothing but patches are never loaded, so NaNs
    planted there cannot reach the output (a dense kernel would give NaN: 0 * NaN); partly visible blocks are
    masked per key. Gradients of skipped keys are exactly 0."""
    torch.manual_seed(2)
    B, H, L, D = 1, 2, 213, 64
    key_mask = image_mask(B, 16, "only_cls_prompts")
    block_n = attn._config(D, torch.float32, DEVICE)[0]
    order, cum = attn.visible_key_blocks(key_mask, block_n)
    skipped = [j for j in range(cum.shape[1] - 1) if cum[0, j + 1] == cum[0, j]]
    assert skipped, "test needs at least one fully masked key block"
    q, k, v = (torch.randn(B, H, L, D).to(DEVICE) for _ in range(3))
    k_nan, v_nan = k.clone(), v.clone()
    for j in skipped:
        k_nan[:, :, j * block_n:(j + 1) * block_n] = float("nan")
        v_nan[:, :, j * block_n:(j + 1) * block_n] = float("nan")
    q.requires_grad_(), k_nan.requires_grad_(), v_nan.requires_grad_()
    o = kernels.masked_attention(q, k_nan, v_nan, key_mask, backend="triton")
    do = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k_nan, v_nan), do)
    k.requires_grad_(), v.requires_grad_()
    ref = attn.attention_reference(q, k, v, key_mask)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), do)
    for got, r, what in [(o, ref, "output"), (dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv")]:
        assert_close(got, r, torch.float32, what)
    assert (dk[:, :, ~key_mask[0]] == 0).all() and (dv[:, :, ~key_mask[0]] == 0).all()


def test_visible_key_blocks():
    m = torch.zeros(2, 10, dtype=torch.bool)
    m[0, [0, 9]] = True  # blocks of 4: 0 and 2 visible
    m[1, 5] = True  # block 1 only
    order, cum = attn.visible_key_blocks(m, 4)
    assert order.dtype == cum.dtype == torch.int32
    assert order[0, :2].tolist() == [0, 2] and order[1, :1].tolist() == [1]
    assert cum.tolist() == [[0, 1, 1, 2], [0, 0, 1, 1]]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_all_keys_masked(causal):
    """A sequence with every key masked: output 0 and gradient 0 (no NaN), in the kernel and the reference;
    the other sequence of the batch is unaffected."""
    torch.manual_seed(3)
    q, k, v = qkv(2, 1, 21, 32, torch.float32)
    key_mask = torch.rand(2, 21) < 0.6
    key_mask[0, 0] = True
    key_mask[1] = False
    key_mask = key_mask.to(DEVICE)
    o, (dq, dk, dv) = check_attention(q, k, v, key_mask, causal, torch.float32)
    assert (o[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    ref = attn.attention_reference(q, k, v, key_mask, causal=causal)
    assert (ref[1] == 0).all()
    assert o[0].abs().sum() > 0


def test_attention_rejects_bad_mask():
    q, k, v = qkv(1, 1, 17, 32, torch.float32)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        kernels.masked_attention(q, k, v, torch.ones(1, 16, dtype=torch.bool), backend="triton")


# ----------------------------------------------------------------------------------------------------------
# losses


def check_loss(name, inputs, *args, dtype=torch.float32, **kw):
    """kernels.<name>(backend="triton") against dapt.<name> on the float32 copies, forward and gradients."""
    xs = [x.detach().to(DEVICE, dtype).requires_grad_() for x in inputs]
    ys = [x.detach().to(DEVICE, dtype).float().requires_grad_() for x in inputs]
    args = [a.to(DEVICE) if torch.is_tensor(a) else a for a in args]
    got = getattr(kernels, name)(*xs, *args, backend="triton", **kw)
    ref = getattr(dapt, name)(*ys, *args, **kw)
    got.backward()
    ref.backward()
    assert got.dim() == 0
    assert_close(got, ref, dtype, f"{name} value")
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert x.grad is not None and x.grad.dtype == dtype, f"{name}: no gradient for input {i}"
        assert_close(x.grad, y.grad, dtype, f"{name} grad {i}")
    return got, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pull_push(dtype):
    torch.manual_seed(4)
    B, D = 37, 160  # two row blocks, two feature chunks, ragged
    a = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    p = torch.nn.functional.normalize(a + 0.5 * torch.randn(B, D), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(B, D), dim=-1)
    got, _ = check_loss("pull_push_loss", [a, p, n], 0.3, dtype=dtype)  # margin 0.3: some hinges closed
    assert got.dtype == dtype


@pytest.mark.parametrize("C,D,t,dtype", [(70, 96, 2.0, torch.float32), (33, 64, 0.5, torch.bfloat16),
                                         (5, 16, 2.0, torch.float16)])
def test_inter_dispersion(C, D, t, dtype):
    torch.manual_seed(C)
    w = torch.nn.functional.normalize(torch.randn(C, D), dim=-1)
    w[1] = w[0]  # an exact duplicate: d2 = 0 must not go negative or NaN
    got, _ = check_loss("inter_dispersion_loss", [w], t, dtype=dtype)
    assert got.dtype == torch.float32


def test_inter_dispersion_single_class():
    w = torch.randn(1, 8, requires_grad=True)
    loss = kernels.inter_dispersion_loss(w, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and (w.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_intra_dispersion(dtype):
    torch.manual_seed(5)
    B, C, D = 45, 7, 200
    labels = torch.randint(0, C, (B,))
    check_loss("intra_dispersion_loss", [torch.randn(B, D), torch.randn(C, D)], labels, dtype=dtype)


@pytest.mark.parametrize("scale,paper_norm,dtype", [(1.0, False, torch.float32), (30.0, True, torch.float32),
                                                    (10.0, False, torch.float16)])
def test_proxy_anchor(scale, paper_norm, dtype):
    """scale 30 makes alpha * sim reach ~1000: exp overflows float32 unless the reduction is a logsumexp."""
    torch.manual_seed(6)
    B, M, D = 40, 37, 80
    labels = torch.randint(0, 30, (B,))  # proxies 30..36 have no positives
    got, ref = check_loss("proxy_anchor_loss", [torch.randn(B, D), torch.randn(M, D)], labels,
                          scale=scale, paper_norm=paper_norm, dtype=dtype)
    assert torch.isfinite(ref) and got.item() > 0


def test_loss_labels_checked():
    with pytest.raises(ValueError, match="labels must lie in 0..6"):
        kernels.intra_dispersion_loss(torch.randn(4, 8), torch.randn(7, 8), torch.tensor([0, 1, 7, 2]),
                                      backend="triton")


# ----------------------------------------------------------------------------------------------------------
# dispatch


def test_dispatch_cpu_uses_reference(monkeypatch):
    """backend=None on CPU tensors runs the references (attention: SDPA) (the kernels are made to fail if reached)."""
    def boom(*a, **k):
        raise AssertionError("Triton path taken on CPU with backend=None")

    monkeypatch.setattr(attn, "triton_attention", boom)
    for name in ("pull_push", "inter_dispersion", "intra_dispersion", "proxy_anchor"):
        monkeypatch.setattr(losses, name + "_triton", boom)
    torch.manual_seed(7)
    q, k, v = qkv(1, 2, 9, 16, torch.float32)
    m = torch.rand(1, 9) < 0.5
    m[:, 0] = True  # SDPA gives NaN for a row that sees no key
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :])
    assert torch.equal(kernels.masked_attention(q, k, v, m), sdpa)
    torch.testing.assert_close(kernels.masked_attention(q, k, v, m, backend="eager"),
                               attn.attention_reference(q, k, v, m))
    assert torch.equal(kernels.masked_attention(q, k, v, m, backend="torch"), attn.attention_reference(q, k, v, m))
    x, y, z = torch.randn(3, 6, 8).unbind(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.equal(kernels.pull_push_loss(x, y, z), dapt.pull_push_loss(x, y, z))
    assert torch.equal(kernels.inter_dispersion_loss(x), dapt.inter_dispersion_loss(x))
    assert torch.equal(kernels.intra_dispersion_loss(x, y[:3], labels), dapt.intra_dispersion_loss(x, y[:3], labels))
    assert torch.equal(kernels.proxy_anchor_loss(x, y[:3], labels), dapt.proxy_anchor_loss(x, y[:3], labels))
    with pytest.raises(AssertionError, match="Triton path taken"):  # and "triton" really forces the kernel
        kernels.pull_push_loss(x, y, z, backend="triton")


def test_dispatch_without_triton(monkeypatch):
    """CUDA tensors but triton not importable -> reference; a bad backend name is a clear error."""
    cuda_like = types.SimpleNamespace(is_cuda=True)
    assert kernels.use_triton(None, cuda_like)
    monkeypatch.setattr(attn, "triton", types.SimpleNamespace(jit=lambda f: f, constexpr=None))  # no triton
    assert not kernels.use_triton(None, cuda_like)
    assert kernels.use_triton("triton", cuda_like) and not kernels.use_triton("torch", cuda_like)
    with pytest.raises(ValueError, match="expected None, 'triton' or 'torch'"):
        kernels.use_triton("cuda", cuda_like)


def test_forced_triton_without_package(monkeypatch):
    monkeypatch.setattr(losses, "triton", types.SimpleNamespace(jit=lambda f: f, constexpr=None))
    with pytest.raises(RuntimeError, match="needs the triton package"):
        kernels.inter_dispersion_loss(torch.randn(3, 4), backend="triton")

# ----------------------------------------------------------------------------------------------------------
# the references against the losses' formulas (float64 loops)


def test_pull_push_reference_is_the_formula():
    """pull_push_reference is F.triplet_margin_loss; here against the formula by hand, hinge active and not."""
    g = torch.Generator().manual_seed(0)
    a, p, n = (F.normalize(torch.randn(16, 32, generator=g), dim=-1) for _ in range(3))
    for margin in (1.5, 0.3, 0.01):
        hand = ((a - p + 1e-6).norm(dim=-1) - (a - n + 1e-6).norm(dim=-1) + margin).clamp_min(0).mean()
        torch.testing.assert_close(dapt.pull_push_loss(a, p, n, margin=margin), hand, rtol=1e-6, atol=1e-7)
    assert dapt.pull_push_loss(a, a, -a, margin=0.5) == 0  # positive at the anchor, negative far: no loss


def inter_by_loops(w, t):
    C, total, pairs = w.shape[0], 0.0, 0
    for i in range(C):
        for j in range(i + 1, C):
            total = total + torch.exp(-t * ((w[i] - w[j]) ** 2).sum())
            pairs += 1
    return total * (2.0 / (C * (C - 1)))


def intra_by_loops(z, protos, labels):
    B, D = z.shape
    total = 0.0
    for b in range(B):
        for d in range(D):
            total = total + (z[b, d] - protos[labels[b], d]) ** 2
    return total / (B * D)


def proxy_anchor_by_loops(x, p, labels, alpha, delta, scale, paper_norm=False):
    M = p.shape[0]
    pos_sum, neg_sum, with_pos = 0.0, 0.0, 0
    for k in range(M):
        pos, neg, has_pos = 0.0, 0.0, False
        for i in range(x.shape[0]):
            sim = scale * (x[i] @ p[k]) / (x[i].norm() * p[k].norm())
            if int(labels[i]) == k:
                pos = pos + torch.exp(-alpha * (sim - delta))
                has_pos = True
            else:
                neg = neg + torch.exp(alpha * (sim + delta))
        pos_sum = pos_sum + torch.log(1 + torch.as_tensor(pos, dtype=torch.float64))
        neg_sum = neg_sum + torch.log(1 + torch.as_tensor(neg, dtype=torch.float64))
        with_pos += has_pos
    return pos_sum / (max(with_pos, 1) if paper_norm else M) + neg_sum / M


def check_value_and_grads(ours, ref, inputs, rtol=1e-5):
    """Same value and same gradients w.r.t. every input (the references compute in float32)."""
    torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=1e-7)
    g_ours = torch.autograd.grad(ours, inputs)
    g_ref = torch.autograd.grad(ref, inputs)
    for a, b in zip(g_ours, g_ref):
        assert b.abs().max() > 0
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_inter_dispersion_equals_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.functional.normalize(torch.randn(6, 9, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    for t in (2.0, 0.5):
        check_value_and_grads(dapt.inter_dispersion_loss(w, t=t), inter_by_loops(w, t), [w])
    assert dapt.inter_dispersion_loss(w[:1]).item() == 0.0  # one class: no pair


def test_intra_dispersion_equals_formula():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 2, 1, 0])
    check_value_and_grads(dapt.intra_dispersion_loss(z, protos, labels), intra_by_loops(z, protos, labels), [z, protos])


@pytest.mark.parametrize("labels, scale, paper_norm", [
    ([0, 1, 1, 2, 0, 2, 1], 1.0, False),  # proxy 3 has no positive in the batch: counts in 1/M only
    ([0, 1, 1, 2, 0, 2, 1], 1.0, True),   # the paper's normalisation: over the 3 proxies with positives
    ([2, 2, 2, 2, 2, 2, 2], 1.0, False),  # one class in the batch
    ([3, 0, 1, 2, 3, 0, 1], 5.0, False),  # a larger cosine scale
])
def test_proxy_anchor_equals_formula(labels, scale, paper_norm):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(labels)
    ours = dapt.proxy_anchor_loss(x, p, y, alpha=32.0, delta=0.1, scale=scale, paper_norm=paper_norm)
    ref = proxy_anchor_by_loops(x, p, y, 32.0, 0.1, scale, paper_norm)
    assert torch.isfinite(ours)
    check_value_and_grads(ours, ref, [x, p])


# ----------------------------------------------------------------------------------------------------------
# the one-shot GPU report (python -m kernels.bench --report): its device checks and its files, on the CPU


def test_report_checks_every_kernel_and_writes_its_files(tmp_path):
    from kernels import bench

    check = bench.check_kernels(DEVICE, small=True)  # in the interpreter on the CPU
    names = {r[0].split()[0] for r in check.rows}
    assert names == {"masked_attention", "pull_push_loss", "inter_dispersion_loss", "intra_dispersion_loss",
                     "proxy_anchor_loss"}
    assert {r[1] for r in check.rows} == {"bfloat16", "float16", "float32"}
    assert all(r[-1] == "PASS" for r in check.rows), [r for r in check.rows if r[-1] != "PASS"]
    env = dict(date="2026-11-30", device="Test GPU", torch="2", cuda="12", triton="3", python="3")
    md, js = bench.write_report([check, bench.Table("t", ["a", "b"], [["x", "1.00x"]])], env, str(tmp_path), "cmd")
    text = open(md).read()
    assert text.startswith("## Test GPU, 2026-11-30") and "| masked_attention L=19 key mask | bfloat16 |" in text
    assert json.load(open(js))["tables"][1] == {"title": "t", "header": ["a", "b"], "rows": [["x", "1.00x"]]}


# ----------------------------------------------------------------------------------------------------------
# float32 on CUDA: the TF32 setting, read so that it cannot raise


def full_precision():
    """torch's float32 matmul settings as a fresh process has them (full precision, "none" = inherit the generic
    setting), readable through every API again whichever were used."""
    torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.fp32_precision = "none"
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def fp32_precision():
    full_precision()
    yield
    full_precision()


@pytest.mark.parametrize("how, tf32", [
    ("default", False),
    ("new api tf32", True),  # torch.get_float32_matmul_precision() and allow_tf32 raise after this one
    ("generic tf32", True),
    ("legacy allow_tf32", True),
    ("set_float32_matmul_precision high", True),
    ("high, then new api ieee", False),  # get_float32_matmul_precision() still says "high"
])
def test_tf32_setting_is_read_without_raising(fp32_precision, how, tf32):
    if how == "new api tf32":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif how == "generic tf32":
        torch.backends.fp32_precision = "tf32"
    elif how == "legacy allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif how == "set_float32_matmul_precision high":
        torch.set_float32_matmul_precision("high")
    elif how == "high, then new api ieee":
        torch.set_float32_matmul_precision("high")
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    cuda = torch.device("cuda")  # only read: no GPU needed
    assert attn.tf32_allowed() == tf32
    assert losses._prec(cuda) == ("tf32" if tf32 else "ieee") and losses._prec(torch.device("cpu")) == "ieee"
    assert attn._compute_dtypes(torch.float32, cuda)[1] == ("tf32" if tf32 else "ieee")
    assert attn._config(64, torch.float32, cuda)[0] == (64 if tf32 else 32)  # full-precision dots: small tiles
    x = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1).to(DEVICE)
    assert torch.isfinite(kernels.inter_dispersion_loss(x, backend="triton"))  # a loss kernel runs either way
