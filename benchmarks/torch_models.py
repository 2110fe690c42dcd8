"""PyTorch mirrors of tinydiff's networks (U-Net, DiT, autoencoder, text encoder), for the reference
benchmark and its tests.

Each class is built from the same config dataclass as its tinydiff twin and has the same
parameter names and shapes, so tinydiff's weights load one-to-one::

    tiny = tinydiff.models.UNet(latent_unet_config())
    ref = torch_models.UNet(tiny.config)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in tiny.state_dict().items()})
    # or, the same in one call: ref = torch_models.mirror(tiny)

and, given the same inputs, both compute the same function (up to float rounding). The forward
passes below are written from tinydiff's, detail for detail:

* GroupNorm and LayerNorm with eps = 1e-5 (PyTorch's default, tinydiff's too);
* exact (erf) GELU in every MLP, SiLU everywhere else;
* attention scaled by 1/√dim_head; a masked key gets the score finfo.min/2 rather than −∞ (a
  query whose keys are all masked then averages the values instead of returning NaN). Here the
  mask is added to the scores, which gives the same probabilities: in floating point
  s + finfo.min/2 rounds to finfo.min/2 for any score of ordinary size;
* the time embedding: sinusoids [cos | sin] at ω_k = 10000^(−k/half), computed in t's dtype,
  then Linear → SiLU → Linear;
* the U-Net's up path pops skips last-in first-out and concatenates [h, skip] on the channels;
  cross-attention is skipped when no context is given; the learned null context is the
  ``null_embedding`` parameter repeated over the batch;
* the VAE clamps log σ² to [−30, 20] and samples z = μ + e^{log σ²/2} ε with ε an input;
* the text encoder adds learned positions, masks padded keys, applies ln_final, zeroes the
  hidden states at padded positions and pools at <eos> (the last real token).
* the DiT cuts the latent into p×p patches in (C, p, p) order, adds the fixed 2-D sin-cos
  positions [cos(jω), sin(jω), cos(iω), sin(iω)], adds an MLP of the masked mean of the context
  to the time embedding, runs adaLN-Zero joint blocks (LayerNorm without affine, eps = 1e-6;
  image tokens first, then text tokens, in one attention; the last block's text stream gives
  keys and values only) and the final adaptive LayerNorm.

Only the forward passes are written: autograd supplies the backward passes, which is what the
benchmark measures tinydiff's hand-written ones against. This module needs torch and is
therefore kept out of the ``tinydiff`` package, for which torch is an optional extra.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinydiff.backend import to_numpy
from tinydiff.models.autoencoder import LOGVAR_MAX, LOGVAR_MIN, AutoencoderConfig
from tinydiff.models.clip import TextEncoderConfig
from tinydiff.models.dit import DiTConfig
from tinydiff.models.unet import UNetConfig

# --------------------------------------------------------------------------- shared layers


def masked_attention(q, k, v, mask=None):
    """softmax(q kᵀ/√d + bias) v with bias = 0 for real keys and finfo.min/2 for masked ones.

    Shapes: q (B, h, Lq, d), k and v (B, h, Lk, d), mask (B, Lk) bool (True = a real key) or
    None → (B, h, Lq, d). PyTorch's fused ``scaled_dot_product_attention`` does the work, as a
    PyTorch user would write it.
    """
    bias = None
    if mask is not None:
        masked_score = torch.finfo(q.dtype).min / 2
        bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, masked_score)  # (B, Lk)
        bias = bias[:, None, None, :]  # (B, 1, 1, Lk): the same for every head and query
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class Attention(nn.Module):
    """Multi-head self- or cross-attention: to_q, to_k, to_v without bias, to_out with bias."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)

    def _split_heads(self, t):
        b, length, _ = t.shape
        return t.reshape(b, length, self.heads, self.dim_head).transpose(1, 2)  # (B, L, h·d) → (B, h, L, d)

    def forward(self, x, context=None, mask=None):
        source = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(source))
        v = self._split_heads(self.to_v(source))
        o = masked_attention(q, k, v, mask)  # (B, h, L, d)
        b, _, length, _ = o.shape
        return self.to_out(o.transpose(1, 2).reshape(b, length, self.heads * self.dim_head))  # → (B, L, h·d)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    """Linear → exact GELU → Linear, named ``0`` and ``2`` as tinydiff's Sequential."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


