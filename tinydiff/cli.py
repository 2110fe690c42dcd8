"""The ``tinydiff`` command: ``tinydiff train | sample | edit | inpaint | invert | words | eval | info``.

The CLI is where output happens: the library reports progress through callbacks and raises
exceptions with clear messages; here they become progress bars and one-line errors. Every
option is checked before any work starts, so a bad one costs a second, not a sampling run: it
is printed as one line ``tinydiff: error: …`` naming the problem and the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path

from . import __version__


class CLIError(Exception):
    """An expected failure (bad input, missing files): printed as one line, exit status 2."""


def cmd_info(args) -> int:
    import numpy
    import scipy

    from . import backend

    cores = backend.cpu_count()
    print(f"tinydiff {__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"numpy    {numpy.__version__}, BLAS: {backend.blas_info(threads=False)}")
    print(f"scipy    {scipy.__version__}")
    print(f"backend  {backend.get_backend()} (set TINYDIFF_BACKEND=numpy|cupy or --backend)")
    print(f"threads  tinydiff runs BLAS on 1 thread and splits each batch over the {cores} CPU core(s) instead\n"
          "         (sampling: threads for one call, worker processes for batch work such as tinydiff eval;\n"
          "         U-Net training: processes, see tinydiff train --threads);\n"
          f"         BLAS's default here, for NumPy code outside tinydiff: {backend.blas_default_threads()} thread(s)")
    print("memory   " + ("malloc keeps freed memory for reuse (no page faults on every step); "
                          "TINYDIFF_KEEP_FREED_MEMORY=0 turns it off" if backend.FREED_MEMORY_KEPT else
                          "malloc returns freed memory to the system (not glibc, or TINYDIFF_KEEP_FREED_MEMORY=0)"))
    print(f"cupy     {backend.cupy_status()}")
    print(f"models   shipped: {', '.join(f'{n} ({kind})' for n, kind in SHIPPED_MODELS.items())}; "
          "--model takes one of these names or a pipeline folder")
    return 0


DEFAULT_RUN_DIR = "runs/mnist-captions"
RECIPES = {"mnist-captions": "digits", "mnist-scenes": "scenes"}  # recipe -> RecipeConfig.data; OUT: runs/<recipe>
# the pipelines shipped in tinydiff/pretrained/ (pipeline.PRETRAINED_MODELS), named here without importing NumPy
SHIPPED_MODELS = {"mnist-captions": "U-Net", "mnist-captions-dit": "DiT", "mnist-scenes": "U-Net, scenes",
                  "mnist-scenes-contrastive": "U-Net, scenes, contrastive text encoder only",
                  "mnist-scenes-pooled": "U-Net, scenes, pooled prompt only",
                  "mnist-scenes-pixel": "U-Net, scenes, pixel space (no VAE)"}
MODEL_HELP = ("a shipped model, mnist-captions (the U-Net), mnist-captions-dit (the DiT) or mnist-scenes (the U-Net "
              "on scenes: \"a 3 left of a 7\"; mnist-scenes-contrastive, mnist-scenes-pooled and mnist-scenes-pixel, its ablations), or a pipeline folder "
              "(default: mnist-captions)")
CONDITIONINGS = ("tokens", "pooled")  # tinydiff train --conditioning (pipeline.CONDITIONINGS)


def _use_backend(name: str | None) -> None:
    if name:
        from .backend import set_backend

        set_backend(name)


def cmd_train(args) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from .diffusion.noise import LOSS_WEIGHTINGS
    from .train.recipes import (DENOISERS, SPACES, UNET_ATTENTIONS, digits_recipe, model_folder_name, quick_recipe,
                                recipe_stages, scenes_recipe, train_mnist_captions)

    if args.recipe not in RECIPES:
        raise CLIError(f"unknown recipe {args.recipe!r}; available: {', '.join(RECIPES)}")
    if args.denoiser not in DENOISERS:
        raise CLIError(f"--denoiser must be {' or '.join(DENOISERS)}, got {args.denoiser!r}")
    if args.conditioning not in CONDITIONINGS:
        raise CLIError(f"--conditioning must be {' or '.join(CONDITIONINGS)}, got {args.conditioning!r}")
    if args.space not in SPACES:
        raise CLIError(f"--space must be {' or '.join(SPACES)}, got {args.space!r}")
    if args.space == "pixel" and args.denoiser != "unet":
        raise CLIError("--space pixel trains a U-Net; drop --denoiser dit")
    if args.unet_attention is not None and args.unet_attention not in UNET_ATTENTIONS:
        raise CLIError(f"--unet-attention must be {' or '.join(UNET_ATTENTIONS)}, got {args.unet_attention!r}")
    if args.unet_attention == "8x8" and (args.denoiser != "unet" or args.space != "latent"):
        raise CLIError("--unet-attention 8x8 is for the latent U-Net; drop --denoiser dit and --space pixel")
    recipe = scenes_recipe if RECIPES[args.recipe] == "scenes" else digits_recipe
    config = recipe(args.denoiser, args.space)
    if args.quick:  # the recipe's choices of network and text objective, at smoke-run size
        config = replace(quick_recipe(), denoiser=config.denoiser, space=config.space, data=config.data,
                         text_objective=config.text_objective, unet_attention=config.unet_attention)
    config.conditioning = args.conditioning
    if args.text_objective is not None:
        config.text_objective = args.text_objective
    if args.unet_attention is not None:
        config.unet_attention = args.unet_attention
    args.out = args.out or f"runs/{args.recipe}"
    if args.encoders is not None:
        config.encoders = str(_model_path(args.encoders))
    valid = recipe_stages(config)
    stages = None  # the recipe's default: clip, vae and the denoiser (only the denoiser with --encoders)
    if args.stages is not None:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        bad = [s for s in stages if s not in valid]
        if bad or not stages:
            notes = ["with --encoders"] if config.encoders else []
            if config.conditioning != "tokens":
                notes.append("lcm distils token conditioning only")
            note = f" ({', '.join(notes)})" if notes else ""
            raise CLIError(f"--stages takes a comma-separated list of {', '.join(valid)}{note}; got {args.stages!r}")
    _check_seed(args.seed)
    _use_backend(args.backend)
    config.seed = args.seed
    if args.steps is not None:
        if args.steps < 1:
            raise CLIError(f"--steps must be at least 1, got {args.steps}")
        config.unet_steps = args.steps
    if args.loss_weighting is not None:
        if args.loss_weighting not in LOSS_WEIGHTINGS:
            raise CLIError(f"--loss-weighting must be {' or '.join(LOSS_WEIGHTINGS)}, got {args.loss_weighting!r}")
        config.loss_weighting = args.loss_weighting
    if args.lr is not None:
        if not (math.isfinite(args.lr) and 0 < args.lr <= 1):
            raise CLIError(f"--lr must be a learning rate in (0, 1], e.g. 2e-3, got {args.lr}")
        config.unet_lr = args.lr
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be at least 1, got {args.threads}")
        config.threads = args.threads
    bars = {}

    def progress(event: dict) -> None:
        stage = event["stage"]
        if event.get("event") == "start":
            bars[stage] = tqdm(total=event["total_steps"], desc=f"{stage:>4}", unit="step", dynamic_ncols=True)
        elif event.get("event") == "end":
            bar = bars.pop(stage)
            bar.close()
            print(f"{stage}: done in {event['seconds']:.0f} s", file=sys.stderr)
        else:
            bar = bars[stage]
            bar.n = event["step"]
            bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=False)
            bar.refresh()

    pipe = train_mnist_captions(args.out, stages=stages, resume=args.resume, config=config, callback=progress)
    if pipe is None:
        print(f"stages done; the pipeline is written once every stage has a checkpoint in {args.out}")
        return 0
    model = Path(args.out) / model_folder_name(config)
    samples = "samples.png" if config.denoiser == "unet" else f"samples-{config.denoiser}.png"
    print(f"pipeline saved to {model}; samples in {Path(args.out) / samples}")
    example = "a 3 left of a 7" if config.data == "scenes" else "a bold handwritten 7"
    print(f'try: tinydiff sample "{example}" --model {model}')
    del pipe
    return 0


def _model_path(model: str | None) -> Path:
    """The pipeline folder ``--model`` names: a shipped model's name (default: mnist-captions) or a
    folder (a folder that has a shipped model's name is given as ./NAME), checked to be one."""
    from .pipeline import pretrained_path

    shipped = not model or model in SHIPPED_MODELS
    path = pretrained_path(model or "mnist-captions") if shipped else Path(model)
    if not (path / "model_index.json").is_file():
        hint = ("the shipped weights are missing; reinstall tinydiff" if shipped else
                f"--model takes a shipped model's name ({', '.join(SHIPPED_MODELS)}) or a pipeline folder; "
                "train one with: tinydiff train mnist-captions")
        raise CLIError(f"no tinydiff model in {path} ({hint})")
    return path


def _load_pipeline(model: str | None, backend: str | None):
    from .pipeline import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(_model_path(model), backend=backend)


def _upgrade_command(folder: Path) -> str:
    """The one-line command that makes a scenes folder saved before the pipeline's image_size
    existed return the whole 32×32 canvas (it rewrites model_index.json alone)."""
    folder = repr(str(folder))  # a Python string literal
    return (f"python -c \"from tinydiff.pipeline import TextToImagePipeline as P; p = P.from_pretrained({folder}); "
            f"p.config.image_size = 32; p.save_pretrained({folder}, only=[])\"")


def _check_scene_prompt(prompt: str) -> None:
    """A scenes model was trained on the four kinds of scene caption only (``scenes.parse_caption``):
    anything else, even of known words ("a 3 left of a 3 above a 7"), is refused in one line."""
    from .data.scenes import parse_caption

    try:
        parse_caption(prompt)
    except ValueError as err:
        raise CLIError(f"{err}; a scenes model draws only these four kinds of caption") from None


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise CLIError(f"--seed must be 0 or more (image i uses seed + i), got {seed}")


def _check_prompt(tokenizer, prompt: str, option: str = "") -> None:
    """Refuse a prompt the model would misread: too long to fit (truncation would drop its end,
    perhaps the digit) or with words it has never seen (suggesting the known ones). ``option``
    names the option the prompt came from (e.g. "--negative") at the start of the message."""
    prefix = f"{option}: " if option else ""
    problem = tokenizer.length_problem(prompt)
    if problem:
        raise CLIError(f"{prefix}{problem}; shorten it")
    unknown = list(dict.fromkeys(tokenizer.encode(prompt).unknown_words[0]))  # in order, once each
    if unknown:
        raise CLIError(f"{prefix}words the model has never seen: "
                       f"{', '.join(tokenizer.describe_unknown(w) for w in unknown)}; "
                       f"tinydiff words lists the {len(tokenizer.words)} it knows")


def _prepare_output(output: Path) -> None:
    """Check that ``output`` can be written, creating its folder, before any sampling."""
    if output.suffix not in (".png", ".npy"):
        raise CLIError(f"--output must end in .png (a grid) or .npy (raw uint8 array), got {output}")
    if output.is_dir():
        raise CLIError(f"--output {output} is a folder; name a file in it, e.g. {output / ('samples' + output.suffix)}")
    existing = next(p for p in (output.parent, *output.parent.parents) if p.exists())  # the nearest that exists
    if not existing.is_dir():
        raise CLIError(f"cannot write --output {output}: {existing} is a file, not a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create the folder of --output {output}: {err.strerror or err}") from None
    if not os.access(output.parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise CLIError(f"cannot write --output {output}: permission denied; choose another path")


# Above this classifier-free guidance scale the digits fall apart (README, "Use it": measured
# with the shipped model, the classifier still reads 100% of them at w = 50 but 60% at w = 100).
MAX_GUIDANCE = 50.0


def _check_sampling_args(args) -> None:
    """The options of ``_add_sampling_arguments``, checked before anything is loaded."""
    import math

    from .diffusion.schedules import SPACINGS

    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    if getattr(args, "seed", None) is not None:
        _check_seed(args.seed)
    _check_sampler_and_guidance(getattr(args, "sampler", None), args.guidance)
    if args.sigma_schedule is not None and args.sigma_schedule not in SPACINGS:
        raise CLIError(f"unknown sigma schedule {args.sigma_schedule!r}; valid: {', '.join(SPACINGS)}")
    if args.sigma_max is not None and not (math.isfinite(args.sigma_max) and args.sigma_max > 0):
        raise CLIError(f"--sigma-max must be a positive number, got {args.sigma_max}")
    _prepare_output(Path(args.output))


def _load_for_sampling(args):
    """The pipeline of ``--model``, with the prompt, ``--negative``, ``--sampler`` and the σ grid
    checked against it before any sampling: (pipeline, steps, σ grid)."""
    from .diffusion.schedules import get_sigmas
    from .evaluate_scenes import is_scene_pipeline

    _use_backend(args.backend)
    pipe = _load_pipeline(args.model, args.backend)
    scenes = is_scene_pipeline(pipe)
    if args.command != "sample" and (scenes or pipe.image_size != 28):  # editing.py reads and writes 28×28 digits
        drawn = "scenes" if scenes else f"{pipe.image_size}×{pipe.image_size} pictures"
        raise CLIError(f"{args.command} takes 28×28 digits, and this model draws {drawn}; "
                       "use tinydiff sample, or a digits model (--model mnist-captions)")
    if getattr(args, "sampler", None) == "lcm" and pipe.lcm_unet is None:
        raise CLIError(pipe.missing_student_message())
    _check_prompt(pipe.tokenizer, args.prompt)
    if scenes:
        _check_scene_prompt(args.prompt)
        if pipe.image_size != 32:
            print(f"note: this scenes model returns {pipe.image_size}×{pipe.image_size} crops (its folder predates "
                  f"the image_size setting); to get the whole 32×32 scenes run once: "
                  f"{_upgrade_command(_model_path(args.model))}", file=sys.stderr)
    pipe.encode_prompt([args.prompt])  # an empty prompt (or any other the pipeline refuses) fails here
    if args.negative:
        _check_prompt(pipe.tokenizer, args.negative, "--negative")
        pipe.encode_prompt([args.negative])
    steps = args.steps if args.steps is not None else pipe.defaults.steps
    schedule = args.sigma_schedule or pipe.defaults.sigma_schedule
    if args.sigma_max is not None and not args.sigma_max > pipe.schedule.sigma_min:
        raise CLIError(f"--sigma-max must be above the model's smallest noise level {pipe.schedule.sigma_min:.3g} "
                       f"(default {pipe.defaults.sigma_max}; values above its largest, "
                       f"{pipe.schedule.sigma_max:.4g}, start there), got {args.sigma_max:g}")
    try:  # e.g. a --sigma-max that leaves fewer training timesteps than --steps for a timestep spacing
        sigmas = get_sigmas(pipe.schedule, steps, schedule, sigma_max=args.sigma_max or pipe.defaults.sigma_max)
    except ValueError as err:
        raise CLIError(f"{err} (--steps {steps}, --sigma-schedule {schedule}, --sigma-max "
                       f"{args.sigma_max or pipe.defaults.sigma_max})") from None
    return pipe, steps, sigmas


def _write_images(images, output: Path, title: str) -> None:
    """uint8 (N, S, S) (S: 28 digits, 32 scenes) → FILE.npy as it is, or FILE.png as a grid titled ``title``."""
    import numpy as np

    try:
        if output.suffix == ".npy":
            np.save(output, images)
        else:
            import matplotlib

            matplotlib.use("Agg")
            from .viz import image_grid, save_figure

            save_figure(image_grid(images, ncols=min(8, len(images)), suptitle=title), output)
    except OSError as err:
        raise CLIError(f"cannot write --output {output}: {err.strerror or err}") from None
    print(f"wrote {len(images)} image(s) to {output}")


# Batch work samples on worker processes (TextToImagePipeline.worker_processes) from this many
# images × steps: starting them costs about 0.5 s, and they save about 0.15-0.3 ms per image and
# step against threads on 2 cores (64 images in 20 steps: 0.88-0.92 s against 1.11-1.32 s), so
# they pay for themselves from about 2,000-3,500; below, the pipeline's threads run.
WORKER_MIN_IMAGE_STEPS = 4000


def _batch_workers(pipe, image_steps: int, sampler: str | None):
    """``pipe.worker_processes()`` for a job of ``image_steps`` images × steps that wins back the
    workers' start, else a block that changes nothing (LCM runs its student on threads)."""
    import contextlib

    if image_steps < WORKER_MIN_IMAGE_STEPS or (sampler or pipe.defaults.sampler) == "lcm":
        return contextlib.nullcontext(pipe)
    return pipe.worker_processes()


def cmd_sample(args) -> int:
    from tqdm import tqdm

    if args.num_images < 1:
        raise CLIError(f"--num-images must be at least 1, got {args.num_images}")
    _check_sampling_args(args)
    pipe, steps, _ = _load_for_sampling(args)
    with _batch_workers(pipe, args.num_images * steps, args.sampler), \
            tqdm(total=steps, desc="sampling", unit="step", dynamic_ncols=True) as bar:
        images = pipe(args.prompt, negative_prompt=args.negative, num_images=args.num_images, steps=steps,
                      sampler=args.sampler, sigma_schedule=args.sigma_schedule, guidance_scale=args.guidance,
                      sigma_max=args.sigma_max, seed=args.seed, callback=lambda info: bar.update(1))
    _write_images(images, Path(args.output), args.prompt)
    return 0


def _editor_options(args, steps: int) -> dict:
    """The sampling keywords of the editors, from the options of ``_add_sampling_arguments``."""
    return {"negative_prompt": args.negative, "steps": steps, "sigma_schedule": args.sigma_schedule,
            "guidance_scale": args.guidance, "sigma_max": args.sigma_max}


def cmd_edit(args) -> int:
    from tqdm import tqdm

    from .editing import load_images, strength_sigmas

    if not 0 <= args.strength <= 1:  # also refuses nan
        raise CLIError(f"--strength takes 0 to 1 (0 keeps the picture, 1 ignores it), got {args.strength:g}")
    if args.sampler == "lcm":
        raise CLIError("edit runs the U-Net's own samplers; lcm is for tinydiff sample (choose another --sampler)")
    _check_sampling_args(args)
    images = load_images(args.input, invert=args.dark_ink)
    pipe, steps, sigmas = _load_for_sampling(args)
    with tqdm(total=len(strength_sigmas(sigmas, args.strength)) - 1, desc="editing", unit="step",
              dynamic_ncols=True) as bar:
        edited = pipe.img2img(images, args.prompt, args.strength, sampler=args.sampler, seed=args.seed,
                              callback=lambda info: bar.update(1), **_editor_options(args, steps))
    _write_images(edited, Path(args.output), f"{args.prompt} (strength {args.strength:g})")
    return 0


def cmd_inpaint(args) -> int:
    from tqdm import tqdm

    from .editing import load_images_and_masks

    if args.jumps < 0:
        raise CLIError(f"--jumps must be 0 or more, got {args.jumps}")
    _check_sampling_args(args)
    images, masks = load_images_and_masks(args.input, args.mask, invert=args.dark_ink)
    pipe, steps, _ = _load_for_sampling(args)
    with tqdm(total=steps * (args.jumps + 1), desc="inpainting", unit="step", dynamic_ncols=True) as bar:
        completed = pipe.inpaint(images, masks, args.prompt, jumps=args.jumps, seed=args.seed,
                                 callback=lambda info: bar.update(1), **_editor_options(args, steps))
    _write_images(completed, Path(args.output), args.prompt)
    return 0


def cmd_invert(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from .editing import load_images

    if args.iterations < 0:
        raise CLIError(f"--iterations must be 0 or more, got {args.iterations}")
    noise_output = Path(args.noise_output)
    if noise_output.suffix != ".npy":
        raise CLIError(f"--noise-output must end in .npy, got {noise_output}")
    _check_sampling_args(args)
    _prepare_output(noise_output)
    images = load_images(args.input, invert=args.dark_ink)
    pipe, steps, _ = _load_for_sampling(args)
    options = _editor_options(args, steps)
    options["guidance_scale"] = args.guidance if args.guidance is not None else 1.0  # the least drift
    with tqdm(total=steps, desc="inverting", unit="step", dynamic_ncols=True) as bar:
        noise = pipe.invert(images, args.prompt, iterations=args.iterations, callback=lambda info: bar.update(1),
                            **options)  # (N, 4, 8, 8)
    try:
        np.save(noise_output, noise)
    except OSError as err:
        raise CLIError(f"cannot write --noise-output {noise_output}: {err.strerror or err}") from None
    print(f"wrote the noise of {len(noise)} image(s), {noise.dtype} {noise.shape}, to {noise_output}")
    with tqdm(total=steps, desc="regenerating", unit="step", dynamic_ncols=True) as bar:
        rebuilt = pipe(args.prompt, latents=noise, sampler="ddim", callback=lambda info: bar.update(1), **options)
    _write_images(rebuilt, Path(args.output), f"{args.prompt} (inverted and regenerated)")
    return 0


def _check_sampler_and_guidance(sampler: str | None, guidance: float | None) -> None:
    import math

    from .diffusion.samplers import SAMPLERS

    if sampler is not None and sampler not in SAMPLERS:
        raise CLIError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise CLIError(f"--guidance takes 0 to {MAX_GUIDANCE:g} (above that the digits fall apart; "
                       f"1 is plain conditional sampling), got {guidance:g}")


def cmd_words(args) -> int:
    from .evaluate_scenes import knows_scene_captions
    from .io import load_json
    from .pipeline import COMPONENT_FILES
    from .text.tokenizer import SYNONYMS, Tokenizer, vocabulary_groups

    tokenizer = Tokenizer.from_dict(load_json(_model_path(args.model) / COMPONENT_FILES["tokenizer"]))
    print(f"The model knows {len(tokenizer.words)} words (case, accents and punctuation do not matter; "
          f"a prompt holds at most {tokenizer.max_length - 2}):")
    for name, words in vocabulary_groups(tokenizer.words).items():
        print(f"  {name + ':':<13} {' '.join(words)}")
    if knows_scene_captions(tokenizer):
        print('A scenes model takes four kinds of caption: "a 3 left of a 7" (right of, above, below), "two 7s" '
              '(three), "the number 42", "a small 5" (big).')
        print('Example: tinydiff sample "a 3 left of a 7" --model MODEL')
        return 0
    print('Slant is a phrase: "leaning left", "standing upright", "leaning right". '
          "An unqualified digit is of regular thickness.")
    offers: dict[tuple[str, ...], list[str]] = {}  # the suggestion → the unknown words that get it
    for word, targets in SYNONYMS.items():
        targets = tuple(t for t in targets if set(t.split()) <= set(tokenizer.words))
        if targets:
            offers.setdefault(targets, []).append(word)
    if offers:
        print("Words it does not know, and what to write instead:")
        numerals = [f"{words[0]} → {targets[0]}" for targets, words in offers.items() if targets[0].isdigit()]
        for targets, words in offers.items():
            if not targets[0].isdigit():
                print(f"  {', '.join(words)} → {' or '.join(targets)}")
        if numerals:
            print(f"  {', '.join(numerals)}")  # Roman numerals, one digit each
    print('Example: tinydiff sample "a small bold handwritten 7 leaning right"')
    return 0


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from .evaluate import evaluate_pipeline, format_cost, format_results
    from .evaluate_scenes import is_scene_pipeline

    if args.n_per_digit is not None and args.n_per_digit < 2:
        raise CLIError(f"--n-per-digit must be at least 2, got {args.n_per_digit}")
    if args.n_attribute is not None and args.n_attribute < 1:
        raise CLIError(f"--n-attribute must be at least 1, got {args.n_attribute}")
    if args.n_per_kind is not None and (args.n_per_kind < 2 or args.n_per_kind % 2):
        raise CLIError(f"--n-per-kind must be an even number, at least 2 (relation prompts come in swapped pairs), "
                       f"got {args.n_per_kind}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    _check_sampler_and_guidance(args.sampler, args.guidance)
    _check_seed(args.seed)
    _use_backend(args.backend)
    pipe = _load_pipeline(args.model, args.backend)
    sampler = args.sampler or pipe.defaults.sampler
    if sampler == "lcm" and pipe.lcm_unet is None:
        raise CLIError(pipe.missing_student_message())
    if is_scene_pipeline(pipe):
        return _eval_scenes(args, pipe, sampler)
    if args.n_per_kind is not None:
        raise CLIError("--n-per-kind is for scenes models (tinydiff train mnist-scenes); this model draws digits: "
                       "use --n-per-digit and --n-attribute")
    args.n_per_digit = 100 if args.n_per_digit is None else args.n_per_digit
    args.n_attribute = 20 if args.n_attribute is None else args.n_attribute
    total = 10 * args.n_per_digit + 20 * args.n_attribute
    steps = args.steps or pipe.defaults.steps
    with _batch_workers(pipe, total * steps, sampler), \
            tqdm(total=total, desc="generating", unit="img", dynamic_ncols=True) as bar:
        results = evaluate_pipeline(pipe, n_per_digit=args.n_per_digit, n_attribute=args.n_attribute,
                                    seed=args.seed, progress=bar.update, steps=args.steps, sampler=args.sampler,
                                    guidance_scale=args.guidance)
    guidance = pipe.defaults.guidance_scale if args.guidance is None else args.guidance
    schedule = "trailing" if sampler == "lcm" else pipe.defaults.sigma_schedule
    print(f"\n{sampler} / {schedule}, {steps} steps, guidance "
          f"{guidance}, sigma_max {pipe.defaults.sigma_max}; {results['fd_images']} images for FD")
    print("\n".join(format_results(results)))
    print(format_cost(results))
    return 0


SCENE_BATCH = 50  # prompts per pipeline call in tinydiff eval on scenes: the progress bar moves per batch
# tinydiff eval --n-per-kind's default: 1,000 images, about a minute on two busy CPU cores (plus ~10 s of floor)
SCENE_PROMPTS_PER_KIND = 200


def _eval_scenes(args, pipe, sampler: str) -> int:
    """``tinydiff eval`` on a scenes model: ``evaluate_scenes`` on ``evaluation_prompts(n)``, each
    metric beside the floor (``scene_floor``: real scenes of held-out digits, the same prompts)."""
    import time

    from tqdm import tqdm

    from .evaluate_scenes import evaluate_scenes, evaluation_prompts, pipeline_generator, scene_floor
    from .train.classifier import load_classifier

    if args.n_per_digit is not None or args.n_attribute is not None:
        raise CLIError("--n-per-digit and --n-attribute are for digits models; this model draws scenes: "
                       "use --n-per-kind")
    if pipe.image_size != 32:
        raise CLIError(f"this scenes model returns {pipe.image_size}×{pipe.image_size} crops (its folder predates the "
                       f"image_size setting); upgrade it once with: {_upgrade_command(_model_path(args.model))}")
    n = SCENE_PROMPTS_PER_KIND if args.n_per_kind is None else args.n_per_kind
    prompts = evaluation_prompts(n)
    classifier = load_classifier()
    steps = args.steps or pipe.defaults.steps
    start = time.perf_counter()
    with _batch_workers(pipe, len(prompts) * steps, sampler), \
            tqdm(total=len(prompts), desc="generating", unit="img", dynamic_ncols=True) as bar:
        generate = pipeline_generator(pipe, seed=args.seed, progress=bar.update, steps=args.steps,
                                      sampler=args.sampler, guidance_scale=args.guidance)
        results = evaluate_scenes(generate, prompts, classifier=classifier, batch_size=SCENE_BATCH)
    seconds = time.perf_counter() - start
    floor = scene_floor(n, classifier=classifier)  # the same prompts (evaluation_prompts(n)); ~5 s per 100
    guidance = pipe.defaults.guidance_scale if args.guidance is None else args.guidance
    schedule = "trailing" if sampler == "lcm" else pipe.defaults.sigma_schedule
    print(f"\n{sampler} / {schedule}, {steps} steps, guidance {guidance}, sigma_max {pipe.defaults.sigma_max}, "
          f"seed {args.seed}; {len(prompts)} scene prompts ({n} per kind), {seconds:.0f} s to generate and read them")
    print("\n".join(format_scene_results(results, floor)))
    return 0


def format_scene_results(results: dict, floor: dict) -> list[str]:
    """``evaluate_scenes``' results beside the floor's (real scenes of held-out digits), as the
    lines of a Markdown table, one row per metric in the evaluator's order."""
    rows = [f"| {name} | {value:.1%} | {floor[name]:.1%} |" for name, value in results.items() if name != "prompts"]
    return ["| metric | model | floor (real held-out scenes) |", "| --- | --- | --- |"] + rows


def _add_sampling_arguments(command, *, output: str, sampler: bool = True, seed: bool = True,
                            input_colors: bool = False,
                            guidance: str = "classifier-free guidance scale, 0 to 50 (default: the model's, 2)") -> None:
    """The options every sampling command (sample, edit, inpaint, invert) shares, defined once.

    ``sampler``/``seed``: offer --sampler/--seed (inpaint's and invert's loops have their own
    step; inversion is deterministic). ``input_colors``: offer --dark-ink for commands that
    read pictures. ``output``: the default --output.
    """
    command.add_argument("--model", help=MODEL_HELP)
    command.add_argument("--steps", type=int, help="denoising steps (default: the model's, 20)")
    if sampler:
        command.add_argument("--sampler", help="euler, euler_ancestral, heun, dpmpp_2m, ddim, ddpm, or lcm: the "
                                               "distilled consistency student, 1-8 steps (default: dpmpp_2m)")
    command.add_argument("--sigma-schedule", help="karras, leading, trailing or linspace (default: karras)")
    command.add_argument("--guidance", type=float, help=guidance)
    command.add_argument("--negative", help='negative prompt: what to steer away from, e.g. "a bold 8"')
    command.add_argument("--sigma-max", type=float, help="noise level sampling starts from (default: the model's, 14.6)")
    if seed:
        command.add_argument("--seed", type=int, default=0, help="0 or more; image i uses seed + i (default: 0)")
    if input_colors:
        command.add_argument("--dark-ink", action="store_true",
                             help="the input picture is dark ink on a light background: invert it (the model knows "
                                  "white-on-black digits)")
    command.add_argument("--output", default=output,
                         help=f"FILE.png (a grid) or FILE.npy (uint8 (N, H, W)); missing folders are created "
                              f"(default: {output})")
    command.add_argument("--backend", choices=["numpy", "cupy"], help="array backend")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinydiff",
        description="Stable Diffusion in miniature, from scratch in NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"tinydiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="print versions, the array backend, BLAS and whether CuPy/a GPU is usable")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a recipe end to end (mnist-captions: CLIP, VAE, latent U-Net or DiT; "
                                         "mnist-scenes: the same on scenes of several digits)")
    train.add_argument("recipe", help="the recipe to train: mnist-captions, or mnist-scenes (\"a 3 left of a 7\", "
                                      "\"two 7s\", \"the number 42\", \"a small 5\")")
    train.add_argument("--out", help=f"output folder (default: runs/RECIPE, e.g. {DEFAULT_RUN_DIR})")
    train.add_argument("--stages",
                       help="comma-separated stages to run (default: clip,vae,unet; clip,vae,dit with --denoiser dit; "
                            "only the denoiser with --encoders); lcm distils the trained U-Net into a 1-4 step "
                            "consistency student, e.g. --stages lcm on a finished run")
    train.add_argument("--denoiser", default="unet",
                       help="unet (default; pipeline in OUT/model) or dit, the diffusion transformer (OUT/model-dit; "
                            "the shipped mnist-captions-dit's settings)")
    train.add_argument("--steps", type=int,
                       help="steps of the denoiser stage (default: the recipe's, 6000; 11000 for mnist-scenes' U-Net); "
                            "with --resume a finished stage continues to this many, on the learning-rate schedule of "
                            "the new total")
    train.add_argument("--loss-weighting", metavar="W",
                       help="the denoiser's loss: plain (DDPM eq. 14; mnist-captions' U-Net's default) or min_snr (Hang "
                            "et al. 2023; the default of mnist-scenes, the DiT and pixel space)")
    train.add_argument("--lr", type=float,
                       help="the denoiser's peak learning rate (default: the recipe's, 1e-3 for mnist-captions' U-Net; "
                            "2e-3 for mnist-scenes, the DiT and pixel space)")
    train.add_argument("--conditioning", default="tokens",
                       help="what the denoiser reads of the prompt: tokens (default; every token state) or pooled "
                            "(the text encoder's <eos> state alone: the ablation of one pooled text vector; with "
                            "--encoders a finished run's MODEL trains only the denoiser)")
    train.add_argument("--text-objective",
                       help="the clip stage's loss: contrastive (InfoNCE, Radford et al. 2021; mnist-captions' "
                            "default) or slots (mnist-scenes' default: InfoNCE plus a token-level loss, each digit "
                            "token predicts where its digit goes; contrastive is its ablation)")
    train.add_argument("--space", default="latent",
                       help="what the U-Net denoises: latent (default; VAE latents, as Stable Diffusion) or pixel (the "
                            "32×32 pictures themselves, no vae stage; the ablation of the autoencoder: the same steps "
                            "take about 4× as long)")
    train.add_argument("--unet-attention",
                       help="the finest latent U-Net level that cross-attends to the prompt: 4x4 (and the mid block; "
                            "mnist-captions' default) or 8x8 (both levels, mnist-scenes' default: places scene digits "
                            "by their roles better, about 1.6× the training time of 4x4)")
    train.add_argument("--encoders", metavar="MODEL",
                       help="take the tokenizer, text encoder and VAE from this pipeline (a shipped model's name or a "
                            "folder) instead of training the clip and vae stages")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    train.add_argument("--backend", choices=["numpy", "cupy"], help="array backend (default: TINYDIFF_BACKEND or numpy)")
    train.add_argument("--seed", type=int, default=0, help="seed for weights and data order (default: 0)")
    train.add_argument("--quick", action="store_true", help="a smoke run of under a minute (no useful model)")
    train.add_argument("--threads", type=int, help="CPU cores sharing each U-Net batch, one worker process each beyond the first (default: one per core)")
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser(
        "sample", help="generate digits (or scenes, with a scenes model) from a prompt",
        description="Generate digits from a prompt. The shipped model knows 36 words (digits, number words, "
                    "thin/bold, small/large, leaning left/right, standing upright, ...), at most 14 in a prompt: "
                    "tinydiff words lists them. A scenes model (--model mnist-scenes) draws 32×32 scenes and takes "
                    "the four kinds of scene caption only: \"a 3 left of a 7\" (right of, above, below), "
                    "\"two 7s\" (three), \"the number 42\", \"a small 5\" (big).")
    sample.add_argument("prompt", help='what to draw, e.g. "a bold handwritten 7" (tinydiff words lists the '
                                       'words the model knows)')
    sample.add_argument("--num-images", type=int, default=8, help="images to generate (default: 8)")
    _add_sampling_arguments(sample, output="samples.png")
    sample.set_defaults(func=cmd_sample)

    inputs = ("a PNG (any size; white ink on black, or see --dark-ink) or a .npy of uint8 digits (28, 28) or "
              "(N, 28, 28)")
    edit = sub.add_parser(
        "edit", help="redraw digits under a prompt (image-to-image, SDEdit)",
        description="Redraw digits under a prompt: the picture is noised part of the way (--strength) and "
                    "denoised under the prompt, so its layout stays and its details follow the prompt.")
    edit.add_argument("input", help=f"the digits to edit: {inputs}")
    edit.add_argument("prompt", help='what to turn them into, e.g. "a bold 8"')
    edit.add_argument("--strength", type=float, default=0.6,
                      help="0 to 1: the share of the denoising steps redone; 0 keeps the picture, 1 ignores it "
                           "(default: 0.6)")
    _add_sampling_arguments(edit, output="edited.png", input_colors=True)
    edit.set_defaults(func=cmd_edit)

    inpaint = sub.add_parser(
        "inpaint", help="regenerate the masked part of digits under a prompt (RePaint)",
        description="Regenerate the white part of --mask under the prompt, keeping every other pixel of the input.")
    inpaint.add_argument("input", help=f"the digits: {inputs}")
    inpaint.add_argument("prompt", help='what the completed digits should be, e.g. "a handwritten 4"')
    inpaint.add_argument("--mask", required=True,
                         help="white/1/True = regenerate: a PNG the size of the input picture, or a .npy of bool "
                              "or uint8 (28, 28) or (N, 28, 28)")
    inpaint.add_argument("--jumps", type=int, default=0,
                         help="RePaint resampling: redo each step this many times so the two parts agree "
                              "(costs jumps + 1 times the steps; default: 0)")
    _add_sampling_arguments(inpaint, output="inpainted.png", sampler=False, input_colors=True)
    inpaint.set_defaults(func=cmd_inpaint)

    invert = sub.add_parser(
        "invert", help="find the noise that redraws digits (DDIM inversion), and redraw them from it",
        description="Run the deterministic sampler (DDIM) backwards to find the noise from which the prompt redraws "
                    "the input; write that noise (--noise-output) and the redrawn digits (--output).")
    invert.add_argument("input", help=f"the digits: {inputs}")
    invert.add_argument("prompt", help='a description of the input, e.g. "a thin 7"')
    invert.add_argument("--noise-output", default="noise.npy",
                        help="FILE.npy for the noise, float32 (N, 4, 8, 8), unit variance (default: noise.npy)")
    invert.add_argument("--iterations", type=int, default=0,
                        help="fixed-point refinements of each inverse step, one U-Net call each: a far closer "
                             "round trip (default: 0)")
    _add_sampling_arguments(invert, output="reconstruction.png", sampler=False, seed=False, input_colors=True,
                            guidance="classifier-free guidance scale, 0 to 50; above 1 the round trip drifts "
                                     "(default: 1)")
    invert.set_defaults(func=cmd_invert)

    words = sub.add_parser("words", help="list the words a model knows (its whole vocabulary), grouped")
    words.add_argument("--model", help=MODEL_HELP)
    words.set_defaults(func=cmd_words)

    evaluate = sub.add_parser(
        "eval", help="measure a model: prompt accuracy, MNIST-FD, attribute adherence, CLIP; for a scenes model the "
                     "scene metrics (relations, counts, numbers, sizes) beside the floor of real scenes",
        description="Measure a model. A digits model: prompt accuracy, MNIST-FD, attribute adherence, CLIP. A scenes "
                    "model (its tokenizer knows the scene captions' words, e.g. mnist-scenes): the metrics of "
                    "tinydiff.evaluate_scenes, each beside the floor, the same prompts drawn as real scenes of "
                    "held-out digits.")
    evaluate.add_argument("--model", help=MODEL_HELP)
    evaluate.add_argument("--n-per-digit", type=int, help="digits models: images per digit prompt (default: 100)")
    evaluate.add_argument("--n-attribute", type=int,
                          help="digits models: images per bold/thin prompt and digit (default: 20)")
    evaluate.add_argument("--n-per-kind", type=int,
                          help="scenes models: N prompts of each kind, an even number: 5N images (N relation, "
                               "count, number, small, big) (default: 200)")
    evaluate.add_argument("--steps", type=int, help="denoising steps (default: the model's, 20)")
    evaluate.add_argument("--sampler", help="a sampler of tinydiff sample --sampler, e.g. lcm (default: the model's)")
    evaluate.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, 2)")
    evaluate.add_argument("--seed", type=int, default=0, help="0 or more (default: 0)")
    evaluate.add_argument("--backend", choices=["numpy", "cupy"], help="array backend")
    evaluate.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .backend import BackendError
    from .io import CheckpointError

    # ValueError: the library checks its arguments and says what is wrong (PromptError is one)
    expected = (CLIError, CheckpointError, BackendError, ValueError) + _lazy_errors()
    try:
        return args.func(args)
    except expected as err:
        print(f"tinydiff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinydiff: interrupted", file=sys.stderr)
        return 130


def _lazy_errors() -> tuple:
    """User-facing error types of the heavier modules (imported only when the CLI runs)."""
    from .data.mnist import DatasetError
    from .editing import EditInputError
    from .pipeline import PromptError
    from .train.loop import TrainingDiverged
    from .train.parallel import WorkerError
    from .train.recipes import RecipeError

    return (DatasetError, EditInputError, PromptError, RecipeError, TrainingDiverged, WorkerError)


if __name__ == "__main__":
    sys.exit(main())
