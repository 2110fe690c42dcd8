"""Scenes (tinydiff.data.scenes) and their evaluator (tinydiff.evaluate_scenes).

The slot geometry and the relation table are written out here from the module docstring, not
imported, so that a wrong entry in the library shows up as a difference.
"""

from __future__ import annotations

import numpy as np
import pytest

from tinydiff.data import scenes
from tinydiff.data.mnist import load_mnist, train_test_split
from tinydiff import evaluate_scenes as ev

# The documented geometry: (r0, r1, c0, c1), half-open.
DOCUMENTED_SLOTS = {
    "left": (8, 24, 0, 16), "right": (8, 24, 16, 32),
    "top": (0, 16, 8, 24), "bottom": (16, 32, 8, 24),
    "cell0": (0, 16, 0, 16), "cell1": (0, 16, 16, 32), "cell2": (16, 32, 0, 16), "cell3": (16, 32, 16, 32),
    "first": (10, 22, 4, 16), "second": (10, 22, 16, 28),
    "canvas": (0, 32, 0, 32),
}
# Where the digit named first / second in a relation caption must be.
WHERE = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
         "below": ("bottom", "top")}
DOCUMENTED_SIZES = {"relation": {14, 15}, "count": {10, 11, 12}, "number": {12}, "small": {10, 11, 12},
                    "big": {28, 29, 30}}


@pytest.fixture(scope="module")
def train_scenes():
    return scenes.make_scenes(400, split="train", seed=5)


@pytest.fixture(scope="module")
def classifier():
    from tinydiff.train.classifier import load_classifier

    return load_classifier()


# --------------------------------------------------------------------------- the generator


def test_same_seed_gives_the_same_bytes():
    a, b = scenes.make_scenes(80, seed=3), scenes.make_scenes(80, seed=3)
    assert a.images.dtype == np.uint8 and a.images.shape == (80, 32, 32)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.captions == b.captions and a.records == b.records
    c = scenes.make_scenes(80, seed=4)
    assert c.images.tobytes() != a.images.tobytes() and c.captions != a.captions
    prompts = ev.evaluation_prompts(20)
    assert (scenes.render_captions(prompts, seed=1).images == scenes.render_captions(prompts, seed=1).images).all()


def test_train_and_held_out_digits_stay_apart(train_scenes):
    images, labels = load_mnist()
    train_idx, test_idx = train_test_split(len(images))  # the split every metric uses
    held_out = scenes.make_scenes(400, split="test", seed=5)
    train_sources = np.concatenate([r.sources for r in train_scenes.records])
    test_sources = np.concatenate([r.sources for r in held_out.records])
    assert np.isin(train_sources, train_idx).all(), "a training scene holds a held-out digit"
    assert np.isin(test_sources, test_idx).all(), "a held-out scene holds a training digit"
    assert not np.isin(train_sources, test_idx).any()
    # every source is a digit of the class the record says
    for scene_set in (train_scenes, held_out):
        for record in scene_set.records:
            assert labels[list(record.sources)].tolist() == list(record.digits)
    # only allowed digits are drawn, and an allowed digit outside the split is refused
    allowed = test_idx[::3]
    chosen = scenes.render_captions(ev.evaluation_prompts(40), split="test", allowed=allowed)
    assert np.isin(np.concatenate([r.sources for r in chosen.records]), allowed).all()
    with pytest.raises(ValueError, match="not in the test split"):
        scenes.render_captions(["a 3 left of a 7"], split="test", allowed=train_idx[:50])
    with pytest.raises(ValueError, match="split must be one of"):
        scenes.make_scenes(3, split="validation")


