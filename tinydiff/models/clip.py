"""A miniature CLIP: a text encoder and an image encoder trained to agree (Radford et al. 2021).

Both encoders map their input into one shared E-dimensional space. Training (``train/clip.py``)
pulls each image's embedding towards its own caption's and away from the other captions in the
batch, with the symmetric InfoNCE loss of ``tinydiff.nn.info_nce_loss``:

    u_i = f(image_i)/‖f(image_i)‖,   w_j = g(caption_j)/‖g(caption_j)‖,   s = min(e^{log s}, 100)
    logits_ij = s · u_i·w_j,         L = ½ [CE(logits, diag) + CE(logitsᵀ, diag)]

Text encoder g (a pre-LayerNorm transformer, Vaswani et al. 2017 with GPT-2/CLIP's placement
of the norms):

    x⁰ = E_tok[ids] + P                                  (B, L, D)  token + learned positions
    xˡ' = xˡ⁻¹ + Attn(LN(xˡ⁻¹), padding mask)            each of the ``layers`` blocks
    xˡ  = xˡ' + W₂ GELU(W₁ LN(xˡ') + b₁) + b₂
    h   = LN_final(x^layers)                             (B, L, D)  per-token hidden states
    g   = h[b, eos_b] W_projᵀ                            (B, E)     pooled at <eos>, projected

``h`` is what the U-Net cross-attends to (Stable Diffusion uses CLIP's last hidden state the
same way); positions after <eos> (padding) are set to 0 in ``h`` so nothing downstream can
depend on the pad tokens. Unlike CLIP we use no causal mask: every real token sees every other
real token, and padding is hidden from all queries by the key mask.

Image encoder f: a small ConvNet, Conv → [GroupNorm → SiLU → stride-2 Conv] × 3
(32 → 16 → 8 → 4 pixels) → GroupNorm → SiLU → global average pool → Linear.

The ``CLIP`` wrapper holds both encoders and the learnable log scale (CLIP's ``logit_scale``,
initialised to log(1/0.07) ≈ 2.66, i.e. temperature 0.07). Every backward pass is written out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..backend import DEFAULT_DTYPE, backend_of, get_xp, rng, to_device, to_numpy
from ..config import ConfigMixin
from ..nn import (
    GELU, Attention, Conv2d, Embedding, GroupNorm, LayerNorm, Linear, Module, ModuleList, Parameter,
    Sequential, SiLU, info_nce_loss, no_grad,
)
from ..text.tokenizer import DEFAULT_MAX_LENGTH, Tokenizer

CAPTION_VOCAB_SIZE = Tokenizer.from_captions().vocab_size  # ids of the caption tokenizer


# --------------------------------------------------------------------------- configs


@dataclass
class TextEncoderConfig(ConfigMixin):
    vocab_size: int = CAPTION_VOCAB_SIZE  # rows of the token embedding: Tokenizer.vocab_size
    max_length: int = DEFAULT_MAX_LENGTH  # learned positions: Tokenizer.max_length (16)
    width: int = 64  # D: residual stream, hidden states, the U-Net's context_dim
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads; dim_head = width / heads = 16
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio · D, as in GPT-2 and CLIP
    projection_dim: int = 64  # E: the shared image–text embedding space

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by {self.heads} heads")


@dataclass
class ImageEncoderConfig(ConfigMixin):
    in_channels: int = 1  # MNIST is grey
    channels: tuple[int, ...] = (16, 32, 64, 64)  # feature maps at 32², 16², 8², 4²: one stride-2 conv per step
    groups: int = 8  # GroupNorm groups (must divide every entry of ``channels``)
    projection_dim: int = 64  # E: must equal the text encoder's

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)  # a list is accepted too
        bad = [c for c in self.channels if c % self.groups]
        if bad:
            raise ValueError(f"image channels {bad} are not divisible into {self.groups} groups")


@dataclass
class CLIPConfig(ConfigMixin):
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    log_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07

    def __post_init__(self):
        if self.text.projection_dim != self.image.projection_dim:
            raise ValueError(
                f"text and image projection_dim differ ({self.text.projection_dim} vs "
                f"{self.image.projection_dim}): both must map into the same space"
            )


# --------------------------------------------------------------------------- text encoder


class TextTransformerBlock(Module):
    """Pre-LN block:  x ← x + Attn(LN₁(x));  x ← x + MLP(LN₂(x)),  MLP = Linear·GELU·Linear."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, *, generator=None):
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads=heads, dim_head=width // heads, generator=generator)
        self.ln_2 = LayerNorm(width)
        self.mlp = Sequential([Linear(width, mlp_ratio * width, generator=generator), GELU(),
                               Linear(mlp_ratio * width, width, generator=generator)])

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask=mask)
        return x + self.mlp(self.ln_2(x))

    def backward(self, dout):
        # Each residual passes its gradient straight through; its branch adds its own on top.
        dx = dout + self.ln_2.backward(self.mlp.backward(dout))
        return dx + self.ln_1.backward(self.attn.backward(dx))


