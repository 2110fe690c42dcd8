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
"""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tinydiff.text.captions import caption_vocabulary

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
DEFAULT_MAX_LENGTH = 16  # tokens per row, <bos> and <eos> included: 14 words (captions use ≤ 9)
FORMAT_NAME = "tinydiff.tokenizer"
FORMAT_VERSION = 1

_TOKEN = re.compile(r"[^\W\d_]+|\d+")  # a run of letters, or a run of digits
_DIGIT = re.compile(r"\d")  # a decimal digit of any script


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
