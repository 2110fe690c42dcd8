"""Stage 3: the text-conditional U-Net on VAE latents (latent diffusion, Rombach et al. 2022).

Both other networks are frozen here, as in Stable Diffusion:

* the **VAE** encodes every training digit once, z0 = scaling_factor · μ(x) (4×8×8, unit
  variance), and the U-Net learns to denoise those latents;
* the **text encoder** turns a freshly drawn caption for each digit, every time the digit is
  seen, into token states (B, L, D): the U-Net's cross-attention context.

Conditioning dropout (10%) swaps a caption's token states for the U-Net's learned null context,
which is what the pipeline's classifier-free guidance uses as "no prompt". The U-Net attends to
all L token positions; padding positions carry zero vectors (the text encoder zeroes them), the
same at training and sampling time.

**Pixel space** (``vae=None``, the ablation of ``RecipeConfig.space``): no autoencoder. The U-Net
(``pixel_space_unet_config``) learns to denoise the 1×32×32 pictures themselves, in [−1, 1], as DDPM
and Imagen do; the pipeline saved with it skips the decoder. It sees every pixel of a small digit,
and pays for it: 158 MFLOP per image and step against the latent U-Net's 33.4.

``conditioning="pooled"`` (the ablation of ``RecipeConfig.conditioning``) gives the U-Net only the
text encoder's state at <eos>, at position 0 of an otherwise zero context
(``pipeline.pooled_context``); the pipeline saved with it reads prompts the same way.
"""

from __future__ import annotations

from ..models.autoencoder import AutoencoderKL
from ..models.clip import TextEncoder
from ..models.dit import DiT, DiTConfig
from ..models.unet import UNet, UNetConfig
from ..nn import no_grad
from ..pipeline import check_conditioning, denoiser_context
from ..text.tokenizer import Tokenizer
from .clip import draw_captions
from .diffusion import DiffusionTrainingConfig, diffusion_grads
from .loop import LoopConfig, train_loop

CHECKPOINT_KIND = "latent-unet-train"


def latent_unet_config(context_dim: int = 64, context_length: int = 16, *,
                       attention_at_8x8: bool = False) -> UNetConfig:
    """The U-Net for 4×8×8 latents: two levels (8×8, 4×4), text cross-attention at 4×4 and in
    the mid block. Sized for sampling speed on a CPU (attention at 8×8 as well costs 1.7× the
    time of a whole forward pass). ``attention_at_8x8``: a transformer (self- and cross-attention)
    at the 8×8 level too, where a 16-pixel half of a scene is 4 latent pixels wide (the recipe's
    ``unet_attention="8x8"``); 793k weights and 42.0 MFLOP per latent instead of 730k and 33.4."""
    return UNetConfig(
        in_channels=4,
        out_channels=4,
        sample_size=8,
        block_channels=(32, 64),  # 8×8, 4×4
        layers_per_block=1,
        attention_levels=(attention_at_8x8, True),
        context_dim=context_dim,  # the text encoder's width
        context_length=context_length,  # the tokenizer's max_length
        learned_null_context=True,
        heads=4,
        dim_head=8,  # transformers run at 4 · 8 = 32 features
        groups=8,
        time_embed_dim=128,
    )


def latent_dit_config(context_dim: int = 64, context_length: int = 16) -> DiTConfig:
    """The DiT for the same 4×8×8 latents (the recipe's ``denoiser="dit"``): 2×2 patches → 16 image
    tokens, width 96, 4 joint blocks. 1.27M parameters and 28.0 MFLOP per latent, against the
    U-Net's 730k and 33.4 MFLOP: each DiT weight is used once per token (16 image + 16 text
    tokens), where the U-Net's top-level convolutions use theirs at each of 64 pixels."""
    return DiTConfig(
        in_channels=4,
        out_channels=4,
        sample_size=8,
        patch_size=2,  # 16 tokens of 4·2·2 = 16 numbers
        width=96,  # D, both streams
        depth=4,  # joint blocks (the last one's text stream gives keys and values only)
        heads=4,  # dim_head 24
        mlp_ratio=4,
        timestep_dim=128,
        context_dim=context_dim,  # the text encoder's width
        context_length=context_length,  # the tokenizer's max_length
        learned_null_context=True,
    )


