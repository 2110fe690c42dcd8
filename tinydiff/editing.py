"""Editing with a text-to-image pipeline: image-to-image, inpainting, and inversion.

Each editor starts the same denoising loop as ``TextToImagePipeline.__call__`` from somewhere
other than pure noise:

    img2img    encode ─► noise to the σ that ``strength`` picks ─► sample the rest of the grid
               (SDEdit, Meng et al. 2021)
    inpaint    sample from σ_max, but before every step put back the original latent, noised to
               the current σ, wherever the mask keeps the picture (RePaint, Lugmayr et al. 2022)
    invert     run the deterministic sampler backwards, σ = 0 ─► σ_max, to find the noise that
               regenerates a picture (DDIM inversion, Song et al. 2020 §4.3, §5.4)

Symbols: z0 = s · μ is the picture's latent (the VAE posterior mean μ times the scaling factor
s; the mean, not a sample, so an edit depends on its seed only); σ_0 > σ_1 > … > σ_n = 0 the
pipeline's grid (``schedules.get_sigmas``); ε ~ N(0, I) the seeded noise of image i (seed + i,
as in the pipeline); D(x, σ) the denoiser with classifier-free guidance.

Inputs. An image is a PNG path, a ``.npy`` path, or an array: uint8 digits (28, 28) or
(N, 28, 28), white ink (255) on a black background (0) like MNIST (``load_images``). A mask has
the same forms, white/True = regenerate (``load_masks``). Anything else raises
``EditInputError``, a ValueError whose one-line message names the problem and the fix.

The editors take the pipeline as their first argument and are its methods too
(``pipe.img2img(...)``, ``pipe.inpaint(...)``, ``pipe.invert(...)``). They reuse the pipeline's
pieces rather than copies: ``pipe.sampling_options`` (defaults and checks), ``pipe.make_denoiser``
(step 1), ``pipe.decode`` (steps 4–5). Regenerating from inverted noise is the pipeline itself:
``pipe(prompt, latents=noise)`` starts from σ_0 · noise instead of the seeded draw.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np

from .backend import DEFAULT_DTYPE, backend_of, get_xp, to_device, to_numpy
from .data.mnist import IMAGE_SIZE, PAD, load_mnist, to_model_range, train_test_split
from .diffusion import get_sampler, per_sample_generators, randn_per_sample
from .diffusion.samplers import ancestral_step, to_d, validate_sigmas
from .metrics import psnr
from .nn import no_grad


class EditInputError(ValueError):
    """An image, mask, latent or option the editors cannot use (one line: the problem and the fix)."""


# =========================================================================== inputs

def _read_png(path: Path) -> np.ndarray:
    """One picture file → uint8 (H, W) grayscale (PIL's "L": ITU-R 601 luma of RGB; alpha dropped)."""
    from PIL import Image, UnidentifiedImageError  # Pillow comes with matplotlib

    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("L"))
    except (UnidentifiedImageError, OSError) as error:
        raise EditInputError(f"{path} is not a readable image ({type(error).__name__}); "
                             "give a PNG, a .npy of uint8 digits, or an array") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise EditInputError(f"{path} cannot be read as a NumPy array ({str(error).splitlines()[0]}); "
                             "save uint8 digits with numpy.save(path, digits)") from None


def _picture_size(source) -> tuple[int, int] | None:
    """(H, W) of a picture file (not .npy), None for anything else (read errors come later)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(source, (str, Path)) or Path(source).suffix.lower() == ".npy" or not Path(source).is_file():
        return None
    try:
        with Image.open(source) as picture:
            return picture.size[::-1]  # PIL gives (W, H)
    except (UnidentifiedImageError, OSError):
        return None


def _read(source, what: str) -> tuple[np.ndarray, bool]:
    """A path or an array → (array, came_from_picture_file)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise EditInputError(f"{what} {path}: no such file; give a PNG, a .npy file or an array")
        if path.suffix.lower() == ".npy":
            return _read_npy(path), False
        return _read_png(path), True
    return np.asarray(source), False


