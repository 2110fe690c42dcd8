"""The U-Net's building blocks, each with a hand-written backward that calls its children's
backward in reverse order.

* ``ResBlock`` (diffusers ``ResnetBlock2D``) — two 3×3 convolutions with the time embedding added
  in between, and a residual connection::

        x ─┬─ GroupNorm → SiLU → conv1 ──(+)── GroupNorm → SiLU → conv2 ──(+)─► out
           │                              ▲                               ▲
           │      temb → SiLU → time_emb_proj (B, C_out) → (B, C_out, 1, 1)
           └──────────────── conv_shortcut (1×1, only if C_in ≠ C_out) ──┘

* ``TransformerBlock`` (diffusers ``BasicTransformerBlock``) on a token sequence (B, L, D)::

        h = x + attn1(norm1(x))                      self-attention: pixels look at pixels
        h = h + attn2(norm2(h), context, mask)       cross-attention: pixels look at the words
        out = h + ff(norm3(h))                       MLP Linear → GELU → Linear (4× wide)

  The cross-attention exists only when the model is conditional (``context_dim`` set) and is
  skipped when a forward pass gets no context.
* ``SpatialTransformer`` (diffusers ``Transformer2DModel`` with linear projections) wraps a
  transformer block around a feature map: GroupNorm → pixels as tokens → proj_in → blocks →
  proj_out → back to a map → + input.
* ``Downsample2D`` (3×3 conv, stride 2) and ``Upsample2D`` (nearest 2× then 3×3 conv).

Backward conventions: ``ResBlock.backward`` returns (dx, dtemb) and
``SpatialTransformer.backward`` returns (dx, dcontext) with dcontext None when no context was
used. The U-Net sums the dtemb of every ResBlock and the dcontext of every cross-attention.
"""

from __future__ import annotations

from ..nn import (GELU, Attention, Conv2d, GroupNorm, LayerNorm, Linear, Module, ModuleList, Sequential, SiLU, Upsample,
                  group_norm_silu)


def add_grads(total, grad):
    """``total + grad`` where either may be None (None: no gradient has reached the tensor yet)."""
    if total is None:
        return grad
    if grad is None:
        return total
    return total + grad


def residual(branch, skip):
    """``branch + skip``, summed into ``branch``: for a branch that is a layer's new output (no
    cache holds it), so a residual connection costs no new array. Returns ``branch``."""
    branch += skip
    return branch


class ResBlock(Module):
    """ResBlock(in_channels, out_channels, temb_channels, groups).

    forward(x (B, C_in, H, W), temb (B, temb_channels)) → (B, C_out, H, W);
    backward(dout) → (dx, dtemb).
    ``temb_channels=None`` builds no time projection (the autoencoder's blocks): forward(x) takes
    no temb and backward returns (dx, None).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, *, generator=None):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = GroupNorm(groups, in_channels)
        self.act1 = SiLU()
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, generator=generator)
        self.time_act = SiLU() if temb_channels is not None else None
        self.time_emb_proj = Linear(temb_channels, out_channels, generator=generator) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups, out_channels)
        self.act2 = SiLU()
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, generator=generator)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, generator=generator)
                              if in_channels != out_channels else None)

    def forward(self, x, temb=None):
        if (temb is None) != (self.time_emb_proj is None):
            built = "without" if self.time_emb_proj is None else "with"
            raise ValueError(f"this ResBlock was built {built} a time embedding (temb_channels) but got "
                             f"temb={None if temb is None else tuple(temb.shape)}")
        h = self.conv1(group_norm_silu(self.norm1, self.act1, x))  # act1(norm1(x)): (B, C_out, H, W)
        if temb is not None:
            shift = self.time_emb_proj(self.time_act(temb))  # (B, C_out): one number per channel
            h += shift[:, :, None, None]  # (B, C_out, 1, 1) broadcast over H, W; h is conv1's new output
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return residual(self.conv2(group_norm_silu(self.norm2, self.act2, h)), skip)

    def backward(self, dout):
        # The residual sum sends dout unchanged down both branches.
        dh = self.norm2.backward(self.act2.backward(self.conv2.backward(dout)))
        # The shift was broadcast over H and W, so its gradient is dh summed over them.
        dtemb = None if self.time_emb_proj is None else self.time_act.backward(
            self.time_emb_proj.backward(dh.sum(axis=(2, 3))))
        dx = self.norm1.backward(self.act1.backward(self.conv1.backward(dh)))
        dskip = dout if self.conv_shortcut is None else self.conv_shortcut.backward(dout)
        return residual(dx, dskip), dtemb


class TransformerBlock(Module):
    """Pre-norm transformer block on tokens (B, L, dim): self-attention, cross-attention, MLP.

    ``context_dim=None`` builds no cross-attention (an unconditional model).
    forward(x, context=None, mask=None) → (B, L, dim); backward(dout) → (dx, dcontext or None).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, *, generator=None):
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head, generator=generator)
        if context_dim is not None:
            self.norm2 = LayerNorm(dim)
            self.attn2 = Attention(dim, context_dim, heads, dim_head, generator=generator)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = LayerNorm(dim)
        self.ff = Sequential([Linear(dim, 4 * dim, generator=generator), GELU(), Linear(4 * dim, dim, generator=generator)])

    def forward(self, x, context=None, mask=None):
        if context is not None and self.attn2 is None:
            raise ValueError("this transformer block has no cross-attention (built with context_dim=None)")
        h = residual(self.attn1(self.norm1(x)), x)
        used_context = context is not None
        if used_context:
            h = residual(self.attn2(self.norm2(h), context, mask), h)
        self._keep(used_context)
        return residual(self.ff(self.norm3(h)), h)

    def backward(self, dout):
        used_context = self._take()
        # Each "h = h + f(norm(h))" passes its gradient straight through and through f ∘ norm.
        dh = residual(self.norm3.backward(self.ff.backward(dout)), dout)
        dcontext = None
        if used_context:
            dq, dcontext = self.attn2.backward(dh)
            dh = residual(self.norm2.backward(dq), dh)
        return residual(self.norm1.backward(self.attn1.backward(dh)), dh), dcontext


