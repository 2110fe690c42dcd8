"""Group normalisation and layer normalisation: forward/backward pairs.

Both normalise a set of m numbers to zero mean and unit variance, then apply a learned affine map:

    μ = mean(x),  σ² = mean((x − μ)²) (biased, as PyTorch),  x̂ = (x − μ)/√(σ² + ε),  y = γ x̂ + β

and share one backward formula. With g = γ ⊙ dy (the gradient reaching x̂):

    dx = (1/√(σ² + ε)) · (g − mean(g) − x̂ · mean(g ⊙ x̂))

(the two subtracted means are the paths through μ and σ²; means are over the normalised set).
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp


class NormCache(NamedTuple):
    x_hat: object  # normalised input, laid out as (..., m) with the normalised set of m numbers last
    inv_std: object  # 1/√(σ² + ε), (..., 1), broadcastable against x_hat
    gamma: object
    shape: tuple  # the input's shape


def _normalize(x, eps):
    """Normalise each row of x (..., m) over its m numbers. Returns x̂ (..., m) and 1/√(σ² + ε) (..., 1).

    Two passes over x and one new array: σ² is a row-wise dot product of the centred values
    with themselves (einsum, no squared copy), and x̂ overwrites the centred copy."""
    xp = get_xp(x)
    centred = x - x.mean(axis=-1, keepdims=True)
    var = xp.einsum("...k,...k->...", centred, centred)[..., None] / x.shape[-1]  # (..., 1)
    inv_std = 1.0 / xp.sqrt(var + eps)
    centred *= inv_std  # now x̂
    return centred, inv_std


def group_norm_forward(x, num_groups: int, gamma, beta, eps: float = 1e-5):
    """GroupNorm (Wu & He 2018): statistics over each group of C/G channels and all positions.

    Shapes: x (N, C, *spatial), gamma/beta (C,) → out like x.
    """
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels cannot be split into {num_groups} groups")
    x_hat, inv_std = _normalize(x.reshape(n, num_groups, -1), eps)  # (N, G, C/G · spatial)
    out = x_hat.reshape(n, c, -1) * gamma.reshape(1, c, 1)  # (N, G, C/G·S) → (N, C, S)
    out += beta.reshape(1, c, 1)
    return out.reshape(x.shape), NormCache(x_hat, inv_std, gamma, x.shape)


def group_norm_backward(dout, cache: NormCache):
    """Returns (dx, dgamma, dbeta): the module docstring's formula, evaluated through two sums
    per image and channel, S1 = Σ_s dy and S2 = Σ_s dy ⊙ x̂ (s over positions):

        dβ_c = Σ_n S1[n, c],    dγ_c = Σ_n S2[n, c],
        mean(g) = (1/m) Σ_{c ∈ group} γ_c S1[n, c],   mean(g ⊙ x̂) = (1/m) Σ_{c ∈ group} γ_c S2[n, c],
        dx = dy · (γ_c/σ) − x̂ · mean(g ⊙ x̂)/σ − mean(g)/σ      (σ = √(σ² + ε) of the group)

    so g = γ ⊙ dy is never formed: two reductions and one pass that writes dx.
    """
    x_hat, inv_std, gamma, shape = cache
    xp = get_xp(dout)
    n, c = shape[:2]
    groups, m = x_hat.shape[1], x_hat.shape[2]
    dy = dout.reshape(n, c, -1)  # (N, C, S)
    xh = x_hat.reshape(n, c, -1)  # (N, G, C/G·S) → (N, C, S)
    s1 = dy.sum(axis=2)  # (N, C)
    s2 = xp.einsum("ncs,ncs->nc", dy, xh)  # (N, C)
    dgamma, dbeta = s2.sum(axis=0), s1.sum(axis=0)
    mean_g = (s1 * gamma).reshape(n, groups, -1).sum(axis=2) / m  # (N, C) → (N, G, C/G) → (N, G)
    mean_gx = (s2 * gamma).reshape(n, groups, -1).sum(axis=2) / m
    inv = inv_std.reshape(n, groups)  # (N, G, 1) → (N, G)
    per_channel = (lambda per_group: xp.repeat(per_group, c // groups, axis=1).reshape(n, c, 1))  # (N, G) → (N, C, 1)
    a = (gamma.reshape(1, groups, -1) * inv[..., None]).reshape(n, c, 1)  # γ_c/σ, (N, G, C/G) → (N, C, 1)
    b, k = per_channel(-inv * mean_gx), per_channel(-inv * mean_g)
    dx = dy * a
    dx += xh * b
    dx += k
    return dx.reshape(shape), dgamma, dbeta


def layer_norm_forward(x, gamma, beta, eps: float = 1e-5):
    """LayerNorm (Ba et al. 2016) over the trailing gamma.ndim axes.

    Shapes: x (..., *normalized_shape), gamma/beta normalized_shape → out like x.
    """
    lead = x.shape[: x.ndim - gamma.ndim]
    x_hat, inv_std = _normalize(x.reshape(lead + (-1,)), eps)  # (..., *normalized_shape) → (..., m)
    out = x_hat.reshape(x.shape) * gamma
    out += beta
    return out, NormCache(x_hat, inv_std, gamma, x.shape)


def layer_norm_backward(dout, cache: NormCache):
    """Returns (dx, dgamma, dbeta): the module docstring's formula with g = γ ⊙ dy; dγ and dβ sum
    over the leading (batch) axes."""
    x_hat, inv_std, gamma, shape = cache
    lead = tuple(range(len(shape) - gamma.ndim))
    x_hat = x_hat.reshape(shape)
    dgamma = (dout * x_hat).sum(axis=lead)
    dbeta = dout.sum(axis=lead)
    g = (dout * gamma).reshape(inv_std.shape[:-1] + (-1,))  # (..., m)
    x_hat = x_hat.reshape(g.shape)
    dx = inv_std * (g - g.mean(axis=-1, keepdims=True) - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    return dx.reshape(shape), dgamma, dbeta