def _resize(picture: np.ndarray, resample: str) -> np.ndarray:
    """uint8 (H, W) of any size → (28, 28): pad to a square with background (0), centred, then
    resize with PIL's ``resample`` filter ("LANCZOS" for pictures, "BOX", area averaging, for masks)."""
    from PIL import Image

    if picture.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return picture
    h, w = picture.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.pad(picture, ((top, side - h - top), (left, side - w - left)))  # (side, side)
    resized = Image.fromarray(square).resize((IMAGE_SIZE, IMAGE_SIZE), getattr(Image.Resampling, resample))
    return np.asarray(resized)


def _as_batch(array: np.ndarray, what: str, fix: str) -> np.ndarray:
    """(28, 28) or (N, 28, 28) → (N, 28, 28); anything else is an EditInputError."""
    shape = array.shape
    if array.ndim == 2:
        array = array[None]  # (1, 28, 28)
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or array.shape[0] == 0:
        raise EditInputError(f"{what} must be 28×28 or N×28×28, got shape {shape}; {fix}")
    return array


def load_images(source, *, invert: bool = False) -> np.ndarray:
    """Digits to edit → uint8 (N, 28, 28), 0 = background, 255 = ink.

    source  a PNG (or any picture Pillow reads) of any size: converted to grayscale, padded to a
            square with black, resized to 28×28 with Lanczos filtering; a ``.npy`` file or an
            array of uint8 (28, 28) or (N, 28, 28) used as is.
    invert  p → 255 − p first, for dark ink on light paper. Nothing is inverted unless asked:
            the model only knows MNIST's white-on-black digits.
    """
    array, picture = _read(source, "image")
    if picture:
        array = _resize(255 - array if invert else array, "LANCZOS")
    elif array.dtype != np.uint8:
        raise EditInputError(f"images must be uint8 (0 = background, 255 = ink), got {array.dtype}; "
                             "convert with numpy.clip(numpy.rint(x), 0, 255).astype(numpy.uint8)")
    elif invert:
        array = 255 - array
    return _as_batch(array, "an image array", "save a picture as PNG to have it resized")


def load_masks(source) -> np.ndarray:
    """Masks → bool (N, 28, 28), True = regenerate, False = keep the input's pixel.

    A picture file (any size, padded and area-resized like ``load_images``): white (≥ 128) =
    regenerate. An array or ``.npy``: bool as is; integers of only 0 and 1: 1 = regenerate;
    other uint8: ≥ 128 = regenerate; floats in [0, 1]: ≥ 0.5 = regenerate.
    """
    array, picture = _read(source, "mask")
    if picture:
        return _as_batch(_resize(array, "BOX") >= 128, "a mask", "")
    if array.dtype == bool:
        mask = array
    elif np.issubdtype(array.dtype, np.integer) and array.size and array.min() >= 0 and array.max() <= 1:
        mask = array == 1
    elif array.dtype == np.uint8:
        mask = array >= 128
    elif np.issubdtype(array.dtype, np.floating) and array.size and 0 <= array.min() and array.max() <= 1:
        mask = array >= 0.5
    else:
        raise EditInputError(f"a mask must be bool, 0/1, uint8 or floats in [0, 1], got {array.dtype}; "
                             "mark the pixels to regenerate with True (or 255)")
    return _as_batch(mask, "a mask array", "give one mask per image, the size of the digits")


