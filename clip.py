"""CLIP (ViT image tower + causal text tower) with OpenAI's parameter names, and its checkpoint loaders.

What is here:
- the model: pre-LN transformer blocks with QuickGELU, LayerNorm computed in float32, a causal text tower
  read at the end-of-text token, `encode_image` / `encode_text` (not normalised, as OpenAI's);
- hooks the prompt methods need and nothing more: image prompt tokens appended after the patch tokens,
  deep prompts replaced before chosen blocks, a per-sequence key mask (token-level views), and the
  exact text-side saving of cutting sequences at the last end-of-text token;
- `build_clip(state_dict)`: every size inferred from shapes and key names (OpenAI's `build_model` rules);
- `load_clip(name_or_path)`: official names (download + sha256), OpenAI TorchScript archives read without
  running their code, plain state dicts, safetensors with OpenAI or Hugging Face key names.

What is deliberately not here: ResNet image towers (a clear error), training code, prompt methods
(`dapt.py`), the tokenizer (`tokenizer.py`), attention kernels and their dispatcher (`kernels/`).
Tensors are batch-first ([batch, length, width]); OpenAI's code is length-first, the weights are the same.
"""
import hashlib
import http.client
import io
import json
import logging
import math
import os
import pickle
import re
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ATTN_BACKENDS, masked_attention

# ----------------------------------------------------------------------------------------------------------
# the model


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (OpenAI's fp16 models depend on it)."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): what OpenAI's CLIP was trained with. Exact GELU here is a silent accuracy loss."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # packed q, k, v (this order)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.backend = "auto"  # kernels.masked_attention's backend (CLIP.set_attention)

    def qkv(self, x, bias=None):
        """x [B, L, W] -> q, k, v each [B, H, L, W/H]. `bias` overrides in_proj_bias (DA-VPT+ bias tuning)."""
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias if bias is None else bias)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x, causal=False, key_mask=None, bias=None, attn_mask=None, capture=None):
        """x [B, L, W] -> [B, L, W]. key_mask bool [B, L] (True = visible key); attn_mask: a bool [L, L] mask
        (True = allowed; DA-VPT's proxy mask, run by SDPA); capture: a dict that receives q, k, v [B, H, L, W/H]
        and the heads' output o [B, H, L, W/H] before out_proj (DA-VPT's guided blocks, attention pictures)."""
        B, L, W = x.shape
        q, k, v = self.qkv(x, bias)
        if attn_mask is not None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            o = masked_attention(q, k, v, key_mask, causal=causal, backend=self.backend)
        if capture is not None:
            capture.update(q=q, k=k, v=v, o=o)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, W))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))

    def forward(self, x, causal=False, key_mask=None, **attn_kw):
        """x [B, L, W], or (prefix, suffix) for causal sequences with a shared prefix (forward_prefixed)."""
        if isinstance(x, tuple):
            return self.forward_prefixed(*x)
        x = x + self.attn(self.ln_1(x), causal=causal, key_mask=key_mask, **attn_kw)
        return x + self.mlp(self.ln_2(x))

    def forward_prefixed(self, xp, xs):
        """Causal block over [prefix; suffix] sequences whose prefix is shared: xp [G, P, W] holds G distinct
        prefixes, xs [G * R, S, W] the suffixes (R per prefix, prefix-major). The prefix rows are computed once
        per group instead of once per sequence; the suffix queries attend to the group's prefix keys and to the
        suffix causally. Same output as running the R full sequences (exact saving, design.md)."""
        G, P, W = xp.shape
        R = xs.shape[0] // G
        qp, kp, vp = self.attn.qkv(self.ln_1(xp))  # [G, H, P, D]
        qs, ks, vs = self.attn.qkv(self.ln_1(xs))  # [G*R, H, S, D]
        op = masked_attention(qp, kp, vp, causal=True, backend=self.attn.backend)
        k = torch.cat([kp.repeat_interleave(R, dim=0), ks], dim=2)  # [G*R, H, P+S, D]
        v = torch.cat([vp.repeat_interleave(R, dim=0), vs], dim=2)
        os_ = masked_attention(qs, k, v, causal=True, backend=self.attn.backend)  # query i sees keys <= P + i
        xp = xp + self.attn.out_proj(op.transpose(1, 2).reshape(G, P, W))
        xs = xs + self.attn.out_proj(os_.transpose(1, 2).reshape(xs.shape))
        return xp + self.mlp(self.ln_2(xp)), xs + self.mlp(self.ln_2(xs))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, causal=False, key_mask=None, deep_prompts=None, prompt_slice=None, stop=None, hook=None,
                start=0):
        """The one loop over the blocks, for both towers and every prompt method.

        x: [B, L, W], or (prefix [G, P, W], suffix [G * R, S, W]) for causal sequences whose first P positions
        are shared within each of G groups (ResidualAttentionBlock.forward_prefixed; prompts lie in the prefix).
        deep_prompts: one entry per block (None = keep) of tokens [n, W] or [B, n, W] written into the prompt slot
        before that block. The slot starts as `prompt_slice` and then holds the written tokens, whose count may
        change from block to block (DA-VPT: M proxies in guided blocks, 8 prompts elsewhere).
        key_mask: bool [B, L0] for the first L0 tokens (CLS + patches); tokens after them (prompts) are visible.
        stop: return the input of block `stop` (its prompts written) instead of running every block (Grad-CAM).
        hook: f(i, x) -> keyword arguments for block i's attention (bias, attn_mask, capture; DA-VPT).
        start: x is the input of block `start` (what stop=start returned): the blocks before it are skipped (MMRL
        runs its frozen prompt-free blocks once and continues from there)."""
        for i, block in enumerate(self.resblocks):
            if i < start:
                continue
            if deep_prompts is not None and i < len(deep_prompts) and deep_prompts[i] is not None:
                x, prompt_slice = write_prompts(x, deep_prompts[i], prompt_slice)
            if i == stop:
                return x
            kw = hook(i, x) if hook is not None else {}
            if key_mask is not None and key_mask.shape[1] < x.shape[1]:  # prompt keys are always visible
                key_mask = F.pad(key_mask, (0, x.shape[1] - key_mask.shape[1]), value=True)
            x = block(x, causal=causal, key_mask=key_mask, **kw)
        return x


