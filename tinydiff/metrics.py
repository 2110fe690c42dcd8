"""Metrics, one section per kind of model. Every metric is computed on the held-out digits.

Metrics run once per evaluation, not per step. The CLIP and autoencoder metrics take NumPy
arrays (``tinydiff.backend.to_numpy`` converts); the sample-quality ones accept either backend.

CLIP (the contrastive text/image encoders)
------------------------------------------
All three compare cosine similarities cos(a, b) = a·b / (‖a‖ ‖b‖) between image and text
embeddings; the learned scale s does not change any ranking, so it plays no part here.

* **Zero-shot accuracy** (Radford et al. 2021, §3.1.2): embed the ten prompts "a handwritten
  zero" … "a handwritten nine"; an image is classified as the digit whose prompt is most
  similar. Top-1 accuracy over the held-out digits.
* **Retrieval recall@1**: each held-out image gets one caption from the grammar. Text → image:
  for each caption, is the most similar image its own? Image → text: for each image, is the
  most similar caption its own? *Ties in content*: many captions say the same thing ("7",
  "a handwritten seven" and "the digit 7" all say only "seven"), and no model could tell their
  images apart. A retrieval therefore counts as correct when the retrieved item's caption has
  the same *content* as the query's: the same set of words once digit words are written as
  numerals and the grammar's filler words (a, an, the, digit, picture, of, handwritten) are
  dropped (``caption_content_key``). Identical captions have identical embeddings; of exactly
  equal similarities the first is taken, which the content rule makes harmless.
* **Attribute probing**: for held-out images whose attribute is at an extreme (thin or bold,
  leaning left or right, as measured from the pixels with thresholds fitted on the training
  split), is the image closer to the prompt naming its own value ("a bold handwritten 7") than
  to the one naming the opposite ("a thin handwritten 7")? Chance is 50%.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
import scipy.linalg

from .backend import get_xp, to_numpy
from .data.mnist import IMAGE_SIZE, MODEL_SIZE, PAD, load_mnist, to_model_range, train_test_split
from .text.captions import (
    BOLD, DIGIT_WORDS, LEFT, RIGHT, TEMPLATES, THIN, probe_prompts, sample_captions, zero_shot_prompts,
)
from .text.tokenizer import split_words

# =========================================================================== CLIP


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(a_i, b_j) for every pair, over the last axis: a (..., N, E), b (..., M, E) → (..., N, M)."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ np.swapaxes(b, -1, -2)


def prompt_choice_accuracy(image_emb: np.ndarray, candidate_emb: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of images whose most similar candidate prompt is ``targets[i]``.

    image_emb (N, E); candidate_emb (K, E), the same K prompts for every image (zero-shot), or
    (N, K, E), K prompts per image (probing); targets (N,) ints in [0, K).
    """
    if candidate_emb.ndim == 2:
        sims = cosine_similarity(image_emb, candidate_emb)  # (N, K)
    else:
        sims = cosine_similarity(image_emb[:, None, :], candidate_emb)[:, 0, :]  # (N, 1, K) → (N, K)
    return float(np.mean(sims.argmax(axis=1) == np.asarray(targets)))


def retrieval_recall_at_1(image_emb: np.ndarray, text_emb: np.ndarray,
                          keys: Sequence[Hashable] | None = None) -> tuple[float, float]:
    """(text → image, image → text) recall@1 for N pairs (image_emb[i], text_emb[i]).

    A retrieval is correct when the retrieved item's key equals the query's (default keys: the
    pair index, i.e. only the exact partner counts). Pass content keys to treat captions that
    say the same thing as interchangeable.
    """
    n = len(image_emb)
    keys = list(range(n)) if keys is None else list(keys)
    codes = {key: code for code, key in enumerate(dict.fromkeys(keys))}
    key_ids = np.array([codes[k] for k in keys])  # (N,) one integer per distinct key
    sims = cosine_similarity(image_emb, text_emb)  # (N images, N texts)
    text_to_image = key_ids[sims.argmax(axis=0)] == key_ids  # best image for each caption
    image_to_text = key_ids[sims.argmax(axis=1)] == key_ids  # best caption for each image
    return float(text_to_image.mean()), float(image_to_text.mean())


