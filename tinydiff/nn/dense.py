"""Linear layers and embedding lookups: forward/backward pairs.

Symbols: x input, W weight, b bias, dout = ∂L/∂out (the upstream gradient).
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import add_at, get_xp


class LinearCache(NamedTuple):
    x: object  # (..., in)
    w: object  # (out, in)
    has_bias: bool


def linear_forward(x, w, b=None):
    """out = x Wᵀ + b.

    Shapes: x (..., in), w (out, in) (PyTorch's layout), b (out,) or None → out (..., out).
    Every leading axis is a row of one matrix product: NumPy's ``@`` on a stack (B, L, in) would
    call BLAS once per item, B small products instead of one large one.
    """
    x2 = x.reshape(-1, x.shape[-1])  # (..., in) → (rows, in)
    out = x2 @ w.T  # (rows, out)
    if b is not None:
        out += b
    return out.reshape(x.shape[:-1] + w.shape[:1]), LinearCache(x, w, b is not None)  # (rows, out) → (..., out)


def linear_backward(dout, cache: LinearCache):
    """dx = dout W,  dW = Σ_rows doutᵀ x,  db = Σ_rows dout.  Returns (dx, dw, db or None)."""
    x, w, has_bias = cache
    d2 = dout.reshape(-1, dout.shape[-1])  # (rows, out): every leading axis is a row
    x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
    dx = (d2 @ w).reshape(x.shape)  # (rows, in) → (..., in)
    dw = d2.T @ x2
    db = d2.sum(axis=0) if has_bias else None
    return dx, dw, db


class EmbeddingCache(NamedTuple):
    ids: object  # integer array (...)
    num_embeddings: int


def embedding_forward(ids, weight):
    """out[..., :] = weight[ids[...], :].  Shapes: ids (...) integers, weight (V, D) → (..., D)."""
    return weight[ids], EmbeddingCache(ids, weight.shape[0])


def embedding_backward(dout, cache: EmbeddingCache):
    """dweight[v] = Σ over positions where ids == v of dout (a scatter-add: rows repeat)."""
    ids, num_embeddings = cache
    xp = get_xp(dout)
    dim = dout.shape[-1]
    dweight = xp.zeros((num_embeddings, dim), dtype=dout.dtype)
    add_at(dweight, ids.reshape(-1), dout.reshape(-1, dim))  # (positions, D) rows added into V rows
    return dweight
