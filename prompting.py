"""The PromptModel protocol and the pieces every prompt method shares.

`PromptModel` is the contract train.py relies on and the protocol through which DAPT and FVG-PT compose with a
host (text features that can encode extra frozen texts, image features with an optional key mask, the host's
visual prompts, its loss terms, its dataset); its subclasses, one per method, are in classic.py and dapt.py, which
re-exports everything here. Also here: CLIP's hand-crafted templates, the prompted class-name sequences of the CoOp
family (`TextPrompts`), prompt initialisation, and the replay of the official code's initial random draws
(`official_init` of IVLP, PromptSRC, MMRL).
Deliberately not here: any method (classic.py, dapt.py), data loading (data.py), the training loop (train.py).
"""
import hashlib
import logging
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer import tokenize

log = logging.getLogger("dapt")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and says what to do."""


# ----------------------------------------------------------------------------------------------------------
# hand-crafted templates (protocol §8): CLIP's 80 ImageNet templates and CoOp's 7 selected ones

IMAGENET_TEMPLATES = [t.strip() for t in """
a bad photo of a {}. | a photo of many {}. | a sculpture of a {}. | a photo of the hard to see {}. |
a low resolution photo of the {}. | a rendering of a {}. | graffiti of a {}. | a bad photo of the {}. |
a cropped photo of the {}. | a tattoo of a {}. | the embroidered {}. | a photo of a hard to see {}. |
a bright photo of a {}. | a photo of a clean {}. | a photo of a dirty {}. | a dark photo of the {}. |
a drawing of a {}. | a photo of my {}. | the plastic {}. | a photo of the cool {}. | a close-up photo of a {}. |
a black and white photo of the {}. | a painting of the {}. | a painting of a {}. |
a pixelated photo of the {}. | a sculpture of the {}. | a bright photo of the {}. | a cropped photo of a {}. |
a plastic {}. | a photo of the dirty {}. | a jpeg corrupted photo of a {}. | a blurry photo of the {}. |
a photo of the {}. | a good photo of the {}. | a rendering of the {}. | a {} in a video game. |
a photo of one {}. | a doodle of a {}. | a close-up photo of the {}. | a photo of a {}. | the origami {}. |
the {} in a video game. | a sketch of a {}. | a doodle of the {}. | a origami {}. |
a low resolution photo of a {}. | the toy {}. | a rendition of the {}. | a photo of the clean {}. |
a photo of a large {}. | a rendition of a {}. | a photo of a nice {}. | a photo of a weird {}. |
a blurry photo of a {}. | a cartoon {}. | art of a {}. | a sketch of the {}. | a embroidered {}. |
a pixelated photo of a {}. | itap of the {}. | a jpeg corrupted photo of the {}. | a good photo of a {}. |
a plushie {}. | a photo of the nice {}. | a photo of the small {}. | a photo of the weird {}. |
the cartoon {}. | art of the {}. | a drawing of the {}. | a photo of the large {}. |
a black and white photo of a {}. | the plushie {}. | a dark photo of a {}. | itap of a {}. |
graffiti of the {}. | a toy {}. | itap of my {}. | a photo of a cool {}. | a photo of a small {}. |
a tattoo of the {}.
""".replace("\n", " ").split("|")]
SELECT_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                    "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


# ----------------------------------------------------------------------------------------------------------
# shared pieces of the prompt models


def normalize(x):
    return F.normalize(x.float(), dim=-1)


def freeze(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def encode_texts(clip, texts, chunk=1000):
    """Normalised CLIP features of plain texts [N, E], chunked so ImageNet-size class lists fit."""
    device = clip.token_embedding.weight.device
    feats = [clip.encode_text(tokenize(texts[i:i + chunk]).to(device)) for i in range(0, len(texts), chunk)]
    return normalize(torch.cat(feats))


def state_digest(module):
    """sha256 of a module's state dict (names, dtypes, shapes and bytes): names the weights that produced a cache."""
    return tensors_digest(module.state_dict())


