"""Scenes: 32×32 pictures of several digits with compositional captions ("a 3 left of a 7").

Every MNIST training image is one centred digit, so a model trained on them never has to place
two things relative to each other, draw a readable string of characters, or get a small part
right. Scenes built from the same digits ask for exactly that, with a ground truth that can be
read back (``tinydiff.evaluate_scenes``):

=========  ==========================  ==================================================
kind       captions                    what it probes
=========  ==========================  ==================================================
relation   "a 3 left of a 7",          spatial relations: one pooled text vector can hold
           "a 7 right of a 3",         "3", "7" and "left" without who is left of whom
           "a 3 above a 7",
           "a 7 below a 3"
count      "two 7s", "three 1s"        counting small objects
number     "the number 42"             text in images: adjacent small glyphs read left to
                                       right, each of which must be pixel-exact
size       "a small 5", "a big 5"      small parts (the hands analogue): a 10–12 px digit
                                       covers few latent pixels
=========  ==========================  ==================================================

Slot geometry (rows and columns of the 32×32 canvas, half-open ``[r0, r1) × [c0, c1)``)
--------------------------------------------------------------------------------------------
``SLOTS`` maps each slot's name to ``(r0, r1, c0, c1)``; an evaluator crops ``image[r0:r1,
c0:c1]``::

    relation, side by side   left   rows  8–23, cols  0–15     right  rows  8–23, cols 16–31
    relation, stacked        top    rows  0–15, cols  8–23     bottom rows 16–31, cols  8–23
    count, a 2×2 grid        cell0  rows  0–15, cols  0–15     cell1  rows  0–15, cols 16–31
                             cell2  rows 16–31, cols  0–15     cell3  rows 16–31, cols 16–31
    number                   first  rows 10–21, cols  4–15     second rows 10–21, cols 16–27
    size                     canvas rows  0–31, cols  0–31  (the digit is centred on it)

Each digit is drawn inside its slot. ``sizes`` below is the longest side of the digit's ink box
after scaling, in pixels; each scene draws one size per digit from its kind's range:

    relation 14–15 (in a 16×16 half)     count 10–12 (in a 16×16 cell; the others stay empty)
    number   12 (in a 12×12 box)          small 10–12, big 28–30 (centred on the canvas)

How a digit is drawn into a slot
--------------------------------
1. crop the 28×28 MNIST digit to its ink box (the pixels > 0);
2. scale it by s = size / max(height, width), keeping its aspect ratio, to
   round(height·s) × round(width·s) pixels with **area averaging** (``resize_area``: each output
   pixel is the mean of the input over the output pixel's footprint, the "box" or "area" filter
   of image libraries; it does not alias when shrinking);
3. paste it with its ink box centred in the slot (offset ⌊(slot − box)/2⌋ on each axis).
Slots never overlap within a scene, so pasting is a plain copy.

Captions and the tokenizer
--------------------------
Digits are written as numerals ("a 3", "an 8": the article follows ``captions._fix_articles``).
Two things follow from ``tinydiff.text.tokenizer``'s rule "a token is a run of letters or a run
of digits":

* plurals: "7s" is tokenised as "7", "s"; the vocabulary therefore holds the word "s" (a word
  "7s" could never come out of the tokenizer);
* numbers: "42" is ONE token, as a common number is one token in CLIP's byte-pair vocabulary.
  The vocabulary holds "10" … "99", and a model must learn from the pictures alone which two
  glyphs each of these tokens stands for: the text encoder never sees that "42" starts with
  the "4" it knows from "a 4". This is the text-rendering problem in miniature.

``scene_tokenizer()`` is the tokenizer over ``scene_vocabulary()`` (all captions fit the default
``max_length`` of 16: the longest has 6 words).

Where each mentioned digit goes: token slot labels
--------------------------------------------------
``token_slot_labels(captions, tokenizer)`` reads, from the caption alone, the role of every
digit token (the class index into ``TOKEN_SLOTS``) at that token's position in the tokenizer's
rows; every other position (<bos>, words, <eos>, padding) is masked out::

    "a 3 left of a 7"   3 → left,   7 → right       "two 7s"         7 → count2
    "a 7 right of a 3"  7 → right,  3 → left        "three 1s"       1 → count3
    "a 3 above a 7"     3 → top,    7 → bottom      "the number 42"  42 → number
    "a 7 below a 3"     7 → bottom, 3 → top         "a small 5"      5 → small  ("a big 5": big)

A relation's two digits get the slots ``RELATIONS`` gives the digit named first and second, so
the label of "3" depends on a word after it: a pooled caption vector can hold "3", "7" and "left"
without saying who is where, a per-token label cannot. ``train.clip`` trains a token head on
these labels beside the contrastive loss (``text_objective="slots"``).

Held-out digits
---------------
``make_scenes(n, split="train")`` draws digits only from the training split of
``mnist.train_test_split`` and ``split="test"`` only from the 1,000 held-out digits, so
scenes for evaluation never contain a digit a model was trained on. ``SceneRecord.sources``
keeps the index of every digit in the bundled data, so this can be checked.

Everything is a function of the seed: the same ``(n, split, seed)`` gives the same bytes.

Training on scenes
------------------
``load_scene_data(n)`` gives ``SceneData``: the images in the model's range and a
``captions_for(indices, generator)`` that phrases each scene afresh every time it is seen, which
is how the training stages (``train.clip.draw_captions``) ask any data set for captions.
``tinydiff train mnist-scenes`` trains CLIP, the VAE and the U-Net on them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from tinydiff.data.mnist import load_mnist, train_test_split
from tinydiff.text.captions import _fix_articles
from tinydiff.text.tokenizer import Tokenizer, split_words

CANVAS = 32  # scenes are CANVAS × CANVAS, the networks' input size

SLOTS: dict[str, tuple[int, int, int, int]] = {  # name -> (r0, r1, c0, c1), half-open
    "left": (8, 24, 0, 16),
    "right": (8, 24, 16, 32),
    "top": (0, 16, 8, 24),
    "bottom": (16, 32, 8, 24),
    "cell0": (0, 16, 0, 16),
    "cell1": (0, 16, 16, 32),
    "cell2": (16, 32, 0, 16),
    "cell3": (16, 32, 16, 32),
    "first": (10, 22, 4, 16),
    "second": (10, 22, 16, 28),
    "canvas": (0, 32, 0, 32),
}
GRID_SLOTS = ("cell0", "cell1", "cell2", "cell3")  # the count grid, row by row
NUMBER_SLOTS = ("first", "second")  # the number's digits, read left to right

# relation -> (slot of the digit named first, slot of the digit named second)
RELATIONS: dict[str, tuple[str, str]] = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNT_WORDS = {2: "two", 3: "three"}  # counts a caption can ask for
SIZE_WORDS = ("small", "big")

# Longest side of a scaled digit's ink box, in pixels: the values each kind draws from.
RELATION_SIZES = (14, 15)
COUNT_SIZES = (10, 11, 12)
NUMBER_SIZES = (12,)
SIZE_RANGES = {"small": (10, 11, 12), "big": (28, 29, 30)}

KINDS = ("relation", "count", "number", "size")
SHOWCASE_PROMPTS = ("a 3 left of a 7", "a 7 left of a 3", "a 3 above a 7", "a 7 above a 3", "two 7s",
                    "three 1s", "the number 42", "the number 17", "a small 5", "a big 5")  # a sample grid's rows
SPLITS = ("train", "test")
# The classes of ``token_slot_labels``: where a digit token's digit goes, or, for a number token,
# that its two digits fill the slots ``first`` and ``second``. countN: N copies in the 2×2 grid;
# small / big: centred on the canvas at 10–12 / 28–30 px.
TOKEN_SLOTS = ("left", "right", "top", "bottom", "count2", "count3", "number", "small", "big")

_CAPTION_PATTERNS = {  # kind -> the caption's grammar (after normalising spaces and case)
    "relation": re.compile(r"an? (\d) (left of|right of|above|below) an? (\d)"),
    "count": re.compile(r"(two|three) (\d)s"),
    "number": re.compile(r"the number ([1-9]\d)"),
    "size": re.compile(r"an? (small|big) (\d)"),
}


class SceneSpec(NamedTuple):
    """What a caption asks for, parsed back from it (``parse_caption``)."""

    kind: str  # one of KINDS
    digits: tuple[int, ...]  # relation: (first named, second named); count: (d,); number: its digits; size: (d,)
    relation: str | None = None  # relation: a key of RELATIONS
    count: int | None = None  # count: how many copies of digits[0]
    size: str | None = None  # size: "small" or "big"


@dataclass(frozen=True)
class SceneRecord:
    """The ground truth kept beside one scene image."""

    kind: str  # one of KINDS
    digits: tuple[int, ...]  # the digit drawn in each slot of ``slots``
    slots: tuple[str, ...]  # keys of SLOTS; slots not listed are empty
    sizes: tuple[int, ...]  # longest side of each digit's ink box, pixels
    sources: tuple[int, ...]  # index of each digit in the bundled data (``load_mnist()``)


class SceneData(NamedTuple):
    """Scenes ready for training: model-range images and what their captions are made from.

    Every time a scene is seen it gets a fresh phrasing (``captions_for``): a relation is said
    either way round ("a 3 left of a 7" or "a 7 right of a 3", the same picture).
    """

    images: np.ndarray  # float32 (N, 1, 32, 32) in [−1, 1]
    specs: list[SceneSpec]  # what each scene shows

    def captions_for(self, indices, generator: np.random.Generator) -> list[str]:
        """Captions for the scenes ``indices``: one draw from ``generator`` per scene."""
        converse = generator.random(len(indices)) < 0.5  # (B,)
        return [scene_caption(converse_spec(self.specs[i]) if flip else self.specs[i])
                for i, flip in zip(np.asarray(indices).tolist(), converse)]


class SceneSet(NamedTuple):
    """Scenes with their captions and ground truth, one entry each."""

    images: np.ndarray  # uint8 (N, 32, 32), 0 = background, 255 = ink
    captions: list[str]
    records: list[SceneRecord]


# --------------------------------------------------------------------------- captions


def scene_caption(spec: SceneSpec) -> str:
    """The caption of ``spec``: "a 3 left of a 7", "two 7s", "the number 42", "a small 5"."""
    if spec.kind == "relation":
        first, second = spec.digits
        text = f"a {first} {spec.relation} a {second}"
    elif spec.kind == "count":
        text = f"{COUNT_WORDS[spec.count]} {spec.digits[0]}s"
    elif spec.kind == "number":
        text = "the number " + "".join(str(d) for d in spec.digits)
    elif spec.kind == "size":
        text = f"a {spec.size} {spec.digits[0]}"
    else:
        raise ValueError(f"unknown scene kind {spec.kind!r}; kinds: {', '.join(KINDS)}")
    return " ".join(_fix_articles(text.split()))


def converse_spec(spec: SceneSpec) -> SceneSpec:
    """The same picture said the other way round: "a 7 right of a 3" for "a 3 left of a 7"
    (other kinds have one phrasing and come back unchanged)."""
    if spec.kind != "relation":
        return spec
    return spec._replace(digits=spec.digits[::-1], relation=CONVERSE[spec.relation])


def parse_caption(text: str) -> SceneSpec:
    """The ``SceneSpec`` a scene caption asks for; ValueError for text outside the grammar."""
    normal = " ".join(text.lower().split())
    for kind, pattern in _CAPTION_PATTERNS.items():
        match = pattern.fullmatch(normal)
        if match is None:
            continue
        if kind == "relation":
            return SceneSpec(kind, (int(match[1]), int(match[3])), relation=match[2])
        if kind == "count":
            count = {word: n for n, word in COUNT_WORDS.items()}[match[1]]
            return SceneSpec(kind, (int(match[2]),), count=count)
        if kind == "number":
            return SceneSpec(kind, tuple(int(c) for c in match[1]))
        return SceneSpec(kind, (int(match[2]),), size=match[1])
    raise ValueError(f"{text!r} is not a scene caption (e.g. 'a 3 left of a 7', 'two 7s', "
                     "'the number 42', 'a small 5')")


class TokenSlotLabels(NamedTuple):
    """Per-token targets for a batch of captions (``token_slot_labels``)."""

    labels: np.ndarray  # int64 (B, L): index into TOKEN_SLOTS at digit tokens, 0 elsewhere
    mask: np.ndarray  # bool (B, L): True at the digit tokens, the only positions that carry a label


def token_slot_roles(spec: SceneSpec) -> tuple[str, ...]:
    """The ``TOKEN_SLOTS`` name of each digit token of ``spec``'s caption, in reading order."""
    if spec.kind == "relation":
        return RELATIONS[spec.relation]  # (slot of the digit named first, of the digit named second)
    if spec.kind == "count":
        return (f"count{spec.count}",)
    if spec.kind == "number":
        return ("number",)  # "42" is one token
    return (spec.size,)


