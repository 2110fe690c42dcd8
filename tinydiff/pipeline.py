"""Text → image: the whole of Stable Diffusion's sampling path, in miniature and written out.

    prompt ─► tokenizer ─► text encoder ─► token states (context) ─┐
                                                                   ▼
    seeded noise (4×8×8 latent) ─► denoising loop: denoiser + CFG + sampler ─► clean latent
                                                                   ▼
                                          VAE decoder ─► 32×32 image ─► uint8 (28×28 digits, 32×32 scenes)

``TextToImagePipeline.__call__`` runs the five steps of the seed article one after another:

1. **Tokenize and encode the prompt.** Words → ids → the text encoder's per-token hidden states
   c (B, L, D), which the U-Net's cross-attention reads. The negative prompt (or, without one,
   the U-Net's learned null context ∅) is encoded the same way: it is the "unconditional" side
   of classifier-free guidance.
2. **Start from noise.** z = σ_max · ε, with ε drawn on the CPU from one generator per image
   (image i of seed s uses seed s + i), so a picture depends on its seed only.
3. **Denoise step by step.** The sampler walks σ_0 > σ_1 > … > σ_n = 0; at each step the
   denoiser D(z, σ) runs the U-Net once on [∅; c] and combines
   x̂0 = x̂0(∅) + w · (x̂0(c) − x̂0(∅))   (Ho & Salimans 2022, eq. 6, on the x0 estimate).
4. **Decode.** x = VAE.decode(z_0 / scaling_factor) (Rombach et al. 2022: the diffusion model
   works on latents scaled to unit variance).
5. **Convert.** [−1, 1] → uint8, and for digits 32×32 → their native 28×28 (``PipelineConfig.image_size``).

The same pieces serve the editors (``tinydiff.editing``, also methods here): ``img2img`` starts the
loop part way down from a noised picture, ``inpaint`` puts the kept part of a picture back at
every step, ``invert`` runs the deterministic loop backwards to find a picture's noise, which
``pipe(prompt, latents=noise)`` turns back into the picture.

**The denoiser network** is a U-Net (``models.unet``) or a diffusion transformer
(``models.dit``): both take (z, t, context, mask) and return the prediction, and both carry the
learned null context. ``pipe.denoiser_net`` is that network and ``pipe.denoiser_type`` says which
("unet" or "dit"); ``pipe.unet`` is the same object under the name the pipeline had when the
U-Net was its only denoiser (kept so that code written for the U-Net keeps working).

A saved pipeline is one folder: ``model_index.json`` (format version, the denoiser type, the
diffusion settings, sampler defaults, and the sha256 of every other file), ``tokenizer.json``,
``text_encoder.npz``, the denoiser's weights — ``unet.npz`` or ``dit.npz`` — and ``vae.npz``
(tinydiff checkpoints: no pickle), and optionally
``image_encoder.npz``: CLIP's image tower, not needed to sample, kept so that ``tinydiff eval``
can measure CLIP's zero-shot accuracy, and ``lcm_unet.npz``: a consistency-distilled student of
the U-Net (``tinydiff.train.lcm``), which ``sampler="lcm"`` uses.

**LCM sampling.** With ``sampler="lcm"`` step 3 changes: the student's consistency function
f(z, σ, w) = c_skip·z + c_out·x̂0 (``diffusion.consistency``) jumps to a clean latent in one U-Net
call on B rows, with the guidance scale w as an *input* of the network (classifier-free guidance
is baked in, so no [∅; c] doubling and no negative prompt), and ``sample_lcm`` re-noises to the
next σ. Its σ grid defaults to ``trailing`` spacing below sigma_max (for 4 steps, timesteps
726, 544, 362, 181: the spacing of LCM's scheduler), not the Karras grid, whose last step at
σ_min would be wasted on f(z, σ_min) = z.

**The pipeline's own settings** (``PipelineConfig``, the optional "pipeline" section of
model_index.json; a folder without it has the defaults, which are how every pipeline behaved
before the section existed):

* ``image_size``: the side of the pictures ``pipe(...)`` returns. The VAE decodes 32×32; 28
  crops that to the MNIST digits' native 28×28 (``mnist-captions``), 32 keeps the whole canvas,
  which the scenes of ``tinydiff.data.scenes`` fill ("a 3 left of a 7": ``tinydiff train
  mnist-scenes`` saves 32). A scenes pipeline draws any prompt of words it knows; ``tinydiff
  sample`` takes only the four kinds of scene caption for it (``data.scenes.parse_caption``),
  since a prompt such as "a 3 left of a 3 above a 7" was never seen in training and has no
  defined picture.
* ``conditioning``: what the denoiser reads of the prompt. "tokens" (Stable Diffusion's way):
  all L token states. "pooled": only the text encoder's state at <eos> (the state CLIP pools),
  at position 0 of an otherwise zero context (``pooled_context``) — the ablation that asks
  whether one pooled vector holds "a 3 left of a 7" and "a 7 left of a 3" apart. Training wrote
  it (``RecipeConfig.conditioning``) so that sampling reads the prompt as training did.
* ``space``: "latent" (Stable Diffusion's way): the denoiser draws VAE latents, which step 4
  decodes. "pixel": it draws the 1×32×32 picture itself; the pipeline has no VAE (``vae`` is
  None, the folder has no vae.npz) and step 4 is skipped — the ablation of the autoencoder
  (``tinydiff train mnist-scenes --space pixel``). The editors work on latent pipelines only.

A scenes folder saved before ``image_size`` existed returns 28×28 crops; upgrading it rewrites
only its manifest (the weights stay byte for byte)::

    from tinydiff.pipeline import TextToImagePipeline
    pipe = TextToImagePipeline.from_pretrained(FOLDER)
    pipe.config.image_size = 32
    pipe.save_pretrained(FOLDER, only=[])  # only=[]: no component rewritten, model_index.json alone

Loading trusts nothing the manifest does not vouch for. The files loaded are a fixed set of
names (``COMPONENT_FILES``, the denoiser's file of ``DENOISER_FILES``, and ``OPTIONAL_FILES`` when
listed); the manifest must list every
one of them under exactly that name with the sha256 of its bytes, and nothing else. Anything
else — a file missing from the list, an unknown entry, a path of another name, a key of the
wrong type in any section, JSON that does not parse — makes ``from_pretrained`` refuse the
folder with one CheckpointError ("tampered or damaged model folder").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from . import editing
from .backend import backend_of, cpu_count, get_xp, map_row_pairs, map_rows, to_device, to_numpy
from .config import ConfigError, ConfigMixin
from .data.mnist import IMAGE_SIZE, from_model_range
from .data.scenes import CANVAS
from .diffusion import DiffusionConfig, Denoiser, get_sampler, get_sigmas, per_sample_generators, randn_per_sample
from .diffusion.consistency import ConsistencyFunction
from .diffusion.samplers import SAMPLERS
from .diffusion.schedules import SPACINGS
from .io import CheckpointError, atomic_write, load_checkpoint, load_json, save_checkpoint, sha256_file
from .models.autoencoder import AutoencoderConfig, AutoencoderKL
from .models.clip import ImageEncoder, ImageEncoderConfig, TextEncoder, TextEncoderConfig
from .models.dit import DiT, DiTConfig
from .models.unet import UNet, UNetConfig
from .nn import Module, no_grad, to_state_arrays
from .text.tokenizer import Tokenizer

MANIFEST_FORMAT = "tinydiff-pipeline"  # the "format" of model_index.json
PIPELINE_FORMAT = 1
COMPONENT_FILES = {"tokenizer": "tokenizer.json", "text_encoder": "text_encoder.npz", "vae": "vae.npz"}
# the denoiser network: its type (model_index.json's "denoiser", "unet" when absent) → its file; class and config
DENOISER_FILES = {"unet": "unet.npz", "dit": "dit.npz"}
DENOISERS = {"unet": (UNet, UNetConfig), "dit": (DiT, DiTConfig)}
PRETRAINED_MODELS = ("mnist-captions", "mnist-captions-dit", "mnist-scenes", "mnist-scenes-contrastive",
                     "mnist-scenes-pooled", "mnist-scenes-pixel")  # shipped in tinydiff/pretrained/
OPTIONAL_FILES = {"image_encoder": "image_encoder.npz", "lcm_unet": "lcm_unet.npz"}  # saved when the pipeline has one
LCM_SIGMA_SCHEDULE = "trailing"  # the σ grid of sampler="lcm" unless one is asked for (module docstring)
IMAGE_SIZES = (IMAGE_SIZE, CANVAS)  # PipelineConfig.image_size: 28, the digits' crop, or 32, the whole canvas
SPACES = ("latent", "pixel")  # PipelineConfig.space: the denoiser draws VAE latents, or the pixels themselves
CONDITIONINGS = ("tokens", "pooled")  # PipelineConfig.conditioning (module docstring)


class PromptError(ValueError):
    """A prompt the model cannot draw: empty, or made of words it has never seen."""


def pretrained_path(name: str = "mnist-captions") -> Path:
    """The folder of a pipeline shipped inside the package: ``mnist-captions`` (the U-Net, trained
    by the default recipe), ``mnist-captions-dit`` (the DiT, ``--denoiser dit``), ``mnist-scenes``
    (the U-Net of ``tinydiff train mnist-scenes``) or its ablations ``mnist-scenes-contrastive``
    (the text encoder trained by InfoNCE alone, ``--text-objective contrastive``),
    ``mnist-scenes-pooled`` (the U-Net reads the pooled prompt only, ``--conditioning pooled``) and
    ``mnist-scenes-pixel`` (no VAE: the U-Net draws the pictures themselves, ``--space pixel``)."""
    if name not in PRETRAINED_MODELS:
        raise ValueError(f"no shipped model named {name!r}; shipped: {', '.join(PRETRAINED_MODELS)}")
    return Path(str(resources.files("tinydiff") / "pretrained" / name))


def component_files(space: str) -> dict[str, str]:
    """The files every pipeline folder of ``space`` has besides its denoiser's: ``COMPONENT_FILES``,
    less vae.npz in pixel space (no autoencoder)."""
    return {n: f for n, f in COMPONENT_FILES.items() if not (space == "pixel" and n == "vae")}


def denoiser_type(net: Module) -> str:
    """"unet" or "dit": the key of ``DENOISERS`` whose class ``net`` is (ValueError otherwise)."""
    for name, (cls, _) in DENOISERS.items():
        if isinstance(net, cls):
            return name
    raise ValueError(f"the denoiser must be a {' or a '.join(c.__name__ for c, _ in DENOISERS.values())}, "
                     f"got {type(net).__name__}")


@dataclass
class SamplingDefaults(ConfigMixin):
    """A pipeline's sampling defaults (saved in model_index.json); also the checked options of one
    call, the defaults with the given ones in their place (``TextToImagePipeline.sampling_options``)."""

    sampler: str = "dpmpp_2m"  # DPM-Solver++ 2M (Lu et al. 2022)
    sigma_schedule: str = "karras"  # Karras et al. 2022 ρ = 7 spacing of σ
    steps: int = 20  # denoising steps (network evaluations, for 2M)
    guidance_scale: float = 2.0  # classifier-free guidance weight w (chosen by tinydiff eval: README model card)
    sigma_max: float | None = 14.6  # start of sampling (SD's σ_max); None: the training schedule's (157)

    def __post_init__(self):
        _check_options(self.steps, self.sampler, self.sigma_schedule, self.guidance_scale)
        if self.sigma_max is not None and not self.sigma_max > 0:
            raise ValueError(f"sigma_max must be positive (or None), got {self.sigma_max}")


@dataclass
class PipelineConfig(ConfigMixin):
    """What a pipeline returns and how its denoiser reads the prompt: model_index.json's optional
    "pipeline" section (absent: these defaults, the behaviour of every folder written before it)."""

    image_size: int = IMAGE_SIZE  # side of the returned pictures: 28 crops the decoded 32×32 (digits), 32 keeps it
    conditioning: str = "tokens"  # "tokens": the denoiser reads every token state; "pooled": <eos>'s alone
    space: str = "latent"  # "latent": the denoiser draws VAE latents (vae.npz decodes them); "pixel": the image itself

    def __post_init__(self):
        if self.image_size not in IMAGE_SIZES:
            raise ValueError(f"image_size must be one of {', '.join(map(str, IMAGE_SIZES))}, got {self.image_size!r}")
        check_conditioning(self.conditioning)
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")


def check_conditioning(conditioning: str) -> str:
    """``conditioning`` if it is one of CONDITIONINGS, else a ValueError naming the valid ones."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be {' or '.join(CONDITIONINGS)}, got {conditioning!r}")
    return conditioning