def load_images_and_masks(image, mask, *, invert: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``load_images(image, invert=invert)`` and ``load_masks(mask)``, checked to fit together: a
    picture file and a mask file of the same size (each is padded and resized on its own, so a
    mask of another size or shape would not line up with the picture), and one mask or one per
    image."""
    image_size, mask_size = _picture_size(image), _picture_size(mask)
    if image_size and mask_size and image_size != mask_size:
        raise EditInputError(f"the mask is {mask_size[1]}×{mask_size[0]} pixels but the picture is "
                             f"{image_size[1]}×{image_size[0]}; draw the mask at the picture's size")
    images, masks = load_images(image, invert=invert), load_masks(mask)
    if len(masks) not in (1, len(images)) and len(images) > 1:
        raise EditInputError(f"got {len(masks)} masks for {len(images)} images; give one mask, or one per image")
    return images, masks


def _match(name: str, count: int, batch: int) -> None:
    if count not in (1, batch):
        raise EditInputError(f"got {count} {name} for a batch of {batch}; give one, or one per image")


def _prompts(prompt, batch: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    _match("prompts", len(prompts), batch)
    return prompts * batch if len(prompts) == 1 else prompts


def _repeat(array: np.ndarray, batch: int) -> np.ndarray:
    return np.repeat(array, batch, axis=0) if len(array) == 1 else array  # (1, …) → (batch, …)


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Pixel mask (N, 28, 28) → latent mask (N, 1, 32/f, 32/f), True = regenerate.

    The mask is padded with False to the model's 32×32 (the border is background, kept) and
    max-pooled over f×f blocks (f = 4: 32×32 → 8×8): a latent cell is regenerated if any of its
    pixels is, so every regenerated pixel has its own cell regenerated.
    """
    padded = np.pad(mask, ((0, 0), (PAD, PAD), (PAD, PAD)))  # (N, 32, 32)
    n, side = padded.shape[0], padded.shape[1] // factor
    blocks = padded.reshape(n, side, factor, side, factor)  # (N, 8, 4, 8, 4): row block, row, col block, col
    return blocks.any(axis=(2, 4))[:, None]  # (N, 1, 8, 8)


# =========================================================================== latents

def encode(pipe, images: np.ndarray):
    """uint8 digits (N, 28, 28) → z0 = s · μ (N, 4, 8, 8) on the pipeline's backend.

    μ is the VAE posterior's mean (a sample μ + σ_post·ε would add noise the seed does not fix).
    The inverse of ``pipe.decode`` (the pipeline's steps 4–5) up to the VAE's reconstruction error.
    """
    if pipe.vae is None:
        raise EditInputError("this pipeline draws pixels, not latents (PipelineConfig.space='pixel'); the editors "
                             "work on latent pipelines of 28×28 digits such as mnist-captions")
    return pipe.vae.encode_for_diffusion(to_model_range(images))


def check_noise(latents, shape: tuple[int, ...]) -> np.ndarray:
    """Initial noise given to ``pipe(..., latents=...)`` → float32 NumPy (N, *shape), checked.

    latents  unit-variance noise (N, 4, 8, 8) or one (4, 8, 8), as ``invert`` returns it and as
             the pipeline draws it; shape the latent shape (4, 8, 8).
    """
    noise = to_numpy(latents)
    noise = noise[None] if noise.ndim == len(shape) else noise  # (N, 4, 8, 8)
    if noise.shape[1:] != tuple(shape) or not len(noise) or not np.issubdtype(noise.dtype, np.number) \
            or not np.isfinite(noise).all():
        raise EditInputError(f"latents must be finite noise of shape (N, {', '.join(map(str, shape))}), "
                             f"got shape {noise.shape}; pass what invert() returns")
    return noise.astype(DEFAULT_DTYPE, copy=False)


# =========================================================================== image-to-image

DEFAULT_NOT_LCM = "give the pipeline another default sampler (pipe.defaults)"  # inpaint and invert take no sampler


def refuse_lcm(options, editor: str, fix: str = "choose another sampler") -> None:
    """An editor runs the U-Net's own denoiser D(z, σ) inside its own loop; the LCM student's
    consistency function f(z, σ) is a different function (it jumps to the trajectory's end), so
    ``sampler="lcm"``, asked for or the pipeline's default, is an EditInputError, not a silent
    run of the undistilled denoiser."""
    if options.sampler == "lcm":
        raise EditInputError(f"{editor} runs the U-Net's own samplers, not lcm; {fix}")


def strength_sigmas(sigmas, strength: float):
    """The tail of an n-step σ grid that img2img walks: its last k = ⌊strength · n⌋ steps.

    As in diffusers' img2img, k = int(n · strength) (plus 1e-9 against rounding: 0.29 · 100 is
    28.999…). Returns sigmas[n − k:], k + 1 entries ending with 0: strength 1 is the whole grid,
    strength 0 only the final 0 (no step).
    """
    if isinstance(strength, bool) or not (isinstance(strength, numbers.Real) and 0 <= strength <= 1):
        raise EditInputError(f"strength must be a number in [0, 1], got {strength!r}; 0 keeps the image, 1 ignores it")
    n = len(sigmas) - 1
    k = min(n, math.floor(strength * n + 1e-9))
    return sigmas[n - k:]


def img2img(pipe, image, prompt, strength: float = 0.6, *, negative_prompt=None, steps=None, sampler=None,
            sigma_schedule=None, guidance_scale=None, seed=None, sigma_max=None, callback=None,
            return_latents=False):
    """Redraw digits under a prompt (SDEdit, Meng et al. 2021): uint8 (N, 28, 28) [, latents].

    1. z0 = s · μ(image) (``encode``: the VAE posterior mean).
    2. Of the n-step grid keep the last k = ⌊strength · n⌋ steps (``strength_sigmas``) and noise
       the latent to their first σ:  x = z0 + σ_{n−k} · ε  (VE forward process, x = x0 + σ ε),
       ε the seeded noise of image i (seed + i), drawn exactly as the pipeline draws it.
    3. Sample from there with the chosen sampler (same generators for any step noise); decode.

    strength 1 is text-to-image: the start is the pipeline's σ_0 · ε, without z0 (the pipeline
    treats the data as negligible beside σ_max·ε), so the result is bit for bit ``pipe(prompt,
    seed=seed)``. strength 0 runs no step: the result is the VAE round trip decode(z0).
    ``callback`` sees the sampler's steps, numbered from 0 within the kept tail.
    """
    images = load_images(image)
    batch = max(len(images), 1 if isinstance(prompt, str) else len(prompt))
    _match("images", len(images), batch)
    prompts = _prompts(prompt, batch)
    o = pipe.sampling_options(prompts, steps=steps, sampler=sampler, sigma_schedule=sigma_schedule,
                              guidance_scale=guidance_scale, sigma_max=sigma_max)
    refuse_lcm(o, "img2img")  # its consistency function is not the denoiser the tail is sampled with
    sigmas = pipe.get_sigmas(o)  # (n + 1,)
    tail = strength_sigmas(sigmas, strength)  # (k + 1,)
    if len(tail) == len(sigmas):  # strength 1: text-to-image
        return pipe(prompts, negative_prompt=negative_prompt, steps=o.steps, sampler=o.sampler,
                    sigma_schedule=o.sigma_schedule, guidance_scale=o.guidance_scale, seed=seed, callback=callback,
                    return_latents=return_latents, sigma_max=o.sigma_max)
    z0 = encode(pipe, _repeat(images, batch))  # (B, 4, 8, 8)
    if len(tail) == 1:  # strength 0: nothing to denoise, the result is the VAE round trip
        z = z0
    else:
        generators = per_sample_generators(seed, batch)
        noise = randn_per_sample(generators, pipe.latent_shape(batch), backend=pipe.backend)  # ε (B, 4, 8, 8)
        x = z0 + noise * float(tail[0])  # x = z0 + σ ε
        denoiser = pipe.make_denoiser(prompts, negative_prompt, o.guidance_scale)
        with no_grad():
            z = get_sampler(o.sampler)(denoiser, x, tail, rng=generators, callback=callback)
    result = pipe.decode(z)  # (B, 28, 28) uint8: the pipeline's steps 4–5
    return (result, to_numpy(z)) if return_latents else result


# =========================================================================== inpainting

def inpaint_latents(denoiser, z0, mask, sigmas, *, rng=None, eta: float = 1.0, jumps: int = 0, callback=None):
    """RePaint in latent space: sample z where ``mask`` is True, keep z0 (noised) where it is False.

    denoiser  D(x, σ) → x̂0;   z0 (B, C, h, w) the known latent;   mask bool (B, 1 or C, h, w)
    sigmas    decreasing grid ending with 0;   rng as for the samplers (a seed or per-image generators)
    eta       the step: DDIM (eq. 12, 16) in σ-space, x ← D + σ_down · ε̂ + σ_up · z, ε̂ = (x − D)/σ;
              η = 1 is DDPM's ancestral step, RePaint's sampler; η = 0 the deterministic Euler step
    jumps     r: after each step σ_i → σ_{i+1}, go back to σ_i with the forward process,
              x ← x + √(σ_i² − σ_{i+1}²) · z, and redo the step; r times (RePaint's resampling
              with jump length 1), so the generated region can adjust to the known one
    callback  once per step (and repeat) with the sampler's keys plus "known" (z0 + σ_i ε_i, the
              values put into the known cells) and "repeat"

    The start is σ_0 · ε (the pipeline's). Before every denoiser call the known cells are set to
    z0 + σ_i · ε_i with fresh ε_i (RePaint eq. 8–10: x_known ~ q(x_σ | z0)); after the last step
    they are set to z0 itself, so the returned latent equals z0 exactly outside the mask.
    """
    if not isinstance(jumps, (int, np.integer)) or jumps < 0:
        raise EditInputError(f"jumps must be an integer ≥ 0, got {jumps!r}")
    values = validate_sigmas(sigmas)
    xp = get_xp(z0)
    generators = per_sample_generators(rng, z0.shape[0])

    def noise():
        return randn_per_sample(generators, z0.shape, dtype=z0.dtype, backend=backend_of(z0))

    x = noise() * values[0]  # the pipeline's start, σ_0 · ε
    for i, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:])):
        for repeat in range(jumps + 1):
            known = z0 + sigma * noise()  # x_known ~ q(x_σ | z0) = N(z0, σ² I)
            x = xp.where(mask, x, known)
            denoised = denoiser(x, sigma)
            if callback is not None:
                callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised,
                          "known": known, "repeat": repeat})
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            x = denoised + sigma_down * to_d(x, sigma, denoised)  # DDIM eq. 12 in σ-space
            if sigma_up > 0:
                x = x + sigma_up * noise()
            if repeat < jumps:  # back to σ_i: x_σ = x_σ' + √(σ² − σ'²) z (VE forward process)
                x = x + math.sqrt(sigma**2 - sigma_next**2) * noise()
    return xp.where(mask, x, z0)