def write_prompts(x, tokens, sl):
    """(x with x[:, sl] replaced by tokens, the slice the tokens now occupy). x: [B, L, W] or a (prefix, suffix)
    pair (the slot lies in the prefix; the count must not change there)."""
    if isinstance(x, tuple):
        xp, _ = x
        start, stop, _ = sl.indices(xp.shape[1])
        if tokens.shape[-2] != stop - start:
            raise ValueError("prompts in a shared text prefix must keep their count")
        return (replace_tokens(xp, tokens, sl), x[1]), sl
    start, _, _ = sl.indices(x.shape[1])
    return replace_tokens(x, tokens, sl), slice(start, start + tokens.shape[-2])


def replace_tokens(x, tokens, sl):
    """Return x [B, L, W] with x[:, sl] replaced by tokens ([n, W] shared or [B, n, W]); out of place,
    so autograd sees the replacement and the discarded outputs get no gradient."""
    tokens = tokens.to(x.dtype)
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
    start, stop, _ = sl.indices(x.shape[1])
    return torch.cat([x[:, :start], tokens, x[:, stop:]], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution, self.patch_size = input_resolution, patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    @property
    def grid(self):
        return self.input_resolution // self.patch_size

    def embed(self, images):
        """images [B, 3, R, R] -> tokens [B, 1 + grid^2, W]: CLS first, positional embedding added."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)

    def forward(self, images, prompts=None, key_mask=None, hook=None):
        """Image features [B, E] (not normalised) of the tower prompted by `prompts` (a VisualPrompts or None).

        key_mask: bool [B, 1 + grid^2], True = visible key (token-level views); prompt tokens are always visible.
        hook: see Transformer.forward."""
        return self.head(self.run(images, prompts, key_mask, hook=hook))

    def run(self, images, prompts=None, key_mask=None, stop=None, hook=None):
        """The token sequence after the blocks [B, 1 + grid^2 + n, W] (or entering block `stop`)."""
        p = prompts or VisualPrompts()
        x = self.tokens(images, p.first, p.ln_pre)
        n = 0 if p.first is None else p.first.shape[-2]
        return self.transformer(x, key_mask=key_mask, deep_prompts=p.deep, prompt_slice=slice(x.shape[1] - n, None),
                                stop=stop, hook=hook)

    def tokens(self, images, prompts=None, prompt_ln_pre=True):
        """The sequence entering block 0 [B, 1 + grid^2 (+ n), W]: embeddings, then the prompt tokens [n, W] or
        [B, n, W] appended (no positional embedding) before `ln_pre` (prompt_ln_pre) or after it."""
        x = self.embed(images)
        if prompts is None:
            return self.ln_pre(x)
        return self.ln_pre(append_tokens(x, prompts)) if prompt_ln_pre else append_tokens(self.ln_pre(x), prompts)

    def head(self, x):
        """Read the CLS token: ln_post(x[:, 0]) @ proj."""
        return self.ln_post(x[:, 0]) @ self.proj.to(x.dtype)


class VisualPrompts(NamedTuple):
    """How a prompt model prompts the image tower (PromptModel.visual_prompts).

    first: [n, W] or [B, n, W] tokens appended after the patch tokens at the input (no positional embedding),
    before `ln_pre` when ln_pre (MaPLe / the MaPLe repository's VPT) or after it (original VPT); None = none.
    deep: one entry per block: tokens that replace every token after CLS + patches before that block (None =
    keep; the count may change: MMRL adds its tokens at block 5, DA-VPT's guided blocks hold M proxies)."""
    first: Optional[torch.Tensor] = None
    deep: Optional[list] = None
    ln_pre: bool = True


def append_tokens(x, tokens):
    tokens = tokens.to(x.dtype)
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x, tokens], dim=1)


class CLIP(nn.Module):
    """OpenAI's CLIP (ViT image tower only). Constructor arguments are OpenAI's, in OpenAI's order."""

    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        self.config = dict(embed_dim=embed_dim, image_resolution=image_resolution, vision_layers=vision_layers,
                           vision_width=vision_width, vision_patch_size=vision_patch_size,
                           context_length=context_length, vocab_size=vocab_size,
                           transformer_width=transformer_width, transformer_heads=transformer_heads,
                           transformer_layers=transformer_layers)
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_width // 64 or 1, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation (used for the toy CLIP and random test models)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            w, n = tower.width, tower.layers
            proj_std, attn_std, fc_std = (w ** -0.5) * ((2 * n) ** -0.5), w ** -0.5, (2 * w) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def set_attention(self, backend):
        """Attention implementation of both towers: one of kernels.ATTN_BACKENDS (kernels.masked_attention)."""
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"attention backend {backend!r}: expected one of {ATTN_BACKENDS}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend
        return self

    def encode_image(self, images):
        return self.visual(images)

    def embed_text(self, tokens):
        """tokens [N, L] -> token embeddings [N, L, W] (no positional embedding yet)."""
        return self.token_embedding(tokens).to(self.dtype)

    def encode_text(self, tokens, cut=True):
        """Text features [N, E] (not normalised), read at the end-of-text token (the largest id).

        cut: run only up to the last end-of-text position of the batch; the tower is causal and read at the
        EOT token, so the output is the same as for the full length (exact saving, see design.md)."""
        return self.encode_text_embeddings(self.embed_text(tokens), tokens.argmax(dim=-1), cut=cut)

    def encode_text_embeddings(self, x, eot, deep_prompts=None, prompt_slice=None, cut=True, prefix_len=0, groups=1,
                               eot_range=None):
        """x [N, L, W] token embeddings (prompted or not), eot [N] end-of-text positions -> [N, E].

        deep_prompts / prompt_slice: per-block replacements of prompt positions (MaPLe's deep text prompts).
        Exact savings (identical output; design.md): `cut` runs only up to the last end-of-text position;
        `prefix_len` P > 0 says the first P positions are identical within each of `groups` consecutive blocks
        of rows (shared context: one group; CoCoOp: one group per image), so they are computed once per group.
        eot_range: (shortest, longest) EOT position as Python ints when the caller knows them (the prompt models
        do), so that no value is read back from the device; else they are read from eot.
        """
        shortest, longest = eot_range if eot_range is not None else (int(eot.min()), int(eot.max()))
        if cut:
            x = x[:, : longest + 1]
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        rows = torch.arange(x.shape[0], device=x.device)
        P = prefix_len
        if P > 0 and prompt_slice is not None and (prompt_slice.stop or x.shape[1]) > P:
            P = 0  # prompts reach past the shared prefix: no sharing
        if P <= 0 or P >= shortest:
            x = self.transformer(x, causal=True, deep_prompts=deep_prompts, prompt_slice=prompt_slice)
            return self.ln_final(x[rows, eot]) @ self.text_projection.to(x.dtype)
        N = x.shape[0]
        xp, xs = x.view(groups, N // groups, *x.shape[1:])[:, 0, :P], x[:, P:]  # [G, P, W], [N, S, W]
        _, xs = self.transformer((xp, xs), causal=True, deep_prompts=deep_prompts, prompt_slice=prompt_slice)
        return self.ln_final(xs[rows, eot - P]) @ self.text_projection.to(x.dtype)

    def forward(self, images, tokens):
        """OpenAI's forward: (logits_per_image, logits_per_text)."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


# ----------------------------------------------------------------------------------------------------------
# building a model from a state dict

NON_TENSOR_KEYS = ("input_resolution", "context_length", "vocab_size")  # extra entries of OpenAI archives


def _shape(sd, key, ndim):
    """sd[key]'s shape, checked to have `ndim` dimensions (a ValueError naming the tensor otherwise)."""
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"tensor {key!r} has shape {list(shape)}; a CLIP ViT has {ndim} dimension(s) there")
    return shape


def _agree(what, sizes):
    """The size that the tensors of `sizes` ({tensor name: (size, shape)}) imply; a ValueError naming the tensors
    that disagree with the others, with their shapes, otherwise."""
    values = [v for v, _ in sizes.values()]
    common = max(values, key=values.count)  # the majority (ties: the first tensor listed)
    odd = {k: s for k, (v, s) in sizes.items() if v != common}
    if odd:
        agree = ", ".join(f"{k} {list(s)}" for k, (v, s) in sizes.items() if v == common)
        bad = ", ".join(f"{k!r} has shape {list(s)}" for k, s in odd.items())
        raise ValueError(f"cannot infer the {what}: tensor {bad}, but {agree} imply {common}")
    return common


def infer_config(state_dict):
    """CLIP constructor arguments from shapes and key names (OpenAI's `build_model` rules). Each width is read
    from every tensor that holds it; a tensor that disagrees with the others is named with its shape."""
    sd = state_dict
    if "visual.proj" not in sd:
        if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in sd):
            raise ValueError("this is a ResNet CLIP checkpoint (visual.layer1 / visual.attnpool keys): "
                             "ResNet image towers are not supported; use ViT-B/16, ViT-B/32 or ViT-L/14")
        raise ValueError("not a CLIP ViT state dict: key 'visual.proj' is missing "
                         f"(first keys: {sorted(sd)[:5]})")
    for key in ("visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
                "token_embedding.weight", "ln_final.weight"):
        if key not in sd:
            raise ValueError(f"not a complete CLIP state dict: key {key!r} is missing")
    conv, vproj = _shape(sd, "visual.conv1.weight", 4), _shape(sd, "visual.proj", 2)
    vpos, tpos = _shape(sd, "visual.positional_embedding", 2), _shape(sd, "positional_embedding", 2)
    tok, lnf = _shape(sd, "token_embedding.weight", 2), _shape(sd, "ln_final.weight", 1)
    tproj = _shape(sd, "text_projection", 2)
    vision_width = _agree("image tower width", {"visual.conv1.weight": (conv[0], conv), "visual.positional_embedding":
                                                (vpos[1], vpos), "visual.proj": (vproj[0], vproj)})
    transformer_width = _agree("text tower width", {"token_embedding.weight": (tok[1], tok), "positional_embedding":
                                                    (tpos[1], tpos), "ln_final.weight": (lnf[0], lnf),
                                                    "text_projection": (tproj[0], tproj)})
    embed_dim = _agree("embedding width", {"text_projection": (tproj[1], tproj), "visual.proj": (vproj[1], vproj)})
    vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    vision_patch_size = conv[-1]
    grid = round((vpos[0] - 1) ** 0.5)
    return dict(
        embed_dim=embed_dim,
        image_resolution=vision_patch_size * grid,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=vision_patch_size,
        context_length=tpos[0],
        vocab_size=tok[0],
        transformer_width=transformer_width,
        transformer_heads=transformer_width // 64,
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    )


