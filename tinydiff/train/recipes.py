"""Recipe ``mnist-captions``: train the whole text-to-image system on the bundled digits.

Three stages, in order, each checkpointed so an interrupted run resumes where it stopped:

    clip   contrastive text/image encoders  (train/clip.py)         → the text encoder
    vae    KL autoencoder 1×32×32 ↔ 4×8×8    (train/autoencoder.py)  → latents and the decoder
    unet   text-conditional latent U-Net     (train/latent_unet.py)  → the denoiser

and an optional fourth, run only when asked for (``--stages lcm``, once the three exist):

    lcm    consistency distillation of the U-Net (train/lcm.py)      → a 1–4 step student

then the EMA weights of the three are assembled into a ``TextToImagePipeline`` saved in
``OUT/model``, with a loss plot per stage and a grid of samples.

The clip and vae stages do not depend on each other and each runs on one core (their matrix
products are too small to share), so with two or more cores (``RecipeConfig.threads``, default
one per core) the vae stage trains in a spawned process of its own while the clip stage trains in
the main one: the same arithmetic, so the same checkpoints, as one after the other, in about the
clip stage's time instead of both (``tests/test_recipe_stages.py``). As with the U-Net's gradient
workers, a script that trains must do so under ``if __name__ == "__main__":``.

**The denoiser's weight average** is a power-function EMA (``RecipeConfig.ema_power`` γ = 16,
``nn.optim.EMA``): β_t = (1 − 1/t)^17 averages about the last t/18 steps of a t-step run, where a
constant β = 0.999 averages the last ~1,000 from step 0 on and, a few thousand steps in, still
holds the early weights. The live weights, and so every training step, are the same either way;
only what the recipe ships early in a run changes (README, "Time to quality").

**The DiT instead of the U-Net** (``RecipeConfig.denoiser = "dit"``, ``tinydiff train
mnist-captions --denoiser dit``): the third stage is named ``dit`` and trains the diffusion
transformer of ``latent_dit_config`` (checkpoint OUT/dit/state.npz), and the pipeline is saved
in OUT/model-dit, beside a U-Net's OUT/model, so both denoisers can be trained on the CLIP and
VAE stages of one run. ``dit_recipe()`` holds the shipped DiT's settings. With
``encoders=FOLDER`` (``--encoders``), the tokenizer, text encoder and VAE are taken from a
pipeline folder (or a shipped pipeline's name) instead of the clip and vae stages: the shipped
DiT was trained on the shipped U-Net pipeline's, so the two differ only in their denoiser.

A run may train only some stages (``stages=("clip", "vae")``): the U-Net stage needs the
checkpoints of the two before it, and the pipeline is assembled only once all three
checkpoints exist; until then ``train_mnist_captions`` returns None.

**Scenes** (``RecipeConfig.data = "scenes"``, ``tinydiff train mnist-scenes``): the same stages
on ``scene_count`` scenes of several training digits (``tinydiff.data.scenes``: "a 3 left of a
7", "two 7s", "the number 42", "a small 5"), with the scenes' tokenizer, so that the failures
of compositional prompts can be measured (``tinydiff.evaluate_scenes``, ``tinydiff eval``).
Scenes use the whole 32×32 canvas: their pipeline is saved with ``image_size=32``
(``pipeline.PipelineConfig``), so it returns the canvas uncropped. Their settings are
``scenes_recipe()``'s: a token-level text objective, cross-attention at 8×8, min-SNR weighting at
a larger learning rate, 11,000 U-Net steps and guidance 4, each of which the flags below undo, one
at a time, for the ablations of the article's failure modes.

**Pooled conditioning** (``RecipeConfig.conditioning = "pooled"``, ``tinydiff train mnist-scenes
--conditioning pooled``): the ablation of the denoiser's text input. It reads only the text
encoder's state at <eos> (``pipeline.pooled_context``) instead of every token's, in training and,
saved in the pipeline's manifest, in sampling. With ``encoders`` (``--encoders MODEL``) it reuses
a finished run's text encoder and VAE and trains the denoiser alone, so the two runs differ in
the conditioning only. The lcm stage distils with token conditioning and is not offered.

**A token-level text objective** (``RecipeConfig.text_objective = "slots"``, ``tinydiff train
mnist-scenes --text-objective slots``): a richer text encoder. The clip stage adds to
InfoNCE a loss on the token states, each digit token predicting the slot its digit occupies
(``train.clip``, ``data.scenes.token_slot_labels``), a miniature of a T5-style encoder whose
training makes every token's state describe its role. Only the text encoder's training changes.
It is the scenes recipe's default; ``--text-objective contrastive`` is its ablation.

**Cross-attention at 8×8 too** (``RecipeConfig.unet_attention = "8x8"``, ``--unet-attention
8x8``): the latent U-Net reads the prompt at its 8×8 level as well as at 4×4 and in the mid
block (``latent_unet_config(attention_at_8x8=True)``). On scenes it places two digits by their
roles far better (README, Scenes), at about 1.6 times the training time; the scenes recipe's
default, ``--unet-attention 4x4`` its ablation.

**Pixel space** (``RecipeConfig.space = "pixel"``, ``tinydiff train mnist-scenes --space pixel``,
``pixel_recipe()``): the ablation of the autoencoder. There is no vae stage: the U-Net
(``latent_unet.pixel_space_unet_config``, as many weights as the latent one) denoises the 1×32×32
pictures themselves, and the pipeline is saved without a VAE (``PipelineConfig.space``). It asks
whether the latent compression is what loses small digits and numbers, at the price latent
diffusion was invented to avoid: 4.7 times the arithmetic per image and step, so about 4 times the
training time for the same steps.

Folder layout::

    OUT/clip/state.npz   OUT/vae/state.npz   OUT/unet/state.npz    training state (resumable)
    OUT/lcm/state.npz                                               the student's, if distilled
    OUT/dit/state.npz                                               the DiT's, with denoiser="dit"
    OUT/<stage>/loss.png                                            loss curves
    OUT/model/                                                      the pipeline (from_pretrained)
    OUT/model-dit/   OUT/samples-dit.png                            the same with denoiser="dit"
    OUT/samples.png                                                 "a handwritten 0" … "9" (scenes: SHOWCASE_PROMPTS)
    OUT/samples_lcm.png                                             the same by the student, 4 steps
    OUT/recipe.json                                                 settings, wall time and peak memory per stage
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..backend import blas_threads, cpu_count
from ..config import ConfigMixin
from ..io import load_checkpoint, load_json, save_json
from ..data.mnist import IMAGE_SIZE
from ..data.scenes import CANVAS, SHOWCASE_PROMPTS, load_scene_data, scene_tokenizer
from ..models.clip import CLIPConfig, TextEncoderConfig
from ..models.dit import DiT
from ..models.unet import UNet
from ..pipeline import PipelineConfig, SamplingDefaults, TextToImagePipeline, check_conditioning
from ..text.tokenizer import Tokenizer
from .autoencoder import default_loop as vae_default_loop
from .autoencoder import load_autoencoder, train_autoencoder
from .clip import TEXT_OBJECTIVES, CaptionedDigits, load_captioned_mnist, load_clip, train_clip
from .clip import default_loop as clip_default_loop
from .diffusion import DiffusionTrainingConfig
from .latent_unet import latent_dit_config, latent_unet_config, pixel_space_unet_config, train_latent_unet
from .lcm import LCMConfig, make_student, train_lcm
from .loop import LoopConfig, checkpoint_weights

BASE_STAGES = ("clip", "vae", "unet")  # what a pipeline needs; the default
STAGES = BASE_STAGES + ("lcm",)  # lcm: the optional consistency-distilled student
DENOISERS = ("unet", "dit")  # RecipeConfig.denoiser; the denoiser stage is named after it
DATASETS = ("digits", "scenes")  # RecipeConfig.data: mnist-captions trains on digits, mnist-scenes on scenes
SPACES = ("latent", "pixel")  # RecipeConfig.space: the denoiser works on VAE latents or on the pictures
UNET_ATTENTIONS = ("4x4", "8x8")  # RecipeConfig.unet_attention: the finest latent U-Net level with text cross-attention


@dataclass
class RecipeConfig(ConfigMixin):
    clip_steps: int = 1200  # contrastive steps at batch 128
    vae_steps: int = 600  # autoencoder steps at batch 32
    unet_steps: int = 6000  # latent U-Net steps (the denoiser stage's, a DiT's too)
    unet_batch_size: int = 64  # latents per U-Net step
    unet_lr: float = 1e-3  # peak learning rate of the U-Net
    ema_power: float | None = 16.0  # the denoiser's weight average: power-function EMA γ (nn.optim.EMA); None: β = 0.999
    schedule: str = "linear"  # the U-Net's β schedule (diffusion.schedules.SCHEDULES)
    denoiser: str = "unet"  # the denoiser stage's network: "unet" (latent_unet_config) or "dit" (latent_dit_config)
    loss_weighting: str = "plain"  # the denoiser's loss: plain (DDPM eq. 14) or min_snr (Hang et al. 2023, γ = 5)
    encoders: str | None = None  # a pipeline folder or shipped name: its tokenizer, text encoder, VAE replace clip, vae
    clip_batch_size: int = 128  # image–caption pairs per contrastive step
    train_subset: int | None = None  # use only the first N training digits (smoke runs)
    seed: int = 0  # seeds every stage's initial weights and data order
    threads: int | None = None  # CPU cores sharing each U-Net batch, in worker processes (None: one per core)
    lcm_steps: int = 800  # consistency-distillation steps (stage lcm, train/lcm.py)
    lcm_batch_size: int = 32  # latents per distillation step
    lcm_lr: float = 2e-4  # peak learning rate of the student (it starts from the trained U-Net)
    lcm_loss: str = "huber"  # the distance of the consistency loss: huber (pseudo-Huber) or l2
    data: str = "digits"  # DATASETS: single captioned digits, or scenes of several (tinydiff.data.scenes)
    scene_count: int = 30000  # data="scenes": training scenes drawn (train_subset, if set, instead)
    conditioning: str = "tokens"  # the denoiser's text input: every token state, or "pooled" (<eos>'s alone)
    text_objective: str = "contrastive"  # the clip stage's loss: InfoNCE, or "slots": InfoNCE + each digit token's slot
    space: str = "latent"  # SPACES: the U-Net denoises VAE latents, or ("pixel") the pictures, with no vae stage
    unet_attention: str = "4x4"  # UNET_ATTENTIONS: cross-attention at 4×4 (and mid), or "8x8": at the 8×8 level too
    guidance_scale: float = 2.0  # the saved pipeline's default classifier-free guidance w (SamplingDefaults)


def quick_recipe() -> RecipeConfig:
    """A smoke run of well under a minute: every code path, no useful model."""
    return RecipeConfig(clip_steps=6, vae_steps=6, unet_steps=6, unet_batch_size=8, clip_batch_size=16,
                        train_subset=256, lcm_steps=4, lcm_batch_size=4)


def dit_recipe() -> RecipeConfig:
    """The shipped DiT's settings (``mnist-captions-dit``): ``latent_dit_config``, 6,000 steps of 64
    latents (the U-Net's count) at peak learning rate 2·10⁻³, min-SNR loss weighting (Hang et al.
    2023 report it speeds up the convergence of transformer denoisers most), everything else as the
    U-Net's recipe (the power-function EMA included).

    At the U-Net's learning rate of 10⁻³ the DiT needed 8,000 steps for 97% prompt accuracy
    (96.4% and 3.3× the FD floor at 6,000, with this EMA or the constant one); at 2·10⁻³ it
    reaches 97.7% and 2.96× in 6,000 (``tinydiff train mnist-captions --denoiser dit --encoders
    mnist-captions``, README)."""
    return RecipeConfig(denoiser="dit", unet_steps=6000, unet_lr=2e-3, loss_weighting="min_snr")


def pixel_recipe() -> RecipeConfig:
    """The pixel-space ablation's settings (``space="pixel"``, ``tinydiff train mnist-scenes --space
    pixel``): the U-Net of ``pixel_space_unet_config`` for the latent U-Net's 6,000 steps of 64, with
    min-SNR weighting (Hang et al. 2023), which pixel diffusion needs most in a short run
    (``train.pixel_digits``), at peak learning rate 2·10⁻³. The same steps take about 4 times
    as long (4.7 times the arithmetic per step); ``--steps`` gives the run of equal time instead
    (README, Scenes)."""
    return RecipeConfig(space="pixel", unet_lr=2e-3, loss_weighting="min_snr")


def digits_recipe(denoiser: str = "unet", space: str = "latent") -> RecipeConfig:
    """The ``mnist-captions`` recipe's settings for a denoiser and a space (``tinydiff train
    mnist-captions [--denoiser dit | --space pixel]``): ``dit_recipe()``, ``pixel_recipe()`` or the
    defaults of ``RecipeConfig``."""
    return dit_recipe() if denoiser == "dit" else pixel_recipe() if space == "pixel" else RecipeConfig()


def scenes_recipe(denoiser: str = "unet", space: str = "latent") -> RecipeConfig:
    """The ``mnist-scenes`` recipe's settings (``tinydiff train mnist-scenes``): the changes that,
    together, make the latent U-Net place two digits by their roles (README, "Scenes"), each one an
    ablation of its own:

    * the clip stage's token-level objective (``text_objective="slots"``): every digit token's
      state is trained to say which slot its digit occupies, the miniature of a T5-style encoder;
    * cross-attention at the 8×8 level too (``unet_attention="8x8"``): the prompt is read where a
      latent pixel still knows which half of the canvas it is in;
    * min-SNR loss weighting (Hang et al. 2023) at peak learning rate 2·10⁻³, ``dit_recipe``'s;
    * 11,000 U-Net steps (with 8×8 attention a step costs about 1.6 times the digits recipe's: the
      whole recipe takes about 32 minutes on two cores; at 8,000 steps, 23 minutes, relations
      reach 86.5% instead of 91.0%, README "Scenes");
    * guidance w = 4 saved as the pipeline's default (relations and big digits gain most from
      guidance; ``tinydiff eval --guidance``, README "Scenes").

    With ``denoiser="dit"`` or ``space="pixel"`` the denoiser's settings are ``dit_recipe``'s or
    ``pixel_recipe``'s (cross-attention levels are the latent U-Net's alone); the text objective
    and the guidance are the scenes recipe's."""
    base = digits_recipe(denoiser, space)
    if denoiser == "unet" and space == "latent":
        base = replace(base, unet_attention="8x8", loss_weighting="min_snr", unet_lr=2e-3, unet_steps=11000)
    return replace(base, denoiser=denoiser, space=space, data="scenes", text_objective="slots", guidance_scale=4.0)


