"""The denoising U-Net of Stable Diffusion, in miniature, with its backward pass written by hand.

Given a noisy image (or latent) x, its timestep t and optionally a context sequence (the text
encoder's token states), the U-Net predicts something the size of x (the noise ε, v or x0). With
the default config (3 levels of 16, 32, 64 channels, one ResBlock per level going down, two
coming up, transformers at the 8×8 level and in the middle):

    t ─► sinusoids ─► time MLP ─► temb (into every Res)     context ─► every Tf (cross-attention)

      x ─► conv_in ────────────── s0 ─────────────────────────────────────────────┐
    32×32  Res ────────────────── s1 ──────────────────────────────────────────► [cat→Res] ×2 ─► out
           Downsample ─────────── s2 ───────────────────────────┐                 ▲
    16×16  Res ────────────────── s3 ────────────────────────► [cat→Res] ×2 ─► Upsample
           Downsample ─────────── s4 ──────┐                    ▲
     8×8   Res→Tf ─────────────── s5 ───► [cat→Res→Tf] ×2 ─► Upsample
             │                             ▲
             └─► mid: Res→Tf→Res ──────────┘

"Res" is a ResBlock, "Tf" a SpatialTransformer (self-attention, cross-attention to the context,
MLP); see blocks.py. Every output of the down path is pushed onto a stack of skips s0, s1, …; each
ResBlock of the up path pops one and concatenates it to its input along the channels (the last one
pushed is the first popped: the 8×8 level takes s5 then s4, the 16×16 level s3, s2, the 32×32
level s1, s0), which is why the up path has one ResBlock more per level. The output ("out") is
GroupNorm → SiLU → conv_out.

Backward runs the same graph in reverse. Three kinds of gradient are summed by hand:

* skips: each up-path ResBlock's input gradient is split into the part for the path below and
  the part for its skip, kept on a list ``dskips`` that ends up in push order; the down path pops
  them and ADDS each to the gradient flowing back into the tensor that was pushed;
* time: every ResBlock returns dtemb; their sum flows back through the time MLP (t gets none);
* context: every cross-attention returns dcontext; their sum is returned to the caller (the text
  encoder's backward, or ``null_context_backward`` for classifier-free guidance).

Attribute names follow diffusers' UNet2DConditionModel (``down_blocks.1.resnets.0.conv1.weight``,
``mid_block.attentions.0...``, ``up_blocks``, ``conv_norm_out``, ``conv_out``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..backend import DEFAULT_DTYPE, get_xp, rng, to_device
from ..config import ConfigMixin
from ..nn import Conv2d, GroupNorm, Module, ModuleList, Parameter, SiLU, group_norm_silu, is_grad_enabled
from .blocks import Downsample2D, ResBlock, SpatialTransformer, TransformerBlock, Upsample2D, add_grads
from .embeddings import TimestepEmbedding, guidance_embedding, timestep_embedding


@dataclass
class UNetConfig(ConfigMixin):
    """Everything that decides the network's shape; saved as JSON beside the weights.

    The defaults are the unconditional 32×32 pixel model. A text-conditional model on 4×8×8
    latents is e.g. ``UNetConfig(in_channels=4, out_channels=4, sample_size=8,
    block_channels=(32, 64), attention_levels=(False, True), context_dim=64, context_length=16,
    learned_null_context=True)``.
    """

    in_channels: int = 1  # channels of the noisy input: 1 for 32×32 MNIST pixels, 4 for 4×8×8 latents
    out_channels: int = 1  # channels of the prediction (ε, v and x0 all have the input's shape)
    sample_size: int = 32  # H = W the model is trained and sampled at (it accepts other valid sizes)
    block_channels: tuple[int, ...] = (16, 32, 64)  # channels per level; each level halves H, W (32², 16², 8²)
    layers_per_block: int = 1  # ResBlocks per level going down (going up: one more, as in SD)
    attention_levels: tuple[bool, ...] = (False, False, True)  # levels with a transformer after each ResBlock
    context_dim: int | None = None  # None: unconditional; else the width D of the context (B, L, D)
    context_length: int | None = None  # L of the learned null context (the text encoder's token count)
    learned_null_context: bool = False  # learn a (context_length, context_dim) "no prompt" context for CFG
    heads: int = 4  # attention heads in every transformer
    dim_head: int = 16  # features per head: transformers run at heads · dim_head = 64 features
    groups: int = 8  # GroupNorm groups; must divide every channel count (SD: 32 groups, ≥ 320 channels)
    time_embed_dim: int = 64  # width of the time MLP (4 × block_channels[0], as in SD)
    guidance_embedding: bool = False  # a consistency-distilled student: forward also takes w (B,) (embeddings.py)

    def __post_init__(self):
        self.block_channels = tuple(int(c) for c in self.block_channels)  # JSON gives lists
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        levels = len(self.block_channels)
        problems = []
        if levels == 0 or len(self.attention_levels) != levels:
            problems.append(f"block_channels {self.block_channels} and attention_levels {self.attention_levels} "
                            "must be non-empty and of equal length")
        if self.layers_per_block < 1:
            problems.append(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if any(c % self.groups for c in self.block_channels):
            problems.append(f"groups={self.groups} must divide every entry of block_channels {self.block_channels}")
        if levels and self.block_channels[0] % 2:
            problems.append(f"block_channels[0]={self.block_channels[0]} must be even (the sinusoid width)")
        if levels and self.sample_size % 2 ** (levels - 1):
            problems.append(f"sample_size={self.sample_size} must be a multiple of 2^(levels-1) = {2 ** (levels - 1)}")
        if self.learned_null_context and (self.context_dim is None or not self.context_length):
            problems.append("learned_null_context needs context_dim and a positive context_length")
        if problems:
            raise ValueError("invalid UNetConfig: " + "; ".join(problems))


class _ResAttnBlock(Module):
    """Shared by the down and up blocks: layer i is ``resnets[i]`` then, at attention levels,
    ``attentions[i]``. The helpers return the gradients (dh, dtemb, dcontext) of one layer."""

    def _build(self, config: UNetConfig, in_channels: list[int], out_channels: int, attention: bool, generator):
        tc = config.time_embed_dim
        self.resnets = ModuleList([ResBlock(c, out_channels, tc, config.groups, generator=generator) for c in in_channels])
        self.attentions = ModuleList(
            [SpatialTransformer(out_channels, config.heads, config.dim_head, config.context_dim, config.groups,
                                generator=generator)
             for _ in in_channels] if attention else []
        )

    def _layer(self, i, h, temb, context, mask):
        h = self.resnets[i](h, temb)
        if self.attentions:
            h = self.attentions[i](h, context, mask)
        return h

    def _layer_backward(self, i, dh):
        dcontext = None
        if self.attentions:
            dh, dcontext = self.attentions[i].backward(dh)
        dh, dtemb = self.resnets[i].backward(dh)
        return dh, dtemb, dcontext


class DownBlock(_ResAttnBlock):
    """One level going down: layers_per_block × (Res[→Tf]), then Downsample except at the last level.
    Every output (each layer's and the downsample's) is pushed onto the skip stack."""

    def __init__(self, config: UNetConfig, in_channels: int, out_channels: int, attention: bool, downsample: bool, *,
                 generator=None):
        n = config.layers_per_block
        self._build(config, [in_channels] + [out_channels] * (n - 1), out_channels, attention, generator)
        self.downsamplers = ModuleList([Downsample2D(out_channels, generator=generator)] if downsample else [])
        self.skip_channels = [out_channels] * (n + len(self.downsamplers))  # channels of what it pushes

    def forward(self, h, temb, context, mask, skips: list):
        for i in range(len(self.resnets)):
            h = self._layer(i, h, temb, context, mask)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)  # (B, C, H, W) → (B, C, H/2, W/2)
            skips.append(h)
        return h

    def backward(self, dh, dskips: list):
        """dskips: skip gradients in push order; pops its own from the end. → (dh, dtemb, dcontext)."""
        dtemb = dcontext = None
        for down in reversed(self.downsamplers):
            dh = down.backward(dh + dskips.pop())  # the pushed tensor also fed the path below: add
        for i in reversed(range(len(self.resnets))):
            dh, dt, dc = self._layer_backward(i, dh + dskips.pop())
            dtemb, dcontext = add_grads(dtemb, dt), add_grads(dcontext, dc)
        return dh, dtemb, dcontext


class UpBlock(_ResAttnBlock):
    """One level going up: one layer per popped skip, cat(h, skip) → Res[→Tf], then Upsample
    except at the last (full-resolution) level."""

    def __init__(self, config: UNetConfig, in_channels: int, skip_channels: list[int], out_channels: int,
                 attention: bool, upsample: bool, *, generator=None):
        self.skip_channels = skip_channels  # channels of the skips it pops, in pop order
        ins = [(in_channels if i == 0 else out_channels) + c for i, c in enumerate(skip_channels)]
        self._build(config, ins, out_channels, attention, generator)
        self.upsamplers = ModuleList([Upsample2D(out_channels, generator=generator)] if upsample else [])

    def forward(self, h, temb, context, mask, skips: list):
        xp = get_xp(h)
        for i in range(len(self.resnets)):
            h = xp.concatenate([h, skips.pop()], axis=1)  # (B, C_h + C_skip, H, W)
            h = self._layer(i, h, temb, context, mask)
        for up in self.upsamplers:
            h = up(h)  # (B, C, H, W) → (B, C, 2H, 2W)
        return h

    def backward(self, dh, dskips: list):
        """Appends the gradient of each popped skip to dskips (in reverse pop order = push order).
        → (dh, dtemb, dcontext)."""
        dtemb = dcontext = None
        for up in reversed(self.upsamplers):
            dh = up.backward(dh)
        for i in reversed(range(len(self.resnets))):
            dcat, dt, dc = self._layer_backward(i, dh)
            dtemb, dcontext = add_grads(dtemb, dt), add_grads(dcontext, dc)
            c_skip = self.skip_channels[i]
            dh, dskip = dcat[:, :-c_skip], dcat[:, -c_skip:]  # undo the concatenation along channels
            dskips.append(dskip)
        return dh, dtemb, dcontext


class MidBlock(Module):
    """The bottleneck at the lowest resolution: Res → Tf → Res."""

    def __init__(self, config: UNetConfig, channels: int, *, generator=None):
        tc, g = config.time_embed_dim, config.groups
        self.resnets = ModuleList([ResBlock(channels, channels, tc, g, generator=generator),
                                   ResBlock(channels, channels, tc, g, generator=generator)])
        self.attentions = ModuleList([SpatialTransformer(channels, config.heads, config.dim_head, config.context_dim, g,
                                                         generator=generator)])

    def forward(self, h, temb, context, mask):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context, mask)
        return self.resnets[1](h, temb)

    def backward(self, dh):
        dh, dtemb_1 = self.resnets[1].backward(dh)
        dh, dcontext = self.attentions[0].backward(dh)
        dh, dtemb_0 = self.resnets[0].backward(dh)
        return dh, dtemb_0 + dtemb_1, dcontext


def _twice(a):
    """a (B, ...) stacked on itself: (2B, ...), both halves of classifier-free guidance."""
    return get_xp(a).concatenate([a, a])



def check_context(model: str, context_dim: int | None, batch: int, context, context_mask) -> None:
    """The checks every denoiser makes of its prompt input (``model`` names it in the messages):
    a context (B, L, context_dim) only for a conditional model, a bool mask (B, L) only with one."""
    if context is not None:
        if context_dim is None:
            raise ValueError(f"this {model} is unconditional (context_dim=None) but got a context; "
                             f"build it with {model}Config(context_dim=...) to condition on one")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != context_dim:
            raise ValueError(f"{model} expects context of shape (B={batch}, L, context_dim={context_dim}), "
                             f"got {tuple(context.shape)}")
    if context_mask is not None:
        if context is None:
            raise ValueError("context_mask given without a context")
        if context_mask.dtype != bool or tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"context_mask must be a bool array of shape {tuple(context.shape[:2])}, "
                             f"got {context_mask.dtype} {tuple(context_mask.shape)}")

class UNet(Module):
    """UNet(config, seed=0): see the module docstring. The initial weights are drawn from a
    generator made from ``seed`` (or from ``generator``, when a larger model passes its own).

    forward(x (B, C_in, H, W), t (B,) floats or one scalar, context (B, L, context_dim) or None,
    context_mask (B, L) bool (True = a real token) or None, w (B,) or one scalar: the guidance
    scale, required with ``guidance_embedding`` and refused without) → (B, C_out, H, W).
    backward(dout) → (dx, dcontext), dcontext None without context; parameter grads are added (+=),
    the guidance projection's included (w itself gets no gradient).
    """

    def __init__(self, config: UNetConfig, seed: int = 0, *, generator=None):
        gen = rng(seed) if generator is None else generator  # the initial weights depend on the seed only
        self.config = config
        chans, levels = config.block_channels, len(config.block_channels)
        cond_dim = chans[0] if config.guidance_embedding else None  # w's sinusoids: as wide as t's
        self.time_embedding = TimestepEmbedding(chans[0], config.time_embed_dim, cond_dim=cond_dim, generator=gen)
        self.conv_in = Conv2d(config.in_channels, chans[0], 3, padding=1, generator=gen)
        skip_channels = [chans[0]]  # conv_in's output is the first skip
        self.down_blocks = ModuleList()
        for level, out_ch in enumerate(chans):
            block = DownBlock(config, chans[max(level - 1, 0)], out_ch, config.attention_levels[level], level < levels - 1,
                              generator=gen)
            skip_channels += block.skip_channels
            self.down_blocks.append(block)
        self.mid_block = MidBlock(config, chans[-1], generator=gen)
        self.up_blocks = ModuleList()
        for level in reversed(range(levels)):
            pops = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            in_ch = chans[min(level + 1, levels - 1)]  # what the level below (or the mid block) outputs
            self.up_blocks.append(UpBlock(config, in_ch, pops, chans[level], config.attention_levels[level], level > 0,
                                          generator=gen))
        self.conv_norm_out = GroupNorm(config.groups, chans[0])
        self.conv_act = SiLU()
        self.conv_out = Conv2d(chans[0], config.out_channels, 3, padding=1, generator=gen)
        self.null_embedding = None
        if config.learned_null_context:
            shape = (config.context_length, config.context_dim)  # small random start, like GPT-2's embeddings
            self.null_embedding = Parameter(to_device(0.02 * gen.standard_normal(shape), dtype=DEFAULT_DTYPE))

    # -- forward and backward --------------------------------------------------------------
    def forward(self, x, t, context=None, context_mask=None, w=None):
        t = self._check_inputs(x, t, context, context_mask)
        width = self.config.block_channels[0]
        cond = None if w is None else guidance_embedding(self._per_sample(w, x, "w"), width)  # (B, width)
        if self.config.guidance_embedding and cond is None:
            raise ValueError("this UNet was distilled with a guidance embedding: pass the guidance scale w (B,)")
        if cond is not None and not self.config.guidance_embedding:
            raise ValueError("this UNet has no guidance embedding (UNetConfig.guidance_embedding=False); "
                             "leave w out and use classifier-free guidance")
        half = self._guidance_halves(x, t, w)
        if half:  # until a block reads the context, both halves compute the same numbers: run the first only
            x, t = x[:half], t[:half]
        temb = self.time_embedding(timestep_embedding(t, width), cond)  # (B, time_embed_dim)
        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            if half and block.attentions:  # the first block that reads the context: from here on, both halves
                h, temb, skips, half = _twice(h), _twice(temb), [_twice(s) for s in skips], 0
            h = block(h, temb, context, context_mask, skips)
        if half:
            h, temb, skips = _twice(h), _twice(temb), [_twice(s) for s in skips]
        h = self.mid_block(h, temb, context, context_mask)
        for block in self.up_blocks:
            h = block(h, temb, context, context_mask, skips)
        return self.conv_out(group_norm_silu(self.conv_norm_out, self.conv_act, h))  # (B, C_out, H, W)

    def backward(self, dout):
        dh = self.conv_norm_out.backward(self.conv_act.backward(self.conv_out.backward(dout)))
        dskips = []  # gradients of s0, s1, … (filled by the up path, emptied by the down path)
        dtemb = dcontext = None  # sums over every ResBlock / every cross-attention
        for block in reversed(self.up_blocks):
            dh, dt, dc = block.backward(dh, dskips)
            dtemb, dcontext = add_grads(dtemb, dt), add_grads(dcontext, dc)
        dh, dt, dc = self.mid_block.backward(dh)
        dtemb, dcontext = add_grads(dtemb, dt), add_grads(dcontext, dc)
        for block in reversed(self.down_blocks):
            dh, dt, dc = block.backward(dh, dskips)
            dtemb, dcontext = add_grads(dtemb, dt), add_grads(dcontext, dc)
        dx = self.conv_in.backward(dh + dskips.pop())  # s0 = conv_in's output, the last one left
        self.time_embedding.backward(dtemb)  # fills the time MLP's (and w's projection's) grads; t, w get none
        return dx, dcontext

    @staticmethod
    def _guidance_halves(x, t, w) -> int:
        """Classifier-free guidance runs every image twice in one call, [unconditional; conditional]
        (diffusion.denoiser): the same x and t, another context. In inference, when the rows come
        in two such halves, the number of rows in a half, else 0."""
        half = x.shape[0] // 2
        if is_grad_enabled() or w is not None or half == 0 or x.shape[0] % 2:
            return 0
        return half if bool((x[:half] == x[half:]).all() and (t[:half] == t[half:]).all()) else 0

    def _check_inputs(self, x, t, context, context_mask):
        """Clear errors for inputs the network cannot take; returns t as a (B,) array of x's dtype."""
        cfg = self.config
        xp = get_xp(x, t, context, context_mask)  # mixed NumPy/CuPy arrays → clear error
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet expects x of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, height, width = x.shape
        factor = 2 ** (len(cfg.block_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"UNet with {len(cfg.block_channels)} levels halves H and W {len(cfg.block_channels) - 1} "
                             f"times: they must be multiples of {factor}, got {height}×{width}")
        check_context("UNet", cfg.context_dim, b, context, context_mask)
        return self._per_sample(t, x, "timesteps t")

    @staticmethod
    def _per_sample(value, x, what: str):
        """A scalar or (B,) input as a (B,) array of x's dtype, or a clear error."""
        xp, b = get_xp(x, value), x.shape[0]
        value = xp.asarray(value, dtype=x.dtype)
        if value.ndim == 0:
            value = xp.full((b,), value, dtype=x.dtype)  # one value for the whole batch
        if tuple(value.shape) != (b,):
            raise ValueError(f"UNet expects {what} of shape (B={b},) or a scalar, got {tuple(value.shape)}")
        return value

    # -- classifier-free guidance: the learned "no prompt" context ------------------------------
    def null_context(self, batch: int):
        """The learned null context repeated over the batch: (batch, context_length, context_dim)."""
        if self.null_embedding is None:
            raise ValueError(f"this {type(self).__name__} has no learned null context; build it with learned_null_context=True")
        xp = get_xp(self.null_embedding.data)
        return xp.broadcast_to(self.null_embedding.data, (batch,) + self.null_embedding.shape).copy()

    def replace_with_null_context(self, context, context_mask, dropped):
        """Condition dropout: rows where ``dropped`` (B,) is True get the null context, and a mask
        of all-True (every null token is real). → (context, context_mask); context_mask may be None."""
        xp = get_xp(context)
        null = self.null_context(context.shape[0])  # (B, L, D)
        if context.shape != null.shape:
            raise ValueError(f"context of shape {tuple(context.shape)} cannot be replaced by the null context "
                             f"of shape {tuple(null.shape)}: context_length must equal the text length")
        context = xp.where(dropped[:, None, None], null, context)  # (B,) → (B, 1, 1) broadcast
        if context_mask is not None:
            context_mask = context_mask | dropped[:, None]  # (B,) → (B, 1) broadcast over tokens
        return context, context_mask

    def null_context_backward(self, dcontext, dropped=None):
        """Add the gradient of the rows that used the null context (``dropped``, (B,) bool; None =
        all rows) into the null embedding's grad. Returns dcontext with those rows zeroed: what
        remains for the text encoder."""
        xp = get_xp(dcontext)
        if dropped is None:
            dropped = xp.ones(dcontext.shape[0], dtype=bool)
        # Every row was a copy of the one parameter, so its gradient is the sum over those rows.
        self.null_embedding.accumulate(dcontext[dropped].sum(axis=0), "null_embedding")
        return xp.where(dropped[:, None, None], 0, dcontext)

    # -- attention maps ------------------------------------------------------------------------
    def set_attention_callback(self, fn, kind: str = "cross") -> None:
        """Call ``fn(name, probs)`` on every forward of each cross- (or self-) attention layer, with
        probs (B, heads, H·W, L) and name e.g. 'down_blocks.1.attentions.0.transformer_blocks.0.attn2'.
        ``fn=None`` removes the callbacks."""
        if kind not in ("cross", "self"):
            raise ValueError(f"kind must be 'cross' or 'self', got {kind!r}")
        attr = "attn2" if kind == "cross" else "attn1"
        layers = [(f"{name}.{attr}", getattr(m, attr)) for name, m in self.named_modules()
                  if isinstance(m, TransformerBlock) and getattr(m, attr) is not None]
        if not layers:
            raise ValueError("this UNet has no cross-attention layers (it was built with context_dim=None)")
        for name, layer in layers:
            layer.probs_callback = None if fn is None else functools.partial(fn, name)

    @property
    def has_attention_callbacks(self) -> bool:
        """Whether an attention callback is set: callers that split a batch over threads
        (``pipeline``) then make one call, so the callback sees whole batches, in order."""
        return any(getattr(m, "probs_callback", None) is not None for m in self.modules())
