"""Prompt tuning on a frozen CLIP: every method's prompt model and every method loss, in plain PyTorch.

Read a method top to bottom beside its section of specs/methods.md. The CLIP towers, checkpoint loading and the
tokenizer live in clip.py and tokenizer.py (split off to keep files readable) and are re-exported here, so
`dapt.build_clip`, `dapt.load_clip` and `dapt.tokenize` are the public names.

Deliberately not here: data loading (data.py), the training loop (train.py), Triton kernels (kernels/: the
methods call `kernels.*` dispatchers, which fall back to the references below on the CPU).
"""
import hashlib
import logging
import math
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clip import CLIP, CheckpointError, append_tokens, build_clip, load_clip, replace_tokens  # noqa: F401  (public names)
from clip import attention as clip_attention
import kernels
from tokenizer import tokenize  # noqa: F401  (public name)

log = logging.getLogger("dapt")

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
    Only parameters with requires_grad are trained and checkpointed (`trainable_state`).

    Optional hooks train.py calls when a subclass defines them: `prepare(bench, train_tf, test_tf, device)` once
    before training (data-dependent set-up: dapt-dist prototypes, DA-VPT clusters; not called for evaluation),
    `param_groups()` (optimizer groups, e.g. per-group weight_decay). Subclasses with non-parameter learned state
    override `extra_state()` / `load_extra_state(state)` (saved in checkpoints and resume files)."""

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

    def extra_state(self):
        """Learned state that is not a parameter (DA-VPT's class -> proxy map); None when there is none."""
        return None

    def load_extra_state(self, state):
        pass

    def load_checkpoint(self, state):
        """Restore a checkpoint or resume dict of train.py: the trainable parameters and the extra state."""
        self.load_trainable_state(state["params"])
        self.load_extra_state(state.get("extra"))

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


# ----------------------------------------------------------------------------------------------------------
# 7. KgCoOp (methods.md §7; a host for FVG-PT)


class KgCoOp(CoOp):
    """CoOp + W * (1 - mean_c cos(t_c, t0_c)): the prompted class features stay near the frozen hand-crafted
    ones, t0_c = n(E_t(template(name_c))) with the dataset's template (cfg "template", filled by build_model)."""

    def __init__(self, clip, classnames, cfg):
        super().__init__(clip, classnames, cfg)
        self.set_classnames(classnames)

    @torch.no_grad()
    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        template = self.cfg.get("template") or "a photo of a {}."
        self.register_buffer("t0", encode_texts(self.clip, [template.format(c) for c in self.prompts.classnames]),
                             persistent=False)  # [C, E]

    def loss(self, batch, epoch):
        T = self.text_features()  # [C, E]
        logits = self.logit_scale * self.image_features(batch["image"]) @ T.t()
        kg = 1 - (T * self.t0).sum(-1).mean()  # both normalised: the mean cosine
        ce = F.cross_entropy(logits, batch["label"])
        loss = ce + self.cfg["kg_weight"] * kg
        return loss, {"acc": (logits.argmax(-1) == batch["label"]).float().mean().item(), "kg": kg.item()}


# ----------------------------------------------------------------------------------------------------------
# 8. Decouple before Align (methods.md §8; DAPT-S with mask files, DAPT-G with Grad-CAM)

# 25 general + 7 food background classes, in the official order (the 25/7 quirk slices this list)
DAPT_BACKGROUNDS = [
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign", "table", "forks", "tablecloth", "hands", "spoon", "glasses", "dishes"]


def views_key_mask(fg_frac, n_prompts, threshold=0.5):
    """Token-level views: bool key masks [B, 1 + P + n] for the foreground and the background view.

    fg_frac [B, P] (foreground fraction of each patch, row-major). CLS and the n prompt tokens are always visible;
    a patch is a key of the foreground view when its fraction >= threshold, of the background view otherwise."""
    B = fg_frac.shape[0]
    keep = fg_frac >= threshold  # [B, P]
    always = torch.ones(B, 1, dtype=torch.bool, device=fg_frac.device)
    prompts = torch.ones(B, n_prompts, dtype=torch.bool, device=fg_frac.device)
    return torch.cat([always, keep, prompts], 1), torch.cat([always, ~keep, prompts], 1)


class DAPT(PromptModel):
    """A host prompt model (MaPLe by default; CoOp or VPT) trained on the full image and its foreground /
    background views: L_cls, the visual pull-push L_v, text alignment of the foreground view L_f and of the
    background view with 32 background texts L_b, on the staged (default) or joint schedule.

    Views: pixel (x*m, x*(1-m), the paper) or token (patch keys hidden by key_mask; faster, NOT the same model).
    Views that need no gradient in the current phase (z_f always; z_b outside the alignment phase) run in one
    no_grad call, the others in one call with gradients: the same numbers as one 3B call, less backward work."""

    def __init__(self, clip, classnames, cfg):
        super().__init__(clip, classnames, cfg)
        hosts = {"maple": MaPLe, "coop": CoOp, "vpt": VPT}
        if cfg["host"] not in hosts:
            raise ValueError(f"dapt host {cfg['host']!r}: expected one of {', '.join(hosts)}")
        if cfg["cue"] not in ("masks", "gradcam") or cfg["decouple"] not in ("pixel", "token"):
            raise ValueError(f"dapt: cue {cfg['cue']!r} (masks|gradcam), decouple {cfg['decouple']!r} (pixel|token)")
        if cfg["dapt_schedule"] not in ("staged", "joint"):
            raise ValueError(f"dapt schedule {cfg['dapt_schedule']!r}: expected staged or joint")
        self.host = hosts[cfg["host"]](clip, classnames, cfg)
        self.needs_masks = cfg["cue"] == "masks"  # Grad-CAM masks are made in the step
        # background texts: frozen layer-0 embeddings, encoded by the same prompted text tower as the classes
        tokens = tokenize([cfg["bg_template"].format(b) for b in DAPT_BACKGROUNDS])
        device = clip.token_embedding.weight.device
        with torch.no_grad():
            self.register_buffer("bg_embedding", clip.embed_text(tokens.to(device)), persistent=False)  # [32, L, W]
        self.register_buffer("bg_eot", tokens.argmax(-1).to(device), persistent=False)

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        if hasattr(self, "host"):
            self.host.set_classnames(classnames)

    def n_prompts(self):
        """Image prompt tokens the host appends (they sit after the patches)."""
        h = self.host
        return h.cfg["n_ctx"] if isinstance(h, MaPLe) else h.image_prompts.shape[1] if isinstance(h, VPT) else 0

    # -- towers

    def all_text_features(self):
        """[C + 32, E]: class prompts then the background texts, one pass of the host's prompted text tower."""
        h = self.host
        if isinstance(h, VPT):  # frozen classifier: the background texts are frozen too
            if not hasattr(self, "bg_T"):
                with torch.no_grad():
                    self.bg_T = encode_texts(self.clip, [self.cfg["bg_template"].format(b) for b in DAPT_BACKGROUNDS])
            return torch.cat([h.T, self.bg_T.to(h.T.device)])
        x, eot = h.prompts(h.ctx)  # [C, L, W]
        x, eot = torch.cat([x, self.bg_embedding.to(x.dtype)]), torch.cat([eot, self.bg_eot])
        cut = self.cfg.get("text_savings", True)  # classes and backgrounds share no prefix: only the EOT cut
        if isinstance(h, MaPLe):  # deep prompts overwrite positions 1..n of every sequence, backgrounds included
            deep = [None] + list(h.compound_prompts)
            z = self.clip.encode_text_embeddings(x, eot, deep_prompts=deep, prompt_slice=slice(1, 1 + h.cfg["n_ctx"]),
                                                 cut=cut)
        else:
            z = self.clip.encode_text_embeddings(x, eot, cut=cut)
        return normalize(z)

    def split_texts(self, T_all):
        """(T_fg, T_bg). Clean: C classes / 32 backgrounds. bg_slice_quirk (official): C + first 7 / last 25."""
        C = len(self.classnames)
        k = C + 7 if self.cfg["bg_slice_quirk"] else C
        return T_all[:k], T_all[k:]

    def text_features(self):
        """Inference classifier: the C classes (with bg_slice_quirk C + 7 columns, argmax over all as official)."""
        return self.split_texts(self.all_text_features())[0]

    def visual_prompts(self):
        """(layer-0 prompts or None, per-block deep prompts or None, prompt_ln_pre) of the host's image side."""
        h = self.host
        if isinstance(h, MaPLe):
            vp = h.vision_prompts()
            return vp[0], [None] + vp[1:], True
        if isinstance(h, VPT):
            p = h.dropout(h.image_prompts)
            return p[0], [None] + list(p[1:]), h.cfg.get("prompt_ln_pre", True)
        return None, None, True

    def image_features(self, images, key_mask=None):
        prompts, deep, ln_pre = self.visual_prompts()
        return normalize(self.clip.visual(images, prompts=prompts, prompt_ln_pre=ln_pre, deep_prompts=deep,
                                          key_mask=key_mask))

    # -- cues

    def gradcam(self, images, labels, T, return_cam=False):
        """DAPT-G foreground masks [B, 1, S, S] in {0, 1} for exactly these (augmented) images.

        Grad-CAM of the current prompted model: A = ln_1 output of the last image block, score = sum_b of the
        ground-truth logit against T [C, E]; w = mean over patch tokens of dscore/dA; cam = ReLU(A w) on the
        patches; grid -> image size (bilinear, align_corners=True); / (per-image max + 1e-6) (batch max with
        gradcam_batch_max); >= gradcam_threshold. Only A gets a gradient: no parameter .grad is touched."""
        v = self.clip.visual
        blocks = v.transformer.resblocks
        with torch.no_grad():
            prompts, deep, ln_pre = self.visual_prompts()
            x = v.tokens(images, prompts, ln_pre)  # [B, 1 + P + n, W]
            n = 0 if prompts is None else prompts.shape[-2]
            sl = slice(x.shape[1] - n, None)
            for i, block in enumerate(blocks):
                if deep is not None and i < len(deep) and deep[i] is not None:
                    x = replace_tokens(x, deep[i], sl)
                if i < len(blocks) - 1:
                    x = block(x)
            last = blocks[-1]
            A = last.ln_1(x)
        with torch.enable_grad():
            A = A.detach().requires_grad_(True)
            h = x + last.attn(A)
            h = h + last.mlp(last.ln_2(h))
            logits = self.logit_scale * normalize(v.head(h)) @ T.detach().t()
            score = logits.gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(score, A)
        P, g = v.grid ** 2, v.grid
        w = grad[:, 1:1 + P].float().mean(1, keepdim=True)  # [B, 1, W]
        cam = torch.relu((A.detach()[:, 1:1 + P].float() * w).sum(-1))  # [B, P]
        cam = F.interpolate(cam.view(-1, 1, g, g), size=images.shape[-2:], mode="bilinear", align_corners=True)
        peak = cam.max() if self.cfg["gradcam_batch_max"] else cam.flatten(1).max(1)[0].view(-1, 1, 1, 1)
        cam = cam / (peak + 1e-6)
        m = (cam >= self.cfg["gradcam_threshold"]).to(images.dtype)
        return (m, cam) if return_cam else m

    # -- training

    def loss(self, batch, epoch):
        terms, stats = self.loss_terms(batch, epoch)
        cfg = self.cfg
        w = {"cls": 1.0, "v": cfg["dapt_w_v"], "f": cfg["dapt_w_f"], "b": cfg["dapt_w_b"]}
        stats.update({f"L_{k}": t.item() for k, t in terms.items()})
        return sum(w[k] * t for k, t in terms.items()), stats

    def loss_terms(self, batch, epoch):
        """The active unweighted terms {"cls", "v"} (staged, epoch < switch), {"cls", "f", "b"} (staged, later) or
        all four (joint), and stats."""
        x, y = batch["image"], batch["label"]
        cfg = self.cfg
        staged = cfg["dapt_schedule"] == "staged"
        align = not staged or epoch >= cfg["dapt_switch_epoch"]  # L_f, L_b active
        pull_push = not staged or epoch < cfg["dapt_switch_epoch"]  # L_v active
        T_all = self.all_text_features()  # [C + 32, E]
        T_fg, T_bg = self.split_texts(T_all)
        if cfg["cue"] == "masks":
            m, frac = batch["fg_mask"].to(x.dtype), batch.get("fg_frac")
        else:  # Grad-CAM on this step's crop
            m = self.gradcam(x, y, T_all[:len(self.classnames)])
            frac = F.avg_pool2d(m, self.clip.visual.patch_size).flatten(1)
        # views: (name, images, key mask); only views that need gradients go through the graph
        if cfg["decouple"] == "pixel":
            views = {"full": (x, None), "fg": (x * m, None), "bg": (x * (1 - m), None)}
        else:
            if frac is None:
                raise ValueError("decouple=token needs batch['fg_frac'] (the loader's patch_size)")
            km_f, km_b = views_key_mask(frac.to(x.device), self.n_prompts(), cfg["decouple_threshold"])
            views = {"full": (x, None), "fg": (x, km_f), "bg": (x, km_b)}
        z = {}
        grad_views = ["full", "bg"] if align else ["full"]
        with torch.no_grad():
            z.update(self.encode_views(views, [k for k in views if k not in grad_views]))
        z.update(self.encode_views(views, grad_views))
        s = self.logit_scale
        logits = s * z["full"] @ T_fg.t()
        terms = {"cls": F.cross_entropy(logits, y)}
        if pull_push:  # fused kernel on CUDA, the reference above elsewhere
            terms["v"] = kernels.pull_push_loss(z["full"], z["fg"].detach(), z["bg"].detach(), margin=cfg["dapt_margin"])
        if align:
            terms["f"] = F.cross_entropy(s * z["fg"].detach() @ T_fg.t(), y)  # text side only
            bg_logits = s * z["bg"] @ T_bg.t()
            terms["b"] = F.cross_entropy(bg_logits, bg_logits.detach().argmax(-1))  # pseudo-label, no gradient
        return terms, {"acc": (logits.argmax(-1) == y).float().mean().item(), "fg_area": m.mean().item()}

    def encode_views(self, views, names):
        """One batched image-tower call for the named views -> {name: [B, E]}."""
        if not names:
            return {}
        images = torch.cat([views[k][0] for k in names])
        masks = [views[k][1] for k in names]
        key_mask = None
        if any(km is not None for km in masks):
            L = 1 + self.clip.visual.grid ** 2 + self.n_prompts()
            full = torch.ones(len(views[names[0]][0]), L, dtype=torch.bool, device=images.device)
            key_mask = torch.cat([full if km is None else km for km in masks])
        return dict(zip(names, self.image_features(images, key_mask=key_mask).chunk(len(names))))


# ----------------------------------------------------------------------------------------------------------
# 9. FVG-PT (methods.md §9; the reconstructed default, items 1-6): a second stage on a frozen host


def entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def kl_div(p_logits, q_logits, tau):
    """tau^2 KL(softmax(p/tau) || softmax(q/tau)) per sample [B]."""
    lp, lq = F.log_softmax(p_logits / tau, -1), F.log_softmax(q_logits / tau, -1)
    return tau ** 2 * (lp.exp() * (lp - lq)).sum(-1)


def bottleneck(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))


class FVGPT(PromptModel):
    """Adapters and gates on a frozen host (any of our prompt models with class text features).

    Per batch, in one no-grad pass: host features f, f_fg of the full and foreground views (one batched call),
    the host class features T (cached per class list), zero-shot CLIP f0 (= f for text-only hosts) and
    T0 = n(E_t("a photo of a {c}.")) (cached). Trained: FDC adapters + alphas, the FRG and the backbone gate.
    Prediction: z_FDC on the training classes, z_PC on any other class list (predict_mode auto); see
    `set_classnames`."""

    def __init__(self, host, classnames, cfg):
        super().__init__(host.clip, classnames, cfg)
        self.host = freeze(host).eval()
        if host.text_features() is None:
            raise ValueError(f"fvgpt: host {type(host).__name__} has image-conditioned text features (CoCoOp); "
                             "use a host with class text features (coop, kgcoop, maple, vpt, ...)")
        E, hid = host.clip.text_projection.shape[1], cfg["fvgpt_gate_hidden"]
        self.adapter_v, self.adapter_t = bottleneck(E, cfg["fvgpt_bottleneck"]), bottleneck(E, cfg["fvgpt_bottleneck"])
        self.alpha_v = nn.Parameter(torch.tensor(cfg["fvgpt_alpha_init"]))
        self.alpha_t = nn.Parameter(torch.tensor(cfg["fvgpt_alpha_init"]))
        self.frg = nn.Sequential(nn.Linear(3, hid), nn.ReLU(), nn.Linear(hid, 1))  # foreground reliability gate
        self.brg = nn.Sequential(nn.Linear(3, hid), nn.ReLU(), nn.Linear(hid, 1))  # backbone reliability gate
        # text-only hosts (CoOp, KgCoOp) do not change the image tower: f0 = f
        self.text_only_host = type(host).image_features is PromptModel.image_features
        self.train_classnames = list(classnames)
        self.needs_masks = True
        self.set_classnames(classnames)

    def train(self, mode=True):
        super().train(mode)
        self.host.eval()  # frozen: no dropout in the host
        return self

    @torch.no_grad()
    def set_classnames(self, classnames):
        """New class list: refresh the cached host / CLIP class features. predict_mode auto: z_FDC when the list
        is the training list (base test, all-class few-shot), z_PC otherwise (new classes, cross-dataset)."""
        super().set_classnames(classnames)
        if not hasattr(self, "host"):
            return
        self.host.set_classnames(classnames)
        mode = self.cfg["predict_mode"]
        if mode not in ("auto", "fdc", "pc"):
            raise ValueError(f"predict_mode {mode!r}: expected auto, fdc or pc")
        self.mode = mode if mode != "auto" else ("fdc" if list(classnames) == self.train_classnames else "pc")
        self.T_host = None  # host class features, computed on first use (device / autocast of the caller)
        names = [c.replace("_", " ") for c in classnames]
        self.register_buffer("T0", encode_texts(self.clip, [f"a photo of a {n}." for n in names]), persistent=False)

    def host_text(self):
        if self.T_host is None:
            with torch.no_grad():
                self.T_host = normalize(self.host.text_features())
        return self.T_host

    def text_features(self):
        return self.host_text()

    @torch.no_grad()
    def frozen_features(self, images, fg_images=None):
        """f [B, E], f_fg [B, E] or None, f0 [B, E]: the host image side once on [full; fg] views."""
        both = images if fg_images is None else torch.cat([images, fg_images])
        f_all = normalize(self.host.image_features(both))
        f, f_fg = (f_all, None) if fg_images is None else f_all.chunk(2)
        f0 = f if self.text_only_host else normalize(self.clip.encode_image(images))
        return f, f_fg, f0

    def fdc_logits(self, f, T):
        gv = normalize(f + self.alpha_v * self.adapter_v(f))
        gt = normalize(T + self.alpha_t * self.adapter_t(T))
        return self.cfg["fvgpt_scale"] * gv @ gt.t()

    def pc_logits(self, z_full, z_clip):
        p, p0 = z_full.softmax(-1), z_clip.softmax(-1)
        b = torch.sigmoid(self.brg(torch.stack([entropy(p), entropy(p0), F.cosine_similarity(p, p0, dim=-1)], -1)))
        return (1 - b) * z_full + b * z_clip  # [B, C]

    def forward(self, images, text_features=None):
        T = self.host_text() if text_features is None else text_features
        f, _, f0 = self.frozen_features(images)
        if self.mode == "fdc":
            return self.fdc_logits(f, T)
        s = self.cfg["fvgpt_scale"]
        return self.pc_logits(s * f @ T.t(), s * f0 @ self.T0.t())

    def loss(self, batch, epoch):
        cfg, x, y, m = self.cfg, batch["image"], batch["label"], batch["fg_mask"].to(batch["image"].dtype)
        s, tau = cfg["fvgpt_scale"], cfg["fvgpt_tau"]
        T = self.host_text()
        x_fg = masked_view(x, m, cfg["mask_fill"])
        f, f_fg, f0 = self.frozen_features(x, x_fg)
        z_full, z_fg, z_clip = s * f @ T.t(), s * f_fg @ T.t(), s * f0 @ self.T0.t()
        a = m.flatten(1).mean(1)  # foreground area [B]
        # FRG: trust in the foreground view
        p_full, p_fg = z_full.softmax(-1), z_fg.softmax(-1)
        r = torch.sigmoid(self.frg(torch.stack([entropy(p_full) - entropy(p_fg),
                                                F.cosine_similarity(p_full, p_fg, dim=-1), a], -1))).squeeze(-1)
        lo, hi = cfg["fvgpt_area"]
        valid = (a >= lo) & (a <= hi)
        target = ((F.cross_entropy(z_fg, y, reduction="none") + cfg["fvgpt_delta"])
                  < F.cross_entropy(z_full, y, reduction="none")).float()
        l_rg = F.binary_cross_entropy(r[valid], target[valid]) if valid.any() else r.sum() * 0
        r = torch.where(valid, r, torch.zeros_like(r))
        # FDC: adapted logits distilled from the full / foreground view, weighted by the trust
        z_fdc = self.fdc_logits(f, T)
        rw = r if cfg["no_detach_r"] else r.detach()
        l_dist = ((1 - rw) * kl_div(z_full, z_fdc, tau) + rw * kl_div(z_fg, z_fdc, tau)).mean()
        # PC: host calibrated toward zero-shot CLIP
        z_pc = self.pc_logits(z_full, z_clip)
        l_pc = F.cross_entropy(z_pc, y) + (kl_div(z_clip, z_pc, tau).mean() if cfg["fvgpt_use_kl"] else 0)
        ce = F.cross_entropy(z_fdc, y)
        loss = ce + cfg["fvgpt_lambda_base"] * (l_dist + cfg["fvgpt_lambda_rg"] * l_rg) + cfg["fvgpt_lambda_new"] * l_pc
        return loss, {"acc": (z_fdc.argmax(-1) == y).float().mean().item(), "L_dist": l_dist.item(),
                      "L_RG": l_rg.item(), "L_PC": l_pc.item(), "r": r.mean().item()}


def masked_view(x, m, fill):
    """Foreground view (protocol §5): "mean" = x * m (DAPT), "black" = black before normalisation (FVG-PT)."""
    import data  # the loader module holds the CLIP normalisation constants

    return data.masked_view(x, m, fill)


# ----------------------------------------------------------------------------------------------------------
# 10. Distribution-aware prompt tuning (methods.md §10) and 11. DA-VPT (methods.md §11)
# Both need the training images before training: PromptModel subclasses may define
# `prepare(bench, train_tf, test_tf, device)`, which train.train calls once before the first epoch (and before
# a resume restores `load_extra_state`). Evaluation never calls it.


@torch.no_grad()
def image_features_of(fn, items, transform, seed, device, batch=100, epoch=0):
    """fn(images) -> [N, D] features of Benchmark items in order; a training transform draws its augmentation
    from the generator seeded by (seed, epoch, index), as the training loader does."""
    import data  # data loading lives in data.py; imported here so dapt.py stays importable on its own

    loader = data.build_loader(items, transform, batch, train=False, seed=seed, pin_memory=False)
    loader.set_epoch(epoch)
    return torch.cat([fn(b["image"].to(device)).float().cpu() for b in loader])


def state_digest(module):
    """sha256 of a module's state dict (names, dtypes, shapes and bytes): names the weights that produced a cache."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def class_prototypes(clip, bench, transform, seed, device, view):
    """proto_c = (1/K_c) sum_{i: y_i = c} n(E_v^CLIP(x_i)) over the few-shot training items (frozen, unprompted
    tower, one view per image, NOT re-normalised) -> [C, E] float32 on the CPU, cached beside the few-shot split
    as <dataset_dir>/split_fewshot/prototypes_shot_K-seed_S-<subsample>_<weights digest>_<view>.pt.
    The file records the items, the transform constants and the seed; any mismatch regenerates it."""
    digest = state_digest(clip.visual)[:16]
    m = bench.meta
    path = os.path.join(m["dataset_dir"], "split_fewshot",
                        f"prototypes_shot_{m['shots']}-seed_{m['seed']}-{m['subsample']}_{digest}_{view}.pt")
    record = dict(items=[(os.path.relpath(p, m["dataset_dir"]), int(y)) for p, y, _ in bench.train],
                  n_classes=len(bench.classnames), transform=transform.constants(), seed=seed, view=view,
                  clip_visual_sha256=digest)
    if os.path.exists(path):
        cached = torch.load(path, map_location="cpu", weights_only=False)
        if cached.get("record") == record:
            log.info("prototypes: loaded %s", path)
            return cached["prototypes"]
        log.info("prototypes: %s was made with other items / transform / seed: regenerating it", path)
    feats = normalize(image_features_of(clip.encode_image, bench.train, transform, seed, device))  # [N, E]
    labels = torch.tensor([y for _, y, _ in bench.train])
    C = len(bench.classnames)
    sums = torch.zeros(C, feats.shape[1]).index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=C).clamp_min(1).float()
    protos = sums / counts[:, None]  # [C, E], mean of unit vectors (norm < 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(dict(prototypes=protos, record=record), tmp)
    os.replace(tmp, path)
    log.info("prototypes: %d classes from %d images (%s view), cached at %s", C, len(labels), view, path)
    return protos


class DistributionAwarePT(CoOp):
    """CoOp text context (16 shared vectors, class at the end) + VPT-shallow image prompts (16, after ln_pre);
    L = CE + beta_v * L_intra (MSE of z to fixed class prototypes) + beta_t * L_inter (RBF repulsion of the
    class text features)."""

    def __init__(self, clip, classnames, cfg):
        super().__init__(clip, classnames, cfg)
        v = clip.visual
        shape = (cfg["n_prompts"], v.conv1.weight.shape[0])  # [16, W_v]
        self.image_prompts = nn.Parameter(init_image_prompts(shape, cfg.get("prompt_init", "xavier"), v.patch_size))
        self.prototypes = None  # [C, E], set by prepare()

    def prepare(self, bench, train_tf, test_tf, device):
        train_view = self.cfg.get("proto_train_view", False)
        tf, view = (train_tf, "train") if train_view else (test_tf, "test")
        self.prototypes = class_prototypes(self.clip, bench, tf, self.cfg["seed"], device, view).to(device)

    def image_features(self, images):
        z = self.clip.visual(images, prompts=self.image_prompts, prompt_ln_pre=self.cfg.get("prompt_ln_pre", False))
        return normalize(z)

    def loss(self, batch, epoch):
        if self.prototypes is None:
            raise RuntimeError("dapt-dist: prototypes are missing; call model.prepare(bench, train_tf, test_tf, "
                               "device) before training (train.train does)")
        y = batch["label"]
        z, T = self.image_features(batch["image"]), self.text_features()  # [B, E], [C, E]
        logits = self.logit_scale * z @ T.t()
        ce = F.cross_entropy(logits, y)
        intra = kernels.intra_dispersion_loss(z, self.prototypes, y)  # fused on CUDA, the references elsewhere
        inter = kernels.inter_dispersion_loss(T, self.cfg["dispersion_t"])
        loss = ce + self.cfg["beta_v"] * intra + self.cfg["beta_t"] * inter
        return loss, {"acc": (logits.argmax(-1) == y).float().mean().item(), "ce": ce.item(),
                      "intra": intra.item(), "inter": inter.item()}


def cosine_kmeans(x, k, generator, init=None, iters=20, tol=1e-4):
    """Cosine k-means: x [N, D] -> (assignment [N] in 0..k-1, centroids [k, D]).

    init: centroids to start from (warm start), else k distinct data points drawn with `generator`. Assignment
    by the largest cosine; a centroid is the mean of its members (an empty cluster keeps its centroid); stops
    after `iters` rounds or when no centroid moves by more than `tol` (max abs change)."""
    x = x.float()
    c = x[torch.randperm(len(x), generator=generator)[:k]].clone() if init is None else init.float().clone()
    xn = F.normalize(x, dim=-1)
    for _ in range(iters):
        assign = (xn @ F.normalize(c, dim=-1).t()).argmax(-1)  # [N]
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].float(), c)
        moved = (new - c).abs().max().item()
        c = new
        if moved <= tol:
            break
    return (xn @ F.normalize(c, dim=-1).t()).argmax(-1), c


class DAVPT(FrozenTextClassifier):
    """VPT-deep (8 prompts in every image block); in the guided blocks the prompt set is M proxies, one per
    cluster of classes, pulled toward the block's patch samples and the CLS query by Proxy-Anchor losses.
    DA-VPT+ (bias_tuning) also trains the K and V slices of every block's packed in_proj_bias."""

    def __init__(self, clip, classnames, cfg):
        super().__init__(clip, classnames, cfg)
        v = clip.visual
        L, W, C = v.transformer.layers, v.conv1.weight.shape[0], len(classnames)
        self.guided = sorted({int(i) % L for i in str(cfg["guided_layers"]).split(",")})
        if cfg.get("patch_sample", "mean") not in ("mean", "attn_slot"):
            raise ValueError(f"davpt patch_sample {cfg['patch_sample']!r}: expected 'mean' or 'attn_slot'")
        self.M = min(cfg["n_proxies"], C)  # C < M: one proxy per class, identity map
        init = cfg.get("prompt_init", "normal")
        self.deep_prompts = nn.ParameterList([  # block i's tokens: [M, W] proxies in guided blocks, else [8, W]
            nn.Parameter(init_image_prompts((self.M if i in self.guided else cfg["n_prompts"], W), init, v.patch_size))
            for i in range(L)])
        self.head_kind = cfg.get("head", "text")
        if self.head_kind == "linear":
            if cfg.get("subsample", "all") != "all":
                raise ValueError("davpt head=linear learns one weight row per training class and cannot score new "
                                 "classes: use it with --subsample all (few-shot), or use --head text for base-to-novel")
            self.linear = nn.Linear(W, C)
            nn.init.trunc_normal_(self.linear.weight, std=0.02)
            nn.init.zeros_(self.linear.bias)
        elif self.head_kind != "text":
            raise ValueError(f"davpt head {self.head_kind!r}: expected 'text' or 'linear'")
        self.set_classnames(classnames)
        if cfg.get("bias_tuning"):  # trainable copies of the K and V slices (the q slice stays frozen)
            blocks = v.transformer.resblocks
            self.bias_k = nn.ParameterList([nn.Parameter(b.attn.in_proj_bias[W:2 * W].detach().clone()) for b in blocks])
            self.bias_v = nn.ParameterList([nn.Parameter(b.attn.in_proj_bias[2 * W:].detach().clone()) for b in blocks])
            if cfg.get("bias_extra"):  # what the released configs also unfreeze
                for b in blocks:
                    for p in (b.attn.out_proj.bias, b.mlp.c_proj.bias, b.ln_2.bias, b.ln_1.weight, b.ln_1.bias):
                        p.requires_grad_(True)
                v.class_embedding.requires_grad_(True)
        elif cfg.get("bias_extra"):
            raise ValueError("davpt: bias_extra needs bias_tuning true (DA-VPT+)")
        log.info("davpt: trainable tensors %s", [n for n, p in self.named_parameters() if p.requires_grad])
        # class -> proxy map and cluster centroids (learned state: extra_state); running class means per epoch
        self.register_buffer("class_to_proxy", torch.arange(C) % self.M, persistent=False)
        self.centroids = None
        self.mapped = C <= self.M  # the identity needs no data; otherwise prepare() or load_extra_state()
        self.feat_sum = self.feat_count = None

    def set_classnames(self, classnames):
        if self.head_kind == "linear" and hasattr(self, "linear") and len(classnames) != self.linear.out_features:
            raise ValueError("davpt head=linear was trained on other classes and cannot score new classes: "
                             "use --head text for base-to-novel or cross-dataset evaluation")
        super().set_classnames(classnames)

    def param_groups(self):
        """Weight decay on prompts and the linear weight only; biases, LayerNorm and other 1-D tensors get none
        (decay would pull pretrained biases toward 0, not toward their pretrained values)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() > 1]),
                  dict(params=[p for p in params if p.dim() <= 1], weight_decay=0.0)]
        return [g for g in groups if g["params"]]

    def attn_bias(self, i):
        if not self.cfg.get("bias_tuning"):
            return None
        attn = self.clip.visual.transformer.resblocks[i].attn
        W = self.bias_k[i].shape[0]
        return torch.cat([attn.in_proj_bias[:W], self.bias_k[i], self.bias_v[i]])  # packed [3W]

    def encode(self, images, mapped=None):
        """-> (classifier input [B, D], per guided block (proxies [M, W], patch sample [B, W], CLS query [B, W])).

        Our own loop over the blocks: the prompt count changes between blocks (8 vs M), the guided blocks expose
        their queries and attention outputs. mapped [B] (the proxy of each image's class) is needed only for
        patch_sample=attn_slot."""
        v = self.clip.visual
        x = v.tokens(images, self.deep_prompts[0], self.cfg.get("prompt_ln_pre", True))  # [B, 1 + N + p, W]
        N = v.grid ** 2
        guided = []
        for i, blk in enumerate(v.transformer.resblocks):
            if i > 0:  # discard the previous block's prompt outputs, append this block's prompts
                x = append_tokens(x[:, :1 + N], self.deep_prompts[i])
            B, Lx, W = x.shape
            mask = None
            if self.cfg.get("proxy_mask"):  # prompt queries see only the patches
                mask = torch.ones(Lx, Lx, dtype=torch.bool, device=x.device)
                mask[1 + N:, 0] = False
                mask[1 + N:, 1 + N:] = False
            h = blk.ln_1(x)
            q, k, val = blk.attn.qkv(h, self.attn_bias(i))  # [B, H, L, D]
            if mask is None:
                o = clip_attention(q, k, val, backend=blk.attn.backend)
            else:
                o = F.scaled_dot_product_attention(q, k, val, attn_mask=mask)
            o = o.transpose(1, 2).reshape(B, Lx, W)  # heads concatenated, before out_proj
            if i in self.guided:
                cls_query = q[:, :, 0].reshape(B, W)  # W_q ln_1(x_cls) + b_q
                if self.cfg.get("patch_sample", "mean") == "attn_slot":
                    if mapped is None:
                        raise ValueError("patch_sample=attn_slot needs the mapped labels")
                    patch = o[torch.arange(B, device=x.device), 1 + N + mapped]  # attention output at slot k_i
                else:  # the released code: mean of the patch tokens entering the block
                    patch = x[:, 1:1 + N].mean(1)
                guided.append((self.deep_prompts[i], patch, cls_query))
            x = x + blk.attn.out_proj(o)
            x = x + blk.mlp(blk.ln_2(x))
        cls = v.ln_post(x[:, 0])  # [B, W]
        feat = cls if self.head_kind == "linear" else normalize(cls @ v.proj.to(cls.dtype))
        return feat, guided

    def image_features(self, images):
        return self.encode(images)[0]

    def text_features(self):
        return self.T if self.head_kind == "text" else None

    def forward(self, images, text_features=None):
        return self.logits(self.image_features(images), text_features)

    def logits(self, feat, T=None):
        if self.head_kind == "linear":
            return self.linear(feat)
        return self.logit_scale * feat @ (self.T if T is None else T).t()

    def loss(self, batch, epoch):
        if not self.mapped:
            raise RuntimeError("davpt: no class -> proxy map yet; call model.prepare(bench, train_tf, test_tf, device) "
                               "before training (train.train does) or load_extra_state")
        y = batch["label"]
        mapped = self.class_to_proxy[y]  # [B] in 0..M-1
        feat, guided = self.encode(batch["image"], mapped)
        logits = self.logits(feat)
        task = F.cross_entropy(logits, y)
        c = self.cfg
        pa = dict(alpha=c["pa_alpha"], delta=c["pa_delta"], scale=c["pa_scale"], paper_norm=c["paper_norm"])
        # kernels.*: the fused kernel on CUDA, the reference above elsewhere
        l_x = sum(kernels.proxy_anchor_loss(patch, proxies, mapped, **pa) for proxies, patch, _ in guided) / len(guided)
        l_c = sum(kernels.proxy_anchor_loss(q, proxies, mapped, **pa) for proxies, _, q in guided) / len(guided)
        loss = task + c["beta_patch"] * l_x + c["lambda_cls"] * l_c
        with torch.no_grad():  # running class means of the classifier input (training views) for re-clustering
            f = feat.detach().float()
            if self.feat_sum is None:
                self.feat_sum = f.new_zeros(len(self.classnames), f.shape[1])
                self.feat_count = f.new_zeros(len(self.classnames))
            self.feat_sum.index_add_(0, y, f)
            self.feat_count.index_add_(0, y, torch.ones_like(y, dtype=f.dtype))
        return loss, {"acc": (logits.argmax(-1) == y).float().mean().item(), "task": task.item(),
                      "pa_patch": l_x.item(), "pa_cls": l_c.item()}

    def cluster(self, class_means, init=None):
        """k-means on LayerNorm-ed (no affine) class means -> (map [C], centroids [M, D]); identity when C <= M."""
        C = class_means.shape[0]
        if C <= self.M:
            return torch.arange(C), None
        x = F.layer_norm(class_means.float(), class_means.shape[-1:])
        g = torch.Generator().manual_seed(self.cfg["seed"])
        return cosine_kmeans(x.cpu(), self.M, g, None if init is None else init.cpu(), self.cfg["kmeans_iters"],
                             self.cfg["kmeans_tol"])

    @torch.no_grad()
    def prepare(self, bench, train_tf, test_tf, device):
        """Initial class -> proxy map: class means of the frozen prompt-free tower's classifier input over up to
        `kmeans_images` training images per class (training transform)."""
        per_class, items = {}, []
        for item in bench.train:
            if per_class.get(item[1], 0) < self.cfg["kmeans_images"]:
                per_class[item[1]] = per_class.get(item[1], 0) + 1
                items.append(item)
        v = self.clip.visual
        fn = (lambda im: v.ln_post(v.transformer(v.ln_pre(v.embed(im)))[:, 0])) if self.head_kind == "linear" \
            else (lambda im: normalize(v(im)))
        feats = image_features_of(fn, items, train_tf, self.cfg["seed"], device)
        labels = torch.tensor([y for _, y, _ in items])
        C = len(bench.classnames)
        means = torch.zeros(C, feats.shape[1]).index_add_(0, labels, feats) / torch.bincount(labels, minlength=C).clamp_min(1)[:, None]
        mapping, self.centroids = self.cluster(means)
        self.class_to_proxy, self.mapped = mapping.to(self.class_to_proxy.device), True
        log.info("davpt: %d classes -> %d proxies in blocks %s; cluster sizes %s", C, self.M, self.guided,
                 torch.bincount(mapping, minlength=self.M).tolist())

    @torch.no_grad()
    def epoch_end(self, epoch, loader=None):
        """Re-cluster from this epoch's running class means, warm-started from the previous centroids; the map
        is kept when every class falls into one cluster (or when C <= M)."""
        if self.feat_sum is None or self.centroids is None:
            self.feat_sum = self.feat_count = None
            return
        seen = self.feat_count > 0
        means = self.feat_sum / self.feat_count.clamp_min(1)[:, None]
        if not seen.all():  # a class absent this epoch: cluster it by its last known map's centroid
            log.warning("davpt: %d classes had no training image this epoch", int((~seen).sum()))
            means[~seen] = self.centroids.to(means.device)[self.class_to_proxy[~seen]]
        mapping, centroids = self.cluster(means, init=self.centroids)
        self.feat_sum = self.feat_count = None
        sizes = torch.bincount(mapping, minlength=self.M)
        if (sizes > 0).sum() <= 1:
            log.info("davpt epoch %d: every class fell into one cluster: mapping kept", epoch + 1)
            return
        changed = int((mapping.to(self.class_to_proxy.device) != self.class_to_proxy).sum())
        self.class_to_proxy, self.centroids = mapping.to(self.class_to_proxy.device), centroids
        log.info("davpt epoch %d: re-clustered, %d classes moved; cluster sizes %s", epoch + 1, changed, sizes.tolist())

    def extra_state(self):
        return dict(class_to_proxy=self.class_to_proxy.cpu(), centroids=self.centroids)

    def load_extra_state(self, state):
        if state is None:
            raise ValueError("davpt: the checkpoint has no class -> proxy map (extra state); it was not written by davpt")
        self.class_to_proxy = state["class_to_proxy"].to(self.class_to_proxy.device)
        self.centroids, self.mapped = state["centroids"], True


METHODS = {
    "zsclip": ZeroShotCLIP,
    "coop": CoOp,
    "cocoop": CoCoOp,
    "vpt": VPT,
    "maple": MaPLe,
    "kgcoop": KgCoOp,
    "dapt": DAPT,
    "fvgpt": FVGPT,
    "dapt-dist": DistributionAwarePT,
    "davpt": DAVPT,
}
