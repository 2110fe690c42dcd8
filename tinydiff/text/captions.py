"""Captions for MNIST digits: attributes measured from the pixels, and a small caption grammar.

MNIST comes with labels, not captions. To train a text-conditioned model we write captions
ourselves, from three attributes measured on every image once (vectorised over all of them):

thickness (thin / regular / bold)
    Ink mass m = Σ w over the pixels, with ink weight w = p / 255 for pixel value p: the number
    of "fully inked pixels". Thresholds are the terciles of m *within the image's class*,
    because a 1 always has less ink than an 8. Ink mass is mostly stroke width (on the bundled
    digits its rank correlation with a width estimate 2·area/perimeter is 0.87 within class),
    but bigger digits also have more ink (0.54 with size below).
slant (left / upright / right)
    With the ink's central moments μ_ij = Σ w·(x − x̄)^i·(y − ȳ)^j / m (x̄, ȳ its centre of
    mass), the shear μ11/μ02 is the slope dx/dy of the least-squares line x(y) through the ink.
    Image rows grow *downwards*, so a digit whose top leans to the right has x decreasing as y
    increases: μ11 < 0. We store slant = −μ11/μ02, positive for leaning right (0.25 ≈ 14° off
    vertical). Thresholds are the terciles over *all* images, not per class, so that "leaning
    left" means the same geometry for every digit: on the bundled digits they are ≈ 0.006 and
    ≈ 0.246, so "leaning left" is a leftward (negative) shear, "upright" up to about 14° to the
    right of vertical (MNIST handwriting leans right on average), "leaning right" beyond.
size (small / large)
    MNIST scaled every digit so that its bounding box fits 20×20: 90% of the bundled digits are
    exactly 20 pixels tall, so bounding-box height says nothing, and bounding-box width grows
    with slant (a leaning 1 is wider). We use the area of the ink's covariance ellipse instead,
    spread = √(μ20·μ02 − μ11²), the square root of the covariance determinant (pixels²; the
    one-standard-deviation ellipse has area π·spread). A shear x → x + s·y leaves the determinant
    unchanged, so size does not depend on slant. Threshold: the median within the class.

A blank image measures ink 0, slant 0 and spread 0 instead of dividing by zero.

Every time an image is seen during training it gets a fresh caption: one of several phrasings,
the digit as a word or a numeral, and each attribute independently kept or omitted, so short
prompts such as "a handwritten 7" and the zero-shot prompts "a handwritten seven" are in
distribution. The middle thickness tercile has no word: "regular" is what an unqualified digit
looks like.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Attribute codes, stored as int8 in the fields of ATTRIBUTE_DTYPE.
THIN, REGULAR, BOLD = 0, 1, 2
LEFT, UPRIGHT, RIGHT = 0, 1, 2
SMALL, LARGE = 0, 1
ATTRIBUTE_VALUES = {  # attribute -> the name of each code, for display and metrics
    "thickness": ("thin", "regular", "bold"),
    "slant": ("left", "upright", "right"),
    "size": ("small", "large"),
}
ATTRIBUTE_DTYPE = np.dtype([("thickness", np.int8), ("slant", np.int8), ("size", np.int8)])

# What each code says in a caption (None: never mentioned).
THICKNESS_WORDS = ("thin", None, "bold")
SLANT_PHRASES = ("leaning left", "standing upright", "leaning right")
SIZE_WORDS = ("small", "large")

# Phrasings. {adjectives}: size and thickness words ("small bold"); {slant}: a slant phrase;
# {details}: every kept attribute after a comma (", small, bold, leaning left"). Empty slots
# vanish; "a" becomes "an" before a vowel sound.
TEMPLATES = (
    "a {adjectives} handwritten {digit} {slant}",  # "a bold handwritten 7 leaning right"
    "a {adjectives} {digit} {slant}",  # "a small 7"
    "the digit {digit}{details}",  # "the digit seven, thin"
    "a picture of a {adjectives} {digit} {slant}",  # "a picture of an 8 standing upright"
    "{digit}",  # "7": no attributes at all
)
KEEP_PROBABILITY = 0.5  # chance that each attribute is mentioned (if its template has a slot)
NUMERAL_PROBABILITY = 0.5  # chance that the digit is written "7" rather than "seven"


# --------------------------------------------------------------------------- measuring


class Measurements(NamedTuple):
    """Raw per-image measurements, each float64 (N,); see the module docstring."""

    ink: np.ndarray  # m = Σ w, in fully inked pixels
    slant: np.ndarray  # −μ11/μ02, positive = top leans right
    spread: np.ndarray  # √(μ20·μ02 − μ11²), area of the ink's covariance ellipse / π


@dataclass(frozen=True)
class AttributeThresholds:
    """Decision boundaries fitted on training images, reused to classify generated ones."""

    ink: np.ndarray  # (10, 2): per class, the 1/3 and 2/3 quantiles of ink mass
    slant: np.ndarray  # (2,): over all images, the 1/3 and 2/3 quantiles of slant
    spread: np.ndarray  # (10,): per class, the median spread


def measure_images(images: np.ndarray) -> Measurements:
    """Measure ink, slant and spread of ``images`` (N, H, W), 0 = background, 255 = full ink.

    All moments come from one matrix product with the monomials 1, x, y, x², y², xy evaluated
    at every pixel; central moments then follow from E[x²] − E[x]² and E[xy] − E[x]·E[y].
    """
    n, height, width = images.shape
    weights = np.asarray(images, dtype=np.float64).reshape(n, height * width) / 255.0  # (N, H·W)
    ys, xs = np.mgrid[0:height, 0:width].reshape(2, height * width).astype(np.float64)  # y points down
    monomials = np.stack([np.ones_like(xs), xs, ys, xs * xs, ys * ys, xs * ys], axis=1)  # (H·W, 6)
    raw = weights @ monomials  # (N, 6): Σw, Σw·x, Σw·y, Σw·x², Σw·y², Σw·xy

    mass = raw[:, 0]  # (N,)
    means = raw[:, 1:] / np.maximum(mass, 1e-12)[:, None]  # (N, 5): E[x], E[y], E[x²], E[y²], E[xy]
    x_mean, y_mean = means[:, 0], means[:, 1]
    mu20 = means[:, 2] - x_mean**2  # (N,) central moments, normalised by the mass
    mu02 = means[:, 3] - y_mean**2
    mu11 = means[:, 4] - x_mean * y_mean

    slant = -mu11 / np.maximum(mu02, 1e-12)  # a blank image has mu11 = mu02 = 0: slant 0
    spread = np.sqrt(np.maximum(mu20 * mu02 - mu11**2, 0.0))  # rounding can go a hair below 0
    return Measurements(ink=mass, slant=slant, spread=spread)


def fit_thresholds(measurements: Measurements, labels: np.ndarray) -> AttributeThresholds:
    """Terciles of ink per class, terciles of slant overall, median spread per class.

    Every class 0-9 must occur in ``labels`` (fit on the training set).
    """
    labels = np.asarray(labels)
    missing = sorted(set(range(10)) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(f"cannot fit per-class thresholds: no images of digit(s) {missing}")
    ink = np.stack([np.quantile(measurements.ink[labels == d], [1 / 3, 2 / 3]) for d in range(10)])
    slant = np.quantile(measurements.slant, [1 / 3, 2 / 3])
    spread = np.array([np.median(measurements.spread[labels == d]) for d in range(10)])
    return AttributeThresholds(ink=ink, slant=slant, spread=spread)


def assign_attributes(
    measurements: Measurements, labels: np.ndarray, thresholds: AttributeThresholds
) -> np.ndarray:
    """Attribute codes, a structured array (N,) of ATTRIBUTE_DTYPE: fields thickness, slant, size.

    A value equal to a threshold goes to the higher category.
    """
    labels = np.asarray(labels)
    ink_cuts = thresholds.ink[labels]  # (N, 2): the thresholds of each image's class
    attributes = np.empty(len(labels), dtype=ATTRIBUTE_DTYPE)
    attributes["thickness"] = (measurements.ink[:, None] >= ink_cuts).sum(axis=1)  # 0, 1 or 2
    attributes["slant"] = (measurements.slant[:, None] >= thresholds.slant).sum(axis=1)
    attributes["size"] = measurements.spread >= thresholds.spread[labels]
    return attributes


def compute_attributes(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Measure ``images`` (N, 28, 28) and classify them with thresholds fitted on themselves."""
    measurements = measure_images(images)
    return assign_attributes(measurements, labels, fit_thresholds(measurements, labels))


