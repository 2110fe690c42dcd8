"""Scaled dot-product attention (Vaswani et al. 2017, eq. 1): forward/backward pair.

    S = Q Kᵀ / √d,   P = softmax(S) over keys (masked keys get −∞),   O = P V

Backward, with dO given:  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − Σ_k dP ⊙ P)  (softmax),
dQ = dS K / √d,  dK = dSᵀ Q / √d.

A query whose keys are all masked sees constant scores, so its output (the mean of V) does not
depend on Q or K: dS is zeroed wherever the mask is False (for a partly masked row P is already 0
there; for a fully masked row P is uniform and the softmax formula alone would leak a gradient).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_xp
from .activations import SoftmaxCache, softmax_backward, softmax_forward


class AttentionCache(NamedTuple):
    q: object
    k: object
    v: object
    p: object  # attention probabilities (B, H, Lq, Lk)
    scale: float
    mask: object = None  # the boolean key mask (broadcastable to P) or None


def attention_forward(q, k, v, mask=None):
    """Shapes: q (B, H, Lq, d), k (B, H, Lk, d), v (B, H, Lk, dv); mask boolean, broadcastable to
    (B, H, Lq, Lk), True where a query may attend to a key → out (B, H, Lq, dv).

    The probabilities are returned in the cache (``cache.p``) so that callers can show
    attention maps.
    """
    xp = get_xp(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = q @ k.swapaxes(-1, -2)  # (B, H, Lq, Lk)
    s *= scale
    if mask is not None:
        # A large finite negative (not −∞) keeps a fully masked row finite instead of NaN.
        xp.copyto(s, xp.finfo(s.dtype).min / 2, where=~mask)
    p, _ = softmax_forward(s, axis=-1)
    return p @ v, AttentionCache(q, k, v, p, scale, mask)


def attention_backward(dout, cache: AttentionCache):
    """Returns (dq, dk, dv)."""
    q, k, v, p, scale, mask = cache
    dv = p.swapaxes(-1, -2) @ dout
    dp = dout @ v.swapaxes(-1, -2)
    ds = softmax_backward(dp, SoftmaxCache(p, -1))
    ds *= scale
    if mask is not None:  # masked scores were replaced by a constant: no gradient flows to them
        get_xp(ds).copyto(ds, 0.0, where=~mask)
    dq = ds @ k
    dk = ds.swapaxes(-1, -2) @ q
    return dq, dk, dv
