"""Parameters, the Module base class, inference mode and seeded initialisation.

A ``Module`` is a thin object over hand-written forward/backward pairs:

* ``forward(*inputs)`` computes the output and keeps whatever the backward pass needs
  (its *cache*) unless inference mode is on (``with no_grad():``), which keeps nothing;
* ``backward(dout)`` returns the gradient with respect to the input(s) (a tuple when there are
  several) and **adds** into each parameter's ``.grad`` (micrograd's ``+=``): a parameter used
  twice, or a tensor feeding a skip connection, sums its gradient contributions.

Parameters are discovered from attributes in definition order, with PyTorch's dotted names
(``blocks.0.conv1.weight``), so a state dict maps one-to-one onto a PyTorch model of the same shape.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator

from ..backend import CHECK_DTYPE, DEFAULT_DTYPE, backend_of, get_xp, rng, to_device, to_numpy

# --------------------------------------------------------------------------- inference mode

_grad_enabled = True


def is_grad_enabled() -> bool:
    """False inside ``no_grad()``: layers then keep no caches and cannot run backward."""
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Inference mode: forward passes keep no caches, so memory is released as soon as possible."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


# --------------------------------------------------------------------------- seeded init
#
# A model's initial weights come from a generator it makes from its seed and hands to each of
# its layers in turn (``UNet(config, seed=3)``, ``Linear(..., generator=g)``), so they depend on
# the seed only, never on what was built before. A layer built on its own, without a generator,
# draws from the default one below, which ``manual_seed`` resets (like ``torch.manual_seed``).

_default_generator = rng(0)


def manual_seed(seed: int) -> None:
    """Seed the default generator: the one layers built without a ``generator`` draw from."""
    global _default_generator
    _default_generator = rng(seed)


def init_generator(generator=None):
    """The CPU generator a new layer draws its initial weights from: ``generator`` if given,
    else the default one (``manual_seed``)."""
    return _default_generator if generator is None else generator


def uniform_init(shape, bound: float, generator=None):
    """U(−bound, bound) drawn on the CPU from ``init_generator(generator)``, float32 on the default backend.

    PyTorch's default for Linear and Conv2d weights and biases is bound = 1/√fan_in
    (kaiming_uniform with a = √5 gives exactly that for the weight).
    """
    return to_device(init_generator(generator).uniform(-bound, bound, size=shape).astype(DEFAULT_DTYPE))


# --------------------------------------------------------------------------- parameters


class Parameter:
    """A trainable array ``data`` and its accumulated gradient ``grad`` (same shape, dtype, device)."""

    def __init__(self, data):
        self.data = data
        self.grad = get_xp(data).zeros_like(data)

    @property
    def shape(self):
        return self.data.shape

    def accumulate(self, g, name: str = "parameter") -> None:
        """``grad += g`` after checking the shape (a wrong shape is a bug in a backward pass)."""
        if g.shape != self.data.shape:
            raise ValueError(f"gradient for {name} has shape {g.shape}, expected {self.data.shape}")
        self.grad += g

    def __repr__(self) -> str:
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, backend={backend_of(self.data)})"


class StateDictError(KeyError):
    """``load_state_dict`` found missing, unexpected or mis-shaped keys."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


# --------------------------------------------------------------------------- modules


