"""Reading a `gemma.rlx.toml` into a `Profile`, and finding the one that applies to a checkpoint.

Strict on purpose: a profile that silently ignored a misspelt key would compile a different model
than the one asked for, so every unknown section or key, wrong type and bad value is a
`ProfileError` naming the file, the line and the key. tomllib reports no positions, so `_Locator`
finds the line by scanning the text for the table header and the key.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlx.compiler.profile import (
    BUCKETED,
    DEFAULT_PROFILE,
    PRESETS,
    BackendOptions,
    BadValue,
    Check,
    FusionOptions,
    LayerPatch,
    PassOptions,
    PrecisionOptions,
    Profile,
    QuantizeOptions,
    dim_buckets,
    toml_keys,
)
from rlx.errors import ProfileError
from rlx.passes.specialize import SYMBOLS
from rlx.targets.presets import PRESETS as TARGET_PRESETS

PROFILE_FILE = "gemma.rlx.toml"

# ---- locating keys in the source text ----

_BARE_OR_QUOTED = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = re.compile(rf"\s*{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*\s*")
_PART = re.compile(rf"\s*({_BARE_OR_QUOTED})\s*(?:\.|$)")
_HEADER = re.compile(r"^\s*(\[\[?)([^\[\]]+)\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(rf"^(\s*{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*\s*)=")

KeyPath = tuple[str | int, ...]  # ("fusion", "policy"), ("layers", 2, "window"): ints index [[arrays]]


def _dotted(text: str) -> tuple[str, ...] | None:
    if not _DOTTED.fullmatch(text):
        return None
    return tuple(p.strip("\"'") for p in _PART.findall(text))


class _Locator:
    """First line of each table header and key, by key path (a TOML-aware scan, not a parser)."""

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        counts: dict[tuple[str, ...], int] = {}
        table: KeyPath = ()
        closing: str | None = None  # inside a multi-line string ending with this
        for n, line in enumerate(text.splitlines(), start=1):
            if closing is not None:
                closing = None if closing in line else closing
                continue
            header, assign = _HEADER.match(line), _ASSIGN.match(line)
            name = _dotted(header[2]) if header else None
            if header is not None and name is not None:
                if header[1] == "[[":
                    counts[name] = counts.get(name, -1) + 1
                table = (*name, counts[name]) if header[1] == "[[" else name
                self._mark(table, n)
            elif assign and (key := _dotted(assign[1])) is not None:
                self._mark((*table, *key), n)
                rest = line[assign.end():]
                closing = next((q for q in ('"""', "'''") if rest.count(q) % 2), None)

    def _mark(self, path: KeyPath, line: int) -> None:
        for depth in range(1, len(path) + 1):
            self.lines.setdefault(path[:depth], line)

    def line(self, path: KeyPath) -> int:
        """The key's line, else its nearest enclosing table's (inline tables, dotted keys), else 1."""
        return next((self.lines[path[:d]] for d in range(len(path), 0, -1) if path[:d] in self.lines), 1)


def _label(table: KeyPath) -> str:
    if not table:
        return "top level"
    if isinstance(table[-1], int):
        return f"[[{'.'.join(map(str, table[:-1]))}]] #{table[-1] + 1}"
    return f"[{'.'.join(map(str, table))}]"


# ---- parsing ----