def test_ground_truth_matches_the_captions(train_scenes):
    kinds = set()
    for text, record in zip(train_scenes.captions, train_scenes.records):
        spec = scenes.parse_caption(text)
        kinds.add(spec.kind)
        assert record.kind == spec.kind, text
        assert len(record.digits) == len(record.slots) == len(record.sizes) == len(record.sources)
        if spec.kind == "relation":
            assert record.slots == WHERE[spec.relation], text
            assert record.digits == spec.digits and spec.digits[0] != spec.digits[1], text
        elif spec.kind == "count":
            assert len(record.slots) == spec.count and set(record.digits) == {spec.digits[0]}, text
            assert set(record.slots) <= {"cell0", "cell1", "cell2", "cell3"} and len(set(record.slots)) == spec.count
        elif spec.kind == "number":
            assert record.slots == ("first", "second") and record.digits == spec.digits, text
            assert int(text.split()[-1]) == 10 * spec.digits[0] + spec.digits[1]
        else:
            assert record.slots == ("canvas",) and record.digits == spec.digits, text
        sizes = DOCUMENTED_SIZES[spec.size if spec.kind == "size" else spec.kind]
        assert set(record.sizes) <= sizes, (text, record.sizes)
    assert kinds == set(scenes.KINDS)


def test_pixels_match_the_records(train_scenes):
    """Each digit's ink lies in its documented slot, its ink box is as long as its size, cells
    and slots not listed are blank, and re-drawing the record alone gives the same bytes."""
    images, _ = load_mnist()
    for image, record, text in zip(train_scenes.images, train_scenes.records, train_scenes.captions):
        covered = np.zeros(image.shape, dtype=bool)
        for slot, size, source in zip(record.slots, record.sizes, record.sources):
            r0, r1, c0, c1 = DOCUMENTED_SLOTS[slot]
            alone = np.zeros_like(image)
            scenes.paste(alone, scenes.scale_digit(images[source], size), slot)
            y0, y1, x0, x1 = scenes.ink_box(alone)
            assert r0 <= y0 and y1 <= r1 and c0 <= x0 and x1 <= c1, (text, slot)
            assert max(y1 - y0, x1 - x0) == size, (text, size)
            assert (image[y0:y1, x0:x1] == alone[y0:y1, x0:x1]).all(), (text, slot)
            covered[r0:r1, c0:c1] = True
        assert not image[~covered].any(), f"{text}: ink outside the slots of its record"
        if record.kind == "count":  # the empty cells hold nothing, the others something
            for cell in ("cell0", "cell1", "cell2", "cell3"):
                r0, r1, c0, c1 = DOCUMENTED_SLOTS[cell]
                assert image[r0:r1, c0:c1].any() == (cell in record.slots), (text, cell)


def test_slot_geometry_is_the_documented_one():
    assert scenes.SLOTS == DOCUMENTED_SLOTS
    assert scenes.RELATIONS == WHERE
    index_image = np.arange(3 * 32 * 32).reshape(3, 32, 32)
    for slot, (r0, r1, c0, c1) in DOCUMENTED_SLOTS.items():
        assert (ev.crop(index_image, slot) == index_image[:, r0:r1, c0:c1]).all(), slot


def test_captions_round_trip_and_tokenize(train_scenes):
    tokenizer = scenes.scene_tokenizer()
    for text in train_scenes.captions + ev.evaluation_prompts(100):
        spec = scenes.parse_caption(text)
        assert scenes.scene_caption(spec) == text
    encoded = tokenizer.encode(train_scenes.captions)
    assert not any(encoded.unknown_words) and not encoded.truncated.any()
    assert tokenizer.decode(tokenizer.encode(["two 7s", "the number 42"]).ids) == ["two 7 s", "the number 42"]
    assert scenes.scene_caption(scenes.SceneSpec("relation", (8, 1), relation="above")) == "an 8 above a 1"
    assert scenes.parse_caption("An 8  ABOVE a 1") == scenes.SceneSpec("relation", (8, 1), relation="above")
    for bad in ("a 3 left of", "four 7s", "the number 7", "the number 07", "a handwritten 7"):
        with pytest.raises(ValueError, match="not a scene caption"):
            scenes.parse_caption(bad)


# Where each digit token's digit goes, written out by hand: caption -> [(position in the
# tokenizer's row, slot name)], position 0 being <bos>.
TOKEN_SLOTS_BY_HAND = {
    "a 3 left of a 7": [(2, "left"), (6, "right")],
    "a 7 right of a 3": [(2, "right"), (6, "left")],
    "a 3 above a 7": [(2, "top"), (5, "bottom")],
    "a 7 below a 3": [(2, "bottom"), (5, "top")],
    "an 8 left of a 1": [(2, "left"), (6, "right")],
    "two 7s": [(2, "count2")],
    "three 1s": [(2, "count3")],
    "the number 42": [(3, "number")],
    "a small 5": [(3, "small")],
    "a big 5": [(3, "big")],
}


