"""The recent prompt methods on a frozen CLIP, each with its model defaults beside its class: DAPT (decouple before
align), FVG-PT (foreground view-guided), distribution-aware prompt tuning (`dapt-dist`) and DA-VPT; `METHODS`, every
method by name, and `build_model`, the one place that composes a method with its host.

Read a method top to bottom beside its section of specs/methods.md. DAPT and FVG-PT are handed a built host (any
`PromptModel` of classic.py) and compose with it through the protocol (prompting.py); dapt-dist and DA-VPT get
the features of their training images from the caller (`prepare(features)`). The classic methods, the protocol, the
CLIP towers and loaders, the tokenizer and the method losses (kernels/: each loss's PyTorch reference beside its
fused kernel) are re-exported here: `dapt.CoOp`, `dapt.PromptModel`, `dapt.load_clip`, `dapt.tokenize`,
`dapt.pull_push_loss`, ... are the public names.
Deliberately not here: data loading (data.py, loader.py), run recipes (recipes.py), training (train.py), reading
trained runs (runs.py), Triton kernels (kernels/).
"""
import logging

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from classic import (CoCoOp, CoOp, FrozenTextClassifier, IVLP, KgCoOp, MaPLe, MMRL, PromptSRC,  # noqa: F401
                     VPT, ZeroShotCLIP)
from clip import CLIP, CLIP_MEAN, CLIP_STD, VisualPrompts  # noqa: F401  (public names)
from clip_load import CheckpointError, build_clip, load_clip  # noqa: F401  (public names)
from kernels.losses import inter_dispersion_reference as inter_dispersion_loss  # noqa: F401  (public names:
from kernels.losses import intra_dispersion_reference as intra_dispersion_loss  # noqa: F401   plain PyTorch)
from kernels.losses import proxy_anchor_reference as proxy_anchor_loss  # noqa: F401
from kernels.losses import pull_push_reference as pull_push_loss  # noqa: F401
from prompting import (ConfigError, PromptModel, TextPrompts, choice, encode_texts, freeze,  # noqa: F401
                       init_image_prompts, normalize, state_digest, total)
from tokenizer import tokenize

log = logging.getLogger("dapt")


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

    def __init__(self, host, classnames, cfg=None):
        super().__init__(host.clip, classnames, cfg)
        c, clip = self.cfg, host.clip
        for key, options in (("host", self.hosts), ("cue", ("masks", "gradcam")), ("decouple", ("pixel", "token")),
                             ("dapt_schedule", ("staged", "joint"))):
            choice(c, key, options)
        if not c["dapt_margin"] > 0:  # F.triplet_margin_loss's condition
            raise ConfigError(f"--dapt-margin {c['dapt_margin']}: expected a value > 0")
        self.host = host  # trained with DAPT: its parameters are DAPT's
        self.needs_masks = c["cue"] == "masks"  # Grad-CAM masks are made in the step
        self.changes_image_tower = self.host.changes_image_tower
        # background texts, encoded by the host's prompted text tower after the classes
        tokens = tokenize([c["bg_template"].format(b) for b in DAPT_BACKGROUNDS])
        self.register_buffer("bg_tokens", tokens.to(clip.token_embedding.weight.device), persistent=False)

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self.host.set_classnames(classnames)

    def set_dataset(self, name, template):
        self.host.set_dataset(name, template)

    def split_texts(self, T_all):
        """(T_fg, T_bg). Clean: C classes / 32 backgrounds. bg_slice_quirk (official): C + first 7 / last 25."""
        k = len(self.classnames) + (7 if self.cfg["bg_slice_quirk"] else 0)
        return T_all[:k], T_all[k:len(self.classnames) + len(DAPT_BACKGROUNDS)]

    def text_features(self, extra_tokens=None):
        """Inference classifier: the C classes (with bg_slice_quirk C + 7 columns, argmax over all as official),
        computed with the backgrounds as in training; then the extra texts' features when given."""
        tokens = self.bg_tokens if extra_tokens is None else \
            torch.cat([self.bg_tokens, extra_tokens.to(self.bg_tokens.device)])
        T_all = self.host.text_features(tokens)
        T_fg = self.split_texts(T_all)[0]
        return T_fg if extra_tokens is None else torch.cat([T_fg, T_all[len(self.classnames) + len(DAPT_BACKGROUNDS):]])

    def visual_prompts(self):
        return self.host.visual_prompts()

    def image_features(self, images, key_mask=None):
        return self.host.image_features(images, key_mask)

    # the host's own set-up, optimizer groups, epoch hook and state (PromptSRC's GPA aggregate)
    def prepare(self, features):
        self.host.prepare(features)

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
    return tau ** 2 * F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)


def bottleneck(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))