def build_clip(state_dict):
    """A CLIP whose every size comes from the state dict; loaded with strict=True, in float32, eval mode. A tensor
    whose shape differs from what the architecture (inferred from the others) needs is named with both shapes."""
    sd = {k: v for k, v in state_dict.items() if k not in NON_TENSOR_KEYS}
    config = infer_config(sd)
    model = CLIP(**config)
    expected = model.state_dict()
    wrong = [(k, list(v.shape), list(expected[k].shape)) for k, v in sd.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        listed = "; ".join(f"tensor {k!r} has shape {s}, expected {e}" for k, s, e in wrong[:5])
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise ValueError(f"{listed}{more} for the architecture the other tensors imply ({config})")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


# Reference shapes (no weights): used by tests of architecture inference and by the benchmarks.
VIT_B16_CONFIG = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                      context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                      transformer_layers=12)
VIT_B32_CONFIG = dict(VIT_B16_CONFIG, vision_patch_size=32)
VIT_L14_CONFIG = dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                      context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                      transformer_layers=12)


# ----------------------------------------------------------------------------------------------------------
# loading checkpoints

log = logging.getLogger("dapt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, fetched or read (as a CLIP ViT, or as a run's or cache's file); the message
    names the file."""


# OpenAI's files: the URL path holds the file's sha256, checked after download and once per process when cached.
CLIP_URL = "https://openaipublic.azureedge.net/clip/models/{sha256}/{file}"
OFFICIAL = {  # name -> (sha256, file name)
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
}
FORMATS = ("an OpenAI TorchScript archive (.pt, read without running its code)",
           "a torch.save state dict (.pt, .pth, .bin; read with weights_only=True)",
           "a safetensors file (.safetensors) with OpenAI or Hugging Face CLIP key names")
SUPPORTED = f"a model name ({', '.join(OFFICIAL)}) or a path to " + "; ".join(FORMATS)
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def load_clip(name_or_path, device="cpu", dtype=None, jit=False, trust=False, download_root=None):
    """A CLIP in eval mode from an official name or a checkpoint file, on `device`, weights cast to `dtype`.

    name_or_path: "ViT-B/16", "ViT-B/32", "ViT-L/14" (downloaded to download_root, default ~/.cache/clip,
    sha256 checked) or a path to one of FORMATS. dtype: None (float16 on CUDA, float32 elsewhere), a torch
    dtype or "fp16" / "bf16" / "fp32"; the whole model is cast (LayerNorm computes in float32 anyway).
    jit=True reads the file with torch.jit.load, which RUNS the archive's TorchScript code: allowed for the
    three official files (sha256) only, unless trust=True too. Every problem raises CheckpointError.
    """
    dtype = resolve_dtype(dtype, device)
    name, sha256 = str(name_or_path), None
    if name in OFFICIAL:
        path, sha256 = official_file(name, download_root)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder; expected {SUPPORTED}")
        if not path.is_file():
            raise CheckpointError(f"{name!r} is neither a known model name ({', '.join(OFFICIAL)}) nor an existing "
                                  f"file; expected {SUPPORTED}")
    if jit:
        state_dict, fmt = read_with_jit(path, sha256, trust), "TorchScript via torch.jit.load (its code ran)"
    else:
        state_dict, fmt = read_checkpoint(path)
    model = _build_checked(state_dict, path).to(device=device, dtype=dtype)
    log.info("CLIP weights %s: %s%s; config %s; dtype %s on %s", path, fmt,
             f", sha256 {sha256} verified" if sha256 else "", model.config, dtype, device)
    return model


def resolve_dtype(dtype, device):
    if dtype is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype!r}: expected None, torch.float16 / bfloat16 / float32 or one of {list(DTYPES)}")
    return dtype


def _build_checked(state_dict, path):
    """build_clip (strict key and shape match) with the file named in errors, then check what can be checked.
    Non-finite weights (NaN / inf) are refused: a model built from them gives chance-level results silently."""
    bad = [k for k, v in state_dict.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        counts = ", ".join(f"{k} ({int((~torch.isfinite(state_dict[k])).sum())} of {state_dict[k].numel()} values)"
                           for k in bad[:5])
        raise CheckpointError(f"{path}: non-finite weights (NaN or inf) in tensor(s) {counts}"
                              f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}; the file is damaged: "
                              "download or export it again")
    try:
        model = build_clip(state_dict)
    except (ValueError, RuntimeError) as e:  # infer_config's message, or load_state_dict's missing/unexpected keys
        raise CheckpointError(f"{path}: {e}") from e
    blocks = [*model.transformer.resblocks, *model.visual.transformer.resblocks]
    if not all(type(b.mlp.gelu) is QuickGELU for b in blocks):  # OpenAI weights were trained with QuickGELU
        raise RuntimeError("CLIP blocks must use QuickGELU")
    if set(model.state_dict()) != set(state_dict):
        raise RuntimeError(f"{path}: keys did not match the model strictly")
    return model


def read_checkpoint(path):
    """(state dict with OpenAI key names, format description) of a checkpoint file; runs no code from it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd, fmt = read_safetensors(path), "safetensors"
    elif suffix in (".pt", ".pth", ".bin"):
        if is_torchscript(path):
            sd = _clip_tensors(openai_state_dict(read_torchscript(path), path), path)
            fmt = "TorchScript archive (restricted reader, no code run)"
        else:
            sd, fmt = _torch_load(path), "torch.save state dict (weights_only=True)"
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type {suffix or '(no extension)'!r}; expected {SUPPORTED}")
    return openai_state_dict(sd, path), fmt


def _clip_tensors(sd, path):
    """A TorchScript module tree holds every tensor attribute, not only the state dict: keep CLIP's keys (missing
    ones are still an error later) and warn about the others."""
    try:
        config = infer_config(sd)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    with torch.device("meta"):  # key names only: no memory, no initialisation cost
        keys = set(CLIP(**config).state_dict())
    other = sorted(set(sd) - keys)
    if other:
        log.warning("%s: ignored tensors of the TorchScript module tree that are not CLIP weights: %s", path, other)
    return {k: v for k, v in sd.items() if k in keys}


def _torch_load(path):
    return load_torch_file(path, expected=SUPPORTED, refused="expected a state dict of tensors, e.g. "
                                                            "torch.save(model.state_dict(), path)")


def load_torch_file(path, map_location="cpu", expected="a file written by torch.save", refused=None):
    """torch.load(path, weights_only=True): tensors, dicts, lists, tuples, numbers and strings only, so the file
    cannot run code. Every file the project reads with torch.load goes through here (CLIP state dicts, run
    checkpoints, resume files, caches); any failure is a CheckpointError that names the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:  # weights_only refused an object that is not a tensor or a container
            raise CheckpointError(f"{path}: torch.load(weights_only=True) refused it (it holds the global {found[1]}), "
                                  f"which could run code when loaded; {refused or 'expected ' + expected}") from e
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise CheckpointError(f"{path}: not a readable torch.save file, truncated or corrupt? "
                              f"({(detail[1] if detail else str(e)).strip()}); expected {expected}") from e
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; expected {expected}") from None
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise CheckpointError(f"{path}: not a readable torch.save file, truncated or corrupt? "
                              f"({type(e).__name__}: {e}); expected {expected}") from e


def openai_state_dict(obj, path="<state dict>"):
    """A state dict with OpenAI's key names: unwrap a 'state_dict' / 'model' / 'module' container, strip a
    'module.' prefix, convert Hugging Face names, drop OpenAI's extra entries (NON_TENSOR_KEYS, attn_mask)."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in ("state_dict", "model", "module") if isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        what = f"dict with keys {list(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor, possibly under 'state_dict', 'model' "
                              f"or 'module'), found a {what}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        sd = hf_to_openai(sd, path)
    extra = [k for k in sd if k.rpartition(".")[2] in (*NON_TENSOR_KEYS, "attn_mask")]  # OpenAI's, never weights
    sd = {k: v for k, v in sd.items() if k not in extra}
    if extra:
        log.debug("%s: dropped entries that are not CLIP weights: %s", path, extra)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}; expected a state dict of tensors")
    return sd


