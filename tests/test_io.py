"""Checkpoints: exact round trips, atomic writes, and a CheckpointError naming the file for anything
that is not a complete tinydiff checkpoint of a known version."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from tinydiff import io
from tinydiff.io import CheckpointError, atomic_write, load_checkpoint, load_json, save_checkpoint, save_json


def named(path) -> str:
    """A regex matching the file's path literally (error messages must name the file)."""
    return re.escape(str(path))


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.npz"
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": np.array(7), "ids": np.array([1, 2], np.int64)}
    save_checkpoint(path, arrays, kind="unet", config={"channels": 32}, extra={"seed": 3})
    return path, arrays


def test_round_trip_preserves_arrays_dtypes_and_header(ckpt):
    path, arrays = ckpt
    loaded, header = load_checkpoint(path, kind="unet")
    assert set(loaded) == set(arrays)  # the header key is not returned as an array
    for k, v in arrays.items():
        assert loaded[k].dtype == v.dtype
        np.testing.assert_array_equal(loaded[k], v)
    assert header == {"format_version": io.FORMAT_VERSION, "kind": "unet", "config": {"channels": 32},
                      "extra": {"seed": 3}}


def test_save_rejects_the_reserved_header_name(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.npz", {io.HEADER_KEY: np.zeros(1)}, kind="unet")


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(CheckpointError, match=named(path) + " does not exist"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_reported_as_truncated(ckpt):
    path, _ = ckpt
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=named(path) + " is truncated or corrupted"):
        load_checkpoint(path)


def test_random_garbage_bytes_are_reported(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=named(path) + " is truncated or corrupted"):
        load_checkpoint(path)


def test_plain_npz_without_header_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.zeros(3))
    with pytest.raises(CheckpointError, match=named(path) + r" is an .npz file but not a tinydiff checkpoint"):
        load_checkpoint(path)


def test_single_npy_array_is_not_a_checkpoint(tmp_path):
    # regression: np.load returns an ndarray for .npy data, which used to escape as a TypeError
    path = tmp_path / "array.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(CheckpointError, match=named(path) + " holds a single .npy array"):
        load_checkpoint(path)


def test_wrong_kind_names_both_kinds(ckpt):
    path, _ = ckpt
    with pytest.raises(CheckpointError, match=named(path) + " holds a 'unet', expected a 'vae'"):
        load_checkpoint(path, kind="vae")


def write_raw_checkpoint(path, header_bytes: bytes):
    np.savez(path, w=np.zeros(2), **{io.HEADER_KEY: np.frombuffer(header_bytes, dtype=np.uint8)})


def test_wrong_format_version_is_reported(tmp_path):
    path = tmp_path / "future.npz"
    write_raw_checkpoint(path, json.dumps({"format_version": 99, "kind": "unet"}).encode())
    with pytest.raises(CheckpointError, match=named(path) + f" has format version 99; this tinydiff reads version {io.FORMAT_VERSION}"):
        load_checkpoint(path)


@pytest.mark.parametrize("header", [b"\xff\xfe not utf-8", b"{not json", b"[1, 2]"], ids=["utf8", "json", "list"])
def test_corrupted_header_is_reported(tmp_path, header):
    # the "list" case is a regression: a JSON header that is not an object used to raise AttributeError
    path = tmp_path / "bad-header.npz"
    write_raw_checkpoint(path, header)
    with pytest.raises(CheckpointError, match=named(path) + " has a corrupted header"):
        load_checkpoint(path)


def test_every_small_corruption_is_a_checkpoint_error_or_a_clean_load(ckpt):
    # regression: flipped bytes used to escape as NotImplementedError, RuntimeError or TokenError
    # from inside zipfile/numpy; now every failure is a CheckpointError
    path, arrays = ckpt
    data = path.read_bytes()
    g = np.random.default_rng(0)
    for trial in range(150):
        damaged = bytearray(data)
        if trial % 3 == 0:
            damaged = damaged[: int(g.integers(1, len(data)))]
        else:
            start = int(g.integers(len(damaged)))
            damaged[start : start + 4] = g.bytes(4)
        path.write_bytes(bytes(damaged))
        try:
            loaded, _ = load_checkpoint(path)
        except CheckpointError as err:
            assert str(path) in str(err)
        else:  # bytes that zip does not check (timestamps, padding) may change without harm
            np.testing.assert_array_equal(loaded["w"], arrays["w"])


