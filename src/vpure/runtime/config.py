"""Frozen, validated, versioned configuration dataclasses with dict and TOML round-trips.

Every config subclasses :class:`ConfigBase`: fields are typed, values are coerced on
construction (``"fp16"`` -> ``Precision.FP16``, lists -> tuples), ``validate`` runs in
``__post_init__``, and ``to_dict``/``from_dict`` carry a ``version`` so a file written by
an older vpure is either migrated or refused by name.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

from . import atomic
from .errors import ConfigError

C = TypeVar("C", bound="ConfigBase")


def check(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a plain (dict/TOML) value to the annotated type, or raise ConfigError."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        check(optional, f"{where}: None is not allowed")
        return None
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and hasattr(tp, "from_name"):  # a table that has named instances
            return tp.from_name(value)
        check(isinstance(value, Mapping), f"{where}: expected a table, got {type(value).__name__}")
        return tp.from_dict(value, where=where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in tp)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}") from None
    if origin is tuple:
        check(isinstance(value, (list, tuple)), f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        check(len(value) == len(args), f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        check(isinstance(value, Mapping), f"{where}: expected a table, got {type(value).__name__}")
        kt, vt = typing.get_args(tp) or (str, Any)
        return types.MappingProxyType(
            {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
        )
    if tp is Any:
        return value
    if tp is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        check(isinstance(value, bool), f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        check(isinstance(value, str), f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        check(isinstance(value, (str, Path)), f"{where}: expected a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Base of all vpure configs: frozen, coerced, validated, versioned."""

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(value, hints[f.name], f"{type(self).__name__}.{f.name}")
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Check cross-field invariants; raise ConfigError naming the field."""

    # -- round trips -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.VERSION}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def migrate(cls, data: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Upgrade a dict written by an older version; the base refuses every other version."""
        raise ConfigError(
            f"{cls.__name__}: version {from_version} is not supported (this vpure reads version {cls.VERSION})"
        )

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, where: str | None = None) -> C:
        where = where or cls.__name__
        check(isinstance(data, Mapping), f"{where}: expected a table, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if version != cls.VERSION:
            data = cls.migrate(data, version)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        check(not unknown, f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"{where}: {e}") from None

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(_drop_none(self.to_dict()))

    @classmethod
    def from_toml(cls: type[C], text: str, *, where: str | None = None) -> C:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where or cls.__name__}: not valid TOML: {e}") from None
        return cls.from_dict(data, where=where)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        return atomic.write_text(path, self.to_toml())  # a crash never leaves half a config

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a TOML text file ({e.reason} at byte {e.start})") from None
        return cls.from_toml(text, where=str(path))

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)