def token_slot_labels(captions: Sequence[str], tokenizer: Tokenizer) -> TokenSlotLabels:
    """Where each digit token of each caption goes, aligned with ``tokenizer.encode(captions)``.

    A caption's i-th word (``split_words``, the tokenizer's own split) sits at position i + 1
    of its row, after <bos>; its digit tokens (runs of digits: "3", "7", "42") are labelled
    with ``token_slot_roles`` of ``parse_caption(caption)``, in order. Returns labels (B, L)
    and mask (B, L) with L = ``tokenizer.max_length``; a caption outside the scene grammar is a
    ValueError (``parse_caption``'s).
    """
    batch, length = len(captions), tokenizer.max_length
    labels = np.zeros((batch, length), dtype=np.int64)  # (B, L)
    mask = np.zeros((batch, length), dtype=bool)  # (B, L)
    for row, caption in enumerate(captions):
        roles = token_slot_roles(parse_caption(caption))
        positions = [i + 1 for i, word in enumerate(split_words(caption)) if word.isdigit()]  # +1: <bos>
        assert len(positions) == len(roles), (caption, positions, roles)  # the grammar fixes both
        for position, role in zip(positions, roles):
            if position < length - 1:  # a truncated caption keeps <eos> at length − 1
                labels[row, position] = TOKEN_SLOTS.index(role)
                mask[row, position] = True
    return TokenSlotLabels(labels, mask)


