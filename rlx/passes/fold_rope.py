"""Fold RoPE's cos / sin into a constant table: `rope(x, pos, const inv_freq)` -> `rope_table(x, pos, table)`.

Why: `rope` computes `cos(p f)` and `sin(p f)` for every element of every q and k (two nodes per
layer), although they depend only on the position and the layer type's `inv_freq`. With a bound
on the positions a graph can see, they are a constant: the table is computed once at compile
time and each rope gathers its token's row.

- **Layout.** `table [P, head_dim]` float32, row p = `cos(p f) | sin(p f)` (f the head_dim/2
  frequencies): a rope reads `cos = table[p, d mod D/2]`, `sin = table[p, D/2 + d mod D/2]`, one
  contiguous row per token. Nothing is stored twice (transformers' `cat(freqs, freqs)` repeats
  each half; we index it instead).
- **Numerics.** `interpreter.rope_cos_sin_table` computes it with the very float32 operations `rope` uses
  (`float32(p) * inv_freq`, one rounding, then float32 cos / sin, as transformers' rotary
  embedding does), so under the interpreter folding changes no bit. Against torch's float32
  cos / sin the table differs by at most 1 ulp (|diff| <= 6e-8 measured on 4096 x 128 entries),
  the difference `rope` already had; compiled code gathers these numpy values instead of calling
  LLVM's cos / sin, so it moves closer to the reference, not away.
- **Position bound.** Keys sit at positions 0..T-1 with T = past length (`past_k.i` / `past_v.i`
  axis 2; 0 without a past) + new tokens (the positions' axis 1), so P = T when T is static,
  else T with `hir.meta["bounds"]` substituted (specialization records them; a bucketed variant
  uses its own static T). With no bound (a symbolic graph, e.g. the dynamic prefill / decode pair
  the engines build today) the rope stays and is counted in `skipped.no-position-bound`. It is a
  precondition not met, not a pattern that broke half-way, so it is no `Miss` (`assert_clean`
  must keep accepting dynamic graphs).
- **Size trade-off.** A table is `4 * P * head_dim` bytes, held three times while compiling (the
  const's values as Python floats, ~8x the float32 bytes; the HIR text dump, ~5x; the Relax
  constant each lowered function embeds), and the text dump takes seconds for a 4096 x 256
  table. Gemma 3 (head_dim 256) at `--max-seq 4096`: 4 MB per table, two tables (sliding and
  full RoPE); at the compile default (no `--max-seq`: the model's context, 32768 for 270M)
  32 MB each, 128 MB over prefill + decode,
  to save a few transcendental ops per q / k element. So a table over `max_elements` values
  (default 2^20: P <= 4096 at head_dim 256, 8192 at 128) is not built and its ropes count in
  `skipped.too-large`; raise it with `fold-rope{max_elements=N}` where memory allows. (A decode
  graph bounded by PAST_SEQ = N needs N + 1 rows: bound PAST_SEQ by max_seq - 1.)
- **Sharing.** One table per distinct (inv_freq values, P): every layer of a RoPE type (q and k)
  reads the same const node, so Gemma 3 gets exactly two tables (`tables` counts them).

The interpreter raises on a position outside the table (a broken contract); the compiled kernel
clamps the row index so such a position cannot read out of bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlx.hir import conventions as cv
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.interpreter import rope_cos_sin_table
from rlx.hir.ops import Op
from rlx.hir.pass_infra import Pass, PassResult, register
from rlx.hir.patterns import remove_dead
from rlx.hir.shapes import Dim, add_dims, substitute
from rlx.hir.tensor_type import TensorType
from rlx.passes.specialize import upper_bounds

MAX_TABLE_ELEMENTS = 1 << 20


def key_length(hir: HIR, positions: str) -> Dim | None:
    """T, the number of positions keys sit at: past length + new tokens (None when the past
    inputs disagree on their length: then there is no one bound to trust). In a paged step graph
    a token may sit at any position its page table reaches: page_size * max_pages."""
    layout = cv.paged_layout(hir)
    if layout is not None:
        return layout.max_seq
    cache_inputs = cv.past_inputs(hir)  # [B, kv_heads, PAST, head_dim] each
    pasts = {n.type.shape[2] for name, n in hir.inputs.items() if name in cache_inputs}
    if len(pasts) > 1:
        return None
    return add_dims(*pasts, hir.node(positions).type.shape[1])


def position_count(hir: HIR, positions: str) -> int | None:
    """How many positions a rope over `positions` may see: T, or its bound; None when unbounded."""
    t = key_length(hir, positions)
    bounded = None if t is None else substitute(t, upper_bounds(hir))
    return bounded if isinstance(bounded, int) else None


@register
@dataclass(frozen=True)
class FoldRope(Pass):
    name = "fold-rope"
    max_elements: int = MAX_TABLE_ELEMENTS  # largest table (P * head_dim values) worth its memory

    def run(self, hir: HIR) -> PassResult:
        out = hir.copy()
        stats = {"rope-table": 0, "tables": 0, "skipped.no-position-bound": 0, "skipped.too-large": 0}
        tables: dict[tuple[tuple[float, ...], int], str] = {}
        for stale in out.nodes_of(Op.ROPE):
            node = out.node(stale.id)  # its x may be a rope this loop already replaced
            x, pos, inv = node.inputs
            freqs = out.node(inv)
            if freqs.op is not Op.CONST:
                continue  # a computed inv_freq is not ours to fold
            count = position_count(out, pos)
            if count is None:
                stats["skipped.no-position-bound"] += 1
                continue
            inv_freq: tuple[float, ...] = freqs.attr("value")
            if count * 2 * len(inv_freq) > self.max_elements:
                stats["skipped.too-large"] += 1
                continue
            if (inv_freq, count) not in tables:
                values = rope_cos_sin_table(np.asarray(inv_freq, np.float32), count)
                tables[inv_freq, count] = out.add(Op.CONST, attrs={"value": tuple(values.reshape(-1).tolist())},
                                                  type=TensorType(DType.F32, values.shape), name=f"{inv}.table")
            folded = out.add(Op.ROPE_TABLE, [x, pos, tables[inv_freq, count]], name=node.id + ".folded")
            out.replace_uses(node.id, folded)
            remove_dead(out, [node.id])
            stats["rope-table"] += 1
        stats["tables"] = len(tables)
        return PassResult(out, stats["rope-table"] > 0, stats)
