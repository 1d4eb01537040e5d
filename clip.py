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
(`dapt.py`), the tokenizer (`tokenizer.py`), attention kernels (`kernels/`).
Tensors are batch-first ([batch, length, width]); OpenAI's code is length-first, the weights are the same.
"""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

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


ATTN_BACKENDS = ("auto", "sdpa", "eager", "triton")


def attention(q, k, v, causal=False, key_mask=None, backend="auto"):
    """Scaled dot-product attention on [B, H, L, D] tensors.

    key_mask: bool [B, L], True = the key is visible (every query sees the same keys of its sequence).
    backend: "sdpa" (PyTorch fused), "eager" (the reference in kernels/), "triton" (kernels.masked_attention),
    "auto" = triton on CUDA when importable, else sdpa.
    """
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_available() else "sdpa"
    if backend == "sdpa":
        mask = None
        if key_mask is not None:
            mask = key_mask[:, None, None, :]  # [B, 1, 1, L] broadcast over heads and queries
            if causal:
                L = q.shape[-2]
                mask = mask & torch.ones(L, k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - L)
                causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    import kernels  # the eager reference and the Triton kernel live there

    return kernels.masked_attention(q, k, v, key_mask, causal=causal, backend="torch" if backend == "eager" else "triton")


def _triton_available():
    try:
        import triton  # noqa: F401

        return True
    except ImportError:
        return False


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # packed q, k, v (this order)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.backend = "auto"

    def qkv(self, x, bias=None):
        """x [B, L, W] -> q, k, v each [B, H, L, W/H]. `bias` overrides in_proj_bias (DA-VPT+ bias tuning)."""
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias if bias is None else bias)
        qkv = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x, causal=False, key_mask=None, bias=None):
        B, L, W = x.shape
        q, k, v = self.qkv(x, bias)
        o = attention(q, k, v, causal=causal, key_mask=key_mask, backend=self.backend)
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

    def forward(self, x, causal=False, key_mask=None):
        x = x + self.attn(self.ln_1(x), causal=causal, key_mask=key_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, causal=False, key_mask=None, deep_prompts=None, prompt_slice=None):
        """x [B, L, W]. deep_prompts: optional list (one entry per block, None = keep) of [n, W] or [B, n, W]
        tensors written into x[:, prompt_slice] before that block (VPT-deep, MaPLe)."""
        for i, block in enumerate(self.resblocks):
            if deep_prompts is not None and i < len(deep_prompts) and deep_prompts[i] is not None:
                x = replace_tokens(x, deep_prompts[i], prompt_slice)
            x = block(x, causal=causal, key_mask=key_mask)
        return x


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

    def forward(self, images, prompts=None, prompt_ln_pre=True, deep_prompts=None, key_mask=None):
        """Image features [B, E] (not normalised).

        prompts: [n, W] or [B, n, W] tokens appended after the patch tokens (no positional embedding), before
        `ln_pre` when prompt_ln_pre (MaPLe / VPT of the MaPLe repo) or after it (original VPT).
        deep_prompts: per-block replacements of those n tokens (VPT-deep, MaPLe), see Transformer.forward.
        key_mask: bool [B, 1 + grid^2 + n], True = visible key (token-level views).
        """
        x = self.embed(images)
        n = 0
        if prompts is not None:
            n = prompts.shape[-2]
            if prompt_ln_pre:
                x = self.ln_pre(append_tokens(x, prompts))
            else:
                x = append_tokens(self.ln_pre(x), prompts)
        else:
            x = self.ln_pre(x)
        x = self.transformer(x, key_mask=key_mask, deep_prompts=deep_prompts, prompt_slice=slice(x.shape[1] - n, None))
        return self.head(x)

    def head(self, x):
        """Read the CLS token: ln_post(x[:, 0]) @ proj."""
        return self.ln_post(x[:, 0]) @ self.proj.to(x.dtype)


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
        """Attention implementation of both towers: one of ATTN_BACKENDS."""
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

    def encode_text_embeddings(self, x, eot, deep_prompts=None, prompt_slice=None, cut=True):
        """x [N, L, W] token embeddings (prompted or not), eot [N] end-of-text positions -> [N, E].

        deep_prompts / prompt_slice: per-block replacements of prompt positions (MaPLe's deep text prompts)."""
        if cut:
            x = x[:, : int(eot.max()) + 1]
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        x = self.transformer(x, causal=True, deep_prompts=deep_prompts, prompt_slice=prompt_slice)
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])
        return x @ self.text_projection.to(x.dtype)

    def forward(self, images, tokens):
        """OpenAI's forward: (logits_per_image, logits_per_text)."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


# ----------------------------------------------------------------------------------------------------------
# building a model from a state dict

NON_TENSOR_KEYS = ("input_resolution", "context_length", "vocab_size")  # extra entries of OpenAI archives


def infer_config(state_dict):
    """CLIP constructor arguments from shapes and key names (OpenAI's `build_model` rules)."""
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
    vision_width = sd["visual.conv1.weight"].shape[0]
    vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    vision_patch_size = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    transformer_width = sd["ln_final.weight"].shape[0]
    return dict(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=vision_patch_size * grid,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=vision_patch_size,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=transformer_width,
        transformer_heads=transformer_width // 64,
        transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
    )


def build_clip(state_dict):
    """A CLIP whose every size comes from the state dict; loaded with strict=True, in float32, eval mode."""
    sd = {k: v for k, v in state_dict.items() if k not in NON_TENSOR_KEYS}
    model = CLIP(**infer_config(sd))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()


# A small random CLIP with OpenAI's names, for tests and the toy benchmark (real BPE vocabulary, 77 tokens).
SMALL_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                    context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                    transformer_layers=2)
# Reference shapes (no weights): used by tests of architecture inference and by the benchmarks.
VIT_B16_CONFIG = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                      context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                      transformer_layers=12)
VIT_B32_CONFIG = dict(VIT_B16_CONFIG, vision_patch_size=32)
VIT_L14_CONFIG = dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                      context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                      transformer_layers=12)


def random_clip(config=SMALL_CONFIG, seed=0):
    """A CLIP with OpenAI's initialisation drawn from a seeded generator (deterministic for a given seed)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIP(**config)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()
