"""Prompt-augmented masked attention: the PyTorch reference and a FlashAttention-style Triton kernel.

Shape of the code (after the Triton fused-attention tutorial, written anew): `attention_reference` (what the
kernel is tested against), `_attn_fwd_inner` (the online-softmax loop over key blocks), `_attn_fwd`, the backward
kernels (`_attn_bwd_delta`, `_attn_bwd_dkdv`, `_attn_bwd_dq`: P is recomputed from the saved logsumexp), and
`triton_attention`, an autograd.Function exposed as a plain function, and `masked_attention`, the one attention
dispatcher of the project (eager | sdpa | triton; the CLIP towers call it). The benchmark is kernels/bench.py.

The per-key mask is the point of this kernel: the masked views of an image (foreground / background patches
hidden, CLS and prompt tokens always visible) go through the image tower with a key mask [B, L] instead of as
separate dense passes. Before launch, `visible_key_blocks` lists per sequence the key blocks of BLOCK_N keys
that hold at least one visible key; the kernels loop over that list only, so fully masked blocks are skipped
(never loaded, never multiplied). Partly visible blocks are masked per key.

A query row that sees no key at all (every key masked, or causal with more queries than keys) has output 0
and gradient 0, in the kernel and in the reference (a plain softmax would give NaN). In the models CLS and the
prompts are always visible, so this only matters for degenerate inputs.

Numerics: q k^T and p v accumulate in float32; p and dS are rounded to the input dtype before their matmuls
(as FlashAttention does). float32 inputs use TF32 dots where torch allows TF32 for CUDA matmuls (`tf32_allowed`)
and full-precision dots otherwise; those cannot use tensor cores, so the dispatcher sends float32 to SDPA unless
TF32 is allowed, and the kernel (forced with backend="triton") takes smaller tiles for them (`_config`).
Launch grid: (batch * heads, query or key blocks): axis 0 takes up to 2^31 - 1 programs (CUDA caps axes 1 and 2
at 65,535, which CoCoOp's per-image text pass, 20,000 sequences x 8 heads, passes); offsets that multiply a
batch or (batch, head) index are int64. Deliberately left out: dropout, attention bias other than the key mask
and causal, variable-length packing, autotuning (one block configuration per dtype, see `_config`), FP8.

Interpreter (TRITON_INTERPRET=1, CPU tensors, how the tests run): bfloat16 is stored there as raw uint16 and its
arithmetic and dots are wrong, so on the CPU bfloat16 tiles are converted to float32 right after loading
(values are exact); p / dS are still rounded through bfloat16, so the interpreter reproduces the GPU's numbers.
TRITON_INTERPRET=1 is read by triton.jit when a kernel (and triton's own library) is defined, so a process either
interprets every launch or compiles every launch: tests/conftest.py sets it only where torch sees no CUDA device,
and tests/test_gpu_compile.py compiles the kernels for sm_80 / sm_90 without a GPU in a process without it. Triton
3.6's interpreter needs one line fixed for NumPy >= 2.4 (`_interpreter_index_fix`).
"""
import math
import types

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference works; the kernels are defined but never launched
    triton = tl = types.SimpleNamespace(jit=lambda fn: fn, constexpr=None)

ATTN_BACKENDS = ("auto", "eager", "sdpa", "triton")  # "torch" is accepted for "eager", None for "auto"


def use_triton(backend, *tensors):
    """The dispatch rule of every kernel: "triton" forces the kernel, "torch" the reference, None picks the kernel
    when every tensor is on CUDA and triton imports."""
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend {backend!r}: expected None, 'triton' or 'torch'")
    if backend is not None:
        return backend == "triton"
    return all(t.is_cuda for t in tensors) and not isinstance(triton, types.SimpleNamespace)


