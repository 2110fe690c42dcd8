"""MNIST digits: loading, the fixed train/test split, conversion to the model's range, batching.

Where the digits come from
--------------------------
``load_mnist()`` with no argument reads the 10,000 digits bundled with tinydiff
(``datasets/mnist-10k.npz``, see ``datasets/README.md`` for provenance and licence), so that
training works on a fresh machine without a download. The file's SHA-256 is checked on every
load (1.6 MB hashes in milliseconds): a truncated or edited copy fails loudly instead of
training on damaged data.

``load_mnist(directory)`` reads the standard IDX files of the full MNIST (or Fashion-MNIST)
instead: ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``, each optionally gzipped,
plus ``t10k-*`` if present. ``read_idx`` is the whole IDX parser; the format is a few header
bytes followed by the raw array (see its docstring).

What the model sees
-------------------
Images are stored as uint8, 0 = background, 255 = ink, 28×28. The networks work on 32×32
(three halvings down to 4×4 in the U-Net, 8×8 latents in the autoencoder), so
``to_model_range`` pads 2 background pixels on each side and maps [0, 255] to [−1, 1]:
background is −1, full ink is +1. ``from_model_range`` is the inverse, for display.

Held-out data and batches
-------------------------
``train_test_split`` fixes, from a seed, which 1,000 digits are never trained on; every metric
in tinydiff is computed on them. ``iterate_minibatches`` yields index batches forever,
reshuffling each epoch with a NumPy Generator, so a seed fixes the whole order of training.

This module uses NumPy directly: data stays on the CPU and is moved to the device per batch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tinydiff.backend import to_numpy

if TYPE_CHECKING:  # only for annotations; importlib.resources.abc is Python 3.11+
    from importlib.resources.abc import Traversable

BUNDLED_FILENAME = "mnist-10k.npz"
BUNDLED_SHA256 = "0217e13bd0668deb198aa7d305edbf0331eb89f8a6e7dd226e03d1aa3a9bd4ef"
IMAGE_SIZE = 28  # MNIST digits are 28×28
MODEL_SIZE = 32  # the networks' input size: 28 + 2 × PAD
PAD = (MODEL_SIZE - IMAGE_SIZE) // 2  # background pixels added on each side
N_TEST = 1000  # digits held out from training, for every metric

# IDX type codes (third byte of the header) and the big-endian dtypes they stand for.
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetError(ValueError):
    """A data file exists but its contents are not what tinydiff expects."""


# --------------------------------------------------------------------------- locating the data


def bundled_file() -> Traversable:
    """The bundled ``mnist-10k.npz``, whether tinydiff is installed or run from a checkout.

    Installed, the ``datasets/`` folder is the package-data subpackage ``tinydiff.datasets``.
    Run from a source checkout without installing, that subpackage does not exist and the file
    is found in ``datasets/`` next to the ``tinydiff/`` package folder.
    """
    try:
        resource = resources.files("tinydiff.datasets") / BUNDLED_FILENAME
        if resource.is_file():
            return resource
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "datasets" / BUNDLED_FILENAME


def _read_verified(file: Traversable, sha256: str) -> bytes:
    """The bytes of ``file``, after checking that their SHA-256 is ``sha256``."""
    data = file.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise DatasetError(
            f"{file} is damaged or not the expected file: its sha256 is {actual}, expected "
            f"{sha256}. Restore it (e.g. reinstall tinydiff or `git checkout datasets/`)."
        )
    return data


# --------------------------------------------------------------------------- IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array of native byte order.

    Format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code byte (0x08 for
    uint8, see ``IDX_DTYPES``), a byte giving the number of dimensions d, then d big-endian
    uint32 sizes, then the values in C order, big-endian.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated: {len(data)} bytes, shorter than its own header")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(
            f"{path}: header promises shape {shape} ({expected} bytes) but the file has {len(data)}"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists (None if neither)."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _load_idx_directory(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Train images and labels from ``directory``, with the t10k ones appended if present."""
    images, labels = [], []
    for part in ("train", "t10k"):
        image_file = _find_idx(directory, f"{part}-images-idx3-ubyte")
        label_file = _find_idx(directory, f"{part}-labels-idx1-ubyte")
        if part == "train" and (image_file is None or label_file is None):
            raise FileNotFoundError(
                f"{directory} has no MNIST IDX files: expected train-images-idx3-ubyte[.gz] and "
                "train-labels-idx1-ubyte[.gz] (t10k-* optional)"
            )
        if image_file is not None and label_file is not None:
            images.append(read_idx(image_file))
            labels.append(read_idx(label_file))
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------- loading


def _validate(images: np.ndarray, labels: np.ndarray, source: Traversable) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, dtypes and label range; return (uint8 images, int64 labels)."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(f"{source}: images must have shape (N, 28, 28), got {images.shape}")
    if images.dtype != np.uint8:
        raise DatasetError(f"{source}: images must be uint8 (0 = background, 255 = ink), got {images.dtype}")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{source}: labels must be integers of shape ({images.shape[0]},), "
            f"got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{source}: labels must be digits 0-9, got values {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)


