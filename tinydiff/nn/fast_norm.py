"""GroupNorm followed by SiLU, fused for inference: the same numbers in fewer passes over memory.

Every GroupNorm of a ResBlock, and the one before the U-Net's (and the VAE's) output convolution,
is followed by SiLU. Training runs the two layers as written (norm.py, activations.py): each keeps
a cache for its backward pass. In inference mode (``no_grad``) nothing is kept, and the
arithmetic of the pair can be regrouped. For one image n, one group of channels with mean μ and
variance σ² (as in norm.py) and s = 1/√(σ² + ε):

    y = γ_c · s · (x − μ) + β_c                          GroupNorm (Wu & He 2018)
    SiLU(y) = y · σ(y) = y · ½(1 + tanh(y/2)) = h · (1 + tanh h),   h = y/2

and h is one multiply-add per number, with per-(image, channel) factors folded beforehand:

    h = a · (x − μ) + b,    a[n, c] = ½ γ_c s[n, group of c],   b[c] = ½ β_c

So the computation is: the centred copy x − μ and s, as GroupNorm computes them (``norm._centre``:
the group sums by one matrix-vector product, Σ (x − μ)² by a row-wise dot product), h in place (two operations), tanh h, then (1 + tanh h) · h
in place: eight NumPy operations over the activations and two new arrays, where GroupNorm then SiLU
take eleven and four new arrays (x − μ turned into x̂, γ x̂ + β, σ(y) and y·σ(y)). The variance is still the mean of the *centred* squares (E[x²] − μ² would save a
pass but loses digits to cancellation in float32 when |μ| ≫ σ). Rounding differs from the two
layers' by float32 rounding only (x̂ is never formed; tested against them in float64 to 1e-12).
"""

from __future__ import annotations

from ..backend import get_xp
from .norm import _centre


def group_norm_silu_forward(x, num_groups: int, gamma, beta, eps: float = 1e-5):
    """SiLU(GroupNorm(x)) without a cache. x (N, C, *spatial), gamma/beta (C,) → out like x."""
    xp = get_xp(x)
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels cannot be split into {num_groups} groups")
    rows = x.reshape(n * num_groups, -1)  # (N, C, *spatial) → (N·G, m): one group per row
    h, inv_std = _centre(rows, eps)  # x − μ, a new array (N·G, m), and s (N·G, 1): GroupNorm's own statistics
    a = (0.5 * gamma).reshape(1, num_groups, -1) * inv_std.reshape(n, num_groups, 1)  # ½ γ s: (N, G, C/G)
    h3 = h.reshape(n, c, -1)  # (N·G, m) → (N, C, spatial)
    h3 *= a.reshape(n, c, 1)
    h3 += (0.5 * beta).reshape(1, c, 1)  # now h = y/2
    out = xp.tanh(h3)
    out += 1.0
    out *= h3  # h (1 + tanh h) = y σ(y)
    return out.reshape(x.shape)