# Hugging Face transformers CLIPModel names -> OpenAI names. Per block: q/k/v_proj are concatenated into in_proj.
_HF_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_MODULES = {"text_model.embeddings.token_embedding": "token_embedding", "text_model.final_layer_norm": "ln_final",
               "vision_model.embeddings.patch_embedding": "visual.conv1",
               "vision_model.pre_layrnorm": "visual.ln_pre",  # (sic) in transformers
               "vision_model.post_layernorm": "visual.ln_post"}
_HF_TENSORS = {  # name -> (OpenAI name, transposed): the projections are nn.Linear weights [E, width] there
    "text_model.embeddings.position_embedding.weight": ("positional_embedding", False),
    "vision_model.embeddings.position_embedding.weight": ("visual.positional_embedding", False),
    "vision_model.embeddings.class_embedding": ("visual.class_embedding", False),
    "visual_projection.weight": ("visual.proj", True),
    "text_projection.weight": ("text_projection", True),
    "logit_scale": ("logit_scale", False),
}


def hf_to_openai(sd, path="<state dict>"):
    """Convert a Hugging Face transformers CLIP state dict; any key left unconverted is an error."""
    out, qkv, left = {}, {}, []
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):  # an index buffer, not a weight
            continue
        if k in _HF_TENSORS:
            name, transposed = _HF_TENSORS[k]
            out[name] = v.t() if transposed else v
            continue
        m = re.fullmatch(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
        base, _, leaf = k.rpartition(".")
        if m:
            block = ("transformer" if m[1] == "text" else "visual.transformer") + f".resblocks.{m[2]}"
            if m[3] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{block}.attn.in_proj_{m[4]}", {})[m[3][len("self_attn.")]] = v
                continue
            if m[3] in _HF_BLOCK:
                out[f"{block}.{_HF_BLOCK[m[3]]}.{m[4]}"] = v
                continue
        elif base in _HF_MODULES and leaf in ("weight", "bias"):
            out[f"{_HF_MODULES[base]}.{leaf}"] = v
            continue
        left.append(k)
    for name, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            left.append(f"{name} (only {'/'.join(sorted(parts))} of q/k/v)")
        else:
            out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])  # OpenAI's packed order: q, k, v
    if left:
        raise CheckpointError(f"{path}: Hugging Face CLIP keys with no OpenAI equivalent: {left[:10]}"
                              f"{f' and {len(left) - 10} more' if len(left) > 10 else ''}")
    return out


