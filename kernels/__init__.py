"""Triton kernels for the GPU hot path, each beside the PyTorch reference it is tested against.

- kernels/attention.py: `attention_reference`, the masked-attention kernel (forward + backward),
  `triton_attention`, and `masked_attention`, the one attention dispatcher (eager | sdpa | triton) the CLIP
  towers call;
- kernels/losses.py: per method loss, `<name>_reference` (the formula), the fused kernel, `<name>_triton` and
  the dispatcher `<name>_loss`: pull_push_loss, inter_dispersion_loss, intra_dispersion_loss, proxy_anchor_loss.

Every entry point takes `backend`: None picks Triton on CUDA tensors (when triton imports) and the PyTorch
reference elsewhere (for attention: SDPA, and the kernel on CUDA only where a key mask is given, in half precision
or in float32 where torch allows TF32); "triton" forces the kernel (on CPU tensors it needs TRITON_INTERPRET=1,
which is how the tests check it without a GPU); "torch" forces the reference. The benchmark is `python -m
kernels.bench`. Deliberately not here: autotuning, a registry of kernels.
"""
from .attention import (ATTN_BACKENDS, attention_reference, describe_backend, masked_attention,  # noqa: F401
                        triton_attention, use_triton)
from .losses import (inter_dispersion_loss, inter_dispersion_reference, intra_dispersion_loss,  # noqa: F401
                     intra_dispersion_reference, proxy_anchor_loss, proxy_anchor_reference, pull_push_loss,
                     pull_push_reference)
