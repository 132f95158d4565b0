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
  float weights. A row length that is not a multiple of the group is an error naming the tensor.
- **Overrides**: `layers` gives one scheme per decoder layer (`[[layers]] quantize`; an empty
  entry, as in `q8||q4`, is an error naming its position), `embed` the embedding table's (a tied
  LM head is the same tensor), `head` an untied LM head's; for `embed` / `head`, "" means `scheme`.
  Layers come from the params' `layer` meta.

It runs before fusion, so the projections `fuse-qkv` / `fuse-gate-up` concatenate are already
typed, and only weights of one format are fused. Weights derived at load time (`stored * scale +
shift`) are quantized from their float value under q8 / q4 / q4a; under gguf they have no stored
blocks and stay float. MoE expert weights (3-D) stay float.
"""

from __future__ import annotations

from collections.abc import Iterator
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


def scheme_format(scheme: str, group: int) -> QuantFormat | None:
    """The format a non-gguf scheme stores its weights in (None for `none`)."""
    family = _GROUP_FAMILY.get(scheme)
    return None if family is None else GROUPS[family].format(group)


def _check_scheme(value: str, where: str) -> None:
    if value not in SCHEMES:
        raise PassError(f"quantize: {where}={value!r} is not a scheme", hint=f"use one of {', '.join(SCHEMES)}")


@register
@dataclass(frozen=True)
class Quantize(Pass):
    name = "quantize"
    scheme: str = "q4"
    group: int = 32
    layers: tuple[str, ...] | str = ()   # from text: "q8|q4|none|..."
    embed: str = ""
    head: str = ""

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

    def scheme_of(self, param: Node, reader: str) -> str:
        """The scheme for a weight: the embedding / head override, else its layer's, else `scheme`."""
        override = {"embed": self.embed, "head": self.head}.get(reader, "")
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
        scheme = self.scheme_of(param, reader)
        name = param.attr("name")
        if scheme == "gguf":
            if param_key(param)[1:] != (1.0, 0.0):
                return None  # derived at load time: no stored blocks to keep
            stored = str(param.meta.get(cv.STORED, ""))
            fmt = gguf_format_of(stored) if stored else None
            if fmt is None and stored and stored.upper() not in _FLOAT_STORAGE:
                raise PassError(f"quantize: tensor {name} is stored as {stored}, a GGUF block type rlx does not "
                                f"compute with (it does: {', '.join(f.upper() for f in GGUF_FORMATS)})",
                                hint=_ALTERNATIVES)
            return fmt
        fmt = scheme_format(scheme, self.group)
        k = param.type.shape[-1]
        if fmt is not None and not (isinstance(k, int) and fmt.fits(k)):
            layer = cv.layer_of(param)
            keep = "keep it float: " + (f'[quantize] {reader} = "none"' if reader in ("embed", "head") else
                                        '[[layers]] quantize = "none" for '
                                        + ("its layer" if layer is None else f"layer {layer}"))
            fitting = [str(g) for g in GROUP_SIZES if isinstance(k, int) and k % g == 0]
            raise PassError(f"quantize: tensor {name} has rows of {k} values, not a multiple of {scheme}'s "
                            f"group of {fmt.block}",
                            hint=f"use a group size dividing {k} ([quantize] group = {' or '.join(fitting)}), or {keep}"
                            if fitting else f"no group size ({', '.join(map(str, GROUP_SIZES))}) divides {k}: {keep}")
        return fmt

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        stats: dict[str, int] = {}
        for param, reader in _weights(out):
            fmt = self.format_for(param, reader)
            if fmt is None:
                stats["kept-float"] = stats.get("kept-float", 0) + 1
                continue
            out.replace_node(Node(param.id, param.op, param.inputs, param.type.with_quant(fmt.name), param.attrs,
                                  dict(param.meta)))
            stats[f"format.{fmt.name}"] = stats.get(f"format.{fmt.name}", 0) + 1
        return PassResult(out, out != hir, stats)


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


__all__ = ["FORMATS", "SCHEMES", "Quantize", "scheme_format"]
