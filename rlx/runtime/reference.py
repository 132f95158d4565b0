"""The `reference` pseudo-target: prefill and decode HIR run by the numpy interpreter.

The graphs come built (`rlx.compiler.engines.reference_engine` makes them with the same
`target_graphs` as every other engine); this module only runs them. The KV cache is the
graphs' own: a step's `present` outputs become the next step's `past` inputs, paired by the
layer and kind the graph records (`rlx.hir.conventions.kv_slots`).
"""

from __future__ import annotations

import numpy as np

from rlx.errors import RunError
from rlx.hir import conventions as cv
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter, WeightSource
from rlx.hir.pass_manager import PassReport
from rlx.hir.quant import QuantizedArray
from rlx.hir.shapes import BATCH, PAST_SEQ, eval_shape
from rlx.runtime.buckets import DECODE, PREFILL, choose
from rlx.runtime.dispatch import BucketFamily, Dispatcher, Runner


class ReferenceEngine:
    name = "reference"

    def __init__(self, prefill: HIR, decode: HIR, weights: WeightSource, *, max_seq: int, vocab_size: int,
                 bucketed: BucketFamily | None = None, reports: dict[str, PassReport] | None = None) -> None:
        self.max_seq = max_seq
        self.vocab_size = vocab_size
        self.reports: dict[str, PassReport] = dict(reports or {})
        self._graphs = {PREFILL: prefill, DECODE: decode}
        quantized: dict[str, QuantizedArray] = {}  # one copy of each quantized weight for every graph
        self.weights, self.quantized = weights, quantized  # shared with a paged engine over the same model
        self._prefill, self._decode = Interpreter(prefill, weights, quantized), Interpreter(decode, weights, quantized)
        self._bucketed = (Dispatcher(bucketed, lambda g: Interpreter(g, weights, quantized))
                          if bucketed is not None else None)
        self._kv: dict[tuple[int, str], np.ndarray] = {}
        self._pos = 0

    def _run(self, mode: str, runner: Runner, ids: list[int]) -> np.ndarray:
        n = len(ids)
        graph = self._graphs[mode]
        feeds: dict[str, np.ndarray] = {
            cv.INPUT_IDS: np.asarray([ids], dtype=np.int64),
            cv.POSITIONS: np.arange(self._pos, self._pos + n, dtype=np.int64)[None, :],
        }
        feeds.update({name: self._past(graph, name, s) for name, s in cv.past_inputs(graph).items()})
        out = runner.run(feeds)
        self._kv = {(s.layer, s.kind): out[name] for name, s in cv.present_outputs(graph).items()}
        self._pos += n
        return out[cv.LOGITS][0, -1]

    def _past(self, graph: HIR, name: str, slot: cv.KVSlot) -> np.ndarray:
        """The cache so far; before the first call an empty one (the prefill appends to a past)."""
        if (slot.layer, slot.kind) in self._kv:
            return self._kv[slot.layer, slot.kind]
        t = graph.inputs[name].type
        return np.zeros(eval_shape(t.shape, {BATCH: 1, PAST_SEQ: 0}), t.dtype.numpy)

    def prefill(self, ids: list[int], capacity: int | None = None) -> np.ndarray:
        """`capacity` is unused: the reference cache is the HIR's own, grown by concatenation."""
        if not ids:
            raise RunError("empty prompt", hint="pass --prompt TEXT or --prompt-ids 2,818,...")
        self._kv, self._pos = {}, 0
        bucketed = self._bucketed is not None and choose(len(ids), self._bucketed.buckets) is not None
        # (the ignore below: `bucketed` implies self._bucketed is not None, which mypy cannot see)
        return self._run(PREFILL, self._bucketed if bucketed else self._prefill, ids)  # type: ignore[arg-type]

    def step(self, token: int) -> np.ndarray:
        if not self._kv:
            raise RunError("step() before prefill()", hint="call prefill(prompt) first")
        return self._run(DECODE, self._decode, [token])