_FILLER_WORDS = frozenset(split_words(" ".join(re.sub(r"\{\w+\}", " ", t) for t in TEMPLATES))) | {"an"}


def caption_content_key(text: str) -> frozenset:
    """What a caption says: its words, digit words as numerals, minus the grammar's filler.

    "a handwritten seven" → {"7"};  "the digit 7, bold" → {"7", "bold"}.
    """
    words = (str(DIGIT_WORDS.index(w)) if w in DIGIT_WORDS else w for w in split_words(text))
    return frozenset(words) - _FILLER_WORDS


PROBED_ATTRIBUTES = {"thickness": (THIN, BOLD), "slant": (LEFT, RIGHT)}  # the two extremes of each


def evaluate_clip(model, tokenizer, test, *, seed: int = 0) -> dict[str, float]:
    """Every CLIP metric on held-out digits.

    model: a ``tinydiff.models.clip.CLIP``; tokenizer: its ``Tokenizer``; test: a
    ``CaptionedDigits`` (images, labels, attributes). ``seed`` fixes the captions drawn for
    retrieval. Returns zero_shot_accuracy; recall_text_to_image, recall_image_to_text and
    recall_chance (what retrieving at random scores: Σ_k p_k² over the content keys' frequencies
    p_k); and probe_<attribute> with probe_<attribute>_count (images at an extreme) for each
    probed attribute.
    """
    def embed(prompts):
        tokens = tokenizer.encode(prompts)
        return model.embed_texts(tokens.ids, tokens.mask)

    image_emb = model.embed_images(test.images)  # (N, E)
    results = {"zero_shot_accuracy": prompt_choice_accuracy(image_emb, embed(zero_shot_prompts()), test.labels)}

    captions = sample_captions(test.labels, test.attributes, np.random.default_rng(seed))
    keys = [caption_content_key(c) for c in captions]
    results["recall_text_to_image"], results["recall_image_to_text"] = retrieval_recall_at_1(
        image_emb, embed(captions), keys)
    frequencies = np.array(list(Counter(keys).values())) / len(keys)  # p_k of each distinct content
    results["recall_chance"] = float(np.sum(frequencies**2))  # a random pick matches with Σ_k p_k²

    for attribute, codes in PROBED_ATTRIBUTES.items():
        prompts = [{p.code: p.prompt for p in probe_prompts(d) if p.attribute == attribute} for d in range(10)]
        prompt_emb = embed([prompts[d][c] for d in range(10) for c in codes])  # (10·2, E)
        prompt_emb = prompt_emb.reshape(10, len(codes), -1)  # (digit, extreme, E)
        values = test.attributes[attribute]
        chosen = np.isin(values, codes)  # images at an extreme
        targets = (values[chosen] == codes[1]).astype(np.int64)  # 0: first extreme, 1: second
        results[f"probe_{attribute}"] = prompt_choice_accuracy(
            image_emb[chosen], prompt_emb[test.labels[chosen]], targets)
        results[f"probe_{attribute}_count"] = int(chosen.sum())
    return results


# =========================================================================== Autoencoder
#
# Reconstruction quality of the autoencoder, on the held-out digits, as PSNR: the mean squared
# error on a log scale relative to the largest possible error. Higher is better; +6 dB halves
# the RMS error. x̂ = decode(μ), the deterministic reconstruction (no sampled noise).


