"""Dataclass configs ↔ plain JSON dicts, written once for every config in tinydiff.

A config (``UNetConfig``, ``AutoencoderConfig``, ``DiffusionConfig``, …) is a dataclass with a
comment on every default. It is saved as JSON beside the weights, so that a checkpoint reloads
without knowing the code path that wrote it. Two functions do the conversion:

    config_to_dict(cfg)        dataclass → dict of JSON types (tuples become lists, nested
                               configs become dicts)
    config_from_dict(cls, d)   the inverse, checking every key against the dataclass's fields
                               and every value against the field's annotation

JSON has no tuples and does not tell 2 from 2.0, so the reader turns lists back into tuples and
accepts an integer where a float is expected. Everything else that does not fit is a
``ConfigError`` naming the class and the key: an unknown key (a config from another model, or
a typo), or a value of the wrong type (``"groups": "8"``). Keys that are absent take their
defaults, so a config saved before a field was added still loads.

``ConfigMixin`` gives a config class the four methods ``to_dict``, ``from_dict``, ``to_json`` and
``from_json`` on top of these functions.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A dict that does not describe a config: unknown keys or values of the wrong type."""


def config_to_dict(config) -> dict:
    """A config dataclass as plain JSON types: tuples become lists, nested configs dicts."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a config dataclass instance, got {type(config).__name__}")
    return {f.name: _to_json_value(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _to_json_value(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_to_json_value(v) for v in value]
    return value


def config_from_dict(cls: type[T], d) -> T:
    """Build ``cls`` from a dict written by ``config_to_dict`` (or by hand), checking it first.

    Raises ConfigError naming the key for an unknown key or a value whose type does not match
    the field's annotation; the class's own ``__post_init__`` then checks the values together.
    """
    name = cls.__name__
    if not isinstance(d, dict):
        raise ConfigError(f"a {name} must be a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {name} keys: {', '.join(map(str, unknown))}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {key: _from_json_value(value, hints[key], f"{name}.{key}") for key, value in d.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a field without a default was left out
        raise ConfigError(f"{name}: {err}") from None


def _from_json_value(value, annotation, where: str):
    """``value`` checked against (and converted to) the type ``annotation``; ``where`` names it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:  # int | None
        for arm in args:
            try:
                return _from_json_value(value, arm, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} must be {_type_name(annotation)}, got {value!r}")
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is tuple or origin is tuple:  # tuple, tuple[int, ...] or tuple[float, float]
        if isinstance(value, (list, tuple)):
            if not args:
                return tuple(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_from_json_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(_from_json_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    elif dataclasses.is_dataclass(annotation):  # a nested config
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return config_from_dict(annotation, value)
    else:
        raise TypeError(f"config field {where} has an annotation config_from_dict cannot check: {annotation!r}")
    raise ConfigError(f"{where} must be {_type_name(annotation)}, got {value!r}")


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if annotation is tuple or typing.get_origin(annotation) is tuple:
        return "a list"
    if dataclasses.is_dataclass(annotation):
        return f"a {annotation.__name__} object"
    return getattr(annotation, "__name__", str(annotation))


class ConfigMixin:
    """``to_dict``/``from_dict``/``to_json``/``from_json`` for a config dataclass (see the module docstring)."""

    def to_dict(self) -> dict:
        """Plain JSON types (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[T], d: dict) -> T:
        """Inverse of ``to_dict``; unknown keys and wrongly typed values are a ConfigError naming the key."""
        return config_from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))
