"""GemmaFlow: the model recipe as a builder, lowered to HIR.

The surface follows the original `rlx-gemma` crate: pick prefill or decode, static or symbolic
batch / seq / past, what to output (LM head, hidden state, last-token logits), whether to export
the KV cache, custom masks, per-layer stages and overrides, stages before/after the layer stack,
and a patch hook over the finished graph. One builder covers Gemma 1-4; what differs between
generations is read from `GemmaConfig` (norm offset, block shape, q/k/v norms, RoPE tables,
per-layer head dims, Gemma 4 per-layer embeddings and KV sharing), never from an if-chain on the
generation number.

The graph carries the conventions of `rlx.hir.conventions`: every node built for decoder layer i
has `meta["layer"] = i`, the attention and MLP projections have a `role`, and `hir.meta["kv"]`
lists each layer's cache inputs and outputs. Passes and engines read those, not names.

KV sharing (Gemma 4 `num_kv_shared_layers`): the last layers attend over the K/V (cache included)
of the last earlier layer of their type, so they take no `past_k/v.i` inputs and export no
`present_k/v.i` outputs of their own.

Attention is emitted unfused (scores, scale, softcap, mask, softmax, value product) so that the
`fuse-attention` pass has real work to do and the reference interpreter checks each piece.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, Self, cast

import numpy as np

from rlx.errors import FlowError
from rlx.frontends.config import GemmaConfig, RopeSpec
from rlx.frontends.paged import DEFAULT_PAGE_SIZE, PagedStep, max_pages_for
from rlx.hir import conventions as cv
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.ops import Op
from rlx.hir.shapes import BATCH, PAST_SEQ, SEQ, Dim, add_dims, sym
from rlx.hir.tensor_type import TensorType
from rlx.hir.verify import verify

Mode = Literal["prefill", "decode"]
Output = Literal["lm_head", "hidden", "last_token_logits"]
_TO_BHSD = (0, 2, 1, 3)  # [B, S, heads, D] <-> [B, heads, S, D]


def f32(*shape: Dim) -> TensorType:
    return TensorType(DType.F32, tuple(shape))


@dataclass(frozen=True)
class LayerOverrides:
    """Per-layer changes to the stock recipe (from `[[layers]]` profile patches or Python)."""

    window: int | None = None          # sliding window; 0 turns a sliding layer into a full one
    score_scale: float | None = None
    attn_softcap: float | None = None  # 0 removes the softcap
    rope_theta: float | None = None


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention as the stock stage builds it: the config's values for the layer with
    its overrides applied (what `LayerContext.attention` tells a stage)."""

    heads: int
    kv_heads: int
    head_dim: int
    window: int          # 0: full attention
    rope: RopeSpec
    score_scale: float
    softcap: float       # 0: no attention softcap
    kv_shared: bool      # attends over an earlier layer's K/V (Gemma 4 `num_kv_shared_layers`)

    @classmethod
    def of(cls, config: GemmaConfig, i: int, ov: LayerOverrides) -> AttentionSpec:
        rope = config.layer_rope(i)
        return cls(heads=config.num_heads, kv_heads=config.layer_kv_heads(i), head_dim=config.layer_head_dim(i),
                   window=ov.window if ov.window is not None else (config.window(i) or 0),
                   rope=rope if ov.rope_theta is None else replace(rope, theta=ov.rope_theta),
                   score_scale=ov.score_scale if ov.score_scale is not None else config.score_scale(i),
                   softcap=ov.attn_softcap if ov.attn_softcap is not None else (config.attn_softcap or 0.0),
                   kv_shared=config.is_kv_shared(i))