def scene_vocabulary() -> list[str]:
    """Every word a scene caption can contain, sorted: the grammar's words, "an", "s" (plurals),
    the digits 0–9 and the numbers 10–99 (each one token, see the module docstring)."""
    words = {"a", "an", "the", "number", "s", *SIZE_WORDS, *COUNT_WORDS.values()}
    for relation in RELATIONS:
        words |= set(relation.split())
    words |= {str(n) for n in range(100)}
    return sorted(words)


def scene_tokenizer(max_length: int | None = None) -> Tokenizer:
    """A tokenizer over ``scene_vocabulary()`` (the tokenizer's default max_length if None)."""
    return Tokenizer(scene_vocabulary()) if max_length is None else Tokenizer(scene_vocabulary(), max_length)


# --------------------------------------------------------------------------- drawing


def resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-averaging resize of a 2-D image to (height, width), float64.

    Output pixel i along an axis covers the input interval [i·n/m, (i+1)·n/m) (n input pixels,
    m output pixels); its value is the mean of the input over that interval, each input pixel
    weighted by the length of its overlap. Written as out = A_h · image · A_wᵀ with
    A[i, j] = |[i·n/m, (i+1)·n/m) ∩ [j, j+1)| · m/n, whose rows sum to 1.
    """

    def weights(n: int, m: int) -> np.ndarray:
        edges = np.arange(m + 1) * (n / m)  # (m + 1,) footprint edges in input pixels
        pixel = np.arange(n)  # (n,) input pixel j spans [j, j + 1)
        overlap = np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel)  # (m, n)
        return np.clip(overlap, 0.0, None) * (m / n)

    rows, cols = image.shape
    return weights(rows, height) @ np.asarray(image, dtype=np.float64) @ weights(cols, width).T


def ink_box(image: np.ndarray, level: float = 0) -> tuple[int, int, int, int] | None:
    """(r0, r1, c0, c1), half-open, of the pixels > ``level``; None if there are none."""
    rows = np.flatnonzero((image > level).any(axis=1))
    cols = np.flatnonzero((image > level).any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def scale_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """A uint8 digit cropped to its ink box and area-resized so its longest side is ``size``."""
    r0, r1, c0, c1 = ink_box(digit)
    box = digit[r0:r1, c0:c1]
    s = size / max(box.shape)
    height, width = (max(1, round(n * s)) for n in box.shape)
    return np.rint(resize_area(box, height, width)).clip(0, 255).astype(np.uint8)


def paste(canvas: np.ndarray, glyph: np.ndarray, slot: str) -> None:
    """Copy ``glyph`` into ``canvas`` with its box centred in ``SLOTS[slot]`` (in place)."""
    r0, r1, c0, c1 = SLOTS[slot]
    height, width = glyph.shape
    if height > r1 - r0 or width > c1 - c0:
        raise ValueError(f"a {height}×{width} digit does not fit slot {slot!r} ({r1 - r0}×{c1 - c0})")
    top, left = r0 + (r1 - r0 - height) // 2, c0 + (c1 - c0 - width) // 2
    canvas[top : top + height, left : left + width] = glyph


# --------------------------------------------------------------------------- digit pools


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The bundled digits (uint8 (N, 28, 28), labels (N,)) and each split's indices into them."""
    images, labels = load_mnist()
    train_idx, test_idx = train_test_split(len(images))
    images.setflags(write=False)
    return images, labels, {"train": train_idx, "test": test_idx}


