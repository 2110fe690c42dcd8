"""Metrics, one section per kind of model. Every metric is computed on the held-out digits.

Inputs are NumPy arrays on the CPU (``tinydiff.backend.to_numpy`` converts): metrics are cheap
and run once per evaluation, not per step.

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

import re
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

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