def psnr(x: np.ndarray, x_hat: np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 · log10(data_range² / MSE), the MSE pooled over every
    element of x (all images together, not an average of per-image PSNRs; by Jensen's inequality
    that average would be the higher of the two).

    The default range 2 is for model-range images in [−1, 1]. It equals the PSNR of the same
    images in [0, 1] with range 1: mapping x ↦ (x + 1)/2 divides the MSE by 4 and the squared
    range by 4, and the ratio is unchanged. x̂ is used as is (not clipped to the range).
    """
    x, x_hat = np.asarray(x, dtype=np.float64), np.asarray(x_hat, dtype=np.float64)
    if x.shape != x_hat.shape:
        raise ValueError(f"psnr: images {x.shape} and reconstructions {x_hat.shape} differ in shape")
    mse = float(np.mean((x - x_hat) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def evaluate_autoencoder(model, images: np.ndarray, *, batch_size: int = 250) -> dict[str, float]:
    """Reconstruction metrics of an ``AutoencoderKL`` on model-range images (N, 1, 32, 32).

    Returns psnr (the whole 32×32 image the model sees), psnr_digit_area (the central 28×28, the
    original MNIST digit: the 2-pixel padded border is easy background, and leaving it out
    lowers the PSNR by about 10·log10(1024/784) ≈ 1.2 dB when the border's error is ~0) and mse.
    """
    x_hat = to_numpy(model.reconstruct(images, batch_size))  # (N, 1, 32, 32)
    inner = (slice(None), slice(None), slice(PAD, -PAD), slice(PAD, -PAD))  # (N, 1, 28, 28) window
    return {
        "psnr": psnr(images, x_hat),
        "psnr_digit_area": psnr(images[inner], x_hat[inner]),
        "mse": float(np.mean((np.asarray(images, dtype=np.float64) - x_hat) ** 2)),
    }


# =========================================================================== Sample quality
#
# How good are generated digits? Three numbers, each computed with the evaluation classifier
# (``tinydiff.models.classifier``, shipped trained: ``tinydiff.train.classifier.load_classifier()``):
#
# * **Fréchet distance** (FID's recipe, Heusel et al. 2017, with the digit classifier's 64-d
#   penultimate features in place of Inception v3's 2,048): fit a Gaussian N(μ, Σ) to the
#   features of each image set and take the Fréchet (2-Wasserstein) distance between them,
#       FD = ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^{1/2}).
#   0 for identical statistics. Like FID it is biased upwards at small N (the covariances are
#   noisy), so compare values computed with the same N; ``real_vs_real_fd`` is the floor a
#   perfect generator would reach at that N.
# * **Prompt accuracy**: the fraction of samples the classifier reads as the digit asked for.
# * **Ink mass**: how much ink an image holds, for attribute adherence ("a bold 7" should carry
#   more ink than "a thin 7").
#
# Every function accepts images as model-range floats (N, 1, 32, 32) in [−1, 1] on either
# backend, or as uint8 pixels (N, 28, 28) / (N, 32, 32) with 0 = background, 255 = ink.


def as_model_images(images):
    """Images in any accepted form → floats (N, 1, 32, 32) in [−1, 1] (float input: unchanged).

    uint8 (N, 28, 28): ``tinydiff.data.mnist.to_model_range`` (pad 2, scale). uint8 (N, 32, 32)
    (``from_model_range(..., crop=False)``): x = p / 127.5 − 1 with a channel axis added.
    """
    shape = tuple(images.shape)
    if images.dtype == np.uint8:
        pixels = to_numpy(images)
        if shape[1:] == (IMAGE_SIZE, IMAGE_SIZE):
            return to_model_range(pixels)
        if shape[1:] == (MODEL_SIZE, MODEL_SIZE):
            return (pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0))[:, None]  # (N, 1, 32, 32)
    elif images.dtype.kind == "f" and shape[1:] == (1, MODEL_SIZE, MODEL_SIZE):
        return images
    raise ValueError(
        "expected model-range floats (N, 1, 32, 32) or uint8 pixels (N, 28, 28) / (N, 32, 32), "
        f"got {images.dtype} {shape}"
    )


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    μ = mean, Σ = covariance (unbiased, divided by N − 1) of each set, in float64; then
        FD = ‖μa − μb‖² + Tr Σa + Tr Σb − 2 Tr (Σa Σb)^{1/2}.
    Σa Σb is not symmetric, but it is similar to the PSD matrix Σa^{1/2} Σb Σa^{1/2}, so its
    eigenvalues are real and ≥ 0 and its principal square root exists. ``scipy.linalg.sqrtm``
    computes it through a complex Schur form, so rounding can leave tiny imaginary parts, which
    are dropped (an error if any diagonal entry's exceeds 1e-3: then the input is bad). For a
    singular product (fewer samples than dimensions, dead features) sqrtm can fail to return a
    finite result; then ε = 1e-6 is added to both diagonals first, as pytorch-fid does.
    """
    a = np.asarray(to_numpy(feats_a), dtype=np.float64)
    b = np.asarray(to_numpy(feats_b), dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two sets of ≥ 2 feature vectors (N, D) of one D, "
                         f"got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)  # (D,)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = 1e-6 * np.eye(len(mu_a))
        covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        if np.abs(np.diagonal(covmean).imag).max() > 1e-3:
            raise ValueError(f"frechet_distance: (Σa Σb)^½ has imaginary component "
                             f"{np.abs(covmean.imag).max():.3g}; are the features finite and varied?")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def mnist_fd(classifier, images_a, images_b) -> float:
    """Fréchet distance between the classifier's penultimate features of two image sets."""
    return frechet_distance(classifier.features(as_model_images(images_a)),
                            classifier.features(as_model_images(images_b)))


def real_vs_real_fd(classifier, n: int = 1000, seed: int = 0) -> float:
    """The floor of ``mnist_fd`` at N = n: the distance between two disjoint sets of real digits.

    Set A: n of the 1,000 held-out digits (``train_test_split`` of the bundled 10,000 with its
    default seed 0); all of them by default. Set B: n of the 9,000 training digits. Both are
    drawn without replacement by ``np.random.default_rng(seed)``, A first (at random, not the
    first n: the bundled file is sorted by digit). This is what a generator that reproduced its
    training data perfectly would score against the held-out digits.
    """
    images, _ = load_mnist()
    train_idx, test_idx = train_test_split(len(images))
    if not 2 <= n <= len(test_idx):
        raise ValueError(f"n must be between 2 and {len(test_idx)} (the held-out digits), got {n}")
    generator = np.random.default_rng(seed)
    held_out = generator.choice(test_idx, size=n, replace=False)
    training = generator.choice(train_idx, size=n, replace=False)
    return mnist_fd(classifier, images[held_out], images[training])


def prompt_accuracy(classifier, images, intended_labels) -> float:
    """Fraction of images the classifier reads as the intended digit: mean[predict(x_i) = y_i]."""
    predicted = classifier.predict(as_model_images(images))  # (N,)
    intended = np.asarray(to_numpy(intended_labels))
    if intended.shape != predicted.shape:
        raise ValueError(f"{len(predicted)} images but intended_labels has shape {intended.shape}")
    return float(np.mean(predicted == intended))


def ink_mass(images) -> float:
    """Mean ink per image: (1/N) Σ_n Σ_pixels ink, with ink = clip((x + 1)/2, 0, 1) ∈ [0, 1].

    In pixel units, a fully inked pixel counts 1 and background 0, so a uint8 digit's ink mass is
    Σ p/255: the same ``ink`` that ``tinydiff.text.captions.measure_images`` measures and the
    "thin"/"bold" thresholds are fitted on. The 2-pixel border of a 32×32 frame is background and
    adds nothing.
    """
    x = as_model_images(images)
    xp = get_xp(x)
    ink = xp.clip((x + 1.0) / 2.0, 0.0, 1.0)  # (N, 1, 32, 32)
    return float(ink.sum(axis=(1, 2, 3)).mean())
