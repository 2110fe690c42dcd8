"""Evaluate a text-to-image pipeline: does it draw the digit asked for, like real digits, in the
style asked for? (``tinydiff eval``)

* **prompt accuracy** — generate ``n_per_digit`` images for each prompt "a handwritten {zero…nine}"
  and let the shipped evaluation classifier read them (``metrics.prompt_accuracy``);
* **MNIST-FD** — Fréchet distance between the classifier features of those generated digits and
  as many held-out real digits, printed beside the real-vs-real distance at the same N, the floor
  a perfect generator would reach (``metrics.mnist_fd``, ``metrics.real_vs_real_fd``);
* **attribute adherence** — mean ink of "a bold handwritten {d}" images over that of "a thin
  handwritten {d}" images (> 1 means the words change the drawing in the right direction), and
  the same for the training data's bold and thin digits as the reference;
* **CLIP zero-shot accuracy** on the held-out digits, when the pipeline carries CLIP's image
  encoder (``metrics.evaluate_clip``);
* the two instruments every number above passes through, on the held-out digits: the **VAE's
  reconstruction PSNR** (``metrics.evaluate_autoencoder``: every sample is decoded by it, so it
  bounds how sharp a sample can be) and the **evaluation classifier's accuracy** (it reads every
  generated digit, so its own error rate bounds what prompt accuracy can show).

``format_results`` turns the dict into the model card's table (``tinydiff eval`` prints it).

All sampling uses the pipeline's defaults (20 DPM++ 2M Karras steps with guidance) unless told
otherwise, and fixed seeds, so the table is reproducible.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .cost import pipeline_cost
from .metrics import evaluate_autoencoder, evaluate_clip, ink_mass, mnist_fd, prompt_accuracy, real_vs_real_fd
from .text.captions import BOLD, DIGIT_WORDS, THIN
from .train.classifier import load_classifier
from .train.clip import load_captioned_mnist


def _generate(pipe, prompts: list[str], *, batch_size: int, seed: int, progress, **options) -> np.ndarray:
    """Images for ``prompts`` in batches; image i uses seed + i whatever the batching."""
    parts = []
    for start in range(0, len(prompts), batch_size):
        parts.append(pipe(prompts[start:start + batch_size], seed=seed + start, **options))
        progress(len(prompts[start:start + batch_size]))
    return np.concatenate(parts)


def evaluate_pipeline(pipe, *, n_per_digit: int = 100, n_attribute: int = 20, batch_size: int = 100, seed: int = 0,
                      progress: Callable[[int], None] | None = None, **options) -> dict[str, float]:
    """The metrics above as a dict; ``options`` go to the pipeline call (steps, sampler, …).

    ``progress(k)`` is called after every k images generated (total: 10·n_per_digit +
    20·n_attribute).
    """
    progress = progress or (lambda k: None)
    classifier = load_classifier()
    train, test = load_captioned_mnist()

    labels = np.repeat(np.arange(10), n_per_digit)
    prompts = [f"a handwritten {DIGIT_WORDS[d]}" for d in labels]
    start = time.perf_counter()
    generated = _generate(pipe, prompts, batch_size=batch_size, seed=seed, progress=progress, **options)
    seconds_per_image = (time.perf_counter() - start) / len(prompts)
    n = len(generated)
    held_out = test.images[np.random.default_rng(seed).choice(len(test.images), size=min(n, len(test.images)),
                                                              replace=False)]
    results = {
        "prompt_accuracy": prompt_accuracy(classifier, generated, labels),
        "mnist_fd": mnist_fd(classifier, generated, held_out),
        "mnist_fd_real_vs_real": real_vs_real_fd(classifier, n=len(held_out), seed=seed),
        "fd_images": len(held_out),
    }

    digits = np.repeat(np.arange(10), n_attribute)
    bold = _generate(pipe, [f"a bold handwritten {d}" for d in digits], batch_size=batch_size, seed=seed + 10**6,
                     progress=progress, **options)
    thin = _generate(pipe, [f"a thin handwritten {d}" for d in digits], batch_size=batch_size, seed=seed + 10**6,
                     progress=progress, **options)
    results["bold_prompt_accuracy"] = prompt_accuracy(classifier, bold, digits)
    results["thin_prompt_accuracy"] = prompt_accuracy(classifier, thin, digits)
    results["ink_bold_over_thin"] = ink_mass(bold) / ink_mass(thin)
    thickness = train.attributes["thickness"]
    results["ink_bold_over_thin_real"] = ink_mass(train.images[thickness == BOLD]) / ink_mass(train.images[thickness == THIN])

    if pipe.image_encoder is not None:
        results["clip_zero_shot_accuracy"] = evaluate_clip(_clip_from(pipe), pipe.tokenizer, test)["zero_shot_accuracy"]
    results["vae_psnr"] = evaluate_autoencoder(pipe.vae, test.images)["psnr"]  # test.images: (N, 1, 32, 32)
    results["classifier_accuracy"] = float(np.mean(classifier.predict(test.images) == test.labels))
    # the cost of the run: FLOPs counted per image (tinydiff.cost), seconds measured on the digit prompts above
    cost = pipeline_cost(pipe, options.get("sampler"), options.get("steps"), options.get("guidance_scale"),
                         seconds_per_image=seconds_per_image)
    results.update({k: cost[k] for k in ("gflop_per_image", "seconds_per_image", "gflop_per_s")})
    return results


def _clip_from(pipe):
    """A CLIP wrapper around the pipeline's own text and image encoders (no copies)."""
    from .models.clip import CLIP, CLIPConfig

    clip = CLIP(CLIPConfig(text=pipe.text_encoder.config, image=pipe.image_encoder.config))
    clip.text, clip.image = pipe.text_encoder, pipe.image_encoder
    return clip.to(pipe.backend).eval()