def inpaint(pipe, image, mask, prompt, *, jumps: int = 0, eta: float = 1.0, negative_prompt=None, steps=None,
            sigma_schedule=None, guidance_scale=None, seed=None, sigma_max=None, callback=None,
            return_latents=False):
    """Regenerate the masked pixels of digits under a prompt: uint8 (N, 28, 28) [, latents].

    mask (``load_masks``): True/white = regenerate. It is padded to 32×32 and max-pooled to the
    8×8 latent grid (``latent_mask``), and the latent is sampled by ``inpaint_latents`` (RePaint
    with ``jumps`` resamplings and the DDIM-η step). The decoded picture is then composited in
    pixel space, output = mask ? decoded : input, so every kept pixel is the input's exactly (the
    decoder spreads each latent cell over more than its 4×4 pixels, so decoding alone would not).
    """
    images, masks = load_images_and_masks(image, mask)
    batch = max(len(images), len(masks), 1 if isinstance(prompt, str) else len(prompt))
    _match("images", len(images), batch)
    _match("masks", len(masks), batch)
    images, masks, prompts = _repeat(images, batch), _repeat(masks, batch), _prompts(prompt, batch)
    o = pipe.sampling_options(prompts, steps=steps, sigma_schedule=sigma_schedule, guidance_scale=guidance_scale,
                              sigma_max=sigma_max)
    refuse_lcm(o, "inpaint", DEFAULT_NOT_LCM)  # a pipeline whose default sampler is lcm: RePaint needs the U-Net's D
    denoiser = pipe.make_denoiser(prompts, negative_prompt, o.guidance_scale)
    z0 = encode(pipe, images)  # (B, 4, 8, 8)
    cells = to_device(latent_mask(masks, pipe.vae.config.factor), pipe.backend)  # (B, 1, 8, 8)
    with no_grad():
        z = inpaint_latents(denoiser, z0, cells, pipe.get_sigmas(o), rng=per_sample_generators(seed, batch), eta=eta,
                            jumps=jumps, callback=callback)
    result = np.where(masks, pipe.decode(z), images)  # (B, 28, 28): known pixels from the input
    return (result, to_numpy(z)) if return_latents else result


