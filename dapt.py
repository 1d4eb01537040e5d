"""Prompt tuning on a frozen CLIP: every method's prompt model, each with its model defaults beside it.

Read a method top to bottom beside its section of specs/methods.md. Every model is a `PromptModel`
(prompting.py: the contract train.py relies on and the protocol through which DAPT and FVG-PT compose with a
host). A model is built from a CLIP, class names and a config: `METHODS["coop"](clip, classnames)` uses the
class's `defaults`; train.py adds the run recipe (optimisation, per dataset) on top. `load_run(run_dir)` rebuilds
a trained run for inference.

The protocol and its shared pieces (prompting.py), the CLIP towers and checkpoint loading (clip.py), the tokenizer
(tokenizer.py) and the method losses (kernels/: each loss's PyTorch reference beside its fused kernel) are
re-exported here: `dapt.PromptModel`, `dapt.build_clip`, `dapt.load_clip`, `dapt.tokenize`, `dapt.pull_push_loss`,
... are the public names.
Deliberately not here: data loading (data.py), the training loop and recipes (train.py), Triton kernels (kernels/).
"""
import copy
import hashlib
import json
import logging
import math
import os
import random
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

import data
import kernels
from clip import CLIP, CheckpointError, VisualPrompts, build_clip, load_clip, load_torch_file  # noqa: F401  (public names)
from kernels.losses import inter_dispersion_reference as inter_dispersion_loss  # noqa: F401  (public names:
from kernels.losses import intra_dispersion_reference as intra_dispersion_loss  # noqa: F401   plain PyTorch)
from kernels.losses import proxy_anchor_reference as proxy_anchor_loss  # noqa: F401
from kernels.losses import pull_push_reference as pull_push_loss  # noqa: F401
from prompting import (ConfigError, PromptModel, TextPrompts, choice, clip_draws, encode_texts,  # noqa: F401
                       eot_range, freeze, frozen_with_extra, init_image_prompts, normalize, replay, total)
from tokenizer import tokenize

log = logging.getLogger("dapt")


# ----------------------------------------------------------------------------------------------------------
# 1. zero-shot CLIP (methods.md §1)


class ZeroShotCLIP(PromptModel):
    """No training: t_c = n(E_t(template(name_c))), or the re-normalised mean over an ensemble of templates:
    "imagenet80" (CLIP's 80) or "select" (CoOp's 7, plus the dataset's own template unless it is ImageNet)."""

    defaults = dict(PromptModel.defaults, template="a photo of a {}.", ensemble="", dataset="")

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        choice(self.cfg, "ensemble", ("", "imagenet80", "select"))
        self.set_dataset(self.cfg["dataset"])
        self.set_classnames(classnames)

    def set_dataset(self, name):
        """The templates for dataset `name`: a cross-dataset target gets its own hand-crafted template in place of
        the run's when the run used its dataset's (a --template given by hand is kept)."""
        own = self.cfg["template"]
        if name != self.cfg["dataset"] and name in data.DATASETS and self.cfg["dataset"] in data.DATASETS \
                and own == data.DATASETS[self.cfg["dataset"]].template:
            own = data.DATASETS[name].template
        if self.cfg["ensemble"] == "imagenet80":
            self.templates = list(data.IMAGENET_TEMPLATES)
        elif self.cfg["ensemble"] == "select":
            # CoOp's zsclip adds the dataset's template for every dataset but ImageNet itself (its variants too)
            self.templates = list(data.SELECT_TEMPLATES) + ([] if name == "imagenet" else [own])
        else:
            self.templates = [own]

    @torch.no_grad()
    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        names = [c.replace("_", " ") for c in classnames]
        per_template = [encode_texts(self.clip, [t.format(n) for n in names]) for t in self.templates]
        self.register_buffer("T", normalize(torch.stack(per_template).mean(0)), persistent=False)

    def text_features(self, extra_tokens=None):
        return frozen_with_extra(self.clip, self.T, extra_tokens)


# ----------------------------------------------------------------------------------------------------------
# 2. CoOp (methods.md §2)


class CoOp(PromptModel):
    """Learned context `ctx` shared by all classes (or one per class: csc), CLIP frozen; loss CE."""

    defaults = dict(PromptModel.defaults, n_ctx=16, ctx_init="", csc=False, class_token_position="end",
                    class_token_layout="official")

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        n, init, W = self.cfg["n_ctx"], self.cfg["ctx_init"] or None, clip.transformer.width
        if init and self.cfg["csc"]:
            raise ConfigError("--csc true with an init phrase (--ctx-init): CoOp's official code ignores CSC when "
                              "CTX_INIT is set and trains one shared context; for class-specific contexts pass "
                              "--ctx-init '' (random init), for the official behaviour drop --csc")
        self.prompts = TextPrompts(clip, classnames, n, init, self.cfg["class_token_position"],
                                   self.cfg["class_token_layout"])
        if init:
            ctx = self.prompts.init_vectors.clone()  # [n, W]
        else:
            ctx = torch.empty(len(classnames), n, W) if self.cfg["csc"] else torch.empty(n, W)
            nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)  # [n, W] or [C, n, W]

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        if self.cfg["csc"] and len(classnames) != self.ctx.shape[0]:
            raise ConfigError("class-specific context (--csc true) cannot be applied to other classes")
        self.prompts.set_classnames(classnames)

    def text_features(self, extra_tokens=None):
        return normalize(self.prompts.encode(self.ctx, self.cfg["text_savings"], extra_tokens))


# ----------------------------------------------------------------------------------------------------------
# 3. CoCoOp (methods.md §3)


