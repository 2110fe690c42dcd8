"""Tests for tinydiff.text.captions: measured attributes and the caption grammar."""

import itertools

import numpy as np
import pytest

from tinydiff.data import load_mnist
from tinydiff.text.captions import (
    ATTRIBUTE_DTYPE,
    BOLD,
    DIGIT_WORDS,
    LARGE,
    LEFT,
    REGULAR,
    RIGHT,
    SIZE_WORDS,
    SLANT_PHRASES,
    SMALL,
    TEMPLATES,
    THIN,
    UPRIGHT,
    assign_attributes,
    caption,
    caption_vocabulary,
    fit_thresholds,
    measure_images,
    probe_prompts,
    sample_captions,
    zero_shot_prompts,
)
from tinydiff.text.tokenizer import split_words


@pytest.fixture(scope="module")
def digits():
    """Bundled digits with their measurements, thresholds and attributes (computed once)."""
    images, labels = load_mnist()
    measurements = measure_images(images)
    thresholds = fit_thresholds(measurements, labels)
    return labels, measurements, thresholds, assign_attributes(measurements, labels, thresholds)


def bar_image(shift_per_row):
    """A 3-pixel-wide, 20-row stroke whose column moves by ``shift_per_row`` per row going down."""
    image = np.zeros((1, 28, 28), np.uint8)
    for row in range(4, 24):
        column = int(round(14 + shift_per_row * (row - 14)))
        image[0, row, column - 1 : column + 2] = 255
    return image


# --------------------------------------------------------------------------- measurements


def test_slant_sign_follows_the_downward_y_axis():
    # Going down the rows, a stroke that moves left has its top to the right: it leans right.
    assert measure_images(bar_image(-0.3)).slant[0] == pytest.approx(0.3, abs=0.02)
    assert measure_images(bar_image(+0.3)).slant[0] == pytest.approx(-0.3, abs=0.02)
    assert measure_images(bar_image(0.0)).slant[0] == pytest.approx(0.0, abs=1e-12)


def test_spread_of_a_rectangle_matches_the_closed_form():
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 4:24, 9:19] = 255  # 20 rows × 10 columns, fully inked
    measured = measure_images(image)
    variance_x, variance_y = (10**2 - 1) / 12, (20**2 - 1) / 12  # discrete uniform variances
    assert measured.ink[0] == pytest.approx(200)
    assert measured.spread[0] == pytest.approx(np.sqrt(variance_x * variance_y))
    assert measured.slant[0] == pytest.approx(0.0, abs=1e-12)


def test_spread_barely_changes_under_shear():
    upright, sheared = measure_images(np.concatenate([bar_image(0.0), bar_image(0.4)])).spread
    assert sheared == pytest.approx(upright, rel=0.1)  # shear keeps the determinant; pixels round


def test_blank_image_measures_zero_without_nan():
    measured = measure_images(np.zeros((2, 28, 28), np.uint8))
    for values in measured:
        assert np.all(values == 0)


# --------------------------------------------------------------------------- attributes


def test_tercile_and_median_thresholds_give_even_shares(digits):
    labels, _, _, attributes = digits
    assert attributes.dtype == ATTRIBUTE_DTYPE
    for digit in range(10):
        of_digit = attributes[labels == digit]
        thickness = np.bincount(of_digit["thickness"], minlength=3) / len(of_digit)
        assert np.allclose(thickness, 1 / 3, atol=0.02)  # terciles within each class
        size = np.bincount(of_digit["size"], minlength=2) / len(of_digit)
        assert np.allclose(size, 1 / 2, atol=0.02)  # median split within each class
    assert np.allclose(np.bincount(attributes["slant"]) / len(labels), 1 / 3, atol=0.01)  # overall


def test_bold_digits_have_more_ink_than_thin_ones_of_their_class(digits):
    labels, measurements, _, attributes = digits
    for digit in range(10):
        ink = measurements.ink[labels == digit]
        thickness = attributes["thickness"][labels == digit]
        assert ink[thickness == THIN].max() < ink[thickness == REGULAR].min()
        assert ink[thickness == REGULAR].max() < ink[thickness == BOLD].min()
    # ... which is not just "8s have more ink than 1s": a bold 1 has less ink than a thin 8
    assert measurements.ink[(labels == 1) & (attributes["thickness"] == BOLD)].mean() < (
        measurements.ink[(labels == 8) & (attributes["thickness"] == THIN)].mean()
    )


def test_left_and_right_slants_have_opposite_shear_signs(digits):
    _, measurements, thresholds, attributes = digits
    assert abs(thresholds.slant[0]) < 0.05  # lower tercile ≈ vertical: "left" really is leftward
    assert np.all(measurements.slant[attributes["slant"] == LEFT] < thresholds.slant[0])
    assert np.median(measurements.slant[attributes["slant"] == LEFT]) < 0
    assert np.all(measurements.slant[attributes["slant"] == RIGHT] > 0)


def test_large_digits_spread_more_than_small_ones(digits):
    labels, measurements, _, attributes = digits
    for digit in range(10):
        of_digit = labels == digit
        small = measurements.spread[of_digit & (attributes["size"] == SMALL)]
        large = measurements.spread[of_digit & (attributes["size"] == LARGE)]
        assert small.max() < large.min()