def pixel_space_unet_config(context_dim: int = 64, context_length: int = 16) -> UNetConfig:
    """The U-Net for 1×32×32 pictures (pixel space, the recipe's ``space="pixel"``): three levels
    (32×32, 16×16, 8×8), few channels where the maps are large, text cross-attention at 8×8 only,
    as the latent U-Net has it at its lower level; the transformers the latent U-Net's width.
    730k parameters (the latent U-Net's 730k) and 158 MFLOP per image (4.7× its 33.4):
    the 32×32 level costs 16 times per channel what the 8×8 one does."""
    return UNetConfig(
        in_channels=1,
        out_channels=1,
        sample_size=32,
        block_channels=(8, 32, 64),  # 32×32, 16×16, 8×8
        layers_per_block=1,
        attention_levels=(False, False, True),
        context_dim=context_dim,
        context_length=context_length,
        learned_null_context=True,
        heads=4,
        dim_head=8,
        groups=4,  # must divide 8
        time_embed_dim=128,
    )


class CaptionConditioning:
    """Fresh captions for the batch's images (``clip.draw_captions``) → the frozen text encoder's
    hidden states, as the denoiser's context under ``conditioning`` ("tokens": all of them;
    "pooled": <eos>'s alone, ``pipeline.pooled_context``). ``data``: CaptionedDigits, or scenes
    (``tinydiff.data.scenes.SceneData``)."""

    def __init__(self, text_encoder: TextEncoder, tokenizer: Tokenizer, data, conditioning: str = "tokens"):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.data = data
        self.conditioning = check_conditioning(conditioning)

    def encode(self, indices, generator):
        captions = draw_captions(self.data, indices, generator)
        tokens = self.tokenizer.encode(captions)
        with no_grad():
            hidden, _ = self.text_encoder(tokens.ids, tokens.mask)  # (B, L, D)
        return denoiser_context(hidden, tokens.mask, self.conditioning), None  # (B, L, D)

    def backward(self, dcontext):
        """The text encoder is frozen: its gradient is not needed."""


def train_latent_unet(unet: UNet | DiT, vae: AutoencoderKL | None, text_encoder: TextEncoder, tokenizer: Tokenizer, train_data,
                      loop: LoopConfig, diffusion: DiffusionTrainingConfig | None = None, *, checkpoint_path=None,
                      resume: bool = False, callback=None, stop_at: int | None = None, threads: int = 1,
                      conditioning: str = "tokens") -> dict:
    """Train ``unet`` (a U-Net or a DiT) on the VAE latents of ``train_data`` (CaptionedDigits) with caption contexts;
    ``threads`` CPU cores share each batch (``diffusion_grads``: this process and worker processes).
    ``conditioning``: "tokens" or "pooled" (``CaptionConditioning``), recorded in the checkpoint's config.
    ``vae`` None: pixel space, the U-Net denoises the images themselves."""
    diffusion = diffusion or DiffusionTrainingConfig()
    if vae is None:
        latents = train_data.images  # (N, 1, 32, 32) in [−1, 1]: pixel space
    else:
        latents = vae.encode_for_diffusion(train_data.images)  # (N, 4, 8, 8), computed once: the VAE is frozen
    conditioning = CaptionConditioning(text_encoder, tokenizer, train_data, conditioning)
    grads = diffusion_grads(unet, latents, diffusion, conditioning, threads=threads)
    try:
        return train_loop(unet, grads, loop, checkpoint_path=checkpoint_path, resume=resume, kind=CHECKPOINT_KIND,
                          model_config={"dit" if isinstance(unet, DiT) else "unet": unet.config.to_dict(),
                                        "diffusion": diffusion.to_dict(), "conditioning": conditioning.conditioning},
                          callback=callback, stop_at=stop_at)
    finally:
        grads.close()  # the worker processes end with the stage
