"""The method losses: per loss, the PyTorch reference (the formula), a fused Triton kernel forward and backward,
its autograd wrapper exposed as a plain function, and the dispatcher the methods call.

Each section is laid out as the Triton fused-attention tutorial lays out a kernel: `<name>_reference` (what the
kernel is tested against; `dapt.<name>_loss` re-exports it), the `@triton.jit` kernels, a
torch.autograd.Function, `<name>_triton` (the kernel as a plain function) and `<name>_loss(..., backend=None)`,
the dispatcher (None: the kernel on CUDA tensors when triton imports, the reference elsewhere; "triton" forces
the kernel, which on CPU tensors runs under TRITON_INTERPRET=1; "torch" forces the reference).

What is fused:
- pull-push: both distances, the hinge, and their gradients for anchor, positive and negative, one pass each;
- inter-class dispersion: pairwise exp(-t ||w_i - w_j||^2) over class blocks (|w_i|^2 + |w_j|^2 - 2 w_i.w_j on
  tiles), so memory is linear in the number of classes: the C x C matrix is never stored, forward or backward;
- intra-class dispersion: prototype gather + squared distance; its gradient for the prototypes is an index_add;
- proxy-anchor: samples / proxies are L2-normalised in torch; the kernel computes the similarity tiles and both
  masked log(1 + sum exp) reductions per proxy with an online logsumexp (overflow-safe for any alpha * scale).
  The backward writes dL/dsim [B, M] (the size of the logits) and leaves the two matmuls to torch.
Small per-row or per-class partial sums are reduced in torch (deterministic, no atomics).
Every kernel computes in float32, like the references (the pull-push reference computes in the input dtype;
the kernel returns its float32 result cast to that dtype). Row and class indices are int64 in the kernels, so
offsets such as rows * D cannot wrap at any batch. Deliberately left out: autotuning, atomics.
"""
import types

import torch
import torch.nn.functional as F

from .attention import tf32_allowed, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references work; the kernels are defined but never launched
    triton = tl = types.SimpleNamespace(jit=lambda fn: fn, constexpr=None)


def _need_triton():
    if isinstance(triton, types.SimpleNamespace):
        raise RuntimeError("kernels/losses.py: backend='triton' needs the triton package (pip install triton); "
                           "use backend=None or 'torch' for the PyTorch reference")


def _prec(device):
    """Dot precision for float32 tiles: TF32 only on CUDA where torch itself allows it for float32 matmuls, read by
    attention.tf32_allowed (which cannot raise, whichever of torch's precision APIs set it)."""
    return "tf32" if device.type == "cuda" and tf32_allowed() else "ieee"


def _check_labels(labels, n, what):
    """Out-of-range labels would read outside the table in the kernel: on the CPU (the interpreter) a clear error;
    on CUDA a device-side assert, so the hot path never waits for the device to read the labels back."""
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"kernels/losses.py: labels must be an integer vector [B], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if labels.is_cuda:
        torch._assert_async(((labels >= 0) & (labels < n)).all())
    elif labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
        raise ValueError(f"kernels/losses.py: labels must lie in 0..{n - 1} (one per {what}), got "
                         f"{int(labels.min())}..{int(labels.max())}")


# ----------------------------------------------------------------------------------------------------------
# pull-push: mean_b max(||a - p + eps|| - ||a - n + eps|| + margin, 0)


def pull_push_reference(anchor, positive, negative, margin=1.5):
    """DAPT's visual pull-push: mean_b max(d(a, p) - d(a, n) + margin, 0), d(a, b) = ||a - b + 1e-6||_2, which is
    torch.nn.functional.triplet_margin_loss (p=2, eps=1e-6, no swap; the official code calls it). anchor, positive,
    negative: [B, D] (DAPT passes normalised full / foreground / background features, the views detached)."""
    return F.triplet_margin_loss(anchor, positive, negative, margin=margin, p=2, eps=1e-6, swap=False)