class _Parser:
    def __init__(self, text: str, path: str) -> None:
        self.path, self.locator = path, _Locator(text)

    def error(self, key_path: KeyPath, message: str, hint: str | None = None) -> ProfileError:
        line = self.locator.line(key_path)
        key = key_path[-1] if key_path and isinstance(key_path[-1], str) else None
        where = f"{_label(key_path[:-1])} key {key!r}" if key is not None else _label(key_path)
        fallback = (f"change {key!r} as the message says, or delete it for the default" if key is not None
                    else "the README's Profiles section lists every section and key")
        return ProfileError(f"{self.path}:{line}: {where}: {message}", hint=hint or fallback)

    def table(self, value: Any, path: KeyPath) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"must be a table, got {value!r}")
        return value

    def check(self, check: Check, value: Any, path: KeyPath) -> Any:
        try:
            return check(value)
        except BadValue as e:
            raise self.error(path if e.key is None else (*path, e.key), e.message, e.hint) from None

    def keys(self, cls: type, value: Any, path: KeyPath) -> dict[str, Any]:
        known = toml_keys(cls)
        out: dict[str, Any] = {}
        for key, v in self.table(value, path).items():
            if key not in known:
                raise self.error((*path, key), "unknown key", hint=f"{_label(path)} keys: {', '.join(known)}")
            out[key] = self.check(known[key], v, (*path, key))
        return out

    def options(self, cls: type, value: Any, path: KeyPath) -> Any:
        return cls(**self.keys(cls, value, path))

    def backend(self, value: Any, path: KeyPath) -> tuple[tuple[str, BackendOptions], ...]:
        out = {}
        for target, opts in self.table(value, path).items():
            if target not in TARGET_PRESETS:
                raise self.error((*path, target), "unknown target", hint=f"targets: {', '.join(TARGET_PRESETS)}")
            out[target] = self.options(BackendOptions, opts, (*path, target))
        return tuple(sorted(out.items()))

    def specialize(self, value: Any, path: KeyPath) -> tuple[tuple[str, tuple[int, ...]], ...]:
        out = {}
        for dim, v in self.table(value, path).items():
            if dim not in SYMBOLS:
                raise self.error((*path, dim), "unknown dim", hint=f"dims: {', '.join(SYMBOLS)}")
            out[dim] = self.check(dim_buckets, v, (*path, dim))
            if len(out[dim]) > 1 and dim not in BUCKETED:
                raise self.error((*path, dim), f"only {', '.join(BUCKETED)} can have buckets",
                                 hint=f"bind {dim} to one size, e.g. {dim} = {out[dim][-1]}")
        return tuple(sorted(out.items()))

    def layers(self, value: Any, path: KeyPath) -> tuple[LayerPatch, ...]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(path, "must be an array of tables: write each patch under its own [[layers]]")
        return tuple(self.layer_patch(v, (*path, k)) for k, v in enumerate(value))

    def layer_patch(self, value: dict[str, Any], path: KeyPath) -> LayerPatch:
        values = self.keys(LayerPatch, value, path)
        problem = LayerPatch.problem(values)
        if problem:
            raise self.error((*path, problem[0]), problem[1])
        patch = LayerPatch(**values)
        line = self.locator.line((*path, patch.checked_key))
        return dataclasses.replace(patch, where=f"{self.path}:{line}: {_label(path)}")

    def profile(self, data: dict[str, Any]) -> Profile:
        kwargs = {}
        for name, value in data.items():
            if name not in _SECTIONS:
                raise self.error((name,), f"unknown section [{name}]", hint=f"sections: {', '.join(_SECTIONS)}")
            kwargs[name] = _SECTIONS[name](self, value, (name,))
        return Profile(**kwargs, source=self.path)


_SECTIONS: dict[str, Callable[[_Parser, Any, KeyPath], Any]] = {  # section name == Profile field
    "fusion": lambda p, v, path: p.options(FusionOptions, v, path),
    "passes": lambda p, v, path: p.options(PassOptions, v, path),
    "precision": lambda p, v, path: p.options(PrecisionOptions, v, path),
    "quantize": lambda p, v, path: p.options(QuantizeOptions, v, path),
    "backend": _Parser.backend,
    "specialize": _Parser.specialize,
    "layers": _Parser.layers,
}


def parse_profile(text: str, path: str | Path = "<string>") -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML: {e}", hint="see https://toml.io for the syntax") from None
    return _Parser(text, str(path)).profile(data)


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"profile {path} not found", hint=f"give a {PROFILE_FILE} file or a preset name "
                                                             f"({', '.join(PRESETS)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read profile {path}: {e}",
                           hint="check the path and that the file is UTF-8 text") from None
    return parse_profile(text, path)


def profile_path_near(weights: str | Path) -> Path:
    """`gemma.rlx.toml` inside an HF directory, or next to a GGUF (or any weight) file."""
    weights = Path(weights)
    return (weights if weights.is_dir() else weights.parent) / PROFILE_FILE


def profile_near(weights: str | Path) -> Profile:
    """The profile next to the weights if there is one, else DEFAULT_PROFILE."""
    candidate = profile_path_near(weights)
    return load_profile(candidate) if candidate.is_file() else DEFAULT_PROFILE


def resolve_profile(choice: str | Path | Profile | None, weights: str | Path, quantize: str | None = None) -> Profile:
    """What `--profile` means: a Profile, a preset name or a file; None: `profile_near(weights)`.
    `quantize` (`--quantize SCHEME`) replaces its [quantize] scheme."""
    if isinstance(choice, Profile):
        profile = choice
    elif choice is None:
        profile = profile_near(weights)
    else:
        profile = PRESETS[str(choice)] if str(choice) in PRESETS else load_profile(choice)
    return profile if quantize is None else profile.with_quantize(quantize)