def test_thresholds_need_every_class(digits):
    labels, measurements, _, _ = digits
    without_fives = labels != 5
    subset = type(measurements)(*(m[without_fives] for m in measurements))
    with pytest.raises(ValueError, match=r"\[5\]"):
        fit_thresholds(subset, labels[without_fives])


# --------------------------------------------------------------------------- grammar


def test_caption_examples():
    assert caption(7, thickness=BOLD, slant=RIGHT) == "a bold handwritten 7 leaning right"
    assert caption(7, thickness=THIN, numeral=False, template=2) == "the digit seven, thin"
    assert caption(7, size=SMALL, template=1) == "a small 7"
    assert caption(7, numeral=False) == "a handwritten seven"
    everything = caption(7, thickness=REGULAR, size=LARGE, slant=LEFT, template=2)
    assert everything == "the digit 7, large, leaning left"  # regular thickness has no word
    assert caption(7, thickness=BOLD, template=4) == "7"  # the bare template has no attribute slots


def test_articles_follow_the_sound():
    assert caption(8, template=1) == "an 8"
    assert caption(8, template=1, numeral=False) == "an eight"
    assert caption(1, template=1, numeral=False) == "a one"
    assert caption(8, template=3, slant=UPRIGHT) == "a picture of an 8 standing upright"


def test_zero_shot_prompts_are_exact_and_producible():
    assert zero_shot_prompts() == [f"a handwritten {word}" for word in DIGIT_WORDS]
    generator = np.random.default_rng(0)
    labels = np.full(3000, 7)
    attributes = np.zeros(3000, ATTRIBUTE_DTYPE)
    assert "a handwritten seven" in sample_captions(labels, attributes, generator)


def all_captions():
    """Every caption the grammar can produce (5 templates × 10 digits × 2 forms × 48 attribute sets)."""
    for template, digit, numeral, thickness, slant, size in itertools.product(
        range(len(TEMPLATES)), range(10), (True, False), [None, 0, 1, 2], [None, 0, 1, 2], [None, 0, 1]
    ):
        yield caption(digit, thickness=thickness, slant=slant, size=size, numeral=numeral, template=template)


def test_vocabulary_is_exactly_the_words_captions_use():
    used = {word for text in all_captions() for word in split_words(text)}
    assert used == set(caption_vocabulary())
    assert caption_vocabulary() == sorted(caption_vocabulary())


def test_sampled_captions_cover_the_grammar_and_match_the_image(digits):
    labels, _, _, attributes = digits
    labels, attributes = labels[::3], attributes[::3]  # every class (the file is sorted by label)
    captions = sample_captions(labels, attributes, np.random.default_rng(1))
    vocabulary = set(caption_vocabulary())
    words_seen = set()
    for text, label, row in zip(captions, labels, attributes):
        words = split_words(text)
        words_seen.update(words)
        assert set(words) <= vocabulary
        assert str(label) in words or DIGIT_WORDS[label] in words
        # a caption only ever states the image's own attributes
        assert ("thin" in words) <= (row["thickness"] == THIN)
        assert ("bold" in words) <= (row["thickness"] == BOLD)
        assert SIZE_WORDS[1 - row["size"]] not in words
        for code, phrase in enumerate(SLANT_PHRASES):
            assert (phrase in text) <= (row["slant"] == code)
    assert words_seen == vocabulary  # every word, so every phrasing and attribute, appears
    for start in ("a handwritten ", "the digit ", "a picture of "):
        assert any(text.startswith(start) for text in captions)
    assert any(text.isdigit() for text in captions) and any(text in DIGIT_WORDS for text in captions)


def test_sampling_is_a_function_of_the_generator(digits):
    labels, _, _, attributes = digits
    first = sample_captions(labels[:200], attributes[:200], np.random.default_rng(5))
    again = sample_captions(labels[:200], attributes[:200], np.random.default_rng(5))
    other = sample_captions(labels[:200], attributes[:200], np.random.default_rng(6))
    assert first == again and first != other


def test_keep_probability_controls_omission(digits):
    labels, _, _, attributes = digits
    labels, attributes = labels[::30], attributes[::30]
    attribute_words = {"thin", "bold", "small", "large", "leaning", "standing"}
    none_kept = sample_captions(labels, attributes, np.random.default_rng(2), keep_probability=0.0)
    assert not any(attribute_words & set(split_words(text)) for text in none_kept)
    all_kept = sample_captions(labels, attributes, np.random.default_rng(2), keep_probability=1.0)
    for words in map(set, map(split_words, all_kept)):
        if len(words) > 1:  # every template but the bare digit mentions slant and size
            assert words & {"small", "large"} and words & {"leaning", "standing"}


def test_probe_prompts_pair_prompts_with_codes():
    probes = probe_prompts(7)
    assert ("thickness", BOLD, "a bold handwritten 7") in probes
    assert ("thickness", THIN, "a thin handwritten 7") in probes
    assert ("slant", LEFT, "a handwritten 7 leaning left") in probes
    assert ("size", LARGE, "a large handwritten 7") in probes
    assert {p.attribute for p in probes} == {"thickness", "slant", "size"}
    assert len(probes) == 7  # thin, bold; left, upright, right; small, large