# safetensors, without the package: u64 little-endian header size, a JSON header {name: {"dtype", "shape",
# "data_offsets": [begin, end]}} (offsets into the data after the header; "__metadata__" ignored), raw data.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """name -> tensor of a .safetensors file (little-endian data, as every writer produces)."""
    path = Path(path)
    with open(path, "rb") as f:
        blob = f.read()

    def corrupt(why):
        return CheckpointError(f"{path}: not a valid safetensors file: {why}; expected an 8-byte little-endian "
                               "header size, a JSON header and the tensor data (truncated or corrupt download?)")

    if len(blob) < 8:
        raise corrupt(f"only {len(blob)} bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise corrupt(f"header size {n} but the file has {len(blob)} bytes")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError as e:  # JSON or UTF-8 error
        raise corrupt(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data, out = memoryview(blob)[8 + n :], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"entry {name!r} = {info!r} needs dtype (one of {', '.join(SAFETENSORS_DTYPES)}), "
                          "shape and data_offsets") from None
        numel = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(data) or end - begin != numel * dtype.itemsize:
            raise corrupt(f"entry {name!r}: data_offsets [{begin}, {end}] do not hold {info['dtype']} {shape} "
                          f"within the {len(data)} data bytes")
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


# TorchScript archives (OpenAI's .pt): a zip with <archive>/data.pkl (the pickled module tree), the raw tensor
# storages <archive>/data/<key>, code/ (TorchScript source) and constants.pkl. data.pkl is read by a restricted
# unpickler: it rebuilds tensors, stands in for every TorchScript class, and refuses every other global.
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


def is_torchscript(path):
    """True for a zip with TorchScript code: <archive>/code/ or <archive>/constants.pkl (torch.save has neither)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # torch.load reports it
    return any(n.partition("/")[2].startswith("code/") or n.partition("/")[2] == "constants.pkl" for n in names)


class TorchScriptObject:
    """Stands in for a TorchScript class (`__torch__.*`): keeps the pickled state and runs none of the archive's
    code (a TorchScript `__setstate__` lives in code/, which is never read)."""

    state = None

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """Stands in for torch._utils._rebuild_tensor_v2: a view of the storage (as_strided checks the bounds)."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"tensor without a storage: {storage!r}")
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


def _same(value, *args):
    return value


_SAFE_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor, ("collections", "OrderedDict"): OrderedDict,
                 # TorchScript's typed lists (torch/jit/_pickle.py): the value itself
                 **{("torch.jit._pickle", n): _same for n in ("restore_type_tag", "build_intlist", "build_tensorlist",
                                                              "build_doublelist", "build_boollist")}}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storage, path):
        super().__init__(file)
        self.storage, self.path, self.stubs = storage, path, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            return self.stubs.setdefault(key, type(key, (TorchScriptObject,), {}))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # a dtype: only ever read by persistent_load, not callable
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise CheckpointError(f"{self.path}: data.pkl asks for the global '{module}.{name}', which the restricted "
                              "reader refuses (it only rebuilds tensors); not a plain CLIP TorchScript archive. "
                              "If you trust the file, load_clip(..., jit=True, trust=True) runs it with torch.jit.load")

    def persistent_load(self, pid):  # ('storage', storage dtype, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self.storage(str(pid[2]), pid[1], int(pid[4]))


