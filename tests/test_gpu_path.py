"""What a GPU run relies on, checked on the CPU: a training step never reads a value back from the device (each
method's loss and the training loop keep their numbers as tensors), and the attention dispatcher's choices."""
import contextlib

import pytest
import torch

import dapt
import kernels
import recipes
from conftest import NAMES, SMALL_CONFIG, random_clip, toy_batch

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Fail on any tensor -> Python value read (what synchronises a CUDA device) inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def refuse(name):
        def read(self, *a, **k):
            raise AssertionError(f"Tensor.{name}() on the hot path (a device synchronisation on CUDA)")
        return read

    for name in READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


def model_of(method):
    clip = random_clip(SMALL_CONFIG)
    cfg = recipes.resolve_config(method, "toy", {"subsample": "base"})
    if method == "fvgpt":
        host = dapt.CoOp(clip, NAMES, recipes.resolve_config("coop", "toy", {"subsample": "base"}))
        return dapt.FVGPT(host, NAMES, cfg)
    model = dapt.build_model(method, clip, NAMES, dict(cfg, cue="masks"))
    if method == "dapt-dist":
        model.prototypes = torch.randn(len(NAMES), 64)
    return model


@pytest.mark.parametrize("method", [m for m in dapt.METHODS if m != "zsclip"])
def test_a_training_step_reads_nothing_back_from_the_device(method):
    model = model_of(method)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    batch = toy_batch()
    for guard in (contextlib.nullcontext, no_host_reads):  # the first step may read what it caches (EOT positions)
        with guard():
            loss, stats = model.loss(batch, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    assert all(torch.is_tensor(v) for v in stats.values())  # stats stay tensors until a progress line


def test_the_reads_guard_catches_a_read():
    with pytest.raises(AssertionError, match="hot path"), no_host_reads():
        torch.ones(2).sum().item()


def test_attention_auto_choice(monkeypatch):
    """auto: SDPA on the CPU; on CUDA, SDPA without a key mask and the Triton kernel with one in half precision (until
    a GPU benchmark shows the kernel ahead elsewhere); float32 goes to SDPA unless torch allows TF32 (full-precision
    dots cannot use tensor cores)."""
    assert kernels.describe_backend("auto", "cpu") == "auto: PyTorch SDPA"
    assert "Triton masked-attention kernel where a key mask" in kernels.describe_backend("auto", "cuda")
    calls = []
    monkeypatch.setattr(kernels.attention, "triton_attention", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(kernels.attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append("sdpa"))
    monkeypatch.setattr(kernels.attention, "use_triton", lambda backend, *t: True)  # as on a CUDA device
    q, mask = torch.randn(1, 1, 4, 8), torch.ones(1, 4, dtype=torch.bool)
    kernels.masked_attention(q, q, q)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        kernels.masked_attention(q.to(dtype), q.to(dtype), q.to(dtype), key_mask=mask)
    monkeypatch.setattr(kernels.attention, "tf32_allowed", lambda: True)  # torch.set_float32_matmul_precision("high")
    kernels.masked_attention(q, q, q, key_mask=mask)
    kernels.masked_attention(q, q, q, key_mask=mask, backend="triton")  # forced: the kernel whatever the dtype
    assert calls == ["sdpa", "triton", "triton", "sdpa", "triton", "triton"]