def masked_view(image, mask, fill="mean", mean=CLIP_MEAN, std=CLIP_STD):
    """Keep the pixels where mask = 1 (image [B, 3, H, W] normalised, mask [B, 1, H, W]); the others become
    the CLIP mean colour (fill="mean": 0 in normalised space, DAPT) or black (fill="black": 0 before
    normalisation, the FVG-PT figure). Background view: masked_view(image, 1 - mask, ...)."""
    if fill == "mean":
        return image * mask
    if fill == "black":
        m = torch.tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]
        s = torch.tensor(std, dtype=image.dtype, device=image.device)[:, None, None]
        return ((image * s + m) * mask - m) / s
    raise ConfigError(f"--mask-fill {fill!r}: expected mean or black")


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

    def set_dataset(self, name, template):
        self.same_dataset = name == self.cfg["dataset"]
        self.host.set_dataset(name, template)

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
        x_fg = masked_view(x, m, c["mask_fill"])
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
# images before training (`prepare(features)`); evaluation never calls it.


def class_means(feats, labels, n_classes):
    """[C, D] mean of the features of each class (0 for a class without items)."""
    sums = torch.zeros(n_classes, feats.shape[1]).index_add_(0, labels, feats)
    return sums / torch.bincount(labels, minlength=n_classes).clamp_min(1).float()[:, None]


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

    def prepare(self, features):
        """proto_c = (1/K_c) sum_{i: y_i = c} n(E_v^CLIP(x_i)) over the few-shot training images, from one pass of the
        frozen, unprompted image tower with one training augmentation per image (official; proto_train_view false:
        the deterministic test view); the mean of unit vectors, NOT re-normalised. The caller may cache the pass
        (its name carries the sha256 of the image tower's weights)."""
        view = "train" if self.cfg["proto_train_view"] else "test"
        name = f"clip-image-{state_digest(self.clip.visual)[:16]}"  # the weights the features come from
        feats, labels = features(self.clip.encode_image, view, cache=name)  # [N, E], [N]
        prototypes = class_means(normalize(feats), labels, len(self.classnames))  # [C, E]
        self.prototypes = prototypes.to(self.clip.logit_scale.device)

    def visual_prompts(self):
        return VisualPrompts(self.image_prompts, None, self.cfg["prompt_ln_pre"])

    def loss_terms(self, batch, z, T, logits):
        if self.prototypes is None:
            raise RuntimeError("dapt-dist: prototypes are missing; call model.prepare(features) before training "
                               "(train.py does)")
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
            nn.Parameter(init_image_prompts((M if i in self.guided else c["n_prompts"], W), c["prompt_init"],
                                            v.patch_size))
            for i in range(L)])
        if choice(c, "head", ("text", "linear")) == "linear":
            if c["subsample"] != "all":
                raise ConfigError("davpt --head linear learns one weight row per training class and cannot score "
                                  "new classes: use it with --subsample all (few-shot), or --head text for "
                                  "base-to-novel")
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
            raise RuntimeError("davpt: no class -> proxy map yet; call model.prepare(features) before training "
                               "(train.py does) or load_extra_state")
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
    def prepare(self, features):
        """Initial class -> proxy map: class means of the frozen prompt-free tower's classifier input over up to
        `kmeans_images` training images per class (training transform; the first ones, or the official draw)."""
        v, C = self.clip.visual, len(self.classnames)
        fn = (lambda im: v.ln_post(v.run(im)[:, 0])) if self.cfg["head"] == "linear" else (lambda im: normalize(v(im)))
        feats, labels = features(fn, "train", per_class=self.cfg["kmeans_images"], sampling=self.cfg["kmeans_sampling"])
        mapping = self.proxy_map.fit(class_means(feats, labels, C))
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
            raise ValueError("davpt: the checkpoint has no class -> proxy map (extra state); it was not written by "
                             "davpt")
        self.proxy_map.load_state(state)


# ----------------------------------------------------------------------------------------------------------
# every method by name, and the one place that composes a method with its host

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


def build_model(method, clip, classnames, cfg=None, host=None):
    """The prompt model of `method` on `clip` for `classnames` (cfg: its keys over the class's defaults). DAPT is
    composed with a fresh host of cfg["host"] (MaPLe by default) built from the same config; FVG-PT is a second stage
    on a trained host model handed in as `host` (train.py and runs.load_run hand in the host run's model), an
    untrained CoOp when none is."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "dapt":
        name = choice({**DAPT.defaults, **(cfg or {})}, "host", DAPT.hosts)
        host = build_model(name, clip, classnames, cfg)
    elif method == "fvgpt" and host is None:
        host = build_model("coop", clip, classnames)
    if method in ("dapt", "fvgpt"):
        return METHODS[method](host, classnames, cfg)
    return METHODS[method](clip, classnames, cfg)