def recipe_stages(config: RecipeConfig) -> tuple[str, ...]:
    """The stages ``config`` can run, in order: clip and vae (unless ``encoders`` replaces them;
    no vae in pixel space), the denoiser stage (``unet`` or ``dit``), and lcm for a latent U-Net
    with token conditioning."""
    first = () if config.encoders else ("clip", "vae") if config.space == "latent" else ("clip",)
    lcm = config.denoiser == "unet" and config.conditioning == "tokens" and config.space == "latent"
    return first + (config.denoiser,) + (("lcm",) if lcm else ())


def pipeline_config(config: RecipeConfig) -> PipelineConfig:
    """The pipeline settings a run saves: scenes return the whole 32×32 canvas, digits their
    28×28 crop; the denoiser reads prompts as it was trained to (``conditioning``)."""
    return PipelineConfig(image_size=CANVAS if config.data == "scenes" else IMAGE_SIZE, space=config.space,
                          conditioning=config.conditioning)


class RecipeError(RuntimeError):
    """The output folder or the requested stages do not fit together (message says how to fix)."""


def _stage_loop(base: LoopConfig, steps: int, seed: int) -> LoopConfig:
    return replace(base, total_steps=steps, warmup_steps=min(base.warmup_steps, max(1, steps // 10)),
                   checkpoint_every=min(base.checkpoint_every, steps), seed=seed)


def _subset(data: CaptionedDigits, n: int | None) -> CaptionedDigits:
    return data if n is None else CaptionedDigits(*(a[:n] for a in data))


def _training_data(config: RecipeConfig):
    """(training data, the tokenizer CLIP learns): the bundled training digits with the caption
    grammar's tokenizer, or ``data="scenes"``: scenes of training digits with the scenes' own."""
    if config.data == "scenes":
        scenes = load_scene_data(config.train_subset or config.scene_count, split="train", seed=config.seed)
        return scenes, scene_tokenizer()
    train, _ = load_captioned_mnist(seed=0)
    return _subset(train, config.train_subset), Tokenizer.from_captions()


def train_mnist_captions(out_dir, *, stages=None, resume: bool = False, config: RecipeConfig | None = None,
                         callback: Callable[[dict], None] | None = None):
    """Run the recipe's ``stages``; returns the trained ``TextToImagePipeline`` (also saved in
    OUT/model, or OUT/model-dit), or None when a stage's checkpoint is still missing (no pipeline
    is written then; recipe.json's "pipeline" says which stages are missing). ``stages`` None:
    clip, vae and the denoiser (only the denoiser with ``config.encoders``).

    ``callback`` receives every training step's dict with "stage" added, plus
    {"stage", "event": "start" | "end", "total_steps", "seconds"} around each stage.
    """
    config = config or RecipeConfig()
    out = Path(out_dir)
    if config.denoiser not in DENOISERS:
        raise RecipeError(f"unknown denoiser {config.denoiser!r}; valid: {', '.join(DENOISERS)}")
    if config.data not in DATASETS:
        raise RecipeError(f"unknown data {config.data!r}; valid: {', '.join(DATASETS)}")
    try:
        check_conditioning(config.conditioning)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    if config.space not in SPACES:
        raise RecipeError(f"unknown space {config.space!r}; valid: {', '.join(SPACES)}")
    if config.space == "pixel" and config.denoiser != "unet":
        raise RecipeError("pixel space is built for the U-Net (latent_unet.pixel_space_unet_config); "
                          "drop --denoiser dit or --space pixel")
    if config.unet_attention not in UNET_ATTENTIONS:
        raise RecipeError(f"unknown unet_attention {config.unet_attention!r}; valid: {', '.join(UNET_ATTENTIONS)}")
    if config.unet_attention != "4x4" and (config.denoiser != "unet" or config.space != "latent"):
        raise RecipeError("--unet-attention 8x8 is for the latent U-Net; drop it (or --denoiser dit, --space pixel)")
    try:
        defaults = SamplingDefaults(guidance_scale=config.guidance_scale)  # the other sampling defaults: the pipeline's
    except ValueError as err:
        raise RecipeError(str(err)) from None
    if config.text_objective not in TEXT_OBJECTIVES:
        raise RecipeError(f"unknown text objective {config.text_objective!r}; valid: {', '.join(TEXT_OBJECTIVES)}")
    if config.text_objective == "slots" and config.data != "scenes":
        raise RecipeError("the slots text objective needs scene captions (tinydiff train mnist-scenes): digit "
                          "captions name no places; use --text-objective contrastive")
    den = config.denoiser  # the denoiser stage's name: "unet" or "dit"
    valid = recipe_stages(config)
    stages = [s for s in valid if s != "lcm"] if stages is None else stages
    if config.encoders and any(s in ("clip", "vae") for s in stages):
        raise RecipeError(f"--encoders {config.encoders} takes the text encoder and VAE from that pipeline: "
                          f"drop clip and vae from --stages (train only {den})")
    unknown = [s for s in stages if s not in valid]
    if unknown:
        raise RecipeError(f"unknown stage(s) {', '.join(unknown)}; valid stages: {', '.join(valid)}")
    stages = [s for s in valid if s in stages]  # always in pipeline order
    needed = tuple(s for s in valid if s != "lcm")  # the checkpoints a pipeline is assembled from
    paths = {s: out / s / "state.npz" for s in valid}
    if not resume:
        existing = [str(paths[s]) for s in stages if paths[s].exists()]
        if existing:
            raise RecipeError(f"{out} already holds a training run ({', '.join(existing)}); "
                              "pass --resume to continue it, or choose another --out")
    record_path = out / "recipe.json"
    record = load_json(record_path) if resume and record_path.exists() else {}
    record["config"] = config.to_dict()
    record.setdefault("seconds", {})
    emit = callback or (lambda event: None)
    train, clip_tokenizer = _training_data(config)

    def finish_stage(name, total_steps, seconds, history, peak_rss_mb):
        record["seconds"][name] = record["seconds"].get(name, 0.0) + seconds
        record.setdefault("peak_rss_mb", {})[name] = peak_rss_mb  # the stage's process (not the U-Net's workers)
        save_json(record_path, record)
        _plot_loss(history, out / name / "loss.png", name)
        emit({"stage": name, "event": "end", "total_steps": total_steps, "seconds": seconds})

    def run_stage(name, total_steps, fn, after_step=None):
        emit({"stage": name, "event": "start", "total_steps": total_steps})
        start = time.perf_counter()

        def step_event(d):
            emit({**d, "stage": name})
            if after_step is not None:
                after_step()

        with blas_threads(1):  # tinydiff's GEMMs are too small to share; the U-Net shares its batch instead
            result = fn(step_event)
        finish_stage(name, total_steps, time.perf_counter() - start, result["history"], _peak_rss_mb())
        return result

    # -- stages 1 and 2 side by side: each runs on one core, so with two cores the vae stage trains in
    # a process of its own while the clip stage trains here (the same arithmetic as one after the other)
    vae_process = None
    if "clip" in stages and "vae" in stages and (cpu_count() if config.threads is None else config.threads) > 1:
        emit({"stage": "vae", "event": "start", "total_steps": config.vae_steps})
        vae_process = _StageProcess(_vae_stage_process, (config.to_dict(), str(paths["vae"]), resume), "vae")

    try:
        # -- stage 1: CLIP (with the vae process's events relayed after each of its steps) --------
        if "clip" in stages:
            def fit_clip(cb):
                text = TextEncoderConfig(vocab_size=clip_tokenizer.vocab_size, max_length=clip_tokenizer.max_length)
                _, _, result = train_clip(
                    CLIPConfig(text=text), loop=_stage_loop(clip_default_loop(), config.clip_steps, config.seed),
                    batch_size=config.clip_batch_size, data=train, tokenizer=clip_tokenizer,
                    checkpoint_path=paths["clip"], resume=resume, callback=cb, text_objective=config.text_objective)
                return result

            run_stage("clip", config.clip_steps, fit_clip,
                      after_step=None if vae_process is None else lambda: vae_process.relay(emit))

        # -- stage 2: the autoencoder, here or waited for ------------------------------------------
        if vae_process is not None:
            finish_stage("vae", config.vae_steps, *vae_process.relay(emit, until_done=True))
        elif "vae" in stages:
            run_stage("vae", config.vae_steps, lambda cb: _fit_vae(config, paths["vae"], resume, train.images, cb))
    finally:
        if vae_process is not None:
            vae_process.close()

    missing = [s for s in needed if not paths[s].exists()]
    if "lcm" in stages and "unet" not in stages and missing:
        raise RecipeError(f"the lcm stage distils this run's U-Net, but {out} has no checkpoint of the "
                          f"{', '.join(missing)} stage(s); train them first (--stages {','.join(missing)}), "
                          "then --stages lcm")
    if den not in stages and missing:  # e.g. --stages clip,vae on a fresh folder: the U-Net comes later
        record["pipeline"] = f"not written: no checkpoint of the {', '.join(missing)} stage(s) yet"
        save_json(record_path, record)
        return None

    # -- stage 3: the latent U-Net or DiT (on the frozen text encoder and autoencoder) -------------
    if config.encoders:  # a trained pipeline's, instead of this run's clip and vae stages
        source = TextToImagePipeline.from_pretrained(config.encoders)
        tokenizer, text_encoder, vae, image_encoder = source.tokenizer, source.text_encoder, source.vae, \
            source.image_encoder
        if config.space == "pixel":
            vae = None  # its text encoder only
        elif vae is None:
            raise RecipeError(f"--encoders {config.encoders} is a pixel-space pipeline: it has no VAE for a latent "
                              "run; give a latent pipeline (e.g. mnist-scenes), or add --space pixel")
        unknown = sorted(set(clip_tokenizer.words) - set(tokenizer.words))
        if unknown:
            raise RecipeError(f"--encoders {config.encoders}: its tokenizer lacks words of the {config.data} captions "
                              f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); train the clip and "
                              "vae stages instead")
    else:
        clip, tokenizer = _require(load_clip, paths["clip"], "clip")
        text_encoder, image_encoder = clip.text, clip.image
        vae = _require(load_autoencoder, paths["vae"], "vae") if config.space == "latent" else None
    diffusion = DiffusionTrainingConfig(schedule=config.schedule, batch_size=config.unet_batch_size,
                                        loss_weighting=config.loss_weighting)
    if paths[den].exists():  # resumed or reused: it must have been trained with this run's conditioning
        trained = load_checkpoint(paths[den])[1]["config"].get("conditioning", "tokens")
        if trained != config.conditioning:
            raise RecipeError(f"{paths[den]} was trained with {trained} conditioning, this run asks for "
                              f"{config.conditioning}; pass --conditioning {trained}, or choose another --out")
    if den == "dit":
        net_config = latent_dit_config(text_encoder.config.width, tokenizer.max_length)
    elif config.space == "pixel":
        net_config = pixel_space_unet_config(text_encoder.config.width, tokenizer.max_length)
    else:
        net_config = latent_unet_config(text_encoder.config.width, tokenizer.max_length,
                                        attention_at_8x8=config.unet_attention == "8x8")
    unet = (UNet if den == "unet" else DiT)(net_config, seed=config.seed)  # a U-Net or a DiT: the same interface
    if den in stages:
        unet_loop = LoopConfig(total_steps=config.unet_steps, lr=config.unet_lr, warmup_steps=200, ema_decay=0.999,
                               ema_power=config.ema_power, checkpoint_every=500)

        def fit_unet(cb):
            result = train_latent_unet(unet, vae, text_encoder, tokenizer, train,
                                       _stage_loop(unet_loop, config.unet_steps, config.seed), diffusion,
                                       checkpoint_path=paths[den], resume=resume, callback=cb,
                                       threads=cpu_count() if config.threads is None else config.threads,
                                       conditioning=config.conditioning)
            result["ema"].copy_to(unet)  # sample with the averaged weights
            return result

        run_stage(den, config.unet_steps, fit_unet)
    else:
        unet.load_state_dict(checkpoint_weights(load_checkpoint(paths[den])[0], "ema", path=paths[den]))

    # -- stage 4 (optional): the consistency-distilled student of that U-Net ------------------------
    student = None
    if "lcm" in stages:
        lcm_config = LCMConfig(batch_size=config.lcm_batch_size, loss=config.lcm_loss)
        lcm_loop = _stage_loop(LoopConfig(total_steps=config.lcm_steps, lr=config.lcm_lr, warmup_steps=20,
                                          checkpoint_every=50), config.lcm_steps, config.seed)

        def fit_lcm(cb):
            return train_lcm(unet, vae, text_encoder, tokenizer, train, lcm_loop, lcm_config, diffusion,
                             checkpoint_path=paths["lcm"], resume=resume, callback=cb, seed=config.seed)

        student = run_stage("lcm", config.lcm_steps, fit_lcm)["student"]
    elif "lcm" in valid and "unet" not in stages and paths["lcm"].exists():  # keep a student of this same U-Net
        student = make_student(unet)
        student.load_state_dict(checkpoint_weights(load_checkpoint(paths["lcm"])[0], "last", path=paths["lcm"]))

    # -- assemble, save, and look --------------------------------------------------------------
    pipe = TextToImagePipeline(tokenizer, text_encoder, unet, vae, diffusion.sampling_config(), defaults,
                               image_encoder=image_encoder, lcm_unet=student, config=pipeline_config(config))
    model_dir = out / model_folder_name(config)
    pipe.save_pretrained(model_dir)
    record["pipeline"] = str(model_dir)
    save_json(record_path, record)
    per_digit = 2 if config.train_subset else 8
    scenes = config.data == "scenes"
    _sample_grid(pipe, out / ("samples.png" if den == "unet" else f"samples-{den}.png"), per_digit=per_digit,
                 scenes=scenes)
    if student is not None:
        _sample_grid(pipe, out / "samples_lcm.png", per_digit=per_digit, scenes=scenes, sampler="lcm", steps=4)
    return pipe


def model_folder_name(config: RecipeConfig) -> str:
    """Where in OUT the pipeline is saved: "model" for the U-Net, "model-dit" for the DiT."""
    return "model" if config.denoiser == "unet" else f"model-{config.denoiser}"



def _fit_vae(config: RecipeConfig, path: Path, resume: bool, images, callback) -> dict:
    """Stage 2, the autoencoder, with the recipe's settings; train_loop's result."""
    _, result = train_autoencoder(loop=_stage_loop(vae_default_loop(), config.vae_steps, config.seed), images=images,
                                  checkpoint_path=path, resume=resume, callback=callback)
    return result


def _vae_stage_process(conn, config_dict: dict, path: str, resume: bool) -> None:
    """The vae stage in a process of its own (spawned by ``_StageProcess``): trains as the main
    process would, sending ("step", event) after every step, then ("end", seconds, loss history,
    peak memory), or ("error", exception). Ctrl-C is the main process's to handle: it stops this one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        config = RecipeConfig.from_dict(config_dict)
        train, _ = _training_data(config)
        start = time.perf_counter()
        with blas_threads(1):
            result = _fit_vae(config, Path(path), resume, train.images, lambda d: conn.send(("step", d)))
        conn.send(("end", time.perf_counter() - start, result["history"], _peak_rss_mb()))
    except Exception as err:  # noqa: BLE001 - handed to the main process, which raises it
        try:
            conn.send(("error", err))
        except Exception:  # noqa: BLE001 - an exception that does not pickle: its text instead
            conn.send(("error", RecipeError(f"the {Path(path).parent.name} stage failed:\n{traceback.format_exc()}")))


class _StageProcess:
    """A training stage running in a spawned process; ``relay`` passes its events on."""

    def __init__(self, target, args: tuple, name: str):
        context = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, theirs = context.Pipe(duplex=False)
        self.process = context.Process(target=target, args=(theirs,) + args, daemon=True, name=f"tinydiff-{name}")
        self.process.start()
        theirs.close()
        self.result = None  # (seconds, history, peak memory) once the stage has ended

    def relay(self, emit, until_done: bool = False):
        """Emit the stage's step events received so far (all of them, to its end, with
        ``until_done``); once it has ended returns (seconds, history, peak memory), else None."""
        while self.result is None:
            if not until_done and not self.conn.poll():
                return None
            if until_done:
                multiprocessing.connection.wait([self.conn, self.process.sentinel])
            try:
                message = self.conn.recv()
            except EOFError:
                self.process.join(timeout=5)
                raise RecipeError(
                    f"the {self.name} stage's process stopped (exit code {self.process.exitcode}); its last "
                    "checkpoint is kept: continue with --resume. If this runs from a script, train under "
                    "`if __name__ == \"__main__\":` (the process is spawned and imports the script)") from None
            kind, *rest = message
            if kind == "step":
                emit({**rest[0], "stage": self.name})
            elif kind == "end":
                self.process.join()
                self.result = tuple(rest)
            else:
                raise rest[0]
        return self.result

    def close(self) -> None:
        """Stop the process if it still runs (an error or Ctrl-C here); its checkpoint stays."""
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=5)
        self.conn.close()


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory so far in MB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # bytes on macOS, KiB on Linux


def _require(load, path: Path, stage: str):
    if not path.exists():
        raise RecipeError(f"{path} is missing: run the {stage} stage first (--stages {stage},...)")
    return load(path)


def _plot_loss(history, path: Path, stage: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(history) + 1)
    ax.plot(steps, history, lw=0.6, alpha=0.4, label="loss per step")
    if len(history) >= 50:
        window = max(10, len(history) // 50)
        smooth = np.convolve(history, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", title=f"{stage} training loss")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def _sample_grid(pipe, path: Path, per_digit: int, *, scenes: bool = False, **options) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..text.captions import zero_shot_prompts
    from ..viz import image_grid, save_figure

    rows = SHOWCASE_PROMPTS if scenes else zero_shot_prompts()
    prompts = [p for p in rows for _ in range(per_digit)]
    images = pipe(prompts, seed=0, **options)  # (N, 28, 28) digits, (N, 32, 32) scenes: the pipeline's image_size
    fig = image_grid(images, ncols=per_digit * 2)
    save_figure(fig, path)
    plt.close(fig)
