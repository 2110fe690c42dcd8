"""Stage 1: contrastive training of the mini-CLIP on captioned MNIST digits (Radford et al. 2021).

One step, written in ``compute_grads``:

1. take the next B training digits (each epoch is a fresh shuffle of the training split);
2. draw a fresh caption for each from the caption grammar: every time a digit is seen it gets a
   new phrasing and a new random subset of its measured attributes ("a bold 7", "seven",
   "the digit 7, thin, leaning left"), so the text encoder learns words, not sentences;
3. tokenize, then ``loss = clip(images, ids, mask)`` (symmetric InfoNCE with the learnable
   scale, ``tinydiff.nn.info_nce_loss``) and ``clip.backward()``.

The shared ``train_loop`` does the rest: AdamW, gradient clipping, EMA, atomic checkpoints,
exact resume, NaN guard. The held-out test split (``train_test_split``) is never seen here.

Choices worth knowing
---------------------
* **No weight decay** (``weight_decay=0``). CLIP decays weights but not gains, biases or the
  log scale; our loop applies one λ to every parameter, and decaying log s would pull the
  temperature towards 1 (s = e⁰), fighting the loss. With fresh captions every epoch and a
  small model, overfitting is mild without it.
* **False negatives.** InfoNCE treats every other caption in the batch as wrong. A batch of 128
  digits holds about 13 of each class, so two 7s captioned "7" and "a handwritten seven" are
  pushed apart although both captions fit both images. This makes the loss noisy and bounds it
  away from 0 (it cannot reach 0 while identical captions sit in one batch); it does not stop
  the encoders from learning digits and attributes, which is what the metrics measure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ..backend import backend_of, to_device
from ..data.mnist import load_mnist, step_batches, to_model_range, train_test_split
from ..io import load_checkpoint
from ..models.clip import CLIP, CLIPConfig
from ..text.captions import assign_attributes, fit_thresholds, measure_images, sample_captions
from ..text.tokenizer import Tokenizer
from .loop import LoopConfig, checkpoint_weights, train_loop

CHECKPOINT_KIND = "clip-train"


class CaptionedDigits(NamedTuple):
    """Digits ready for the model, with what their captions are made from."""

    images: np.ndarray  # float32 (N, 1, 32, 32) in [−1, 1]
    labels: np.ndarray  # int64 (N,)
    attributes: np.ndarray  # (N,) of captions.ATTRIBUTE_DTYPE: thickness, slant, size codes


def load_captioned_mnist(path=None, *, seed: int = 0) -> tuple[CaptionedDigits, CaptionedDigits]:
    """(train, test) digits. Attribute thresholds are fitted on the training split only and
    applied to both, so "bold" means the same ink mass for a held-out digit as for a trained one."""
    images, labels = load_mnist(path)
    train_idx, test_idx = train_test_split(len(images), seed=seed)
    thresholds = fit_thresholds(measure_images(images[train_idx]), labels[train_idx])
    attributes = assign_attributes(measure_images(images), labels, thresholds)
    model_images = to_model_range(images)
    return tuple(
        CaptionedDigits(model_images[idx], labels[idx], attributes[idx]) for idx in (train_idx, test_idx)
    )


def draw_captions(data, indices, generator: np.random.Generator) -> list[str]:
    """Fresh captions for the images ``indices`` of ``data``: the data's own ``captions_for``
    when it phrases its captions itself (scenes, ``tinydiff.data.scenes.SceneData``), else
    ``sample_captions`` of its labels and attributes (``CaptionedDigits``)."""
    if hasattr(data, "captions_for"):
        return data.captions_for(indices, generator)
    return sample_captions(data.labels[indices], data.attributes[indices], generator)


def default_loop(total_steps: int = 1200) -> LoopConfig:
    """The loop settings used for the bundled digits (see the module docstring for λ = 0).

    EMA decay 0.995 averages over the last ~200 steps; 0.999 would still hold 0.999¹²⁰⁰ ≈ 30% of
    the random initial weights after a 1,200-step run.
    """
    return LoopConfig(total_steps=total_steps, lr=2e-3, warmup_steps=100, weight_decay=0.0,
                      grad_clip=1.0, ema_decay=0.995, checkpoint_every=200)


def train_clip(
    config: CLIPConfig | None = None,
    loop: LoopConfig | None = None,
    *,
    batch_size: int = 128,
    data: CaptionedDigits | None = None,
    tokenizer: Tokenizer | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[dict], None] | None = None,
    stop_at: int | None = None,
) -> tuple[CLIP, Tokenizer, dict]:
    """Train a CLIP on ``data`` (default: the bundled training split); returns
    (model, tokenizer, train_loop's result). The model holds the last weights; the EMA weights
    are in ``result["ema"]`` and in the checkpoint (``load_clip`` uses them by default).

    ``callback`` receives train_loop's per-step dict plus ``scale`` (s = e^{log s}). A resumed run
    must use the same ``batch_size`` and data to continue exactly. ``tokenizer`` defaults to the
    caption tokenizer; other data (scenes) bring their own, and ``config.text`` must match it.
    """
    tokenizer = tokenizer or Tokenizer.from_captions()
    config = config or CLIPConfig()
    if (config.text.vocab_size, config.text.max_length) != (tokenizer.vocab_size, tokenizer.max_length):
        raise ValueError(
            f"text config (vocab_size={config.text.vocab_size}, max_length={config.text.max_length}) does not "
            f"match the caption tokenizer ({tokenizer.vocab_size}, {tokenizer.max_length})"
        )
    loop = loop or default_loop()
    data = data if data is not None else load_captioned_mnist()[0]
    model = CLIP(config, seed=loop.seed)  # the initial weights, too, are fixed by the seed
    batch_at = step_batches(len(data.images), batch_size, loop.seed + 1)

    def compute_grads(step: int, generator: np.random.Generator) -> tuple[float, dict]:
        idx = batch_at(step)  # (B,)
        captions = draw_captions(data, idx, generator)
        tokens = tokenizer.encode(captions)
        images = to_device(data.images[idx], backend_of(model.log_scale.data))  # (B, 1, 32, 32)
        loss = model(images, tokens.ids, tokens.mask)
        model.backward()
        return loss, {"scale": model.scale}

    result = train_loop(
        model, compute_grads, loop, checkpoint_path=checkpoint_path, resume=resume, kind=CHECKPOINT_KIND,
        model_config={"clip": config.to_dict(), "tokenizer": tokenizer.to_dict()},
        callback=callback, stop_at=stop_at,
    )
    return model, tokenizer, result


def load_clip(path: str | Path, *, weights: str = "ema") -> tuple[CLIP, Tokenizer]:
    """Rebuild the model and its tokenizer from a ``train_clip`` checkpoint.

    weights: "ema" (the exponential moving average, the better model) or "last".
    """
    arrays, header = load_checkpoint(path, kind=CHECKPOINT_KIND)
    model = CLIP(CLIPConfig.from_dict(header["config"]["clip"]))
    model.load_state_dict(checkpoint_weights(arrays, weights, path=path))
    return model.eval(), Tokenizer.from_dict(header["config"]["tokenizer"])