# =========================================================================== inversion

def invert_latents(denoiser, z0, sigmas, *, iterations: int = 0, callback=None):
    """DDIM inversion: the Euler / DDIM (η = 0) step run backwards, from z0 at σ = 0 up to sigmas[0].

    Going down, the step σ → σ' is x' = x + (σ' − σ) · ε̂(x, σ), with ε̂(x, σ) = (x − D(x, σ))/σ.
    Going up from σ' to σ it would need ε̂ at the unknown end x; DDIM inversion uses the known
    point with the target's σ (as in null-text inversion, Mokady et al. 2022):

        x_σ = x_σ' + (σ − σ') · ε̂(x_σ', σ)      for σ' = 0 = σ_n < σ_{n−1} < … < σ_0

    The error of that approximation falls with the step size, so reconstructions improve with
    more steps. ``iterations`` > 0 refines each step by fixed-point iteration towards the exact
    inverse of the downward step, x_σ ← x_σ' + (σ − σ') · ε̂(x_σ, σ) (Pan et al. 2023), one more
    denoiser call per iteration. ``callback`` gets {"i", "x", "sigma", "sigma_next", "denoised"}
    for each step's first call, with σ < σ_next (the step goes up).
    """
    if not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise EditInputError(f"iterations must be an integer ≥ 0, got {iterations!r}")
    values = validate_sigmas(sigmas)[::-1]  # increasing: 0 = σ_n, σ_{n−1}, …, σ_0
    x = z0
    for i, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:])):
        denoised = denoiser(x, sigma_next)  # D at the current point and the higher σ
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
        x_next = x + (sigma_next - sigma) * to_d(x, sigma_next, denoised)
        for _ in range(iterations):  # ε̂ at the new point itself
            x_next = x + (sigma_next - sigma) * to_d(x_next, sigma_next, denoiser(x_next, sigma_next))
        x = x_next
    return x


