"""Prompt-augmented masked attention: the PyTorch reference (the Triton kernel is added beside it)."""
import math

import torch


def attention_reference(q, k, v, key_mask=None, causal=False, scale=None):
    """Eager attention on [B, H, L, D]: scores in float32, softmax, then cast back to q's dtype.

    key_mask: bool [B, Lk], True = visible key. causal: query i sees keys j <= i (+ Lk - Lq offset)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    Lq, Lk = q.shape[-2], k.shape[-2]
    if causal:
        allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        s = s.masked_fill(~allowed, float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ v.float()).to(q.dtype)
