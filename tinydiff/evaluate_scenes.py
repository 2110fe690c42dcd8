"""Evaluate compositional prompts: does "a 3 left of a 7" put a 3 on the left and a 7 on the right?

The scenes of ``tinydiff.data.scenes`` have a known slot geometry, so a picture generated for a
scene caption can be checked by reading each slot with the evaluation classifier
(``tinydiff.models.classifier``, shipped trained):

1. **crop** the slots the caption's kind uses (``scenes.SLOTS``);
2. **empty or not**: a crop holding less than ``EMPTY_INK`` fully inked pixels of ink (ink mass
   Σ p/255 over the pixels brighter than ``INK_LEVEL``) is empty;
3. **normalise like MNIST** (``normalize_digit``): cut the crop to its ink box (pixels >
   ``INK_LEVEL``), area-resize it so that its longest side is 20 pixels, and paste it into a
   28×28 frame with its centre of mass at the centre, which is how the MNIST digits themselves
   were prepared (LeCun et al. 1998: size-normalised into a 20×20 box, centred by the centre of
   mass in 28×28). A digit of any size and position in its slot is then read as the classifier
   was trained to read;
4. **read** the digit with the classifier.

Metrics (``evaluate_scenes``), each a fraction of the prompts of its kind:

* ``relation_accuracy``: both digits read right, each in the slot its relation puts it;
* ``relation_side_by_side_accuracy`` / ``relation_stacked_accuracy``: ``relation_accuracy`` over
  the prompts with "left of"/"right of" and with "above"/"below" only;
* ``relation_swapped``: both digits read, but each in the other's slot ("a 3 left of a 7" drawn
  as 7 left of 3): what a text embedding that keeps the words but not their order produces;
* ``swapped_pair_accuracy``: the prompts come in pairs that differ only in the order of the two
  digits ("a 3 left of a 7" and "a 7 left of a 3"); the fraction of pairs with both pictures
  right. A model that cannot tell the two prompts apart draws the same picture for both and
  scores 0; one that guesses the order at random scores 25%;
* ``count_accuracy``: exactly ``count`` non-empty grid cells, every one read as the digit;
  ``count_only_accuracy`` asks only for the number of non-empty cells;
* ``number_accuracy``: both digits of "the number 42" read right, in order (the whole number);
  ``number_digits_accuracy``: the fraction of single digits right;
* ``small_accuracy`` / ``big_accuracy``: the digit read right and its ink box's longest side in
  the size asked for (at most ``SMALL_MAX`` pixels for small, at least ``BIG_MIN`` for big);
  ``small_digit_accuracy`` / ``big_digit_accuracy`` ask only for the digit.

``evaluate_scenes(generate, prompts)`` takes any function from a list of prompts to uint8
images (N, 32, 32): a trained pipeline (``pipeline_generator(pipe)``; ``tinydiff eval --model
FOLDER`` does this for a pipeline trained on scenes, ``is_scene_pipeline``), or
``real_scenes_generator()``, whose "generated" pictures are real scenes of held-out digits: the
floor that says how much of any shortfall is the instrument's own (``scene_floor``). The floor
has two parts: the classifier misreads 1.4% of the held-out digits even alone and unscaled, and
scenes add the cost of cropping, shrinking and normalising; ``scene_floor(legible=True)``
measures the second alone, on the held-out digits the classifier reads right by themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .data.mnist import IMAGE_SIZE, from_model_range, load_mnist, to_model_range
from .data.scenes import (
    CANVAS,
    COUNT_WORDS,
    GRID_SLOTS,
    NUMBER_SLOTS,
    RELATIONS,
    SIZE_WORDS,
    SLOTS,
    SceneSpec,
    ink_box,
    parse_caption,
    render_captions,
    resize_area,
    scene_caption,
    scene_vocabulary,
    split_indices,
)
from .metrics import as_model_images

INK_LEVEL = 64  # pixels above this (of 255) count as ink: generated backgrounds are never exactly 0
EMPTY_INK = 3.0  # a slot with less ink mass than 3 fully inked pixels is empty
DIGIT_BOX = 20  # MNIST's normalised size: the longest side of the ink box, in a 28×28 frame
SMALL_MAX = 14  # "a small d": ink box's longest side ≤ 14 px (scenes draw 10–12)
BIG_MIN = 24  # "a big d": ≥ 24 px (scenes draw 28–30; an ordinary MNIST digit is 20)


# --------------------------------------------------------------------------- reading slots


def crop(images: np.ndarray, slot: str) -> np.ndarray:
    """The pixels of ``slot`` (a key of ``scenes.SLOTS``) of every image: (N, r1 − r0, c1 − c0)."""
    r0, r1, c0, c1 = SLOTS[slot]
    return images[:, r0:r1, c0:c1]


def ink(images: np.ndarray) -> np.ndarray:
    """Ink mass (N,) of uint8 images (N, H, W): Σ p/255 over the pixels brighter than INK_LEVEL."""
    pixels = images.astype(np.float64)
    return np.where(pixels > INK_LEVEL, pixels, 0.0).sum(axis=(1, 2)) / 255.0


def normalize_digit(patch: np.ndarray) -> np.ndarray:
    """One uint8 crop (h, w) holding a digit → uint8 (28, 28) prepared like an MNIST digit.

    The ink box (pixels > INK_LEVEL) is cut out, area-resized so that its longest side is
    ``DIGIT_BOX`` (aspect ratio kept), and pasted into a blank 28×28 frame shifted so that its
    centre of mass (ink-weighted mean row and column) lands on pixel (14, 14), as near as the
    frame allows. A patch without ink comes back blank.
    """
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    box = ink_box(patch, INK_LEVEL)
    if box is None:
        return frame
    r0, r1, c0, c1 = box
    digit = patch[r0:r1, c0:c1].astype(np.float64)
    s = DIGIT_BOX / max(digit.shape)
    height, width = (max(1, round(n * s)) for n in digit.shape)
    glyph = np.rint(resize_area(digit, height, width)).clip(0, 255)  # (height, width)
    rows, cols = np.mgrid[0:height, 0:width]
    mass = glyph.sum()
    centre_r, centre_c = (rows * glyph).sum() / mass, (cols * glyph).sum() / mass
    top = int(np.clip(round(IMAGE_SIZE / 2 - centre_r), 0, IMAGE_SIZE - height))  # top row of the glyph
    left = int(np.clip(round(IMAGE_SIZE / 2 - centre_c), 0, IMAGE_SIZE - width))
    frame[top : top + height, left : left + width] = glyph.astype(np.uint8)
    return frame


def read_slot(classifier, images: np.ndarray, slot: str) -> np.ndarray:
    """The digit in ``slot`` of every image (N,) int64, −1 where the slot is empty."""
    patches = crop(images, slot)  # (N, h, w)
    empty = ink(patches) < EMPTY_INK  # (N,)
    digits = np.full(len(images), -1, dtype=np.int64)
    if not empty.all():
        frames = np.stack([normalize_digit(p) for p in patches[~empty]])  # (M, 28, 28)
        digits[~empty] = classifier.predict(to_model_range(frames))
    return digits


def longest_side(images: np.ndarray) -> np.ndarray:
    """The longest side (N,) of each image's ink box (pixels > INK_LEVEL), 0 for a blank image."""
    sides = []
    for image in images:
        box = ink_box(image, INK_LEVEL)
        sides.append(0 if box is None else max(box[1] - box[0], box[3] - box[2]))
    return np.array(sides, dtype=np.int64)


