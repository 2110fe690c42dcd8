"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3), in miniature.

Stable Diffusion does not denoise pixels: an autoencoder first compresses a 512×512×3 image into
a 64×64×4 latent (a factor f = 8 per side), the U-Net is trained and sampled in that latent
space, and the decoder turns the final latent back into pixels. Here a 1×32×32 digit becomes a
4×8×8 latent (f = 4, 4 channels as in SD): 1,024 numbers → 256.

    x (B, 1, 32, 32) ─► Encoder ─► moments (B, 8, 8, 8) = [μ | raw log σ²] (B, 4, 8, 8) each
                                   log σ² = clamp(raw, −30, 20)             (as LDM)
                                   z = μ + e^{log σ²/2} ⊙ ε,  ε ~ N(0, I)    (reparameterisation)
                      Decoder ◄─── z (B, 4, 8, 8)
    x̂ (B, 1, 32, 32) ◄─┘

Encoder (diffusers ``Encoder``): conv_in → per level: ResBlocks, then a stride-2 Downsample2D
except at the last level (32 → 16 → 8 with three levels) → a mid ResBlock → GroupNorm → SiLU →
conv_out to 2·latent_channels. Decoder (``Decoder``), the mirror image: conv_in from the latent
→ a mid ResBlock → per level, deepest first: ResBlocks, then Upsample2D except at the top level →
GroupNorm → SiLU → conv_out to the image channels. The ResBlocks, Downsample2D and Upsample2D are
the U-Net's (``blocks.py``), built without a time embedding. Unlike SD's VAE there is no
attention in the mid block and no 1×1 quant_conv/post_quant_conv (a linear map after conv_out,
which conv_out could learn itself).

Why a *KL* autoencoder: the encoder outputs a diagonal Gaussian q(z|x) = N(μ, σ²), and the loss
adds a small multiple β of KL(q(z|x) ‖ N(0, I)) to the reconstruction error. With a small β the
latent is almost deterministic (σ ≪ |μ|), but the KL keeps it from drifting to arbitrary scales
and the noise makes the decoder smooth around each μ, so that the slightly-off latents a
diffusion model produces still decode to clean images. The loss (``vae_loss``) and the choice of
β are documented there.

Backward passes, composed by hand:

    encode(x) → (μ, log σ²)                 encode_backward(dμ, dlog σ²) → dx
    decode(z) → x̂                           decode_backward(dx̂) → dz
    forward(x, ε) → (x̂, μ, log σ²)          backward(dx̂, dμ, dlog σ²) → dx

``forward`` is encode → reparameterise → decode. Its ``backward`` takes the gradient reaching x̂
(from the reconstruction loss) and, separately, the gradients reaching μ and log σ² directly
(from the KL term): it runs decode_backward to get dz, sends dz through the reparameterisation
(∂z/∂μ = 1, ∂z/∂log σ² = ½ σ ⊙ ε), adds the direct gradients, and runs encode_backward.