def test_atomic_write_keeps_the_old_file_if_the_writer_fails(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write(path, lambda f: f.write(b"old and complete"))

    def crashing_writer(f):
        f.write(b"new but half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crashing_writer)
    assert path.read_bytes() == b"old and complete"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]  # the temporary file was removed


def test_checkpoint_survives_a_crash_during_the_next_save(ckpt, monkeypatch):
    path, arrays = ckpt

    def savez_that_crashes(f, **payload):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # even an interrupt leaves the old checkpoint

    monkeypatch.setattr(io.np, "savez", savez_that_crashes)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": np.ones(1)}, kind="unet")
    monkeypatch.undo()
    loaded, _ = load_checkpoint(path, kind="unet")
    np.testing.assert_array_equal(loaded["w"], arrays["w"])


def test_atomic_write_creates_missing_folders(tmp_path):
    path = tmp_path / "a" / "b" / "c.bin"
    atomic_write(path, lambda f: f.write(b"x"))
    assert path.read_bytes() == b"x"


def test_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "config.json"
    save_json(path, {"b": [1, 2], "a": "text"})
    assert load_json(path) == {"a": "text", "b": [1, 2]}
    with pytest.raises(CheckpointError, match=named(tmp_path / "missing.json") + " does not exist"):
        load_json(tmp_path / "missing.json")
    path.write_text("{broken")
    with pytest.raises(CheckpointError, match=named(path) + " is not valid JSON"):
        load_json(path)


def test_sha256_file_matches_hashlib(ckpt):
    path, _ = ckpt
    assert io.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_object_arrays_are_refused_as_pickled_objects_not_called_truncated(tmp_path):
    # regression: an object array (stored as a pickle) was reported as a truncated checkpoint,
    # with advice to resume from an earlier one
    path = tmp_path / "pickled.npz"
    header = json.dumps({"format_version": io.FORMAT_VERSION, "kind": "unet", "config": {}, "extra": {}})
    np.savez(path, w=np.zeros(3, np.float32), payload=np.array([{"run": "code"}, None], dtype=object),
             **{io.HEADER_KEY: np.frombuffer(header.encode(), np.uint8)})
    with pytest.raises(CheckpointError, match=named(path) + " contains pickled objects; refusing to load") as info:
        load_checkpoint(path)
    assert "truncated" not in str(info.value) and "resume" not in str(info.value)


# --------------------------------------------------------------------------- configs ↔ JSON


def _config_classes():
    from tinydiff.diffusion import DiffusionConfig
    from tinydiff.models import AutoencoderConfig, CLIPConfig, ImageEncoderConfig, TextEncoderConfig, UNetConfig
    from tinydiff.models.classifier import ClassifierConfig
    from tinydiff.pipeline import SamplingDefaults
    from tinydiff.train.diffusion import DiffusionTrainingConfig
    from tinydiff.train.recipes import RecipeConfig

    return [UNetConfig, AutoencoderConfig, ClassifierConfig, TextEncoderConfig, ImageEncoderConfig, CLIPConfig,
            DiffusionConfig, DiffusionTrainingConfig, SamplingDefaults, RecipeConfig]


CONFIG_CLASSES = _config_classes()
CONFIG_IDS = [c.__name__ for c in CONFIG_CLASSES]


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=CONFIG_IDS)
def test_config_json_round_trip_is_exact(cls):
    config = cls()
    text = json.dumps(config.to_dict())  # plain JSON types only (tuples became lists)
    again = cls.from_dict(json.loads(text))
    assert again == config and type(again) is cls
    assert cls.from_json(config.to_json()) == config


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=CONFIG_IDS)
def test_config_from_dict_rejects_an_unknown_key_by_name(cls):
    from tinydiff.config import ConfigError

    with pytest.raises(ConfigError, match=f"unknown {cls.__name__} keys: colour;"):
        cls.from_dict({**cls().to_dict(), "colour": 1})


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=CONFIG_IDS)
def test_config_from_dict_rejects_a_wrongly_typed_value_by_name(cls):
    from tinydiff.config import ConfigError

    d = cls().to_dict()
    key = next(iter(d))  # the first field; a list or an object is never a valid scalar, nor a dict a list
    bad = {"not": "this"} if not isinstance(d[key], dict) else [1, 2]
    with pytest.raises(ConfigError, match=re.escape(f"{cls.__name__}.{key} must be")):
        cls.from_dict({**d, key: bad})


def test_config_types_follow_json():
    from tinydiff.config import ConfigError
    from tinydiff.models import CLIPConfig, UNetConfig
    from tinydiff.pipeline import SamplingDefaults

    # JSON does not tell 2 from 2.0: an int is a valid float; but a float is not an int, a bool neither
    assert SamplingDefaults.from_dict({"guidance_scale": 3}).guidance_scale == 3.0
    assert SamplingDefaults.from_dict({"sigma_max": None}).sigma_max is None
    with pytest.raises(ConfigError, match="SamplingDefaults.steps must be int"):
        SamplingDefaults.from_dict({"steps": 20.5})
    with pytest.raises(ConfigError, match="UNetConfig.groups must be int"):
        UNetConfig.from_dict({"groups": True})
    with pytest.raises(ConfigError, match=re.escape("UNetConfig.block_channels[1] must be int")):
        UNetConfig.from_dict({"block_channels": [16, "32", 64]})
    assert UNetConfig.from_dict({"block_channels": [16, 32, 64]}).block_channels == (16, 32, 64)
    # nested configs are checked too (CLIPConfig.from_dict used to accept anything)
    with pytest.raises(ConfigError, match="unknown TextEncoderConfig keys: depth"):
        CLIPConfig.from_dict({"text": {"depth": 3}})
    with pytest.raises(ConfigError, match="CLIPConfig.image must be"):
        CLIPConfig.from_dict({"image": 3})
