"""Shared pytest fixtures.

``backends`` parametrises a test over every array backend that works here: "numpy" always,
"cupy" only where ``tinydiff.backend.cupy_status()`` finds CuPy and a GPU. A test takes the
backend name and moves its (float64, CPU-made) inputs with ``to_device(x, backends)``, so the
same derivation is checked on both.
"""

from __future__ import annotations

import pytest

from tinydiff import backend

CUPY_STATUS = backend.cupy_status()
CUPY_USABLE = not CUPY_STATUS.startswith("not usable")

BACKEND_PARAMS = [
    "numpy",
    pytest.param("cupy", marks=pytest.mark.skipif(not CUPY_USABLE, reason="CuPy or a GPU is not usable here")),
]


@pytest.fixture(params=BACKEND_PARAMS)
def backends(request) -> str:
    """The name of one usable backend ("numpy", and "cupy" where a GPU is present)."""
    return request.param


@pytest.fixture(autouse=True)
def _restore_default_backend():
    """A test that calls set_backend must not change the default for the tests after it."""
    name = backend.get_backend()
    yield
    backend.set_backend(name)