def format_results(r: dict) -> list[str]:
    """The results of ``evaluate_pipeline`` as the lines of a Markdown table: the model card's rows
    (README.md), in its order. The CLIP row is left out when the pipeline had no image encoder."""
    rows = [
        ('prompt accuracy ("a handwritten {digit}")', f"{r['prompt_accuracy']:.1%}"),
        (f"MNIST-FD, generated vs held-out ({r['fd_images']:,} images)", f"{r['mnist_fd']:.2f}"),
        ("MNIST-FD, real vs real (the floor)", f"{r['mnist_fd_real_vs_real']:.2f}"),
        ("MNIST-FD / floor", f"{r['mnist_fd'] / r['mnist_fd_real_vs_real']:.2f}×"),
        (f'ink of "bold" / "thin" prompts (training digits: {r["ink_bold_over_thin_real"]:.2f}×)',
         f"{r['ink_bold_over_thin']:.2f}×"),
        ('prompt accuracy, "a bold …" / "a thin …"', f"{r['bold_prompt_accuracy']:.1%} / {r['thin_prompt_accuracy']:.1%}"),
    ]
    if "clip_zero_shot_accuracy" in r:
        rows.append(("CLIP zero-shot accuracy (held-out)", f"{r['clip_zero_shot_accuracy']:.1%}"))
    rows += [
        ("VAE reconstruction PSNR (held-out)", f"{r['vae_psnr']:.1f} dB"),
        ("evaluation classifier accuracy (held-out)", f"{r['classifier_accuracy']:.1%}"),
    ]
    return ["| metric | value |", "| --- | --- |"] + [f"| {label} | {value} |" for label, value in rows]


def format_cost(r: dict) -> str:
    """The cost line of ``evaluate_pipeline``'s results: FLOPs counted (tinydiff.cost), time measured."""
    return (f"cost: {r['gflop_per_image']:.2f} GFLOP per image (counted), {r['seconds_per_image'] * 1e3:.0f} ms "
            f"per image (measured on the digit prompts), {r['gflop_per_s']:.1f} GFLOP/s")
