"""Prompt tuning on a frozen CLIP: every method's prompt model and every method loss, in plain PyTorch.

Read a method top to bottom beside its section of specs/methods.md. The CLIP towers, checkpoint loading and the
tokenizer live in clip.py and tokenizer.py (split off to keep files readable) and are re-exported here, so
`dapt.build_clip`, `dapt.load_clip` and `dapt.tokenize` are the public names.

Deliberately not here: data loading (data.py), the training loop (train.py), Triton kernels (kernels/: the
methods call `kernels.*` dispatchers, which fall back to the references below on the CPU).
"""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clip import CLIP, CheckpointError, build_clip, load_clip  # noqa: F401  (public names)
from tokenizer import tokenize  # noqa: F401  (public name)

# ----------------------------------------------------------------------------------------------------------
# losses: plain PyTorch references, batch-mean scalars (kernels/ has fused versions with these signatures)


def pull_push_loss(anchor, positive, negative, margin=1.5):
    """DAPT's visual pull-push: mean_b max(d(a, p) - d(a, n) + margin, 0), d(a, b) = ||a - b + 1e-6||_2.

    The semantics of torch.nn.functional.triplet_margin_loss (p=2, eps=1e-6, no swap). anchor, positive,
    negative: [B, D] (DAPT passes normalised full / foreground / background features, the views detached)."""
    d_pos = (anchor - positive + 1e-6).norm(dim=-1)
    d_neg = (anchor - negative + 1e-6).norm(dim=-1)
    return (d_pos - d_neg + margin).clamp_min(0).mean()


def inter_dispersion_loss(text_features, t=2.0):
    """Distribution-aware PT's inter-class dispersion: mean over pairs i < j of exp(-t ||w_i - w_j||^2).

    text_features: [C, D] (the method passes L2-normalised class features). Computed in float32."""
    w = text_features.float()
    C = w.shape[0]
    if C < 2:
        return w.sum() * 0.0
    d2 = (w[:, None, :] - w[None, :, :]).pow(2).sum(-1)  # [C, C]
    i, j = torch.triu_indices(C, C, offset=1, device=w.device)
    return torch.exp(-t * d2[i, j]).mean()


def intra_dispersion_loss(image_features, prototypes, labels):
    """Distribution-aware PT's intra-class dispersion: mean over batch and dimensions of
    (z_b - proto_{y_b})^2. image_features [B, D], prototypes [C, D] (fixed), labels [B]."""
    return (image_features.float() - prototypes.float()[labels]).pow(2).mean()


def proxy_anchor_loss(samples, proxies, labels, alpha=32.0, delta=0.1, scale=1.0, paper_norm=False):
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


# ----------------------------------------------------------------------------------------------------------
# shared pieces of the prompt models


def normalize(x):
    return F.normalize(x.float(), dim=-1)