def test_token_slot_labels_say_where_each_digit_goes():
    tokenizer = scenes.scene_tokenizer()
    captions = list(TOKEN_SLOTS_BY_HAND)
    out = scenes.token_slot_labels(captions, tokenizer)
    encoded = tokenizer.encode(captions)
    assert out.labels.shape == out.mask.shape == encoded.ids.shape and out.mask.dtype == bool
    for row, caption in enumerate(captions):
        got = [(int(p), scenes.TOKEN_SLOTS[out.labels[row, p]]) for p in np.flatnonzero(out.mask[row])]
        assert got == TOKEN_SLOTS_BY_HAND[caption], caption
        # The labelled positions hold the digit tokens; <bos>, words, <eos> and padding carry none.
        words = tokenizer.decode(encoded.ids[row : row + 1])[0].split()
        assert [words[p - 1] for p, _ in got] == [w for w in words if w.isdigit()], caption
        assert not out.labels[row][~out.mask[row]].any()
    assert not (out.mask & ~encoded.mask).any()


def test_token_slot_labels_follow_truncation_and_refuse_other_captions():
    # max_length 4 keeps <bos> a 3 <eos>: the 3 keeps its label, the dropped 7 has none; with 3
    # the 3 would sit where <eos> goes, so it has none either.
    for max_length, expected in ((4, [(2, "left")]), (3, [])):
        out = scenes.token_slot_labels(["a 3 left of a 7"], scenes.scene_tokenizer(max_length))
        assert out.labels.shape == (1, max_length)
        got = [(int(p), scenes.TOKEN_SLOTS[out.labels[0, p]]) for p in np.flatnonzero(out.mask[0])]
        assert got == expected, max_length
    with pytest.raises(ValueError, match="not a scene caption"):
        scenes.token_slot_labels(["a bold 7"], scenes.scene_tokenizer())


def test_resize_area_is_area_averaging():
    image = np.arange(16.0).reshape(4, 4)
    halves = image.reshape(2, 2, 2, 2).mean(axis=(1, 3))  # 2×2 block means
    assert np.allclose(scenes.resize_area(image, 2, 2), halves)
    row = np.array([[3.0, 6.0, 9.0]])  # 3 → 2 pixels: footprints [0, 1.5) and [1.5, 3)
    assert np.allclose(scenes.resize_area(row, 1, 2), [[(3 + 6 / 2) / 1.5, (6 / 2 + 9) / 1.5]])
    assert np.allclose(scenes.resize_area(np.full((5, 7), 4.0), 3, 11), 4.0)  # rows of A sum to 1


# --------------------------------------------------------------------------- the evaluator


def test_normalize_digit_is_mnist_style():
    """Longest side 20, centre of mass on (14, 14) (to the pixel), whatever the digit's size and
    place in its crop; a blank crop stays blank."""
    images, _ = load_mnist()
    rows, cols = np.mgrid[0:28, 0:28]
    for source in range(0, 10000, 500):  # the bundled file is sorted by digit: two of each class
        patch = np.zeros((16, 16), dtype=np.uint8)
        scenes.paste(patch, scenes.scale_digit(images[source], 11), "cell0")
        frame = ev.normalize_digit(np.pad(patch, ((3, 0), (0, 5))))  # off-centre in a bigger crop
        y0, y1, x0, x1 = scenes.ink_box(frame, ev.INK_LEVEL)
        assert max(y1 - y0, x1 - x0) in (ev.DIGIT_BOX - 1, ev.DIGIT_BOX)  # 19: edge pixels may fade below the level
        mass = frame.astype(float).sum()
        centre = (rows * frame).sum() / mass, (cols * frame).sum() / mass
        assert abs(centre[0] - 14) <= 0.5 and abs(centre[1] - 14) <= 0.5, (source, centre)
    assert not ev.normalize_digit(np.zeros((12, 12), np.uint8)).any()


