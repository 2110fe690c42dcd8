"""Tests for tinydiff.text.tokenizer: normalisation, splitting, framing, truncation, JSON."""

import json
import warnings

import numpy as np
import pytest

from tinydiff.text.captions import (
    ATTRIBUTE_DTYPE,
    caption_vocabulary,
    probe_prompts,
    sample_captions,
    zero_shot_prompts,
)
from tinydiff.text.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    SYNONYMS,
    UNK_ID,
    Tokenizer,
    split_words,
)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_captions()


def word_ids(tokenizer, text):
    """The ids between <bos> and <eos> for one prompt."""
    batch = tokenizer.encode(text)
    return batch.ids[0, 1 : batch.eos_index[0]].tolist()


def test_special_tokens_come_first(tokenizer):
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 4 + len(caption_vocabulary())


def test_batch_layout(tokenizer):
    batch = tokenizer.encode(["a bold handwritten 7 leaning right", "7"])
    assert batch.ids.shape == batch.mask.shape == (2, 16)
    assert batch.ids.dtype == np.int64 and batch.mask.dtype == bool and batch.eos_index.dtype == np.int64
    assert batch.eos_index.tolist() == [7, 2]
    assert np.all(batch.ids[:, 0] == BOS_ID)
    assert np.all(batch.ids[np.arange(2), batch.eos_index] == EOS_ID)
    assert batch.mask.sum(axis=1).tolist() == [8, 3]  # <bos>, words, <eos>
    assert np.all(batch.ids[~batch.mask] == PAD_ID)
    assert tokenizer.decode(batch.ids) == ["a bold handwritten 7 leaning right", "7"]


def test_empty_prompt_is_bos_eos(tokenizer):
    for text in ("", "   ", "?!"):
        batch = tokenizer.encode(text)
        assert batch.ids[0, :3].tolist() == [BOS_ID, EOS_ID, PAD_ID]
        assert batch.eos_index.tolist() == [1] and batch.mask[0].sum() == 2
        assert batch.unknown_words == [[]]


def test_only_unknown_words_are_reported_not_printed(tokenizer, capsys):
    batch = tokenizer.encode("Hello, World")
    assert batch.ids[0, :4].tolist() == [BOS_ID, UNK_ID, UNK_ID, EOS_ID]
    assert batch.unknown_words == [["hello", "world"]]
    assert capsys.readouterr() == ("", "")


def test_punctuation_and_case_do_not_matter(tokenizer):
    plain = word_ids(tokenizer, "a bold handwritten 7 leaning right")
    assert word_ids(tokenizer, "A BOLD, handwritten 7... leaning right!") == plain
    assert word_ids(tokenizer, "(a) bold; handwritten '7' - leaning/right") == plain
    assert split_words("7,") == ["7"]
    assert split_words("left-leaning") == ["left", "leaning"]


def test_numerals_are_their_own_tokens(tokenizer):
    assert word_ids(tokenizer, "7") != word_ids(tokenizer, "seven")
    assert split_words("a7b") == ["a", "7", "b"]
    assert split_words("7th") == ["7", "th"]
    batch = tokenizer.encode("a handwritten 17")
    assert batch.unknown_words == [["17"]]  # a number is one word, not a silent "1 7"


def test_long_prompt_is_truncated_with_a_warning(tokenizer):
    prompt = " ".join(["seven"] * 20)
    with pytest.warns(UserWarning, match=r"seven seven.*max_length=16"):
        batch = tokenizer.encode(["a 7", prompt])
    assert batch.truncated.tolist() == [False, True]
    assert batch.eos_index[1] == 15 and batch.ids[1, -1] == EOS_ID
    assert batch.mask[1].all()


def test_prompt_that_exactly_fits_does_not_warn(tokenizer):
    prompt = " ".join(["seven"] * 14)  # 14 words + <bos> + <eos> = 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = tokenizer.encode(prompt)
    assert not batch.truncated[0] and batch.eos_index[0] == 15


def test_length_problem_names_the_limit_and_exactly_the_words_truncation_drops(tokenizer):
    fits = " ".join(str(d % 10) for d in range(14))  # 14 words: room for all
    assert tokenizer.overflow_words(fits) == [] and tokenizer.length_problem(["a 7", fits]) is None
    long = fits + ", 5 and 6!"  # 17 words after splitting
    assert tokenizer.overflow_words(long) == ["5", "and", "6"]
    with pytest.warns(UserWarning):  # encode keeps exactly the words before the overflow
        assert tokenizer.decode(tokenizer.encode(long).ids) == tokenizer.decode(tokenizer.encode(fits).ids)
    assert tokenizer.length_problem(["a 7", long, "a 7 " * 20]) == (
        "the prompt has 17 words but the model reads at most 14; it would drop '5 and 6'")
    small = Tokenizer(["a", "b"], max_length=4)  # 2 words fit
    assert small.length_problem("a b a") == "the prompt has 3 words but the model reads at most 2; it would drop 'a'"


