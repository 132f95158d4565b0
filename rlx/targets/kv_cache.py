"""Where each layer's K/V lives in a compiled module: preallocated cache buffers written in place.

The HIR states the cache functionally: a decode graph takes `past_k.i` [B, H, PAST_SEQ, D] and
outputs `present_k.i = concat(past_k.i, k_new)`; a prefill graph outputs `present_k.i = k`. That
is what the reference interpreter runs, and what transformers computes. Lowered literally it
allocates and copies the whole cache every step (O(T) per token, O(T^2) per generation).

The lowering turns it into the calling convention a runtime wants: each `present_*` output gets
an engine-owned buffer `cache_k.i` [B, H, KV_CAP, D] (KV_CAP: the capacity the engine allocated)
that the function writes the new rows into in place, at offset PAST_SEQ (`kernels.kv_write`, a
`call_tir_inplace`); the `past_*` inputs disappear, and PAST_SEQ arrives as a shape argument.
Readers of the concatenated K/V get a `CacheView`: the buffer plus its valid length
PAST_SEQ + SEQ. The fused attention reads the view directly (its reduction stops at the valid
length); any other reader (an unfused graph's transpose / matmul) gets a materialized prefix.

Ring caches (`plan(hir, modular)`, CPU): when every reader of a cache is sliding-window attention
that the flash kernel runs (`lowerings.flash_lowered`), the buffer is a ring of `KV_WINDOW_<W>` rows (position p
in row p % capacity: `kernels.kv_write` and the flash kernel both address modulo the buffer's
rows). A call's queries see keys down to their first position - W + 1 and it writes its own
tokens after the past, so W + (its tokens) - 1 rows never overwrite a key still visible: the
engine sizes them from the longest call it makes (`cv.cache_capacities`; prefill runs a long
prompt in chunks). Five of Gemma 3's six layers are sliding, so an 8000-token prompt keeps
8000 rows on one layer in six. With capacity >= every position the modulo is the identity, which
is what the full layers' buffers and the materialising readers (GPU) get.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rlx.errors import HIRError
from rlx.hir import conventions as cv
from rlx.hir.conventions import KV_CAP
from rlx.hir.graph import HIR, Node
from rlx.hir.ops import Op
from rlx.hir.shapes import Dim, sym
from rlx.hir.tensor_type import TensorType

CACHE = "cache_"  # buffer names: cache_k.3 for the output present_k.3


@dataclass(frozen=True)
class CacheSlot:
    """One exported K or V: the graph output, the buffer that replaces it, what gets written."""

    output: str             # present_k.3
    layer: int
    kind: str               # "k" | "v"
    node: str               # the node whose value the output is (the concat, or the new K/V itself)
    new: str                # the node holding the rows this call appends
    offset: Dim             # where they go: the replaced past input's length, or 0
    past_input: str | None  # past_k.3, the graph input the buffer replaces (None in a prefill)
    type: TensorType        # the buffer: [B, H, KV_CAP, D]

    @property
    def cache(self) -> str:
        return f"{CACHE}{self.kind}.{self.layer}"


def ring_window(hir: HIR, node_id: str, modular: Callable[[Node], bool]) -> int:
    """The window a ring cache for the K/V at `node_id` must cover: the largest window of its
    readers when every one reads keys modulo the buffer (`modular`) with a sliding window, else
    0 (the buffer keeps every position)."""
    readers = hir.users(node_id)
    ok = readers and all(modular(r) and r.attr("window") for r in readers)
    return max(int(r.attr("window")) for r in readers) if ok else 0


def plan(hir: HIR, modular: Callable[[Node], bool] | None = None) -> tuple[CacheSlot, ...]:
    """The cache slots of a graph, in output order; raises on a cache shape the convention
    cannot express (a past input read by something other than its concat). `modular`: which
    readers the target lowers to address keys modulo the buffer's rows (its flash kernel); a
    sliding-window cache only they read becomes a ring. None: no ring."""
    slots = []
    caches = cv.present_outputs(hir)
    for output, nid in hir.outputs.items():
        if output not in caches:
            continue
        node = hir.node(nid)
        b, h, _, d = node.type.shape
        offset: Dim
        past, new, offset = None, nid, 0
        first = hir.node(node.inputs[0]) if node.inputs else None
        if node.op is Op.CONCAT and first is not None and first.op is Op.INPUT:
            if node.attr("axis") % node.type.rank != 2:
                raise HIRError(f"%{nid}: a KV cache concat must be along the sequence axis 2",
                               hint="build the cache with GemmaFlow (export_kv)")
            past, new, offset = first.attr("name"), node.inputs[1], first.type.shape[2]
            readers = [n.id for n in hir.users(first.id)]
            if readers != [nid]:
                raise HIRError(f"KV cache input {past!r} is read by {readers}, not only by its concat %{nid}",
                               hint="read the cache only through its concat (GemmaFlow builds it so)")
        window = ring_window(hir, nid, modular) if modular is not None and past is not None else 0
        capacity = sym(cv.window_capacity(window) if window else KV_CAP)
        slots.append(CacheSlot(output, caches[output].layer, caches[output].kind, nid, new, offset, past,
                               TensorType(node.type.dtype, (b, h, capacity, d))))
    return tuple(slots)