def split_indices(split: str) -> np.ndarray:
    """Indices into ``load_mnist()`` of the digits scenes of ``split`` may use (sorted)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return _digits()[2][split]


def _pools(split: str, allowed: np.ndarray | None = None) -> list[np.ndarray]:
    """For each digit 0–9, the indices of ``split``'s digits with that label (only those in
    ``allowed`` if given; each must be one of ``split``'s digits)."""
    labels = _digits()[1]
    indices = split_indices(split)
    if allowed is not None:
        allowed = np.unique(np.asarray(allowed, dtype=np.int64))
        outside = np.setdiff1d(allowed, indices)
        if outside.size:
            raise ValueError(f"{outside.size} of the allowed digits (e.g. index {outside[0]}) are not in the "
                             f"{split} split")
        indices = allowed
    pools = [indices[labels[indices] == d] for d in range(10)]
    empty = [d for d in range(10) if pools[d].size == 0]
    if empty:
        raise ValueError(f"no {split} digits of class(es) {empty} to draw scenes from")
    return pools


# --------------------------------------------------------------------------- scenes


def random_spec(generator: np.random.Generator) -> SceneSpec:
    """A random caption's spec: a kind uniformly, then its contents uniformly.

    Relations: an axis, two different digits, and one of the axis' two phrasings (the picture
    "3 left, 7 right" is "a 3 left of a 7" or "a 7 right of a 3" with equal chance).
    """
    kind = KINDS[generator.integers(len(KINDS))]
    if kind == "relation":
        relation = tuple(RELATIONS)[generator.integers(len(RELATIONS))]
        first, second = generator.choice(10, size=2, replace=False)
        return SceneSpec(kind, (int(first), int(second)), relation=relation)
    if kind == "count":
        count = tuple(COUNT_WORDS)[generator.integers(len(COUNT_WORDS))]
        return SceneSpec(kind, (int(generator.integers(10)),), count=count)
    if kind == "number":
        return SceneSpec(kind, (int(generator.integers(1, 10)), int(generator.integers(10))))
    return SceneSpec(kind, (int(generator.integers(10)),), size=SIZE_WORDS[generator.integers(2)])