def test_suggestions_offer_synonyms_the_vocabulary_has_then_close_spellings(tokenizer):
    assert tokenizer.suggestions("thick") == ["bold"]
    assert tokenizer.suggestions("slanted") == ["leaning right", "leaning left"]
    assert tokenizer.suggestions("vii") == ["7"]
    assert tokenizer.suggestions("handwriten") == ["handwritten"]  # a typo
    assert tokenizer.suggestions("purple") == [] and tokenizer.suggestions("17") == []
    assert Tokenizer(["a", "thin"]).suggestions("thick") == []  # never a word the vocabulary lacks
    assert Tokenizer(["leaning", "right"]).suggestions("slanted") == ["leaning right"]
    assert tokenizer.describe_unknown("fat") == "'fat' (did you mean 'bold'?)"
    assert tokenizer.describe_unknown("17") == "'17' (the model draws one digit, 0-9)"
    assert tokenizer.describe_unknown("purple") == "'purple'"


def test_synonym_table_maps_unknown_words_to_caption_words():
    vocabulary = set(caption_vocabulary())
    for word, offers in SYNONYMS.items():
        assert split_words(word) == [word], word  # a normalised single word, as lookups see it
        assert word not in vocabulary, word  # never shadows a word the model knows
        assert offers and all(set(o.split()) <= vocabulary for o in offers), (word, offers)


def test_non_ascii_input_is_normalised(tokenizer):
    seven = word_ids(tokenizer, "seven 7")
    assert word_ids(tokenizer, "SÉVEN ７") == seven  # accents stripped, full-width digit → ASCII
    assert word_ids(tokenizer, "Seven \u0667") == seven  # Arabic-Indic seven
    assert word_ids(tokenizer, "se\u0301ven 7") == seven  # combining accent, not precomposed
    assert split_words("ﬁne") == ["fine"]  # NFKC unfolds the ligature
    batch = tokenizer.encode("a handwritten 七 🙂")
    assert batch.unknown_words == [["七"]]  # letters of any script are words; emoji are punctuation
    assert batch.ids[0, :5].tolist() == [BOS_ID, *word_ids(tokenizer, "a handwritten"), UNK_ID, EOS_ID]


def test_all_grammar_prompts_encode_without_unknown_words(tokenizer):
    prompts = zero_shot_prompts() + [p.prompt for d in range(10) for p in probe_prompts(d)]
    labels = np.arange(500) % 10
    attributes = np.zeros(500, ATTRIBUTE_DTYPE)
    attributes["thickness"], attributes["slant"], attributes["size"] = labels % 3, labels % 3, labels % 2
    prompts += sample_captions(labels, attributes, np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and none is too long
        batch = tokenizer.encode(prompts)
    assert all(unknown == [] for unknown in batch.unknown_words)
    assert tokenizer.decode(batch.ids) == [" ".join(split_words(p)) for p in prompts]


def test_json_round_trip(tokenizer):
    text = tokenizer.to_json()
    assert json.loads(text)["words"] == caption_vocabulary()
    restored = Tokenizer.from_json(text)
    assert restored.words == tokenizer.words and restored.max_length == tokenizer.max_length
    prompts = ["a thin handwritten 3 leaning left", "what"]
    assert np.array_equal(restored.encode(prompts).ids, tokenizer.encode(prompts).ids)
    small = Tokenizer(["b", "a"], max_length=4)  # word order is part of the model: kept as given
    assert Tokenizer.from_json(small.to_json()).encode("a b").ids.tolist() == [[BOS_ID, 5, 4, EOS_ID]]


def test_json_from_something_else_is_refused(tokenizer):
    config = tokenizer.to_dict() | {"version": 99}
    with pytest.raises(ValueError, match="version 99"):
        Tokenizer.from_dict(config)
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.from_dict(tokenizer.to_dict() | {"special_tokens": ["<pad>"]})


def test_vocabulary_is_validated():
    with pytest.raises(ValueError, match="twice"):
        Tokenizer(["seven", "seven"])
    with pytest.raises(ValueError, match="single normalised words"):
        Tokenizer(["seven", "leaning left", "Bold"])
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(["seven"], max_length=1)