def freeze(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class TextPrompts(nn.Module):
    """Frozen token embeddings of "[SOS] <ctx slots> <classname> . [EOT]" for every class, and where the
    learnable context vectors go (methods.md §0, §2).

    ctx_init: a phrase whose first n_ctx token embeddings initialise the context (CoOp "a photo of a", MaPLe
    "a photo" of "a photo of a"); the rest of the phrase stays as frozen text. Without it the slots hold "X".
    position: where the class name goes relative to the context: "end" (default), "middle", "front" (CoOp)."""

    def __init__(self, clip, classnames, n_ctx, ctx_init=None, position="end"):
        super().__init__()
        self.n_ctx, self.ctx_init, self.position = n_ctx, ctx_init, position
        if position not in ("end", "middle", "front"):
            raise ValueError(f"class token position {position!r}: expected end, middle or front")
        if ctx_init and position != "end":
            raise ValueError("an init phrase needs class token position 'end' (as CoOp)")
        self.clip = [clip]  # a list keeps CLIP out of this module's parameters and state dict
        if ctx_init:
            ids = tokenize(ctx_init)[0]
            n_words = int(ids.argmax()) - 1
            if n_ctx > n_words:
                raise ValueError(f"n_ctx={n_ctx} but the init phrase {ctx_init!r} has only {n_words} tokens")
            with torch.no_grad():
                self.init_vectors = clip.embed_text(ids[None])[0, 1:1 + n_ctx].float().clone()  # [n, W]
        self.set_classnames(classnames)

    def set_classnames(self, classnames):
        """Rebuild the frozen buffers for new class names (base -> new evaluation, cross-dataset)."""
        self.classnames = [c.replace("_", " ") for c in classnames]
        n, clip = self.n_ctx, self.clip[0]
        prefix = self.ctx_init if self.ctx_init else " ".join(["X"] * n)
        if self.position == "end":
            texts = [f"{prefix} {name}." for name in self.classnames]
            ctx_pos = torch.arange(1, 1 + n).expand(len(texts), n)
        else:
            # "X X" + name + "X X" (middle) or name + "X X" (front): the slots follow each name's length
            texts, pos = [], []
            for name in self.classnames:
                name_len = int(tokenize(name)[0].argmax()) - 1  # tokens between SOS and EOT
                half = n // 2 if self.position == "middle" else 0
                texts.append(" ".join(["X"] * half + [name] + ["X"] * (n - half)) + ".")
                pos.append(list(range(1, 1 + half)) + list(range(1 + half + name_len, 1 + n + name_len)))
            ctx_pos = torch.tensor(pos)
        tokens = tokenize(texts)  # [C, L]
        device = clip.token_embedding.weight.device
        with torch.no_grad():
            embedding = clip.embed_text(tokens.to(device))  # [C, L, W]
        self.register_buffer("embedding", embedding, persistent=False)
        self.register_buffer("ctx_pos", ctx_pos.to(device), persistent=False)
        self.register_buffer("eot", tokens.argmax(-1).to(device), persistent=False)
        # positions identical in every class's sequence (SOS, context, frozen init words): computed once per
        # step by the text tower when the context is shared (exact saving, design.md)
        same = (tokens == tokens[:1]).all(0).long()
        self.prefix_len = int(same.cumprod(0).sum()) if self.position == "end" else 0

    def forward(self, ctx):
        """ctx [n, W] (shared), [C, n, W] (class-specific) or [B, n, W] with B != C (per image, CoCoOp: the
        result is [B * C, L, W], image-major) -> prompted embeddings [C or B*C, L, W] and EOT positions."""
        C, L, W = self.embedding.shape
        base, pos, eot = self.embedding, self.ctx_pos, self.eot
        ctx = ctx.to(base.dtype)
        if ctx.dim() == 2:
            ctx = ctx.expand(C, -1, -1)
        elif getattr(self, "per_image", False):
            B = ctx.shape[0]
            base, pos, eot = base.repeat(B, 1, 1), pos.repeat(B, 1), eot.repeat(B)
            ctx = ctx.repeat_interleave(C, dim=0)  # [B*C, n, W]: image i's context for each of the C classes
        index = pos.unsqueeze(-1).expand(-1, -1, W)  # [N, n, W]
        return base.scatter(1, index, ctx), eot

    def encode(self, ctx, savings=True, **kw):
        """Text features [C or B*C, E] (not normalised) of the prompted sequences. With `savings` (exact, see
        clip.py) the sequences stop at the last end-of-text token and the positions before the class name run
        once per distinct context; without, the full 77 positions of every sequence run (the reference)."""
        x, eot = self(ctx)
        groups = ctx.shape[0] if ctx.dim() == 3 and getattr(self, "per_image", False) else 1
        shared = savings and (ctx.dim() == 2 or groups > 1)  # class-specific contexts share only SOS
        return self.clip[0].encode_text_embeddings(x, eot, prefix_len=self.prefix_len if shared else 0,
                                                   groups=groups, cut=savings, **kw)


class PromptModel(nn.Module):
    """Base class: a frozen CLIP, class names, and the prompt parameters a subclass adds.

    Subclasses define `text_features()` ([C, E], normalised, with gradients to the text prompts) and
    `image_features(images)` ([B, E], normalised); `loss(batch, epoch)` defaults to cross-entropy on the logits.
    Only parameters with requires_grad are trained and checkpointed (`trainable_state`)."""

    needs_masks = False  # the loader must provide fg_mask / fg_frac

    def __init__(self, clip, classnames, cfg):
        super().__init__()
        self.clip = freeze(clip)
        self.cfg = cfg
        self.classnames = list(classnames)

    @property
    def logit_scale(self):
        return self.clip.logit_scale.exp().float()

    def set_classnames(self, classnames):
        self.classnames = list(classnames)

    def text_features(self):
        raise NotImplementedError

    def image_features(self, images):
        return normalize(self.clip.encode_image(images))

    def forward(self, images, text_features=None):
        """Logits [B, C]. text_features: precomputed `text_features()` (evaluation computes them once)."""
        T = self.text_features() if text_features is None else text_features
        return self.logit_scale * self.image_features(images) @ T.t()

    def loss(self, batch, epoch):
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        return loss, {"acc": (logits.argmax(-1) == batch["label"]).float().mean().item()}

    def trainable_state(self):
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state):
        params = dict(self.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unknown = [n for n in state if n not in params]
        if missing or unknown:
            raise ValueError(f"checkpoint does not match the model: missing {missing}, unknown {unknown}")
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)

    def epoch_end(self, epoch, loader=None):
        """Hook after each training epoch (DA-VPT re-clusters here)."""


