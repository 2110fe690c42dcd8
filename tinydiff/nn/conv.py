"""2-D convolution (im2col + one GEMM) and nearest-neighbour 2× upsampling: forward/backward pairs.

Convolution as a matrix product (the cs231n "fast layers" layout):

    cols[(c, i, j), (n, y, x)] = x_pad[n, c, y·s + i, x·s + j]       (C·kh·kw, N·Ho·Wo)
    out[o, (n, y, x)]          = Σ_(c,i,j) W[o, (c, i, j)] · cols     (one GEMM)

The loops below run over the kh·kw kernel offsets (9 for a 3×3 kernel), never over pixels.
Backward is the same two GEMMs transposed, and "col2im" adds each offset's slice back.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_xp


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """⌊(size + 2·padding − kernel) / stride⌋ + 1."""
    return (size + 2 * padding - kernel) // stride + 1


class Conv2dCache(NamedTuple):
    cols: object  # (C·kh·kw, N·Ho·Wo)
    w: object  # (O, C, kh, kw)
    x_shape: tuple
    stride: int
    padding: int
    has_bias: bool


def _pad(x, padding: int):
    if padding == 0:
        return x
    xp = get_xp(x)
    return xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))


def conv2d_forward(x, w, b=None, stride: int = 1, padding: int = 0):
    """Cross-correlation, as PyTorch's Conv2d.

    Shapes: x (N, C, H, W), w (O, C, kh, kw), b (O,) or None → out (N, O, Ho, Wo) with
    Ho = ⌊(H + 2p − kh)/s⌋ + 1 (same for Wo).
    out[n, o, y, x] = b[o] + Σ_{c,i,j} W[o, c, i, j] · x_pad[n, c, y·s + i, x·s + j]
    """
    xp = get_xp(x, w)
    n, c, h, wd = x.shape
    o, c_w, kh, kw = w.shape
    if c != c_w:
        raise ValueError(f"conv2d: input has {c} channels but the weight expects {c_w}")
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(wd, kw, stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d: input {h}×{wd} is smaller than the {kh}×{kw} kernel with padding {padding}")
    x_pad = _pad(x, padding)
    if kh == kw == 1 and stride == 1:
        cols = x_pad.transpose(1, 0, 2, 3).reshape(c, n * ho * wo)  # (C, N·H·W)
    else:
        cols6 = xp.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                patch = x_pad[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]  # (N, C, Ho, Wo)
                cols6[:, i, j] = patch.transpose(1, 0, 2, 3)
        cols = cols6.reshape(c * kh * kw, n * ho * wo)
    out = w.reshape(o, -1) @ cols  # (O, N·Ho·Wo)
    out = xp.ascontiguousarray(out.reshape(o, n, ho, wo).transpose(1, 0, 2, 3))  # (N, O, Ho, Wo)
    if b is not None:
        out += b.reshape(1, o, 1, 1)
    return out, Conv2dCache(cols, w, x.shape, stride, padding, b is not None)


def conv2d_backward(dout, cache: Conv2dCache):
    """dW = dout·colsᵀ,  db = Σ_{n,y,x} dout,  dcols = Wᵀ·dout, then col2im (scatter-add) gives dx.

    Returns (dx (N, C, H, W), dw (O, C, kh, kw), db (O,) or None).
    """
    cols, w, (n, c, h, wd), stride, padding, has_bias = cache
    xp = get_xp(dout)
    o, _, kh, kw = w.shape
    ho, wo = dout.shape[2], dout.shape[3]
    d2 = dout.transpose(1, 0, 2, 3).reshape(o, n * ho * wo)  # (O, N·Ho·Wo)
    dw = (d2 @ cols.T).reshape(w.shape)
    db = dout.sum(axis=(0, 2, 3)) if has_bias else None
    dcols = w.reshape(o, -1).T @ d2  # (C·kh·kw, N·Ho·Wo)
    if kh == kw == 1 and stride == 1 and padding == 0:
        dx = xp.ascontiguousarray(dcols.reshape(c, n, h, wd).transpose(1, 0, 2, 3))
        return dx, dw, db
    dcols6 = dcols.reshape(c, kh, kw, n, ho, wo)
    dx_pad = xp.zeros((n, c, h + 2 * padding, wd + 2 * padding), dtype=dout.dtype)
    for i in range(kh):
        for j in range(kw):
            dx_pad[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += dcols6[:, i, j].transpose(
                1, 0, 2, 3
            )
    dx = dx_pad[:, :, padding : padding + h, padding : padding + wd]
    return xp.ascontiguousarray(dx), dw, db


def upsample_nearest2x_forward(x):
    """Each pixel becomes a 2×2 block.  Shapes: (N, C, H, W) → (N, C, 2H, 2W)."""
    xp = get_xp(x)
    n, c, h, w = x.shape
    out = xp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, 2, w, 2)).reshape(n, c, 2 * h, 2 * w)
    return out, x.shape


def upsample_nearest2x_backward(dout, x_shape):
    """Each input pixel fed four outputs, so its gradient is the sum of that 2×2 block."""
    n, c, h, w = x_shape
    return dout.reshape(n, c, h, 2, w, 2).sum(axis=(3, 5))  # (N, C, H, 2, W, 2) → (N, C, H, W)
