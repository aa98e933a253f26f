"""The base of every config dataclass (student, teacher, split, engine): a JSON round trip (`to_dict` /
`from_dict`, so a checkpoint carries the config that rebuilds it) and CLI flags from the fields
(`add_arguments` / `from_args`).

    @dataclass(frozen=True)
    class MyConfig(_Config):
        size: int = 8  # --size
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Self, get_args


class _Config:
    """JSON round-trip and CLI flags, shared by the config dataclasses below."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def add_arguments(
        cls, parser: argparse.ArgumentParser, prefix: str = "", skip: Sequence[str] = (), **defaults: Any
    ) -> None:
        """Add one `--{prefix}{field}` flag per field but `skip` (fields the data sets: `from_args` takes
        them as overrides, so no flag is offered and then ignored); `defaults` override the dataclass
        defaults."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = "--" + (prefix + f.name).replace("_", "-")
            default = defaults.get(f.name, f.default)
            required = default is dataclasses.MISSING
            kwargs: dict[str, Any] = {"dest": prefix + f.name, "required": required}
            if not required:
                kwargs["default"] = default
            hint = hints[f.name]
            if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: a flag of type X
                hint = next(a for a in get_args(hint) if a is not type(None))
            if typing.get_origin(hint) is Literal:
                parser.add_argument(flag, choices=get_args(hint), **kwargs)
            elif hint is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            else:
                parser.add_argument(flag, type=hint, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace, prefix: str = "", **override: Any) -> Self:
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in override]
        return cls(**{name: getattr(args, prefix + name) for name in fields}, **override)


def at_least(cfg: object, low: float, *names: str, strictly: bool = False) -> None:
    """ValueError naming the first field of `names` below `low` (strictly: not above it), or not a finite
    number (NaN passes every comparison, and no setting here means anything at infinity)."""
    for name in names:
        value = getattr(cfg, name)
        op = ">" if strictly else ">="
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number {op} {low}, got {value!r}")
        if value < low or (strictly and value == low):
            raise ValueError(f"{name} must be {op} {low}, got {value}")