def invert(pipe, image, prompt, *, steps=None, sigma_schedule=None, guidance_scale: float = 1.0,
           negative_prompt=None, sigma_max=None, iterations: int = 0, callback=None) -> np.ndarray:
    """The initial noise ε (N, 4, 8, 8) from which the deterministic sampler redraws ``image``.

    z0 = ``encode(image)`` is walked up the pipeline's σ grid by ``invert_latents`` (with
    ``iterations`` fixed-point refinements per step) and divided by σ_0, so ε is on the scale
    of the pipeline's noise. Regenerate with ``pipe(prompt, latents=ε, sampler="ddim", steps=…,
    guidance_scale=…)`` (or "euler", the same step) and the same steps, schedule, σ_max and guidance.
    Guidance defaults to 1 (the prompt alone): with w > 1 the guided x̂0 drifts from the one the
    inversion followed, and the reconstruction degrades (Mokady et al. 2022; ``measure_inversion``
    measures it).
    """
    images = load_images(image)
    batch = max(len(images), 1 if isinstance(prompt, str) else len(prompt))
    _match("images", len(images), batch)
    prompts = _prompts(prompt, batch)
    o = pipe.sampling_options(prompts, steps=steps, sigma_schedule=sigma_schedule, guidance_scale=guidance_scale,
                              sigma_max=sigma_max)
    refuse_lcm(o, "invert", DEFAULT_NOT_LCM)  # a pipeline whose default sampler is lcm: inversion reverses the U-Net's DDIM step
    denoiser = pipe.make_denoiser(prompts, negative_prompt, o.guidance_scale)
    sigmas = pipe.get_sigmas(o)  # (steps + 1,)
    with no_grad():
        x = invert_latents(denoiser, encode(pipe, _repeat(images, batch)), sigmas, iterations=iterations,
                           callback=callback)
    return to_numpy(x) / np.float32(sigmas[0])  # ε = z(σ_0)/σ_0


# =========================================================================== measurements