def pooled_context(hidden, mask):
    """The "pooled" conditioning: the text encoder's state at <eos> alone, as a denoiser context.

    hidden (B, L, D): the text encoder's token states; mask (B, L) bool: True for <bos> … <eos>.
    Returns c (B, L, D) with

        c[b, 0] = hidden[b, eos_b],   eos_b = Σ_l mask[b, l] − 1   (the state CLIP pools, models/clip.py)
        c[b, l] = 0                   for l ≥ 1

    so the denoiser's interface (a (B, L, D) context) is unchanged while all it can read of the
    prompt is one vector. The encoder is bidirectional, so that vector has seen every word; what
    it loses is a place per word for cross-attention to look up. Used by training
    (``train.latent_unet.CaptionConditioning``) and sampling (``encode_prompt``) alike.
    """
    xp = get_xp(hidden)
    batch = hidden.shape[0]
    eos = to_device(to_numpy(mask).sum(axis=1) - 1, backend_of(hidden))  # (B,) position of <eos>
    context = xp.zeros_like(hidden)  # (B, L, D)
    context[:, 0] = hidden[xp.arange(batch), eos]  # (B, D) into position 0
    return context


def denoiser_context(hidden, mask, conditioning: str):
    """The denoiser's context for text states under ``conditioning`` ("tokens": as they are;
    "pooled": ``pooled_context``), both (B, L, D)."""
    return pooled_context(hidden, mask) if check_conditioning(conditioning) == "pooled" else hidden


