"""Typed configs, below every other package (DESIGN.md principle 7): the error every config check raises, the
enumeration type of choice fields, and the one way to build a config dataclass from a mapping.

Every group of the run config is a dataclass derived from `Config`; Hydra composes them as structured configs
(trainer/config.py registers them), so it rejects a wrongly typed value or an unknown key with the key, the value
and what the field takes. The same checks apply to mappings from elsewhere (a checkpoint's meta.json, a preset,
a plain dict in a test) through `from_dict`, which runs OmegaConf, Hydra's own type engine, and turns its error
into a `ConfigError`. Cross-field rules live in each group's `validate()`.

Choice fields are `Choice` enumerations: their members are strings (`Balance("aux_free") == "aux_free"`), so they
print, compare and serialise as their values, while OmegaConf, which matches enumeration members by name, refuses
any other value with the list of choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

import torch

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value is wrong or inconsistent; the message names the field and the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the command-line tools (hai-plan, hai-compare): a usage error is a ConfigError naming the
    tool's --help, reported like every other error of the tool (one line, exit code 2), not argparse's usage dump."""

    def error(self, message: str) -> None:
        raise ConfigError(f"{message} ({self.prog} --help)")


class Choice(str, Enum):
    """A config enumeration whose members are their own string values (build one with `choice`)."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # messages quote a choice as the string the user wrote
        return repr(self.value)

    __format__ = str.__format__

    @classmethod
    def values(cls) -> str:
        return ", ".join(m.value for m in cls)

    @classmethod
    def parse(cls, value: Any, key: str) -> Choice:
        """The member for `value`, or a ConfigError naming `key`, the value and the choices."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} {_REFUSALS.get(cls, 'is not a valid choice')}; choose one of "
                              f"{cls.values()}") from None


_REFUSALS: dict[type, str] = {}


def choice(name: str, values: str, module: str, refusal: str = "is not a valid choice") -> type[Choice]:
    """A `Choice` enumeration of the space-separated `values`, each member named as its value (so that values
    such as "1f1b" work as OmegaConf names); `refusal` words the error for another value."""
    members = values.split()
    cls = Choice(name, {v: v for v in members}, module=module, qualname=name)
    _REFUSALS[cls] = refusal
    return cls


DType = choice("DType", "bf16 fp32", __name__)
"""A storage or compute dtype of the run config (`trainer.dtype`, `optim.moment_dtype`, `fp8.moment_dtype`)."""

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def torch_dtype(value: str) -> torch.dtype:
    """The torch dtype of a `DType` value."""
    return TORCH_DTYPES[str(value)]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _choice_type(hint: Any) -> type[Choice] | None:
    """The Choice enumeration of a field annotated `X` or `X | None`, else None."""
    args = typing.get_args(hint) or (hint,)
    return next((a for a in args if isinstance(a, type) and issubclass(a, Choice)), None)


class Config:
    """Base of the config dataclasses: `prefix` names the group in messages ("model", "parallel", ...);
    strings given to choice fields become their members, with a ConfigError for anything else."""

    prefix: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            kind = _choice_type(_hints(type(self))[f.name])
            value = getattr(self, f.name)
            if kind is not None and value is not None:
                setattr(self, f.name, kind.parse(value, f"{self.prefix}.{f.name}"))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (choices as strings), e.g. for meta.json."""
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]


def _plain(value: Any) -> Any:
    if isinstance(value, Choice):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def from_dict(cls: type[C], values: Mapping[str, Any] | None, prefix: str) -> C:
    """Dataclass `cls` from a plain mapping: unknown and missing keys are refused together, then values get
    OmegaConf's type checks (the ones Hydra applies to the composed config); a ConfigError names `prefix.key`, the
    value and what the field takes."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    values = dict(values or {})
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    unknown = sorted(set(values) - {f.name for f in fields})
    missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if unknown or missing:
        problems = [f"unknown keys {unknown}" if unknown else "", f"missing {missing}" if missing else ""]
        raise ConfigError(f"{prefix}: {', '.join(filter(None, problems))}; its keys are: "
                          f"{', '.join(f.name for f in fields)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(describe(err, prefix)) from None


def describe(err: BaseException, prefix: str = "") -> str:
    """One paragraph for an OmegaConf or Hydra composition error: the key, the value and what is allowed."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = err.__cause__ if not isinstance(err, OmegaConfBaseException) and err.__cause__ is not None else err
    if not isinstance(cause, OmegaConfBaseException):  # e.g. a group option that does not exist
        return " ".join(str(err).split("Config search path")[0].split())
    key = ".".join(filter(None, [prefix, str(cause.full_key or "")]))
    msg = (cause.msg or str(cause)).splitlines()[0].strip()
    owner = cause.object_type if isinstance(cause.object_type, type) else None
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and owner is not None \
            and dataclasses.is_dataclass(owner):
        group = key.rsplit(".", 1)[0] if "." in key else prefix
        known = ", ".join(f.name for f in dataclasses.fields(owner))
        return f"{key}: no such key in {group or 'the config'} ({owner.__name__}); its keys are: {known}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "." in key:
        parent = key.rsplit(".", 1)[0]
        return f"{key}: {msg}; {parent} is null or holds no such key: set it as a whole, {parent}={{key: value, ...}}"
    field = str(cause.key) if cause.key is not None else None
    if owner is not None and dataclasses.is_dataclass(owner) and field in _hints(owner):
        hint = _hints(owner)[field]
        kind = _choice_type(hint)
        if kind is not None:
            return (f"{key}={cause.value!r} {_REFUSALS.get(kind, 'is not a valid choice')}; choose one of "
                    f"{kind.values()}")
        return f"{key}={cause.value!r}: {msg}; {key} takes {_type_name(hint)} ({owner.__module__}.{owner.__name__})"
    return f"{key}: {msg}" if key else msg


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    origin = typing.get_origin(hint)
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
