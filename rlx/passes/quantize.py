"""Quantized weights: retype the weights that linears and embeddings read to a block format.

`quantize{scheme=q4,group=32}` (schemes: `gguf`, `q8`, `q4`, `q4a`, `none`) gives each 2-D weight
param that a `linear` / `linear_epilogue` reads as its weight or an `embed` reads as its table a
quantized type (`rlx.hir.quant`): `f32[N, K]` becomes `q4_0[N, K]`. Nothing else changes: the
graph computes with the quantized values, which the interpreter gets as the weight source's
stored blocks or quantizes from float32, and a compiled module reads packed blocks in its kernels.

- **`gguf`**: every weight keeps the block type its GGUF file stores it in (the param's `stored`
  meta, `rlx.hir.conventions`): q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k. Float-stored
  tensors stay float; a block type rlx does not compute with is an error naming the tensor.
- **`q8` / `q4` / `q4a`**: rlx's group formats (`q8_0`, symmetric `q4_0`, asymmetric `q4_1`, each
  with one f16 scale per `group` values; byte-identical to GGUF's at group 32), computed from the
  float weights. A row length that is not a multiple of the group is an error naming the tensor
  and the `keep` glob that would leave it (and every weight like it) float.
- **Overrides**: `layers` gives one scheme per decoder layer (`[[layers]] quantize`; an empty
  entry, as in `q8||q4`, is an error naming its position), `embed` the embedding table's (a tied
  LM head is the same tensor), `head` an untied LM head's; for `embed` / `head`, "" means `scheme`.
  Layers come from the params' `layer` meta.
- **Per tensor** (by the param's stored name, `fnmatch` globs: `*` matches any characters, dots
  included): `keep` globs leave the weights they match float (reported "kept"), before any other
  choice; `tensors` (`glob:scheme` items, `[quantize.tensors]` in a profile) give the weights a
  glob matches that scheme, the first matching glob winning, over the layer / embed / head ones.
  A glob that matches no weight this pass would store in blocks is an error naming it (a typo
  would otherwise compile the model the user tried to avoid, silently).

It runs before fusion, so the projections `fuse-qkv` / `fuse-gate-up` concatenate are already
typed, and only weights of one format are fused. Weights derived at load time (`stored * scale +
shift`) are quantized from their float value under q8 / q4 / q4a; under gguf they have no stored
blocks and stay float. MoE expert weights (3-D) stay float.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from rlx.hir import conventions as cv
from rlx.hir.graph import HIR, Node, param_key
from rlx.hir.ops import OPS, Op
from rlx.hir.pass_infra import Pass, PassError, PassResult, register
from rlx.hir.quant import FORMATS, GGUF_FORMATS, GROUP_SIZES, GROUPS, QuantFormat, gguf_format_of

SCHEMES = ("none", "gguf", "q8", "q4", "q4a")
_GROUP_FAMILY = {"q8": "q8_0", "q4": "q4_0", "q4a": "q4_1"}
_ALTERNATIVES = "use --quantize q8 or q4 (quantized again from the dequantized values), or none"
GLOB_RESERVED = ",{}|:"  # pipeline text's separators (`quantize{keep=a|b,tensors=c:q8}`): no glob may hold one
KEPT = "kept"  # the reason a weight a `keep` glob matched is float (stats, report.json)


def scheme_format(scheme: str, group: int) -> QuantFormat | None:
    """The format a non-gguf scheme stores its weights in (None for `none`)."""
    family = _GROUP_FAMILY.get(scheme)
    return None if family is None else GROUPS[family].format(group)


def _check_scheme(value: str, where: str) -> None:
    if value not in SCHEMES:
        raise PassError(f"quantize: {where}={value!r} is not a scheme", hint=f"use one of {', '.join(SCHEMES)}")


def glob_problem(glob: str) -> str | None:
    """Why `glob` cannot be a `keep` / `tensors` glob, or None (the profile checks it too)."""
    if not glob.strip():
        return "a glob must not be empty"
    reserved = [repr(c) for c in GLOB_RESERVED if c in glob]
    return (f"the glob {glob!r} holds {' '.join(reserved)}, which the pass's text form uses as separators"
            if reserved else None)


GLOB_HINT = "write the glob without , { } | : (? matches one character, [...] one of a set, * any run, dots too)"


def _items(value: tuple[str, ...] | str) -> tuple[str, ...]:
    """A tuple option from pipeline text ("a|b"; "" is none) or as given."""
    if isinstance(value, str):
        return tuple(s.strip() for s in value.split("|")) if value.strip() else ()
    return tuple(value)


def _checked_glob(glob: str, key: str) -> str:
    problem = glob_problem(glob)
    if problem:
        raise PassError(f"quantize: {key}: {problem}", hint=GLOB_HINT)
    return glob


def matches(name: str, globs: Sequence[str]) -> str | None:
    """The first glob that matches a stored tensor name, or None."""
    return next((g for g in globs if fnmatch.fnmatchcase(name, g)), None)


@register
@dataclass(frozen=True)
class Quantize(Pass):
    name = "quantize"
    scheme: str = "q4"
    group: int = 32
    layers: tuple[str, ...] | str = ()   # from text: "q8|q4|none|..."
    embed: str = ""
    head: str = ""
    keep: tuple[str, ...] | str = ()     # globs of tensors left float; from text: "a|b"
    tensors: tuple[str, ...] | str = ()  # "glob:scheme" items, first match wins; from text: "a:q8|b:q4"

    def __post_init__(self) -> None:
        _check_scheme(self.scheme, "scheme")
        for key in ("embed", "head"):
            if getattr(self, key):
                _check_scheme(getattr(self, key), key)
        if self.group not in GROUP_SIZES:
            raise PassError(f"quantize: group={self.group} is not a supported group size",
                            hint=f"use one of {', '.join(map(str, GROUP_SIZES))}")
        text = self.layers if isinstance(self.layers, str) else None
        layers = tuple(s.strip() for s in (text.split("|") if text is not None else self.layers))
        if layers == ("",):  # `layers=` (empty text): no per-layer schemes
            layers = ()
        for i, s in enumerate(layers):
            if not s:  # dropping it would shift every later layer's scheme onto the layer before
                given = repr(text) if text is not None else "|".join(layers)
                raise PassError(f"quantize: layers={given} has an empty entry at position {i} of {len(layers)} "
                                f"(the scheme of layer {i})",
                                hint="give one scheme per layer, e.g. layers=q8|q4|none (none keeps a layer float)")
            _check_scheme(s, "layers")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "keep", tuple(_checked_glob(g, "keep") for g in _items(self.keep)))
        tensors = _items(self.tensors)
        for item in tensors:
            glob, sep, scheme = item.rpartition(":")
            if not sep:
                raise PassError(f"quantize: tensors item {item!r} is not GLOB:SCHEME",
                                hint="write tensors=GLOB:SCHEME|..., e.g. tensors=*.down_proj.weight:q8")
            _check_scheme(scheme, f"tensors[{_checked_glob(glob, 'tensors')}]")
        object.__setattr__(self, "tensors", tensors)

    @property
    def overrides(self) -> tuple[tuple[str, str], ...]:
        """`tensors` as (glob, scheme) pairs, in order."""
        return tuple((g, s) for g, _, s in (item.rpartition(":") for item in cast(tuple[str, ...], self.tensors)))

    def kept(self, param: Node) -> bool:
        return matches(param.attr("name"), cast(tuple[str, ...], self.keep)) is not None

    def scheme_of(self, param: Node, reader: str) -> str:
        """The scheme for a weight: its `tensors` glob's, else the embedding / head override, else its
        layer's, else `scheme`."""
        name = param.attr("name")
        tensor = next((s for g, s in self.overrides if fnmatch.fnmatchcase(name, g)), "")
        override = tensor or {"embed": self.embed, "head": self.head}.get(reader, "")
        if override:
            return override
        layer = cv.layer_of(param)
        if layer is not None and self.layers:
            if layer >= len(self.layers):
                raise PassError(f"quantize: the graph has a layer {layer}, but layers= gives {len(self.layers)} "
                                "schemes", hint="give one scheme per layer (Profile.layer_quantize does)")
            return cast(tuple[str, ...], self.layers)[layer]
        return self.scheme

    def format_for(self, param: Node, reader: str) -> QuantFormat | None:
        """The block format for a weight (None: float); `run` checks that its rows fit the groups."""
        if self.kept(param):
            return None
        scheme = self.scheme_of(param, reader)
        if scheme != "gguf":
            return scheme_format(scheme, self.group)
        if param_key(param)[1:] != (1.0, 0.0):
            return None  # derived at load time: no stored blocks to keep
        stored = str(param.meta.get(cv.STORED, ""))
        fmt = gguf_format_of(stored) if stored else None
        if fmt is None and stored and stored.upper() not in _FLOAT_STORAGE:
            raise PassError(f"quantize: tensor {param.attr('name')} is stored as {stored}, a GGUF block type rlx "
                            f"does not compute with (it does: {', '.join(f.upper() for f in GGUF_FORMATS)})",
                            hint=_ALTERNATIVES)
        return fmt

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        pairs = list(_weights(out))
        weights = [param for param, _ in pairs]
        self._check_globs(weights)
        chosen = [(param, reader, self.format_for(param, reader)) for param, reader in pairs]
        ungroupable = [(p, r, fmt) for p, r, fmt in chosen if fmt is not None and not _fits(p, fmt)]
        if ungroupable:
            raise self._ungroupable(ungroupable, weights)
        stats: dict[str, int] = {}
        for param, _, fmt in chosen:
            key = (KEPT if self.kept(param) else "kept-float") if fmt is None else f"format.{fmt.name}"
            stats[key] = stats.get(key, 0) + 1
            if fmt is not None:
                out.replace_node(Node(param.id, param.op, param.inputs, param.type.with_quant(fmt.name), param.attrs,
                                      dict(param.meta)))
        return PassResult(out, out != hir, stats)

    def _check_globs(self, weights: list[Node]) -> None:
        """Every keep / tensors glob must match a weight this pass would store in blocks."""
        names = [w.attr("name") for w in weights]
        for key, globs in (("keep", cast(tuple[str, ...], self.keep)), ("tensors", [g for g, _ in self.overrides])):
            for glob in (g for g in globs if matches_any(names, g) is None):
                kinds = sorted({_layer_glob(w) for w in weights})
                raise PassError(f"quantize: {key} glob {glob!r} matches no weight that a linear or an embedding "
                                "reads (the weights quantize stores in blocks)",
                                hint=f"match their stored names (`*` matches dots too): {', '.join(kinds)}")

    def _ungroupable(self, bad: list[tuple[Node, str, QuantFormat]], weights: list[Node]) -> PassError:
        """Weights whose rows are no multiple of their group: the error names the first, and its fix
        is a group size dividing all their rows, or the `keep` globs that leave them float: a layer
        wildcard where every weight it matches is one of them, else the name."""
        names = {p.attr("name") for p, _, _ in bad}
        globs = list(dict.fromkeys(
            wide if all(w.attr("name") in names for w in weights if fnmatch.fnmatchcase(w.attr("name"), wide))
            else p.attr("name") for p, _, _ in bad for wide in [_layer_glob(p)]))
        first, reader, fmt = bad[0]
        k = first.type.shape[-1]
        others = [p.attr("name") for p, _, _ in bad[1:]]
        also = "" if not others else f" (as do {', '.join(others[:3])}{' and more' if len(others) > 3 else ''})"
        rows = sorted({r for p, _, _ in bad if isinstance(r := p.type.shape[-1], int)})  # weights are static
        fitting = [str(g) for g in GROUP_SIZES if all(r % g == 0 for r in rows)]
        divides = " and ".join(map(str, rows))
        listed = ", ".join(f'"{g}"' for g in globs)
        keep = f"keep {'them' if others else 'it'} float: [quantize] keep = [{listed}]"
        return PassError(f"quantize: tensor {first.attr('name')} has rows of {k} values, not a multiple of "
                         f"{self.scheme_of(first, reader)}'s group of {fmt.block}{also}",
                         hint=f"use a group size dividing {divides} ([quantize] group = {' or '.join(fitting)}), "
                              f"or {keep}" if fitting else
                         f"no group size ({', '.join(map(str, GROUP_SIZES))}) divides {divides}: {keep}")


