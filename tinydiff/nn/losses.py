"""Losses, each returning ``(loss, gradient(s))``: the value and its derivative, derived by hand.

All losses are means over the batch, so their gradients carry a 1/B.
"""

from __future__ import annotations

import math

from ..backend import get_xp
from .activations import softmax_forward


def mse_loss(pred, target, weight=None):
    """L = (1/n) Σ w_b (pred − target)², n = number of elements; w optional per sample (B,).

    dL/dpred = (2/n) w_b (pred − target).
    """
    if pred.shape != target.shape:
        raise ValueError(f"mse_loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    diff = pred - target
    if weight is not None:
        weight = weight.reshape((-1,) + (1,) * (pred.ndim - 1))  # (B, 1, 1, ...)
        wdiff = weight * diff
    else:
        wdiff = diff
    n = diff.size
    loss = float((wdiff * diff).sum()) / n
    return loss, (2.0 / n) * wdiff


def cross_entropy(logits, labels):
    """L = −(1/B) Σ_b log softmax(logits_b)[y_b].   dL/dlogits = (softmax(logits) − onehot(y)) / B.

    Shapes: logits (B, K), labels (B,) integers.
    """
    xp = get_xp(logits)
    b = logits.shape[0]
    p, _ = softmax_forward(logits, axis=-1)
    rows = xp.arange(b)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))  # log-sum-exp, stable
    loss = -float(log_p[rows, labels].sum()) / b
    dlogits = p.copy()
    dlogits[rows, labels] -= 1.0
    return loss, dlogits / b


def _l2_normalize(x):
    """u = x/‖x‖ and the backward map du ↦ (du − u (u·du)) / ‖x‖ (projection off u)."""
    xp = get_xp(x)
    norm = xp.sqrt((x * x).sum(axis=-1, keepdims=True))
    u = x / norm

    def backward(du):
        return (du - u * (u * du).sum(axis=-1, keepdims=True)) / norm

    return u, backward


LOGIT_SCALE_MAX = 100.0  # CLIP clips the temperature-derived scale at 100


def info_nce_loss(image_emb, text_emb, log_scale: float):
    """CLIP's symmetric contrastive loss (Radford et al. 2021, Figure 3).

    u = normalise(image_emb), w = normalise(text_emb), s = min(exp(log_scale), 100),
    logits = s · u wᵀ (B×B, matching pairs on the diagonal),
    L = ½ [CE(logits, diag) + CE(logitsᵀ, diag)].

    Returns (loss, d_image_emb, d_text_emb, d_log_scale). The scale's derivative is
    d_log_scale = s · Σ dlogits ⊙ (u wᵀ), and 0 where the clip at 100 is active.
    """
    xp = get_xp(image_emb, text_emb)
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"info_nce_loss: image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)} embeddings differ")
    b = image_emb.shape[0]
    u, u_back = _l2_normalize(image_emb)
    w, w_back = _l2_normalize(text_emb)
    clipped = math.exp(log_scale) > LOGIT_SCALE_MAX
    scale = LOGIT_SCALE_MAX if clipped else math.exp(log_scale)
    sim = u @ w.T  # (B, B) cosine similarities
    labels = xp.arange(b)
    loss_i, d_i = cross_entropy(scale * sim, labels)  # image → text
    loss_t, d_t = cross_entropy(scale * sim.T, labels)  # text → image
    dlogits = 0.5 * (d_i + d_t.T)  # (B, B) gradient w.r.t. logits = s·sim
    dsim = scale * dlogits
    du = dsim @ w
    dw = dsim.T @ u
    d_log_scale = 0.0 if clipped else float((dlogits * sim).sum()) * scale
    return 0.5 * (loss_i + loss_t), u_back(du), w_back(dw), d_log_scale


def gaussian_kl(mean, logvar):
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over latent dimensions, averaged over the batch.

    KL = ½ Σ (μ² + σ² − 1 − log σ²),  with σ² = e^{logvar}.
    dKL/dμ = μ / B,  dKL/dlogvar = ½ (e^{logvar} − 1) / B.
    """
    xp = get_xp(mean, logvar)
    b = mean.shape[0]
    var = xp.exp(logvar)
    kl = 0.5 * float((mean * mean + var - 1.0 - logvar).sum()) / b
    return kl, mean / b, 0.5 * (var - 1.0) / b