class Module:
    """Base class: parameter discovery, state dicts, device/dtype moves, train/eval mode."""

    training: bool = True

    def forward(self, *inputs):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def __call__(self, *inputs, **kwargs):
        return self.forward(*inputs, **kwargs)

    def __getstate__(self):
        """What pickling (and ``copy.deepcopy``) keeps: everything but the caches of a forward pass
        (``_cache``, and ``_…_cache`` of modules with several), which are scratch for the backward
        pass that follows it, not part of the module, and may hold what cannot be pickled (the
        fast or reference layer module that ran). Worker processes get their replica this way."""
        return {k: v for k, v in self.__dict__.items() if not (k.startswith("_") and k.endswith("_cache"))}

    # -- traversal -----------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """``(dotted_name, parameter)`` pairs in definition order, children recursively."""
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator["Module"]:
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """``(dotted_name, module)`` for this module ("" or ``prefix``) and all its descendants."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def num_parameters(self) -> int:
        return sum(int(p.data.size) for p in self.parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad[...] = 0

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # -- state dicts ---------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, object]":
        """Dotted name → parameter array (the live arrays, not copies)."""
        return OrderedDict((name, p.data) for name, p in self.named_parameters())

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters, converting to each parameter's dtype and backend.

        With ``strict`` (the default) any missing, unexpected or mis-shaped key is an error that
        lists them all; mis-shaped keys are an error even when not strict.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        misshaped = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and tuple(state[k].shape) != tuple(own[k].shape)
        ]
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if misshaped:
            problems.append("mis-shaped keys: " + "; ".join(misshaped))
        if problems:
            raise StateDictError(f"cannot load state dict into {type(self).__name__}: " + " | ".join(problems))
        for name, p in own.items():
            if name in state:
                value = to_device(state[name], backend_of(p.data), dtype=p.data.dtype)
                p.data[...] = value

    # -- device and dtype ----------------------------------------------------------------
    def _map_parameters(self, fn) -> "Module":
        for p in self.parameters():
            p.data = fn(p.data)
            p.grad = get_xp(p.data).zeros_like(p.data)
        return self

    def to(self, backend: str) -> "Module":
        """Move every parameter to ``backend`` ('numpy' or 'cupy'); gradients are reset."""
        return self._map_parameters(lambda a: to_device(a, backend))

    def astype(self, dtype) -> "Module":
        """Cast every parameter (e.g. float64 for gradient checks); gradients are reset."""
        return self._map_parameters(lambda a: a.astype(dtype))

    def double(self) -> "Module":
        return self.astype(CHECK_DTYPE)

    def float(self) -> "Module":
        return self.astype(DEFAULT_DTYPE)

    # -- helpers for subclasses ------------------------------------------------------------
    def _keep(self, cache):
        """Store ``cache`` for backward unless in inference mode."""
        self._cache = cache if _grad_enabled else None

    def _take(self):
        """Hand the stored cache to backward and drop the reference (frees memory)."""
        cache = getattr(self, "_cache", None)
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a forward pass that kept its cache "
                "(was forward run inside no_grad(), or backward called twice?)"
            )
        self._cache = None
        return cache

    def _check_input(self, x, like, ndim: int | None, channels: int | None, axis: int, what: str) -> None:
        """Clear errors for wrong rank, channel count, dtype or backend, before NumPy fails deep inside.

        ``like`` is the layer's own parameter array (e.g. ``self.weight.data``) whose dtype and
        backend the input must share, or None for a layer without parameters. It is read at
        every call (never remembered), so it stays right after ``.to()``, ``.astype()`` or a
        replaced parameter; a layer checks one array rather than walking ``parameters()``, so the
        check costs the same on every layer (a layer's parameters share one dtype and device).
        """
        if ndim is not None and x.ndim != ndim:
            raise ValueError(f"{type(self).__name__} expects a {ndim}-D input {what}, got shape {tuple(x.shape)}")
        if channels is not None and (not -x.ndim <= axis < x.ndim or x.shape[axis] != channels):
            raise ValueError(
                f"{type(self).__name__} expects {channels} features on axis {axis} of input {what}, "
                f"got shape {tuple(x.shape)}"
            )
        if like is not None and x.dtype != like.dtype:
            raise TypeError(
                f"{type(self).__name__} has {like.dtype} parameters but got a {x.dtype} input; "
                f"cast the input with x.astype({like.dtype}) or the module with .astype()"
            )
        get_xp(x, like)  # mixed backends → clear error


class ModuleList(Module):
    """A list of modules whose parameters are named ``0.``, ``1.``, … as in PyTorch."""

    def __init__(self, modules=()):
        self._items: list[Module] = []
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        setattr(self, str(len(self._items)), module)
        self._items.append(module)

    def named_children(self):
        for i, m in enumerate(self._items):
            yield str(i), m

    def named_parameters(self, prefix: str = ""):
        for i, m in enumerate(self._items):
            yield from m.named_parameters(f"{prefix}{i}.")

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Module:
        return self._items[i]


class Sequential(ModuleList):
    """Modules applied in order; backward runs them in reverse."""

    def forward(self, x):
        for m in self._items:
            x = m(x)
        return x

    def backward(self, dout):
        for m in reversed(self._items):
            dout = m.backward(dout)
        return dout


def to_state_arrays(module: Module) -> dict:
    """A CPU (NumPy) copy of the state dict, for saving."""
    return {k: to_numpy(v).copy() for k, v in module.state_dict().items()}