class SpatialTransformer(Module):
    """Transformer over the pixels of a feature map, with a residual connection around it.

    The attention width is inner = heads · dim_head; proj_in/proj_out are Linear layers on the
    tokens (Stable Diffusion 2's ``use_linear_projection``).
    forward(x (B, C, H, W), context (B, Lc, context_dim) or None, mask (B, Lc) or None)
    → (B, C, H, W); backward(dout) → (dx, dcontext or None).
    """

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int | None, groups: int, *,
                 generator=None):
        inner = heads * dim_head
        self.norm = GroupNorm(groups, channels)
        self.proj_in = Linear(channels, inner, generator=generator)
        self.transformer_blocks = ModuleList([TransformerBlock(inner, heads, dim_head, context_dim, generator=generator)])
        self.proj_out = Linear(inner, channels, generator=generator)

    def forward(self, x, context=None, mask=None):
        b, c, h, w = x.shape
        tokens = self.norm(x).transpose(0, 2, 3, 1).reshape(b, h * w, c)  # (B, C, H, W) → (B, HW, C)
        tokens = self.proj_in(tokens)  # (B, HW, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, mask)
        tokens = self.proj_out(tokens)  # (B, HW, C)
        self._keep(x.shape)
        return x + tokens.reshape(b, h, w, c).transpose(0, 3, 1, 2)  # (B, HW, C) → (B, C, H, W)

    def backward(self, dout):
        b, c, h, w = self._take()
        dtokens = dout.transpose(0, 2, 3, 1).reshape(b, h * w, c)  # (B, C, H, W) → (B, HW, C)
        dtokens = self.proj_out.backward(dtokens)  # (B, HW, inner)
        dcontext = None
        for block in reversed(self.transformer_blocks):
            dtokens, dc = block.backward(dtokens)
            dcontext = add_grads(dcontext, dc)
        dtokens = self.proj_in.backward(dtokens)  # (B, HW, C)
        dnorm = dtokens.reshape(b, h, w, c).transpose(0, 3, 1, 2)  # (B, HW, C) → (B, C, H, W)
        return residual(self.norm.backward(dnorm), dout), dcontext  # residual: dout reaches x directly too


class Downsample2D(Module):
    """Halve H and W with a learned 3×3 convolution of stride 2 (padding 1)."""

    def __init__(self, channels: int, *, generator=None):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1, generator=generator)

    def forward(self, x):
        return self.conv(x)

    def backward(self, dout):
        return self.conv.backward(dout)


class Upsample2D(Module):
    """Double H and W: nearest-neighbour 2× (no parameters), then a 3×3 convolution to smooth."""

    def __init__(self, channels: int, *, generator=None):
        self.upsample = Upsample(scale_factor=2, mode="nearest")
        self.conv = Conv2d(channels, channels, 3, padding=1, generator=generator)

    def forward(self, x):
        return self.conv(self.upsample(x))

    def backward(self, dout):
        return self.upsample.backward(self.conv.backward(dout))