def encode_texts(clip, texts, chunk=1000):
    """Normalised CLIP features of plain texts [N, E], chunked so ImageNet-size class lists fit."""
    device = clip.token_embedding.weight.device
    feats = [clip.encode_text(tokenize(texts[i:i + chunk]).to(device)) for i in range(0, len(texts), chunk)]
    return normalize(torch.cat(feats))


# ----------------------------------------------------------------------------------------------------------
# 1. zero-shot CLIP (methods.md §1)


class ZeroShotCLIP(PromptModel):
    """No training: t_c = n(E_t(template(name_c))), or the re-normalised mean over an ensemble of templates."""

    def __init__(self, clip, classnames, cfg):
        super().__init__(clip, classnames, cfg)
        self.templates = cfg.get("templates") or [cfg.get("template", "a photo of a {}.")]
        self.set_classnames(classnames)

    @torch.no_grad()
    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        names = [c.replace("_", " ") for c in classnames]
        per_template = [encode_texts(self.clip, [t.format(n) for n in names]) for t in self.templates]
        self.register_buffer("T", normalize(torch.stack(per_template).mean(0)), persistent=False)

    def text_features(self):
        return self.T


# ----------------------------------------------------------------------------------------------------------
# 2. CoOp (methods.md §2)


class CoOp(PromptModel):
    """Learned context `ctx` shared by all classes (or one per class: csc), CLIP frozen; loss CE."""

    def __init__(self, clip, classnames, cfg):
        super().__init__(clip, classnames, cfg)
        n, init, W = cfg["n_ctx"], cfg.get("ctx_init") or None, clip.transformer.width
        self.prompts = TextPrompts(clip, classnames, n, init, cfg.get("class_token_position", "end"))
        if init:
            ctx = self.prompts.init_vectors.clone()  # [n, W]
            if cfg.get("csc"):
                ctx = ctx.expand(len(classnames), -1, -1).clone()
        else:
            ctx = torch.empty(len(classnames), n, W) if cfg.get("csc") else torch.empty(n, W)
            nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)  # [n, W] or [C, n, W]

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        if hasattr(self, "prompts"):
            if self.cfg.get("csc") and len(classnames) != self.ctx.shape[0]:
                raise ValueError("class-specific context (csc) cannot be applied to other classes")
            self.prompts.set_classnames(classnames)

    def text_features(self):
        return normalize(self.prompts.encode(self.ctx, self.cfg.get("text_savings", True)))


# ----------------------------------------------------------------------------------------------------------
# 3. CoCoOp (methods.md §3)


