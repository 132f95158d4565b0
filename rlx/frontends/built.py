"""A built model: a graph with the weights it reads (the crate's `BuiltModel`).

`GemmaFlow.build` in `rlx.gemma` returns one, so a user holds everything a graph needs to run
without looking each param up in a `WeightStore` by name. The weights are a lazy view: a tensor
is read (and kept) when first asked for, so building a model costs no weight reads, and the
numbers come from the same source the reference engine uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from rlx.errors import WeightError
from rlx.frontends.weights import WeightCache, WeightStore
from rlx.hir.graph import HIR, param_key
from rlx.hir.interpreter import Interpreter, WeightSource
from rlx.hir.ops import Op
from rlx.hir.pass_manager import PassReport
from rlx.hir.quant import QuantFormat
from rlx.hir.verify import verify

Weights = WeightStore | Mapping[str, np.ndarray] | Callable[[str], np.ndarray]
"""What a model's weights may come from: a checkpoint's store, arrays by name, or a loader."""


def weight_source(weights: Weights) -> WeightSource:
    """A store becomes a `WeightCache` (each tensor read once, a GGUF's blocks kept as stored)."""
    if not isinstance(weights, WeightStore | Mapping) and not callable(weights):
        raise WeightError(f"weights must be a WeightStore, a mapping of arrays or a loader, got "
                          f"{type(weights).__name__}", hint="pass checkpoint.weights (rlx.gemma.open_checkpoint(path))")
    return WeightCache(weights) if isinstance(weights, WeightStore) else weights


def weight_shapes(weights: Weights) -> WeightStore | Callable[[str], tuple[int, ...]] | None:
    """What `GemmaFlow` checks param shapes against: a store itself, an array's shape; nothing for
    a loader (asking it would read the tensor)."""
    if isinstance(weights, WeightStore):
        return weights
    if isinstance(weights, Mapping):
        def shape(name: str) -> tuple[int, ...]:
            if name not in weights:
                raise WeightError(f"missing tensor {name} in the weights given to build()",
                                  hint="pass every tensor the graph reads (canonical names, e.g. layers.0.mlp...)")
            return tuple(np.shape(weights[name]))
        return shape
    return None


class GraphWeights(Mapping[str, np.ndarray]):
    """The stored tensors one graph reads, by name, as float32 arrays read on first access."""

    def __init__(self, names: Iterable[str], source: WeightSource) -> None:
        self._names = tuple(sorted(set(names)))
        self._source = source
        self._loaded: dict[str, np.ndarray] = {}

    @classmethod
    def of(cls, hir: HIR, source: WeightSource) -> GraphWeights:
        return cls((param_key(n)[0] for n in hir.nodes_of(Op.PARAM)), source)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._loaded:
            src = self._source
            self._loaded[name] = np.ascontiguousarray(src(name) if callable(src) else src[name], dtype=np.float32)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def packed(self, name: str, fmt: QuantFormat) -> np.ndarray | None:
        """A tensor's blocks as stored, when the source keeps it in `fmt` (see `WeightSource`)."""
        packed = getattr(self._source, "packed", None)
        return packed(name, fmt) if packed is not None else None

    def __repr__(self) -> str:
        return f"GraphWeights({len(self._names)} tensors, {len(self._loaded)} loaded)"


@dataclass(frozen=True)
class BuiltModel:
    """A graph and the weights it reads; `report` is what the profile's passes did (None: as built)."""

    hir: HIR
    weights: GraphWeights
    report: PassReport | None = field(default=None, compare=False)

    def into_parts(self) -> tuple[HIR, dict[str, np.ndarray]]:
        """(graph, {stored name: float32 array}), every weight read: the crate's `into_parts`."""
        return self.hir, dict(self.weights)

    def with_extra_outputs(self, outputs: Mapping[str, str] | Iterable[tuple[str, str]]) -> BuiltModel:
        """A copy whose graph also outputs these nodes (output name -> node id)."""
        hir = self.hir.copy()
        for name, node_id in dict(outputs).items():
            hir.set_output(name, node_id)
        return BuiltModel(verify(hir), self.weights, self.report)

    @cached_property
    def _interpreter(self) -> Interpreter:
        return Interpreter(self.hir, self.weights)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph with the reference interpreter on its own weights: outputs by name."""
        return self._interpreter.run(feeds)


__all__ = ["BuiltModel", "GraphWeights", "Weights", "weight_shapes", "weight_source"]