# --------------------------------------------------------------------------- U-Net blocks


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv1 (+ time shift) → GroupNorm → SiLU → conv2, plus the (1×1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out) → (B, C_out, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class TransformerBlock(nn.Module):
    """h = x + attn1(norm1 x);  h = h + attn2(norm2 h, context);  out = h + ff(norm3 h)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim) if context_dim is not None else None
        self.attn2 = Attention(dim, context_dim, heads, dim_head) if context_dim is not None else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = mlp(dim, 4 * dim)

    def forward(self, x, context=None, mask=None):
        h = x + self.attn1(self.norm1(x))
        if context is not None:
            h = h + self.attn2(self.norm2(h), context, mask)
        return h + self.ff(self.norm3(h))


class SpatialTransformer(nn.Module):
    """GroupNorm → pixels as tokens → proj_in → transformer block → proj_out → map, + input."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int | None, groups: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, dim_head, context_dim)])
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x, context=None, mask=None):
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, C, H, W) → (B, HW, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, mask)
        tokens = self.proj_out(tokens)  # (B, HW, C)
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, HW, C) → (B, C, H, W)


class Downsample2D(nn.Module):
    """3×3 convolution of stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2×, then a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """t (B,) → (B, dim) = [cos(t ω) | sin(t ω)], ω_k = max_period^(−k/half), in t's dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype) / half)  # (half,)
    args = t[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimestepEmbedding(nn.Module):
    """Linear → SiLU → Linear on the sinusoids."""

    def __init__(self, in_dim: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, emb):
        return self.linear_2(F.silu(self.linear_1(emb)))


# --------------------------------------------------------------------------- U-Net


class _ResAttnBlock(nn.Module):
    """resnets[i] then, at attention levels, attentions[i]: one layer of a down or up block."""

    def _build(self, config: UNetConfig, in_channels: list[int], out_channels: int, attention: bool):
        tc, g = config.time_embed_dim, config.groups
        self.resnets = nn.ModuleList([ResBlock(c, out_channels, tc, g) for c in in_channels])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_channels, config.heads, config.dim_head, config.context_dim, g)
             for _ in in_channels] if attention else []
        )

    def _layer(self, i, h, temb, context, mask):
        h = self.resnets[i](h, temb)
        return self.attentions[i](h, context, mask) if len(self.attentions) else h


class DownBlock(_ResAttnBlock):
    """layers_per_block × (Res[→Tf]) then Downsample (not at the last level); pushes every output."""

    def __init__(self, config: UNetConfig, in_channels: int, out_channels: int, attention: bool, downsample: bool):
        super().__init__()
        n = config.layers_per_block
        self._build(config, [in_channels] + [out_channels] * (n - 1), out_channels, attention)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if downsample else [])

    def forward(self, h, temb, context, mask, skips: list):
        for i in range(len(self.resnets)):
            h = self._layer(i, h, temb, context, mask)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)  # (B, C, H, W) → (B, C, H/2, W/2)
            skips.append(h)
        return h


class UpBlock(_ResAttnBlock):
    """One layer per popped skip: cat(h, skip) → Res[→Tf]; then Upsample (not at the top level)."""

    def __init__(self, config: UNetConfig, in_channels: int, skip_channels: list[int], out_channels: int,
                 attention: bool, upsample: bool):
        super().__init__()
        ins = [(in_channels if i == 0 else out_channels) + c for i, c in enumerate(skip_channels)]
        self._build(config, ins, out_channels, attention)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, h, temb, context, mask, skips: list):
        for i in range(len(self.resnets)):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, H, W)
            h = self._layer(i, h, temb, context, mask)
        for up in self.upsamplers:
            h = up(h)  # (B, C, H, W) → (B, C, 2H, 2W)
        return h


class MidBlock(nn.Module):
    """Res → Tf → Res at the lowest resolution."""

    def __init__(self, config: UNetConfig, channels: int):
        super().__init__()
        tc, g = config.time_embed_dim, config.groups
        self.resnets = nn.ModuleList([ResBlock(channels, channels, tc, g), ResBlock(channels, channels, tc, g)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, config.heads, config.dim_head,
                                                            config.context_dim, g)])

    def forward(self, h, temb, context, mask):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context, mask)
        return self.resnets[1](h, temb)