class WeightInfo(Protocol):
    """What the builder asks of a checkpoint's weights (a `WeightStore` has both)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> str: ...


Stage = Callable[["LayerContext", str], str]
"""A stage emits nodes for one step of the model: (ctx, hidden value id) -> new hidden id."""


def identity_stage(ctx: LayerContext, h: str) -> str:
    """A stage that leaves the residual stream unchanged (drops the layer)."""
    return h


NAMED_STAGES: dict[str, Stage] = {"identity": identity_stage}
"""Stages a profile can name (`[[layers]] replace = "identity"`)."""


@dataclass
class LayerContext:
    """What a `layer(fn)` callback sees: the layer, the graph being built, the stock stage."""

    builder: GraphBuilder
    index: int
    overrides: LayerOverrides = field(default_factory=LayerOverrides)

    @property
    def config(self) -> GemmaConfig:
        return self.builder.config

    @property
    def hir(self) -> HIR:
        return self.builder.hir

    @property
    def layer_type(self) -> str:
        return self.config.layer_type(self.index)

    @property
    def attention(self) -> AttentionSpec:
        """This layer's attention: heads, kv heads, head dim, window, RoPE, score scale, softcap."""
        if not 0 <= self.index < self.config.num_layers:
            raise FlowError(f"ctx.attention asked outside the layer stack (index {self.index})",
                            hint="only a layer's stage has an attention spec; before/after stages and "
                                 "patch_flow run outside the layers")
        return AttentionSpec.of(self.config, self.index, self.overrides)

    @property
    def eps(self) -> float:
        """The RMSNorm epsilon every norm of the model uses."""
        return self.config.rms_norm_eps

    @property
    def norm_offset(self) -> float:
        """What a weighted RMSNorm adds to its weight (1 for Gemma 1-3's stored `w - 1`, 0 for Gemma 4)."""
        return self.config.norm_shift

    def default_stage(self, **overrides: float | int | None) -> Stage:
        """The stock decoder layer, optionally with overrides (window=..., score_scale=...)."""
        changes: dict[str, Any] = dict(overrides)  # which fields is known only at run time
        merged = replace(self.overrides, **changes) if changes else self.overrides
        return lambda ctx, h: self.builder.decoder_layer(self.index, h, merged)


@dataclass(frozen=True)
class FlowSpec:
    """The recipe's choices; `GemmaFlow` methods return a new flow with one field changed."""

    mode: Mode = "prefill"
    batch: int | None = 1                # None: symbolic BATCH
    seq: int | None = None               # prefill only; None: symbolic SEQ
    past: int | None = None              # decode (or chunked prefill); None: symbolic PAST_SEQ
    has_past: bool = False
    output: Output = "lm_head"
    export_kv: bool | None = None        # None: the mode's default (decode exports K/V, as in rlx-gemma)
    custom_mask: bool = False
    media_attn_bias: bool = False
    from_hidden: bool = False
    page_size: int | None = None         # a paged step graph (`GemmaFlow.paged`, frontends/paged.py)
    max_pages: int = 0                   # its page-table width
    layer_overrides: tuple[tuple[int, LayerOverrides], ...] = ()


