"""Shapes whose dims are ints or linear sums of named symbols (BATCH, SEQ, PAST_SEQ).

Symbols stay symbolic through the HIR so one graph serves every prompt length; a dim like
`PAST_SEQ+SEQ` (the key length of a decode step) is a `SymDim` with two terms.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BATCH = "BATCH"
SEQ = "SEQ"
PAST_SEQ = "PAST_SEQ"
# the paged KV cache (runtime/paged_model.py): pages in the pool, page-table rows (sequences), columns
PAGES = "PAGES"
SEQS = "SEQS"
MAX_PAGES = "MAX_PAGES"

_SYMBOL = re.compile(r"[A-Z_][A-Z0-9_]*")


@dataclass(frozen=True, order=True)
class SymDim:
    """`const + sum(coeff * symbol)`; terms sorted by symbol name so equal dims compare equal."""

    terms: tuple[tuple[str, int], ...]
    const: int = 0

    @staticmethod
    def of(name: str) -> SymDim:
        if not _SYMBOL.fullmatch(name):
            raise ValueError(f"bad symbol name {name!r}: use upper case, digits and _")
        return SymDim(((name, 1),))

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.terms)

    def __str__(self) -> str:
        parts = [name if c == 1 else f"{c}*{name}" for name, c in self.terms]
        if self.const or not parts:
            parts.append(str(self.const))
        return "+".join(parts)


Dim = int | SymDim
Shape = tuple[Dim, ...]


def sym(name: str) -> SymDim:
    return SymDim.of(name)


def add_dims(*dims: Dim) -> Dim:
    """Sum of dims, folded to an int when no symbol is left."""
    coeffs: dict[str, int] = {}
    const = 0
    for d in dims:
        if isinstance(d, int):
            const += d
            continue
        const += d.const
        for name, c in d.terms:
            coeffs[name] = coeffs.get(name, 0) + c
    terms = tuple(sorted((n, c) for n, c in coeffs.items() if c))
    return const if not terms else SymDim(terms, const)


def dim_symbols(shape: Iterable[Dim]) -> frozenset[str]:
    out: set[str] = set()
    for d in shape:
        if isinstance(d, SymDim):
            out |= d.symbols
    return frozenset(out)


def eval_dim(d: Dim, env: Mapping[str, int]) -> int:
    if isinstance(d, int):
        return d
    missing = d.symbols - env.keys()
    if missing:
        raise KeyError(f"unbound symbol(s) {sorted(missing)} in dim {d}")
    return d.const + sum(c * env[name] for name, c in d.terms)


def eval_shape(shape: Shape, env: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(eval_dim(d, env) for d in shape)


def substitute(d: Dim, env: Mapping[str, Dim]) -> Dim:
    """Replace bound symbols by dims (ints or other symbols); unbound ones stay."""
    if isinstance(d, int):
        return d
    parts: list[Dim] = [d.const]
    for name, c in d.terms:
        value = env.get(name, SymDim.of(name))
        parts.extend([value] * c if c > 0 else [])
    return add_dims(*parts)


def dim_numel(shape: Shape) -> Dim | None:
    """Static element count, or None when the shape has a symbol."""
    n = 1
    for d in shape:
        if not isinstance(d, int):
            return None
        n *= d
    return n


def format_dim(d: Dim) -> str:
    return str(d)


def parse_dim(text: str) -> Dim:
    parts: list[Dim] = []
    for term in text.replace(" ", "").split("+"):
        if term.lstrip("-").isdigit():
            parts.append(int(term))
            continue
        coeff, _, name = term.rpartition("*")
        base = SymDim.of(name)
        parts.extend([base] * (int(coeff) if coeff else 1))
    return add_dims(*parts)


def format_shape(shape: Shape) -> str:
    return "[" + ", ".join(format_dim(d) for d in shape) + "]"


def parse_shape(text: str) -> Shape:
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise ValueError(f"bad shape {text!r}: expected [d0, d1, ...]")
    inner = body[1:-1].strip()
    return tuple(parse_dim(p) for p in inner.split(",")) if inner else ()


def bind_shape(declared: Shape, actual: tuple[int, ...], env: dict[str, int], what: str) -> None:
    """Check `actual` against `declared`, binding single-symbol dims into `env`."""
    if len(declared) != len(actual):
        raise ValueError(f"{what}: expected rank {len(declared)} {format_shape(declared)}, got shape {actual}")
    for d, a in zip(declared, actual, strict=True):
        if isinstance(d, SymDim) and len(d.terms) == 1 and d.terms[0][1] == 1:
            name = d.terms[0][0]
            value = a - d.const
            if env.setdefault(name, value) != value:
                raise ValueError(f"{what}: {name}={value} conflicts with {name}={env[name]} bound earlier")
    for d, a in zip(declared, actual, strict=True):
        if (isinstance(d, int) or d.symbols <= env.keys()) and eval_dim(d, env) != a:
            raise ValueError(f"{what}: expected {format_shape(declared)}, got shape {actual}")
