"""tinydiff.models: the networks of the pipeline.

    unet         the denoising U-Net (time embedding, skips, cross-attention)
    clip         the mini-CLIP: text encoder (the U-Net's context) and image encoder
    autoencoder  the KL autoencoder between 1×32×32 pixels and 4×8×8 latents
"""

from .autoencoder import AutoencoderConfig, AutoencoderKL
from .clip import CLIP, CLIPConfig, ImageEncoder, ImageEncoderConfig, TextEncoder, TextEncoderConfig
from .unet import UNet, UNetConfig

__all__ = [
    "AutoencoderConfig", "AutoencoderKL", "CLIP", "CLIPConfig", "ImageEncoder", "ImageEncoderConfig",
    "TextEncoder", "TextEncoderConfig", "UNet", "UNetConfig",
]