def tensors_digest(tensors):
    """sha256 of a name -> tensor dict: every name, dtype, shape and the bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim and empty tensors too
    return h.hexdigest()


def choice(cfg, key, options):
    """cfg[key], checked against the allowed values (a ConfigError that names the key otherwise)."""
    if cfg[key] not in options:
        raise ConfigError(f"--{key.replace('_', '-')} {cfg[key]!r}: expected one of {', '.join(map(str, options))}")
    return cfg[key]


_EOT_RANGES = {}  # id(token tensor) -> (weak reference, (shortest, longest) EOT position)


def eot_range(tokens):
    """(shortest, longest) end-of-text position of a token tensor [N, L] as Python ints, read once per tensor
    object (frozen texts: DAPT's backgrounds, a class list's prompts) so that a training step reads nothing back
    from the device; the entry goes when the tensor does."""
    hit = _EOT_RANGES.get(id(tokens))
    if hit is None or hit[0]() is not tokens:
        eot, key = tokens.argmax(-1), id(tokens)
        hit = (weakref.ref(tokens, lambda _, key=key: _EOT_RANGES.pop(key, None)), (int(eot.min()), int(eot.max())))
        _EOT_RANGES[key] = hit
    return hit[1]


class TextPrompts(nn.Module):
    """Frozen token embeddings of "[SOS] <ctx slots> <classname> . [EOT]" for every class, and where the
    learnable context vectors go (methods.md §0, §2).

    ctx_init: a phrase whose first n_ctx token embeddings initialise the context (CoOp "a photo of a", MaPLe
    "a photo" of "a photo of a"); the rest of the phrase stays as frozen text. Without it the slots hold "X".
    position: where the class name goes relative to the context: "end" (default), "middle", "front" (CoOp).
    layout (middle / front): "official" = CoOp's: "<prefix> <name>." is tokenised once and the first
    len(encode(name)) tokens after the context are moved, so a name ending in punctuation takes the merged
    ")." / "?." token with it and the EOT position is the end layout's; "separate" = the name tokenised alone,
    the "." after the context."""

    def __init__(self, clip, classnames, n_ctx, ctx_init=None, position="end", layout="official"):
        super().__init__()
        self.n_ctx, self.ctx_init, self.position, self.layout = n_ctx, ctx_init, position, layout
        if position not in ("end", "middle", "front"):
            raise ConfigError(f"--class-token-position {position!r}: expected end, middle or front")
        if layout not in ("official", "separate"):
            raise ConfigError(f"--class-token-layout {layout!r}: expected official or separate")
        self.clip = [clip]  # a list keeps CLIP out of this module's parameters and state dict
        if ctx_init:
            ids = tokenize(ctx_init)[0]
            n_words = int(ids.argmax()) - 1
            if n_ctx > n_words:
                raise ConfigError(f"--n-ctx {n_ctx} but the init phrase {ctx_init!r} has only {n_words} tokens")
            if position != "end" and (layout == "separate" or n_ctx != n_words):
                raise ConfigError(f"an init phrase with --class-token-position {position} needs --class-token-layout "
                                  f"official and --n-ctx equal to the phrase's {n_words} tokens (as CoOp)")
            with torch.no_grad():
                self.init_vectors = clip.embed_text(ids[None])[0, 1:1 + n_ctx].float().clone()  # [n, W]
        self.set_classnames(classnames)

    def set_classnames(self, classnames):
        """Rebuild the frozen buffers for new class names (base -> new evaluation, cross-dataset)."""
        self.classnames = [c.replace("_", " ") for c in classnames]
        n, clip = self.n_ctx, self.clip[0]
        prefix = self.ctx_init if self.ctx_init else " ".join(["X"] * n)
        half = n // 2 if self.position == "middle" else 0
        if self.position == "end":
            tokens = tokenize([f"{prefix} {name}." for name in self.classnames])  # [C, L]
            ctx_pos, eot = torch.arange(1, 1 + n).expand(len(tokens), n), tokens.argmax(-1)
        elif self.layout == "official":
            # CoOp: the end layout tokenised once, then per class [SOS, ctx[:half], the first k tokens after the
            # context (k = the name's own token count), ctx[half:], the rest]; EOT read where the end layout has it
            tokens = tokenize([f"{prefix} {name}." for name in self.classnames])
            eot, pos = tokens.argmax(-1), []
            for c, name in enumerate(self.classnames):
                k = int(tokenize(name)[0].argmax()) - 1  # len(encode(name))
                slots, rest = list(range(1, 1 + n)), list(range(1 + n, tokens.shape[1]))
                tokens[c] = tokens[c][[0] + slots[:half] + rest[:k] + slots[half:] + rest[k:]]
                pos.append(list(range(1, 1 + half)) + list(range(1 + half + k, 1 + n + k)))
            ctx_pos = torch.tensor(pos)
        else:
            # separate: "X X" + name + "X X" (middle) or name + "X X" (front); the slots follow each name's length
            texts, pos = [], []
            for name in self.classnames:
                name_len = int(tokenize(name)[0].argmax()) - 1  # tokens between SOS and EOT
                texts.append(" ".join(["X"] * half + [name] + ["X"] * (n - half)) + ".")
                pos.append(list(range(1, 1 + half)) + list(range(1 + half + name_len, 1 + n + name_len)))
            tokens, ctx_pos = tokenize(texts), torch.tensor(pos)
            eot = tokens.argmax(-1)
        self.tokens = tokens  # [C, L] token ids of the layout (the context slots hold "X" or the init phrase)
        device = clip.token_embedding.weight.device
        with torch.no_grad():
            embedding = clip.embed_text(tokens.to(device))  # [C, L, W]
        self.register_buffer("embedding", embedding, persistent=False)
        self.register_buffer("ctx_pos", ctx_pos.to(device), persistent=False)
        self.register_buffer("eot", eot.to(device), persistent=False)
        self.eot_range = (int(eot.min()), int(eot.max()))  # Python ints: the text savings read nothing per step
        # positions identical in every class's sequence (SOS, context, frozen init words): computed once per
        # step by the text tower when the context is shared (exact saving, design.md)
        same = (tokens == tokens[:1]).all(0).long()
        self.prefix_len = int(same.cumprod(0).sum()) if self.position == "end" else 0

    def forward(self, ctx, per_image=False):
        """ctx [n, W] (shared) or [C, n, W] (class-specific) -> prompted embeddings [C, L, W] and EOT positions;
        per_image: ctx [B, n, W] is one context per image (CoCoOp) -> [B * C, L, W], image-major."""
        C, L, W = self.embedding.shape
        base, pos, eot = self.embedding, self.ctx_pos, self.eot
        ctx = ctx.to(base.dtype)
        if ctx.dim() == 2:
            ctx = ctx.expand(C, -1, -1)
        elif per_image:
            B = ctx.shape[0]
            base, pos, eot = base.repeat(B, 1, 1), pos.repeat(B, 1), eot.repeat(B)
            ctx = ctx.repeat_interleave(C, dim=0)  # [B*C, n, W]: image i's context for each of the C classes
        index = pos.unsqueeze(-1).expand(-1, -1, W)  # [N, n, W]
        return base.scatter(1, index, ctx), eot

    def encode(self, ctx, savings=True, extra_tokens=None, per_image=False, **kw):
        """Text features [C (+ N) or B*C, E] (not normalised) of the prompted sequences, then of the frozen
        `extra_tokens` [N, L] (DAPT's background texts) through the same tower (**kw: MaPLe's deep prompts).
        With `savings` (exact, see clip.py) the sequences stop at the last end-of-text token and the positions
        before the class name run once per distinct context; without, all 77 positions run (the reference)."""
        x, eot = self(ctx, per_image)
        groups = ctx.shape[0] if per_image else 1
        shared = savings and (ctx.dim() == 2 or groups > 1)  # class-specific contexts share only SOS
        clip, rng = self.clip[0], self.eot_range
        if extra_tokens is not None:  # the extra texts share no prefix with the class prompts
            x = torch.cat([x, clip.embed_text(extra_tokens.to(x.device)).to(x.dtype)])
            eot, shared = torch.cat([eot, extra_tokens.argmax(-1).to(eot.device)]), False
            e = eot_range(extra_tokens)
            rng = (min(rng[0], e[0]), max(rng[1], e[1]))
        return clip.encode_text_embeddings(x, eot, prefix_len=self.prefix_len if shared else 0, groups=groups,
                                           cut=savings, eot_range=rng, **kw)


def init_image_prompts(shape, init, patch_size):
    p = torch.empty(shape)
    if init == "xavier":  # original VPT: U(-v, v), v = sqrt(6 / (3 p^2 + width))
        v = math.sqrt(6.0 / (3 * patch_size ** 2 + shape[-1]))
        nn.init.uniform_(p, -v, v)
    elif init == "normal":  # MaPLe repository
        nn.init.normal_(p, std=0.02)
    else:
        raise ConfigError(f"--prompt-init {init!r}: expected 'normal' or 'xavier'")
    return p


# ----------------------------------------------------------------------------------------------------------
# the protocol


class PromptModel(nn.Module):
    """A frozen CLIP, class names, a config, and the prompt parameters a subclass adds: the contract of train.py.

    `defaults` (a plain dict beside each class) holds every model key the class reads; __init__ merges the given
    config over it, after which the class reads `self.cfg[key]` only. Subclasses define `text_features` and,
    when they prompt the image tower, `visual_prompts` (image_features follows); `loss` is CE on the logits plus
    whatever `loss_terms` adds. Only parameters with requires_grad are trained and checkpointed.

    Hosts compose through this protocol (DAPT, FVG-PT): `text_features(extra_tokens)` encodes extra frozen texts
    with the same prompted text tower, `image_features(images, key_mask)` takes token-level views,
    `visual_prompts()` lets Grad-CAM run the prompted tower, `loss_terms` gives the host's own terms, and
    `changes_image_tower` says whether the image features differ from frozen CLIP's."""

    defaults = dict(seed=1, text_savings=True)  # the run's seed (k-means, prototypes), the exact text savings
    needs_masks = False  # the training loader must provide batch["fg_mask"] / batch["fg_frac"]
    changes_image_tower = False  # image_features differ from frozen CLIP's (image prompts)

    def __init__(self, clip, classnames, cfg=None):
        super().__init__()
        self.cfg = {**self.defaults, **(cfg or {})}
        self.clip = freeze(clip)
        self.classnames = list(classnames)

    @property
    def logit_scale(self):
        return self.clip.logit_scale.exp().float()

    def set_classnames(self, classnames):
        """A new class list (base -> new evaluation, cross-dataset): rebuild what depends on the class names."""
        self.classnames = list(classnames)

    def set_dataset(self, name, template):
        """The classes that come next are dataset `name`'s, whose hand-crafted template is `template` (the caller
        chooses it; eval.py calls this before set_classnames): for methods whose template or prediction rule depends
        on the dataset (zero-shot CLIP, MMRL, FVG-PT); composed models pass it to their host."""

    def text_features(self, extra_tokens=None):
        """[C, E] normalised class features (gradients to the text prompts); with extra_tokens [N, L] (frozen
        texts) the same prompted text tower also encodes them: [C + N, E]."""
        raise NotImplementedError

    def visual_prompts(self):
        """How this model prompts the image tower (clip.VisualPrompts), or None for the frozen tower."""
        return None

    def image_features(self, images, key_mask=None):
        """[B, E] normalised. key_mask: bool [B, 1 + patches], True = visible (prompt tokens always are)."""
        return normalize(self.clip.visual(images, self.visual_prompts(), key_mask))

    def forward(self, images, text_features=None):
        """Logits [B, C]. text_features: precomputed `text_features()` (evaluation computes them once)."""
        T = self.text_features() if text_features is None else text_features
        return self.logit_scale * self.image_features(images) @ T.t()

    def loss_terms(self, batch, z, T, logits):
        """{name: (weight, value)}: this method's training terms for the batch's image features z [B, E], the
        class features T [C, E] and logits = s z T^T (all with gradients). Hosts add their own terms here."""
        return {"cls": (1.0, F.cross_entropy(logits, batch["label"]))}

    def loss(self, batch, epoch):
        """(scalar loss, stats): the weighted sum of loss_terms."""
        z, T = self.image_features(batch["image"]), self.text_features()
        logits = self.logit_scale * z @ T.t()
        return total(self.loss_terms(batch, z, T, logits), logits, batch["label"])

    def prepare(self, features):
        """Once before training: set-up from the training images (dapt-dist's prototypes, DA-VPT's clusters), which
        the caller reaches through `features(fn, view="train", per_class=0, sampling="first", cache=None)` ->
        (features [N, D] float32 on the CPU, labels [N]): fn maps an image batch [b, 3, S, S] on the model's device
        to [b, D]; view "train" gives each image one training augmentation (the draws of the first epoch), "test"
        the deterministic view; per_class k > 0 keeps k images of each class (sampling "first": the first ones,
        "official": DA-VPT's draw with the run seed); `cache`, a name that identifies fn's weights, lets the caller
        keep the result on disk. Not called for evaluation, and before a resume restores `load_extra_state`."""

    def param_groups(self):
        """Optimizer parameter groups (e.g. per-group weight decay); default: every trainable tensor."""
        return [dict(params=[p for p in self.parameters() if p.requires_grad])]

    def epoch_end(self, epoch, loader=None):
        """After each training epoch (DA-VPT re-clusters here)."""

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