class TextEncoder(Module):
    """Token ids → (hidden states (B, L, D), pooled projected embedding (B, E)).

    forward(ids (B, L) int, mask (B, L) bool, True = real token, as ``Tokenizer.encode`` gives;
    L ≤ max_length). The pooled output is read at the last real token, <eos>, at index
    mask.sum − 1. backward(d_hidden, d_pooled) takes either upstream gradient (or both; None
    for one that is not used) and returns None: integer ids have no gradient.

    The initial weights come from a generator made from ``seed``, or from ``generator`` (CLIP
    passes its own, so that one seed fixes both encoders).
    """

    def __init__(self, config: TextEncoderConfig, seed: int = 0, *, generator=None):
        gen = rng(seed) if generator is None else generator
        self.config = config
        d = config.width
        self.token_embedding = Embedding(config.vocab_size, d, generator=gen)
        self.token_embedding.weight.data *= 0.02  # CLIP's initialisation: N(0, 0.02²)
        positions = 0.01 * gen.standard_normal((config.max_length, d))  # CLIP: N(0, 0.01²)
        self.positional_embedding = Parameter(to_device(positions.astype(DEFAULT_DTYPE)))
        self.blocks = ModuleList(
            TextTransformerBlock(d, config.heads, config.mlp_ratio, generator=gen) for _ in range(config.layers)
        )
        self.ln_final = LayerNorm(d)
        self.text_projection = Linear(d, config.projection_dim, bias=False, generator=gen)

    def forward(self, ids, mask):
        backend = backend_of(self.positional_embedding.data)
        ids, mask = to_device(ids, backend), to_device(mask, backend)  # tokenizer output is NumPy
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.config.max_length:
            raise ValueError(f"TextEncoder expects ids (B, L) with L ≤ {self.config.max_length}, "
                             f"got {tuple(ids.shape)}")
        if mask.shape != ids.shape or mask.dtype != bool:
            raise ValueError(f"TextEncoder expects a boolean mask of shape {tuple(ids.shape)}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        if not (bool(mask[:, 0].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())):
            raise ValueError("each mask row must be real tokens then padding: True…True False…False, "
                             "starting with True (<bos>), as Tokenizer.encode gives")
        xp = get_xp(ids)
        batch, length = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding.data[:length]  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_final(x)  # (B, L, D)
        keep = mask[:, :, None].astype(x.dtype)  # (B, L, 1): 1 for real tokens, 0 for padding
        eos = mask.sum(axis=1) - 1  # (B,) position of <eos>
        pooled = self.text_projection(x[xp.arange(batch), eos])  # (B, D) → (B, E)
        self._keep((keep, eos))
        return x * keep, pooled

    def backward(self, d_hidden=None, d_pooled=None):
        keep, eos = self._take()
        batch, length = keep.shape[:2]
        xp = get_xp(keep)
        dx = xp.zeros((batch, length, self.config.width), dtype=keep.dtype)  # (B, L, D)
        if d_hidden is not None:
            dx += d_hidden * keep
        if d_pooled is not None:
            dx[xp.arange(batch), eos] += self.text_projection.backward(d_pooled)  # one row per prompt
        dx = self.ln_final.backward(dx)
        for block in reversed(self.blocks):
            dx = block.backward(dx)
        d_positions = xp.zeros_like(self.positional_embedding.data)  # (max_length, D)
        d_positions[:length] = dx.sum(axis=0)  # the same positions were added to every prompt
        self.positional_embedding.accumulate(d_positions, "positional_embedding")
        self.token_embedding.backward(dx)
        return None


# --------------------------------------------------------------------------- image encoder


class ImageEncoder(Module):
    """Images (B, C, 32, 32) in [−1, 1] → embeddings (B, E).

    layers: Conv3×3(C → c₀), then for each next width c: GroupNorm, SiLU, Conv3×3 stride 2
    (halving the size), then GroupNorm, SiLU. With channels (16, 32, 64, 64) the maps are
    16×32×32 → 32×16×16 → 64×8×8 → 64×4×4. Global average pool: p = mean over (H, W) of the last
    map, (B, c_last); backward spreads dp/(H·W) over every pixel. proj: Linear(c_last → E).
    Initial weights: from ``seed``, or from ``generator`` (as TextEncoder).
    """

    def __init__(self, config: ImageEncoderConfig, seed: int = 0, *, generator=None):
        gen = rng(seed) if generator is None else generator
        self.config = config
        ch = config.channels
        layers = [Conv2d(config.in_channels, ch[0], 3, padding=1, generator=gen)]
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            layers += [GroupNorm(config.groups, c_in), SiLU(), Conv2d(c_in, c_out, 3, stride=2, padding=1, generator=gen)]
        layers += [GroupNorm(config.groups, ch[-1]), SiLU()]
        self.layers = Sequential(layers)
        self.proj = Linear(ch[-1], config.projection_dim, generator=gen)

    def forward(self, x):
        h = self.layers(x)  # (B, c_last, H', W')
        self._keep(h.shape)
        return self.proj(h.mean(axis=(2, 3)))  # (B, c_last) → (B, E)

    def backward(self, dout):
        batch, channels, height, width = self._take()
        dpool = self.proj.backward(dout)  # (B, c_last)
        xp = get_xp(dpool)
        dh = xp.broadcast_to(dpool[:, :, None, None] / (height * width), (batch, channels, height, width))
        return self.layers.backward(xp.ascontiguousarray(dh))


# --------------------------------------------------------------------------- CLIP


class CLIP(Module):
    """Both encoders and the log scale.  forward(images, ids, mask) → InfoNCE loss (a float).

    backward() then fills every parameter's gradient: the loss's gradients with respect to the
    two embeddings go back through each encoder, and ∂L/∂log s into ``log_scale`` (zero while
    the scale is clipped at 100, as CLIP). ``embed_images`` / ``embed_texts`` give NumPy
    embeddings (not normalised) for evaluation, without keeping caches.

    A further loss on the text hidden states (the slot head of ``train.clip``) asks forward for
    them with ``return_hidden=True`` and hands its gradient to ``backward(d_hidden=...)``.
    """

    def __init__(self, config: CLIPConfig | None = None, seed: int = 0):
        gen = rng(seed)  # one generator for both encoders: the initial weights depend on the seed only
        self.config = config or CLIPConfig()
        self.text = TextEncoder(self.config.text, generator=gen)
        self.image = ImageEncoder(self.config.image, generator=gen)
        # log s, CLIP's ``logit_scale``: a 0-d parameter so that the optimiser trains it too.
        self.log_scale = Parameter(to_device(np.array(self.config.log_scale_init, dtype=DEFAULT_DTYPE)))

    @property
    def scale(self) -> float:
        """s = e^{log s}, before the clip at 100."""
        return math.exp(float(self.log_scale.data))

    def forward(self, images, ids, mask, *, return_hidden: bool = False):
        """The InfoNCE loss (a float), or (loss, text hidden states (B, L, D)) with ``return_hidden``."""
        image_emb = self.image(images)  # (B, E)
        hidden, text_emb = self.text(ids, mask)  # (B, L, D), (B, E)
        loss, d_image, d_text, d_log_scale = info_nce_loss(image_emb, text_emb, float(self.log_scale.data))
        self._keep((d_image, d_text, d_log_scale))
        return (loss, hidden) if return_hidden else loss

    def backward(self, dloss: float = 1.0, d_hidden=None):
        """Gradients of ``dloss`` · InfoNCE, plus ``d_hidden`` (B, L, D), the gradient of another
        loss with respect to the hidden states, if given (it is not scaled by ``dloss``)."""
        d_image, d_text, d_log_scale = self._take()
        xp = get_xp(d_image)
        self.log_scale.accumulate(xp.asarray(dloss * d_log_scale, dtype=d_image.dtype), "log_scale")
        self.image.backward(dloss * d_image)
        self.text.backward(d_hidden, dloss * d_text)
        return None

    def embed_images(self, images, batch_size: int = 500) -> np.ndarray:
        """Image embeddings (N, E) as NumPy, computed in batches under ``no_grad``."""
        dtype = self.log_scale.data.dtype
        with no_grad():
            return np.concatenate([
                to_numpy(self.image(to_device(images[i : i + batch_size], backend_of(self.log_scale.data), dtype)))
                for i in range(0, len(images), batch_size)
            ])

    def embed_texts(self, ids, mask) -> np.ndarray:
        """Pooled text embeddings (B, E) as NumPy, under ``no_grad``."""
        with no_grad():
            return to_numpy(self.text(ids, mask)[1])