# --------------------------------------------------------------------------- judging


def judge(classifier, images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-prompt verdicts: for each key, a bool array over the prompts of that kind, in order.

    Keys: relation, relation_swapped, count, count_only, number, number_digits (one entry per
    digit), small, small_digit, big, big_digit; and relation_index, the index into ``prompts``
    of each relation verdict (to pair them up).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape != (len(prompts), CANVAS, CANVAS):
        raise ValueError(f"expected uint8 images ({len(prompts)}, {CANVAS}, {CANVAS}), "
                         f"got {images.dtype} {images.shape}")
    specs = [parse_caption(p) for p in prompts]
    kinds = np.array([s.kind for s in specs])
    out: dict[str, np.ndarray] = {}

    index = np.flatnonzero(kinds == "relation")
    first_ok, second_ok, first_swapped, second_swapped = (np.zeros(len(index), bool) for _ in range(4))
    for name in ("left", "right", "top", "bottom"):  # read each slot once, where some prompt uses it
        reads = read_slot(classifier, images[index], name)  # (R,)
        for k, i in enumerate(index):
            first, second = specs[i].digits
            first_slot, second_slot = RELATIONS[specs[i].relation]
            if name == first_slot:
                first_ok[k], first_swapped[k] = reads[k] == first, reads[k] == second
            elif name == second_slot:
                second_ok[k], second_swapped[k] = reads[k] == second, reads[k] == first
    out["relation"], out["relation_swapped"] = first_ok & second_ok, first_swapped & second_swapped
    out["relation_index"] = index

    index = np.flatnonzero(kinds == "count")
    cells = np.stack([read_slot(classifier, images[index], c) for c in GRID_SLOTS], axis=1)  # (C, 4)
    wanted = np.array([specs[i].digits[0] for i in index], dtype=np.int64)  # (C,)
    counts = np.array([specs[i].count for i in index], dtype=np.int64)
    filled = (cells >= 0).sum(axis=1)
    out["count_only"] = filled == counts
    out["count"] = out["count_only"] & ((cells == wanted[:, None]) | (cells < 0)).all(axis=1)

    index = np.flatnonzero(kinds == "number")
    reads = np.stack([read_slot(classifier, images[index], s) for s in NUMBER_SLOTS], axis=1)  # (M, 2)
    wanted = np.array([specs[i].digits for i in index], dtype=np.int64).reshape(len(index), len(NUMBER_SLOTS))
    out["number_digits"] = (reads == wanted).ravel()
    out["number"] = (reads == wanted).all(axis=1)

    for word in SIZE_WORDS:
        index = np.flatnonzero([s.kind == "size" and s.size == word for s in specs])
        wanted = np.array([specs[i].digits[0] for i in index], dtype=np.int64)
        read = read_slot(classifier, images[index], "canvas")
        side = longest_side(images[index])
        size_ok = side <= SMALL_MAX if word == "small" else side >= BIG_MIN
        out[f"{word}_digit"] = read == wanted
        out[word] = (read == wanted) & size_ok
    return out


def pair_verdicts(relation_ok: np.ndarray, relation_index: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """For each relation prompt whose swap ("a 7 left of a 3" for "a 3 left of a 7") comes right
    after it, whether both are right; prompts from ``evaluation_prompts`` come in such pairs."""
    position = {int(i): k for k, i in enumerate(relation_index)}  # prompt index -> verdict index
    verdicts, k = [], 0
    while k < len(relation_index):
        i = int(relation_index[k])
        spec = parse_caption(prompts[i])
        if i + 1 in position and parse_caption(prompts[i + 1]) == spec._replace(digits=spec.digits[::-1]):
            verdicts.append(bool(relation_ok[k] and relation_ok[position[i + 1]]))
            k += 2  # the pair is used up
        else:
            k += 1
    return np.array(verdicts, dtype=bool)


# --------------------------------------------------------------------------- prompts and metrics


def evaluation_prompts(n_per_kind: int = 100, *, seed: int = 0) -> list[str]:
    """Scene prompts for evaluation, a function of the seed: ``n_per_kind`` relation prompts
    (n/2 pairs "a 3 left of a 7", "a 7 left of a 3", relations drawn uniformly), count prompts,
    number prompts, and n "a small d" plus n "a big d" (the same digits for both sizes)."""
    if n_per_kind < 2 or n_per_kind % 2:
        raise ValueError(f"n_per_kind must be an even number ≥ 2 (relation prompts come in pairs), got {n_per_kind}")
    g = np.random.default_rng(seed)
    prompts = []
    for _ in range(n_per_kind // 2):
        relation = tuple(RELATIONS)[g.integers(len(RELATIONS))]
        a, b = (int(d) for d in g.choice(10, size=2, replace=False))
        prompts += [scene_caption(SceneSpec("relation", (a, b), relation=relation)),
                    scene_caption(SceneSpec("relation", (b, a), relation=relation))]
    for _ in range(n_per_kind):
        count = tuple(COUNT_WORDS)[g.integers(len(COUNT_WORDS))]
        prompts.append(scene_caption(SceneSpec("count", (int(g.integers(10)),), count=count)))
    for _ in range(n_per_kind):
        prompts.append(scene_caption(SceneSpec("number", (int(g.integers(1, 10)), int(g.integers(10))))))
    digits = g.integers(10, size=n_per_kind)
    for word in SIZE_WORDS:
        prompts += [scene_caption(SceneSpec("size", (int(d),), size=word)) for d in digits]
    return prompts


def evaluate_scenes(generate: Callable[[list[str]], np.ndarray], prompts: Sequence[str] | None = None, *,
                    classifier=None, batch_size: int = 250) -> dict[str, float]:
    """The metrics of the module docstring for the pictures ``generate`` makes for ``prompts``.

    ``generate(prompts) -> uint8 (N, 32, 32)`` is called on batches of at most ``batch_size``
    prompts. ``prompts`` defaults to ``evaluation_prompts()``; ``classifier`` to the shipped one.
    """
    if classifier is None:
        from .train.classifier import load_classifier

        classifier = load_classifier()
    prompts = list(evaluation_prompts() if prompts is None else prompts)
    images = np.concatenate([np.asarray(generate(prompts[i : i + batch_size]))
                             for i in range(0, len(prompts), batch_size)])
    v = judge(classifier, images, prompts)
    results = {}
    side_by_side = np.array([RELATIONS[parse_caption(prompts[i]).relation][0] in ("left", "right")
                             for i in v["relation_index"]], dtype=bool)  # (R,): left of / right of
    v["relation_side_by_side"], v["relation_stacked"] = v["relation"][side_by_side], v["relation"][~side_by_side]
    for name in ("relation", "relation_side_by_side", "relation_stacked", "relation_swapped", "count", "count_only",
                 "number", "number_digits", "small", "small_digit", "big", "big_digit"):
        if len(v[name]):
            results[f"{name}_accuracy" if name != "relation_swapped" else name] = float(np.mean(v[name]))
    pairs = pair_verdicts(v["relation"], v["relation_index"], prompts)
    if len(pairs):
        results["swapped_pair_accuracy"] = float(np.mean(pairs))
    results["prompts"] = len(prompts)
    return results


def legible_digits(classifier, split: str = "test") -> np.ndarray:
    """Indices (into ``load_mnist()``) of ``split``'s digits that ``classifier`` reads right on their
    own, at their native 28×28: scenes drawn from these measure what cropping, scaling and
    normalising cost, without the classifier's own error rate on the digits (1.4% held out)."""
    images, labels = load_mnist()
    indices = split_indices(split)
    correct = classifier.predict(to_model_range(images[indices])) == labels[indices]
    return indices[correct]


def real_scenes_generator(*, split: str = "test", seed: int = 0,
                          allowed: np.ndarray | None = None) -> Callable[[list[str]], np.ndarray]:
    """A "generator" that draws real scenes (``scenes.render_captions``) of ``split``'s digits
    (only ``allowed`` ones if given); each call uses the next seed, so batches differ."""
    calls = iter(range(seed, seed + 10**9))

    def generate(prompts: list[str]) -> np.ndarray:
        return render_captions(prompts, split=split, seed=next(calls), allowed=allowed).images

    return generate


def knows_scene_captions(tokenizer) -> bool:
    """Whether ``tokenizer`` knows every word of the scene captions (``scenes.scene_vocabulary``:
    "left", "above", "number", the numbers 10–99, …), which the digits' caption grammar lacks."""
    return set(scene_vocabulary()) <= set(tokenizer.words)


def is_scene_pipeline(pipe) -> bool:
    """Whether ``pipe`` was trained on scenes: its tokenizer knows the scene captions' words
    (``knows_scene_captions``). ``tinydiff eval`` then runs this module's evaluation, and
    ``tinydiff sample`` takes only prompts of the scene grammar (``scenes.parse_caption``)."""
    return knows_scene_captions(pipe.tokenizer)


def pipeline_generator(pipe, *, seed: int = 0, progress: Callable[[int], None] | None = None,
                       **options) -> Callable[[list[str]], np.ndarray]:
    """A trained pipeline as ``evaluate_scenes`` wants it: prompts → uint8 (N, 32, 32).

    The pipeline must return the whole canvas (``image_size`` 32, saved by the scenes recipe;
    a ValueError says how to upgrade a folder saved before the setting existed). Prompt i of the
    k-th call uses seed + (prompts before it) + i; ``options`` go to the pipeline (steps, sampler, …);
    ``progress(n)`` is told after each call that n more images are done.
    """
    if pipe.image_size != CANVAS:
        raise ValueError(f"this pipeline returns {pipe.image_size}×{pipe.image_size} crops, scenes need the whole "
                         f"{CANVAS}×{CANVAS} canvas; set its image_size to {CANVAS} "
                         "(tinydiff.pipeline's docstring shows how)")
    done = 0

    def generate(prompts: list[str]) -> np.ndarray:
        nonlocal done
        images = pipe(list(prompts), seed=seed + done, **options)  # (N, 32, 32) uint8
        done += len(prompts)
        if progress is not None:
            progress(len(prompts))
        return images

    return generate


def vae_round_trip(vae, generate: Callable[[list[str]], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
    """``generate`` followed by the autoencoder's round trip x̂ = decode(μ(x)) (``reconstruct``):
    what survives the latent compression of pictures drawn perfectly. Wrapped around
    ``real_scenes_generator()`` it measures how much readability the 4×8×8 latents cost small
    digits and numbers compared with big digits, before any diffusion model is involved."""

    def round_trip(prompts: list[str]) -> np.ndarray:
        x = as_model_images(np.asarray(generate(prompts)))  # (N, 1, 32, 32) in [−1, 1]
        return from_model_range(vae.reconstruct(x), crop=False)  # (N, 32, 32) uint8

    return round_trip


def scene_floor(n_per_kind: int = 500, *, seed: int = 0, legible: bool = False, classifier=None) -> dict[str, float]:
    """``evaluate_scenes`` on real scenes of held-out digits: what a generator that draws like the
    held-out data scores. ``legible=True`` draws only the held-out digits the classifier reads
    right alone (``legible_digits``): the cost of the scene reading itself."""
    if classifier is None:
        from .train.classifier import load_classifier

        classifier = load_classifier()
    allowed = legible_digits(classifier) if legible else None
    return evaluate_scenes(real_scenes_generator(seed=seed, allowed=allowed), evaluation_prompts(n_per_kind, seed=seed),
                           classifier=classifier)
