"""Triton kernels for the GPU hot path, each behind a dispatcher that falls back to its PyTorch reference.

Every entry point takes `backend=None | "triton" | "torch"`: None picks Triton on CUDA tensors (when triton
imports) and the PyTorch reference elsewhere; "triton" forces the kernel (on CPU tensors it needs
TRITON_INTERPRET=1, which is how the tests check it); "torch" forces the reference.
"""
import torch

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
    """softmax(q k^T * scale + mask) v on [B, H, L, D]; key_mask bool [B, L], True = visible key."""
    if _use_triton(backend, q, k, v):
        from .attention import triton_attention

        return triton_attention(q, k, v, key_mask, causal=causal, scale=scale)
    return attention_reference(q, k, v, key_mask, causal=causal, scale=scale)