def _layout(spec: SceneSpec, generator: np.random.Generator) -> tuple[tuple[int, ...], tuple[str, ...],
                                                                      tuple[int, ...]]:
    """(digit per slot, slots, the sizes each digit draws from)."""
    if spec.kind == "relation":
        return spec.digits, RELATIONS[spec.relation], RELATION_SIZES
    if spec.kind == "count":
        cells = np.sort(generator.choice(len(GRID_SLOTS), size=spec.count, replace=False))
        return spec.digits * spec.count, tuple(GRID_SLOTS[c] for c in cells), COUNT_SIZES
    if spec.kind == "number":
        return spec.digits, NUMBER_SLOTS, NUMBER_SIZES
    return spec.digits, ("canvas",), SIZE_RANGES[spec.size]


def render(spec: SceneSpec, generator: np.random.Generator, pools: list[np.ndarray]) -> tuple[np.ndarray, SceneRecord]:
    """One scene for ``spec``: uint8 image (32, 32) and its record; ``pools[d]`` lists the
    indices of the digits d may be drawn from (``_pools``).

    Random choices, in order: the grid cells (counts), then per digit its source image and its
    size.
    """
    images = _digits()[0]
    digits, slots, size_range = _layout(spec, generator)
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    sources, sizes = [], []
    for digit, slot in zip(digits, slots):
        source = int(pools[digit][generator.integers(len(pools[digit]))])
        size = int(size_range[generator.integers(len(size_range))])
        paste(canvas, scale_digit(images[source], size), slot)
        sources.append(source)
        sizes.append(size)
    return canvas, SceneRecord(spec.kind, tuple(digits), tuple(slots), tuple(sizes), tuple(sources))