class GemmaFlow:
    """Immutable builder: each method returns a new flow; `build()` returns verified HIR."""

    def __init__(self, config: GemmaConfig, weights: WeightInfo | Callable[[str], tuple[int, ...]] | None = None,
                 spec: FlowSpec | None = None) -> None:
        """`weights` checks every weight's shape as the graph is built: a `WeightStore` (whose
        storage dtypes also become each param's `stored` meta) or just a shape lookup."""
        self.config = config
        self.weights = weights
        self.spec = spec or FlowSpec()
        self._layer_fns: tuple[Callable[[LayerContext], Stage | None], ...] = ()
        self._before: tuple[Stage, ...] = ()
        self._after: tuple[Stage, ...] = ()
        self._tail: tuple[Callable[[LayerContext, str], str | None], ...] = ()
        self._patches: tuple[Callable[[HIR], HIR | None], ...] = ()

    def _with(self, **changes: Any) -> Self:
        """A copy (of the caller's class, with every attribute, so subclasses keep their state)."""
        out = copy.copy(self)
        out.spec = replace(self.spec, **changes)
        return out

    def _extend(self, attr: str, item: object) -> Self:
        out = self._with()
        setattr(out, attr, (*getattr(self, attr), item))
        return out

    # ---- mode and dims ----
    def prefill(self, seq: int | None = None) -> Self:
        return self._with(mode="prefill", seq=seq, has_past=False)

    def decode(self, past: int | None = None) -> Self:
        return self._with(mode="decode", seq=1, past=past, has_past=True)

    def batch(self, n: int) -> Self:
        if n < 1:
            raise FlowError(f"batch must be >= 1, got {n}", hint="use batch(n) with n >= 1")
        return self._with(batch=n)

    def dynamic_batch(self) -> Self:
        return self._with(batch=None)

    def seq(self, n: int) -> Self:
        if self.spec.mode == "decode":
            raise FlowError("seq() is for prefill; a decode step has seq 1", hint="use past(n) for decode")
        if n < 1:
            raise FlowError(f"seq must be >= 1, got {n}", hint="use seq(n) with n >= 1")
        return self._with(seq=n)

    def past(self, n: int) -> Self:
        """Static past length; in prefill this makes a chunked prefill over an existing cache."""
        if n < 0:
            raise FlowError(f"past must be >= 0, got {n}", hint="use past(n) with n >= 0")
        return self._with(past=n, has_past=True)

    def dynamic_seq(self) -> Self:
        return self._with(seq=None)

    def dynamic_past(self) -> Self:
        return self._with(past=None, has_past=True)

    # ---- outputs and inputs ----
    def lm_head(self) -> Self:
        return self._with(output="lm_head")

    def hidden_only(self) -> Self:
        return self._with(output="hidden")

    def last_token_logits(self) -> Self:
        return self._with(output="last_token_logits")

    def export_kv(self, on: bool = True) -> Self:
        return self._with(export_kv=on)

    def paged(self, page_size: int = DEFAULT_PAGE_SIZE, max_seq: int | None = None) -> Self:
        """One `step` graph over the ragged tokens of many sequences, K/V in page pools of
        `page_size` positions (`rlx.frontends.paged`); sequences reach up to `max_seq` positions
        (default: the model's context)."""
        limit = max_seq if max_seq is not None else self.config.max_position_embeddings
        if page_size < 1 or limit < 1:
            raise FlowError(f"paged(page_size={page_size}, max_seq={limit}): both must be >= 1",
                            hint="e.g. paged(page_size=16)")
        return self._with(mode="prefill", batch=1, seq=None, has_past=False, output="lm_head",
                          page_size=page_size, max_pages=max_pages_for(limit, page_size))

    def custom_mask(self, on: bool = True) -> Self:
        """Replace the built-in causal/sliding masks by an additive `attn_mask` [B, 1, S, T] input."""
        return self._with(custom_mask=on)

    def media_attn_bias(self, on: bool = True) -> Self:
        """Add a `media_attn_bias` [B, 1, S, T] input to every layer's scores; sliding layers become
        bidirectional inside their window (the bias carries any causality media tokens need)."""
        return self._with(media_attn_bias=on)

    def prefill_from_hidden(self) -> Self:
        """Start from an `inputs_embeds` [B, S, hidden] input already in the residual stream (scaled).

        Models with per-layer embeddings (Gemma 4 `hidden_size_per_layer_input`) also take
        `input_ids` [B, S]: the per-layer table is looked up by token id (transformers would
        invert the main embedding to find them), while the projection half reads `inputs_embeds`.
        """
        return self._with(from_hidden=True, mode="prefill")

    # ---- stages and patches ----
    def layer(self, fn: Callable[[LayerContext], Stage | None]) -> Self:
        """`fn(ctx)` returns the stage for layer ctx.index (`ctx.default_stage()` keeps the stock
        layer, `identity_stage` drops it, None keeps what earlier callbacks chose)."""
        return self._extend("_layer_fns", fn)

    def override_layers(self, select: Callable[[int, str], bool], overrides: LayerOverrides) -> Self:
        """Apply overrides to the layers for which `select(index, layer_type)` is true."""
        chosen = tuple((i, overrides) for i in range(self.config.num_layers)
                       if select(i, self.config.layer_type(i)))
        return self._with(layer_overrides=self.spec.layer_overrides + chosen)

    def keep_layers(self, k: int) -> Self:
        """Run only the first k layers (the rest become identity stages)."""
        if not 0 <= k <= self.config.num_layers:
            raise FlowError(f"keep_layers({k}): the model has {self.config.num_layers} layers",
                            hint="keep between 0 and the layer count")
        return self.layer(lambda ctx: identity_stage if ctx.index >= k else None)

    def before_layers(self, stages: Stage | Iterable[Stage]) -> Self:
        """Stages run after the embedding, before layer 0, in order: one stage or an iterable."""
        out = self._with()
        out._before = (*self._before, *_stages(stages))
        return out

    def after_layers(self, stages: Stage | Iterable[Stage]) -> Self:
        """Stages run after the last layer, before the final norm and LM head: one or an iterable."""
        out = self._with()
        out._after = (*self._after, *_stages(stages))
        return out

    def patch_flow(self, fn: Callable[[LayerContext, str], str | None]) -> Self:
        """A hook on the final hidden state, as the crate's: `fn(ctx, h)` runs after every layer and
        `after_layers` stage, before the final norm and LM head; it may add nodes or outputs
        (`ctx.hir`) and returns the new hidden id, or None to keep `h`."""
        return self._extend("_tail", fn)

    def patch_graph(self, fn: Callable[[HIR], HIR | None]) -> Self:
        """A hook over the finished graph: return a new HIR, or None after editing in place."""
        return self._extend("_patches", fn)

    # ---- build ----
    def build(self) -> HIR:
        """The verified graph as built (`build_hir`); `rlx.gemma.GemmaFlow.build` instead returns a
        `BuiltModel` after its profile's passes."""
        return self.build_hir()

    def build_hir(self) -> HIR:
        """The verified graph as built, before any pass."""
        spec = self.spec
        if spec.export_kv is None:
            spec = replace(spec, export_kv=spec.mode == "decode")
        if spec.seq is None and spec.mode == "prefill" and spec.batch != 1:
            raise FlowError("dynamic_seq needs batch 1 (padded batches need a static seq)",
                            hint="call .batch(1) or give a static .seq(n)")
        if spec.page_size is not None:
            _check_paged(spec)
        builder = GraphBuilder(self.config, spec, self.weights)
        h = builder.embed()
        for stage in self._before:
            h = stage(LayerContext(builder, -1), h)
        overrides: dict[int, LayerOverrides] = {}
        for i, ov in spec.layer_overrides:
            overrides[i] = _merge(overrides.get(i, LayerOverrides()), ov)
        for i in range(self.config.num_layers):
            ctx = LayerContext(builder, i, overrides.get(i, LayerOverrides()))
            layer_stage: Stage = ctx.default_stage()
            for fn in self._layer_fns:
                chosen = fn(ctx)
                layer_stage = chosen if chosen is not None else layer_stage
            with builder.in_layer(i):
                h = layer_stage(ctx, h)
        tail = LayerContext(builder, self.config.num_layers)
        for stage in self._after:
            h = stage(tail, h)
        for patch in self._tail:
            h = patch(tail, h) or h
        builder.finish(h)
        hir = builder.hir
        cv.record_kv(hir, builder.kv_slots())
        for graph_patch in self._patches:
            hir = graph_patch(hir) or hir
        return verify(hir)


