"""How a denoiser learns *when* it is: the timestep embedding.

The noise level is a single number t per image. The network needs it as a vector that every
ResBlock can read, so it goes through two stages (DDPM, Ho et al. 2020, §4, borrowing the
Transformer's positional encoding, Vaswani et al. 2017, §3.5):

1. ``timestep_embedding(t, dim)``: a fixed, parameter-free map to sines and cosines at
   geometrically spaced frequencies, so that near timesteps get similar vectors and both slow and
   fast changes in t are visible::

       ω_k = max_period^(−k/half),  k = 0 … half−1,  half = dim/2
       emb[b] = [cos(t_b ω_0) … cos(t_b ω_{half−1}), sin(t_b ω_0) … sin(t_b ω_{half−1})]

   (cosines first, as Stable Diffusion's ``flip_sin_to_cos=True`` with no frequency shift).
2. ``TimestepEmbedding``: a learned MLP Linear → SiLU → Linear on top of it (diffusers' names
   ``linear_1``, ``linear_2``), whose output every ResBlock projects to a per-channel shift.

t may be any float (DDPM's integer steps 0…999 or a continuous noise level), and it gets no
gradient: the backward pass stops at the sinusoids.
"""

from __future__ import annotations

import math

from ..backend import get_xp
from ..nn import Linear, Module, SiLU


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of timesteps: t (B,) floats → (B, dim), dim even. See module docstring."""
    if dim % 2:
        raise ValueError(f"timestep_embedding needs an even dim, got {dim}")
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects timesteps of shape (B,), got {tuple(t.shape)}")
    xp = get_xp(t)
    half = dim // 2
    freqs = xp.exp(-math.log(max_period) * xp.arange(half, dtype=t.dtype) / half)  # (half,) ω_k
    args = t[:, None] * freqs[None, :]  # (B, 1) · (1, half) → (B, half)
    return xp.concatenate([xp.cos(args), xp.sin(args)], axis=1)  # (B, dim)


class TimestepEmbedding(Module):
    """The learned time MLP: (B, in_dim) sinusoids → Linear → SiLU → Linear → (B, time_embed_dim)."""

    def __init__(self, in_dim: int, time_embed_dim: int, *, generator=None):
        self.linear_1 = Linear(in_dim, time_embed_dim, generator=generator)
        self.act = SiLU()
        self.linear_2 = Linear(time_embed_dim, time_embed_dim, generator=generator)

    def forward(self, emb):
        return self.linear_2(self.act(self.linear_1(emb)))

    def backward(self, dout):
        """Returns the gradient w.r.t. the sinusoids (the U-Net discards it: t gets none)."""
        return self.linear_1.backward(self.act.backward(self.linear_2.backward(dout)))