def render_captions(captions: Sequence[str], *, split: str = "test", seed: int = 0,
                    allowed: np.ndarray | None = None) -> SceneSet:
    """Scenes drawn for given captions (e.g. evaluation prompts), digits from ``split`` (and
    among those, only the indices in ``allowed`` if given)."""
    pools = _pools(split, allowed)  # checks the split before any work
    specs = [parse_caption(c) for c in captions]
    return _render_all(specs, np.random.default_rng(seed), pools)


def make_scenes(n: int, *, split: str = "train", seed: int = 0) -> SceneSet:
    """``n`` random scenes (``random_spec``) with digits from ``split``; a function of the seed."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    pools = _pools(split)
    generator = np.random.default_rng(seed)
    specs = [random_spec(generator) for _ in range(n)]
    return _render_all(specs, generator, pools)


def _render_all(specs: list[SceneSpec], generator: np.random.Generator, pools: list[np.ndarray]) -> SceneSet:
    images = np.zeros((len(specs), CANVAS, CANVAS), dtype=np.uint8)  # (N, 32, 32)
    records = []
    for i, spec in enumerate(specs):
        images[i], record = render(spec, generator, pools)
        records.append(record)
    return SceneSet(images, [scene_caption(s) for s in specs], records)


def load_scene_data(n: int, *, split: str = "train", seed: int = 0) -> SceneData:
    """``make_scenes(n, split=split, seed=seed)`` as training data: images in the model's range
    x = p/127.5 − 1 (N, 1, 32, 32), and the specs their captions are phrased from."""
    scene_set = make_scenes(n, split=split, seed=seed)
    images = scene_set.images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # (N, 32, 32)
    return SceneData(images[:, None], [parse_caption(c) for c in scene_set.captions])  # (N, 1, 32, 32)
