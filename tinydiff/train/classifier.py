"""The evaluation classifier: training on the bundled digits, saving, and loading the shipped weights.

One step, written in ``compute_grads``:

1. take the next B training digits (each epoch is a fresh shuffle of the training split);
2. shift each digit by a random (dy, dx) ∈ {−2, …, 2}² pixels, drawn from the loop's generator
   (``random_shift``): the 32×32 frame has a 2-pixel background border, so a shift of up to 2
   loses no ink of a centred digit. Generated digits are not perfectly centred; a classifier
   trained only on centred digits would call an off-centre 7 "not a 7" too easily;
3. ``loss, dlogits = cross_entropy(model(x), labels)`` and ``model.backward(dlogits)``.

The shared ``train_loop`` does the rest (AdamW, clipping, checkpoints, resume, NaN guard). The
1,000 held-out digits of ``train_test_split`` are never seen in training; the classifier's
accuracy on them is what ``tinydiff/pretrained/README.md`` reports.

The shipped weights (``tinydiff/pretrained/classifier.npz``) are written by ``save_classifier``:
the weights only, float32, with the config and the training summary in the header (kind
``"mnist-classifier"``). ``load_classifier()`` reads them from the installed package.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from ..backend import backend_of, to_device
from ..data.mnist import PAD, load_mnist, step_batches, to_model_range, train_test_split
from ..io import load_checkpoint, save_checkpoint
from ..models.classifier import ClassifierConfig, DigitClassifier
from ..nn import cross_entropy, to_state_arrays
from .loop import LoopConfig, train_loop

CHECKPOINT_KIND = "mnist-classifier"  # the shipped weights
TRAIN_STATE_KIND = "mnist-classifier-train"  # train_loop's resumable checkpoints


def pretrained_path():
    """The shipped weights, inside the installed package or the source checkout."""
    return resources.files("tinydiff") / "pretrained" / "classifier.npz"


def load_digits(*, seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (held-out images, labels)) from the bundled digits.

    Images are float32 (N, 1, 32, 32) in [−1, 1]; labels int64 (N,). The split is
    ``train_test_split(10000, seed)``: 9,000 training digits, 1,000 held out.
    """
    images, labels = load_mnist()
    train_idx, test_idx = train_test_split(len(images), seed=seed)
    x = to_model_range(images)
    return (x[train_idx], labels[train_idx]), (x[test_idx], labels[test_idx])


