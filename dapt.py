"""Prompt tuning on a frozen CLIP: every method's prompt model and every method loss, in plain PyTorch.

Read a method top to bottom beside its section of specs/methods.md. The CLIP towers, checkpoint loading and the
tokenizer live in clip.py and tokenizer.py (split off to keep files readable) and are re-exported here, so
`dapt.build_clip`, `dapt.load_clip` and `dapt.tokenize` are the public names.

Deliberately not here: data loading (data.py), the training loop (train.py), Triton kernels (kernels/: the
methods call `kernels.*` dispatchers, which fall back to the references below on the CPU).
"""
import torch
import torch.nn.functional as F

from clip import CLIP, build_clip  # noqa: F401  (public names; load_clip added with the loaders)

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