Latent scale for diffusion (Rombach et al. 2022, §4.3.2): the diffusion model expects data of
roughly unit variance (its noise schedule's signal-to-noise ratios assume it), but the latents'
scale is whatever training made it. After training, ``fit_scaling_factor`` sets s = 1/std(μ)
over the whole training set (SD's 0.18215 is the same quantity for its VAE, estimated on the
first training batch) and stores it in the config; the diffusion model is then trained on
``encode_for_diffusion(x) = s · μ`` and its samples decoded by ``decode_from_diffusion(z) =
decode(z / s)``. We use μ, not a sample z: σ is small next to the spread of μ (for the default
model trained by ``train_autoencoder``: median σ ≈ 0.03 against std(μ) ≈ 0.74), so sampling would
add only noise the U-Net must learn to ignore. Diffusers' training scripts sample z, and SD's
0.18215 was computed from samples; with σ this small the two give almost the same s (1/std(z)
and 1/std(μ) differ by under 1% here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from ..backend import backend_of, get_xp, rng, to_device
from ..config import ConfigMixin
from ..nn import (
    Conv2d, GroupNorm, Module, ModuleList, SiLU, gaussian_kl, is_grad_enabled, mse_loss, no_grad,
)
from .blocks import Downsample2D, ResBlock, Upsample2D

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM's clamp on log σ²: σ between e^−15 ≈ 3·10⁻⁷ and e^10 ≈ 2·10⁴


# --------------------------------------------------------------------------- config


@dataclass
class AutoencoderConfig(ConfigMixin):
    """Everything that decides the network and its latent space; saved as JSON beside the weights."""

    in_channels: int = 1  # image channels: 1 for grey MNIST digits
    sample_size: int = 32  # H = W of the training images (the network accepts any multiple of the factor)
    latent_channels: int = 4  # channels of the latent, as Stable Diffusion's 4
    block_channels: tuple[int, ...] = (8, 16, 32)  # channels at 32², 16², 8²: each level after the first halves H, W
    layers_per_block: int = 1  # ResBlocks per level, in the encoder and in the decoder
    groups: int = 4  # GroupNorm groups; must divide every channel count (2 channels per group at 32²)
    kl_weight: float = 1e-6  # β in L = mean (x̂ − x)² + β · KL (KL summed over the latent, see vae_loss)
    scaling_factor: float | None = None  # s = 1/std(μ) on the training set; set after training

    def __post_init__(self):
        self.block_channels = tuple(int(c) for c in self.block_channels)  # JSON gives lists
        problems = []
        if not self.block_channels:
            problems.append("block_channels must not be empty")
        if any(c % self.groups for c in self.block_channels):
            problems.append(f"groups={self.groups} must divide every entry of block_channels {self.block_channels}")
        if self.layers_per_block < 1:
            problems.append(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.block_channels and self.sample_size % self.factor:
            problems.append(f"sample_size={self.sample_size} must be a multiple of the factor {self.factor}")
        if self.kl_weight < 0:
            problems.append(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.scaling_factor is not None and not self.scaling_factor > 0:
            problems.append(f"scaling_factor must be positive (or None before training), got {self.scaling_factor}")
        if problems:
            raise ValueError("invalid AutoencoderConfig: " + "; ".join(problems))

    @property
    def factor(self) -> int:
        """Down-sampling factor per side: 2^(levels − 1) (4 with three levels: 32 → 8)."""
        return 2 ** (len(self.block_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(latent_channels, h, w) of a training image's latent: (4, 8, 8) by default."""
        side = self.sample_size // self.factor
        return (self.latent_channels, side, side)


# --------------------------------------------------------------------------- the Gaussian posterior


def clamp_logvar_forward(raw):
    """log σ² = clip(raw, −30, 20) → (logvar, inside), ``inside`` the mask where the clip is idle.

    The clamp keeps e^{log σ²} finite in float32 however far the encoder's output strays.
    Backward: d raw = d logvar where −30 ≤ raw ≤ 20 and 0 outside (a clipped value does not move
    when raw moves), as torch.clamp.
    """
    xp = get_xp(raw)
    inside = (raw >= LOGVAR_MIN) & (raw <= LOGVAR_MAX)
    return xp.clip(raw, LOGVAR_MIN, LOGVAR_MAX), inside


def clamp_logvar_backward(dlogvar, inside):
    """d raw = d logvar ⊙ 1[−30 ≤ raw ≤ 20]."""
    return dlogvar * inside


class ReparamCache(NamedTuple):
    std: object  # σ = e^{log σ²/2}, (B, C, h, w)
    eps: object  # ε, (B, C, h, w)


def reparameterize_forward(mean, logvar, eps):
    """z = μ + σ ⊙ ε with σ = e^{log σ²/2} (Kingma & Welling 2014, eq. 10).

    Writing the sample as a deterministic function of (μ, σ) and noise ε ~ N(0, I) drawn
    outside the network is what lets the gradient flow into the encoder.
    Shapes: mean, logvar, eps (B, C, h, w) → z (B, C, h, w).
    """
    xp = get_xp(mean, logvar, eps)
    std = xp.exp(0.5 * logvar)
    return mean + std * eps, ReparamCache(std, eps)


def reparameterize_backward(dz, cache: ReparamCache):
    """∂z/∂μ = 1 and ∂z/∂log σ² = ½ e^{log σ²/2} ε = ½ σ ε  →  (dμ, dlog σ²) = (dz, ½ dz ⊙ σ ⊙ ε)."""
    return dz, 0.5 * dz * cache.std * cache.eps


def vae_loss(x, x_hat, mean, logvar, kl_weight: float):
    """L = (1/n) Σ (x̂ − x)²  +  β · (1/B) Σ_b KL(N(μ_b, σ_b²) ‖ N(0, I)),  n = B·C·H·W.

    KL = ½ Σ (μ² + σ² − 1 − log σ²) over the latent's C·h·w entries (Kingma & Welling 2014,
    eq. 10, ``tinydiff.nn.gaussian_kl``). Returns (loss, (dx̂, dμ, dlog σ²), {"rec", "kl"}), the
    three gradients ready for ``AutoencoderKL.backward``.

    Why MSE: it is what PSNR measures, and it is the negative log-likelihood of a Gaussian
    decoder, which makes β readable. LDM uses L1 plus a perceptual (LPIPS) and an adversarial
    loss for sharp photographs; for near-binary digits MSE alone reconstructs the strokes well.

    The scale of β. The ELBO with a Gaussian decoder N(x̂, σ_x² I) over D = C·H·W pixels is
    Σ (x̂ − x)²/(2σ_x²) + KL; divided by D, it is the mean squared error plus (2σ_x²/D)·KL. So a
    "proper" VAE has β = 2σ_x²/D, about 2·10⁻⁵ for σ_x = 0.1 and D = 1,024. The default
    β = 10⁻⁶ is that ELBO with σ_x ≈ 0.023 (1% of the pixel range): a decoder trusted far more
    than it reconstructs, so the KL weighs little against the reconstruction. LDM's KL-f
    autoencoders go further: they weight a KL summed over the latent by 10⁻⁶ against an L1 +
    LPIPS loss *summed* over 3·256² pixel values, about 5·10⁻¹² in our per-pixel units
    (ignoring that L1 and squared errors differ in size), which leaves the latent scale free
    (hence SD's s = 0.18215, a latent std of 5.5). Our larger β is still small: after training
    it is about 8% of the loss (KL ≈ 750 nats per digit, ~3 per latent entry); it keeps σ at a
    few percent of std(μ) and std(μ) near 1 (s ≈ 1.36), while the held-out reconstructions
    reach a PSNR of about 26.5 dB.
    """
    rec, dx_hat = mse_loss(x_hat, x)
    kl, dmean, dlogvar = gaussian_kl(mean, logvar)
    return rec + kl_weight * kl, (dx_hat, kl_weight * dmean, kl_weight * dlogvar), {"rec": rec, "kl": kl}


# --------------------------------------------------------------------------- encoder and decoder


class ResnetLevel(Module):
    """One level of the encoder or decoder (diffusers ``DownEncoderBlock2D``/``UpDecoderBlock2D``):
    ResBlocks without a time embedding, then an optional resampler (Downsample2D, Upsample2D or
    None). forward(h) → h; backward(dh) → dh."""

    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, groups: int, resample=None, *,
                 generator=None):
        self.resnets = ModuleList(
            [ResBlock(in_channels if i == 0 else out_channels, out_channels, None, groups, generator=generator)
             for i in range(num_resnets)]
        )
        self.resample = resample

    def forward(self, h):
        for resnet in self.resnets:
            h = resnet(h)
        return h if self.resample is None else self.resample(h)

    def backward(self, dh):
        if self.resample is not None:
            dh = self.resample.backward(dh)
        for resnet in reversed(self.resnets):
            dh, _ = resnet.backward(dh)  # no time embedding, so no dtemb (None)
        return dh


class Encoder(Module):
    """x (B, C_img, H, W) → moments (B, 2·latent_channels, H/f, W/f): μ and the raw log σ²."""

    def __init__(self, config: AutoencoderConfig, *, generator=None):
        ch, n, g, gen = config.block_channels, config.layers_per_block, config.groups, generator
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1, generator=gen)
        self.down_blocks = ModuleList([
            ResnetLevel(ch[max(level - 1, 0)], c, n, g, Downsample2D(c, generator=gen) if level < len(ch) - 1 else None,
                        generator=gen)  # the resampler (an argument) draws its weights first
            for level, c in enumerate(ch)
        ])
        self.mid_block = ResnetLevel(ch[-1], ch[-1], 1, g, generator=gen)
        self.conv_norm_out = GroupNorm(g, ch[-1])
        self.conv_act = SiLU()
        self.conv_out = Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1, generator=gen)

    def forward(self, x):
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)  # the last level keeps its size: (B, C_last, H/f, W/f)
        h = self.mid_block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, 2·C_lat, H/f, W/f)

    def backward(self, dmoments):
        dh = self.conv_norm_out.backward(self.conv_act.backward(self.conv_out.backward(dmoments)))
        dh = self.mid_block.backward(dh)
        for block in reversed(self.down_blocks):
            dh = block.backward(dh)
        return self.conv_in.backward(dh)


class Decoder(Module):
    """z (B, latent_channels, h, w) → x̂ (B, C_img, f·h, f·w): the encoder's mirror image."""

    def __init__(self, config: AutoencoderConfig, *, generator=None):
        ch, n, g, gen = config.block_channels, config.layers_per_block, config.groups, generator
        self.conv_in = Conv2d(config.latent_channels, ch[-1], 3, padding=1, generator=gen)
        self.mid_block = ResnetLevel(ch[-1], ch[-1], 1, g, generator=gen)
        levels = list(reversed(range(len(ch))))  # deepest first: 2, 1, 0
        self.up_blocks = ModuleList([
            ResnetLevel(ch[min(level + 1, len(ch) - 1)], ch[level], n, g,
                        Upsample2D(ch[level], generator=gen) if level > 0 else None, generator=gen)
            for level in levels
        ])
        self.conv_norm_out = GroupNorm(g, ch[0])
        self.conv_act = SiLU()
        self.conv_out = Conv2d(ch[0], config.in_channels, 3, padding=1, generator=gen)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)  # ends at (B, C0, f·h, f·w)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, C_img, f·h, f·w)

    def backward(self, dx_hat):
        dh = self.conv_norm_out.backward(self.conv_act.backward(self.conv_out.backward(dx_hat)))
        for block in reversed(self.up_blocks):
            dh = block.backward(dh)
        return self.conv_in.backward(self.mid_block.backward(dh))


