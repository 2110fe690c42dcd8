"""Checkpoints and small files, written atomically and read without running code.

A checkpoint is one ``.npz`` archive: the arrays (weights, optimiser moments, …) plus a JSON
header stored under the key ``__tinydiff__`` as UTF-8 bytes, holding the format version, what
kind of checkpoint it is, and the model's config. ``np.load(..., allow_pickle=False)`` means
loading an untrusted file never executes code.

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows): a crash leaves either the old file or
the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
HEADER_KEY = "__tinydiff__"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted, or of an unknown format version."""


def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, arrays: dict, *, kind: str, config: dict | None = None, extra: dict | None = None) -> None:
    """Write ``arrays`` (name → NumPy array) and a JSON header atomically to ``path`` (.npz)."""
    if HEADER_KEY in arrays:
        raise ValueError(f"array name {HEADER_KEY!r} is reserved for the checkpoint header")
    header = {"format_version": FORMAT_VERSION, "kind": kind, "config": config or {}, "extra": extra or {}}
    payload = dict(arrays)
    payload[HEADER_KEY] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **payload))


def load_checkpoint(path, *, kind: str | None = None) -> tuple[dict, dict]:
    """Read a checkpoint written by ``save_checkpoint``: returns (arrays, header).

    Raises CheckpointError with the file name and a hint for anything that is not a complete
    tinydiff checkpoint of a known version (and of ``kind``, when given).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
        if not hasattr(archive, "files"):  # a bare .npy array, not an .npz archive
            raise CheckpointError(f"{path} holds a single .npy array, not a tinydiff checkpoint (.npz archive)")
        with archive:
            if _object_members(archive):  # reading them would unpickle, i.e. run code the file chooses
                raise CheckpointError(f"{path} contains pickled objects; refusing to load "
                                      "(a tinydiff checkpoint holds only numeric arrays)")
            arrays = {k: archive[k] for k in archive.files}
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 — a damaged file can fail anywhere in zipfile/numpy parsing
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({type(err).__name__}: {err}); "
            "delete it and resume from an earlier checkpoint, or retrain"
        ) from None
    if HEADER_KEY not in arrays:
        raise CheckpointError(f"{path} is an .npz file but not a tinydiff checkpoint (no header)")
    try:
        header = json.loads(arrays.pop(HEADER_KEY).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has a corrupted header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {path} has a corrupted header (not a JSON object)")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this tinydiff reads version {FORMAT_VERSION}"
        )
    if kind is not None and header.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path} holds a {header.get('kind')!r}, expected a {kind!r}")
    return arrays, header


def _object_members(archive) -> list[str]:
    """The members of an open .npz whose dtype holds Python objects (stored as pickles).

    Only each member's .npy header is read (``numpy.lib.format``): the dtype is known before
    any data is, so nothing is unpickled to find out.
    """
    found = []
    for member in archive.zip.namelist():
        with archive.zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:  # version 3.0 (UTF-8 field names) is never written by save_checkpoint
                raise ValueError(f"unsupported .npy format version {version} in member {member}")
            _, _, dtype = read_header(f)
        if dtype.hasobject:
            found.append(member)
    return found


def save_json(path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_json(path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