def read_torchscript(path):
    """Dotted name -> tensor of every tensor in a TorchScript archive's module tree, without running its code."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: expected one '<archive>/data.pkl' in the zip, found {sorted(pkl)}")
            prefix = pkl[0][: -len("data.pkl")]
            big_endian = prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() == b"big"
            storages = {}

            def storage(key, dtype, numel):
                if key not in storages:
                    name = f"{prefix}data/{key}"
                    if name not in names:
                        raise CheckpointError(f"{path}: storage {name} named in data.pkl is missing (truncated file?)")
                    raw = bytearray(z.read(name))  # z.read checks the CRC
                    if len(raw) != numel * dtype.itemsize:
                        raise CheckpointError(f"{path}: storage {name} has {len(raw)} bytes, expected {numel} x "
                                              f"{dtype} ({numel * dtype.itemsize} bytes)")
                    t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                    if big_endian:
                        t = t.view(-1, dtype.itemsize).flip(-1).reshape(-1)
                    storages[key] = t.view(dtype)
                return storages[key]

            root = _RestrictedUnpickler(io.BytesIO(z.read(pkl[0])), storage, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # bad zip, CRC error, malformed pickle, out-of-bounds tensor view, ...
        raise CheckpointError(f"{path}: corrupt or truncated TorchScript archive ({type(e).__name__}: {e}); "
                              f"expected {FORMATS[0]}") from e
    tensors, seen = {}, set()

    def walk(obj, name):  # module attribute paths = state-dict keys
        if isinstance(obj, torch.Tensor):
            tensors[name] = obj
        elif id(obj) in seen:
            return
        elif isinstance(obj, TorchScriptObject):
            seen.add(id(obj))
            walk(obj.state, name)
        elif isinstance(obj, (dict, list, tuple)):
            seen.add(id(obj))
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            for k, v in items:
                walk(v, f"{name}.{k}" if name else str(k))

    walk(root, "")
    return tensors


def read_with_jit(path, sha256=None, trust=False):
    """State dict of torch.jit.load(path): runs the archive's code, so only for official files or trust=True."""
    sha256 = sha256 or file_sha256(path)
    official = sha256 in {h for h, _ in OFFICIAL.values()}
    if not official and not trust:
        raise CheckpointError(f"{path}: jit=True runs the archive's code with torch.jit.load and is allowed only for "
                              f"the official OpenAI files; this file's sha256 {sha256} is not one of theirs. Either "
                              "drop jit=True (the default reader rebuilds the weights without running any code), or "
                              "pass trust=True as well if you trust where the file came from.")
    log.warning("torch.jit.load(%s) runs the archive's code (%s)", path, "official file" if official else "trust=True")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: torch.jit.load failed ({type(e).__name__}: {e}); jit=True needs a "
                              "TorchScript archive") from e
    return openai_state_dict(dict(module.state_dict()), path)


