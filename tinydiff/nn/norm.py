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
    x_hat: object  # normalised input, laid out as (..., group) with the normalised set last
    inv_std: object  # 1/√(σ² + ε), broadcastable against x_hat
    gamma: object
    shape: tuple  # the input's shape


def _normalize(x, axes, eps):
    xp = get_xp(x)
    mu = x.mean(axis=axes, keepdims=True)
    centred = x - mu
    var = (centred * centred).mean(axis=axes, keepdims=True)
    inv_std = 1.0 / xp.sqrt(var + eps)
    return centred * inv_std, inv_std


def _normalize_backward(g, x_hat, inv_std, axes):
    mean_g = g.mean(axis=axes, keepdims=True)
    mean_gx = (g * x_hat).mean(axis=axes, keepdims=True)
    return inv_std * (g - mean_g - x_hat * mean_gx)


def group_norm_forward(x, num_groups: int, gamma, beta, eps: float = 1e-5):
    """GroupNorm (Wu & He 2018): statistics over each group of C/G channels and all positions.

    Shapes: x (N, C, *spatial), gamma/beta (C,) → out like x.
    """
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels cannot be split into {num_groups} groups")
    xg = x.reshape(n, num_groups, -1)  # (N, G, C/G · spatial)
    x_hat, inv_std = _normalize(xg, axes=2, eps=eps)
    affine_shape = (1, c) + (1,) * (x.ndim - 2)
    out = x_hat.reshape(x.shape) * gamma.reshape(affine_shape) + beta.reshape(affine_shape)
    return out, NormCache(x_hat, inv_std, gamma, x.shape)


def group_norm_backward(dout, cache: NormCache):
    """Returns (dx, dgamma, dbeta); dγ = Σ dy ⊙ x̂ and dβ = Σ dy over all but the channel axis."""
    x_hat, inv_std, gamma, shape = cache
    n, c = shape[:2]
    affine_shape = (1, c) + (1,) * (len(shape) - 2)
    reduce_axes = (0,) + tuple(range(2, len(shape)))
    x_hat_full = x_hat.reshape(shape)
    dgamma = (dout * x_hat_full).sum(axis=reduce_axes)
    dbeta = dout.sum(axis=reduce_axes)
    g = (dout * gamma.reshape(affine_shape)).reshape(x_hat.shape)  # (N, G, C/G · spatial)
    dx = _normalize_backward(g, x_hat, inv_std, axes=2).reshape(shape)
    return dx, dgamma, dbeta


def layer_norm_forward(x, gamma, beta, eps: float = 1e-5):
    """LayerNorm (Ba et al. 2016) over the trailing gamma.ndim axes.

    Shapes: x (..., *normalized_shape), gamma/beta normalized_shape → out like x.
    """
    axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
    x_hat, inv_std = _normalize(x, axes=axes, eps=eps)
    return x_hat * gamma + beta, NormCache(x_hat, inv_std, gamma, x.shape)


def layer_norm_backward(dout, cache: NormCache):
    """Returns (dx, dgamma, dbeta); dγ and dβ sum over the leading (batch) axes."""
    x_hat, inv_std, gamma, _ = cache
    axes = tuple(range(x_hat.ndim - gamma.ndim, x_hat.ndim))
    lead = tuple(range(x_hat.ndim - gamma.ndim))
    dgamma = (dout * x_hat).sum(axis=lead)
    dbeta = dout.sum(axis=lead)
    dx = _normalize_backward(dout * gamma, x_hat, inv_std, axes=axes)
    return dx, dgamma, dbeta
