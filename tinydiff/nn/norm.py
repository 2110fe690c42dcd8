"""Group normalisation and layer normalisation: forward/backward pairs.

Both normalise a set of m numbers to zero mean and unit variance, then apply a learned affine map:

    μ = mean(x),  σ² = mean((x − μ)²) (biased, as PyTorch),  x̂ = (x − μ)/√(σ² + ε),  y = γ x̂ + β

and share one backward formula, derived once in ``_normalized_input_grad``. With g = γ ⊙ dy (the
gradient reaching x̂):

    dx = (1/√(σ² + ε)) · (g − mean(g) − x̂ · mean(g ⊙ x̂))

(the two subtracted means are the paths through μ and σ²; means are over the normalised set).
The two norms differ only in which numbers form a set and how they compute the two means."""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp


class NormCache(NamedTuple):
    x_hat: object  # normalised input, laid out as (..., m) with the normalised set of m numbers last
    inv_std: object  # 1/√(σ² + ε), (..., 1), broadcastable against x_hat
    gamma: object
    shape: tuple  # the input's shape


def _sum_last(a):
    """Σ over the last axis of a (..., m), keeping it as size 1: (..., 1). A matrix-vector product
    with a vector of ones, which BLAS runs at memory speed; NumPy's ``sum`` over a short last axis
    runs its inner loop once per row (rows of 32 numbers, as a LayerNorm over 32 features: 6×
    slower). The order of the additions differs from ``sum``'s, so the last bit may too."""
    m = a.shape[-1]
    return (a.reshape(-1, m) @ get_xp(a).ones((m, 1), dtype=a.dtype)).reshape(a.shape[:-1] + (1,))  # (rows, m) @ (m, 1)


def _centre(x, eps):
    """Each row of x (..., m) minus its mean, as a new array (..., m), and 1/√(σ² + ε) (..., 1).

    Two passes over x and one new array: σ² is a row-wise dot product of the centred values
    with themselves (einsum, no squared copy). Means are sums divided by m, the sums by
    ``_sum_last``."""
    xp = get_xp(x)
    m = x.shape[-1]
    centred = x - _sum_last(x) / m
    var = xp.einsum("...k,...k->...", centred, centred)[..., None] / m  # (..., 1)
    return centred, 1.0 / xp.sqrt(var + eps)


def _normalize(x, eps):
    """Normalise each row of x (..., m) over its m numbers. Returns x̂ (..., m) and 1/√(σ² + ε) (..., 1);
    x̂ overwrites ``_centre``'s centred copy."""
    centred, inv_std = _centre(x, eps)
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


def _normalized_input_grad(dy, gamma, x_hat, inv_std, mean_g, mean_gx):
    """dx of a normalisation, given the two means of g = γ ⊙ dy over each normalised set.

    Derivation, for one set of m numbers x_1 … x_m (s = 1/√(σ² + ε), g_i = ∂L/∂x̂_i = γ_i dy_i):

        ∂σ²/∂x_j = (2/m)(x_j − μ)                  (the path through μ sums to zero)
        ∂s/∂x_j  = −½ s³ ∂σ²/∂x_j = −s² x̂_j / m
        ∂x̂_i/∂x_j = s (δ_ij − 1/m) + (x_i − μ) ∂s/∂x_j = s (δ_ij − 1/m − x̂_i x̂_j / m)
        dx_j = Σ_i g_i ∂x̂_i/∂x_j = s · (g_j − mean(g) − x̂_j · mean(g ⊙ x̂))

    Evaluated as dy·(γ s) − x̂·(mean(g ⊙ x̂) s) − mean(g) s: the small factors are formed first,
    g itself never is, and dx is written in three passes. All arguments broadcast against dy,
    laid out so that each normalised set spans the trailing axes: ``inv_std`` (= s),
    ``mean_g`` and ``mean_gx`` have size 1 on those axes.
    """
    dx = dy * (gamma * inv_std)
    dx -= x_hat * (mean_gx * inv_std)
    dx -= mean_g * inv_std
    return dx


def group_norm_backward(dout, cache: NormCache):
    """Returns (dx, dgamma, dbeta) by ``_normalized_input_grad``, with the two means of g = γ ⊙ dy
    taken through two sums per image and channel, S1 = Σ_s dy and S2 = Σ_s dy ⊙ x̂ (s over positions):

        dβ_c = Σ_n S1[n, c],    dγ_c = Σ_n S2[n, c],
        mean(g) = (1/m) Σ_{c ∈ group} γ_c S1[n, c],   mean(g ⊙ x̂) = (1/m) Σ_{c ∈ group} γ_c S2[n, c]

    so the reductions read dy and x̂ once each and never form g.
    """
    x_hat, inv_std, gamma, shape = cache
    xp = get_xp(dout)
    n, c = shape[:2]
    groups, m = x_hat.shape[1], x_hat.shape[2]
    dy = dout.reshape(n, groups, c // groups, -1)  # (N, C, *spatial) → (N, G, C/G, S)
    xh = x_hat.reshape(dy.shape)  # (N, G, C/G·S) → (N, G, C/G, S)
    s1 = _sum_last(dy)[..., 0]  # (N, G, C/G)
    s2 = xp.einsum("ngcs,ngcs->ngc", dy, xh)  # (N, G, C/G)
    dgamma, dbeta = s2.sum(axis=0).reshape(c), s1.sum(axis=0).reshape(c)
    g4 = gamma.reshape(1, groups, -1)  # (C,) → (1, G, C/G)
    mean_g = (s1 * g4).sum(axis=2) / m  # (N, G)
    mean_gx = (s2 * g4).sum(axis=2) / m  # (N, G)
    per_set = (n, groups, 1, 1)  # one number per group of each image, broadcast over (C/G, S)
    dx = _normalized_input_grad(dy, gamma.reshape(1, groups, -1, 1), xh, inv_std.reshape(per_set),
                                mean_g.reshape(per_set), mean_gx.reshape(per_set))
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
    """Returns (dx, dgamma, dbeta) by ``_normalized_input_grad``, each row's m numbers one set;
    dγ and dβ sum over the leading (batch) axes."""
    x_hat, inv_std, gamma, shape = cache
    lead = tuple(range(len(shape) - gamma.ndim))
    dgamma = (dout * x_hat.reshape(shape)).sum(axis=lead)
    dbeta = dout.sum(axis=lead)
    dy = dout.reshape(x_hat.shape)  # (..., *normalized_shape) → (..., m)
    gamma = gamma.reshape(-1)  # normalized_shape → (m,)
    m = x_hat.shape[-1]
    g = dy * gamma  # (..., m)
    mean_g = _sum_last(g) / m  # (..., 1)
    mean_gx = _sum_last(g * x_hat) / m
    dx = _normalized_input_grad(dy, gamma, x_hat, inv_std, mean_g, mean_gx)
    return dx.reshape(shape), dgamma, dbeta