# downloads

_VERIFIED = set()  # (path, size, mtime) of cached files whose sha256 was checked by this process


def official_file(name, download_root=None):
    """(path, sha256) of an official model file: downloaded if absent, a cached file verified once per process."""
    sha256, file = OFFICIAL[name]
    path = Path(download_root or "~/.cache/clip").expanduser() / file
    url = CLIP_URL.format(sha256=sha256, file=file)
    if not path.exists():
        download(url, path, sha256)
    elif _stamp(path) not in _VERIFIED:
        got = file_sha256(path)
        if got != sha256:
            raise CheckpointError(f"{path}: the cached file has sha256 {got}, but {name} ({url}) has {sha256}: it is "
                                  "corrupt or incomplete. Delete it and run again to download it anew.")
    _VERIFIED.add(_stamp(path))
    return path, sha256


def _stamp(path):
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha256):
    """Fetch url into path via a temporary file in the same folder, renamed only once its sha256 matches."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    total, done = int(r.headers.get("Content-Length") or 0), 0
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        _progress(path.name, done, total)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                raise CheckpointError(f"could not download {url} ({getattr(e, 'reason', e)}). If this machine is "
                                      f"offline, fetch that URL elsewhere and put the file at {path} (file "
                                      f"{path.name} in folder {path.parent}); its sha256 must be {sha256}.") from e
            finally:
                sys.stderr.write("\n")
        got = digest.hexdigest()
        if got != sha256:
            raise CheckpointError(f"{url}: the downloaded file has sha256 {got}, expected {sha256}; it was discarded "
                                  f"and nothing was written to {path}. Try again, or fetch it yourself and check it.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _progress(name, done, total):
    mib = 2 ** 20
    text = f"{done / mib:.1f} / {total / mib:.1f} MiB ({100 * done // total}%)" if total else f"{done / mib:.1f} MiB"
    sys.stderr.write(f"\rdownloading {name}: {text}")
    sys.stderr.flush()
