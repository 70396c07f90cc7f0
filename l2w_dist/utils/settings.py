"""Settings declared once: every dataclass field carries its own check.

    @dataclass
    class OptimSettings(Settings):
        name: Literal["sgd", "adamw"] = setting("sgd")  # a Literal lists its choices: its own check
        lr: float = setting(0.1, above(0))
        nesterov: bool = setting(False, free=True)  # every value of the type is allowed

A field's type says what kind of value it takes; its ``check`` says which values of that kind
are allowed; ``free=True`` says that every value of the type is. A field with none of the three
is a mistake, reported when the class is first constructed. Constructing a ``Settings``
converts YAML-style values to the declared types (an integral float to ``int``, ``"1e-4"`` to
``float``, a list to a tuple) and runs every check, raising ``SettingError`` that names the
field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A configuration key or value that is not allowed."""


class SettingError(ConfigError):
    """``key=value`` is not allowed; ``problem`` says why (e.g. "must be a number").

    ``key`` is relative to the settings object that raised it; ``under(prefix)`` re-keys it
    for the section it sits in (``epsilon`` -> ``meta.epsilon``)."""

    def __init__(self, key: str, value: Any, problem: str, owner: str = ""):
        self.key, self.value, self.problem, self.owner = key, value, problem, owner
        super().__init__(f"{owner + '.' if owner else ''}{key}={value!r} {problem}")

    def under(self, prefix: str) -> SettingError:
        return SettingError(prefix + self.key, self.value, self.problem)


@dataclasses.dataclass(frozen=True)
class Check:
    """A test of a value and a description of what passes it.

    In ``allowed``, ``{kind}`` and ``{noun}`` stand for the field's type ("an integer" /
    "integer" or "a number" / "number"), so one check reads right on int and float fields."""

    accepts: Callable[[Any], bool]
    allowed: str

    def describe(self, typ: Any) -> str:
        element = get_args(typ)[0] if get_origin(typ) in (tuple, list) else typ
        noun = "integer" if element is int else "number"
        return self.allowed.format(kind=f"an {noun}" if noun == "integer" else f"a {noun}", noun=noun)


def at_least(bound: float) -> Check:
    return Check(lambda v: v >= bound, f"{{kind}} >= {bound}")


def above(bound: float) -> Check:
    return Check(lambda v: v > bound, "a positive {noun}" if bound == 0 else f"{{kind}} > {bound}")


def in_range(low: float, high: float, *, include_high: bool = False) -> Check:
    """``low <= v < high`` (``<= high`` with ``include_high``)."""
    if include_high:
        return Check(lambda v: low <= v <= high, f"{{kind}} in [{low}, {high}]")
    return Check(lambda v: low <= v < high, f"{{kind}} in [{low}, {high})")


def one_of(*values: Any) -> Check:
    return Check(lambda v: v in values, "one of " + ", ".join(str(v) for v in values))


def each(check: Check) -> Check:
    """``check`` on every element of a tuple or list."""
    return Check(lambda items: all(check.accepts(v) for v in items), "a list of values, each " + check.allowed)


NON_EMPTY = Check(lambda v: len(v) > 0, "a non-empty string")


def setting(
    default: Any = dataclasses.MISSING,
    check: Check | None = None,
    *,
    free: bool = False,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its check (or ``free=True``: any value of its type)."""
    if free and check is not None:
        raise TypeError("a setting is either free or checked, not both")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"check": check, "free": free})


def check_of(field: dataclasses.Field) -> Check | None:
    return field.metadata.get("check")


def is_free(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get("free"))


@dataclasses.dataclass
class Settings:
    """Base of a dataclass whose fields are ``setting``s; validated on construction."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        hints = _type_hints(type(self))
        for field in dataclasses.fields(self):
            typ = hints[field.name]
            if dataclasses.is_dataclass(typ):
                continue  # a nested section validates itself
            check = check_of(field)
            if check is None and not is_free(field) and get_origin(typ) is not Literal:
                raise TypeError(f"{owner}.{field.name} declares no check: use setting(..., check) or free=True")
            try:
                value = coerce(field.name, typ, getattr(self, field.name))
                if check is not None and not check.accepts(value):
                    raise SettingError(field.name, value, f"is not allowed; expected {check.describe(typ)}")
            except SettingError as err:
                raise SettingError(err.key, err.value, err.problem, owner) from None
            setattr(self, field.name, value)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(key: str, typ: Any, value: Any) -> Any:
    """``value`` as a ``typ`` (as YAML or a command line spells it), or ``SettingError``."""
    origin, args = get_origin(typ), get_args(typ)
    if origin is Literal:
        if value not in args:
            raise SettingError(key, value, f"is not allowed; choose one of {list(args)}")
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return coerce(key, arg, value)
            except SettingError:
                continue
        raise SettingError(key, value, f"has the wrong type; expected {typ}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise SettingError(key, value, "must be true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SettingError(key, value, "must be an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise SettingError(key, value, "must be a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise SettingError(key, value, "must be a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise SettingError(key, value, f"must be a list of {len(args)} values")
        return tuple(coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise SettingError(key, value, "must be a list")
        return [coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SettingError(key, value, "must be a mapping")
        return dict(value)
    return value