# --------------------------------------------------------------------------- the grammar


def _starts_with_vowel_sound(word: str) -> bool:
    """True for 'eight', '8', 'upright'; False for 'one' (said "wun") and consonants."""
    return word[0] in "aeiou8" and not word.startswith("one")


def _fix_articles(words: list[str]) -> list[str]:
    """'a' → 'an' before a vowel sound: 'an eight', 'an 8', but 'a one'."""
    return [
        "an" if word == "a" and i + 1 < len(words) and _starts_with_vowel_sound(words[i + 1]) else word
        for i, word in enumerate(words)
    ]


def caption(
    digit: int,
    *,
    thickness: int | None = None,
    slant: int | None = None,
    size: int | None = None,
    numeral: bool = True,
    template: int = 0,
) -> str:
    """One caption: ``TEMPLATES[template]`` for ``digit``, mentioning the attributes not None.

    Attributes are codes (THIN, BOLD, LEFT, ...). The default template with no attributes and
    ``numeral=False`` gives the zero-shot prompt "a handwritten seven".
    """
    size_word = None if size is None else SIZE_WORDS[size]
    thickness_word = None if thickness is None else THICKNESS_WORDS[thickness]
    slant_phrase = None if slant is None else SLANT_PHRASES[slant]
    adjectives = [w for w in (size_word, thickness_word) if w]
    details = [w for w in (size_word, thickness_word, slant_phrase) if w]
    text = TEMPLATES[template].format(
        digit=str(digit) if numeral else DIGIT_WORDS[digit],
        adjectives=" ".join(adjectives),
        slant=slant_phrase or "",
        details="".join(", " + d for d in details),
    )
    return " ".join(_fix_articles(text.split()))  # split() also removes empty slots' spaces


