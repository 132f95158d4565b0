"""The contract between the frontend that builds a graph and everything that reads it.

Passes, the lowering and the engines never parse node or weight names: what they need to know
about a graph beyond its dataflow is recorded here, by whoever builds the graph, as metadata.

- **Interface names**: the inputs an engine feeds and the outputs it reads (`input_ids`,
  `positions`, `logits`...).
- **Node meta** (`Node.meta`, printed by the text form, kept by every pass that rewrites a node):
  `layer` is the decoder layer a node computes for (absent outside the layer stack: embedding,
  final norm, LM head); `role` says what a linear projects (`q`, `k`, `v`, `gate`, `up`, ...,
  `head`), so shared-input fusions find their groups; a param's `stored` is how the checkpoint
  stores it, so `quantize{scheme=gguf}` can keep GGUF blocks as they are.
- **The KV cache** (`hir.meta["kv"]`): one `KVSlot` per layer and kind (k / v) with the graph
  input holding the cache so far (`past`, decode graphs) and the output holding it after the
  call (`present`, graphs built with `export_kv`). Engines pair a step's `present` with the next
  step's `past` by (layer, kind), the lowering turns them into in-place cache buffers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlx.hir.graph import HIR, Node

# ---- graph interface ----
INPUT_IDS = "input_ids"
POSITIONS = "positions"
INPUTS_EMBEDS = "inputs_embeds"
ATTN_MASK = "attn_mask"
MEDIA_ATTN_BIAS = "media_attn_bias"
LAST_TOKEN_SELECT = "last_token_select"  # the one-hot row a bucketed prefill picks its last token with
LOGITS = "logits"
HIDDEN = "hidden"

# ---- node meta ----
LAYER = "layer"
ROLE = "role"
STORED = "stored"  # a param's storage dtype in the checkpoint ("Q8_0", "F32", "bfloat16"...)
ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
HEAD = "head"  # the LM head linear

# ---- symbolic capacity of the engine-owned KV cache buffers (lowering and runtime agree on it) ----
KV_CAP = "KV_CAP"
# A sliding-window layer's cache whose every reader addresses keys by position modulo the buffer's
# capacity (the CPU flash kernel, `rlx/targets/kv_cache.py`) is a ring of KV_WINDOW_<W> rows:
# W + (the longest call's tokens) - 1 of them hold every key a query of a call can see, so a long
# sequence costs W rows on those layers, not its length.
KV_WINDOW = "KV_WINDOW_"


def window_capacity(window: int) -> str:
    """The capacity symbol of a ring cache read with window `window`."""
    return f"{KV_WINDOW}{window}"


def cache_capacities(symbols: Iterable[str], capacity: int, longest_call: int) -> dict[str, int]:
    """Each cache capacity symbol's rows when `capacity` positions are reserved and no call
    appends more than `longest_call` tokens: KV_CAP all of them, a ring at most its window's."""
    return {s: capacity if s == KV_CAP else min(capacity, int(s[len(KV_WINDOW):]) + longest_call - 1)
            for s in symbols if s == KV_CAP or s.startswith(KV_WINDOW)}
KV = "kv"
KV_KINDS = ("k", "v")


def layer_of(node: Node) -> int | None:
    """The decoder layer a node belongs to, or None (embedding, final norm, LM head)."""
    layer = node.meta.get(LAYER)
    return layer if isinstance(layer, int) and not isinstance(layer, bool) else None


def role_of(node: Node) -> str | None:
    return node.meta.get(ROLE)


@dataclass(frozen=True)
class KVSlot:
    """One layer's K or V cache as the graph exposes it (see the module docstring)."""

    layer: int
    kind: str             # "k" | "v"
    past: str | None      # input name: the cache before this call
    present: str | None   # output name: the cache after this call

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "past": self.past, "present": self.present}


def kv_slots(hir: HIR) -> tuple[KVSlot, ...]:
    """The graph's cache slots, in the order they were recorded."""
    return tuple(KVSlot(**s) for s in hir.meta.get(KV, ()))


def record_kv(hir: HIR, slots: Iterable[KVSlot]) -> None:
    """Set the graph's cache slots (the frontend does, once the graph is built)."""
    entries = [s.to_json() for s in slots if s.past is not None or s.present is not None]
    if entries:
        hir.meta[KV] = entries
    else:
        hir.meta.pop(KV, None)


def past_inputs(hir: HIR) -> dict[str, KVSlot]:
    """Cache inputs by input name."""
    return {s.past: s for s in kv_slots(hir) if s.past is not None}


def present_outputs(hir: HIR) -> dict[str, KVSlot]:
    """Cache outputs by output name."""
    return {s.present: s for s in kv_slots(hir) if s.present is not None}


# ---- the paged step graph (`GemmaFlow.paged`): the ragged tokens of many sequences, K/V in page pools ----
# Inputs besides `input_ids` / `positions` [1, SEQ]: which sequence each token belongs to, each
# sequence's pages, and which token's logits each sequence returns; `logits` is [1, SEQS, vocab]
# (symbols `SEQS`, `PAGES`: rlx.hir.shapes; the pools' PAGES is chosen when an engine allocates them).
TOKEN_SEQ = "token_seq"      # [SEQ] int32: the page-table row of each token
PAGE_TABLE = "page_table"    # [SEQS, max_pages] int32: page ids in position order
LOGIT_ROWS = "logit_rows"    # [SEQS] int32: per sequence, the token (index into SEQ) whose logits come out
PAGED = "paged"              # hir.meta key: page size, max pages and the pools (`PagedLayout`)


@dataclass(frozen=True)
class PagedPool:
    """One layer's K or V page pool [PAGES, kv_heads, page_size, head_dim]: the graph input the
    engine feeds its pool through, and the output holding the pool after this step's writes.
    Engines own the pool (the lowering updates it in place, like the contiguous cache buffers)."""

    layer: int
    kind: str    # "k" | "v"
    input: str   # k_pages.3
    output: str  # present_k_pages.3

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "input": self.input, "output": self.output}


@dataclass(frozen=True)
class PagedLayout:
    """What an engine needs to drive a paged step graph: the page size, the page table's width
    (positions a sequence may reach: page_size * max_pages) and the pools."""

    page_size: int
    max_pages: int
    pools: tuple[PagedPool, ...]

    @property
    def max_seq(self) -> int:
        return self.page_size * self.max_pages


def record_paged(hir: HIR, layout: PagedLayout) -> None:
    hir.meta[PAGED] = {"page_size": layout.page_size, "max_pages": layout.max_pages,
                       "pools": [p.to_json() for p in layout.pools]}


def paged_layout(hir: HIR) -> PagedLayout | None:
    """The graph's paged layout; None for a graph that is not a paged step."""
    meta = hir.meta.get(PAGED)
    if meta is None:
        return None
    return PagedLayout(meta["page_size"], meta["max_pages"], tuple(PagedPool(**p) for p in meta["pools"]))
