"""A diffusion transformer (DiT) with joint text–image attention, the U-Net's drop-in alternative.

The latent is cut into patches, each patch becomes a token, the prompt's token states become
tokens too, and one transformer with self-attention over *all* of them does the denoising
(Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", for patches and adaLN-Zero;
Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
Stable Diffusion 3's MMDiT, for the joint attention). With the default config:

    x (B, 4, 8, 8) ─► patchify (p = 2) ─► (B, 16, 16) ─► patch_embed ─► + fixed 2-D sin-cos ─┐
                                                                           image tokens (B, 16, D)
    context (B, L, 64) ─► context_embedder ─────────────────────────────► text tokens (B, L, D)
                                                                                             │
    t ─► sinusoids ─► time MLP ──────(+)── c (B, D) ─► SiLU ─► every block's adaLN      ▼
    context ─► masked mean ─► text MLP ─┘                                    depth × joint block
                                                                                             │
            image tokens ─► adaptive LayerNorm (shift, scale from c) ─► proj_out ─► unpatchify
                                                                           ─► (B, 4, 8, 8)

**Joint attention (MMDiT, Esser et al. 2024, §4 and Fig. 2b).** Each modality keeps its own
weights (its own adaLN modulation, q/k/v/out projections and MLP: "two independent transformers,
one per modality"), but the attention runs over the concatenation of both sequences, so every
image token sees every word and every word every image token:

    Q = [h_x W_q ; h_c W_q^ctx],  K = [h_x W_k ; h_c W_k^ctx],  V = [h_x W_v ; h_c W_v^ctx]
    O = softmax(Q Kᵀ/√d + M) V                     (Vaswani et al. 2017, eq. 1; M = −∞ at masked keys)
    o_x = O[:N] W_o,   o_c = O[N:] W_o^ctx          (N image tokens first, then L text tokens)

Separate weights per stream (rather than one shared set) is SD3's choice: text states and latent
patches have very different statistics, and in the paper's backbone comparison (§5) MM-DiT
beat DiT with shared weights over the concatenated sequence, CrossDiT and UViT. The prompt's
padding mask M hides padded text tokens from every query as keys. In the last block the text stream's output is never used, so — as SD3's last block
(``context_pre_only``) — text tokens there only give keys and values: no text queries, no
text output projection, no text MLP (no parameter that never receives a gradient).

**adaLN-Zero (Peebles & Xie 2023, §3.2).** Every sub-layer is conditioned on c through a shift,
a scale and a gate regressed from c instead of learned constants:

    (β₁, γ₁, α₁, β₂, γ₂, α₂) = Linear(SiLU(c))               (per block and per stream)
    x ← x + α₁ ⊙ Attn(LN(x) ⊙ (1 + γ₁) + β₁)
    x ← x + α₂ ⊙ MLP(LN(x) ⊙ (1 + γ₂) + β₂)                 (LN without its own γ, β)

The modulation Linear is zero-initialised, so every α is 0 and a fresh block is the identity;
the final layer's modulation and projection are zero-initialised as well, so a fresh DiT outputs
exactly zero. SiLU(c) is computed once and shared by all blocks (each DiT block applies the same
SiLU to the same c). c = time embedding + text embedding, where the text embedding is an MLP of
the **masked mean** of the context states (the prompt's real tokens averaged; SD3 uses CLIP's
pooled output instead, but the denoiser's interface carries only the token states, and the
mean needs nothing else). Without a mask all L states are averaged; the text encoder sets
padded states to zero, so the mean then is Σ real / L, the same at training and sampling time.

Backward runs the graph in reverse by hand: the image and text streams' gradients cross in each
joint attention, every block's adaLN returns a gradient for SiLU(c), their sum flows back into
the time MLP (t gets none) and the text MLP, and the context's gradient is the sum of the
context embedder's and the masked mean's. Interface as ``UNet``: forward(x, t, context,
context_mask), backward → (dx, dcontext), the learned null context for classifier-free
guidance, attention callbacks, ``config`` with in_channels and sample_size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from ..backend import DEFAULT_DTYPE, get_xp, rng, to_device
from ..config import ConfigMixin
from ..nn import GELU, Attention, Linear, Module, ModuleList, Parameter, Sequential, SiLU
from ..nn import functional as F
from .blocks import add_grads
from .embeddings import TimestepEmbedding, timestep_embedding
from .unet import UNet, check_context


@dataclass
class DiTConfig(ConfigMixin):
    """Everything that decides the DiT's shape; saved as JSON beside the weights (``to_dict``,
    ``from_dict``, ``to_json``, ``from_json`` from ``ConfigMixin``).

    Field names mirror ``UNetConfig`` where they mean the same thing. The defaults are the
    text-conditional model for the 4×8×8 latents of the mnist-captions pipeline.
    """

    in_channels: int = 4  # channels of the noisy input: 4 for 4×8×8 latents
    out_channels: int = 4  # channels of the prediction (ε, v and x0 all have the input's shape)
    sample_size: int = 8  # H = W the model is trained and sampled at (it accepts other multiples of patch_size)
    patch_size: int = 2  # p: each p×p patch of the latent is one token (8×8, p = 2 → 16 tokens of 4·2·2 = 16 numbers)
    width: int = 128  # D: every token's width, in both streams
    depth: int = 4  # joint transformer blocks
    heads: int = 4  # attention heads; dim_head = width / heads = 32
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio · width, as in DiT and SD3
    timestep_dim: int = 128  # width of the timestep sinusoids fed to the time MLP (DiT: 256)
    context_dim: int | None = 64  # None: unconditional; else the width of the context (TextEncoderConfig.width)
    context_length: int | None = 16  # L of the learned null context (the text encoder's token count)
    learned_null_context: bool = True  # learn a (context_length, context_dim) "no prompt" context for CFG

    def __post_init__(self):
        problems = []
        if self.patch_size < 1 or self.sample_size % self.patch_size:
            problems.append(f"patch_size={self.patch_size} does not divide sample_size={self.sample_size}; "
                            "choose a patch size that divides it")
        if self.width % self.heads:
            problems.append(f"width={self.width} is not divisible by heads={self.heads}")
        if self.width % 4:
            problems.append(f"width={self.width} must be a multiple of 4 (sines and cosines of rows and columns)")
        if self.timestep_dim % 2:
            problems.append(f"timestep_dim={self.timestep_dim} must be even (the sinusoid width)")
        if self.depth < 1:
            problems.append(f"depth must be >= 1, got {self.depth}")
        if self.learned_null_context and (self.context_dim is None or not self.context_length):
            problems.append("learned_null_context needs context_dim and a positive context_length")
        if problems:
            raise ValueError("invalid DiTConfig: " + "; ".join(problems))


# --------------------------------------------------------------------------- patches and positions


def patchify(x, p: int):
    """(B, C, H, W) → (B, N, C·p·p) tokens, N = (H/p)·(W/p) in row-major order of the patch grid.

    Token n = i·(W/p) + j holds the patch x[:, :, i·p:(i+1)·p, j·p:(j+1)·p] flattened in (C, p, p)
    order, so ``patch_embed``'s weight reshaped to (D, C, p, p) is DiT's stride-p convolution.
    A permutation of the entries: its adjoint is its inverse, ``unpatchify``.
    """
    b, c, h, w = x.shape
    t = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, H/p, p, W/p, p)
    t = t.transpose(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
    return t.reshape(b, (h // p) * (w // p), c * p * p)  # (B, N, C·p·p)


def unpatchify(tokens, p: int, channels: int, height: int, width: int):
    """(B, N, C·p·p) → (B, C, H, W): the inverse of ``patchify``."""
    b = tokens.shape[0]
    t = tokens.reshape(b, height // p, width // p, channels, p, p)  # (B, H/p, W/p, C, p, p)
    t = t.transpose(0, 3, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p)
    return t.reshape(b, channels, height, width)


def position_embedding_2d(grid_h: int, grid_w: int, dim: int, xp, dtype):
    """Fixed 2-D sin-cos position of each patch (MAE / DiT layout), (grid_h · grid_w, dim).

    Half the features encode the column j, half the row i, each with the timestep embedding's
    sinusoids (cosines first, ω_k = 10000^(−k/(dim/4)), k = 0 … dim/4 − 1):

        pe[i·grid_w + j] = [cos(j ω), sin(j ω), cos(i ω), sin(i ω)]

    Not trained: a token's position is a function of where its patch lies, nothing else.
    """
    rows = xp.repeat(xp.arange(grid_h, dtype=dtype), grid_w)  # (N,) token n → its row i
    cols = xp.tile(xp.arange(grid_w, dtype=dtype), grid_h)  # (N,) token n → its column j
    return xp.concatenate([timestep_embedding(cols, dim // 2), timestep_embedding(rows, dim // 2)], axis=1)


# --------------------------------------------------------------------------- adaptive layer norm


class AdaLNCache(NamedTuple):
    norm: object  # the LayerNorm's cache (NormCache)
    x_hat: object  # normalised input (B, N, D)
    scale: object  # γ (B, D)


def adaptive_layer_norm_forward(x, shift, scale, eps: float = 1e-6):
    """adaLN (Peebles & Xie 2023, §3.2): out = LN(x) ⊙ (1 + γ) + β, LN without its own affine.

    Shapes: x (B, N, D), shift β and scale γ (B, D), one per sample, broadcast over the N tokens.
    """
    xp = get_xp(x)
    d = x.shape[-1]
    x_hat, norm = F.layer_norm_forward(x, xp.ones(d, dtype=x.dtype), xp.zeros(d, dtype=x.dtype), eps)
    out = x_hat * (1.0 + scale[:, None, :]) + shift[:, None, :]  # (B, D) → (B, 1, D) over tokens
    return out, AdaLNCache(norm, x_hat, scale)


def adaptive_layer_norm_backward(dout, cache: AdaLNCache):
    """dx̂ = dout ⊙ (1 + γ) then LayerNorm's backward;  dβ = Σ_n dout,  dγ = Σ_n dout ⊙ x̂.
    Returns (dx, dshift, dscale)."""
    norm, x_hat, scale = cache
    dx, _, _ = F.layer_norm_backward(dout * (1.0 + scale[:, None, :]), norm)  # no γ, β of its own
    return dx, dout.sum(axis=1), (dout * x_hat).sum(axis=1)


def _zero_linear(in_features: int, out_features: int) -> Linear:
    """adaLN-Zero: a Linear that starts at exactly zero (weight and bias). Its throwaway random
    start comes from a generator of its own, so it draws nothing from the model's."""
    linear = Linear(in_features, out_features, generator=rng(0))
    linear.weight.data[...] = 0
    linear.bias.data[...] = 0
    return linear


