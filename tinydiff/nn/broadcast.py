"""The adjoint of broadcasting, written once.

If ``y = x + b`` where ``b`` was broadcast from ``shape`` to ``y.shape``, every element of ``b`` was
used once per copy, so ``db`` is ``dy`` summed over the broadcast axes (tinygrad's ``unbroadcast``).
"""

from __future__ import annotations


def unbroadcast(grad, shape: tuple):
    """Sum ``grad`` down to ``shape``: over leading axes it lacks and axes where it has size 1."""
    shape = tuple(shape)
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)