class UNet(nn.Module):
    """forward(x (B, C_in, H, W), t (B,), context (B, L, D) or None, context_mask (B, L) or None)
    → (B, C_out, H, W), as ``tinydiff.models.UNet``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        chans, levels = config.block_channels, len(config.block_channels)
        self.time_embedding = TimestepEmbedding(chans[0], config.time_embed_dim)
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        skip_channels = [chans[0]]  # channels of every tensor the down path pushes, in push order
        self.down_blocks = nn.ModuleList()
        for level, out_ch in enumerate(chans):
            downsample = level < levels - 1
            self.down_blocks.append(DownBlock(config, chans[max(level - 1, 0)], out_ch,
                                              config.attention_levels[level], downsample))
            skip_channels += [out_ch] * (config.layers_per_block + downsample)
        self.mid_block = MidBlock(config, chans[-1])
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            pops = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            in_ch = chans[min(level + 1, levels - 1)]
            self.up_blocks.append(UpBlock(config, in_ch, pops, chans[level], config.attention_levels[level], level > 0))
        self.conv_norm_out = nn.GroupNorm(config.groups, chans[0])
        self.conv_out = nn.Conv2d(chans[0], config.out_channels, 3, padding=1)
        self.null_embedding = (nn.Parameter(torch.zeros(config.context_length, config.context_dim))
                               if config.learned_null_context else None)

    def null_context(self, batch: int):
        """The learned null context repeated over the batch: (batch, context_length, context_dim)."""
        return self.null_embedding.expand(batch, -1, -1)

    def forward(self, x, t, context=None, context_mask=None):
        temb = self.time_embedding(timestep_embedding(t, self.config.block_channels[0]))  # (B, time_embed_dim)
        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, context, context_mask, skips)
        h = self.mid_block(h, temb, context, context_mask)
        for block in self.up_blocks:
            h = block(h, temb, context, context_mask, skips)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C_out, H, W)


# --------------------------------------------------------------------------- autoencoder


class ResnetLevel(nn.Module):
    """ResBlocks without time embedding, then an optional Downsample2D / Upsample2D (``resample``)."""

    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, groups: int, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResBlock(in_channels if i == 0 else out_channels, out_channels, None, groups) for i in range(num_resnets)]
        )
        self.resample = resample

    def forward(self, h):
        for resnet in self.resnets:
            h = resnet(h)
        return h if self.resample is None else self.resample(h)


class Encoder(nn.Module):
    """x (B, C_img, H, W) → moments (B, 2·latent_channels, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        ch, n, g = config.block_channels, config.layers_per_block, config.groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            ResnetLevel(ch[max(level - 1, 0)], c, n, g, Downsample2D(c) if level < len(ch) - 1 else None)
            for level, c in enumerate(ch)
        ])
        self.mid_block = ResnetLevel(ch[-1], ch[-1], 1, g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) → x̂ (B, C_img, f·h, f·w)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        ch, n, g = config.block_channels, config.layers_per_block, config.groups
        self.conv_in = nn.Conv2d(config.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = ResnetLevel(ch[-1], ch[-1], 1, g)
        self.up_blocks = nn.ModuleList([
            ResnetLevel(ch[min(level + 1, len(ch) - 1)], ch[level], n, g, Upsample2D(ch[level]) if level > 0 else None)
            for level in reversed(range(len(ch)))  # deepest first
        ])
        self.conv_norm_out = nn.GroupNorm(g, ch[0])
        self.conv_out = nn.Conv2d(ch[0], config.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """encode(x) → (μ, log σ²); decode(z) → x̂; forward(x, ε) → (x̂, μ, log σ²), as tinydiff's."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x):
        moments = self.encoder(x)  # (B, 2·C_lat, h, w)
        mean, raw = moments.chunk(2, dim=1)  # (B, C_lat, h, w) each
        return mean, raw.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x, eps):
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * eps  # the reparameterisation, ε drawn by the caller
        return self.decode(z), mean, logvar

    def decode_from_diffusion(self, z):
        """Images from a diffusion model's latents: decode(z / s)."""
        return self.decode(z / self.config.scaling_factor)


def vae_loss(x, x_hat, mean, logvar, kl_weight: float):
    """mean (x̂ − x)² + β · (1/B) Σ ½ (μ² + σ² − 1 − log σ²), as tinydiff's ``vae_loss``."""
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / x.shape[0]
    return F.mse_loss(x_hat, x) + kl_weight * kl


# --------------------------------------------------------------------------- text encoder


class TextTransformerBlock(nn.Module):
    """x ← x + attn(ln_1 x, padding mask);  x ← x + mlp(ln_2 x)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, None, heads, width // heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = mlp(width, mlp_ratio * width)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask=mask)
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """forward(ids (B, L) int64, mask (B, L) bool) → (hidden (B, L, D), pooled (B, E))."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        d = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, d)
        self.positional_embedding = nn.Parameter(torch.zeros(config.max_length, d))
        self.blocks = nn.ModuleList(
            TextTransformerBlock(d, config.heads, config.mlp_ratio) for _ in range(config.layers)
        )
        self.ln_final = nn.LayerNorm(d)
        self.text_projection = nn.Linear(d, config.projection_dim, bias=False)

    def forward(self, ids, mask):
        batch, length = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding[:length]  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_final(x)
        eos = mask.sum(dim=1) - 1  # (B,) position of <eos>, the last real token
        pooled = self.text_projection(x[torch.arange(batch), eos])  # (B, D) → (B, E)
        return x * mask[:, :, None].to(x.dtype), pooled  # padded positions zeroed


# --------------------------------------------------------------------------- from tinydiff


# --------------------------------------------------------------------------- DiT (MMDiT joint blocks)


def adaptive_layer_norm(x, shift, scale):
    """LN(x) ⊙ (1 + γ) + β, LN without affine (eps 1e-6); shift and scale (B, D) over the tokens."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None, :]) + shift[:, None, :]


class JointAttention(Attention):
    """Self-attention over [image tokens; text tokens], each stream with its own projections."""

    def __init__(self, dim: int, heads: int, context_pre_only: bool):
        super().__init__(dim, None, heads, dim // heads)
        self.add_q_proj = None if context_pre_only else nn.Linear(dim, dim, bias=False)
        self.add_k_proj = nn.Linear(dim, dim, bias=False)
        self.add_v_proj = nn.Linear(dim, dim, bias=False)
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)

    def forward(self, x, context, mask=None):
        n = x.shape[1]
        k = torch.cat([self._split_heads(self.to_k(x)), self._split_heads(self.add_k_proj(context))], dim=2)
        v = torch.cat([self._split_heads(self.to_v(x)), self._split_heads(self.add_v_proj(context))], dim=2)
        q = self._split_heads(self.to_q(x))  # (B, h, N, d)
        if self.add_q_proj is not None:
            q = torch.cat([q, self._split_heads(self.add_q_proj(context))], dim=2)  # (B, h, N + L, d)
        if mask is not None:  # image keys are always real
            mask = torch.cat([torch.ones(mask.shape[0], n, dtype=torch.bool), mask], dim=1)  # (B, N + L)
        o = masked_attention(q, k, v, mask)
        b, _, length, _ = o.shape
        o = o.transpose(1, 2).reshape(b, length, self.heads * self.dim_head)  # (B, queries, D)
        return self.to_out(o[:, :n]), (None if self.to_add_out is None else self.to_add_out(o[:, n:]))


class JointTransformerBlock(nn.Module):
    """adaLN-Zero per stream, one joint attention, an MLP per stream (SD3's MMDiT block)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, context_pre_only: bool):
        super().__init__()
        self.adaLN_modulation = nn.Linear(dim, 6 * dim)
        self.attn = JointAttention(dim, heads, context_pre_only)
        self.ff = mlp(dim, mlp_ratio * dim)
        self.adaLN_modulation_context = nn.Linear(dim, (2 if context_pre_only else 6) * dim)
        self.ff_context = None if context_pre_only else mlp(dim, mlp_ratio * dim)

    def forward(self, x, context, c_act, mask):
        mx = self.adaLN_modulation(c_act).chunk(6, dim=1)  # β₁ γ₁ α₁ β₂ γ₂ α₂, each (B, D)
        mc = self.adaLN_modulation_context(c_act).chunk(2 if self.ff_context is None else 6, dim=1)
        ax, ac = self.attn(adaptive_layer_norm(x, mx[0], mx[1]), adaptive_layer_norm(context, mc[0], mc[1]), mask)
        x = x + mx[2][:, None, :] * ax
        x = x + mx[5][:, None, :] * self.ff(adaptive_layer_norm(x, mx[3], mx[4]))
        if self.ff_context is None:
            return x, None
        context = context + mc[2][:, None, :] * ac
        return x, context + mc[5][:, None, :] * self.ff_context(adaptive_layer_norm(context, mc[3], mc[4]))


class DiT(nn.Module):
    """forward(x (B, C, H, W), t (B,), context (B, L, D_ctx), context_mask (B, L) or None)
    → (B, C_out, H, W), as ``tinydiff.models.DiT`` (text-conditional configs only)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.context_dim is None:
            raise ValueError("the PyTorch DiT twin mirrors text-conditional DiTs only")
        self.config = config
        d, p = config.width, config.patch_size
        self.patch_embed = nn.Linear(config.in_channels * p * p, d)
        self.time_embedding = TimestepEmbedding(config.timestep_dim, d)
        self.context_embedder = nn.Linear(config.context_dim, d)
        self.pooled_text_embedding = TimestepEmbedding(config.context_dim, d)
        self.blocks = nn.ModuleList([JointTransformerBlock(d, config.heads, config.mlp_ratio, i == config.depth - 1)
                                     for i in range(config.depth)])
        self.norm_out = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, p * p * config.out_channels)
        self.null_embedding = (nn.Parameter(torch.zeros(config.context_length, config.context_dim))
                               if config.learned_null_context else None)

    def null_context(self, batch: int):
        return self.null_embedding.expand(batch, -1, -1)

    def forward(self, x, t, context, context_mask=None):
        cfg, p = self.config, self.config.patch_size
        b, c, height, width = x.shape
        gh, gw = height // p, width // p
        tokens = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
        tokens = tokens.reshape(b, gh * gw, c * p * p)  # (B, N, C·p·p)
        rows = torch.arange(gh, dtype=x.dtype).repeat_interleave(gw)  # token n → its row i
        cols = torch.arange(gw, dtype=x.dtype).repeat(gh)  # token n → its column j
        pos = torch.cat([timestep_embedding(cols, cfg.width // 2), timestep_embedding(rows, cfg.width // 2)], dim=1)
        h = self.patch_embed(tokens) + pos  # (B, N, D)
        keep = (torch.ones(context.shape[:2], dtype=x.dtype) if context_mask is None
                else context_mask.to(x.dtype))  # (B, L)
        pooled = (context * (keep / keep.sum(1, keepdim=True).clamp(min=1))[:, :, None]).sum(1)  # masked mean
        c_act = F.silu(self.time_embedding(timestep_embedding(t, cfg.timestep_dim))
                       + self.pooled_text_embedding(pooled))  # SiLU(c) (B, D)
        ctx = self.context_embedder(context)  # (B, L, D)
        for block in self.blocks:
            h, ctx = block(h, ctx, c_act, context_mask)
        shift, scale = self.norm_out(c_act).chunk(2, dim=1)
        out = self.proj_out(adaptive_layer_norm(h, shift, scale))  # (B, N, p·p·C_out)
        out = out.reshape(b, gh, gw, cfg.out_channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p)
        return out.reshape(b, cfg.out_channels, height, width)


def mirror(tiny_model) -> nn.Module:
    """The PyTorch twin of a tinydiff UNet, DiT, AutoencoderKL or TextEncoder, with its weights copied
    and in its dtype (float32 or float64)."""
    import tinydiff.models as tm  # tinydiff's classes share the names of the ones above
    from tinydiff.models import dit as tiny_dit

    twins = {tm.UNet: UNet, tiny_dit.DiT: DiT, tm.AutoencoderKL: AutoencoderKL, tm.TextEncoder: TextEncoder}
    twin = twins.get(type(tiny_model))
    if twin is None:
        raise TypeError(f"no PyTorch mirror for {type(tiny_model).__name__}; known: "
                        + ", ".join(cls.__name__ for cls in twins))
    state = {k: torch.from_numpy(to_numpy(v).copy()) for k, v in tiny_model.state_dict().items()}
    model = twin(tiny_model.config).to(next(iter(state.values())).dtype)
    model.load_state_dict(state)  # strict: any name or shape that differs is an error
    return model