def random_shift(x: np.ndarray, generator: np.random.Generator, max_shift: int = PAD) -> np.ndarray:
    """Translate each image (N, C, H, W) by its own (dy, dx), uniform in {−max_shift, …, max_shift}².

    The frame is padded with background (−1) by ``max_shift`` on every side and each image is cut
    out at its own offset: out[n, c, y, x] = x_pad[n, c, y + max_shift − dy_n, x + max_shift − dx_n].
    """
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    m = max_shift
    padded = np.pad(x, ((0, 0), (0, 0), (m, m), (m, m)), constant_values=-1.0)  # (N, C, H + 2m, W + 2m)
    dy, dx = generator.integers(-m, m + 1, size=(2, n))  # (N,) each
    rows = (m - dy)[:, None] + np.arange(h)  # (N, H) source rows
    cols = (m - dx)[:, None] + np.arange(w)  # (N, W) source columns
    batch = np.arange(n)[:, None, None]  # (N, 1, 1)
    shifted = padded.transpose(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return np.ascontiguousarray(shifted.transpose(0, 3, 1, 2))  # (N, C, H, W)


def default_loop(total_steps: int = 2000) -> LoopConfig:
    """The settings the shipped weights were trained with: 2,000 steps of 128 ≈ 28 epochs of
    the 9,000 training digits, cosine decay to 0, no EMA (the decayed final weights are used)."""
    return LoopConfig(total_steps=total_steps, lr=3e-3, warmup_steps=100, weight_decay=1e-4,
                      grad_clip=1.0, ema_decay=None, checkpoint_every=500)


def train_classifier(
    config: ClassifierConfig | None = None,
    loop: LoopConfig | None = None,
    *,
    batch_size: int = 128,
    max_shift: int = PAD,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    backend: str | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    callback: Callable[[dict], None] | None = None,
    stop_at: int | None = None,
) -> tuple[DigitClassifier, dict]:
    """Train a ``DigitClassifier``; returns (model in eval mode, train_loop's result).

    data: (images float32 (N, 1, 32, 32) in [−1, 1], labels (N,)); default: the bundled training
    split. max_shift: the augmentation's largest shift in pixels (0 turns it off). backend:
    where to train (default: the default backend). ``callback`` receives train_loop's per-step
    dict plus ``accuracy``, the fraction of the batch classified correctly.
    """
    config = config or ClassifierConfig()
    loop = loop or default_loop()
    images, labels = data if data is not None else load_digits()[0]
    model = DigitClassifier(config, seed=loop.seed)
    if backend is not None:
        model.to(backend)
    device = backend_of(model.fc.weight.data)
    batch_at = step_batches(len(labels), batch_size, loop.seed + 1)

    def compute_grads(step: int, generator: np.random.Generator) -> tuple[float, dict]:
        idx = batch_at(step)  # (B,)
        x = to_device(random_shift(images[idx], generator, max_shift), device)  # (B, 1, 32, 32)
        y = to_device(labels[idx], device)  # (B,)
        logits = model(x)  # (B, 10)
        loss, dlogits = cross_entropy(logits, y)
        model.backward(dlogits)
        return loss, {"accuracy": float((logits.argmax(axis=1) == y).mean())}

    result = train_loop(model, compute_grads, loop, checkpoint_path=checkpoint_path, resume=resume,
                        kind=TRAIN_STATE_KIND, model_config=config.to_dict(), callback=callback,
                        stop_at=stop_at)
    return model.eval(), result


def save_classifier(model: DigitClassifier, path: str | Path, *, extra: dict | None = None) -> None:
    """Write the weights (float32) and config atomically; ``extra`` (e.g. accuracy, training
    command) goes into the header."""
    arrays = {k: v.astype(np.float32) for k, v in to_state_arrays(model).items()}
    save_checkpoint(path, arrays, kind=CHECKPOINT_KIND, config=model.config.to_dict(), extra=extra)


def load_classifier(path: str | Path | None = None, *, backend: str | None = None) -> DigitClassifier:
    """The classifier saved at ``path`` (default: the shipped weights), in eval mode on ``backend``."""
    if path is None:
        with resources.as_file(pretrained_path()) as file:
            arrays, header = load_checkpoint(file, kind=CHECKPOINT_KIND)
    else:
        arrays, header = load_checkpoint(path, kind=CHECKPOINT_KIND)
    model = DigitClassifier(ClassifierConfig.from_dict(header["config"]))
    if backend is not None:
        model.to(backend)
    model.load_state_dict(arrays)
    return model.eval()


def export_pretrained(path: str | Path, *, callback: Callable[[dict], None] | None = None) -> dict:
    """Train with every default, measure the held-out accuracy, save to ``path``; returns the
    summary also stored in the header: held_out_accuracy, steps, batch_size, max_shift, seconds.

    This is how ``tinydiff/pretrained/classifier.npz`` was made (see the README beside it).
    """
    start = time.perf_counter()
    loop, batch_size, max_shift = default_loop(), 128, PAD
    model, _ = train_classifier(loop=loop, batch_size=batch_size, max_shift=max_shift, callback=callback)
    seconds = time.perf_counter() - start
    test_images, test_labels = load_digits()[1]
    summary = {
        "held_out_accuracy": float(np.mean(model.predict(test_images) == test_labels)),
        "steps": loop.total_steps,
        "batch_size": batch_size,
        "max_shift": max_shift,
        "seconds": round(seconds, 1),
    }
    save_classifier(model, path, extra=summary)
    return summary