def _stages(stages: Stage | Iterable[Stage]) -> tuple[Stage, ...]:
    """One stage or an iterable of them (the crate's `impl IntoIterator<Item = FlowStage>`)."""
    single = callable(stages) or isinstance(stages, str) or not isinstance(stages, Iterable)
    items = (cast(Stage, stages),) if single else tuple(cast(Iterable[Stage], stages))
    bad = next((s for s in items if not callable(s)), None)
    if bad is not None:
        raise FlowError(f"stage {bad!r} is not callable",
                        hint="a stage is fn(ctx, hidden_id) -> hidden_id, e.g. a rlx.frontends.stages.FlowStage")
    return items


def _check_paged(spec: FlowSpec) -> None:
    """What a paged step graph cannot express is refused by name."""
    refused = [name for name, on in (("custom_mask", spec.custom_mask), ("media_attn_bias", spec.media_attn_bias),
                                     ("prefill_from_hidden", spec.from_hidden), ("export_kv", spec.export_kv),
                                     ("a past (decode / past)", spec.has_past), ("batch != 1", spec.batch != 1),
                                     ("a static seq", spec.seq is not None)) if on]
    if refused:
        raise FlowError(f"a paged step graph cannot take {', '.join(refused)}",
                        hint="call paged() last on a plain flow: its K/V live in the page pools it outputs")


def _merge(base: LayerOverrides, new: LayerOverrides) -> LayerOverrides:
    return replace(base, **{f.name: getattr(new, f.name) for f in dataclasses.fields(new)
                            if getattr(new, f.name) is not None})


