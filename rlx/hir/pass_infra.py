"""Pass infrastructure: `Pass`, `PassResult`, the registry and pipeline text.

A pass is a frozen dataclass with a `name` and option fields; `run(hir)` returns a new graph
(the input is never mutated) with what changed and counters. Pipelines are text,
`dce,fuse-attention,specialize{SEQ=128}`, so a profile, the CLI and a test can all name one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints

from rlx.errors import RlxError
from rlx.hir.graph import HIR


class PassError(RlxError):
    """A pass failed, or a pipeline names an unknown pass or option."""


@dataclass(frozen=True)
class Miss:
    """A place where a fusion pattern started to match and stopped: reported by assert_clean."""

    pattern: str
    node: str
    reason: str


@dataclass(frozen=True)
class PassResult:
    hir: HIR
    changed: bool
    stats: Mapping[str, int] = field(default_factory=dict)
    misses: tuple[Miss, ...] = ()


@dataclass(frozen=True)
class Pass:
    """Base class; subclasses set `name` and implement `run` on a copy of the graph."""

    name: ClassVar[str] = ""

    def run(self, hir: HIR) -> PassResult:
        raise NotImplementedError

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Pass:
        """The pass a pipeline's `name{key=value,...}` names: each key is a dataclass field, its
        text parsed by the field's annotation. A pass with another option syntax overrides this
        (`specialize{SEQ=128}` takes symbol bindings)."""
        hints = get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in fields:
                raise PassError(f"pass {cls.name!r} has no option {key!r}",
                                hint=f"options: {', '.join(sorted(fields)) or 'none'}")
            kwargs[key] = _parse_value(raw, hints.get(key), f"{cls.name}{{{key}}}")
        return cls(**kwargs)

    def __str__(self) -> str:
        opts = ",".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) != f.default)
        return self.name + (f"{{{opts}}}" if opts else "")


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "|".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return ";".join(f"{k}:{_fmt(v)}" for k, v in value.items())
    return str(value).lower() if isinstance(value, bool) else str(value)


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"pass {cls.__name__} needs a unique name (got {cls.name!r})")
    REGISTRY[cls.name] = cls
    return cls


_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def _parse_value(text: str, annotation: Any, where: str) -> Any:
    text = text.strip()
    try:
        if annotation is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation is str:
            return text
    except ValueError:
        raise PassError(f"{where}: {text!r} is not a {annotation.__name__}",
                        hint="check the option's type in the pass's documentation") from None
    return text  # composite options parse themselves from text (see the pass's __post_init__)


def make_pass(name: str, options: Mapping[str, str] | None = None) -> Pass:
    if name not in REGISTRY:
        raise PassError(f"unknown pass {name!r}", hint=f"known passes: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name].from_options(options or {})


def parse_pipeline(text: str) -> list[Pass]:
    """`dce,fuse-attention,specialize{SEQ=128}` -> pass instances (empty text -> no passes)."""
    out: list[Pass] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PassError(f"bad pipeline {text!r} at column {pos + 1}",
                            hint="write passes as name or name{key=value,...}, comma-separated")
        opts: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in (m.group(2) or "").split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise PassError(f"pass {m.group(1)!r}: option {item!r} needs key=value",
                                hint="write options as name{key=value,...}")
            opts[key.strip()] = value
        out.append(make_pass(m.group(1), opts))
        pos = m.end()
    return out


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(str(p) for p in passes)
