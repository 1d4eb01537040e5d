"""Triton kernels for the GPU hot path, each behind a dispatcher that falls back to its PyTorch reference.

Every entry point takes `backend=None | "triton" | "torch"`: None picks Triton on CUDA tensors (when triton
imports) and the PyTorch reference elsewhere; "triton" forces the kernel (on CPU tensors it needs
TRITON_INTERPRET=1, which is how the tests check it); "torch" forces the reference.

- masked_attention: kernels/attention.py (reference: attention_reference there)
- pull_push_loss, inter_dispersion_loss, intra_dispersion_loss, proxy_anchor_loss: kernels/losses.py
  (references: the functions of the same names in dapt.py, imported lazily: dapt -> clip -> kernels).
The benchmark is `python -m kernels.bench`. Deliberately not here: autotuning, a registry of kernels.
"""
from .attention import attention_reference


def _use_triton(backend, *tensors):
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend {backend!r}: expected None, 'triton' or 'torch'")
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if not all(t.is_cuda for t in tensors):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def masked_attention(q, k, v, key_mask=None, causal=False, scale=None, backend=None):
    """softmax(q k^T * scale + mask) v on [B, H, L, D]; key_mask bool [B, L], True = visible key.

    Fully masked key blocks are skipped by the kernel; a query that sees no key gets 0 (and gradient 0)."""
    if _use_triton(backend, q, k, v):
        from .attention import triton_attention

        return triton_attention(q, k, v, key_mask, causal=causal, scale=scale)
    return attention_reference(q, k, v, key_mask, causal=causal, scale=scale)


def pull_push_loss(anchor, positive, negative, margin=1.5, backend=None):
    """dapt.pull_push_loss, fused; differentiable in all three inputs (callers may detach two)."""
    if _use_triton(backend, anchor, positive, negative):
        from . import losses

        return losses.pull_push_loss(anchor, positive, negative, margin)
    import dapt

    return dapt.pull_push_loss(anchor, positive, negative, margin)


def inter_dispersion_loss(text_features, t=2.0, backend=None):
    """dapt.inter_dispersion_loss, tiled over class blocks (memory linear in the number of classes)."""
    if _use_triton(backend, text_features):
        from . import losses

        return losses.inter_dispersion_loss(text_features, t)
    import dapt

    return dapt.inter_dispersion_loss(text_features, t)


def intra_dispersion_loss(image_features, prototypes, labels, backend=None):
    """dapt.intra_dispersion_loss, fused gather + squared distance."""
    if _use_triton(backend, image_features, prototypes):
        from . import losses

        return losses.intra_dispersion_loss(image_features, prototypes, labels)
    import dapt

    return dapt.intra_dispersion_loss(image_features, prototypes, labels)


def proxy_anchor_loss(samples, proxies, labels, alpha=32.0, delta=0.1, scale=1.0, paper_norm=False, backend=None):
    """dapt.proxy_anchor_loss; the similarity and both masked logsumexp reductions run in one kernel."""
    if _use_triton(backend, samples, proxies):
        from . import losses

        return losses.proxy_anchor_loss(samples, proxies, labels, alpha, delta, scale, paper_norm)
    import dapt

    return dapt.proxy_anchor_loss(samples, proxies, labels, alpha, delta, scale, paper_norm)
