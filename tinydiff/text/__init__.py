"""Text: the caption grammar for MNIST digits and the tokenizer that turns prompts into ids."""

from tinydiff.text.captions import (
    caption,
    caption_vocabulary,
    compute_attributes,
    probe_prompts,
    sample_captions,
    zero_shot_prompts,
)
from tinydiff.text.tokenizer import EncodedBatch, Tokenizer

__all__ = [
    "EncodedBatch",
    "Tokenizer",
    "caption",
    "caption_vocabulary",
    "compute_attributes",
    "probe_prompts",
    "sample_captions",
    "zero_shot_prompts",
]