def total(terms, logits, labels):
    """(sum of weight * value, stats): accuracy of the logits and every term's unweighted value, as detached 0-d
    tensors (train.py reads them only when it logs: no device synchronisation per step)."""
    loss = sum(w * t for w, t in terms.values())
    stats = {"acc": (logits.argmax(-1) == labels).float().mean().detach()}
    stats.update({f"L_{k}": t.detach() for k, (_, t) in terms.items()})
    return loss, stats


def frozen_with_extra(clip, T, extra_tokens):
    """Frozen class features T [C, E], then frozen CLIP's features of extra_tokens [N, L] when given."""
    if extra_tokens is None:
        return T
    tokens = extra_tokens.to(T.device)
    with torch.no_grad():
        x = clip.embed_text(tokens)
        extra = normalize(clip.encode_text_embeddings(x, tokens.argmax(-1), eot_range=eot_range(tokens)))
    return torch.cat([T, extra])


# ----------------------------------------------------------------------------------------------------------
# the official code's initial random draws, replayed (official_init)


def block_draws(width):
    """The uniform draws of one OpenAI ResidualAttentionBlock.__init__, in order: MultiheadAttention's out_proj
    (Linear: weight, bias), its in_proj_weight (xavier), mlp.c_fc, mlp.c_proj (weight, bias)."""
    W = width
    return [("u", W * W), ("u", W), ("u", 3 * W * W), ("u", 4 * W * W), ("u", 4 * W), ("u", 4 * W * W), ("u", W)]