class TextToImagePipeline:
    """tokenizer + text encoder + U-Net + VAE + the diffusion settings they were trained with.

    ``diffusion`` may be a training config (``DiffusionTrainingConfig``): the pipeline keeps only
    its ``DiffusionConfig`` part, the settings sampling needs. ``unet`` (the third argument, named
    so when the U-Net was the only denoiser) is the denoiser network: a ``UNet`` or a ``DiT``
    (``denoiser_net``). ``lcm_unet``, optional, is the
    U-Net's consistency-distilled student (built with ``UNetConfig.guidance_embedding``).
    ``config`` (``PipelineConfig``, default: 28×28 digits, token conditioning) says what the
    pipeline returns and how the denoiser reads the prompt; ``image_size`` and ``conditioning``
    read it.
    """

    def __init__(self, tokenizer: Tokenizer, text_encoder: TextEncoder, unet: UNet | DiT, vae: AutoencoderKL | None,
                 diffusion: DiffusionConfig, defaults: SamplingDefaults | None = None,
                 image_encoder: ImageEncoder | None = None, lcm_unet: UNet | None = None,
                 config: PipelineConfig | None = None):
        self.denoiser_type = denoiser_type(unet)  # "unet" or "dit": which file it is saved to
        self.tokenizer, self.text_encoder, self.denoiser_net, self.vae = tokenizer, text_encoder, unet, vae
        self.image_encoder = image_encoder
        if lcm_unet is not None and not lcm_unet.config.guidance_embedding:
            raise ValueError("lcm_unet must be a consistency-distilled student (UNetConfig.guidance_embedding=True)")
        self.lcm_unet = lcm_unet
        self.threads: int | None = None  # CPU threads for the U-Net's rows (None: one per core)
        self._workers = None  # train.parallel.ForwardWorkers inside worker_processes(), else None
        self.diffusion = diffusion.sampling_config()
        self.defaults = defaults or SamplingDefaults()
        self.config = config or PipelineConfig()
        if (vae is None) != (self.config.space == "pixel"):
            raise ValueError("a pixel-space pipeline (PipelineConfig.space='pixel') has no VAE, a latent one needs one: "
                             f"got space={self.config.space!r} and vae={type(vae).__name__}")
        self.schedule = diffusion.make_schedule()
        for module in self._modules():
            module.eval()

    @property
    def image_size(self) -> int:
        """The side of the pictures the pipeline returns: 28 (digits, cropped) or 32 (the whole canvas)."""
        return self.config.image_size

    @property
    def conditioning(self) -> str:
        """What the denoiser reads of the prompt: "tokens" or "pooled" (``pooled_context``)."""
        return self.config.conditioning

    @property
    def unet(self) -> UNet | DiT:
        """The denoiser network under its U-Net-era name: ``denoiser_net`` (a ``DiT`` in a DiT pipeline)."""
        return self.denoiser_net

    def _modules(self) -> list[Module]:
        return [m for m in (self.text_encoder, self.denoiser_net, self.vae, self.image_encoder, self.lcm_unet)
                if m is not None]

    @property
    def backend(self) -> str:
        return backend_of(self.denoiser_net.parameters()[0].data)

    def to(self, backend: str) -> "TextToImagePipeline":
        """Move every network to ``backend`` ('numpy' or 'cupy')."""
        for module in self._modules():
            module.to(backend)
        return self

    # -- step 1: prompts → context ------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], *, strict: bool = True):
        """Prompts → the denoiser's context (B, L, D), on the model's backend: the text encoder's
        hidden states, or with ``conditioning="pooled"`` the <eos> state alone (``pooled_context``).

        With ``strict``, an empty prompt, one too long to fit (truncation would drop its end) or
        one with words outside the vocabulary raises PromptError naming them (the model has never
        seen those words: they would silently become <unk>).

        Each distinct prompt is encoded once (``tinydiff sample`` asks for one prompt N times),
        then its states are repeated (the same prompt gives the same states whatever the batch, up to
        float rounding of the matrix products when other distinct prompts share the call).
        """
        distinct = list(dict.fromkeys(prompts))  # in order of first appearance
        row = {prompt: i for i, prompt in enumerate(distinct)}
        if strict and (too_long := self.tokenizer.length_problem(distinct)):
            raise PromptError(too_long)
        tokens = self.tokenizer.encode(distinct)
        if strict:
            unknown = sorted({w for words in tokens.unknown_words for w in words})
            if unknown:
                raise PromptError(
                    f"words the model has never seen: {', '.join(unknown)} "
                    f"(it knows: {', '.join(sorted(self.tokenizer.words))})"
                )
            if any(int(m.sum()) <= 2 for m in tokens.mask):  # only <bos><eos>
                raise PromptError("the prompt is empty; describe a digit, e.g. \"a bold handwritten 7\"")
        with no_grad():
            hidden, _ = self.text_encoder(tokens.ids, tokens.mask)  # (distinct prompts, L, D)
        context = denoiser_context(hidden, tokens.mask, self.conditioning)  # (distinct prompts, L, D)
        return context[get_xp(context).asarray([row[p] for p in prompts])]  # (B, L, D)

    # -- the pieces the loop shares with the editors (tinydiff.editing) -----------------------------
    def sampling_options(self, prompts: list[str], *, steps: int | None = None, sampler: str | None = None,
                         sigma_schedule: str | None = None, guidance_scale: float | None = None,
                         sigma_max: float | None = None) -> SamplingDefaults:
        """The options of one call: each one given (not None) in place of the pipeline's default.

        Checked before any work (``SamplingDefaults`` checks its fields): a bad one raises a
        ValueError naming it and the valid values.
        """
        if not prompts:
            raise ValueError("num_images must be at least 1")
        given = {"steps": steps, "sampler": sampler, "sigma_schedule": sigma_schedule,
                 "guidance_scale": guidance_scale, "sigma_max": sigma_max}
        return dataclasses.replace(self.defaults, **{k: v for k, v in given.items() if v is not None})

    def get_sigmas(self, options: SamplingDefaults):
        """The σ grid ``options`` walks: σ_0 > σ_1 > … > σ_n = 0, (steps + 1,) (``schedules.get_sigmas``)."""
        return get_sigmas(self.schedule, options.steps, options.sigma_schedule, sigma_max=options.sigma_max)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        """(B, 4, 8, 8): the shape of the denoiser's latents (its in_channels and sample_size);
        (B, 1, 32, 32), the image itself, in pixel space."""
        c = self.denoiser_net.config
        return (batch, c.in_channels, c.sample_size, c.sample_size)

    def make_denoiser(self, prompts: list[str], negative_prompt: str | None, guidance_scale: float) -> Denoiser:
        """Step 1: the prompts as token states, inside D(z, σ) with classifier-free guidance."""
        context = self.encode_prompt(prompts)  # (B, L, D)
        if negative_prompt:
            uncond = self.encode_prompt([negative_prompt] * len(prompts))
        else:
            uncond = self.denoiser_net.null_context(len(prompts))  # (B, L, D): the "no prompt" context learned in training
        # the U-Net runs on blocks of rows in parallel, one per CPU core (threads, or the worker
        # processes of worker_processes()), unless an attention callback is watching it (it would see
        # half-batches from two threads); with guidance each block holds both halves of its images
        # (backend.map_row_pairs), which the U-Net runs partly once
        net, pairs = self.denoiser_net, guidance_scale != 1
        threads = 1 if net.has_attention_callbacks else self.threads
        split = map_row_pairs if pairs else map_rows
        workers = None if net.has_attention_callbacks else self._workers

        def model(x, t, c):
            return split(net, x, t, c, threads=threads) if workers is None else workers(x, t, c, pairs=pairs)

        return Denoiser(model, self.schedule,
                        self.diffusion.prediction_type, context=context, uncond_context=uncond,
                        guidance_scale=guidance_scale)

    @contextlib.contextmanager
    def worker_processes(self, count: int | None = None):
        """Inside ``with pipe.worker_processes():`` the denoiser's rows are shared with ``count``
        worker processes (default: one per core beyond the first, or per thread of ``pipe.threads``)
        instead of threads, for batch work: ``tinydiff eval``, ``tinydiff sample`` with many
        images, a chapter's loops. Threads share Python's interpreter lock among the thousands of
        small NumPy calls of a forward pass; processes do not. On the project's 2-core machines
        64 images in 20 steps took 0.88-0.92 s this way against 1.11-1.32 s on two threads
        (benchmarks/README.md). Starting the workers costs about half a second, which only a batch
        wins back, so a single call of the pipeline keeps its threads. The images are the same
        either way (bit for bit). On CuPy, on one core, or with an attention callback, nothing
        changes. As with any code that starts processes, a script must call this under
        ``if __name__ == "__main__":`` (the CLI and notebooks need nothing)."""
        threads = cpu_count() if self.threads is None else self.threads
        count = threads - 1 if count is None else count
        if count < 1 or self.backend != "numpy" or self._workers is not None:
            yield self
            return
        from .train.parallel import ForwardWorkers

        self._workers = ForwardWorkers(self.denoiser_net, count)
        try:
            yield self
        finally:
            self._workers.close()
            self._workers = None

    def missing_student_message(self) -> str:
        """The one-line error for ``sampler="lcm"`` on a pipeline without a distilled student."""
        return ("this model has no consistency-distilled student (lcm_unet.npz), so it cannot sample with lcm; "
                "distil one from a training run with: tinydiff train mnist-captions --out RUN --stages lcm, "
                "or choose another sampler")

    def make_consistency_function(self, prompts: list[str], negative_prompt: str | None,
                                  guidance_scale: float) -> ConsistencyFunction:
        """Step 1 for ``sampler="lcm"``: the prompts as token states, inside the student's
        consistency function f(z, σ), one U-Net call on B rows with w as its input."""
        if self.lcm_unet is None:
            raise ValueError(self.missing_student_message())
        if negative_prompt:
            raise ValueError("sampler lcm bakes guidance against the learned null context into the student: "
                             "it takes no negative prompt (leave it out, or use another sampler)")
        context = self.encode_prompt(prompts)  # (B, L, D)
        w = to_device(np.full(len(prompts), guidance_scale), self.backend, dtype=context.dtype)  # (B,)
        threads = 1 if self.lcm_unet.has_attention_callbacks else self.threads

        def model(x, t, c):
            return map_rows(lambda x_, t_, c_, w_: self.lcm_unet(x_, t_, c_, w=w_), x, t, c, w, threads=threads)

        denoiser = Denoiser(model, self.schedule, self.diffusion.prediction_type, context=context)
        return ConsistencyFunction(denoiser, self.schedule)

    def decode(self, z0) -> np.ndarray:
        """Steps 4–5: clean latents (B, 4, 8, 8) → uint8 pictures (B, S, S), S = ``image_size``:
        28, the digits' central crop, or 32, the whole canvas (scenes). In pixel space the
        "latents" are the pictures already (B, 1, 32, 32): step 4 is skipped."""
        if self.vae is None:
            x = z0  # pixel space: (B, 1, 32, 32) in [−1, 1] (clipped by the conversion)
        else:
            with no_grad():
                # 4. latents → pixels
                x = map_rows(self.vae.decode_from_diffusion, z0, threads=self.threads)  # (B, 1, 32, 32) in [−1, 1]
        # 5. pixels → uint8, cropped to the digits' 28×28 or the whole 32×32
        return from_model_range(x, crop=self.image_size == IMAGE_SIZE)  # (B, S, S) uint8

    # -- the whole loop -------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], negative_prompt: str | None = None, num_images: int = 1,
                 steps: int | None = None, sampler: str | None = None, sigma_schedule: str | None = None,
                 guidance_scale: float | None = None, seed: int | None = None, callback=None,
                 return_latents: bool = False, sigma_max: float | None = None, latents=None):
        """Generate images: uint8 (N, S, S), S = ``image_size`` (28 for digits, 32 for scenes), and the
        final latents (N, 4, 8, 8) if asked.

        ``prompt`` is one prompt for ``num_images`` images, or a list (one image each). ``seed``
        fixes every image: image i uses seed + i, so a batch equals separate runs. ``callback``
        receives the sampler's per-step dict {"i", "x", "sigma", "sigma_next", "denoised"}.
        ``sigma_max`` caps the starting noise level (``schedules.get_sigmas`` says why).
        ``latents``, unit-variance noise (N, 4, 8, 8) (e.g. from ``invert``), replaces the seeded
        draw: the loop starts at σ_0 · latents and makes N images (``seed`` still drives the step
        noise of stochastic samplers), so the seed's own draw as latents gives exactly
        ``pipe(prompt, seed=seed)``, with any sampler.
        """
        if latents is not None:
            latents = editing.check_noise(latents, self.latent_shape(1)[1:])  # (N, 4, 8, 8) float32
            num_images = len(latents)
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
        if latents is not None and len(prompts) != len(latents):
            raise editing.EditInputError(f"got {len(prompts)} prompts for {len(latents)} latents; "
                                         "give one prompt, or one per latent")
        o = self.sampling_options(prompts, steps=steps, sampler=sampler, sigma_schedule=sigma_schedule,
                                  guidance_scale=guidance_scale, sigma_max=sigma_max)
        batch = len(prompts)
        lcm = o.sampler == "lcm"
        if lcm and sigma_schedule is None:
            o = dataclasses.replace(o, sigma_schedule=LCM_SIGMA_SCHEDULE)

        # 1. the prompt (and the negative prompt, or the learned null context) as token states,
        #    held by the denoiser D(z, σ), which runs the U-Net on [∅; c] and applies CFG
        #    (for lcm: by the student's consistency function f(z, σ), one call on [c] with w as input)
        if lcm:
            denoiser = self.make_consistency_function(prompts, negative_prompt, o.guidance_scale)
        else:
            denoiser = self.make_denoiser(prompts, negative_prompt, o.guidance_scale)

        # 2. Gaussian noise at the largest σ: seeded (image i from seed + i), or the latents given.
        #    The seeded draw is made either way, so a stochastic sampler's step noise (drawn next
        #    from the same generators) is the seed's whether or not latents replace the start.
        sigmas = self.get_sigmas(o)  # (steps + 1,), ends with 0
        generators = per_sample_generators(seed, batch)
        noise = randn_per_sample(generators, self.latent_shape(batch))  # ε (B, 4, 8, 8), on the CPU
        if latents is not None:
            noise = latents
        z = to_device(noise, self.backend) * float(sigmas[0])  # z = σ_0 · ε

        # 3. the denoising loop (the sampler calls D(z, σ) once or twice per step)
        with no_grad():
            extra = {"sigma_min": self.schedule.sigma_min} if lcm else {}  # f's boundary (sample_lcm)
            z0 = get_sampler(o.sampler)(denoiser, z, sigmas, rng=generators, callback=callback, **extra)
        # 4. latents → pixels (VAE decoder) and 5. pixels → uint8 digits
        images = self.decode(z0)  # (B, S, S) uint8
        return (images, to_numpy(z0)) if return_latents else images

    # -- editing (tinydiff.editing) -------------------------------------------------------------------
    def img2img(self, image, prompt, strength: float = 0.6, **options):
        """Redraw digits under a prompt, keeping 1 − strength of the way (SDEdit): ``editing.img2img``."""
        return editing.img2img(self, image, prompt, strength, **options)

    def inpaint(self, image, mask, prompt, *, jumps: int = 0, eta: float = 1.0, **options):
        """Regenerate the masked pixels under a prompt (RePaint): ``editing.inpaint``."""
        return editing.inpaint(self, image, mask, prompt, jumps=jumps, eta=eta, **options)

    def invert(self, image, prompt, *, steps: int | None = None, guidance_scale: float = 1.0, iterations: int = 0,
               **options) -> np.ndarray:
        """The noise (N, 4, 8, 8) from which ``pipe(prompt, latents=noise, sampler="ddim")`` redraws
        ``image`` (DDIM inversion): ``editing.invert``."""
        return editing.invert(self, image, prompt, steps=steps, guidance_scale=guidance_scale,
                              iterations=iterations, **options)

    # -- saving and loading -----------------------------------------------------------------------
    def save_pretrained(self, path, *, only: list[str] | None = None) -> None:
        """Write the pipeline folder; the manifest (written last) records each file's sha256.

        ``only`` names the components to write (e.g. ``["lcm_unet"]`` to add a student to a
        folder): the others' files must already be there, are left byte for byte as they are,
        and are hashed as found.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        files = {**component_files(self.config.space), self.denoiser_type: DENOISER_FILES[self.denoiser_type]}
        for name, file in OPTIONAL_FILES.items():
            if getattr(self, name) is not None:
                files[name] = file
        write = set(files) if only is None else set(only)
        if write - set(files):
            raise ValueError(f"cannot write {sorted(write - set(files))}: this pipeline has {sorted(files)}")
        kept = [f for name, f in files.items() if name not in write and not (path / f).is_file()]
        if kept:
            raise ValueError(f"{path} lacks {', '.join(kept)}: save the whole pipeline (only=None)")
        if "tokenizer" in write:
            tokenizer_json = json.dumps(self.tokenizer.to_dict(), indent=2, sort_keys=True) + "\n"
            atomic_write(path / COMPONENT_FILES["tokenizer"], lambda f: f.write(tokenizer_json.encode("utf-8")))
        for name in files:
            if name != "tokenizer" and name in write:
                module: Module = self.denoiser_net if name == self.denoiser_type else getattr(self, name)
                save_checkpoint(path / files[name], to_state_arrays(module), kind=name, config=module.config.to_dict())
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": PIPELINE_FORMAT,
            "denoiser": self.denoiser_type,
            "diffusion": self.diffusion.to_dict(),
            "sampling_defaults": self.defaults.to_dict(),
            "pipeline": self.config.to_dict(),
            "files": {name: {"path": f, "sha256": sha256_file(path / f)} for name, f in files.items()},
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        atomic_write(path / "model_index.json", lambda f: f.write(text.encode("utf-8")))

    @classmethod
    def from_pretrained(cls, path=None, *, backend: str | None = None) -> "TextToImagePipeline":
        """Load a pipeline folder (default: the shipped weights), verifying every file it loads.

        ``path`` is a folder, or the name of a shipped pipeline (``PRETRAINED_MODELS``; a folder of
        the same name is read when given as a ``Path`` or with a directory part, e.g. "./mnist-captions-dit").

        Raises CheckpointError (one line) for a folder that is not a pipeline, a manifest of
        another version, and anything the manifest does not vouch for (``read_manifest``).
        """
        if path is None or (isinstance(path, str) and path in PRETRAINED_MODELS):
            path = pretrained_path(path or "mnist-captions")
        path = Path(path)
        index = path / "model_index.json"
        if not index.is_file():
            raise CheckpointError(f"{path} is not a tinydiff pipeline folder (no model_index.json)")
        diffusion, defaults, files, denoiser, config = read_manifest(path)

        def load(name: str, build) -> Module:
            """The checkpoint of component ``name``, its network built from the config it records."""
            arrays, header = load_checkpoint(path / files[name], kind=name)
            try:
                module = build(header["config"])
                module.load_state_dict(arrays)
            except (ConfigError, ValueError, KeyError) as err:  # the sha256 matched: written by another tinydiff?
                raise _damaged(path, f"{files[name]} does not hold a {name} this tinydiff can build ({err})") from None
            return module

        try:
            tokenizer = Tokenizer.from_dict(load_json(path / files["tokenizer"]))
        except ValueError as err:
            raise _damaged(path, f"{files['tokenizer']} is not a tokenizer ({err})") from None
        text_encoder = load("text_encoder", lambda c: TextEncoder(TextEncoderConfig.from_dict(c)))
        net_class, net_config = DENOISERS[denoiser]
        denoiser_net = load(denoiser, lambda c: net_class(net_config.from_dict(c)))
        vae = load("vae", lambda c: AutoencoderKL(AutoencoderConfig.from_dict(c))) if "vae" in files else None
        image_encoder = lcm_unet = None
        if "image_encoder" in files:
            image_encoder = load("image_encoder", lambda c: ImageEncoder(ImageEncoderConfig.from_dict(c)))
        if "lcm_unet" in files:
            lcm_unet = load("lcm_unet", lambda c: UNet(_student_config(c)))
        pipe = cls(tokenizer, text_encoder, denoiser_net, vae, diffusion, defaults, image_encoder=image_encoder,
                   lcm_unet=lcm_unet, config=config)
        return pipe.to(backend) if backend else pipe


def _student_config(config: dict) -> UNetConfig:
    """The config of an lcm_unet file: a U-Net with a guidance embedding, or a ValueError."""
    config = UNetConfig.from_dict(config)
    if not config.guidance_embedding:
        raise ValueError("it is a U-Net without the guidance embedding of a distilled student")
    return config


def _damaged(folder: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{folder} is a tampered or damaged model folder: {problem}; "
                           "restore the folder from where it came from, or retrain")


def read_manifest(folder: Path) -> tuple[DiffusionConfig, SamplingDefaults, dict[str, str], str, PipelineConfig]:
    """Check ``folder/model_index.json`` and the files it lists:
    (diffusion, defaults, {component: file}, denoiser type, pipeline config).

    Optionally the manifest says "denoiser": a key of DENOISERS ("unet" or "dit"); without it the
    folder is a U-Net pipeline (every folder written before the DiT). The denoiser's own name is
    then a required component (its file in DENOISER_FILES), and the other denoiser's name is an
    unknown entry.

    Optionally it has a "pipeline" section, a ``PipelineConfig`` (image size, conditioning); without
    it the folder has the defaults (28×28 digits, token conditioning: every folder written before it).

    The manifest must be a JSON object with exactly the keys "format", "format_version",
    "diffusion", "sampling_defaults" and "files" (besides the optional two). "files" maps every
    name of COMPONENT_FILES (and, optionally, of OPTIONAL_FILES) to {"path": its fixed file name,
    "sha256": 64 hex digits} and names nothing else; each file's bytes must hash to its sha256.
    The config sections must be complete configs of the right types (the "pipeline" section: of
    known keys and values). Any deviation is a CheckpointError saying the folder was tampered
    with or damaged; a manifest of another format version says so.
    """
    index = folder / "model_index.json"
    try:
        manifest = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _damaged(folder, f"model_index.json is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise _damaged(folder, "model_index.json is not a JSON object")
    expected_keys = {"format", "format_version", "diffusion", "sampling_defaults", "files"}
    optional_keys = {"denoiser", "pipeline"}
    if set(manifest) - optional_keys != expected_keys:
        problems = [f"missing {k!r}" for k in sorted(expected_keys - set(manifest))]
        problems += [f"unknown {k!r}" for k in sorted(set(manifest) - expected_keys - optional_keys)]
        raise _damaged(folder, f"model_index.json has the wrong sections ({', '.join(problems)})")
    if manifest["format"] != MANIFEST_FORMAT:
        raise _damaged(folder, f"model_index.json is not a {MANIFEST_FORMAT} manifest")
    if manifest["format_version"] != PIPELINE_FORMAT:
        raise CheckpointError(f"{index} has pipeline format version {manifest['format_version']!r}; "
                              f"this tinydiff reads version {PIPELINE_FORMAT}")
    try:
        diffusion = DiffusionConfig.from_dict(manifest["diffusion"])
        defaults = SamplingDefaults.from_dict(manifest["sampling_defaults"])
        config = PipelineConfig.from_dict(manifest.get("pipeline", {}))
    except ValueError as err:  # ConfigError, or a value the config refuses
        raise _damaged(folder, f"model_index.json has a bad config section ({err})") from None

    denoiser = manifest.get("denoiser", "unet")
    if not isinstance(denoiser, str) or denoiser not in DENOISERS:
        raise _damaged(folder, f"model_index.json names the denoiser {denoiser!r}, not one of {', '.join(DENOISERS)}")
    listed = manifest["files"]
    if not isinstance(listed, dict):
        raise _damaged(folder, '"files" in model_index.json is not a JSON object')
    required = {**component_files(config.space), denoiser: DENOISER_FILES[denoiser]}
    known = {**required, **OPTIONAL_FILES}
    unknown = sorted(set(listed) - set(known))
    missing = sorted(set(required) - set(listed))
    if unknown or missing:
        problems = [f"{n!r} is not listed" for n in missing] + [f"unknown entry {n!r}" for n in unknown]
        raise _damaged(folder, f"model_index.json lists the wrong files ({', '.join(problems)})")
    files = {}
    for name, entry in listed.items():
        if not (isinstance(entry, dict) and set(entry) == {"path", "sha256"}
                and isinstance(entry["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise _damaged(folder, f'the entry {name!r} of model_index.json is not {{"path": ..., "sha256": ...}}')
        if entry["path"] != known[name]:  # also refuses paths that leave the folder
            raise _damaged(folder, f"the {name} file must be {known[name]!r}, model_index.json says {entry['path']!r}")
        file = folder / known[name]
        if not file.is_file():
            raise _damaged(folder, f"{known[name]} is missing")
        if sha256_file(file) != entry["sha256"]:
            raise _damaged(folder, f"{known[name]} does not match its sha256 in model_index.json")
        files[name] = known[name]
    return diffusion, defaults, files, denoiser, config


def _check_options(steps, sampler, sigma_schedule, guidance_scale) -> None:
    """Clear errors for options the loop cannot run with, before any work is done."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    if sigma_schedule not in SPACINGS:
        raise ValueError(f"unknown sigma schedule {sigma_schedule!r}; valid: {', '.join(SPACINGS)}")
    if not np.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number ≥ 0, got {guidance_scale}")