class CoCoOp(CoOp):
    """CoOp + Meta-Net: ctx_i = ctx + MetaNet(u_i), u_i = n(E_v(x_i)); text features per image, batched as
    B*C sequences in one call (not a loop over images)."""

    defaults = dict(CoOp.defaults, n_ctx=4, ctx_init="a photo of a", text_chunk=20000)

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        E, W = clip.text_projection.shape[1], clip.transformer.width
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(E, E // 16)), ("relu", nn.ReLU(inplace=True)), ("linear2", nn.Linear(E // 16, W))]))

    def text_features(self, extra_tokens=None):
        return None  # depends on the image

    def forward(self, images, text_features=None, chunk=None):
        u = self.image_features(images)  # [B, E]
        shift = self.meta_net(u)  # [B, W]
        ctx = self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # [B, n, W]: the same shift for every context vector
        C = len(self.classnames)
        chunk = chunk or max(1, self.cfg["text_chunk"] // C)  # images per text call (memory bound)
        logits = []
        for i in range(0, len(u), chunk):
            t = self.prompts.encode(ctx[i:i + chunk], self.cfg["text_savings"], per_image=True)  # [b*C, E]
            t = normalize(t).view(-1, C, u.shape[1])  # [b, C, E]
            logits.append(torch.einsum("be,bce->bc", u[i:i + chunk], t))
        return self.logit_scale * torch.cat(logits)

    def loss(self, batch, epoch):
        logits = self(batch["image"])
        return total({"cls": (1.0, F.cross_entropy(logits, batch["label"]))}, logits, batch["label"])


# ----------------------------------------------------------------------------------------------------------
# 4. VPT on CLIP's image tower (methods.md §4)


class FrozenTextClassifier(PromptModel):
    """Text side of the image-prompt methods: frozen n(E_t(classifier_template(c))), recomputed per class list."""

    defaults = dict(PromptModel.defaults, classifier_template="a photo of a {}.")
    changes_image_tower = True

    @torch.no_grad()
    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        names = [c.replace("_", " ") for c in classnames]
        texts = [self.cfg["classifier_template"].format(n) for n in names]
        self.register_buffer("T", encode_texts(self.clip, texts), persistent=False)

    def text_features(self, extra_tokens=None):
        return frozen_with_extra(self.clip, self.T, extra_tokens)


class VPT(FrozenTextClassifier):
    """m learnable tokens appended to the image sequence; deep: fresh tokens before each of the first `depth`
    blocks (the outputs at the prompt positions are discarded)."""

    defaults = dict(FrozenTextClassifier.defaults, n_prompts=8, vpt_depth=12, prompt_init="normal",
                    prompt_ln_pre=True, prompt_dropout=0.0)

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        self.set_classnames(classnames)
        v, c = clip.visual, self.cfg
        shape = (min(c["vpt_depth"], v.transformer.layers), c["n_prompts"], v.conv1.weight.shape[0])
        self.image_prompts = nn.Parameter(init_image_prompts(shape, c["prompt_init"], v.patch_size))  # [depth, m, W]
        self.dropout = nn.Dropout(c["prompt_dropout"])

    def visual_prompts(self):
        p = self.dropout(self.image_prompts)
        # block 0 reads the input tokens; blocks 1..depth-1 get fresh ones
        return VisualPrompts(p[0], [None] + list(p[1:]), self.cfg["prompt_ln_pre"])


# ----------------------------------------------------------------------------------------------------------
# 5. MaPLe (methods.md §5)


class MaPLe(PromptModel):
    """Text context ctx (n tokens of "a photo of a"), deep text prompts P_1..P_{J-1}, and vision prompts made
    from them by coupling maps F_0..F_{J-1} (Linear text width -> image width)."""

    defaults = dict(PromptModel.defaults, n_ctx=2, ctx_init="a photo of a", prompt_depth=9)
    changes_image_tower = True

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        n, W_t, W_v = self.cfg["n_ctx"], clip.transformer.width, clip.visual.conv1.weight.shape[0]
        J = min(self.cfg["prompt_depth"], clip.transformer.layers, clip.visual.transformer.layers)
        self.prompts = TextPrompts(clip, classnames, n, self.cfg["ctx_init"] or None)
        init = self.prompts.init_vectors.clone() if self.cfg["ctx_init"] else torch.empty(n, W_t).normal_(std=0.02)
        self.ctx = nn.Parameter(init)  # [n, W_t]
        # the official order of random draws: F_0, then P_1..P_{J-1}, then ONE Linear cloned into F_1..F_{J-1}
        # (identical initial couplings), so the same torch seed gives the official initial values
        f0 = nn.Linear(W_t, W_v)
        self.compound_prompts = nn.Parameter(torch.empty(J - 1, n, W_t).normal_(std=0.02))  # P_1..P_{J-1}
        shared = nn.Linear(W_t, W_v)
        self.couplings = nn.ModuleList([f0] + [copy.deepcopy(shared) for _ in range(J - 1)])  # F_0..F_{J-1}

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.prompts.set_classnames(classnames)

    def text_features(self, extra_tokens=None):
        deep = [None] + list(self.compound_prompts)  # before text block i = 1..J-1, positions 1..n <- P_i
        z = self.prompts.encode(self.ctx, self.cfg["text_savings"], extra_tokens, deep_prompts=deep,
                                prompt_slice=slice(1, 1 + self.cfg["n_ctx"]))
        return normalize(z)

    def visual_prompts(self):
        """F_0(ctx) for the input, F_i(P_i) for image blocks 1..J-1 (each [n, W_v])."""
        vp = [self.couplings[0](self.ctx)] + [f(p) for f, p in zip(self.couplings[1:], self.compound_prompts)]
        return VisualPrompts(vp[0], [None] + vp[1:], ln_pre=True)


# ----------------------------------------------------------------------------------------------------------
# 7. KgCoOp (methods.md §7; a host for FVG-PT)


class KgCoOp(CoOp):
    """CoOp + W * (1 - mean_c cos(t_c, t0_c)): the prompted class features stay near the frozen hand-crafted
    ones, t0_c = n(E_t(template(name_c))) with the dataset's template (train.py sets `template`)."""

    defaults = dict(CoOp.defaults, n_ctx=4, ctx_init="a photo of a", template="a photo of a {}.", kg_weight=2.0)

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        self.set_classnames(classnames)

    @torch.no_grad()
    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        texts = [self.cfg["template"].format(c) for c in self.prompts.classnames]
        self.register_buffer("t0", encode_texts(self.clip, texts), persistent=False)  # [C, E]

    def loss_terms(self, batch, z, T, logits):
        kg = 1 - (T[:len(self.t0)] * self.t0).sum(-1).mean()  # both normalised: the mean cosine
        return dict(super().loss_terms(batch, z, T, logits), kg=(self.cfg["kg_weight"], kg))


# ----------------------------------------------------------------------------------------------------------
# 8. Decouple before Align (methods.md §8; DAPT-S with mask files, DAPT-G with Grad-CAM)

# 25 general + 7 food background classes, in the official order (the 25/7 quirk slices this list)
DAPT_BACKGROUNDS = [
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign", "table", "forks", "tablecloth", "hands", "spoon", "glasses", "dishes"]


def views_key_mask(fg_frac, threshold=0.5):
    """Token-level views: bool key masks [B, 1 + P] (CLS + patches) for the foreground and the background view.

    fg_frac [B, P] (foreground fraction of each patch, row-major). CLS is always visible (and the tower keeps
    prompt tokens visible); a patch is a key of the foreground view when its fraction >= threshold, of the
    background view otherwise."""
    keep = fg_frac >= threshold  # [B, P]
    cls = torch.ones(fg_frac.shape[0], 1, dtype=torch.bool, device=fg_frac.device)
    return torch.cat([cls, keep], 1), torch.cat([cls, ~keep], 1)


def grad_cam(visual, images, prompts, score):
    """Grad-CAM over the image tower's blocks: [B, P] maps (>= 0, not normalised) on the patch grid.

    The tower runs with `prompts` (clip.VisualPrompts or None) up to its last block without gradients;
    A = that block's ln_1 output [B, L, W] is the only tensor that gets one: score(features [B, E]) -> scalar,
    w_b = mean over the P patch tokens of dscore/dA, cam_p = ReLU(sum_ch A_p,ch w_ch). No parameter .grad is
    touched. DAPT-G uses it as its cue; eval.py draws it."""
    last = visual.transformer.resblocks[-1]
    with torch.no_grad():
        x = visual.run(images, prompts, stop=len(visual.transformer.resblocks) - 1)  # entering the last block
        A = last.ln_1(x)
    with torch.enable_grad():
        A = A.detach().requires_grad_(True)
        h = x + last.attn(A)
        h = h + last.mlp(last.ln_2(h))
        (grad,) = torch.autograd.grad(score(visual.head(h)), A)
    P = visual.grid ** 2
    w = grad[:, 1:1 + P].float().mean(1, keepdim=True)  # [B, 1, W]
    return torch.relu((A.detach()[:, 1:1 + P].float() * w).sum(-1))  # [B, P]


class DAPT(PromptModel):
    """A host prompt model (MaPLe by default) trained on the full image and its foreground / background views:
    the host's own terms (L_cls), the visual pull-push L_v, text alignment of the foreground view L_f and of the
    background view with 32 background texts L_b, on the staged (default) or joint schedule.

    Views: pixel (x*m, x*(1-m), the paper) or token (patch keys hidden by key_mask; faster, NOT the same model).
    Views that need no gradient in the current phase (z_f always; z_b outside the alignment phase) run in one
    no_grad call, the others in one call with gradients: the same numbers as one 3B call, less backward work.
    The host's keys (n_ctx, prompt_depth, ...) are its class defaults, overridable as usual."""

    hosts = ("maple", "coop", "kgcoop", "vpt", "promptsrc", "mmrl")  # composed through the protocol; each is tested
    defaults = dict(PromptModel.defaults, host="maple", cue="masks", decouple="pixel", dapt_schedule="staged",
                    dapt_switch_epoch=7, dapt_w_v=0.8, dapt_w_f=0.1, dapt_w_b=0.5, dapt_margin=1.5,
                    bg_template="a clean origami {}.", bg_slice_quirk=False, gradcam_threshold=0.5,
                    gradcam_quirk=False, decouple_threshold=0.5)

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        c = self.cfg
        for key, options in (("host", self.hosts), ("cue", ("masks", "gradcam")), ("decouple", ("pixel", "token")),
                             ("dapt_schedule", ("staged", "joint"))):
            choice(c, key, options)
        self.host = METHODS[c["host"]](clip, classnames, c)
        self.needs_masks = c["cue"] == "masks"  # Grad-CAM masks are made in the step
        self.changes_image_tower = self.host.changes_image_tower
        # background texts, encoded by the host's prompted text tower after the classes
        tokens = tokenize([c["bg_template"].format(b) for b in DAPT_BACKGROUNDS])
        self.register_buffer("bg_tokens", tokens.to(clip.token_embedding.weight.device), persistent=False)

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.host.set_classnames(classnames)

    def set_dataset(self, name):
        self.host.set_dataset(name)

    def split_texts(self, T_all):
        """(T_fg, T_bg). Clean: C classes / 32 backgrounds. bg_slice_quirk (official): C + first 7 / last 25."""
        k = len(self.classnames) + (7 if self.cfg["bg_slice_quirk"] else 0)
        return T_all[:k], T_all[k:len(self.classnames) + len(DAPT_BACKGROUNDS)]

    def text_features(self, extra_tokens=None):
        """Inference classifier: the C classes (with bg_slice_quirk C + 7 columns, argmax over all as official),
        computed with the backgrounds as in training; then the extra texts' features when given."""
        tokens = self.bg_tokens if extra_tokens is None else torch.cat([self.bg_tokens, extra_tokens.to(self.bg_tokens.device)])
        T_all = self.host.text_features(tokens)
        T_fg = self.split_texts(T_all)[0]
        return T_fg if extra_tokens is None else torch.cat([T_fg, T_all[len(self.classnames) + len(DAPT_BACKGROUNDS):]])

    def visual_prompts(self):
        return self.host.visual_prompts()

    def image_features(self, images, key_mask=None):
        return self.host.image_features(images, key_mask)

    # the host's own set-up, optimizer groups, epoch hook and state (PromptSRC's GPA aggregate)
    def prepare(self, bench, train_tf, test_tf, device):
        self.host.prepare(bench, train_tf, test_tf, device)

    def param_groups(self):
        return self.host.param_groups()

    def epoch_end(self, epoch, loader=None):
        self.host.epoch_end(epoch, loader)

    def extra_state(self):
        return self.host.extra_state()

    def load_extra_state(self, state):
        self.host.load_extra_state(state)

    def gradcam(self, images, labels, T, return_cam=False):
        """DAPT-G foreground masks [B, 1, S, S] in {0, 1} for exactly these (augmented) images: grad_cam of the
        current model with score = sum_b of the ground-truth logit against the class texts T [C, E]; the patch map
        is upsampled to the image (bilinear, align_corners=True), divided by (its per-image max + 1e-6) and
        thresholded at gradcam_threshold. gradcam_quirk (the official trainers/util.py): T holds all C + 32 texts,
        the score is divided by B (C + 32), and the map by (the batch max + 1e-6), so the 1e-6 weighs and an
        image's mask depends on the other images of the batch."""
        with torch.no_grad():
            prompts = self.visual_prompts()
        s, T, quirk = self.logit_scale, T.detach(), self.cfg["gradcam_quirk"]
        div = labels.numel() * T.shape[0] if quirk else 1
        cam = grad_cam(self.clip.visual, images, prompts,
                       lambda f: (s * normalize(f) @ T.t()).gather(1, labels[:, None]).sum() / div)
        g = self.clip.visual.grid
        cam = F.interpolate(cam.view(-1, 1, g, g), size=images.shape[-2:], mode="bilinear", align_corners=True)
        peak = cam.max() if quirk else cam.flatten(1).max(1)[0].view(-1, 1, 1, 1)
        cam = cam / (peak + 1e-6)
        m = (cam >= self.cfg["gradcam_threshold"]).to(images.dtype)
        return (m, cam) if return_cam else m

    def loss(self, batch, epoch):
        terms, logits, stats = self.view_terms(batch, epoch)
        loss, more = total(terms, logits, batch["label"])
        return loss, dict(more, **stats)

    def view_terms(self, batch, epoch):
        """({name: (weight, value)}, logits, stats): the host's terms on the full view ("cls", ...), then L_v
        (staged: epochs < switch) or L_f and L_b (staged: later), or all of them (joint)."""
        x, y, c = batch["image"], batch["label"], self.cfg
        staged = c["dapt_schedule"] == "staged"
        align = not staged or epoch >= c["dapt_switch_epoch"]  # L_f, L_b active
        pull_push = not staged or epoch < c["dapt_switch_epoch"]  # L_v active
        T_all = self.host.text_features(self.bg_tokens)  # [C + 32, E]
        T_fg, T_bg = self.split_texts(T_all)
        if c["cue"] == "masks":
            m, frac = batch["fg_mask"].to(x.dtype), batch.get("fg_frac")
        else:  # Grad-CAM on this step's crop
            m = self.gradcam(x, y, T_all if c["gradcam_quirk"] else T_all[:len(self.classnames)])
            frac = F.avg_pool2d(m, self.clip.visual.patch_size).flatten(1)
        # views: name -> (images, key mask); only views that need gradients go through the graph
        if c["decouple"] == "pixel":
            views = {"full": (x, None), "fg": (x * m, None), "bg": (x * (1 - m), None)}
        else:
            if frac is None:
                raise ConfigError("--decouple token needs batch['fg_frac'] (the loader's patch_size)")
            km_f, km_b = views_key_mask(frac.to(x.device), c["decouple_threshold"])
            views = {"full": (x, None), "fg": (x, km_f), "bg": (x, km_b)}
        z = {}
        grad_views = ["full", "bg"] if align else ["full"]
        with torch.no_grad():
            z.update(self.encode_views(views, [k for k in views if k not in grad_views]))
        z.update(self.encode_views(views, grad_views))
        s = self.logit_scale
        logits = s * z["full"] @ T_fg.t()
        terms = self.host.loss_terms(batch, z["full"], T_fg, logits)
        if pull_push:  # fused kernel on CUDA, the reference elsewhere
            v = kernels.pull_push_loss(z["full"], z["fg"].detach(), z["bg"].detach(), margin=c["dapt_margin"])
            terms["v"] = (c["dapt_w_v"], v)
        if align:
            terms["f"] = (c["dapt_w_f"], F.cross_entropy(s * z["fg"].detach() @ T_fg.t(), y))  # text side only
            bg_logits = s * z["bg"] @ T_bg.t()
            terms["b"] = (c["dapt_w_b"], F.cross_entropy(bg_logits, bg_logits.detach().argmax(-1)))  # pseudo-label
        return terms, logits, {"fg_area": m.mean().detach()}

    def encode_views(self, views, names):
        """One batched image-tower call for the named views -> {name: [B, E]}."""
        if not names:
            return {}
        images = torch.cat([views[k][0] for k in names])
        masks = [views[k][1] for k in names]
        key_mask = None
        if any(km is not None for km in masks):
            full = torch.ones(len(views[names[0]][0]), 1 + self.clip.visual.grid ** 2, dtype=torch.bool,
                              device=images.device)
            key_mask = torch.cat([full if km is None else km for km in masks])
        return dict(zip(names, self.image_features(images, key_mask).chunk(len(names))))


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
    """Adapters and gates on a frozen host (any prompt model with class text features).

    Per batch, in one no-grad pass: host features f, f_fg of the full and foreground views (one batched call),
    the host class features T (cached per class list), zero-shot CLIP f0 (= f when the host leaves the image
    tower unchanged) and T0 = n(E_t("a photo of a {c}.")) (cached). Trained: FDC adapters + alphas, the FRG and
    the backbone gate. Prediction: z_FDC on the training classes, z_PC on any other class list (predict_mode
    auto); see `set_classnames`."""

    defaults = dict(PromptModel.defaults, predict_mode="auto", mask_fill="black", fvgpt_bottleneck=64,
                    fvgpt_gate_hidden=32, fvgpt_scale=100.0, fvgpt_lambda_base=10.0, fvgpt_lambda_new=1.0,
                    fvgpt_lambda_rg=1.0, fvgpt_tau=2.0, fvgpt_delta=0.0, fvgpt_area=(0.02, 0.98),
                    fvgpt_alpha_init=1e-3, fvgpt_use_kl=True, no_detach_r=False)
    needs_masks = True

    def __init__(self, host, classnames, cfg=None):
        super().__init__(host.clip, classnames, cfg)
        self.host = freeze(host).eval()
        if host.text_features() is None:
            raise ConfigError(f"fvgpt: host {type(host).__name__} has image-conditioned text features (CoCoOp); "
                              "use a host with class text features (coop, kgcoop, maple, vpt, ...)")
        c = self.cfg
        choice(c, "predict_mode", ("auto", "fdc", "pc"))
        E, hid = host.clip.text_projection.shape[1], c["fvgpt_gate_hidden"]
        self.adapter_v, self.adapter_t = bottleneck(E, c["fvgpt_bottleneck"]), bottleneck(E, c["fvgpt_bottleneck"])
        self.alpha_v = nn.Parameter(torch.tensor(c["fvgpt_alpha_init"]))
        self.alpha_t = nn.Parameter(torch.tensor(c["fvgpt_alpha_init"]))
        self.frg = nn.Sequential(nn.Linear(3, hid), nn.ReLU(), nn.Linear(hid, 1))  # foreground reliability gate
        self.brg = nn.Sequential(nn.Linear(3, hid), nn.ReLU(), nn.Linear(hid, 1))  # backbone reliability gate
        self.train_classnames, self.same_dataset = list(classnames), True
        self.set_classnames(classnames)

    def train(self, mode=True):
        super().train(mode)
        self.host.eval()  # frozen: no dropout in the host
        return self

    def set_dataset(self, name):
        self.same_dataset = name == self.cfg["dataset"]
        self.host.set_dataset(name)

    @torch.no_grad()
    def set_classnames(self, classnames):
        """New class list: refresh the cached host / CLIP class features. predict_mode auto: z_FDC when the list
        is the training list of the training dataset (base test, all-class few-shot), z_PC otherwise (new
        classes, cross-dataset and domain-shift targets, ImageNet-V2 / Sketch included)."""
        super().set_classnames(classnames)
        self.host.set_classnames(classnames)
        mode, same = self.cfg["predict_mode"], self.same_dataset
        self.mode = mode if mode != "auto" else ("fdc" if same and list(classnames) == self.train_classnames else "pc")
        self.T_host = None  # host class features, computed on first use (device / autocast of the caller)
        names = [c.replace("_", " ") for c in classnames]
        self.register_buffer("T0", encode_texts(self.clip, [f"a photo of a {n}." for n in names]), persistent=False)

    def host_text(self):
        if self.T_host is None:
            with torch.no_grad():
                self.T_host = normalize(self.host.text_features())
        return self.T_host

    def text_features(self, extra_tokens=None):
        return self.host_text() if extra_tokens is None else normalize(self.host.text_features(extra_tokens))

    @torch.no_grad()
    def frozen_features(self, images, fg_images=None):
        """f [B, E], f_fg [B, E] or None, f0 [B, E]: the host image side once on [full; fg] views."""
        both = images if fg_images is None else torch.cat([images, fg_images])
        f_all = normalize(self.host.image_features(both))
        f, f_fg = (f_all, None) if fg_images is None else f_all.chunk(2)
        f0 = normalize(self.clip.encode_image(images)) if self.host.changes_image_tower else f
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
        c, x, y, m = self.cfg, batch["image"], batch["label"], batch["fg_mask"].to(batch["image"].dtype)
        s, tau = c["fvgpt_scale"], c["fvgpt_tau"]
        T = self.host_text()
        x_fg = data.masked_view(x, m, c["mask_fill"])
        f, f_fg, f0 = self.frozen_features(x, x_fg)
        z_full, z_fg, z_clip = s * f @ T.t(), s * f_fg @ T.t(), s * f0 @ self.T0.t()
        a = m.flatten(1).mean(1)  # foreground area [B]
        # FRG: trust in the foreground view
        p_full, p_fg = z_full.softmax(-1), z_fg.softmax(-1)
        r = torch.sigmoid(self.frg(torch.stack([entropy(p_full) - entropy(p_fg),
                                                F.cosine_similarity(p_full, p_fg, dim=-1), a], -1))).squeeze(-1)
        lo, hi = c["fvgpt_area"]
        valid = (a >= lo) & (a <= hi)
        target = ((F.cross_entropy(z_fg, y, reduction="none") + c["fvgpt_delta"])
                  < F.cross_entropy(z_full, y, reduction="none")).float()
        # the mean BCE over the samples whose area is in bounds (0 when there is none), without reading the mask
        l_rg = (F.binary_cross_entropy(r, target, reduction="none") * valid).sum() / valid.sum().clamp_min(1)
        r = torch.where(valid, r, torch.zeros_like(r))
        # FDC: adapted logits distilled from the full / foreground view, weighted by the trust
        z_fdc = self.fdc_logits(f, T)
        rw = r if c["no_detach_r"] else r.detach()
        l_dist = ((1 - rw) * kl_div(z_full, z_fdc, tau) + rw * kl_div(z_fg, z_fdc, tau)).mean()
        # PC: host calibrated toward zero-shot CLIP
        z_pc = self.pc_logits(z_full, z_clip)
        l_pc = F.cross_entropy(z_pc, y) + (kl_div(z_clip, z_pc, tau).mean() if c["fvgpt_use_kl"] else 0)
        ce = F.cross_entropy(z_fdc, y)
        loss = ce + c["fvgpt_lambda_base"] * (l_dist + c["fvgpt_lambda_rg"] * l_rg) + c["fvgpt_lambda_new"] * l_pc
        stats = {"acc": (z_fdc.argmax(-1) == y).float().mean(), "L_dist": l_dist, "L_RG": l_rg, "L_PC": l_pc,
                 "r": r.mean()}
        return loss, {k: v.detach() for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------------------
# 10. Distribution-aware prompt tuning (methods.md §10) and 11. DA-VPT (methods.md §11): both need the training
# images before training (`prepare`); evaluation never calls it.


@torch.no_grad()
def image_features_of(fn, items, transform, seed, device, batch=100, epoch=0):
    """fn(images) -> [N, D] features of Benchmark items in order; a training transform draws its augmentation
    from the generator seeded by (seed, epoch, index), as the training loader does."""
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


def class_means(feats, labels, n_classes):
    """[C, D] mean of the features of each class (0 for a class without items)."""
    sums = torch.zeros(n_classes, feats.shape[1]).index_add_(0, labels, feats)
    return sums / torch.bincount(labels, minlength=n_classes).clamp_min(1).float()[:, None]


def class_prototypes(clip, bench, transform, seed, device, view):
    """proto_c = (1/K_c) sum_{i: y_i = c} n(E_v^CLIP(x_i)) over the few-shot training items (frozen, unprompted
    tower, one view per image, NOT re-normalised) -> [C, E] float32 on the CPU, cached beside the few-shot split
    as <dataset_dir>/split_fewshot/prototypes_shot_K-seed_S-<subsample>_<weights digest>_<view>.pt (the user cache
    folder when the dataset folder is read-only: data.cache_dirs), read with weights_only=True (data only).
    The file records the items, the transform constants and the seed; any mismatch regenerates it."""
    digest = state_digest(clip.visual)[:16]
    m = bench.meta
    name = f"prototypes_shot_{m['shots']}-seed_{m['seed']}-{m['subsample']}_{digest}_{view}.pt"
    folders, write_to = data.cache_dirs(m["dataset_dir"])
    record = dict(items=[(os.path.relpath(p, m["dataset_dir"]), int(y)) for p, y, _ in bench.train],
                  n_classes=len(bench.classnames), transform=transform.constants(), seed=seed, view=view,
                  clip_visual_sha256=digest)
    for path in [os.path.join(d, name) for d in folders if os.path.exists(os.path.join(d, name))]:
        cached = load_torch_file(path, expected="a prototype cache of dapt-dist (delete it to regenerate it)")
        if isinstance(cached, dict) and cached.get("record") == record:
            log.info("prototypes: loaded %s", path)
            return cached["prototypes"]
        log.info("prototypes: %s was made with other items / transform / seed: regenerating it", path)
    path = os.path.join(write_to, name)
    feats = normalize(image_features_of(clip.encode_image, bench.train, transform, seed, device))  # [N, E]
    labels = torch.tensor([y for _, y, _ in bench.train])
    C = len(bench.classnames)
    protos = class_means(feats, labels, C)  # [C, E], mean of unit vectors (norm < 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(dict(prototypes=protos, record=record), tmp)
    os.replace(tmp, path)
    log.info("prototypes: %d classes from %d images (%s view), cached at %s%s", C, len(labels), view, path,
             "" if write_to == folders[0] else " (the dataset folder cannot be written)")
    return protos


class DistributionAwarePT(CoOp):
    """CoOp text context (16 shared vectors, class at the end) + VPT-shallow image prompts (16, after ln_pre);
    L = CE + beta_v * L_intra (MSE of z to fixed class prototypes) + beta_t * L_inter (RBF repulsion of the
    class text features)."""

    defaults = dict(CoOp.defaults, n_prompts=16, prompt_init="xavier", prompt_ln_pre=False, beta_v=0.1,
                    beta_t=0.1, dispersion_t=2.0, proto_train_view=True)
    changes_image_tower = True

    def __init__(self, clip, classnames, cfg=None):
        c, v = {**self.defaults, **(cfg or {})}, clip.visual
        # the image prompts are drawn before the text context, as the official code does: [16, W_v]
        prompts = init_image_prompts((c["n_prompts"], v.conv1.weight.shape[0]), c["prompt_init"], v.patch_size)
        super().__init__(clip, classnames, cfg)
        self.image_prompts = nn.Parameter(prompts)
        self.prototypes = None  # [C, E], set by prepare()

    def prepare(self, bench, train_tf, test_tf, device):
        """Prototypes from one pass over the few-shot images with one training augmentation each (official;
        proto_train_view false: the deterministic test view)."""
        tf, view = (train_tf, "train") if self.cfg["proto_train_view"] else (test_tf, "test")
        self.prototypes = class_prototypes(self.clip, bench, tf, self.cfg["seed"], device, view).to(device)

    def visual_prompts(self):
        return VisualPrompts(self.image_prompts, None, self.cfg["prompt_ln_pre"])

    def loss_terms(self, batch, z, T, logits):
        if self.prototypes is None:
            raise RuntimeError("dapt-dist: prototypes are missing; call model.prepare(bench, train_tf, test_tf, "
                               "device) before training (train.train does)")
        # fused on CUDA, the references elsewhere
        intra = kernels.intra_dispersion_loss(z, self.prototypes, batch["label"])
        inter = kernels.inter_dispersion_loss(T, self.cfg["dispersion_t"])
        return dict(super().loss_terms(batch, z, T, logits), intra=(self.cfg["beta_v"], intra),
                    inter=(self.cfg["beta_t"], inter))


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


class ProxyMap(nn.Module):
    """DA-VPT's class -> proxy map: cosine k-means of LayerNorm-ed (no affine) class means into M clusters, the
    identity when C <= M. `fit` sets the first map; `accumulate` keeps running class means of the training
    features over an epoch and `update` re-clusters from them, warm-started from the previous centroids
    (the map is kept when every class falls into one cluster). The map and centroids are checkpointed."""

    def __init__(self, n_classes, n_proxies, seed, iters, tol):
        super().__init__()
        self.C, self.M, self.seed, self.iters, self.tol = n_classes, min(n_proxies, n_classes), seed, iters, tol
        self.register_buffer("class_to_proxy", torch.arange(n_classes) % self.M, persistent=False)
        self.centroids = None
        self.ready = n_classes <= self.M  # the identity needs no data
        self.sums = self.counts = None

    def cluster(self, class_means, init=None):
        """(map [C], centroids [M, D] or None)."""
        if self.C <= self.M:
            return torch.arange(self.C), None
        x = F.layer_norm(class_means.float(), class_means.shape[-1:])
        g = torch.Generator().manual_seed(self.seed)
        return cosine_kmeans(x.cpu(), self.M, g, None if init is None else init.cpu(), self.iters, self.tol)

    def fit(self, class_means):
        mapping, self.centroids = self.cluster(class_means)
        self.class_to_proxy, self.ready = mapping.to(self.class_to_proxy.device), True
        return mapping

    @torch.no_grad()
    def accumulate(self, feat, labels):
        f = feat.detach().float()
        if self.sums is None:
            self.sums, self.counts = f.new_zeros(self.C, f.shape[1]), f.new_zeros(self.C)
        self.sums.index_add_(0, labels, f)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=f.dtype))

    def reset(self):
        """Forget this epoch's running means (an epoch that does not re-cluster)."""
        self.sums = self.counts = None

    @torch.no_grad()
    def update(self, epoch):
        if self.sums is None or self.centroids is None:
            return self.reset()
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # torchrun: every process's
            torch.distributed.all_reduce(self.sums)  # images (they are on the backend's device: the model's)
            torch.distributed.all_reduce(self.counts)
        seen = self.counts > 0
        means = self.sums / self.counts.clamp_min(1)[:, None]
        if not seen.all():  # a class absent this epoch: cluster it by its last known map's centroid
            log.warning("davpt: %d classes had no training image this epoch", int((~seen).sum()))
            means[~seen] = self.centroids.to(means.device)[self.class_to_proxy[~seen]]
        mapping, centroids = self.cluster(means, init=self.centroids)
        self.sums = self.counts = None
        sizes = torch.bincount(mapping, minlength=self.M)
        if (sizes > 0).sum() <= 1:
            log.info("davpt epoch %d: every class fell into one cluster: mapping kept", epoch + 1)
            return
        changed = int((mapping.to(self.class_to_proxy.device) != self.class_to_proxy).sum())
        self.class_to_proxy, self.centroids = mapping.to(self.class_to_proxy.device), centroids
        log.info("davpt epoch %d: re-clustered, %d classes moved; cluster sizes %s", epoch + 1, changed, sizes.tolist())

    def state(self):
        return dict(class_to_proxy=self.class_to_proxy.cpu(), centroids=self.centroids)

    def load_state(self, state):
        self.class_to_proxy = state["class_to_proxy"].to(self.class_to_proxy.device)
        self.centroids, self.ready = state["centroids"], True


def proxy_attn_mask(L, n_patches, device):
    """DA-VPT's optional attention mask (bool [L, L], True = allowed): prompt queries see only the patches."""
    mask = torch.ones(L, L, dtype=torch.bool, device=device)
    mask[1 + n_patches:, 0] = False
    mask[1 + n_patches:, 1 + n_patches:] = False
    return mask


def guided_samples(x_in, capture, n_patches, patch_sample, mapped=None):
    """DA-VPT's Proxy-Anchor samples of one guided block: (patch sample [B, W], CLS query [B, W]).

    CLS query = W_q ln_1(x_cls) + b_q, read off the block's attention (capture["q"] [B, H, L, W/H]). Patch sample:
    "mean" (the released code) = the mean of the patch tokens entering the block (x_in [B, L, W]); "attn_slot"
    (our reading of the paper) = the heads' attention output before out_proj at the slot of each image's proxy
    (mapped [B])."""
    B, L, W = x_in.shape
    cls_query = capture["q"][:, :, 0].reshape(B, W)
    if patch_sample == "mean":
        return x_in[:, 1:1 + n_patches].mean(1), cls_query
    if mapped is None:
        raise ValueError("patch_sample=attn_slot needs the mapped labels")
    o = capture["o"].transpose(1, 2).reshape(B, L, W)  # heads concatenated
    return o[torch.arange(B, device=o.device), 1 + n_patches + mapped], cls_query


def kv_bias_params(visual, extra=False):
    """DA-VPT+: trainable copies of the K and V slices of every block's packed in_proj_bias (the q slice stays
    frozen: the model passes the packed bias per block); `extra` also unfreezes what the released configs do
    (out_proj.bias, mlp.c_proj.bias, ln_2.bias, ln_1 weight and bias, class_embedding)."""
    blocks, W = visual.transformer.resblocks, visual.conv1.weight.shape[0]
    bias_k = nn.ParameterList([nn.Parameter(b.attn.in_proj_bias[W:2 * W].detach().clone()) for b in blocks])
    bias_v = nn.ParameterList([nn.Parameter(b.attn.in_proj_bias[2 * W:].detach().clone()) for b in blocks])
    if extra:
        for b in blocks:
            for p in (b.attn.out_proj.bias, b.mlp.c_proj.bias, b.ln_2.bias, b.ln_1.weight, b.ln_1.bias):
                p.requires_grad_(True)
        visual.class_embedding.requires_grad_(True)
    return bias_k, bias_v


def first_per_class(items, k):
    """The first k items of each class, in order."""
    seen, out = {}, []
    for item in items:
        if seen.get(item[1], 0) < k:
            seen[item[1]] = seen.get(item[1], 0) + 1
            out.append(item)
    return out


def sample_per_class(items, k, seed):
    """k items per class as DA-VPT's mapping sampler draws them (Dataset/mapping_sampler.py): random.sample of k
    when the class has at least k, else every item k // n times plus random.sample(k % n), shuffled. Classes in
    label order, one random.Random(seed): the official picks for the same seed."""
    rng, by_class, out = random.Random(seed), {}, []
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    for y in sorted(by_class):
        s = by_class[y]
        if len(s) >= k:
            out += rng.sample(s, k)
        else:
            picked = s * (k // len(s)) + rng.sample(s, k % len(s))
            rng.shuffle(picked)
            out += picked
    return out


class DAVPT(FrozenTextClassifier):
    """VPT-deep (8 prompts in every image block); in the guided blocks the prompt set is M proxies, one per
    cluster of classes (ProxyMap), pulled toward the block's patch samples and the CLS query by Proxy-Anchor
    losses. DA-VPT+ (bias_tuning) also trains the K and V slices of every block's packed in_proj_bias.
    Official-recipe keys (train.py SWITCHES official_optim): wd_head (the linear head's weight decay; < 0 = the
    run's), decay_class_embedding, kmeans_sampling "official" (10 images per class by random.sample, repeats when
    a class has fewer), recluster_from (first epoch whose end re-clusters; -1 never), prompt_norm "l2"."""

    defaults = dict(FrozenTextClassifier.defaults, n_prompts=8, prompt_init="normal", prompt_ln_pre=True,
                    n_proxies=10, guided_layers="-1", beta_patch=0.05, lambda_cls=0.05, pa_alpha=32.0, pa_delta=0.1,
                    pa_scale=1.0, paper_norm=False, patch_sample="mean", proxy_mask=False, bias_tuning=False,
                    bias_extra=False, head="text", kmeans_images=10, kmeans_iters=20, kmeans_tol=1e-4,
                    subsample="all", prompt_norm="", wd_head=-1.0, decay_class_embedding=False,
                    kmeans_sampling="first", recluster_from=0)

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        c, v = self.cfg, clip.visual
        L, W, C = v.transformer.layers, v.conv1.weight.shape[0], len(classnames)
        self.guided = sorted({int(i) % L for i in str(c["guided_layers"]).split(",")})
        for key, options in (("patch_sample", ("mean", "attn_slot")), ("prompt_norm", ("", "l2")),
                             ("kmeans_sampling", ("first", "official"))):
            choice(c, key, options)
        self.proxy_map = ProxyMap(C, c["n_proxies"], c["seed"], c["kmeans_iters"], c["kmeans_tol"])
        M = self.proxy_map.M  # C < M: one proxy per class, identity map
        self.deep_prompts = nn.ParameterList([  # block i's tokens: [M, W] proxies in guided blocks, else [8, W]
            nn.Parameter(init_image_prompts((M if i in self.guided else c["n_prompts"], W), c["prompt_init"], v.patch_size))
            for i in range(L)])
        if choice(c, "head", ("text", "linear")) == "linear":
            if c["subsample"] != "all":
                raise ConfigError("davpt --head linear learns one weight row per training class and cannot score "
                                  "new classes: use it with --subsample all (few-shot), or --head text for base-to-novel")
            self.linear = nn.Linear(W, C)
            nn.init.trunc_normal_(self.linear.weight, std=0.02)
            nn.init.zeros_(self.linear.bias)
        self.set_classnames(classnames)
        if c["bias_extra"] and not c["bias_tuning"]:
            raise ConfigError("davpt: --bias-extra needs --bias-tuning true (DA-VPT+)")
        if c["bias_tuning"]:
            self.bias_k, self.bias_v = kv_bias_params(v, c["bias_extra"])
        log.info("davpt: trainable tensors %s", [n for n, p in self.named_parameters() if p.requires_grad])

    def set_classnames(self, classnames):
        if self.cfg["head"] == "linear" and len(classnames) != self.linear.out_features:
            raise ConfigError("davpt --head linear was trained on other classes and cannot score new classes: "
                              "use --head text for base-to-novel or cross-dataset evaluation")
        super().set_classnames(classnames)

    def param_groups(self):
        """Weight decay on prompts and the linear weight only (wd_head >= 0: the head's own); biases, LayerNorm and
        other 1-D tensors get none (decay would pull pretrained biases toward 0), except the class embedding
        with decay_class_embedding (the official timm cls_token is 3-D, so decayed)."""
        c, head = self.cfg, getattr(self, "linear", None)
        decayed = lambda p: p.dim() > 1 or (c["decay_class_embedding"] and p is self.clip.visual.class_embedding)
        params = [p for p in self.parameters() if p.requires_grad]
        split_head = head is not None and c["wd_head"] >= 0
        groups = [dict(params=[p for p in params if decayed(p) and not (split_head and p is head.weight)]),
                  dict(params=[p for p in params if not decayed(p)], weight_decay=0.0)]
        if split_head:
            groups.append(dict(params=[head.weight], weight_decay=c["wd_head"]))
        return [g for g in groups if g["params"]]

    def visual_prompts(self):
        p = [F.normalize(x, dim=-1, eps=1e-6) if self.cfg["prompt_norm"] == "l2" else x for x in self.deep_prompts]
        return VisualPrompts(p[0], [None] + p[1:], self.cfg["prompt_ln_pre"])

    def encode(self, images, mapped=None, key_mask=None):
        """-> (classifier input [B, D], per guided block (proxies [M, W], patch sample [B, W], CLS query [B, W])).

        The tower's block loop with a hook per block: the DA-VPT+ attention bias, the proxy mask, and in guided
        blocks a capture of the block input and of its attention (guided_samples). mapped [B] (the proxy of each
        image's class) is needed only for patch_sample=attn_slot."""
        v, c = self.clip.visual, self.cfg
        seen = []  # (block, input tokens, captured q / k / v / o) of the guided blocks

        def hook(i, x):
            kw = {}
            if c["bias_tuning"]:
                attn = v.transformer.resblocks[i].attn
                kw["bias"] = torch.cat([attn.in_proj_bias[:x.shape[-1]], self.bias_k[i], self.bias_v[i]])  # packed [3W]
            if c["proxy_mask"]:
                kw["attn_mask"] = proxy_attn_mask(x.shape[1], v.grid ** 2, x.device)
            if i in self.guided:
                kw["capture"] = {}
                seen.append((i, x, kw["capture"]))
            return kw

        x = v.run(images, self.visual_prompts(), key_mask, hook=hook)
        guided = [(self.deep_prompts[i], *guided_samples(x_in, cap, v.grid ** 2, c["patch_sample"], mapped))
                  for i, x_in, cap in seen]
        cls = v.ln_post(x[:, 0])  # [B, W]
        feat = cls if c["head"] == "linear" else normalize(cls @ v.proj.to(cls.dtype))
        return feat, guided

    def image_features(self, images, key_mask=None):
        return self.encode(images, key_mask=key_mask)[0]

    def text_features(self, extra_tokens=None):
        return super().text_features(extra_tokens) if self.cfg["head"] == "text" else None

    def forward(self, images, text_features=None):
        feat = self.image_features(images)
        if self.cfg["head"] == "linear":
            return self.linear(feat)
        return self.logit_scale * feat @ (self.T if text_features is None else text_features).t()

    def loss(self, batch, epoch):
        if not self.proxy_map.ready:
            raise RuntimeError("davpt: no class -> proxy map yet; call model.prepare(bench, train_tf, test_tf, device) "
                               "before training (train.train does) or load_extra_state")
        c, y = self.cfg, batch["label"]
        mapped = self.proxy_map.class_to_proxy[y]  # [B] in 0..M-1
        feat, guided = self.encode(batch["image"], mapped)
        logits = self.linear(feat) if c["head"] == "linear" else self.logit_scale * feat @ self.T.t()
        pa = dict(alpha=c["pa_alpha"], delta=c["pa_delta"], scale=c["pa_scale"], paper_norm=c["paper_norm"])
        # kernels.*: the fused kernel on CUDA, the reference elsewhere
        l_x = sum(kernels.proxy_anchor_loss(patch, proxies, mapped, **pa) for proxies, patch, _ in guided) / len(guided)
        l_c = sum(kernels.proxy_anchor_loss(q, proxies, mapped, **pa) for proxies, _, q in guided) / len(guided)
        self.proxy_map.accumulate(feat, y)  # running class means of the training views, for re-clustering
        terms = {"task": (1.0, F.cross_entropy(logits, y)), "pa_patch": (c["beta_patch"], l_x),
                 "pa_cls": (c["lambda_cls"], l_c)}
        return total(terms, logits, y)

    @torch.no_grad()
    def prepare(self, bench, train_tf, test_tf, device):
        """Initial class -> proxy map: class means of the frozen prompt-free tower's classifier input over up to
        `kmeans_images` training images per class (training transform)."""
        k = self.cfg["kmeans_images"]
        items = (sample_per_class(bench.train, k, self.cfg["seed"]) if self.cfg["kmeans_sampling"] == "official"
                 else first_per_class(bench.train, k))
        v, C = self.clip.visual, len(bench.classnames)
        fn = (lambda im: v.ln_post(v.run(im)[:, 0])) if self.cfg["head"] == "linear" else (lambda im: normalize(v(im)))
        feats = image_features_of(fn, items, train_tf, self.cfg["seed"], device)
        mapping = self.proxy_map.fit(class_means(feats, torch.tensor([y for _, y, _ in items]), C))
        log.info("davpt: %d classes -> %d proxies in blocks %s; cluster sizes %s", C, self.proxy_map.M, self.guided,
                 torch.bincount(mapping, minlength=self.proxy_map.M).tolist())

    def epoch_end(self, epoch, loader=None):
        if 0 <= self.cfg["recluster_from"] <= epoch:
            self.proxy_map.update(epoch)
        else:
            self.proxy_map.reset()

    def extra_state(self):
        return self.proxy_map.state()

    def load_extra_state(self, state):
        if state is None:
            raise ValueError("davpt: the checkpoint has no class -> proxy map (extra state); it was not written by davpt")
        self.proxy_map.load_state(state)


# ----------------------------------------------------------------------------------------------------------
# 6b. IVLP, 6. PromptSRC and 6c. MMRL (methods.md §6b, §6, §6c; IVLP first: PromptSRC builds on it). Their
# initial values can be the official ones for the same seed: `official_init` replays the official build's draws
# (prompting.replay).


class IVLP(PromptModel):
    """Independent vision-language prompts: deep text and deep image prompts, not coupled (methods.md §6b).

    Text "[SOS] ctx <rest of ctx_init> <name> . [EOT]": ctx [n_t, W_t] = the first n_t token embeddings of ctx_init
    when n_t <= 4 (the rest of the phrase stays frozen text), else N(0, 0.02^2) with "X" slots (independentVL.py
    79-92). Before text block i = 1..J_t-1, rows 1..n_t of every sequence <- P^t_i [n_t, W_t] (clip/model.py
    242-252); J_t >= 1 (independentVL.py 67). Image: V_0 [n_v, W_v] appended after the patches, then ln_pre over all
    tokens (clip/model.py 402-413); before image block i = 1..J_v-1 the last n_v tokens <- P^v_i (233-241);
    J_v = 0: no image prompts (370-373). Prompts N(0, 0.02^2) (215-221, 374-379).
    l = exp(logit_scale) n(E_v) n(E_t)^T, L = CE(l, y) (independentVL.py 163-174). Trainable: names with
    "prompt_learner" or "VPT" (201-207): 2+2 depth 12: 30,720 values; 4+4 depth 9: 46,080.
    Defaults: the MaPLe repository's IVLP baseline (configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml).
    Files: muzairkhattak/PromptSRC @ bb95c77 (trainers/independentVL.py, clip/model.py; the MaPLe repository's are
    the same code). official_init: the official initial values for the seed (official build order: VPT after
    conv1, P^v_i / P^t_i inside blocks i, then the random ctx after the whole CLIP; clip/model.py 363-392, 536-583)."""

    defaults = dict(PromptModel.defaults, n_ctx_text=2, n_ctx_vision=2, prompt_depth_text=12, prompt_depth_vision=12,
                    ctx_init="a photo of a", official_init=True)

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        c, v = self.cfg, clip.visual
        n_t, n_v, W_t, W_v = c["n_ctx_text"], c["n_ctx_vision"], clip.transformer.width, v.conv1.weight.shape[0]
        self.J_t = min(c["prompt_depth_text"], clip.transformer.layers)
        self.J_v = min(c["prompt_depth_vision"], v.transformer.layers) if n_v > 0 else 0
        if self.J_t < 1:
            raise ConfigError(f"{type(self).__name__.lower()}: --prompt-depth-text must be >= 1 (image prompts only: "
                              "--method vpt)")
        init = c["ctx_init"].replace("_", " ") if c["ctx_init"] and n_t <= 4 else None
        self.prompts = TextPrompts(clip, classnames, n_t, init)

        def draw(n, W):
            return lambda: nn.init.normal_(torch.empty(n, W), std=0.02)

        ops = clip_draws(clip.config, [draw(n_v, W_v)] if self.J_v else [],
                         lambda i: [draw(n_v, W_v)] if 0 < i < self.J_v else [], (),
                         lambda i: [draw(n_t, W_t)] if 0 < i < self.J_t else [])
        if init is None:  # drawn in the model dtype, fp16 in every released config
            ops.append(lambda: torch.empty(n_t, W_t, dtype=torch.float16).normal_(std=0.02).float())
        kept = iter(replay(ops, c["seed"]) if c["official_init"] else [op() for op in ops if callable(op)])
        image = [next(kept) for _ in range(self.J_v)]  # V_0, P^v_1..P^v_{J_v-1}
        text = [next(kept) for _ in range(self.J_t - 1)]  # P^t_1..P^t_{J_t-1}
        self.ctx = nn.Parameter(next(kept) if init is None else self.prompts.init_vectors.clone())  # [n_t, W_t]
        self.text_prompts = nn.Parameter(torch.stack(text) if text else torch.empty(0, n_t, W_t))  # [J_t-1, n_t, W_t]
        self.image_prompts = nn.Parameter(torch.stack(image)) if image else None  # [J_v, n_v, W_v]
        self.changes_image_tower = self.J_v > 0

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.prompts.set_classnames(classnames)

    def text_features(self, extra_tokens=None):
        deep = [None] + list(self.text_prompts)  # before text block i = 1..J_t-1, rows 1..n_t <- P^t_i
        return normalize(self.prompts.encode(self.ctx, self.cfg["text_savings"], extra_tokens, deep_prompts=deep,
                                             prompt_slice=slice(1, 1 + self.cfg["n_ctx_text"])))

    def visual_prompts(self):
        """V_0 through ln_pre, P^v_i before image block i = 1..J_v-1; None without image prompts."""
        if self.image_prompts is None:
            return None
        return VisualPrompts(self.image_prompts[0], [None] + list(self.image_prompts[1:]), ln_pre=True)


# promptsrc.py 14, 122: imagenet_templates.py 3-64, the first 60 of CLIP's 80 ImageNet templates with
# "a photo of a {}." (index 39) moved to the front
PROMPTSRC_TEMPLATES = ["a photo of a {}."] + [t for t in data.IMAGENET_TEMPLATES[:60] if t != "a photo of a {}."]


def gpa_weights(epochs, mean, std):
    """promptsrc.py 265-270, 358-360: w_e = g(e) / sum_k g(k), e = 1..E, g the normal density (mean, std)."""
    g = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    return [x / sum(g) for x in g]


class PromptSRC(IVLP):
    """IVLP prompts trained with self-regulating terms toward frozen CLIP and Gaussian prompt aggregation
    (methods.md §6; muzairkhattak/PromptSRC @ bb95c77 trainers/promptsrc.py).

    L = CE(l, y) + 25 mean|T - T0| + 10 mean|z - z0| + (1 / (B C)) sum_bc p0_bc (log p0_bc - log p_bc)  (297-313)
      z = n(E_v^P(x)) [B, E], T = n(E_t^P) [C, E], l = s z T^T, p = softmax(l), p0 = softmax(l0), l0 = s z0 T0^T (205)
      z0 = n(E_v(x)): the frozen tower without prompts, same augmented batch, no gradient (201-203)
      T0 = n((1/60) sum_k E_t(template_k(name))): RAW features of the 60 PROMPTSRC_TEMPLATES averaged, then
           normalised (113-128, 199-200); the same templates for every dataset
      mean|.| = F.l1_loss over the C x E / B x E elements; the KL at temperature 1 (306-311)
      25 / 10 = TEXT_LOSS_WEIGHT / IMAGE_LOSS_WEIGHT in every config (train.py::extend_cfg 121-122)
    GPA (263-270, 316-335): after epoch e = 1..E (E = epochs), G <- G + w_e prompts_e (gpa_weights, mu = gpa_mean,
    sigma = gpa_std); after epoch E the prompts become G: that model is tested and checkpointed. Here G covers the
    trainable tensors in fp32 and is part of the checkpoint (extra_state), so a resumed run ends where an
    uninterrupted one does (official: the whole state dict in each tensor's dtype, fp16 frozen weights included, and
    G is not saved; methods.md §6 quirks). Defaults: the B2N config vit_b16_c2_ep20_batch4_4+4ctx.yaml (4+4 prompts,
    depth 9, GPA 15 / 1 over 20 epochs)."""

    defaults = dict(IVLP.defaults, n_ctx_text=4, n_ctx_vision=4, prompt_depth_text=9, prompt_depth_vision=9,
                    text_loss_weight=25.0, image_loss_weight=10.0, gpa_mean=15.0, gpa_std=1.0, epochs=20)

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        self.gpa_w = gpa_weights(self.cfg["epochs"], self.cfg["gpa_mean"], self.cfg["gpa_std"])
        self.gpa, self.gpa_epochs = None, 0  # G {name: fp32 tensor}, epochs aggregated so far
        self.t0 = None  # (class names, T0 [C, E])

    @torch.no_grad()
    def teacher_text(self):
        """T0 [C, E] of the current class names, computed once per class list (training only needs it)."""
        if self.t0 is None or self.t0[0] != self.classnames:
            names = [c.replace("_", " ") for c in self.classnames]
            device = self.clip.token_embedding.weight.device
            with torch.autocast(device.type, enabled=False):
                raw = [torch.cat([self.clip.encode_text(tokenize([t.format(n) for n in names[i:i + 1000]]).to(device))
                                  for i in range(0, len(names), 1000)]).float() for t in PROMPTSRC_TEMPLATES]
            self.t0 = (list(self.classnames), normalize(torch.stack(raw).mean(0)))  # raw mean over 60, then n(.)
        return self.t0[1]

    def loss_terms(self, batch, z, T, logits):
        C, c = len(self.classnames), self.cfg
        with torch.no_grad():
            z0 = normalize(self.clip.visual(batch["image"]))  # [B, E]
            T0 = self.teacher_text().to(z0.device)  # [C, E]
            l0 = self.logit_scale * z0 @ T0.t()  # [B, C]
        l = logits[:, :C].float()  # (DAPT's bg_slice_quirk adds columns: the terms use the C classes)
        kl = F.kl_div(F.log_softmax(l, 1), F.log_softmax(l0, 1), reduction="sum", log_target=True) / l.numel()
        return dict(super().loss_terms(batch, z, T, logits),
                    scl_text=(c["text_loss_weight"], F.l1_loss(T[:C].float(), T0)),
                    scl_image=(c["image_loss_weight"], F.l1_loss(z.float(), z0)), scl_logits=(1.0, kl))

    @torch.no_grad()
    def epoch_end(self, epoch, loader=None):
        """GPA: G += w_e * (this epoch's prompts); after the last epoch the prompts become G."""
        e = epoch + 1
        if e > len(self.gpa_w) or e <= self.gpa_epochs:
            return
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        cur = {n: p.detach().float() * self.gpa_w[e - 1] for n, p in params.items()}
        self.gpa = cur if self.gpa is None else {n: self.gpa[n] + cur[n] for n in cur}
        self.gpa_epochs = e
        if e == len(self.gpa_w):
            for n, p in params.items():
                p.copy_(self.gpa[n])

    def extra_state(self):
        gpa = None if self.gpa is None else {n: t.detach().cpu() for n, t in self.gpa.items()}
        return dict(gpa=gpa, gpa_epochs=self.gpa_epochs)

    def load_extra_state(self, state):
        if state is not None:  # None: a checkpoint without GPA state (evaluation of the final prompts needs none)
            device = self.ctx.device
            self.gpa = None if state["gpa"] is None else {n: t.to(device) for n, t in state["gpa"].items()}
            self.gpa_epochs = state["gpa_epochs"]


class MMRL(PromptModel):
    """Multi-Modal Representation Learning (methods.md §6c; yunncheng/MMRL @ 27d8821: T = trainers/mmrl.py,
    M = clip/model_mmrl.py, C = trainers/config.py).

    Space R [K, d_r], N(0, 0.02^2); per rep block l: r^v_l = F^v_l(R) [K, W_v], r^t_l = F^t_l(R) [K, W_t], Linear maps
    with bias, the 7 per tower deep copies of ONE initialised Linear (T 171-192). rep_layers are 1-based (M 181).
    Image: blocks before the first rep layer unchanged; r^v inserted before it and replaced before the later ones
    (M 208-221), no positional embedding, no ln_pre. Official position: right after CLS; here after the patches
    (attention is permutation-equivariant over keys: equal up to float summation order, measured in the README).
      f_c = ln_post(h_CLS) @ proj (frozen), f_r = mean_k ln_post(h_k) @ proj_rep [W_v, E], proj_rep = W_v^-0.5 N(0, 1)
      (M 338, 367-376). Text: the dataset's template (T 21-37, 160-169), r^t inserted after SOS before the first rep
      block, replaced later, causal over the longer sequence, read at EOT + K (M 223-245, T 72-84).
      l_c = s n(f_c) n(T)^T, l_r = s n(f_r) n(T)^T, l_f = a l_c + (1 - a) l_r, s = mmrl_scale = 100 (T 226-233)
      L = a CE(l_c) + (1 - a) CE(l_r) + lam (1 - mean_b cos(n(f_c), z0)) + lam (1 - mean_c cos(n(T), T0)) (T 238-255)
      z0 = n(frozen CLIP image feature, same batch) (T 346-348), T0 = n(frozen CLIP template features) (T 280-283)
    Constants: K 5, d_r 512, rep layers 6-12 (negative: counted from the last block, -1 = the last), a 0.7,
    lam 1.0 (yaml; per dataset C 5-41, in train.py). Prediction (T 421-428): l_f on the training class list of the
    training dataset, l_c on any other list or dataset (predict_mode auto; fusion / cls / rep force one).
    image_features is the normalised feature of that prediction (protocol): on the training list
    n(a n(f_c) + (1 - a) n(f_r)), whose logits rank classes as l_f does. Exact savings: blocks before the first rep
    layer see no learned token: the text ones run once per class list, the image ones once per batch, shared by the
    student and the frozen teacher z0. official_init: the official initial values for the seed."""

    defaults = dict(PromptModel.defaults, n_rep_tokens=5, rep_dim=512, rep_layers=(6, 7, 8, 9, 10, 11, 12), alpha=0.7,
                    reg_weight=1.0, mmrl_scale=100.0, template="a photo of a {}.", dataset="", predict_mode="auto",
                    official_init=True)
    changes_image_tower = True

    def __init__(self, clip, classnames, cfg=None):
        super().__init__(clip, classnames, cfg)
        c, (W_v, E), W_t = self.cfg, clip.visual.proj.shape, clip.transformer.width
        K, d, n_blocks = c["n_rep_tokens"], c["rep_dim"], min(clip.transformer.layers, clip.visual.transformer.layers)
        self.rep_blocks = sorted({int(l) - 1 if int(l) > 0 else n_blocks + int(l) for l in c["rep_layers"]})  # 0-based
        if not self.rep_blocks or self.rep_blocks[0] < 0 or self.rep_blocks[-1] >= n_blocks:
            raise ConfigError(f"mmrl: --rep-layers {c['rep_layers']} must be block numbers 1..{n_blocks} of this CLIP")
        choice(c, "predict_mode", ("auto", "fusion", "cls", "rep"))
        proj_rep = lambda: W_v ** -0.5 * torch.randn(W_v, E)  # noqa: E731  M 338
        ops = [lambda: torch.empty(K, d).normal_(std=0.02), lambda: nn.Linear(d, W_v), lambda: nn.Linear(d, W_t)]
        if c["official_init"]:  # the CLIP with proj_rep, the zero-shot CLIP (T 270-271), R and the maps (T 171-175)
            ops = (clip_draws(clip.config, after_proj=[proj_rep]) + clip_draws(clip.config, after_proj=[("n", W_v * E)])
                   + ops)
            P, R, lin_v, lin_t = replay(ops, c["seed"])
        else:
            (R, lin_v, lin_t), P = [op() for op in ops], proj_rep()
        self.rep_tokens = nn.Parameter(R)  # R [K, d_r]
        self.r2v = nn.ModuleList(copy.deepcopy(lin_v) for _ in self.rep_blocks)  # F^v_l: d_r -> W_v
        self.r2t = nn.ModuleList(copy.deepcopy(lin_t) for _ in self.rep_blocks)  # F^t_l: d_r -> W_t
        self.proj_rep = nn.Parameter(P)  # [W_v, E]
        self.first, self.train_classnames = self.rep_blocks[0], list(classnames)
        self.template, self.same_dataset = c["template"], True
        self.set_classnames(classnames)

    def set_dataset(self, name):
        """Classes of dataset `name` come next (eval.py): its template, and l_c unless it is the training dataset
        (T 421-428: every cross-dataset and domain-shift target, ImageNet-V2 / Sketch included, is scored with l_c)."""
        self.same_dataset = name == self.cfg["dataset"]
        self.template = self.cfg["template"] if self.same_dataset else data.DATASETS[name].template

    @torch.no_grad()
    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        texts = [self.template.format(n.replace("_", " ")) for n in classnames]
        self.register_buffer("tokens", tokenize(texts).to(self.clip.token_embedding.weight.device), persistent=False)
        self.register_buffer("T0", encode_texts(self.clip, texts), persistent=False)  # [C, E]
        self.text_cache = None  # (key, [C, L', W_t] entering the first rep block)
        same = self.same_dataset and list(classnames) == self.train_classnames
        self.mode = self.cfg["predict_mode"] if self.cfg["predict_mode"] != "auto" else ("fusion" if same else "cls")

    def deep(self, maps, n_blocks):
        """Per block: F_l(R) [K, W] before rep block l, None elsewhere."""
        index = {b: j for j, b in enumerate(self.rep_blocks)}
        return [maps[index[i]](self.rep_tokens) if i in index else None for i in range(n_blocks)]

    def encode_text(self, tokens, cache=False):
        """[N, E] (not normalised) of the texts tokens [N, 77] with r^t inserted after SOS."""
        clip, eot, savings = self.clip, tokens.argmax(-1), self.cfg["text_savings"]
        dt = tokens.device.type
        key = (tokens.device, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))  # the cache's conditions
        if cache and savings and self.text_cache is not None and self.text_cache[0] == key:
            x = self.text_cache[1]
        else:
            with torch.no_grad():  # frozen, no learned token: cut at the last EOT (exact: causal) when savings
                x = clip.embed_text(tokens[:, : eot_range(tokens)[1] + 1] if savings else tokens)
                x = x + clip.positional_embedding[: x.shape[1]].to(x.dtype)
                x = clip.transformer(x, causal=True, stop=self.first)  # [N, L0, W_t] entering the first rep block
            self.text_cache = (key, x) if cache and savings else self.text_cache
        L0, deep = x.shape[1], self.deep(self.r2t, clip.transformer.layers)
        # an empty slot after SOS: r^t is inserted at the first rep block, then replaced -> [N, L0 + K, W_t]
        x = clip.transformer(x, causal=True, deep_prompts=deep, prompt_slice=slice(1, 1), start=self.first)
        return clip.ln_final(x[torch.arange(len(x)), eot + x.shape[1] - L0]) @ clip.text_projection.to(x.dtype)

    def text_features(self, extra_tokens=None):
        T = self.encode_text(self.tokens, cache=True)  # [C, E]
        if extra_tokens is not None:  # frozen texts (DAPT's backgrounds) through the same prompted tower
            T = torch.cat([T, self.encode_text(extra_tokens.to(self.tokens.device))])
        return normalize(T)

    def visual_prompts(self):  # r^v_l replaces what follows CLS + patches before rep block l: 0 -> K tokens
        return VisualPrompts(None, self.deep(self.r2v, self.clip.visual.transformer.layers))

    def heads(self, images, key_mask=None, trunk=None):
        """(f_c, f_r) [B, E], not normalised. trunk: the tokens entering the first rep block, when already computed."""
        v = self.clip.visual
        if trunk is None:
            with torch.no_grad():
                trunk = v.run(images, key_mask=key_mask, stop=self.first)  # [B, 1 + P, W_v]
        x = v.transformer(trunk, key_mask=key_mask, deep_prompts=self.visual_prompts().deep,
                          prompt_slice=slice(trunk.shape[1], None), start=self.first)  # [B, 1 + P + K, W_v]
        return v.head(x), v.ln_post(x[:, trunk.shape[1]:]).mean(1) @ self.proj_rep.to(x.dtype)

    def head_weight(self):  # a of the current prediction: l_f (a), l_c (1), l_r (0)
        return {"fusion": self.cfg["alpha"], "cls": 1.0, "rep": 0.0}[self.mode]

    def image_features(self, images, key_mask=None):
        f_c, f_r = self.heads(images, key_mask)
        a = self.head_weight()
        return normalize(a * normalize(f_c) + (1 - a) * normalize(f_r))

    def forward(self, images, text_features=None):
        T = self.text_features() if text_features is None else text_features
        f_c, f_r = self.heads(images)
        s, a = self.cfg["mmrl_scale"], self.head_weight()
        return a * (s * normalize(f_c) @ T.t()) + (1 - a) * (s * normalize(f_r) @ T.t())

    def objective(self, batch, T):
        """({name: (weight, value)}, l_f): the official loss on the batch with class features T [C, E]."""
        x, y, c, v = batch["image"], batch["label"], self.cfg, self.clip.visual
        with torch.no_grad():
            trunk = v.run(x, stop=self.first)  # shared by the student and the frozen teacher (exact)
            z0 = normalize(v.head(v.transformer(trunk, start=self.first)))  # [B, E]
        f_c, f_r = self.heads(x, trunk=trunk)
        f_c, s, a, lam, C = normalize(f_c), c["mmrl_scale"], c["alpha"], c["reg_weight"], len(self.classnames)
        l_c, l_r = s * f_c @ T.t(), s * normalize(f_r) @ T.t()  # [B, C]
        terms = {"cls": (a, F.cross_entropy(l_c, y)), "rep": (1 - a, F.cross_entropy(l_r, y)),
                 "reg_img": (lam, 1 - F.cosine_similarity(f_c, z0, dim=1).mean()),
                 "reg_text": (lam, 1 - F.cosine_similarity(T[:C].float(), self.T0, dim=1).mean())}
        return terms, a * l_c + (1 - a) * l_r

    def loss_terms(self, batch, z, T, logits):
        """The official terms on the batch's images (its own tower pass: both heads are needed; z is not)."""
        return self.objective(batch, T)[0]

    def loss(self, batch, epoch):
        terms, logits = self.objective(batch, self.text_features())
        return total(terms, logits, batch["label"])


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
    "ivlp": IVLP,
    "promptsrc": PromptSRC,
    "mmrl": MMRL,
}


def model_defaults(method, host=None):
    """Every model key of `method` and its default: the class's `defaults`, under them its host's for DAPT
    (`host` overrides the class's default host)."""
    cls = METHODS[method]
    if "host" not in cls.defaults:
        return dict(cls.defaults)
    return {**METHODS[host or cls.defaults["host"]].defaults, **cls.defaults}


# ----------------------------------------------------------------------------------------------------------
# a trained run of train.py, ready for inference: rebuilt from its checkpoint alone (no training code)

TOY_CLIP_FILE = os.path.join("toy_clip", "toy_clip.pt")  # under the run's data root (train.toy_clip_path)


def read_run_file(path, device="cpu"):
    """checkpoint.pt / best.pt / resume.pt of a run folder, read with torch.load(weights_only=True): plain dicts,
    lists, tensors, numbers and strings only, so a planted file cannot run code (errors name the file)."""
    state = load_torch_file(path, map_location=device, expected="a checkpoint.pt / best.pt / resume.pt written by train.py")
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        raise CheckpointError(f"{path}: not a run file of train.py (expected a dict with the trained 'params')")
    return state


def restore(model, state, path):
    """model.load_checkpoint(state) with the file named when it does not fit the model."""
    try:
        model.load_checkpoint(state)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: does not fit the {type(model).__name__} model of this config ({e})") from None


def run_clip(cfg, root=None, device="cpu", dtype=None):
    """The CLIP a run was trained on: cfg["clip"] through load_clip, the toy CLIP from <root>/toy_clip/toy_clip.pt.
    dtype None: float32 on the CPU; elsewhere the run's precision (bfloat16 for auto, as train.py)."""
    name = cfg["clip"]
    if name == "toy":
        name = os.path.join(root or "DATA", TOY_CLIP_FILE)
        if not os.path.isfile(name):
            raise CheckpointError(f"toy CLIP not found at {name}: a toy run's CLIP lives under its data root "
                                  "(pass root=, or --root); train.py makes it on the first toy run")
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else \
            {"fp32": torch.float32, "fp16": torch.float16}.get(cfg.get("precision"), torch.bfloat16)
    clip = load_clip(name, device=device, dtype=dtype)
    clip.set_attention(cfg.get("attn", "auto"))
    return clip


def _host_run_dir(host_run, run_dir):
    """An fvgpt run's host folder: as recorded (relative to where training ran), else found from an ancestor of
    the fvgpt run's folder (a runs/ tree moved or read from another working directory)."""
    if os.path.isfile(os.path.join(host_run, "checkpoint.pt")) or run_dir is None or os.path.isabs(host_run):
        return host_run
    here = os.path.abspath(run_dir)
    while os.path.dirname(here) != here:
        here = os.path.dirname(here)
        for depth in range(len(host_run.split(os.sep))):  # drop leading parts: runs/b2n/... under another root
            candidate = os.path.join(here, *host_run.split(os.sep)[depth:])
            if os.path.isfile(os.path.join(candidate, "checkpoint.pt")):
                return candidate
    return host_run


def model_of_checkpoint(ckpt, clip, classnames=None, run_dir=None):
    """The prompt model of a checkpoint dict of train.py (params, config, classnames, extra) on `clip`, its
    learned state restored, prompt parameters in float32, eval mode. FVG-PT's host is rebuilt from its host run."""
    cfg, classnames = ckpt["config"], list(classnames or ckpt["classnames"])
    device = clip.logit_scale.device
    if cfg["method"] == "fvgpt":
        host_dir = _host_run_dir(cfg["host_run"], run_dir)
        host_ckpt = read_run_file(os.path.join(host_dir, "checkpoint.pt"), device)
        model = FVGPT(model_of_checkpoint(host_ckpt, clip, classnames, host_dir), classnames, cfg)
    else:
        model = METHODS[cfg["method"]](clip, classnames, cfg)
    model = model.to(device)
    for p in model.parameters():  # as train.build_run: prompt parameters in float32
        if p.requires_grad:
            p.data = p.data.float()
    restore(model, ckpt, os.path.join(run_dir or ".", "checkpoint.pt"))
    return model.eval()


def load_run(run_dir, device="cpu", root=None, dtype=None):
    """A trained run of train.py (its folder) -> the PromptModel, ready for inference on its own classes
    (model.set_classnames(names) for others; model(images) -> logits). The CLIP is the run's (`run_clip`; a
    toy run's from <root>/toy_clip/, root defaulting to the data root recorded in config.json). Every file is
    read with torch.load(weights_only=True). model.run_dir, model.run_root and model.cfg describe the run."""
    ckpt = read_run_file(os.path.join(run_dir, "checkpoint.pt"), device)
    if not isinstance(ckpt, dict) or not {"params", "config", "classnames"} <= set(ckpt):
        raise CheckpointError(f"{os.path.join(run_dir, 'checkpoint.pt')} is not a checkpoint of train.py "
                              "(expected params, config and classnames)")
    if root is None and os.path.isfile(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            root = json.load(f).get("root")
    model = model_of_checkpoint(ckpt, run_clip(ckpt["config"], root, device, dtype), run_dir=run_dir)
    model.run_dir, model.run_root = run_dir, root
    return model