class GraphBuilder:
    """Emits the HIR for one flow; every shape comes from the config and the spec.

    Stages get it as `ctx.builder`: `op(...)` adds a node (tagged with the current layer),
    `w(name, *shape)` a weight checked against the checkpoint, `norm`, `linear`, `attention`,
    `mlp`, `decoder_layer` the stock pieces.
    """

    def __init__(self, config: GemmaConfig, spec: FlowSpec,
                 weights: WeightInfo | Callable[[str], tuple[int, ...]] | None) -> None:
        self.config, self.spec = config, spec
        self.weight_shapes = weights if callable(weights) or weights is None else weights.shape
        self.weight_dtypes = None if callable(weights) or weights is None else weights.dtype
        self.hir = HIR(f"gemma{config.generation}_{spec.mode}")
        self.B: Dim = spec.batch if spec.batch is not None else sym(BATCH)
        self.S: Dim = spec.seq if spec.seq is not None else sym(SEQ)
        self.P: Dim = (spec.past if spec.past is not None else sym(PAST_SEQ)) if spec.has_past else 0
        self.T: Dim = add_dims(self.P, self.S)
        self.positions = self.hir.input(cv.POSITIONS, TensorType(DType.I64, (self.B, self.S)))
        self._rope_tables: dict[tuple[RopeSpec, int], str] = {}
        self._ids: str | None = None
        self._ple: str | None = None  # packed per-layer inputs [B, S, layers * P]
        self._kv: dict[int, tuple[str, str]] = {}  # layer -> its full-length (k, v), for KV-shared layers
        self._kv_out: dict[str, str] = {}
        self._masks: dict[str, str] = {}
        self._slots: dict[tuple[int, str], tuple[str | None, str | None]] = {}  # (layer, kind) -> past, present
        self.layer: int | None = None  # the layer the nodes being built belong to
        self.paged = PagedStep(self, spec.page_size, spec.max_pages) if spec.page_size is not None else None

    @contextmanager
    def in_layer(self, index: int) -> Iterator[None]:
        """Nodes built inside belong to decoder layer `index` (`conventions.LAYER`)."""
        outer, self.layer = self.layer, index
        try:
            yield
        finally:
            self.layer = outer

    def _meta(self, role: str | None = None) -> dict[str, object]:
        meta: dict[str, object] = {} if self.layer is None else {cv.LAYER: self.layer}
        return {**meta, cv.ROLE: role} if role else meta

    def kv_slots(self) -> list[cv.KVSlot]:
        return [cv.KVSlot(layer, kind, past, present) for (layer, kind), (past, present) in self._slots.items()]

    # ---- helpers ----
    def w(self, name: str, *shape: int) -> str:
        """A weight param, checked against the checkpoint's shape when one is known."""
        if self.weight_shapes is not None:
            found = tuple(self.weight_shapes(name))
            if found != tuple(shape):
                from rlx.errors import WeightError
                raise WeightError(f"tensor {name!r} has shape {list(found)}, expected {list(shape)} for this config",
                                  hint="the weights do not belong to this config.json; check the checkpoint")
        meta = self._meta()
        if self.weight_dtypes is not None:
            meta[cv.STORED] = self.weight_dtypes(name)
        return self.hir.param(name, f32(*shape), meta=meta)

    def op(self, op: Op, *inputs: str, name: str | None = None, role: str | None = None, **attrs: object) -> str:
        return self.hir.add(op, inputs, attrs, name=name, meta=self._meta(role))

    def linear(self, x: str, weight: str, out: int, inp: int, name: str, role: str | None = None) -> str:
        """`x @ W.T` for a [out, in] weight; `role` names the projection (`conventions.ROLE`)."""
        return self.op(Op.LINEAR, x, self.w(weight, out, inp), name=name, role=role)

    def norm(self, x: str, weight: str | None, dim: int, name: str) -> str:
        cfg = self.config
        args = (x,) if weight is None else (x, self.w(weight, dim))
        offset = cfg.norm_shift if weight is not None else 0.0
        return self.op(Op.RMSNORM, *args, name=name, eps=cfg.rms_norm_eps, offset=offset)

    def rope_table(self, rope: RopeSpec, head_dim: int) -> str:
        key = (rope, head_dim)
        if key not in self._rope_tables:
            inv = np.asarray(rope.inv_freq(head_dim), dtype=np.float32)
            values = tuple(float(v) for v in inv)
            name = f"rope.inv_freq.{len(self._rope_tables)}"
            self._rope_tables[key] = self.hir.add(Op.CONST, attrs={"value": values},
                                                  type=f32(len(values)), name=name)
        return self._rope_tables[key]

    def ids(self) -> str:
        """The `input_ids` input, made on first use (a `prefill_from_hidden` flow needs it only for PLE)."""
        if self._ids is None:
            self._ids = self.hir.input(cv.INPUT_IDS, TensorType(DType.I64, (self.B, self.S)))
        return self._ids

    def scaled_embed(self, table: str, dim: int, name: str) -> str:
        """`table[ids] * f32(sqrt(dim))`, as `Gemma*TextScaledWordEmbedding`."""
        h = self.op(Op.EMBED, table, self.ids(), name=name)
        return self.op(Op.SCALE, h, name=f"{name}.scale", value=float(np.float32(dim ** 0.5)))

    # ---- model pieces ----
    def embed(self) -> str:
        cfg = self.config
        if self.spec.from_hidden:
            h = self.hir.input(cv.INPUTS_EMBEDS, f32(self.B, self.S, cfg.hidden_size))
        else:
            h = self.scaled_embed(self.w("embed_tokens.weight", cfg.vocab_size, cfg.hidden_size),
                                  cfg.hidden_size, "embed")
        if cfg.hidden_size_per_layer_input:
            self._ple = self.per_layer_inputs(h)
        return h

    def per_layer_inputs(self, h0: str) -> str:
        """Gemma 4 PLE inputs for every layer, packed [B, S, layers * P] (layer i reads columns
        i*P:(i+1)*P): `Gemma4TextModel.get_per_layer_inputs` + `project_per_layer_inputs`."""
        cfg = self.config
        n, P, H = cfg.num_layers, cfg.hidden_size_per_layer_input, cfg.hidden_size
        split = _dims(self.B, self.S, n, P)
        tok = self.scaled_embed(self.w("embed_tokens_per_layer.weight", cfg.vocab_size_per_layer_input, n * P),
                                P, "ple.embed")
        tok = self.op(Op.RESHAPE, tok, name="ple.embed.split", shape=split)
        proj = self.op(Op.LINEAR, h0, self.w("per_layer_model_projection.weight", n * P, H), name="ple.proj")
        proj = self.op(Op.SCALE, proj, name="ple.proj.scale", value=float(H ** -0.5))
        proj = self.op(Op.RESHAPE, proj, name="ple.proj.split", shape=split)
        proj = self.norm(proj, "per_layer_projection_norm.weight", P, "ple.proj.norm")
        ple = self.op(Op.ADD, proj, tok, name="ple.combine")
        ple = self.op(Op.SCALE, ple, name="ple.combine.scale", value=float(2.0 ** -0.5))
        return self.op(Op.RESHAPE, ple, name="ple", shape=_dims(self.B, self.S, n * P))

    def per_layer_embedding(self, i: int, h: str) -> str:
        """The PLE residual step of layer i: h + norm(proj(act(gate(h)) * ple_i))."""
        cfg = self.config
        p, H, P = f"layers.{i}.", cfg.hidden_size, cfg.hidden_size_per_layer_input
        if self._ple is None:
            raise FlowError(f"layer {i} needs per-layer inputs, but embed() did not build them",
                            hint="build this flow with its embedding stage (per-layer inputs come from the token ids)")
        ple = self.op(Op.SLICE, self._ple, name=f"l{i}.ple.input", axis=2, start=i * P, stop=(i + 1) * P)
        g = self.op(Op.LINEAR, h, self.w(p + "per_layer_input_gate.weight", P, H), name=f"l{i}.ple.gate")
        g = self.op(Op.MUL, self.op(Op.GELU_TANH, g, name=f"l{i}.ple.act"), ple, name=f"l{i}.ple.mul")
        g = self.op(Op.LINEAR, g, self.w(p + "per_layer_projection.weight", H, P), name=f"l{i}.ple.proj")
        g = self.norm(g, p + "post_per_layer_input_norm.weight", H, f"l{i}.ple.norm")
        return self.op(Op.ADD, h, g, name=f"l{i}.ple.residual")

    def mask(self, layer: int, scores: str, window: int) -> str:
        spec = self.spec
        if spec.custom_mask:
            key = cv.ATTN_MASK
            if key not in self._masks:
                self._masks[key] = self.hir.input(key, f32(self.B, 1, self.S, self.T))
            scores = self.op(Op.ADD, scores, self._masks[key], name=f"l{layer}.attn.custom_mask")
        else:
            bidirectional = spec.media_attn_bias and self.config.is_sliding(layer)
            scores = self.op(Op.CAUSAL_MASK, scores, self.positions, name=f"l{layer}.attn.mask",
                             window=window, bidirectional=bidirectional)
        if spec.media_attn_bias:
            key = cv.MEDIA_ATTN_BIAS
            if key not in self._masks:
                self._masks[key] = self.hir.input(key, f32(self.B, 1, self.S, self.T))
            scores = self.op(Op.ADD, scores, self._masks[key], name=f"l{layer}.attn.media_bias")
        return scores

    def heads(self, x: str, n: int, d: int, name: str) -> str:
        """[B, S, n*d] -> [B, S, n, d] (head split; transposed after the per-head norm and RoPE)."""
        return self.op(Op.RESHAPE, x, name=name, shape=_dims(self.B, self.S, n, d))

    def own_kv(self, i: int, x: str, table: str) -> tuple[str, str]:
        """Layer i's K/V [B, kv_heads, T, head_dim]: projected, normed, rotated, cache prepended."""
        cfg = self.config
        p = f"layers.{i}.self_attn."
        hd, hk, H = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.hidden_size
        k = self.heads(self.linear(x, p + "k_proj.weight", hk * hd, H, f"l{i}.k", "k"), hk, hd, f"l{i}.k.heads")
        if cfg.layer_k_eq_v(i):
            v = k  # the raw projection, before k_norm and RoPE
        else:
            v = self.heads(self.linear(x, p + "v_proj.weight", hk * hd, H, f"l{i}.v", "v"), hk, hd, f"l{i}.v.heads")
        if cfg.traits.qk_norm:
            k = self.norm(k, p + "k_norm.weight", hd, f"l{i}.k.norm")
        if cfg.traits.v_norm:
            v = self.norm(v, None, hd, f"l{i}.v.norm")
        k = self.op(Op.TRANSPOSE, k, name=f"l{i}.k.t", perm=_TO_BHSD)
        v = self.op(Op.TRANSPOSE, v, name=f"l{i}.v.t", perm=_TO_BHSD)
        k = self.op(Op.ROPE, k, self.positions, table, name=f"l{i}.k.rope")
        if self.paged is not None:  # into the layer's page pools (frontends/paged.py)
            self._kv[i] = self.paged.write(i, k, v)
            return self._kv[i]
        kv = {"k": k, "v": v}
        for kind in cv.KV_KINDS:
            past = None
            if self.spec.has_past:
                past = f"past_{kind}.{i}"
                cache = self.hir.add(Op.INPUT, attrs={"name": past}, type=f32(self.B, hk, self.P, hd), name=past,
                                     meta=self._meta())
                kv[kind] = self.op(Op.CONCAT, cache, kv[kind], name=f"l{i}.{kind}.cache", axis=2)
            present = f"present_{kind}.{i}" if self.spec.export_kv else None
            if present is not None:
                self._kv_out[present] = kv[kind]
            self._slots[i, kind] = (past, present)
        self._kv[i] = kv["k"], kv["v"]
        return self._kv[i]

    def shared_kv(self, i: int) -> tuple[str, str]:
        """A KV-shared layer attends over its producer's full-length K/V, built earlier in this graph."""
        src = self.config.kv_source_layer(i)
        if src not in self._kv:
            raise FlowError(f"layer {i} reuses the K/V of layer {src}, but layer {src} computed none",
                            hint=f"keep layer {src}'s stock attention (ctx.default_stage()) or drop layer {i} too")
        return self._kv[src]

    def attention(self, i: int, x: str, ov: LayerOverrides) -> str:
        cfg = self.config
        p = f"layers.{i}.self_attn."
        hd, hq, hk = cfg.layer_head_dim(i), cfg.num_heads, cfg.layer_kv_heads(i)
        H = cfg.hidden_size
        q = self.heads(self.linear(x, p + "q_proj.weight", hq * hd, H, f"l{i}.q", "q"), hq, hd, f"l{i}.q.heads")
        if cfg.traits.qk_norm:
            q = self.norm(q, p + "q_norm.weight", hd, f"l{i}.q.norm")
        q = self.op(Op.TRANSPOSE, q, name=f"l{i}.q.t", perm=_TO_BHSD)
        att = AttentionSpec.of(cfg, i, ov)
        table = self.rope_table(att.rope, hd)
        q = self.op(Op.ROPE, q, self.positions, table, name=f"l{i}.q.rope")
        k, v = self.shared_kv(i) if cfg.is_kv_shared(i) else self.own_kv(i, x, table)
        if self.paged is not None:  # one paged_attention over the pools replaces the chain below
            return self.attention_out(i, self.paged.attend(i, q, k, v, att))
        if hq != hk:
            k = self.op(Op.REPEAT_KV, k, name=f"l{i}.k.rep", repeats=hq // hk)
            v = self.op(Op.REPEAT_KV, v, name=f"l{i}.v.rep", repeats=hq // hk)
        kt = self.op(Op.TRANSPOSE, k, name=f"l{i}.k.tt", perm=(0, 1, 3, 2))
        s = self.op(Op.MATMUL, q, kt, name=f"l{i}.attn.scores")
        if att.score_scale != 1.0:
            s = self.op(Op.SCALE, s, name=f"l{i}.attn.scale", value=float(att.score_scale))
        if att.softcap:
            s = self.op(Op.SOFTCAP, s, name=f"l{i}.attn.softcap", cap=float(att.softcap))
        s = self.mask(i, s, att.window)
        probs = self.op(Op.SOFTMAX, s, name=f"l{i}.attn.probs")
        return self.attention_out(i, self.op(Op.MATMUL, probs, v, name=f"l{i}.attn.out"))

    def attention_out(self, i: int, o: str) -> str:
        """Heads [B, heads, S, head_dim] merged and projected back to the residual stream."""
        cfg = self.config
        hq, hd = cfg.num_heads, cfg.layer_head_dim(i)
        o = self.op(Op.TRANSPOSE, o, name=f"l{i}.attn.out.t", perm=_TO_BHSD)
        o = self.op(Op.RESHAPE, o, name=f"l{i}.attn.merge", shape=_dims(self.B, self.S, hq * hd))
        return self.linear(o, f"layers.{i}.self_attn.o_proj.weight", cfg.hidden_size, hq * hd, f"l{i}.o", "o")

    def mlp(self, i: int, x: str, prefix: str = "mlp.") -> str:
        cfg = self.config
        p, H, inter = f"layers.{i}.{prefix}", cfg.hidden_size, cfg.layer_intermediate_size(i)
        gate = self.linear(x, p + "gate_proj.weight", inter, H, f"l{i}.mlp.gate", "gate")
        up = self.linear(x, p + "up_proj.weight", inter, H, f"l{i}.mlp.up", "up")
        act = self.op(Op.MUL, self.op(Op.GELU_TANH, gate, name=f"l{i}.mlp.act"), up, name=f"l{i}.mlp.glu")
        return self.linear(act, p + "down_proj.weight", H, inter, f"l{i}.mlp.down", "down")

    def moe(self, i: int, residual: str) -> str:
        """Gemma 4 expert branch: router on the residual stream, experts on its own pre-norm."""
        cfg = self.config
        p, H = f"layers.{i}.", cfg.hidden_size
        E, inter = cfg.num_experts or 0, cfg.moe_intermediate_size or 0
        r = self.norm(residual, None, H, f"l{i}.router.norm")
        r = self.op(Op.MUL, r, self.w(p + "router.scale", H), name=f"l{i}.router.scale")
        r = self.op(Op.SCALE, r, name=f"l{i}.router.root", value=float(H ** -0.5))
        x2 = self.norm(residual, p + "pre_feedforward_layernorm_2.weight", H, f"l{i}.moe.norm")
        out = self.op(Op.MOE, x2, r, self.w(p + "router.proj.weight", E, H),
                      self.w(p + "router.per_expert_scale", E),
                      self.w(p + "experts.gate_up_proj", E, 2 * inter, H),
                      self.w(p + "experts.down_proj", E, H, inter),
                      name=f"l{i}.moe", num_experts=E, top_k=cfg.top_k_experts or 0)
        return self.norm(out, p + "post_feedforward_layernorm_2.weight", H, f"l{i}.moe.post_norm")

    def decoder_layer(self, i: int, h: str, ov: LayerOverrides) -> str:
        with self.in_layer(i):
            return self._decoder_layer(i, h, ov)

    def _decoder_layer(self, i: int, h: str, ov: LayerOverrides) -> str:
        cfg = self.config
        p, H = f"layers.{i}.", cfg.hidden_size
        four_norms = cfg.traits.sandwich_norms
        a = self.attention(i, self.norm(h, p + "input_layernorm.weight", H, f"l{i}.attn_norm"), ov)
        if four_norms:
            a = self.norm(a, p + "post_attention_layernorm.weight", H, f"l{i}.post_attn_norm")
        h = self.op(Op.ADD, h, a, name=f"l{i}.attn.residual")
        pre_mlp = "pre_feedforward_layernorm.weight" if four_norms else "post_attention_layernorm.weight"
        m = self.mlp(i, self.norm(h, p + pre_mlp, H, f"l{i}.mlp_norm"))
        if cfg.enable_moe_block:
            m = self.norm(m, p + "post_feedforward_layernorm_1.weight", H, f"l{i}.mlp.post_norm_1")
            m = self.op(Op.ADD, m, self.moe(i, h), name=f"l{i}.moe.combine")
        if four_norms:
            m = self.norm(m, p + "post_feedforward_layernorm.weight", H, f"l{i}.post_mlp_norm")
        h = self.op(Op.ADD, h, m, name=f"l{i}.mlp.residual")
        if cfg.hidden_size_per_layer_input:
            h = self.per_layer_embedding(i, h)
        if cfg.traits.layer_scalar:
            h = self.op(Op.MUL, h, self.w(p + "layer_scalar", 1), name=f"l{i}.layer_scalar")
        return h

    def finish(self, h: str) -> None:
        cfg, spec = self.config, self.spec
        if spec.output == "last_token_logits":
            h = self.op(Op.SLICE, h, name="last_token", axis=1, start=-1, stop=None)
        if self.paged is not None:  # one row per sequence, before the norm and the head
            h = self.paged.select(h)
        h = self.norm(h, "norm.weight", cfg.hidden_size, "final_norm")
        if spec.output == "hidden":
            self.hir.set_output(cv.HIDDEN, h)
        else:
            head = "lm_head.weight" if not cfg.tie_word_embeddings else "embed_tokens.weight"
            logits = self.linear(h, head, cfg.vocab_size, cfg.hidden_size, "lm_head", cv.HEAD)
            if cfg.final_softcap:
                logits = self.op(Op.SOFTCAP, logits, name="final_softcap", cap=float(cfg.final_softcap))
            self.hir.set_output(cv.LOGITS, logits)
        if spec.export_kv:
            for name, nid in self._kv_out.items():
                self.hir.set_output(name, nid)
        if self.paged is not None:
            self.paged.finish()


def _dims(*dims: Dim) -> tuple[int | str, ...]:
    return tuple(d if isinstance(d, int) else str(d) for d in dims)