@triton.jit
def _pull_push_fwd(A, P, N, LOSS, DPOS, DNEG, Bn, D, sa, sp, sn, margin, eps,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    r_ok = rows < Bn
    s_pos = tl.zeros([BLOCK_B], tl.float32)
    s_neg = tl.zeros([BLOCK_B], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = r_ok[:, None] & (cols[None, :] < D)
        a = tl.load(A + rows[:, None] * sa + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        p = tl.load(P + rows[:, None] * sp + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        n = tl.load(N + rows[:, None] * sn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        u = tl.where(ok, a - p + eps, 0.0)
        w = tl.where(ok, a - n + eps, 0.0)
        s_pos += tl.sum(u * u, 1)
        s_neg += tl.sum(w * w, 1)
    d_pos = tl.sqrt(s_pos)
    d_neg = tl.sqrt(s_neg)
    tl.store(LOSS + rows, tl.maximum(d_pos - d_neg + margin, 0.0), mask=r_ok)
    tl.store(DPOS + rows, d_pos, mask=r_ok)
    tl.store(DNEG + rows, d_neg, mask=r_ok)


@triton.jit
def _pull_push_bwd(A, P, N, G, DPOS, DNEG, GA, GP, GN, Bn, D, sa, sp, sn, sg, margin, eps,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/da = g (u / d_pos - w / d_neg), dL/dp = -g u / d_pos, dL/dn = g w / d_neg where the hinge is open
    (clamp passes the gradient at 0, as torch does; a zero distance has gradient 0, as torch's norm)."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    r_ok = rows < Bn
    d_pos = tl.load(DPOS + rows, mask=r_ok, other=1.0)
    d_neg = tl.load(DNEG + rows, mask=r_ok, other=1.0)
    g = tl.load(G + rows * sg, mask=r_ok, other=0.0).to(tl.float32)
    g = tl.where(d_pos - d_neg + margin >= 0.0, g, 0.0)
    g_pos = tl.where(d_pos > 0.0, g / d_pos, 0.0)
    g_neg = tl.where(d_neg > 0.0, g / d_neg, 0.0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = r_ok[:, None] & (cols[None, :] < D)
    a = tl.load(A + rows[:, None] * sa + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    p = tl.load(P + rows[:, None] * sp + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    n = tl.load(N + rows[:, None] * sn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    gu = g_pos[:, None] * (a - p + eps)
    gw = g_neg[:, None] * (a - n + eps)
    out = rows[:, None] * D + cols[None, :]
    tl.store(GA + out, (gu - gw).to(GA.dtype.element_ty), mask=ok)
    tl.store(GP + out, (-gu).to(GP.dtype.element_ty), mask=ok)
    tl.store(GN + out, gw.to(GN.dtype.element_ty), mask=ok)


class _PullPush(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, p, n, margin):
        a, p, n = (x if x.stride(-1) == 1 else x.contiguous() for x in (a, p, n))
        Bn, D = a.shape
        loss, d_pos, d_neg = (torch.empty(Bn, dtype=torch.float32, device=a.device) for _ in range(3))
        _pull_push_fwd[(triton.cdiv(Bn, 32),)](a, p, n, loss, d_pos, d_neg, Bn, D, a.stride(0), p.stride(0),
                                               n.stride(0), margin, 1e-6, BLOCK_B=32, BLOCK_D=128)
        ctx.save_for_backward(a, p, n, d_pos, d_neg)
        ctx.margin = margin
        return loss  # [B] float32 hinge per row

    @staticmethod
    def backward(ctx, g):
        a, p, n, d_pos, d_neg = ctx.saved_tensors
        Bn, D = a.shape
        ga, gp, gn = (torch.empty(Bn, D, dtype=x.dtype, device=x.device) for x in (a, p, n))
        _pull_push_bwd[(triton.cdiv(Bn, 32), triton.cdiv(D, 128))](
            a, p, n, g, d_pos, d_neg, ga, gp, gn, Bn, D, a.stride(0), p.stride(0), n.stride(0), g.stride(0),
            ctx.margin, 1e-6, BLOCK_B=32, BLOCK_D=128)
        return ga, gp, gn, None


def pull_push_triton(anchor, positive, negative, margin=1.5):
    """pull_push_reference, fused: anchor, positive, negative [B, D] -> scalar (anchor's dtype)."""
    _need_triton()
    if anchor.dim() != 2 or positive.shape != anchor.shape or negative.shape != anchor.shape:
        raise ValueError(f"kernels.pull_push_loss: anchor, positive, negative must all be [B, D], got "
                         f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}")
    return _PullPush.apply(anchor, positive, negative, float(margin)).mean().to(anchor.dtype)


def pull_push_loss(anchor, positive, negative, margin=1.5, backend=None):
    """DAPT's visual pull-push (pull_push_reference), fused on CUDA; differentiable in all three inputs."""
    if use_triton(backend, anchor, positive, negative):
        return pull_push_triton(anchor, positive, negative, margin)
    return pull_push_reference(anchor, positive, negative, margin)


# ----------------------------------------------------------------------------------------------------------
# inter-class dispersion: mean_{i<j} exp(-t ||w_i - w_j||^2), tiled over class blocks


def inter_dispersion_reference(text_features, t=2.0):
    """Distribution-aware PT's inter-class dispersion: mean over pairs i < j of exp(-t ||w_i - w_j||^2).

    text_features: [C, D] (the method passes L2-normalised class features). Computed in float32."""
    w = text_features.float()
    C = w.shape[0]
    if C < 2:
        return w.sum() * 0.0
    d2 = (w[:, None, :] - w[None, :, :]).pow(2).sum(-1)  # [C, C]
    i, j = torch.triu_indices(C, C, offset=1, device=w.device)
    return torch.exp(-t * d2[i, j]).mean()


@triton.jit
def _sq_dist_tile(W, rows_i, rows_j, C, D, sw, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """||w_i - w_j||^2 for a [BI, BJ] tile, as |w_i|^2 + |w_j|^2 - 2 w_i.w_j accumulated over D chunks."""
    dot = tl.zeros([BLOCK_C, BLOCK_C], tl.float32)
    n_i = tl.zeros([BLOCK_C], tl.float32)
    n_j = tl.zeros([BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_ok = cols[None, :] < D
        wi = tl.load(W + rows_i[:, None] * sw + cols[None, :], mask=(rows_i[:, None] < C) & c_ok, other=0.0)
        wj = tl.load(W + rows_j[:, None] * sw + cols[None, :], mask=(rows_j[:, None] < C) & c_ok, other=0.0)
        wi = wi.to(tl.float32)
        wj = wj.to(tl.float32)
        dot = tl.dot(wi, tl.trans(wj), dot, input_precision=PREC)
        n_i += tl.sum(wi * wi, 1)
        n_j += tl.sum(wj * wj, 1)
    return tl.maximum(n_i[:, None] + n_j[None, :] - 2.0 * dot, 0.0)


@triton.jit
def _inter_fwd(W, PART, C, D, sw, t, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """PART[i] = sum_{j > i} exp(-t d2_ij) for the rows of this class block (j blocks from the diagonal on)."""
    ib = tl.program_id(0)
    rows_i = (ib * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for jb in range(ib, tl.cdiv(C, BLOCK_C)):
        rows_j = (jb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        d2 = _sq_dist_tile(W, rows_i, rows_j, C, D, sw, BLOCK_C, BLOCK_D, PREC)
        pair = (rows_j[None, :] > rows_i[:, None]) & (rows_j[None, :] < C)
        acc += tl.sum(tl.where(pair, tl.exp(-t * d2), 0.0), 1)
    tl.store(PART + rows_i, acc, mask=rows_i < C)


@triton.jit
def _inter_bwd(W, G, GW, C, D, sw, t, coef, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """dL/dw_i = coef * g * (w_i sum_j e_ij - sum_j e_ij w_j), j != i, coef = -2t / n_pairs; one (class block,
    feature chunk) per program, so the accumulator stays [BLOCK_C, BLOCK_D] (d2 is recomputed per chunk)."""
    rows_i = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = cols[None, :] < D
    row_sum = tl.zeros([BLOCK_C], tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for jb in range(0, tl.cdiv(C, BLOCK_C)):
        rows_j = (jb * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        d2 = _sq_dist_tile(W, rows_i, rows_j, C, D, sw, BLOCK_C, BLOCK_D, PREC)
        e = tl.where((rows_j[None, :] != rows_i[:, None]) & (rows_j[None, :] < C), tl.exp(-t * d2), 0.0)
        row_sum += tl.sum(e, 1)
        wj = tl.load(W + rows_j[:, None] * sw + cols[None, :], mask=(rows_j[:, None] < C) & c_ok, other=0.0)
        acc = tl.dot(e, wj.to(tl.float32), acc, input_precision=PREC)
    ok = (rows_i[:, None] < C) & c_ok
    wi = tl.load(W + rows_i[:, None] * sw + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G).to(tl.float32) * coef
    tl.store(GW + rows_i[:, None] * D + cols[None, :], (g * (wi * row_sum[:, None] - acc)).to(GW.dtype.element_ty),
             mask=ok)


_BLOCK_C = 32


class _InterDispersion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, t):
        w = w if w.stride(-1) == 1 else w.contiguous()
        C, D = w.shape
        part = torch.empty(C, dtype=torch.float32, device=w.device)
        _inter_fwd[(triton.cdiv(C, _BLOCK_C),)](w, part, C, D, w.stride(0), t, BLOCK_C=_BLOCK_C, BLOCK_D=64,
                                                PREC=_prec(w.device))
        ctx.save_for_backward(w)
        ctx.t = t
        return part.sum() / (C * (C - 1) / 2)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        C, D = w.shape
        gw = torch.empty(C, D, dtype=w.dtype, device=w.device)
        coef = -2.0 * ctx.t / (C * (C - 1) / 2)
        # 8 warps: on 4 the [32, 64] accumulator beside the recomputed distance tile spills; on 8 nothing, or 12 bytes
        # in float32 on sm_90 with triton 3.6 (ptxas, tests/test_gpu_compile.py)
        _inter_bwd[(triton.cdiv(C, _BLOCK_C), triton.cdiv(D, 64))](
            w, g.reshape(1).float(), gw, C, D, w.stride(0), ctx.t, coef, BLOCK_C=_BLOCK_C, BLOCK_D=64,
            PREC=_prec(w.device), num_warps=8)
        return gw, None


def inter_dispersion_triton(text_features, t=2.0):
    """inter_dispersion_reference, fused: text_features [C, D] -> float32 scalar; memory O(C), not O(C^2)."""
    _need_triton()
    if text_features.dim() != 2:
        raise ValueError(f"kernels.inter_dispersion_loss: text_features must be [C, D], got "
                         f"{tuple(text_features.shape)}")
    if text_features.shape[0] < 2:  # no pair: 0, connected to the graph like the reference
        return text_features.float().sum() * 0.0
    return _InterDispersion.apply(text_features, float(t))


def inter_dispersion_loss(text_features, t=2.0, backend=None):
    """Distribution-aware PT's inter-class dispersion (inter_dispersion_reference); memory linear in C on CUDA."""
    if use_triton(backend, text_features):
        return inter_dispersion_triton(text_features, t)
    return inter_dispersion_reference(text_features, t)


# ----------------------------------------------------------------------------------------------------------
# intra-class dispersion: mean_{b, d} (z_bd - proto_{y_b, d})^2


def intra_dispersion_reference(image_features, prototypes, labels):
    """Distribution-aware PT's intra-class dispersion: mean over batch and dimensions of
    (z_b - proto_{y_b})^2. image_features [B, D], prototypes [C, D] (fixed), labels [B]."""
    return F.mse_loss(image_features.float(), prototypes.float()[labels])


@triton.jit
def _intra_fwd(Z, PROTO, LAB, PART, Bn, D, sz, spr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    r_ok = rows < Bn
    lab = tl.load(LAB + rows, mask=r_ok, other=0)
    acc = tl.zeros([BLOCK_B], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = r_ok[:, None] & (cols[None, :] < D)
        z = tl.load(Z + rows[:, None] * sz + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        pr = tl.load(PROTO + lab[:, None] * spr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum((z - pr) * (z - pr), 1)
    tl.store(PART + rows, acc, mask=r_ok)


@triton.jit
def _intra_bwd(Z, PROTO, LAB, G, GZ, Bn, D, sz, spr, coef, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """GZ = coef * g * (z - proto_y) in float32, coef = 2 / (B D); the prototypes' gradient is -GZ summed per class."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = rows < Bn
    ok = r_ok[:, None] & (cols[None, :] < D)
    lab = tl.load(LAB + rows, mask=r_ok, other=0)
    z = tl.load(Z + rows[:, None] * sz + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    pr = tl.load(PROTO + lab[:, None] * spr + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G).to(tl.float32) * coef
    tl.store(GZ + rows[:, None] * D + cols[None, :], g * (z - pr), mask=ok)


class _IntraDispersion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, proto, labels):
        z, proto = (x if x.stride(-1) == 1 else x.contiguous() for x in (z, proto))
        Bn, D = z.shape
        part = torch.empty(Bn, dtype=torch.float32, device=z.device)
        _intra_fwd[(triton.cdiv(Bn, 32),)](z, proto, labels, part, Bn, D, z.stride(0), proto.stride(0),
                                           BLOCK_B=32, BLOCK_D=128)
        ctx.save_for_backward(z, proto, labels)
        return part.sum() / (Bn * D)

    @staticmethod
    def backward(ctx, g):
        z, proto, labels = ctx.saved_tensors
        Bn, D = z.shape
        gz = torch.empty(Bn, D, dtype=torch.float32, device=z.device)
        _intra_bwd[(triton.cdiv(Bn, 32), triton.cdiv(D, 128))](z, proto, labels, g.reshape(1).float(), gz, Bn, D,
                                                               z.stride(0), proto.stride(0), 2.0 / (Bn * D),
                                                               BLOCK_B=32, BLOCK_D=128)
        g_proto = None
        if ctx.needs_input_grad[1]:
            g_proto = torch.zeros(proto.shape, dtype=torch.float32, device=z.device).index_add_(0, labels, -gz)
            g_proto = g_proto.to(proto.dtype)
        return gz.to(z.dtype), g_proto, None


def intra_dispersion_triton(image_features, prototypes, labels):
    """intra_dispersion_reference, fused: image_features [B, D], prototypes [C, D], labels [B] -> float32 scalar."""
    _need_triton()
    if image_features.dim() != 2 or prototypes.dim() != 2 or prototypes.shape[1] != image_features.shape[1]:
        raise ValueError(f"kernels.intra_dispersion_loss: image_features [B, D] and prototypes [C, D] expected, "
                         f"got {tuple(image_features.shape)}, {tuple(prototypes.shape)}")
    _check_labels(labels, prototypes.shape[0], "prototype")
    return _IntraDispersion.apply(image_features, prototypes, labels.contiguous())


def intra_dispersion_loss(image_features, prototypes, labels, backend=None):
    """Distribution-aware PT's intra-class dispersion (intra_dispersion_reference), a fused gather on CUDA."""
    if use_triton(backend, image_features, prototypes):
        return intra_dispersion_triton(image_features, prototypes, labels)
    return intra_dispersion_reference(image_features, prototypes, labels)


# ----------------------------------------------------------------------------------------------------------
# proxy-anchor: per proxy k, log(1 + sum_{i: y_i = k} exp(-alpha (s_ik - delta))) and
# log(1 + sum_{i: y_i != k} exp(alpha (s_ik + delta))), s = scale * cos(x_i, p_k)


def proxy_anchor_reference(samples, proxies, labels, alpha=32.0, delta=0.1, scale=1.0, paper_norm=False):
    """Proxy-Anchor (DA-VPT): samples [B, D], proxies [M, D], labels [B] in 0..M-1 (mapped class -> proxy).

    sim = scale * cos(x_i, p_k);
    L = (1/M) sum_k log(1 + sum_{i: k_i = k} exp(-alpha (sim_ik - delta)))
      + (1/M) sum_k log(1 + sum_{i: k_i != k} exp( alpha (sim_ik + delta))).
    A proxy without positives adds 0 to the first sum but counts in its 1/M; paper_norm divides the first sum
    by the number of proxies with positives instead (the paper's Eq. 4). log(1 + sum exp) is evaluated as a
    logsumexp with a zero term, so large scales do not overflow."""
    sim = scale * F.normalize(samples.float(), dim=-1) @ F.normalize(proxies.float(), dim=-1).t()  # [B, M]
    M = proxies.shape[0]
    pos = F.one_hot(labels, M).bool()  # [B, M]
    zeros = sim.new_zeros(1, M)
    pos_logits = torch.cat([zeros, (-alpha * (sim - delta)).masked_fill(~pos, float("-inf"))], dim=0)
    neg_logits = torch.cat([zeros, (alpha * (sim + delta)).masked_fill(pos, float("-inf"))], dim=0)
    pos_term = torch.logsumexp(pos_logits, dim=0)  # [M], 0 for a proxy without positives
    neg_term = torch.logsumexp(neg_logits, dim=0)  # [M]
    n_pos = pos.any(0).sum().clamp_min(1) if paper_norm else M
    return pos_term.sum() / n_pos + neg_term.sum() / M


@triton.jit
def _proxy_logits(X, P, LAB, b0, cols, Bn, M, D, sx, sp, alpha, delta, scale,
                  BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """The [BB, BM] tile: positive logits -alpha (s - delta) where y_i = k, negative logits alpha (s + delta)
    where y_i != k, -inf elsewhere (other label, or padding)."""
    rows = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
    r_ok = rows < Bn
    sim = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + rows[:, None] * sx + dd[None, :], mask=r_ok[:, None] & (dd[None, :] < D), other=0.0)
        p = tl.load(P + cols[:, None] * sp + dd[None, :], mask=(cols[:, None] < M) & (dd[None, :] < D), other=0.0)
        sim = tl.dot(x, tl.trans(p), sim, input_precision=PREC)
    sim = sim * scale
    lab = tl.load(LAB + rows, mask=r_ok, other=-1)
    ok = r_ok[:, None] & (cols[None, :] < M)
    pos = ok & (lab[:, None] == cols[None, :])
    neg = ok & (lab[:, None] != cols[None, :])
    return tl.where(pos, -alpha * (sim - delta), float("-inf")), tl.where(neg, alpha * (sim + delta), float("-inf"))


@triton.jit
def _proxy_fwd(X, P, LAB, LSE_POS, LSE_NEG, Bn, M, D, sx, sp, alpha, delta, scale,
               BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Per proxy column: logsumexp over {0} and the batch's logits, online (running max starts at the 0 term)."""
    cols = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_pos = tl.zeros([BLOCK_M], tl.float32)
    s_pos = tl.full([BLOCK_M], 1.0, tl.float32)  # exp(0 - 0) of the zero term
    m_neg = tl.zeros([BLOCK_M], tl.float32)
    s_neg = tl.full([BLOCK_M], 1.0, tl.float32)
    for b0 in range(0, Bn, BLOCK_B):
        lp, ln = _proxy_logits(X, P, LAB, b0, cols, Bn, M, D, sx, sp, alpha, delta, scale, BLOCK_B, BLOCK_M, BLOCK_D,
                               PREC)
        new = tl.maximum(m_pos, tl.max(lp, 0))
        s_pos = s_pos * tl.exp(m_pos - new) + tl.sum(tl.exp(lp - new[None, :]), 0)
        m_pos = new
        new = tl.maximum(m_neg, tl.max(ln, 0))
        s_neg = s_neg * tl.exp(m_neg - new) + tl.sum(tl.exp(ln - new[None, :]), 0)
        m_neg = new
    tl.store(LSE_POS + cols, m_pos + tl.log(s_pos), mask=cols < M)
    tl.store(LSE_NEG + cols, m_neg + tl.log(s_neg), mask=cols < M)


@triton.jit
def _proxy_bwd(X, P, LAB, LSE_POS, LSE_NEG, G_POS, G_NEG, DSIM, Bn, M, D, sx, sp, alpha, delta, scale,
               BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """DSIM[i, k] = dL/d(x_i . p_k) = scale * alpha * (-g_pos_k softmax_pos_ik + g_neg_k softmax_neg_ik)."""
    b0 = tl.program_id(0) * BLOCK_B
    cols = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    c_ok = cols < M
    lp, ln = _proxy_logits(X, P, LAB, b0, cols, Bn, M, D, sx, sp, alpha, delta, scale, BLOCK_B, BLOCK_M, BLOCK_D, PREC)
    g_pos = tl.load(G_POS + cols, mask=c_ok, other=0.0)
    g_neg = tl.load(G_NEG + cols, mask=c_ok, other=0.0)
    w_pos = tl.exp(lp - tl.load(LSE_POS + cols, mask=c_ok, other=0.0)[None, :])  # 0 where -inf
    w_neg = tl.exp(ln - tl.load(LSE_NEG + cols, mask=c_ok, other=0.0)[None, :])
    d = scale * alpha * (g_neg[None, :] * w_neg - g_pos[None, :] * w_pos)
    rows = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
    tl.store(DSIM + rows[:, None] * M + cols[None, :], d, mask=(rows[:, None] < Bn) & c_ok[None, :])


class _ProxyAnchor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, labels, alpha, delta, scale):
        Bn, D = x.shape
        M = p.shape[0]
        lse_pos = torch.empty(M, dtype=torch.float32, device=x.device)
        lse_neg = torch.empty_like(lse_pos)
        consts = dict(BLOCK_B=32, BLOCK_M=32, BLOCK_D=64, PREC=_prec(x.device))
        _proxy_fwd[(triton.cdiv(M, 32),)](x, p, labels, lse_pos, lse_neg, Bn, M, D, x.stride(0), p.stride(0),
                                          alpha, delta, scale, **consts)
        ctx.save_for_backward(x, p, labels, lse_pos, lse_neg)
        ctx.args = (alpha, delta, scale)
        ctx.consts = consts
        return lse_pos, lse_neg  # [M] each: the per-proxy positive and negative terms

    @staticmethod
    def backward(ctx, g_pos, g_neg):
        x, p, labels, lse_pos, lse_neg = ctx.saved_tensors
        Bn, D = x.shape
        M = p.shape[0]
        g_pos = torch.zeros_like(lse_pos) if g_pos is None else g_pos.float().contiguous()
        g_neg = torch.zeros_like(lse_neg) if g_neg is None else g_neg.float().contiguous()
        dsim = torch.empty(Bn, M, dtype=torch.float32, device=x.device)
        _proxy_bwd[(triton.cdiv(Bn, 32), triton.cdiv(M, 32))](x, p, labels, lse_pos, lse_neg, g_pos, g_neg, dsim,
                                                              Bn, M, D, x.stride(0), p.stride(0), *ctx.args,
                                                              **ctx.consts)
        return dsim @ p, dsim.t() @ x, None, None, None, None


def proxy_anchor_triton(samples, proxies, labels, alpha=32.0, delta=0.1, scale=1.0, paper_norm=False):
    """proxy_anchor_reference, fused: samples [B, D], proxies [M, D], labels [B] in 0..M-1 -> float32 scalar."""
    _need_triton()
    if samples.dim() != 2 or proxies.dim() != 2 or proxies.shape[1] != samples.shape[1]:
        raise ValueError(f"kernels.proxy_anchor_loss: samples [B, D] and proxies [M, D] expected, got "
                         f"{tuple(samples.shape)}, {tuple(proxies.shape)}")
    M = proxies.shape[0]
    _check_labels(labels, M, "proxy")
    x = F.normalize(samples.float(), dim=-1)
    p = F.normalize(proxies.float(), dim=-1)
    pos_term, neg_term = _ProxyAnchor.apply(x, p, labels.contiguous(), float(alpha), float(delta), float(scale))
    n_pos = (torch.bincount(labels, minlength=M) > 0).sum().clamp_min(1) if paper_norm else M
    return pos_term.sum() / n_pos + neg_term.sum() / M


def proxy_anchor_loss(samples, proxies, labels, alpha=32.0, delta=0.1, scale=1.0, paper_norm=False, backend=None):
    """Proxy-Anchor (DA-VPT; proxy_anchor_reference); similarity and both reductions in one kernel on CUDA."""
    if use_triton(backend, samples, proxies):
        return proxy_anchor_triton(samples, proxies, labels, alpha, delta, scale, paper_norm)
    return proxy_anchor_reference(samples, proxies, labels, alpha, delta, scale, paper_norm)