def tf32_allowed():
    """Whether torch lets CUDA float32 matmuls use TF32, read so that it cannot raise: torch >= 2.9 raises in
    torch.backends.cuda.matmul.allow_tf32 and in torch.get_float32_matmul_precision() once the legacy and the
    fp32_precision APIs were both used; the fp32_precision value ("tf32" | "ieee" | "none" = inherit the generic
    torch.backends.fp32_precision) is read first, the legacy precision only where that is missing."""
    try:
        p = torch.backends.cuda.matmul.fp32_precision
        return (torch.backends.fp32_precision if p == "none" else p) == "tf32"
    except (AttributeError, RuntimeError):
        try:
            return torch.get_float32_matmul_precision() != "highest"
        except RuntimeError:
            return False


def _interpreter_index_fix():
    """Triton 3.6's interpreter turns a scalar loop bound (`range(0, n_iter)`, n_iter loaded from memory) into an int
    with int(array of shape [1]), which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted");
    triton 3.9 squeezes the array first. The same line here, for the interpreter only (compiled kernels never
    reach it); a no-op where triton already does so."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "squeezes_index", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_index = True
    interpreter._patch_lang_tensor = patched


if not isinstance(triton, types.SimpleNamespace) and triton.knobs.runtime.interpret:
    _interpreter_index_fix()


# ----------------------------------------------------------------------------------------------------------
# reference


def attention_reference(q, k, v, key_mask=None, causal=False, scale=None):
    """Eager attention on [B, H, L, D]: scores in float32, softmax, then cast back to q's dtype.

    key_mask: bool [B, Lk], True = visible key. causal: query i sees keys j <= i (+ Lk - Lq offset).
    A query row with no visible key gets output 0 and gradient 0 (instead of softmax's NaN)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    Lq, Lk = q.shape[-2], k.shape[-2]
    allowed = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    empty = ~allowed.any(-1, keepdim=True)  # [B|1, 1, Lq, 1] rows that see nothing
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(empty, 0.0)  # finite rows: no NaN forward or backward
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    return (p @ v.float()).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Layout: q [B, H, Lq, D], k / v [B, H, Lk, D] (any strides); program (b * H + h, query or key
# block): axis 0 is the large one (B * H reaches 160,000 in CoCoOp's text pass). b and bh index whole sequences,
# so every offset built from them is int64 (bh * Lk * HEAD_DIM passes 2^31 from 32,768 heads of 1,024 keys).
# Scores are kept in log2 units (qk_scale = scale * log2(e)) so the softmax uses exp2.


@triton.jit
def _n_key_blocks(CUM, b, start_m, Lq, Lk, n_kblocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """How many (visible) key blocks the query block starting at start_m loops over."""
    n_hi = n_kblocks
    if CAUSAL:  # keys up to the last query's diagonal: j <= start_m + BLOCK_M - 1 + (Lk - Lq)
        n_hi = tl.minimum(tl.cdiv(tl.maximum(start_m + BLOCK_M + Lk - Lq, 0), BLOCK_N), n_kblocks)
    if HAS_MASK:  # CUM[b, j] = number of visible blocks among the first j, so the prefix is the loop count
        n_hi = tl.load(CUM + b * (n_kblocks + 1) + n_hi)
    return n_hi


@triton.jit
def _key_block_start(ORDER, b, it, n_kblocks, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """First key of the it-th block visited: the it-th visible block (ascending), or simply the it-th block."""
    if HAS_MASK:
        return tl.load(ORDER + b * n_kblocks + it) * BLOCK_N
    else:
        return it * BLOCK_N


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, MASK, ORDER, b, n_iter, offs_m, offs_d,
                    stride_kn, stride_kd, stride_vn, stride_vd, Lq, Lk, n_kblocks, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_MASK: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over the visited key blocks: acc [BM, BD] = sum_j exp2(s_j - m) v_j, l = sum_j exp2(s_j - m)."""
    d_ok = offs_d < HEAD_DIM
    for it in range(0, n_iter):
        start_n = _key_block_start(ORDER, b, it, n_kblocks, BLOCK_N, HAS_MASK)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0).to(COMPUTE)  # [BD, BN]
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale  # [BM, BN], float32, log2 units
        ok = n_ok
        if HAS_MASK:
            ok = ok & (tl.load(MASK + b * Lk + offs_n, mask=n_ok, other=0) != 0)
        ok = ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: avoid inf - inf
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        p = p.to(v.dtype).to(COMPUTE)  # round p to the input dtype, as the tensor-core dot sees it
        acc = tl.dot(p, v.to(COMPUTE), acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, MASK, ORDER, CUM,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
              H, Lq, Lk, n_kblocks, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b64 = (bh // H).to(tl.int64)
    h = bh % H
    bh64 = bh.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b64 * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(COMPUTE)  # [BM, BD]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_iter = _n_key_blocks(CUM, b64, start_m, Lq, Lk, n_kblocks, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K + b64 * skb + h * skh, V + b64 * svb + h * svh, MASK, ORDER,
                                    b64, n_iter, offs_m, offs_d, skn, skd, svn, svd, Lq, Lk, n_kblocks, qk_scale,
                                    HEAD_DIM, BLOCK_N, CAUSAL, HAS_MASK, COMPUTE, PREC)
    empty = l_i == 0.0  # no visible key: output 0, and lse = +inf makes the backward's P exactly 0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(LSE + bh64 * Lq + offs_m, tl.where(empty, float("inf"), m_i + tl.log2(l_safe)), mask=m_ok)
    tl.store(O + b64 * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             o.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, Lq,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d o_id * do_id (float32): the softmax backward's row term."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=ok, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, MASK, CUM, DK, DV,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                   H, Lq, Lk, n_kblocks, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr):
    """One key block: dV = sum_i P^T dO, dK = scale * sum_i dS^T Q over the query blocks that see it."""
    bh = tl.program_id(0)
    kb = tl.program_id(1)
    start_n = kb * BLOCK_N
    b64 = (bh // H).to(tl.int64)
    h = bh % H
    bh64 = bh.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Lk
    d_ok = offs_d < HEAD_DIM
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_ok, other=0.0)
    v = tl.load(V + b64 * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_ok, other=0.0)
    k = k.to(COMPUTE)
    v = v.to(COMPUTE)
    key_ok = n_ok
    lo = 0
    hi = tl.cdiv(Lq, BLOCK_M)
    if HAS_MASK:
        key_ok = key_ok & (tl.load(MASK + b64 * Lk + offs_n, mask=n_ok, other=0) != 0)
        row = CUM + b64 * (n_kblocks + 1) + kb
        hi = tl.where(tl.load(row + 1) > tl.load(row), hi, 0)  # fully masked block: no work, dK = dV = 0
    if CAUSAL:  # query i sees key j iff i >= j - (Lk - Lq): start at the first query block that reaches start_n
        lo = tl.maximum(start_n - (Lk - Lq), 0) // BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    Qb = Q + b64 * sqb + h * sqh
    DOb = DO + b64 * sdb + h * sdh
    for mb in range(lo, hi):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        qd_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Qb + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qd_ok, other=0.0).to(COMPUTE)
        do = tl.load(DOb + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=qd_ok, other=0.0)
        lse = tl.load(LSE + bh64 * Lq + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + bh64 * Lq + offs_m, mask=m_ok, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BN, BM]
        ok = key_ok[:, None]
        if CAUSAL:
            ok = ok & (offs_n[:, None] <= offs_m[None, :] + (Lk - Lq))
        pT = tl.where(ok, tl.exp2(sT - lse[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype).to(COMPUTE), do.to(COMPUTE), dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do.to(COMPUTE)), input_precision=PREC)  # [BN, BM]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(do.dtype).to(COMPUTE), q, dk, input_precision=PREC)
    out_ok = kv_ok
    tl.store(DK + bh64 * Lk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + bh64 * Lk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, MASK, ORDER, CUM, DQ,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                 H, Lq, Lk, n_kblocks, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr):
    """One query block: dQ = scale * sum_j dS K over the same visible key blocks as the forward."""
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    b64 = (bh // H).to(tl.int64)
    h = bh % H
    bh64 = bh.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    qd_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qd_ok, other=0.0)
    do = tl.load(DO + b64 * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=qd_ok, other=0.0)
    q = q.to(COMPUTE)
    lse = tl.load(LSE + bh64 * Lq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh64 * Lq + offs_m, mask=m_ok, other=0.0)
    Kb = K + b64 * skb + h * skh
    Vb = V + b64 * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_iter = _n_key_blocks(CUM, b64, start_m, Lq, Lk, n_kblocks, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK)
    for it in range(0, n_iter):
        start_n = _key_block_start(ORDER, b64, it, n_kblocks, BLOCK_N, HAS_MASK)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kv_ok = n_ok[None, :] & d_ok[:, None]
        kT = tl.load(Kb + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=kv_ok, other=0.0).to(COMPUTE)
        vT = tl.load(Vb + offs_n[None, :] * svn + offs_d[:, None] * svd, mask=kv_ok, other=0.0).to(COMPUTE)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale  # [BM, BN]
        ok = n_ok
        if HAS_MASK:
            ok = ok & (tl.load(MASK + b64 * Lk + offs_n, mask=n_ok, other=0) != 0)
        ok = ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do.to(COMPUTE), vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(do.dtype).to(COMPUTE), tl.trans(kT), dq, input_precision=PREC)
    tl.store(DQ + bh64 * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_ok)


# ----------------------------------------------------------------------------------------------------------
# launch


def visible_key_blocks(key_mask, block_n):
    """key_mask bool [B, L] -> (order, cum), both int32.

    order [B, nb]: per sequence the indices of key blocks with at least one visible key, ascending, then the
    others; cum [B, nb + 1]: cum[b, j] = number of visible blocks among blocks 0..j-1. A query block that may
    see blocks 0..j-1 (all of them, or up to its causal diagonal) loops over order[b, :cum[b, j]]."""
    B, L = key_mask.shape
    nb = -(-L // block_n)
    visible = F.pad(key_mask, (0, nb * block_n - L)).view(B, nb, block_n).any(-1)  # [B, nb]
    order = torch.sort((~visible).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    cum = F.pad(visible.to(torch.int32).cumsum(1), (1, 0)).to(torch.int32)
    return order.contiguous(), cum.contiguous()


def _config(head_dim, dtype, device):
    """(BLOCK_N, {"fwd" | "dkdv" | "dq": (BLOCK_M, launch options)}): one configuration per dtype, no autotuning
    (which the interpreter would run for every candidate); the delta pass takes the forward's. The interpreter (CPU
    tensors) takes the same tiles as CUDA, so the CPU tests run the GPU's tiling. Chosen with ptxas's report for
    sm_80 and sm_90 at head_dim 64, every CLIP's (tests/test_gpu_compile.py: no spill in half precision, shared
    memory within the 99 KB of sm_86 / sm_89):
    - half precision, and float32 where TF32 is allowed: blocks of 64 keys, L = 197..257 in 4-5 of them (the
      key-mask skipping works at BLOCK_N granularity); the forward on 64 queries, 4 warps; dK / dV and dQ loop
      over blocks of 32 queries (64 spill on sm_80, triton 3.6 and 3.9, on 4 warps and on 8); 3 pipelining
      stages where a K tile is <= 8 KB (head_dim <= 64 in half precision), fewer for wider tiles;
    - full-precision float32 (no tensor cores, the tiles live in registers): 32 x 32 tiles on 8 warps everywhere
      (64 x 64 on 4 warps spill 2-30 KB per thread)."""
    cuda = device.type == "cuda"
    if dtype == torch.float32 and not (cuda and tf32_allowed()):
        opts = dict(num_warps=8, num_stages=2) if cuda else {}
        return 32, {"fwd": (32, opts), "dkdv": (32, opts), "dq": (32, opts)}
    if not cuda:
        return 64, {"fwd": (64, {}), "dkdv": (32, {}), "dq": (32, {})}
    tile_bytes = 64 * max(16, triton.next_power_of_2(head_dim)) * dtype.itemsize  # one K or V tile
    stages = 3 if tile_bytes <= 8192 else 2 if tile_bytes <= 16384 else 1
    warps = 4 if head_dim <= 64 else 8
    return 64, {"fwd": (64, dict(num_warps=warps, num_stages=stages)),
                "dkdv": (32, dict(num_warps=warps, num_stages=stages)),
                "dq": (32, dict(num_warps=warps, num_stages=stages))}


def _compute_dtypes(dtype, device):
    """(tile dtype inside the kernel, dot precision). CPU = interpreter: bfloat16 tiles go through float32, and
    float32 dots are full precision (as the reference)."""
    tl_dtype = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    if device.type != "cuda" and dtype == torch.bfloat16:
        tl_dtype = tl.float32
    prec = "tf32" if dtype == torch.float32 and device.type == "cuda" and tf32_allowed() else "ieee"
    return tl_dtype, prec


def _check(q, k, v, key_mask):
    if isinstance(triton, types.SimpleNamespace):
        raise RuntimeError("kernels/attention.py: backend='triton' needs the triton package (pip install triton); "
                           "use backend=None or 'torch' for the PyTorch reference")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"kernels.masked_attention: q, k, v must be [batch, heads, length, head_dim], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"kernels.masked_attention: k and v must be [{B}, {H}, Lk, {D}], got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"kernels.masked_attention: q, k, v must share one dtype among float32 / float16 / "
                         f"bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D > 256:
        raise ValueError(f"kernels.masked_attention: head_dim {D} > 256 is not supported by the Triton kernel; "
                         "use backend='torch'")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, k.shape[2])):
        raise ValueError(f"kernels.masked_attention: key_mask must be bool [{B}, {k.shape[2]}] (True = visible), "
                         f"got {key_mask.dtype} {tuple(key_mask.shape)}")


class _MaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, causal, scale):
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        block_n, launch = _config(D, q.dtype, q.device)
        compute, prec = _compute_dtypes(q.dtype, q.device)
        n_kblocks = triton.cdiv(Lk, block_n)
        if key_mask is not None:
            mask = key_mask.contiguous().view(torch.uint8)
            order, cum = visible_key_blocks(key_mask, block_n)
        else:  # never read (HAS_MASK=False): any int32 tensor will do as a pointer
            mask = order = cum = torch.empty(1, dtype=torch.int32, device=q.device)
        o = torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B * H, Lq, dtype=torch.float32, device=q.device)  # log2 units; +inf for empty rows
        consts = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n, CAUSAL=causal,
                      HAS_MASK=key_mask is not None, COMPUTE=compute, PREC=prec)
        bm, opts = launch["fwd"]
        _attn_fwd[(B * H, triton.cdiv(Lq, bm))](  # B * H on axis 0: up to 2^31 - 1 programs
            q, k, v, o, lse, mask, order, cum, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, Lq, Lk, n_kblocks, scale * 1.4426950408889634, BLOCK_M=bm, **consts, **opts)
        ctx.save_for_backward(q, k, v, o, lse, mask, order, cum)
        ctx.scale, ctx.consts, ctx.launch, ctx.n_kblocks = scale, consts, launch, n_kblocks
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask, order, cum = ctx.saved_tensors
        c = ctx.consts
        B, H, Lq, D = q.shape
        Lk = k.shape[2]
        delta = torch.empty_like(lse)
        bm, opts = ctx.launch["fwd"]
        _attn_bwd_delta[(B * H, triton.cdiv(Lq, bm))](o, do, delta, *o.stride(), *do.stride(), H, Lq, HEAD_DIM=D,
                                                      BLOCK_D=c["BLOCK_D"], BLOCK_M=bm, **opts)
        dq = torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device)  # contiguous: the kernels store so
        dk = torch.empty(B, H, Lk, D, dtype=k.dtype, device=k.device)
        dv = torch.empty_like(dk)
        qk_scale = ctx.scale * 1.4426950408889634
        strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
        bm, opts = ctx.launch["dkdv"]
        _attn_bwd_dkdv[(B * H, ctx.n_kblocks)](q, k, v, do, lse, delta, mask, cum, dk, dv, *strides, H, Lq, Lk,
                                               ctx.n_kblocks, qk_scale, ctx.scale, BLOCK_M=bm, **c, **opts)
        bm, opts = ctx.launch["dq"]
        _attn_bwd_dq[(B * H, triton.cdiv(Lq, bm))](q, k, v, do, lse, delta, mask, order, cum, dq, *strides, H, Lq, Lk,
                                                   ctx.n_kblocks, qk_scale, ctx.scale, BLOCK_M=bm, **c, **opts)
        return dq, dk, dv, None, None, None


def triton_attention(q, k, v, key_mask=None, causal=False, scale=None):
    """The Triton kernel with autograd; same contract as `attention_reference` (differentiable in q, k, v)."""
    _check(q, k, v, key_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _MaskedAttention.apply(q, k, v, key_mask, bool(causal), scale)


# ----------------------------------------------------------------------------------------------------------
# dispatcher


def describe_backend(backend, device_type):
    """What masked_attention runs for `backend` on a device type, in words (train.py logs and records it)."""
    if backend in (None, "auto"):
        if device_type == "cuda" and not isinstance(triton, types.SimpleNamespace):
            return ("auto: PyTorch SDPA for unmasked attention, the Triton masked-attention kernel where a key mask "
                    "is present (token-level views) in bfloat16 / float16, or in float32 where TF32 is allowed")
        return "auto: PyTorch SDPA"
    return {"eager": "eager (the PyTorch reference)", "torch": "eager (the PyTorch reference)", "sdpa": "PyTorch SDPA",
            "triton": "the Triton masked-attention kernel"}.get(backend, backend)


def masked_attention(q, k, v, key_mask=None, causal=False, scale=None, backend=None):
    """softmax(q k^T * scale + mask) v on [B, H, L, D]; key_mask bool [B, Lk], True = visible key; causal aligns
    the last query with the last key (query i sees keys j <= i + Lk - Lq).

    backend: "eager" (or "torch": attention_reference), "sdpa" (torch's scaled_dot_product_attention), "triton"
    (triton_attention: fully masked key blocks are skipped; a query that sees no key gets 0), or None / "auto":
    on CUDA the Triton kernel where a key mask is given (when triton imports) in half precision, or in float32 where
    torch allows TF32 (the kernel's full-precision float32 dots cannot use tensor cores), SDPA otherwise; SDPA on
    the CPU."""
    if backend in (None, "auto"):
        fast = q.dtype != torch.float32 or tf32_allowed()
        backend = "triton" if key_mask is not None and fast and use_triton(None, q, k, v) else "sdpa"
    if backend == "triton":
        return triton_attention(q, k, v, key_mask, causal=causal, scale=scale)
    if backend in ("eager", "torch"):
        return attention_reference(q, k, v, key_mask, causal=causal, scale=scale)
    if backend != "sdpa":
        raise ValueError(f"attention backend {backend!r}: expected one of {ATTN_BACKENDS} (or 'torch', None)")
    Lq, Lk = q.shape[-2], k.shape[-2]
    mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, Lk]
    if causal and (mask is not None or Lq != Lk):
        # explicit mask: SDPA's is_causal aligns top-left; ours aligns the last query with the last key
        tri = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        mask, causal = (tri if mask is None else mask & tri), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