class Modulation(NamedTuple):
    """adaLN-Zero's per-sample parameters of one stream in one block, each (B, D)."""

    shift_msa: object
    scale_msa: object
    gate_msa: object = None  # the last block's text stream has only the first two
    shift_mlp: object = None
    scale_mlp: object = None
    gate_mlp: object = None


def _modulation(linear: Linear, c_act, count: int) -> Modulation:
    """Linear(SiLU(c)) (B, count·D) → ``count`` chunks of (B, D)."""
    return Modulation(*get_xp(c_act).split(linear(c_act), count, axis=1))


def masked_mean(context, mask):
    """Mean over the real tokens: (B, L, Dc), mask (B, L) or None → (B, Dc), and the weights
    (B, L, 1) w_l = m_l / max(Σ m, 1), so that d context_l = w_l · d pooled."""
    xp = get_xp(context)
    keep = xp.ones(context.shape[:2], dtype=context.dtype) if mask is None else mask.astype(context.dtype)
    weights = (keep / xp.maximum(keep.sum(axis=1, keepdims=True), 1.0))[:, :, None]  # (B, L) → (B, L, 1)
    return (context * weights).sum(axis=1), weights


# --------------------------------------------------------------------------- joint attention


class JointAttention(Attention):
    """Multi-head self-attention over [image tokens; text tokens] with per-stream projections.

    The image stream's projections are the parent ``Attention``'s (to_q, to_k, to_v, to_out),
    the text stream's are add_q_proj, add_k_proj, add_v_proj, to_add_out (diffusers' names for
    SD3). ``context_pre_only`` (the last block): text gives keys and values only.

    forward(x (B, N, D), context (B, L, D) or None, mask (B, L) bool or None, True = a real token)
    → (out_x (B, N, D), out_context (B, L, D) or None).  backward(dout_x, dout_context=None)
    → (dx, dcontext or None). ``probs_callback``, if set, is called with the probabilities
    (B, heads, queries, N + L) and N.
    """

    def __init__(self, dim: int, heads: int, with_context: bool, context_pre_only: bool = False, *, generator=None):
        super().__init__(dim, None, heads, dim // heads, generator=generator)
        text_queries = with_context and not context_pre_only
        self.add_q_proj = Linear(dim, dim, bias=False, generator=generator) if text_queries else None
        self.add_k_proj = Linear(dim, dim, bias=False, generator=generator) if with_context else None
        self.add_v_proj = Linear(dim, dim, bias=False, generator=generator) if with_context else None
        self.to_add_out = Linear(dim, dim, generator=generator) if text_queries else None

    def forward(self, x, context=None, mask=None):
        xp = get_xp(x)
        b, n, _ = x.shape
        q = self._split_heads(self.to_q(x))  # (B, h, N, d)
        k = self._split_heads(self.to_k(x))
        v = self._split_heads(self.to_v(x))
        used_context = context is not None
        if used_context:
            if self.add_k_proj is None:
                raise ValueError("this DiT block has no text stream (built with context_dim=None)")
            k = xp.concatenate([k, self._split_heads(self.add_k_proj(context))], axis=2)  # (B, h, N + L, d)
            v = xp.concatenate([v, self._split_heads(self.add_v_proj(context))], axis=2)
            if self.add_q_proj is not None:
                q = xp.concatenate([q, self._split_heads(self.add_q_proj(context))], axis=2)
        key_mask = None
        if used_context and mask is not None:  # image keys are always real
            key_mask = xp.concatenate([xp.ones((b, n), dtype=bool), mask], axis=1)[:, None, None, :]  # (B, 1, 1, N + L)
        o, cache = F.attention_forward(q, k, v, key_mask)
        if self.probs_callback is not None:
            self.probs_callback(cache.p, n)
        o = self._merge_heads(o)  # (B, queries, D)
        self._keep((cache, n, used_context))
        out_context = self.to_add_out(o[:, n:]) if used_context and self.to_add_out is not None else None
        return self.to_out(o[:, :n]), out_context

    def backward(self, dout, dout_context=None):
        cache, n, used_context = self._take()
        xp = get_xp(dout)
        do = self.to_out.backward(dout)  # (B, N, D)
        if used_context and self.to_add_out is not None:
            do = xp.concatenate([do, self.to_add_out.backward(dout_context)], axis=1)  # (B, N + L, D)
        dq, dk, dv = F.attention_backward(self._split_heads(do), cache)
        dq, dk, dv = self._merge_heads(dq), self._merge_heads(dk), self._merge_heads(dv)  # (B, ·, D)
        dx = self.to_q.backward(dq[:, :n]) + self.to_k.backward(dk[:, :n]) + self.to_v.backward(dv[:, :n])
        if not used_context:
            return dx, None
        dcontext = self.add_k_proj.backward(dk[:, n:]) + self.add_v_proj.backward(dv[:, n:])
        if self.add_q_proj is not None:
            dcontext += self.add_q_proj.backward(dq[:, n:])
        return dx, dcontext


# --------------------------------------------------------------------------- the joint block


def _mlp(dim: int, ratio: int, generator) -> Sequential:
    """Linear → GELU → Linear. DiT and SD3 use GELU's tanh approximation; the exact GELU (the
    U-Net's and the text encoder's) is the function it approximates, and the faster one here."""
    return Sequential([Linear(dim, ratio * dim, generator=generator), GELU(),
                       Linear(ratio * dim, dim, generator=generator)])


class JointTransformerBlock(Module):
    """One MMDiT block: adaLN-Zero per stream, one joint attention, an MLP per stream.

    forward(x (B, N, D), context (B, L, D) or None, c_act = SiLU(c) (B, D), mask (B, L) or None)
    → (x, context or None).  backward(dx, dcontext or None) → (dx, dcontext or None, dc_act).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int, with_context: bool, context_pre_only: bool = False, *,
                 generator=None):
        self.adaLN_modulation = _zero_linear(dim, 6 * dim)  # the image stream's β₁ γ₁ α₁ β₂ γ₂ α₂
        self.attn = JointAttention(dim, heads, with_context, context_pre_only, generator=generator)
        self.ff = _mlp(dim, mlp_ratio, generator)
        self.context_chunks = 2 if context_pre_only else 6  # the last block's text stream: β₁, γ₁ only
        self.adaLN_modulation_context = (_zero_linear(dim, self.context_chunks * dim)
                                         if with_context else None)
        self.ff_context = _mlp(dim, mlp_ratio, generator) if with_context and not context_pre_only else None

    @staticmethod
    def _finish(x, a, m: Modulation, ff):
        """The residual attention update and the MLP sub-layer of one stream."""
        x = x + m.gate_msa[:, None, :] * a  # (B, D) → (B, 1, D) over the tokens
        h, norm = adaptive_layer_norm_forward(x, m.shift_mlp, m.scale_mlp)
        f = ff(h)
        return x + m.gate_mlp[:, None, :] * f, (a, f, norm, m)

    @staticmethod
    def _finish_backward(dout, cache, ff):
        """→ (dx, da, [dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp]): the gradients of the last four
        modulation chunks, in chunk order."""
        a, f, norm, m = cache
        dgate_mlp = (dout * f).sum(axis=1)
        dx, dshift_mlp, dscale_mlp = adaptive_layer_norm_backward(ff.backward(dout * m.gate_mlp[:, None, :]), norm)
        dx += dout  # the MLP's residual
        dgate_msa = (dx * a).sum(axis=1)
        return dx, dx * m.gate_msa[:, None, :], [dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp]

    def forward(self, x, context, c_act, mask=None):
        used_context = context is not None
        if used_context and self.adaLN_modulation_context is None:
            raise ValueError("this DiT block has no text stream (built with context_dim=None)")
        mx = _modulation(self.adaLN_modulation, c_act, 6)
        hx, norm_x = adaptive_layer_norm_forward(x, mx.shift_msa, mx.scale_msa)
        hc = norm_c = mc = None
        if used_context:
            mc = _modulation(self.adaLN_modulation_context, c_act, self.context_chunks)
            hc, norm_c = adaptive_layer_norm_forward(context, mc.shift_msa, mc.scale_msa)
        ax, ac = self.attn(hx, hc, mask)
        x, finish_x = self._finish(x, ax, mx, self.ff)
        finish_c = None
        if ac is not None:
            context, finish_c = self._finish(context, ac, mc, self.ff_context)
        else:
            context = None  # no text stream here, or the last block (its text output is never used)
        self._keep((norm_x, norm_c, finish_x, finish_c))
        return x, context

    def backward(self, dout, dout_context=None):
        norm_x, norm_c, finish_x, finish_c = self._take()
        xp = get_xp(dout)
        dx, dax, dmod_x = self._finish_backward(dout, finish_x, self.ff)
        dcontext = dac = None
        dmod_c = []  # the last block's text stream has no gate or MLP chunks
        if finish_c is not None:
            dcontext, dac, dmod_c = self._finish_backward(dout_context, finish_c, self.ff_context)
        dhx, dhc = self.attn.backward(dax, dac)
        dx1, dshift_msa, dscale_msa = adaptive_layer_norm_backward(dhx, norm_x)
        dx += dx1
        dmod = xp.concatenate([dshift_msa, dscale_msa] + dmod_x, axis=1)  # 6 × (B, D) → (B, 6D), chunk order
        dc_act = self.adaLN_modulation.backward(dmod)  # (B, D)
        if norm_c is not None:
            dc1, dshift_c, dscale_c = adaptive_layer_norm_backward(dhc, norm_c)
            dcontext = add_grads(dcontext, dc1)  # the last block: the LN path is the only one
            dc_act += self.adaLN_modulation_context.backward(xp.concatenate([dshift_c, dscale_c] + dmod_c, axis=1))
        return dx, dcontext, dc_act


# --------------------------------------------------------------------------- the DiT


def _report_attention(fn, name: str, kind: str, probs, n: int):
    """Hand ``fn`` the part of a joint attention map that ``kind`` asks for."""
    if kind == "cross":
        probs = probs[:, :, :n, n:]  # image queries → text keys
    elif kind == "self":
        probs = probs[:, :, :n, :n]  # image queries → image keys
    fn(name, probs)


class DiT(Module):
    """DiT(config, seed=0): see the module docstring. Interface as ``UNet``. The initial weights
    are drawn from a generator made from ``seed`` (or from ``generator``, when a larger model
    passes its own).

    forward(x (B, C_in, H, W), t (B,) floats or one scalar, context (B, L, context_dim) or None,
    context_mask (B, L) bool (True = a real token) or None) → (B, C_out, H, W).
    backward(dout) → (dx, dcontext), dcontext None without context; parameter grads are added (+=).
    H and W must be multiples of patch_size.
    """

    def __init__(self, config: DiTConfig, seed: int = 0, *, generator=None):
        gen = rng(seed) if generator is None else generator  # the initial weights depend on the seed only
        self.config = config
        d, p, cond = config.width, config.patch_size, config.context_dim is not None
        # DiT's patch embedding Conv2d(C, D, p, stride=p), written as the Linear it is on patches
        self.patch_embed = Linear(config.in_channels * p * p, d, generator=gen)
        self.time_embedding = TimestepEmbedding(config.timestep_dim, d, generator=gen)
        self.context_embedder = Linear(config.context_dim, d, generator=gen) if cond else None
        # SD3's text_embedder has this very shape, Linear → SiLU → Linear (here on the masked mean)
        self.pooled_text_embedding = TimestepEmbedding(config.context_dim, d, generator=gen) if cond else None
        self.cond_act = SiLU()
        self.blocks = ModuleList([
            JointTransformerBlock(d, config.heads, config.mlp_ratio, cond, context_pre_only=i == config.depth - 1,
                                  generator=gen)
            for i in range(config.depth)
        ])
        self.norm_out = _zero_linear(d, 2 * d)  # the final adaptive LayerNorm's shift and scale
        self.proj_out = _zero_linear(d, p * p * config.out_channels)
        self.null_embedding = None
        if config.learned_null_context:
            shape = (config.context_length, config.context_dim)  # small random start, as the U-Net's
            self.null_embedding = Parameter(to_device(0.02 * gen.standard_normal(shape), dtype=DEFAULT_DTYPE))

    # -- forward and backward --------------------------------------------------------------
    def forward(self, x, t, context=None, context_mask=None):
        t = self._check_inputs(x, t, context, context_mask)
        xp, cfg = get_xp(x), self.config
        p = cfg.patch_size
        b, _, height, width = x.shape
        c = self.time_embedding(timestep_embedding(t, cfg.timestep_dim))  # (B, D)
        h = self.patch_embed(patchify(x, p))  # (B, N, C·p·p) → (B, N, D)
        h = h + position_embedding_2d(height // p, width // p, cfg.width, xp, x.dtype)  # (N, D) broadcast over B
        ctx = pool_weights = None
        if context is not None:
            ctx = self.context_embedder(context)  # (B, L, D)
            pooled, pool_weights = masked_mean(context, context_mask)  # (B, context_dim)
            c = c + self.pooled_text_embedding(pooled)
        c_act = self.cond_act(c)  # SiLU(c), shared by every adaLN modulation
        for block in self.blocks:
            h, ctx = block(h, ctx, c_act, context_mask)
        shift, scale = xp.split(self.norm_out(c_act), 2, axis=1)  # (B, 2D) → 2 × (B, D)
        h, norm = adaptive_layer_norm_forward(h, shift, scale)
        out = self.proj_out(h)  # (B, N, p·p·C_out)
        self._keep((norm, pool_weights, x.shape))
        return unpatchify(out, p, cfg.out_channels, height, width)  # (B, C_out, H, W)

    def backward(self, dout):
        norm, pool_weights, x_shape = self._take()
        xp, p = get_xp(dout), self.config.patch_size
        dh = self.proj_out.backward(patchify(dout, p))  # unpatchify is a permutation: its adjoint is patchify
        dh, dshift, dscale = adaptive_layer_norm_backward(dh, norm)
        dc_act = self.norm_out.backward(xp.concatenate([dshift, dscale], axis=1))  # (B, D)
        dctx = None  # the last block's text output is not used: no gradient reaches it
        for block in reversed(self.blocks):
            dh, dctx, dca = block.backward(dh, dctx)
            dc_act += dca
        dc = self.cond_act.backward(dc_act)  # (B, D), reaches both summands of c
        self.time_embedding.backward(dc)  # fills the time MLP's grads; t itself gets no gradient
        dx = unpatchify(self.patch_embed.backward(dh), p, x_shape[1], x_shape[2], x_shape[3])  # positions: fixed
        if pool_weights is None:
            return dx, None
        dpooled = self.pooled_text_embedding.backward(dc)  # (B, context_dim)
        dcontext = self.context_embedder.backward(dctx) + pool_weights * dpooled[:, None, :]  # (B, L, context_dim)
        return dx, dcontext

    def _check_inputs(self, x, t, context, context_mask):
        """Clear errors for inputs the network cannot take; returns t as a (B,) array of x's dtype."""
        cfg = self.config
        xp = get_xp(x, t, context, context_mask)  # mixed NumPy/CuPy arrays → clear error
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"DiT expects x of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, height, width = x.shape
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"DiT cuts x into {cfg.patch_size}×{cfg.patch_size} patches: H and W must be "
                             f"multiples of {cfg.patch_size}, got {height}×{width}")
        check_context("DiT", cfg.context_dim, b, context, context_mask)
        t = xp.asarray(t, dtype=x.dtype)
        if t.ndim == 0:
            t = xp.full((b,), t, dtype=x.dtype)  # one timestep for the whole batch
        if tuple(t.shape) != (b,):
            raise ValueError(f"DiT expects timesteps t of shape (B={b},) or a scalar, got {tuple(t.shape)}")
        return t

    # -- classifier-free guidance: the learned "no prompt" context, exactly as the U-Net's ------
    null_context = UNet.null_context
    replace_with_null_context = UNet.replace_with_null_context
    null_context_backward = UNet.null_context_backward

    # -- attention maps ------------------------------------------------------------------------
    def set_attention_callback(self, fn, kind: str = "cross") -> None:
        """Call ``fn(name, probs)`` on every forward of each block's joint attention, name e.g.
        'blocks.0.attn'. ``kind`` picks the part of the map: 'cross' image patches → words
        (B, heads, N, L), 'self' patches → patches (B, heads, N, N), 'joint' the whole map
        (B, heads, queries, N + L). Each query's row sums to 1 over all N + L keys, so a 'cross'
        row sums to the share of attention that goes to the words. ``fn=None`` removes them."""
        if kind not in ("cross", "self", "joint"):
            raise ValueError(f"kind must be 'cross', 'self' or 'joint', got {kind!r}")
        if kind == "cross" and self.config.context_dim is None:
            raise ValueError("this DiT has no text tokens (it was built with context_dim=None)")
        for i, block in enumerate(self.blocks):
            name = f"blocks.{i}.attn"
            block.attn.probs_callback = None if fn is None else functools.partial(_report_attention, fn, name, kind)

    has_attention_callbacks = UNet.has_attention_callbacks