def matches_any(names: Sequence[str], glob: str) -> str | None:
    """The first name `glob` matches, or None."""
    return next((n for n in names if fnmatch.fnmatchcase(n, glob)), None)


def _fits(param: Node, fmt: QuantFormat) -> bool:
    k = param.type.shape[-1]
    return isinstance(k, int) and fmt.fits(k)


def _layer_glob(param: Node) -> str:
    """The param's name with its layer (`layer` meta) as `*`: `layers.3.x.weight` -> `layers.*.x.weight`,
    one glob for a kind of tensor."""
    name, layer = param.attr("name"), cv.layer_of(param)
    return name if layer is None else name.replace(f".{layer}.", ".*.", 1)


_FLOAT_STORAGE = frozenset({"F32", "F16", "BF16", "F64", "FLOAT32", "FLOAT16", "BFLOAT16", "FLOAT64"})


def _weights(hir: HIR) -> Iterator[tuple[Node, str]]:
    """Each 2-D float param read as a weight (by a linear) or a table (by an embed), once, with
    what reads it: "embed" (a tied head reads it too), "head" (the LM head: `role` head),
    "linear". A param that anything else reads too (another op, another input, a graph output)
    stays float: verify's `quantized` rule allows blocks only where they are read as blocks."""
    seen = set(hir.outputs.values())
    readers: list[tuple[Node, str]] = []
    for node in hir.nodes():
        blocks = frozenset() if node.op is Op.CONCAT else OPS[node.op].quantized_inputs
        seen.update(i for pos, i in enumerate(node.inputs) if pos not in blocks)
        for pos in blocks & set(range(len(node.inputs))):
            w = hir.node(node.inputs[pos])
            if w.op is not Op.PARAM or w.type.rank != 2 or w.type.is_quantized or not w.type.dtype.is_float:
                continue
            kind = "embed" if node.op is Op.EMBED else ("head" if cv.role_of(node) == cv.HEAD else "linear")
            readers.append((w, kind))
    for w, kind in sorted(readers, key=lambda r: r[1] != "embed"):  # an embedding's choice wins for a tied head
        if w.id not in seen:
            seen.add(w.id)
            yield w, kind


__all__ = ["FORMATS", "GLOB_RESERVED", "KEPT", "SCHEMES", "Quantize", "glob_problem", "matches", "scheme_format"]
