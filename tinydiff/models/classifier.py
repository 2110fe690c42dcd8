"""The evaluation classifier: a small ConvNet that reads digits and supplies features for FID.

Generated digits are judged by a network that never saw them: does a sample of "a 7" look like
a 7 to a good digit classifier (prompt accuracy), and do the classifier's penultimate features of
many samples have the same statistics as those of real digits (the Fréchet distance of
``tinydiff.metrics``, FID's recipe with this network in place of Inception v3; Heusel et al. 2017)?

Network (widths for the default config; every layer is a ``tinydiff.nn`` layer):

    x                                                   (N, 1, 32, 32)  in [−1, 1]
    Conv3×3(1 → 16)                                     (N, 16, 32, 32)
    [GroupNorm → SiLU → Conv3×3 stride 2] × 3           (N, 32, 16, 16) → (N, 48, 8, 8) → (N, 64, 4, 4)
    GroupNorm → SiLU → global average pool              (N, 64)         p = mean over H, W
    Linear(64 → 64) → SiLU                              (N, 64)         f: the penultimate features
    Linear(64 → 10)                                     (N, 10)         logits

Backward runs the same path in reverse: the head's Linear, SiLU, Linear, then the pool (whose
adjoint spreads dp/(H·W) over every pixel of the last map), then the convolutional trunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import backend_of, get_xp, rng, to_device, to_numpy
from ..config import ConfigMixin
from ..nn import Conv2d, GroupNorm, Linear, Module, Sequential, SiLU, no_grad


@dataclass
class ClassifierConfig(ConfigMixin):
    """Everything that decides the network's shape; saved as JSON beside the weights."""

    in_channels: int = 1  # MNIST is grey
    channels: tuple[int, ...] = (16, 32, 48, 64)  # feature maps at 32², 16², 8², 4²: one stride-2 conv per step
    groups: int = 8  # GroupNorm groups (must divide every entry of ``channels``)
    feature_dim: int = 64  # width of the penultimate features the Fréchet distance compares
    num_classes: int = 10  # digits 0–9

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)  # JSON gives a list
        bad = [c for c in self.channels if c % self.groups]
        if not self.channels or bad:
            raise ValueError(f"invalid ClassifierConfig: channels {self.channels} must be non-empty and "
                             f"divisible into {self.groups} groups")


class DigitClassifier(Module):
    """DigitClassifier(config, seed=0): images (N, 1, 32, 32) in [−1, 1] → logits (N, 10).

    ``forward`` keeps its caches for ``backward(dlogits) -> dx``. For evaluation, ``features``
    and ``predict`` run in batches under ``no_grad``, accept images on either backend and return
    NumPy arrays.
    """

    def __init__(self, config: ClassifierConfig | None = None, seed: int = 0):
        gen = rng(seed)  # the initial weights depend on the seed only
        self.config = config = config or ClassifierConfig()
        ch = config.channels
        layers = [Conv2d(config.in_channels, ch[0], 3, padding=1, generator=gen)]
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            layers += [GroupNorm(config.groups, c_in), SiLU(), Conv2d(c_in, c_out, 3, stride=2, padding=1, generator=gen)]
        layers += [GroupNorm(config.groups, ch[-1]), SiLU()]
        self.trunk = Sequential(layers)
        self.fc = Linear(ch[-1], config.feature_dim, generator=gen)
        self.act = SiLU()
        self.head = Linear(config.feature_dim, config.num_classes, generator=gen)

    def _features(self, x):
        """x (N, C, 32, 32) → penultimate features f (N, feature_dim), keeping caches."""
        h = self.trunk(x)  # (N, c_last, H', W')
        self._keep(h.shape)
        return self.act(self.fc(h.mean(axis=(2, 3))))  # pool (N, c_last) → (N, feature_dim)

    def forward(self, x):
        return self.head(self._features(x))  # (N, num_classes)

    def backward(self, dlogits):
        batch, channels, height, width = self._take()
        dpool = self.fc.backward(self.act.backward(self.head.backward(dlogits)))  # (N, c_last)
        xp = get_xp(dpool)
        dh = xp.broadcast_to(dpool[:, :, None, None] / (height * width), (batch, channels, height, width))
        return self.trunk.backward(xp.ascontiguousarray(dh))  # (N, C, 32, 32)

    def _batched(self, fn, x, batch_size: int) -> np.ndarray:
        """``fn`` over ``x`` in batches moved to this model's backend and dtype, as one NumPy array."""
        weight = self.fc.weight.data
        with no_grad():
            return np.concatenate([
                to_numpy(fn(to_device(x[i : i + batch_size], backend_of(weight), weight.dtype)))
                for i in range(0, len(x), batch_size)
            ])

    def features(self, x, batch_size: int = 500) -> np.ndarray:
        """Penultimate features f = SiLU(W p + b) (N, feature_dim) of images x (N, 1, 32, 32)."""
        return self._batched(self._features, x, batch_size)

    def logits(self, x, batch_size: int = 500) -> np.ndarray:
        """Logits (N, num_classes) of images x (N, 1, 32, 32), without caches."""
        return self._batched(self.forward, x, batch_size)

    def predict(self, x, batch_size: int = 500) -> np.ndarray:
        """Predicted digits (N,) int64: argmax of the logits."""
        return self.logits(x, batch_size).argmax(axis=1)
