"""CLIP (ViT image tower + causal text tower) with OpenAI's parameter names, and the hooks prompt methods need.

What is here:
- the model: pre-LN transformer blocks with QuickGELU, LayerNorm computed in float32, a causal text tower
  read at the end-of-text token, `encode_image` / `encode_text` (not normalised, as OpenAI's), CLIP's input
  normalisation constants;
- hooks the prompt methods need and nothing more: image prompt tokens appended after the patch tokens,
  deep prompts replaced before chosen blocks, a per-sequence key mask (token-level views), and the
  exact text-side saving of cutting sequences at the last end-of-text token.

What is deliberately not here: reading checkpoints and inferring the architecture from them (clip_load.py), ResNet
image towers, training code, prompt methods (classic.py, dapt.py), the tokenizer (tokenizer.py), attention kernels
and their dispatcher (kernels/). Tensors are batch-first ([batch, length, width]); OpenAI's code is length-first, the
weights are the same.
"""
import math
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ATTN_BACKENDS, masked_attention

# the RGB mean and std CLIP's images are normalised with (OpenAI's preprocessing)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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


# Reference shapes (no weights): used by tests of architecture inference and by the benchmarks.
VIT_B16_CONFIG = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                      context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                      transformer_layers=12)
VIT_B32_CONFIG = dict(VIT_B16_CONFIG, vision_patch_size=32)
VIT_L14_CONFIG = dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                      context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                      transformer_layers=12)