def test_empty_slots_read_empty(classifier):
    picture = scenes.render_captions(["two 4s"], seed=2)
    record = picture.records[0]
    for cell in ("cell0", "cell1", "cell2", "cell3"):
        read = ev.read_slot(classifier, picture.images, cell)[0]
        assert (read >= 0) == (cell in record.slots), cell


def test_floor_on_real_held_out_scenes(classifier):
    """Crop and read reproduce the ground truth of real scenes of held-out digits (those the
    classifier reads right alone: its own 1.4% error is not the scenes' doing)."""
    floor = ev.scene_floor(200, legible=True, classifier=classifier)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in floor.items())
    for metric in ("relation_accuracy", "count_accuracy", "count_only_accuracy", "number_accuracy",
                   "small_accuracy", "big_accuracy"):
        assert floor[metric] >= 0.95, f"{metric} below 95% on real scenes: {shown}"
    # both members of a pair right: the square of a relation accuracy of ≈ 0.98
    assert floor["swapped_pair_accuracy"] >= 0.90, f"swapped pairs below 90% on real scenes: {shown}"
    assert floor["relation_swapped"] <= 0.01, shown


def _order_blind(prompts):
    """A generator that ignores word order: for "a 7 left of a 3" it draws the smaller digit
    first ("a 3 left of a 7"), as a bag of words would; other prompts drawn right."""
    fixed = []
    for text in prompts:
        spec = scenes.parse_caption(text)
        if spec.kind == "relation":
            spec = spec._replace(digits=tuple(sorted(spec.digits)))
        fixed.append(scenes.scene_caption(spec))
    return scenes.render_captions(fixed, seed=len(prompts)).images


def _miscounting(prompts):
    """Draws "three" for "two" and "two" for "three", the rest right."""
    swap = {"two": "three", "three": "two"}
    return scenes.render_captions([" ".join(swap.get(w, w) for w in p.split()) for p in prompts]).images


def _wrong_count_digit(prompts):
    """Draws the right number of copies of the next digit: "two 8s" for "two 7s"."""
    fixed = []
    for text in prompts:
        spec = scenes.parse_caption(text)
        if spec.kind == "count":
            spec = spec._replace(digits=((spec.digits[0] + 1) % 10,))
        fixed.append(scenes.scene_caption(spec))
    return scenes.render_captions(fixed).images


def test_evaluator_catches_wrong_pictures(classifier):
    prompts = ev.evaluation_prompts(60, seed=1)
    blind = ev.evaluate_scenes(_order_blind, prompts, classifier=classifier)
    assert blind["swapped_pair_accuracy"] == 0.0
    assert 0.35 < blind["relation_accuracy"] < 0.65 and 0.35 < blind["relation_swapped"] < 0.65, blind
    assert blind["number_accuracy"] > 0.9
    miscount = ev.evaluate_scenes(_miscounting, prompts, classifier=classifier)
    assert miscount["count_only_accuracy"] == 0.0 and miscount["count_accuracy"] == 0.0
    wrong_digit = ev.evaluate_scenes(_wrong_count_digit, prompts, classifier=classifier)
    assert wrong_digit["count_only_accuracy"] == 1.0 and wrong_digit["count_accuracy"] <= 0.05, wrong_digit
    sizes = ev.evaluate_scenes(lambda p: _order_blind([t.replace("small", "big") for t in p]), prompts,
                               classifier=classifier)
    assert sizes["small_accuracy"] == 0.0 and sizes["small_digit_accuracy"] > 0.9
    blank = ev.evaluate_scenes(lambda p: np.zeros((len(p), 32, 32), np.uint8), prompts, classifier=classifier)
    assert max(v for k, v in blank.items() if k != "prompts") == 0.0
    with pytest.raises(ValueError, match="expected uint8 images"):
        ev.evaluate_scenes(lambda p: np.zeros((len(p), 28, 28), np.uint8), prompts, classifier=classifier)


def test_evaluation_prompts_come_in_swapped_pairs():
    prompts = ev.evaluation_prompts(40, seed=3)
    assert prompts == ev.evaluation_prompts(40, seed=3) and len(prompts) == 5 * 40
    relation = [scenes.parse_caption(p) for p in prompts[:40]]
    assert all(s.kind == "relation" for s in relation)
    for a, b in zip(relation[::2], relation[1::2]):
        assert b == a._replace(digits=a.digits[::-1])
    ok = np.array([True, True, True, False])
    assert ev.pair_verdicts(ok, np.arange(4), prompts[:4]).tolist() == [True, False]