# --------------------------------------------------------------------------- the autoencoder


class AutoencoderKL(Module):
    """AutoencoderKL(config=None, seed=0): see the module docstring for the API and the math.

    Training-time methods keep caches (unless in ``no_grad``) and take device arrays of the
    parameters' dtype. The dataset-level helpers (``encode_means``, ``reconstruct``,
    ``encode_for_diffusion``, ``decode_from_diffusion``) run in batches under ``no_grad``, accept
    NumPy or device arrays and return arrays on the parameters' device: the diffusion stages use
    the autoencoder frozen, never backpropagating into it.
    """

    def __init__(self, config: AutoencoderConfig | None = None, seed: int = 0, *, generator=None):
        gen = rng(seed) if generator is None else generator  # the initial weights depend on the seed only
        self.config = config or AutoencoderConfig()
        self.encoder = Encoder(self.config, generator=gen)
        self.decoder = Decoder(self.config, generator=gen)

    # -- input checks ----------------------------------------------------------------------
    def _check(self, x, channels: int, what: str) -> None:
        f = self.config.factor
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"AutoencoderKL.{what} expects a (B, {channels}, H, W) array, got shape {tuple(x.shape)}")
        if what == "encode" and (x.shape[2] % f or x.shape[3] % f):
            raise ValueError(f"AutoencoderKL.encode halves H and W {len(self.config.block_channels) - 1} times: "
                             f"they must be multiples of {f}, got {x.shape[2]}×{x.shape[3]}")

    # -- encoder, posterior, decoder -------------------------------------------------------
    def encode(self, x):
        """x (B, C_img, H, W) → (μ, log σ²), each (B, latent_channels, H/f, W/f)."""
        self._check(x, self.config.in_channels, "encode")
        moments = self.encoder(x)  # (B, 2·C_lat, h, w)
        c = self.config.latent_channels
        mean, raw = moments[:, :c], moments[:, c:]  # (B, C_lat, h, w) each: channels split in two halves
        logvar, inside = clamp_logvar_forward(raw)
        self._stash("clamp", inside)
        return mean, logvar

    def encode_backward(self, dmean, dlogvar):
        """(dμ, dlog σ²) → dx; either may be None (no gradient reached it)."""
        inside = self._unstash("clamp", "encode_backward")
        xp = get_xp(inside)
        dmean = xp.zeros(inside.shape, dtype=self._dtype) if dmean is None else dmean
        draw = xp.zeros(inside.shape, dtype=self._dtype) if dlogvar is None else clamp_logvar_backward(dlogvar, inside)
        return self.encoder.backward(xp.concatenate([dmean, draw], axis=1))  # (B, 2·C_lat, h, w)

    def decode(self, z):
        """z (B, latent_channels, h, w) → x̂ (B, C_img, f·h, f·w)."""
        self._check(z, self.config.latent_channels, "decode")
        return self.decoder(z)

    def decode_backward(self, dx_hat):
        """dx̂ → dz."""
        return self.decoder.backward(dx_hat)

    def forward(self, x, eps):
        """x (B, C_img, H, W), ε (B, latent_channels, H/f, W/f) ~ N(0, I) → (x̂, μ, log σ²).

        ε is an input, drawn by the caller on the CPU (``tinydiff.backend.randn``) and moved to
        the device, so a seed fixes the training run on either backend.
        """
        self._check(x, self.config.in_channels, "encode")  # before anything keeps a cache
        f = self.config.factor
        latent = (x.shape[0], self.config.latent_channels, x.shape[2] // f, x.shape[3] // f)
        if tuple(eps.shape) != latent:
            raise ValueError(f"AutoencoderKL.forward needs ε of the latent's shape {latent}, got {tuple(eps.shape)}")
        mean, logvar = self.encode(x)
        z, cache = reparameterize_forward(mean, logvar, eps)
        self._stash("sample", cache)
        return self.decode(z), mean, logvar

    def backward(self, dx_hat, dmean=None, dlogvar=None):
        """dx̂ (through the decoder and the sample) plus direct dμ, dlog σ² (e.g. the KL's) → dx."""
        dz = self.decode_backward(dx_hat)
        dmean_z, dlogvar_z = reparameterize_backward(dz, self._unstash("sample", "backward"))
        dmean = dmean_z if dmean is None else dmean_z + dmean
        dlogvar = dlogvar_z if dlogvar is None else dlogvar_z + dlogvar
        return self.encode_backward(dmean, dlogvar)

    # -- frozen use: whole datasets, latent scale ------------------------------------------
    def _map_batches(self, fn, x, batch_size: int):
        """fn over batches of x (NumPy or device) under no_grad, concatenated on the device."""
        backend, dtype = backend_of(self.encoder.conv_in.weight.data), self._dtype
        with no_grad():
            parts = [fn(to_device(x[i : i + batch_size], backend, dtype)) for i in range(0, len(x), batch_size)]
        return get_xp(parts[0]).concatenate(parts)

    def encode_means(self, x, batch_size: int = 250):
        """μ of every image: (N, C_img, H, W) → (N, latent_channels, H/f, W/f)."""
        return self._map_batches(lambda b: self.encode(b)[0], x, batch_size)

    def reconstruct(self, x, batch_size: int = 250):
        """x̂ = decode(μ): the deterministic reconstruction, (N, C_img, H, W) → same shape."""
        return self._map_batches(lambda b: self.decode(self.encode(b)[0]), x, batch_size)

    def fit_scaling_factor(self, x, batch_size: int = 250) -> float:
        """Set ``config.scaling_factor`` to s = 1/std(μ) over the images x (all latent entries
        pooled, as SD's 0.18215) and return it."""
        std = float(self.encode_means(x, batch_size).std())
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"cannot fit a scaling factor: the latents' standard deviation is {std}")
        self.config.scaling_factor = 1.0 / std
        return self.config.scaling_factor

    def _scaling(self) -> float:
        if self.config.scaling_factor is None:
            raise ValueError("this autoencoder has no scaling_factor yet: call fit_scaling_factor(training images) "
                             "(train_autoencoder does so at the end of training)")
        return self.config.scaling_factor

    def encode_for_diffusion(self, x, batch_size: int = 250):
        """What the diffusion model is trained on: s · μ, of roughly unit variance."""
        s = self._scaling()
        return self._map_batches(lambda b: s * self.encode(b)[0], x, batch_size)

    def decode_from_diffusion(self, z, batch_size: int = 250):
        """Images from a diffusion model's latents: decode(z / s)."""
        s = self._scaling()
        return self._map_batches(lambda b: self.decode(b / s), z, batch_size)

    # -- caches of the two halves ----------------------------------------------------------
    @property
    def _dtype(self):
        return self.encoder.conv_in.weight.data.dtype

    def _stash(self, name: str, cache) -> None:
        """Like ``Module._keep``, with one slot per step (the clamp in encode, the sample in
        forward), so that encode and decode can be used and undone on their own."""
        setattr(self, f"_{name}_cache", cache if is_grad_enabled() else None)

    def _unstash(self, name: str, caller: str):
        cache = getattr(self, f"_{name}_cache", None)
        if cache is None:
            raise RuntimeError(f"AutoencoderKL.{caller} called without a forward pass that kept its cache "
                               "(was it run inside no_grad(), or backward called twice?)")
        setattr(self, f"_{name}_cache", None)
        return cache