class CoCoOp(CoOp):
    """CoOp + Meta-Net: ctx_i = ctx + MetaNet(u_i), u_i = n(E_v(x_i)); text features per image, batched as
    B*C sequences in one call (not a loop over images)."""

    def __init__(self, clip, classnames, cfg):
        super().__init__(clip, classnames, cfg)
        E, W = clip.text_projection.shape[1], clip.transformer.width
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(E, E // 16)), ("relu", nn.ReLU(inplace=True)), ("linear2", nn.Linear(E // 16, W))]))
        self.prompts.per_image = True

    def text_features(self):
        return None  # depends on the image

    def forward(self, images, text_features=None, chunk=None):
        u = self.image_features(images)  # [B, E]
        shift = self.meta_net(u)  # [B, W]
        ctx = self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # [B, n, W]: the same shift for every context vector
        C = len(self.classnames)
        chunk = chunk or max(1, self.cfg.get("text_chunk", 20000) // C)  # images per text call (memory bound)
        logits = []
        for i in range(0, len(u), chunk):
            t = self.prompts.encode(ctx[i:i + chunk], self.cfg.get("text_savings", True))  # [b*C, E]
            t = normalize(t).view(-1, C, u.shape[1])  # [b, C, E]
            logits.append(torch.einsum("be,bce->bc", u[i:i + chunk], t))
        return self.logit_scale * torch.cat(logits)


# ----------------------------------------------------------------------------------------------------------
# 4. VPT on CLIP's image tower (methods.md §4)


def init_image_prompts(shape, init, patch_size):
    p = torch.empty(shape)
    if init == "xavier":  # original VPT: U(-v, v), v = sqrt(6 / (3 p^2 + width))
        v = math.sqrt(6.0 / (3 * patch_size ** 2 + shape[-1]))
        nn.init.uniform_(p, -v, v)
    elif init == "normal":  # MaPLe repository
        nn.init.normal_(p, std=0.02)
    else:
        raise ValueError(f"prompt init {init!r}: expected 'normal' or 'xavier'")
    return p


class FrozenTextClassifier(PromptModel):
    """Text side of the image-prompt methods: frozen n(E_t("a photo of a {c}.")), recomputed per class list."""

    @torch.no_grad()
    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        template = self.cfg.get("classifier_template", "a photo of a {}.")
        names = [c.replace("_", " ") for c in classnames]
        self.register_buffer("T", encode_texts(self.clip, [template.format(n) for n in names]), persistent=False)

    def text_features(self):
        return self.T


class VPT(FrozenTextClassifier):
    """m learnable tokens appended to the image sequence; deep: fresh tokens before each of the first `depth`
    blocks (the outputs at the prompt positions are discarded)."""

    def __init__(self, clip, classnames, cfg):
        super().__init__(clip, classnames, cfg)
        self.set_classnames(classnames)
        v = clip.visual
        depth = min(cfg["vpt_depth"], v.transformer.layers)
        shape = (depth, cfg["n_prompts"], v.conv1.weight.shape[0])
        self.image_prompts = nn.Parameter(init_image_prompts(shape, cfg.get("prompt_init", "normal"), v.patch_size))
        self.dropout = nn.Dropout(cfg.get("prompt_dropout", 0.0))

    def image_features(self, images):
        p = self.dropout(self.image_prompts)
        deep = [None] + list(p[1:])  # block 0 reads the input tokens; blocks 1..depth-1 get fresh ones
        z = self.clip.visual(images, prompts=p[0], prompt_ln_pre=self.cfg.get("prompt_ln_pre", True),
                             deep_prompts=deep)
        return normalize(z)


# ----------------------------------------------------------------------------------------------------------
# 5. MaPLe (methods.md §5)


class MaPLe(PromptModel):
    """Text context ctx (n tokens of "a photo of a"), deep text prompts P_1..P_{J-1}, and vision prompts made
    from them by coupling maps F_0..F_{J-1} (Linear text width -> image width)."""

    def __init__(self, clip, classnames, cfg):
        super().__init__(clip, classnames, cfg)
        n, W_t, W_v = cfg["n_ctx"], clip.transformer.width, clip.visual.conv1.weight.shape[0]
        self.depth = J = min(cfg["prompt_depth"], clip.transformer.layers, clip.visual.transformer.layers)
        self.prompts = TextPrompts(clip, classnames, n, cfg.get("ctx_init", "a photo of a"))
        self.ctx = nn.Parameter(self.prompts.init_vectors.clone())  # [n, W_t]
        self.compound_prompts = nn.Parameter(torch.empty(J - 1, n, W_t).normal_(std=0.02))  # P_1..P_{J-1}
        self.couplings = nn.ModuleList([nn.Linear(W_t, W_v) for _ in range(J)])  # F_0..F_{J-1}

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        if hasattr(self, "prompts"):
            self.prompts.set_classnames(classnames)

    def text_features(self):
        deep = [None] + list(self.compound_prompts)  # before text block i = 1..J-1, positions 1..n <- P_i
        z = self.prompts.encode(self.ctx, self.cfg.get("text_savings", True), deep_prompts=deep,
                                prompt_slice=slice(1, 1 + self.cfg["n_ctx"]))
        return normalize(z)

    def vision_prompts(self):
        """F_0(ctx) for the input, F_i(P_i) for image blocks 1..J-1: list of [n, W_v]."""
        return [self.couplings[0](self.ctx)] + [f(p) for f, p in zip(self.couplings[1:], self.compound_prompts)]

    def image_features(self, images, key_mask=None):
        vp = self.vision_prompts()
        z = self.clip.visual(images, prompts=vp[0], prompt_ln_pre=True, deep_prompts=[None] + vp[1:],
                             key_mask=key_mask)
        return normalize(z)


METHODS = {
    "zsclip": ZeroShotCLIP,
    "coop": CoOp,
    "cocoop": CoCoOp,
    "vpt": VPT,
    "maple": MaPLe,
}
