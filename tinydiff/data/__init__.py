"""Training data: the bundled MNIST digits (or standard IDX files), the fixed split, batching.

Captions for these digits live in ``tinydiff.text.captions``.
"""

from tinydiff.data.mnist import (
    DatasetError,
    from_model_range,
    iterate_minibatches,
    load_mnist,
    read_idx,
    to_model_range,
    train_test_split,
)

__all__ = [
    "DatasetError",
    "from_model_range",
    "iterate_minibatches",
    "load_mnist",
    "read_idx",
    "to_model_range",
    "train_test_split",
]
