"""A word-level tokenizer: prompt text → fixed-length rows of token ids for the text encoder.

CLIP uses byte-pair encoding over 49,408 tokens; our captions use a few dozen words, so one
token per word is enough and every step stays visible:

1. normalise: Unicode NFKC (full-width "７" → "7", ligatures "ﬁ" → "fi"), accents stripped
   ("séven" → "seven"), case folded ("SEVEN" → "seven"), digits of any script made ASCII
   ("٧" → "7");
2. split: a token is a run of letters or a run of digits; everything else (spaces,
   punctuation, symbols, emoji) only separates tokens and is dropped: "7," → "7",
   "left-leaning" → "left", "leaning". A number is one token, so "17" is one (unknown) word
   rather than a silent "1", "7";
3. look up: words map to ids after the special tokens; words outside the vocabulary become
   ``<unk>`` and are reported in ``EncodedBatch.unknown_words`` (the library never prints:
   the caller decides whether to warn, refuse or carry on);
4. frame: ``<bos> words… <eos>`` then ``<pad>`` up to ``max_length``, with a mask marking the
   real tokens. The text encoder pools its output at ``eos_index``, as CLIP does. A prompt too
   long to fit is truncated, keeping ``<eos>`` last, and a ``UserWarning`` names it.

The vocabulary travels with the model as JSON (``to_json`` / ``from_json``), so a checkpoint
decodes exactly the ids it was trained on.

Helping a person who typed a prompt (the CLI uses these; the library itself never prints):

* ``overflow_words`` / ``length_problem``: what truncation would drop, as a sentence, so that a
  caller can refuse a long prompt instead of drawing only its start;
* ``suggestions``: for a word outside the vocabulary, the known words that say the same thing.
  ``SYNONYMS`` lists the common ones ("thick" → "bold", "slanted" → "leaning right" or "leaning
  left"); otherwise a close spelling ("handwriten" → "handwritten"). Synonyms are only
  *suggested*, never substituted: the model was trained on its own words, and the caller
  decides what to do with an unknown one;
* ``vocabulary_groups``: the vocabulary sorted into digits, number words, attributes and the
  rest, for listing it (``tinydiff words``).
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tinydiff.text.captions import (
    DIGIT_WORDS,
    SIZE_WORDS,
    SLANT_PHRASES,
    THICKNESS_WORDS,
    caption_vocabulary,
)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
DEFAULT_MAX_LENGTH = 16  # tokens per row, <bos> and <eos> included: 14 words (captions use ≤ 9)
FORMAT_NAME = "tinydiff.tokenizer"
FORMAT_VERSION = 1

_TOKEN = re.compile(r"[^\W\d_]+|\d+")  # a run of letters, or a run of digits
_DIGIT = re.compile(r"\d")  # a decimal digit of any script

_LEANING = ("leaning right", "leaning left")
# Words a person may type for what the captions say another way → the caption words to suggest
# instead (first the likeliest). Only suggested, never substituted (see the module docstring).
SYNONYMS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("thick", "fat", "heavy", "dark", "bolder", "boldface"), ("bold",)),
    **dict.fromkeys(("skinny", "slim", "slender", "narrow", "light", "faint", "thinner"), ("thin",)),
    **dict.fromkeys(("tiny", "little", "mini", "smaller"), ("small",)),
    **dict.fromkeys(("big", "huge", "giant", "larger", "bigger"), ("large",)),
    **dict.fromkeys(("slanted", "slanting", "slant", "slanty", "tilted", "tilting", "tilt", "sloping",
                     "inclined", "skewed", "lean", "leans", "oblique"), _LEANING),
    "italic": ("leaning right",),  # italics lean right
    **dict.fromkeys(("straight", "vertical", "erect"), ("standing upright",)),
    **dict.fromkeys(("written", "drawn", "hand", "handwriting", "handdrawn", "scribbled", "scrawled"),
                    ("handwritten",)),
    **dict.fromkeys(("number", "numeral", "figure", "character"), ("digit",)),
    **dict.fromkeys(("image", "photo", "drawing", "pic", "photograph", "sketch"), ("picture",)),
    **{roman: (str(value),) for value, roman in enumerate(("", "i", "ii", "iii", "iv", "v", "vi", "vii",
                                                          "viii", "ix")) if len(roman) > 1},
}
CLOSE_SPELLING = 0.75  # difflib similarity from which a known word counts as a likely typo


def normalize(text: str) -> str:
    """NFKC, strip accents, case-fold, and write every decimal digit as ASCII."""
    text = unicodedata.normalize("NFKC", text)
    decomposed = unicodedata.normalize("NFD", text)  # "é" → "e" + combining acute accent
    text = "".join(c for c in decomposed if not unicodedata.combining(c))
    text = unicodedata.normalize("NFC", text.casefold())  # recompose what is left (e.g. Hangul)
    return _DIGIT.sub(lambda m: str(unicodedata.decimal(m.group())), text)


def split_words(text: str) -> list[str]:
    """The words of ``text`` after normalisation: "A bold 7, leaning RIGHT!" → a bold 7 leaning right."""
    return _TOKEN.findall(normalize(text))


@dataclass(frozen=True)
class EncodedBatch:
    """A batch of encoded prompts (NumPy arrays on the CPU; the encoder moves them)."""

    ids: np.ndarray  # int64 (B, L): <bos> word ids <eos> <pad>...
    mask: np.ndarray  # bool (B, L): True for real tokens (<bos> to <eos>), False for padding
    eos_index: np.ndarray  # int64 (B,): position of <eos> in each row, where CLIP pools
    unknown_words: list[list[str]]  # per prompt, the words that became <unk>, in order
    truncated: np.ndarray  # bool (B,): the prompt had more words than fit


class Tokenizer:
    """Word-level tokenizer over a fixed vocabulary; ids 0-3 are <pad>, <bos>, <eos>, <unk>."""

    def __init__(self, words: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH):
        words = tuple(words)
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <bos> and <eos> (at least 2), got {max_length}")
        if len(set(words)) != len(words):
            raise ValueError("the vocabulary lists some words twice")
        not_words = [w for w in words if split_words(w) != [w]]
        if not_words:
            raise ValueError(f"vocabulary entries must be single normalised words, not {not_words}")
        self.words = words
        self.max_length = max_length
        self._ids = {w: i for i, w in enumerate(SPECIAL_TOKENS + words)}

    @classmethod
    def from_captions(cls, max_length: int = DEFAULT_MAX_LENGTH) -> Tokenizer:
        """The tokenizer for tinydiff's captions: every word ``caption_vocabulary()`` can emit."""
        return cls(caption_vocabulary(), max_length)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the text encoder's embedding rows)."""
        return len(SPECIAL_TOKENS) + len(self.words)

    def encode(self, texts: str | Sequence[str]) -> EncodedBatch:
        """Encode one prompt or a list of prompts into a batch of ``max_length`` ids each."""
        if isinstance(texts, str):
            texts = [texts]
        batch, length = len(texts), self.max_length
        ids = np.full((batch, length), PAD_ID, dtype=np.int64)  # (B, L)
        eos_index = np.empty(batch, dtype=np.int64)  # (B,)
        truncated = np.zeros(batch, dtype=bool)  # (B,)
        unknown_words = []
        for row, text in enumerate(texts):
            words = split_words(text)
            unknown_words.append([w for w in words if w not in self._ids])
            if len(words) > length - 2:
                warnings.warn(
                    f"prompt {text!r} has {len(words)} words but max_length={length} leaves room for "
                    f"{length - 2} (plus <bos> and <eos>); the rest is dropped",
                    UserWarning,
                    stacklevel=2,
                )
                words, truncated[row] = words[: length - 2], True
            tokens = [BOS_ID] + [self._ids.get(w, UNK_ID) for w in words] + [EOS_ID]
            ids[row, : len(tokens)] = tokens
            eos_index[row] = len(tokens) - 1
        mask = np.arange(length) <= eos_index[:, None]  # (B, L): positions up to <eos>
        return EncodedBatch(ids, mask, eos_index, unknown_words, truncated)

    def overflow_words(self, text: str) -> list[str]:
        """The words of ``text`` that ``encode`` would drop for lack of room ([] if it fits)."""
        return split_words(text)[self.max_length - 2 :]

    def length_problem(self, texts: str | Sequence[str]) -> str | None:
        """None if every prompt fits; else one sentence about the first that does not: how many
        words it has, the most that fit, and which words truncation would drop."""
        for text in [texts] if isinstance(texts, str) else texts:
            dropped = self.overflow_words(text)
            if dropped:
                limit = self.max_length - 2
                return (f"the prompt has {limit + len(dropped)} words but the model reads at most {limit}; "
                        f"it would drop {' '.join(dropped)!r}")
        return None

    def suggestions(self, word: str) -> list[str]:
        """Known words or phrases to offer instead of ``word`` (normalised, outside the vocabulary).

        The ``SYNONYMS`` entry whose words this vocabulary has, else the closest spelling of a
        known word (difflib ratio ≥ ``CLOSE_SPELLING``), else nothing.
        """
        known = set(self.words)
        offers = [p for p in SYNONYMS.get(word, ()) if set(p.split()) <= known]
        if offers:
            return offers
        if word.isdigit():  # "17": one number token, not two digits
            return []
        return difflib.get_close_matches(word, self.words, n=1, cutoff=CLOSE_SPELLING)

    def describe_unknown(self, word: str) -> str:
        """``word`` quoted, with what to write instead when there is something to suggest:
        "'fat' (did you mean 'bold'?)", "'17' (one digit, 0-9)", "'purple'"."""
        offers = self.suggestions(word)
        if offers:
            return f"{word!r} (did you mean {' or '.join(repr(o) for o in offers)}?)"
        if word.isdigit() and len(word) > 1 and set("0123456789") <= set(self.words):
            return f"{word!r} (the model draws one digit, 0-9)"
        return repr(word)

    def decode(self, ids: np.ndarray) -> list[str]:
        """Ids (B, L) back to text: words between <bos> and <eos>, "<unk>" for unknown ones."""
        names = SPECIAL_TOKENS + self.words
        texts = []
        for row in np.asarray(ids):
            row = row.tolist()
            end = row.index(EOS_ID) if EOS_ID in row else len(row)
            texts.append(" ".join(names[i] for i in row[:end] if i not in (PAD_ID, BOS_ID)))
        return texts

    def to_dict(self) -> dict:
        """Everything needed to rebuild this tokenizer, as plain JSON-able values."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "special_tokens": list(SPECIAL_TOKENS),
            "max_length": self.max_length,
            "words": list(self.words),
        }

    @classmethod
    def from_dict(cls, config: dict) -> Tokenizer:
        """Rebuild a tokenizer saved with ``to_dict``; refuses other formats and versions."""
        if config.get("format") != FORMAT_NAME or config.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"not a {FORMAT_NAME} version {FORMAT_VERSION} vocabulary: format "
                f"{config.get('format')!r}, version {config.get('version')!r}"
            )
        if tuple(config["special_tokens"]) != SPECIAL_TOKENS:
            raise ValueError(f"special tokens {config['special_tokens']} differ from {list(SPECIAL_TOKENS)}")
        return cls(config["words"], config["max_length"])

    def to_json(self) -> str:
        """The vocabulary and settings as a JSON string (saved beside the model's weights)."""
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Rebuild a tokenizer from ``to_json`` output."""
        return cls.from_dict(json.loads(text))


def vocabulary_groups(words: Sequence[str]) -> dict[str, list[str]]:
    """The words of a vocabulary sorted for reading: digits, number words, attribute words (the
    caption grammar's thickness, size and slant words) and the other words, each in vocabulary
    order (number words from zero to nine, attributes as the grammar lists them: thin, bold,
    small, large, leaning, left, ...). Groups with no words are left out."""
    attribute_order = list(dict.fromkeys(
        w for phrase in (*THICKNESS_WORDS, *SIZE_WORDS, *SLANT_PHRASES) for w in (phrase or "").split()))
    groups: dict[str, list[str]] = {"digits": [], "number words": [], "attributes": [], "other words": []}
    for word in words:
        if word.isdigit():
            groups["digits"].append(word)
        elif word in DIGIT_WORDS:
            groups["number words"].append(word)
        elif word in attribute_order:
            groups["attributes"].append(word)
        else:
            groups["other words"].append(word)
    groups["number words"].sort(key=DIGIT_WORDS.index)
    groups["attributes"].sort(key=attribute_order.index)
    return {name: group for name, group in groups.items() if group}