def _load_npz(file: Traversable, sha256: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from an ``.npz`` archive, its SHA-256 checked if ``sha256`` is given."""
    data = _read_verified(file, sha256) if sha256 is not None else file.read_bytes()
    if not data.startswith(b"PK\x03\x04"):  # .npz archives are zip files
        raise DatasetError(f"{file} is not a NumPy .npz archive")
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise DatasetError(f"{file} lacks the array(s) {sorted(missing)}; it has {archive.files}")
        return _validate(archive["images"], archive["labels"], file)


def load_mnist(path: str | Path | None = None, *, sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load digits: ``images`` uint8 (N, 28, 28), 0 = background, and ``labels`` int64 (N,).

    path: None for the bundled 10,000 digits (their SHA-256 is always checked); a ``.npz``
        file with arrays ``images`` and ``labels``; or a directory of standard MNIST IDX files
        (train, plus t10k appended after it if present: 70,000 digits for the full MNIST).
    sha256: for a ``.npz`` path, the expected SHA-256 of the file, checked if given.
    """
    if path is None:
        file = bundled_file()
        if not file.is_file():
            raise FileNotFoundError(f"the bundled MNIST file is missing: {file}")
        return _load_npz(file, BUNDLED_SHA256)
    path = Path(path)
    if path.is_dir():
        return _validate(*_load_idx_directory(path), path)
    if not path.is_file():
        raise FileNotFoundError(f"no MNIST data at {path}")
    return _load_npz(path, sha256)


# --------------------------------------------------------------------------- model range


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 digits (N, 28, 28) → float32 (N, 1, 32, 32) in [−1, 1], background −1.

    Padding happens in pixel space with 0 (background), so the border becomes −1 like the rest
    of the background. Scaling: x = p / 127.5 − 1, so p = 0 → −1 and p = 255 → +1.
    """
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images of shape (N, 28, 28), got {images.shape}")
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))  # (N, 32, 32), zeros around
    scaled = padded.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return scaled[:, None]  # (N, 1, 32, 32): one channel


def from_model_range(x, *, crop: bool = True) -> np.ndarray:
    """Model-range images (N, 1, 32, 32) or (N, 32, 32), any backend → uint8 for display.

    Values are clipped to [−1, 1] (samples overshoot a little) and mapped back with
    p = round((x + 1) · 127.5). ``crop=True`` removes the 2-pixel border, giving (N, 28, 28),
    the exact inverse of ``to_model_range``; ``crop=False`` keeps (N, 32, 32).
    """
    x = to_numpy(x)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {x.shape}")
        x = x[:, 0]  # (N, 32, 32)
    if x.ndim != 3 or x.shape[1:] != (MODEL_SIZE, MODEL_SIZE):
        raise ValueError(f"expected images of shape (N, 1, 32, 32) or (N, 32, 32), got {x.shape}")
    pixels = np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return pixels[:, PAD:-PAD, PAD:-PAD] if crop else pixels


# --------------------------------------------------------------------------- split and batches


def train_test_split(n: int, seed: int = 0, n_test: int = N_TEST) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train, test) index arrays for ``n`` digits, each sorted, int64, disjoint.

    A permutation drawn from ``seed``; its last ``n_test`` entries are the test set. The same
    ``(n, seed, n_test)`` always gives the same split, so the test digits are never trained on.
    """
    if not 0 < n_test < n:
        raise ValueError(f"n_test must be between 1 and n - 1 = {n - 1}, got {n_test}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:-n_test]), np.sort(order[-n_test:])


def iterate_minibatches(
    indices: np.ndarray, batch_size: int, generator: np.random.Generator, *, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Yield batches of ``batch_size`` entries of ``indices`` forever, reshuffled every epoch.

    Each epoch is one permutation of ``indices`` drawn from ``generator``, cut into
    ``len(indices) // batch_size`` batches; the few left over sit out that epoch (the next
    shuffle puts them elsewhere), so every batch has the same shape.

    The order is a pure function of the generator's starting state. To resume training at step
    ``start_step``, pass a generator in the same starting state (e.g. freshly seeded with the
    same seed) and ``start_step``: earlier epochs' permutations are drawn and discarded. Give
    this iterator a generator of its own, so that other random draws do not shift the order.
    """
    if not 0 < batch_size <= len(indices):  # checked here, not at the first next()
        raise ValueError(f"batch_size must be between 1 and len(indices) = {len(indices)}, got {batch_size}")
    return _minibatches(indices, batch_size, generator, start_step)


def step_batches(n: int, batch_size: int, seed: int) -> Callable[[int], np.ndarray]:
    """``batch(step)``: the indices (into n examples) of each training step's batch.

    Steps must come one after another, but the first may be any step, as when a run resumes:
    the order is ``iterate_minibatches`` over a generator seeded with ``seed`` (its own, so other
    random draws cannot shift it), started at that first step. A run of 2N steps and a run of N
    steps + resume + N steps therefore see the same batches.
    """
    batches = None

    def batch(step: int) -> np.ndarray:
        nonlocal batches
        if batches is None:  # the first call: step 0, or where a resumed run picks up
            batches = iterate_minibatches(np.arange(n), batch_size, np.random.default_rng(seed), start_step=step)
        return next(batches)

    return batch


def _minibatches(
    indices: np.ndarray, batch_size: int, generator: np.random.Generator, start_step: int
) -> Iterator[np.ndarray]:
    """The generator behind ``iterate_minibatches``, its arguments already checked."""
    per_epoch = len(indices) // batch_size
    epoch, offset = divmod(start_step, per_epoch)
    for _ in range(epoch):
        generator.permutation(indices)  # replay the draws of epochs already trained
    while True:
        order = generator.permutation(indices)
        for b in range(offset, per_epoch):
            yield order[b * batch_size : (b + 1) * batch_size]
        offset = 0
