"""Typed dataclass configs: overrides from `key=value` strings, validation with errors that name the key."""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from dreamlab.errors import DreamlabError

T = TypeVar("T")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_type(tp: Any) -> Any:
    """Strip Optional[...] / X | None to the underlying type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a CLI string (or a JSON value) into `tp`, or raise an error naming `key`."""
    optional = type(None) in typing.get_args(tp)
    base = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or value is None:
            return None
    origin = typing.get_origin(base)
    try:
        if typing.get_origin(base) is typing.Literal:
            allowed = typing.get_args(base)
            if value not in allowed:
                raise DreamlabError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
            return value
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if origin in (tuple, list):
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v != ""]
            args = typing.get_args(base)
            inner = args[0] if args else str
            out = [coerce(v, inner, key) for v in items]
            return tuple(out) if origin is tuple else out
    except (ValueError, TypeError, OverflowError) as e:  # OverflowError: int("1e400") (inf)
        raise DreamlabError(f"{key}={value!r} is not a valid {getattr(base, '__name__', base)}") from e
    return value


def apply_overrides(cfg: T, overrides: Mapping[str, Any], *, what: str = "config") -> T:
    """Return a copy of dataclass `cfg` with `overrides` applied; unknown keys name the allowed ones."""
    types_ = field_types(type(cfg))
    bad = [k for k in overrides if k not in types_]
    if bad:
        raise DreamlabError(
            f"unknown {what} key {bad[0]!r}; allowed: {', '.join(sorted(types_))}"
        )
    return dataclasses.replace(cfg, **{k: coerce(v, types_[k], k) for k, v in overrides.items()})


def check_ranges(cfg: Any, *, positive: Iterable[str] = (), nonneg: Iterable[str] = (),
                 fraction: Iterable[str] = (), above_zero: Iterable[str] = (),
                 at_most: Mapping[str, float] | None = None, unbounded: Iterable[str] = ()) -> None:
    """A config's `__post_init__` calls this so a bad value fails when the config is made (a `--set`, a preset, a
    saved config.json), before any data loads or a run folder exists: `positive` fields (ints, or tuples of them)
    must be >= 1, `nonneg` ones >= 0, `fraction` ones in [0, 1], `above_zero` ones (floats: a learning rate, a
    temperature) > 0, and `at_most` caps a size whose absurd values would fill the memory before any output. Every
    float field (or tuple of floats) of the dataclass must be finite, NaN and inf included, except the `unbounded`
    ones: a NaN compares False with everything, so it used to pass every range check and poison the run later.
    The error names the field and the value."""
    skip = set(unbounded)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in skip:
            continue
        items = v if isinstance(v, (tuple, list)) else (v,)
        if any(isinstance(x, float) and not math.isfinite(x) for x in items):
            raise DreamlabError(f"{f.name}={_show(v)} must be a finite number (NaN and inf are not allowed)")
    for name in positive:
        v = getattr(cfg, name)
        if isinstance(v, (tuple, list)) and (not v or any(not x >= 1 for x in v)):
            raise DreamlabError(f"{name}={_show(v) or '(empty)'} must be one or more sizes, each at least 1")
        if not isinstance(v, (tuple, list)) and not v >= 1:
            raise DreamlabError(f"{name}={v} must be at least 1")
    for name in nonneg:
        if not getattr(cfg, name) >= 0:
            raise DreamlabError(f"{name}={getattr(cfg, name)} must be >= 0")
    for name in fraction:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise DreamlabError(f"{name}={getattr(cfg, name)} must be in [0, 1]")
    for name in above_zero:
        if not getattr(cfg, name) > 0:
            raise DreamlabError(f"{name}={getattr(cfg, name)} must be > 0")
    for name, cap in (at_most or {}).items():
        if getattr(cfg, name) > cap:
            raise DreamlabError(f"{name}={getattr(cfg, name)} is more than this setting allows (at most {cap:,})")


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def finite_float(flag: str, *, minimum: float | None = None, above: float | None = None) -> Callable[[str], float]:
    """An argparse `type` for a float flag: a finite number (NaN/inf refused, they pass `<`/`>` checks silently),
    optionally >= `minimum` or > `above`; argparse prints the message on one line."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {s!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{flag} {s} must be a finite number")
        if minimum is not None and v < minimum:
            raise argparse.ArgumentTypeError(f"{flag} {v} must be >= {minimum}")
        if above is not None and v <= above:
            raise argparse.ArgumentTypeError(f"{flag} {v} must be > {above}")
        return v

    return parse


def parse_names(spec: str, allowed: Iterable[str], what: str) -> list[str]:
    """"a, b" -> ["a", "b"], every name one of `allowed` (a config's comma-separated list of data sets or sources),
    or a one-line error naming the bad name and the choices."""
    allowed = list(allowed)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in names if s not in allowed]
    if bad or not names:
        raise DreamlabError(f"{what}s={spec!r}: unknown {what} {bad[0] if bad else '(none)'}; "
                            f"choose from {', '.join(allowed)}")
    return names


def parse_set_args(items: Iterable[str] | None) -> dict[str, str]:
    """Parse `--set key=value` items into a dict, with an error naming a malformed item."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise DreamlabError(f"--set {item!r} must look like key=value (e.g. --set lr=3e-4)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(cls: type[T], d: Mapping[str, Any], *, what: str = "config") -> T:
    """A config from a saved dict (config.json). Keys of options that were removed (the class's `REMOVED`: name ->
    the value that is now fixed behaviour) are dropped when they hold that value; any other value cannot be rebuilt."""
    removed: Mapping[str, Any] = getattr(cls, "REMOVED", {})
    for k, v in d.items():
        if k in removed and v != removed[k]:
            raise DreamlabError(f"{what}: {k}={v!r} was an experiment option that this version of dreamlab no longer "
                                "has (its results are in docs/experiments/); use the dreamlab release that wrote it")
    return apply_overrides(cls(), {k: v for k, v in d.items() if k not in removed}, what=what)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: Iterable[str] = ()) -> None:
    """cleanrl-style: every field of a typed dataclass becomes `--field-name`; help shows its default."""
    defaults = cls()
    for name, tp in field_types(cls).items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        base = _base_type(tp)
        kwargs: dict[str, Any] = {"dest": name, "default": default, "help": f"(default: {default})"}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = (lambda tp_, n: (lambda s: coerce(s, tp_, n)))(tp, name)
            if typing.get_origin(base) is typing.Literal:
                kwargs["choices"] = typing.get_args(base)
                kwargs["type"] = str
        parser.add_argument(flag, **kwargs)


def dataclass_from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    return cls(**{name: getattr(ns, name) for name in field_types(cls) if hasattr(ns, name)})
