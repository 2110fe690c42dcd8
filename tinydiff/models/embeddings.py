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

A consistency-distilled student (``tinydiff.train.lcm``) also reads the classifier-free guidance
scale w (LCM, Luo et al. 2023, §4.2, as in their released code and diffusers' ``cond_proj``):
``guidance_embedding(w, dim)`` gives sinusoids of 1000·w (so w ∈ [1, 4] spreads over the same
range of frequencies as the timesteps), and ``TimestepEmbedding(..., cond_dim=dim)`` adds them,
through a linear layer ``cond_proj`` without bias that starts at zero, to the timestep sinusoids
before the MLP::

    emb' = emb + W_c · guidance_embedding(w),    W_c (in_dim, cond_dim) = 0 at the start

so a fresh student computes exactly what its teacher computes. Backward: the MLP's input
gradient g = ∂L/∂emb' gives ∂L/∂W_c = gᵀ · guidance_embedding(w) (summed over the batch); w gets
no gradient.
"""

from __future__ import annotations

import math

from ..backend import get_xp, rng
from ..nn import Linear, Module, SiLU

GUIDANCE_SCALE_FACTOR = 1000.0  # w is embedded like a timestep 1000·w (LCM's released code)


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


def guidance_embedding(w, dim: int):
    """Sinusoids of guidance scales: w (B,) → (B, dim), ``timestep_embedding(1000·w, dim)``."""
    return timestep_embedding(GUIDANCE_SCALE_FACTOR * w, dim)


class TimestepEmbedding(Module):
    """The learned time MLP: (B, in_dim) sinusoids → Linear → SiLU → Linear → (B, time_embed_dim).

    With ``cond_dim`` it also takes a condition (B, cond_dim) (the guidance scale's sinusoids),
    added to the input through ``cond_proj``, a zero-initialised Linear without bias (module docstring).
    """

    def __init__(self, in_dim: int, time_embed_dim: int, *, cond_dim: int | None = None, generator=None):
        self.linear_1 = Linear(in_dim, time_embed_dim, generator=generator)
        self.act = SiLU()
        self.linear_2 = Linear(time_embed_dim, time_embed_dim, generator=generator)
        self.cond_proj = None
        if cond_dim is not None:
            # zero, so its (throwaway) random start draws nothing from the model's generator
            self.cond_proj = Linear(cond_dim, in_dim, bias=False, generator=rng(0))
            self.cond_proj.weight.data[...] = 0

    def forward(self, emb, cond=None):
        if (cond is None) != (self.cond_proj is None):
            raise ValueError("TimestepEmbedding takes a condition exactly when built with cond_dim "
                             f"(cond_dim {'set' if self.cond_proj is not None else 'None'}, "
                             f"condition {'missing' if cond is None else 'given'})")
        if self.cond_proj is not None:
            emb = emb + self.cond_proj(cond)  # (B, in_dim) + (B, in_dim)
        return self.linear_2(self.act(self.linear_1(emb)))

    def backward(self, dout):
        """Returns the gradient w.r.t. the sinusoids (the U-Net discards it: t gets none); with a
        condition, the same gradient reaches ``cond_proj`` (the sum emb + W_c·cond passes it to both)."""
        demb = self.linear_1.backward(self.act.backward(self.linear_2.backward(dout)))
        if self.cond_proj is not None:
            self.cond_proj.backward(demb)  # fills W_c's gradient; the condition (w) gets none
        return demb
