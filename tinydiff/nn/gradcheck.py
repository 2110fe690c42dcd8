"""Gradient checking by central differences: the proof that a hand-written backward is right.

For a function out = f(θ) and a random upstream gradient g, the scalar L = Σ g ⊙ out has
∂L/∂θ = backward(g). Central differences estimate the same derivative with O(ε²) error:

    ∂L/∂θ_i ≈ (L(θ + ε e_i) − L(θ − ε e_i)) / 2ε

Run in float64 (float32 rounding swamps ε²). The relative error over the sampled entries,
‖a − n‖ / (‖a‖ + ‖n‖), should be < 1e-7 for a correct backward; > 1e-2 means a wrong one
(cs231n's rule of thumb). Large tensors are checked at a random sample of entries.
"""

from __future__ import annotations

import math
from typing import Callable

from ..backend import backend_of, rng, to_device
from .module import Module


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _dot(outs, gs) -> float:
    return sum(float((o * g).sum()) for o, g in zip(outs, gs))


def gradcheck(
    forward: Callable[[], object],
    backward: Callable[[object], dict],
    tensors: dict,
    *,
    eps: float = 1e-6,
    num_samples: int = 12,
    seed: int = 2718,
) -> dict[str, float]:
    """Relative error of the analytic gradient of every array in ``tensors``.

    ``forward()`` computes the output(s) from the current contents of the arrays in ``tensors``
    (which this function perturbs in place and restores). ``backward(dout)`` returns a dict with
    the analytic gradient for each name in ``tensors``; ``dout`` has the structure of the output
    (an array, or a tuple for several outputs). ``seed`` fixes the random upstream gradient and
    the sampled entries; its default is deliberately not 0, the seed tests tend to draw inputs
    with (an upstream gradient equal to the input can hide a wrong backward).
    """
    gen = rng(seed)
    outs = _as_tuple(forward())
    if any(o.dtype.itemsize < 8 for o in outs):
        raise TypeError("gradcheck needs float64 outputs: cast the model and inputs with .double()/astype")
    gs = tuple(to_device(gen.standard_normal(o.shape), backend_of(o)) for o in outs)
    analytic = backward(gs if len(gs) > 1 else gs[0])
    errors = {}
    for name, array in tensors.items():
        grad = analytic[name]
        if grad is None or tuple(grad.shape) != tuple(array.shape):
            raise ValueError(f"gradcheck: analytic gradient for {name} has shape "
                             f"{None if grad is None else tuple(grad.shape)}, expected {tuple(array.shape)}")
        if not array.flags.c_contiguous:  # reshape would copy, and the perturbations would be lost
            raise ValueError(f"gradcheck: {name} is not C-contiguous; pass a contiguous array "
                             "(e.g. ascontiguousarray) that forward() reads")
        flat = array.reshape(-1)  # a view: perturbing it perturbs the array
        count = min(num_samples, flat.size)
        picks = gen.choice(flat.size, size=count, replace=False)
        num = []
        for i in picks:
            i = int(i)
            old = float(flat[i])
            flat[i] = old + eps
            plus = _dot(_as_tuple(forward()), gs)
            flat[i] = old - eps
            minus = _dot(_as_tuple(forward()), gs)
            flat[i] = old
            num.append((plus - minus) / (2 * eps))
        ana = [float(grad.reshape(-1)[int(i)]) for i in picks]
        diff = math.sqrt(sum((a - n) ** 2 for a, n in zip(ana, num)))
        scale = math.sqrt(sum(a * a for a in ana)) + math.sqrt(sum(n * n for n in num))
        errors[name] = diff / scale if scale > 0 else 0.0
    return errors


def gradcheck_module(module: Module, *inputs, eps: float = 1e-6, num_samples: int = 12, seed: int = 2718,
                     input_names=None, forward_kwargs=None) -> dict[str, float]:
    """Gradient check of a Module with respect to its parameters and its float inputs.

    ``module.backward`` must return the input gradient (or a tuple, one per float input).
    Integer or None inputs (token ids, masks) are passed through and not checked.
    Returns {"input.0": err, ..., "<param name>": err}.
    """
    forward_kwargs = forward_kwargs or {}
    float_idx = [i for i, x in enumerate(inputs) if x is not None and x.dtype.kind == "f"]
    names = input_names or [f"input.{i}" for i in float_idx]
    tensors = {n: inputs[i] for n, i in zip(names, float_idx)}
    params = dict(module.named_parameters())
    tensors.update({n: p.data for n, p in params.items()})

    def forward():
        return module(*inputs, **forward_kwargs)

    def backward(dout):
        module.zero_grad()
        module(*inputs, **forward_kwargs)
        dins = _as_tuple(module.backward(dout))
        grads = {n: d for n, d in zip(names, dins)}
        grads.update({n: p.grad for n, p in params.items()})
        return grads

    return gradcheck(forward, backward, tensors, eps=eps, num_samples=num_samples, seed=seed)
