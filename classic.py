"""The classic prompt methods on a frozen CLIP, each with its model defaults beside its class: zero-shot CLIP, CoOp,
CoCoOp, VPT, MaPLe, KgCoOp, IVLP, PromptSRC and MMRL (the hosts the recent methods in dapt.py build on).

Read a method top to bottom beside its section of specs/methods.md. Every model is a `PromptModel` (prompting.py):
built from a CLIP, class names and a config (`CoOp(clip, classnames)` uses the class's `defaults`), it gives class
text features, image features and a training loss; the training loop is the caller's.
Deliberately not here: the recent methods (dapt.py), data loading, run recipes and training (train.py, recipes.py).
"""
import copy
import logging
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clip import VisualPrompts
from prompting import (IMAGENET_TEMPLATES, SELECT_TEMPLATES, ConfigError, PromptModel, TextPrompts, choice,
                       clip_draws, encode_texts, eot_range, frozen_with_extra, init_image_prompts, normalize, replay,
                       total)
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
        self.set_dataset(self.cfg["dataset"], self.cfg["template"])
        self.set_classnames(classnames)

    def set_dataset(self, name, template):
        """The classes that come next are dataset `name`'s, classified with `template` (the caller's choice: the
        dataset's own, or the run's when it was given by hand). "select" adds it to CoOp's 7 templates on every
        dataset but ImageNet itself (its variants included), as CoOp's zero-shot code does."""
        if self.cfg["ensemble"] == "imagenet80":
            self.templates = list(IMAGENET_TEMPLATES)
        elif self.cfg["ensemble"] == "select":
            self.templates = list(SELECT_TEMPLATES) + ([] if name == "imagenet" else [template])
        else:
            self.templates = [template]

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
PROMPTSRC_TEMPLATES = ["a photo of a {}."] + [t for t in IMAGENET_TEMPLATES[:60] if t != "a photo of a {}."]


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

    def set_dataset(self, name, template):
        """Classes of dataset `name` come next (eval.py), with `template` (the official code builds the text side per
        dataset); l_c unless it is the training dataset (T 421-428: every cross-dataset and domain-shift target,
        ImageNet-V2 / Sketch included, is scored with l_c)."""
        self.same_dataset = name == self.cfg["dataset"]
        self.template = template

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