def sample_captions(
    labels: np.ndarray,
    attributes: np.ndarray,
    generator: np.random.Generator,
    *,
    keep_probability: float = KEEP_PROBABILITY,
) -> list[str]:
    """A fresh random caption for each image: labels (N,), attributes (N,) of ATTRIBUTE_DTYPE.

    All random choices are drawn up front from ``generator`` (template, numeral or word, which
    attributes to keep), so the captions are a function of the generator's state.
    """
    n = len(labels)
    if len(attributes) != n:
        raise ValueError(f"{n} labels but {len(attributes)} attribute rows")
    templates = generator.integers(len(TEMPLATES), size=n)  # (N,)
    numerals = generator.random(n) < NUMERAL_PROBABILITY  # (N,)
    keep = generator.random((n, 3)) < keep_probability  # (N, 3): thickness, slant, size
    captions = []
    for i in range(n):
        row = attributes[i]
        captions.append(caption(
            int(labels[i]),
            thickness=int(row["thickness"]) if keep[i, 0] else None,
            slant=int(row["slant"]) if keep[i, 1] else None,
            size=int(row["size"]) if keep[i, 2] else None,
            numeral=bool(numerals[i]),
            template=int(templates[i]),
        ))
    return captions


def caption_vocabulary() -> list[str]:
    """Every word the grammar can emit, sorted (lower case, no punctuation)."""
    fixed_text = " ".join(re.sub(r"\{\w+\}", " ", t) for t in TEMPLATES)  # templates minus slots
    words = set(re.findall(r"[a-z]+", fixed_text))
    words |= set(DIGIT_WORDS) | {str(d) for d in range(10)} | {"an"}  # "an": see _fix_articles
    for phrase in (*THICKNESS_WORDS, *SLANT_PHRASES, *SIZE_WORDS):
        words |= set((phrase or "").split())
    return sorted(words)


# --------------------------------------------------------------------------- evaluation prompts


class Probe(NamedTuple):
    """A prompt asking for one attribute value, and the code a matching image should have."""

    attribute: str  # "thickness", "slant" or "size"
    code: int  # e.g. BOLD
    prompt: str  # e.g. "a bold handwritten 7"


def zero_shot_prompts() -> list[str]:
    """The prompts "a handwritten zero" … "a handwritten nine"; entry d is for digit d."""
    return [caption(d, numeral=False) for d in range(10)]


def probe_prompts(digit: int) -> list[Probe]:
    """Prompts asking for each nameable attribute value of ``digit`` (regular thickness has none).

    E.g. "a thin handwritten 7" vs "a bold handwritten 7": generate from both, measure the
    images with the training thresholds, and count how often the requested code comes out.
    """
    probes = [Probe("thickness", code, caption(digit, thickness=code)) for code in (THIN, BOLD)]
    probes += [Probe("slant", code, caption(digit, slant=code)) for code in (LEFT, UPRIGHT, RIGHT)]
    probes += [Probe("size", code, caption(digit, size=code)) for code in (SMALL, LARGE)]
    return probes