# --------------------------------------------------------------------------- training on scenes


def test_training_captions_say_each_scene_either_way_round():
    data = scenes.load_scene_data(120, seed=2)
    pictures = scenes.make_scenes(120, seed=2)  # the same scenes, as uint8 with records
    assert data.images.dtype == np.float32 and data.images.shape == (120, 1, 32, 32)
    assert np.array_equal(np.rint((data.images[:, 0] + 1) * 127.5), pictures.images)  # x = p/127.5 − 1
    generator = np.random.default_rng(0)
    phrasings = {}
    for _ in range(8):  # each view of a scene draws its phrasing afresh
        for i, text in zip(range(120), data.captions_for(np.arange(120), generator)):
            phrasings.setdefault(i, set()).add(text)
    for i, record in enumerate(pictures.records):
        for text in phrasings[i]:
            spec = scenes.parse_caption(text)
            if record.kind == "relation":  # whichever way it is said, it names the picture's digits in place
                assert dict(zip(spec.digits, WHERE[spec.relation])) == dict(zip(record.digits, record.slots)), text
            else:
                assert text == pictures.captions[i]
    relation = [i for i, r in enumerate(pictures.records) if r.kind == "relation"]
    assert relation and all(len(phrasings[i]) == 2 for i in relation)  # 8 draws: both ways, bar bad luck of 2⁻⁷


def test_quick_scene_recipe_trains_a_scene_pipeline(tmp_path, classifier):
    from dataclasses import replace

    from tinydiff.train.recipes import RecipeError, quick_recipe, train_mnist_captions

    config = replace(quick_recipe(), data="scenes", threads=1)
    pipe = train_mnist_captions(tmp_path, config=config)
    assert list(pipe.tokenizer.words) == scenes.scene_vocabulary()
    assert pipe.text_encoder.config.vocab_size == scenes.scene_tokenizer().vocab_size
    prompts = ev.evaluation_prompts(2)
    generate = ev.pipeline_generator(pipe, steps=2)
    images = generate(prompts)
    assert images.dtype == np.uint8 and images.shape == (len(prompts), 32, 32)
    results = ev.evaluate_scenes(ev.pipeline_generator(pipe, steps=2), prompts, classifier=classifier)
    assert results["prompts"] == len(prompts) and 0 <= results["relation_accuracy"] <= 1
    assert (tmp_path / "samples.png").is_file()
    with pytest.raises(RecipeError, match="unknown data"):
        train_mnist_captions(tmp_path / "other", config=replace(config, data="pictures"))
    with pytest.raises(RecipeError, match="lacks words of the scenes captions"):
        train_mnist_captions(tmp_path / "other", config=replace(config, encoders="mnist-captions"))


def test_cli_train_names_the_recipes(capsys):
    from tinydiff.cli import main

    assert main(["train", "mnist-pictures", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "available: mnist-captions, mnist-scenes" in err[0]


def _stacked_only(prompts):
    """Real scenes, except that every side-by-side relation ("left of", "right of") is drawn as
    an empty canvas."""
    images = scenes.render_captions(list(prompts)).images
    for k, text in enumerate(prompts):
        spec = scenes.parse_caption(text)
        if spec.kind == "relation" and spec.relation in ("left of", "right of"):
            images[k] = 0
    return images


def test_relation_accuracy_is_split_into_side_by_side_and_stacked(classifier):
    prompts = ev.evaluation_prompts(60, seed=1)
    relations = [scenes.parse_caption(p).relation for p in prompts if scenes.parse_caption(p).kind == "relation"]
    side = np.mean([r in ("left of", "right of") for r in relations])
    assert 0.2 < side < 0.8  # both kinds are in the sample
    results = ev.evaluate_scenes(_stacked_only, prompts, classifier=classifier)
    assert results["relation_side_by_side_accuracy"] == 0.0 and results["relation_stacked_accuracy"] > 0.85, results
    assert results["relation_accuracy"] == pytest.approx(side * 0.0 + (1 - side) * results["relation_stacked_accuracy"])