def clip_draws(c, after_conv=(), image_block=None, after_proj=(), text_block=None):
    """The random draws of the official CLIP.__init__ (clip/model.py of the official repositories: VisionTransformer,
    text Transformer, token_embedding, initialize_parameters) for constructor arguments c, in order: ("u" | "n",
    count) for tensors nobody keeps, and the given callables where a prompted copy draws a tensor of its own (after
    conv1, in image / text block i: image_block(i) / text_block(i) -> list, after visual.proj)."""
    Wv, Wt, E, p = c["vision_width"], c["transformer_width"], c["embed_dim"], c["vision_patch_size"]
    grid = (c["image_resolution"] // p) ** 2 + 1
    ops = [("u", Wv * 3 * p * p), *after_conv, ("n", Wv), ("n", grid * Wv)]  # conv1, class / positional embedding
    for i in range(c["vision_layers"]):
        ops += block_draws(Wv) + (image_block(i) if image_block else [])
    ops += [("n", Wv * E), *after_proj]  # proj
    for i in range(c["transformer_layers"]):
        ops += block_draws(Wt) + (text_block(i) if text_block else [])
    V = c["vocab_size"] * Wt  # token_embedding, then initialize_parameters (text tower only)
    ops += [("n", V), ("n", V), ("n", c["context_length"] * Wt)]
    ops += [("n", n) for _ in range(c["transformer_layers"]) for n in (3 * Wt * Wt, Wt * Wt, 4 * Wt * Wt, 4 * Wt * Wt)]
    return ops + [("n", Wt * E)]  # text_projection


def replay(ops, seed):
    """The kept values of `ops` (clip_draws) drawn from torch.manual_seed(seed), as the official runs draw them
    (Dassl's set_random_seed, then nothing draws from torch before the model is built), without touching the global
    generator; the skipped draws go into a scratch buffer. Exact while torch keeps the CPU kernels of uniform_ /
    normal_ (checked on torch 2.13 against the official builds)."""
    kept, sizes = [], [op[1] for op in ops if not callable(op)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        buf = torch.empty(max(sizes, default=0))
        for op in ops:
            if callable(op):
                kept.append(op())
            elif op[0] == "u":
                buf[:op[1]].uniform_()
            else:
                buf[:op[1]].normal_()
    return kept