def held_out_digits(n: int | None = None, *, digit: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n of the 1,000 held-out digits (all, or only ``digit``s), drawn at random by ``seed``:
    (uint8 (n, 28, 28), labels (n,)). Never trained on (``train_test_split`` of the bundled set)."""
    images, labels = load_mnist()
    _, test = train_test_split(len(images))
    if digit is not None:
        test = test[labels[test] == digit]
    chosen = np.random.default_rng(seed).choice(test, size=min(n or len(test), len(test)), replace=False)
    return images[chosen], labels[chosen]


def _digit_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 digit sets over their 28×28 pixels, in the model's [−1, 1] range."""
    return psnr(a.astype(np.float64) / 127.5 - 1, b.astype(np.float64) / 127.5 - 1)


def measure_img2img(pipe, *, digit: int = 3, prompt: str = "an 8", target: int = 8,
                    strengths=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), n: int = 100, seed: int = 0, **options) -> list[dict]:
    """How far img2img moves held-out ``digit``s towards ``prompt``, for each strength.

    Per strength: class_change (fraction the evaluation classifier no longer reads as ``digit``),
    to_target (fraction read as ``target``), pixel_distance (mean |Δp|/255 against the input).
    """
    from .train.classifier import load_classifier

    classifier = load_classifier()
    images, _ = held_out_digits(n, digit=digit, seed=seed)
    rows = []
    for strength in strengths:
        edited = img2img(pipe, images, prompt, strength, seed=seed, **options)
        predicted = classifier.predict(to_model_range(edited))
        rows.append({"strength": strength, "class_change": float(np.mean(predicted != digit)),
                     "to_target": float(np.mean(predicted == target)),
                     "pixel_distance": float(np.mean(np.abs(edited.astype(float) - images)) / 255)})
    return rows


def bottom_half_mask(n: int) -> np.ndarray:
    """bool (n, 28, 28): True on rows 14–27, the lower half of each digit."""
    mask = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    mask[:, IMAGE_SIZE // 2:] = True
    return mask


def measure_inpainting(pipe, *, n: int = 100, jumps: int = 0, seed: int = 0, **options) -> dict:
    """Regenerate the bottom half of n held-out digits with "a handwritten {their digit}".

    accuracy: the classifier reads the intended digit; wrong_prompt_accuracy: the same with the
    next digit's prompt, (d + 1) mod 10 (how much the kept top half decides on its own);
    top_half_only_accuracy: the classifier on the top half alone (bottom half black);
    known_pixels_exact: every kept pixel equals the input's.
    """
    from .text.captions import DIGIT_WORDS
    from .train.classifier import load_classifier

    classifier = load_classifier()
    images, labels = held_out_digits(n, seed=seed)
    mask = bottom_half_mask(len(images))

    def accuracy(digits):
        out = inpaint(pipe, images, mask, [f"a handwritten {DIGIT_WORDS[d]}" for d in digits], jumps=jumps,
                      seed=seed, **options)
        return float(np.mean(classifier.predict(to_model_range(out)) == labels)), out

    right, out = accuracy(labels)
    wrong, _ = accuracy((labels + 1) % 10)
    top_half = classifier.predict(to_model_range(np.where(mask, 0, images)))  # bottom half black
    return {"accuracy": right, "wrong_prompt_accuracy": wrong,
            "top_half_only_accuracy": float(np.mean(top_half == labels)),
            "known_pixels_exact": bool(np.array_equal(out[~mask], images[~mask]))}


def measure_inversion(pipe, *, n: int = 100, steps=(20, 50), guidance_scales=(1.0, 2.0), iterations: int = 0,
                      seed: int = 0) -> list[dict]:
    """Invert n held-out digits under "a handwritten {digit}" and regenerate with DDIM.

    Per (steps, guidance): psnr_vs_vae (dB, against decode(z0), the best any latent can do),
    psnr_vs_input (dB, against the input digits), latent_rmse (‖z_regenerated − z0‖ per entry).
    """
    from .text.captions import DIGIT_WORDS

    images, labels = held_out_digits(n, seed=seed)
    prompts = [f"a handwritten {DIGIT_WORDS[d]}" for d in labels]
    z0 = to_numpy(encode(pipe, images))
    round_trip = pipe.decode(to_device(z0, pipe.backend))
    rows = []
    for count in steps:
        for w in guidance_scales:
            noise = invert(pipe, images, prompts, steps=count, guidance_scale=w, iterations=iterations)
            out, z = pipe(prompts, latents=noise, sampler="ddim", steps=count, guidance_scale=w, return_latents=True)
            rows.append({"steps": count, "guidance_scale": w, "iterations": iterations,
                         "psnr_vs_vae": _digit_psnr(out, round_trip), "psnr_vs_input": _digit_psnr(out, images),
                         "latent_rmse": float(np.sqrt(np.mean((z - z0) ** 2)))})
    return rows
