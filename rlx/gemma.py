"""`rlx.gemma`: the `rlx-gemma` crate's builder API in one module, for code ported from it.

Everything a porter imports is here: the builder (`GemmaFlow`, with the crate's profile methods
and a `build()` that returns a `BuiltModel`), the one-call builders and their options
(`GemmaPrefillOpts`, `GemmaDecodeOpts`), checkpoints (`open_checkpoint`, `GemmaConfig`), stages
(`FlowStage` and the stock ones, `LayerContext`) and profiles (`CompileProfile`,
`gemma_profile_near_weights`, `GEMMA_PROFILE_FILE`). The README's "Porting from rlx-gemma" maps
each crate item to its rlx one.

Why a module of its own: running a profile's pass pipeline is compiler work, above the frontends
where `rlx.frontends.flow.GemmaFlow` lives (its `build()` / `build_hir()` return the plain graph).
`rlx.gemma.GemmaFlow` subclasses it and adds what needs the compiler: a profile chosen on the
builder, applied at `build()` (its `[[layers]]` patches, then its pipeline, as `rlx inspect
--profile` does).

Where rlx differs from the crate: a flow's default output is the LM head's logits (the crate's
prefill defaults to the hidden state: call `.hidden_only()`), weight names are transformers'
canonical ones without the `model.` prefix, `custom_mask` is an additive `attn_mask` [B, 1, S, T]
input, and a profile file that is there but wrong is an error (`ProfileError`) where the crate
falls back to the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np

from rlx.compiler.graphs import run_pipeline
from rlx.compiler.profile import PRESETS, Profile
from rlx.compiler.profile_toml import PROFILE_FILE, load_profile, profile_path_near
from rlx.errors import FlowError
from rlx.frontends import flow as _flow
from rlx.frontends.built import BuiltModel, GraphWeights, Weights, weight_shapes, weight_source
from rlx.frontends.checkpoint import Checkpoint, open_checkpoint
from rlx.frontends.config import GemmaConfig
from rlx.frontends.flow import AttentionSpec, LayerContext, LayerOverrides, Stage, identity_stage
from rlx.frontends.stages import IDENTITY, STOCK, FlowStage, rms_norm, scale, softcap, stock
from rlx.frontends.weights import WeightStore
from rlx.hir.graph import HIR

if TYPE_CHECKING:
    from rlx.targets.lower import Lowered

CompileProfile = Profile
"""The crate's name for a compile profile: rlx's `Profile` (a parsed `gemma.rlx.toml` or a preset)."""

GEMMA_PROFILE_FILE = PROFILE_FILE
MODE_PRESETS: dict[_flow.Mode, str] = {"prefill": "gemma_prefill", "decode": "gemma_decode"}


def gemma_profile_near_weights(weights: str | Path, decode: bool) -> Profile:
    """The `gemma.rlx.toml` beside a weights file or inside a checkpoint directory, else the mode's
    preset (`gemma_decode` / `gemma_prefill`). A file that is there but wrong raises ProfileError
    naming its line and key."""
    path = profile_path_near(weights)
    return load_profile(path) if path.is_file() else PRESETS[MODE_PRESETS["decode" if decode else "prefill"]]


class GemmaFlow(_flow.GemmaFlow):
    """The builder with a profile: `.profile*()` choose it, `build(weights)` applies its `[[layers]]`,
    runs its pipeline and returns a `BuiltModel`. Without a profile, the mode's preset is used, as
    in the crate; `build_hir()` is the graph as built, before any pass."""

    _profile: Profile | None = None

    @classmethod
    def for_prefill(cls, config: GemmaConfig, batch: int, seq: int) -> Self:
        """A static prefill of `batch` x `seq` tokens."""
        return cls(config).prefill(seq).batch(batch)

    @classmethod
    def for_decode(cls, config: GemmaConfig, batch: int, past: int) -> Self:
        """One decode step after `past` cached positions, with logits (and K/V: the decode default)."""
        return cls(config).decode(past).batch(batch).lm_head()

    def prefill_media_attn_bias(self) -> Self:
        """The crate's name for `media_attn_bias()`."""
        return self.media_attn_bias()

    # ---- profiles ----
    def profile(self, profile: Profile) -> Self:
        out = self._with()
        out._profile = profile
        return out

    def profile_prefill(self) -> Self:
        return self.profile(PRESETS[MODE_PRESETS["prefill"]])

    def profile_decode(self) -> Self:
        return self.profile(PRESETS[MODE_PRESETS["decode"]])

    def profile_near(self, weights_path: str | Path) -> Self:
        """The profile beside the weights; without one, the preset of the flow's mode now."""
        return self.profile(gemma_profile_near_weights(weights_path, self.spec.mode == "decode"))

    @property
    def chosen_profile(self) -> Profile:
        """The profile `build()` uses: the one set, else the mode's preset."""
        return self._profile if self._profile is not None else PRESETS[MODE_PRESETS[self.spec.mode]]

    # ---- build ----
    def build(self, weights: Weights | None = None) -> BuiltModel:  # type: ignore[override]  # the crate's build(): a model, not the HIR
        """The graph after the profile's `[[layers]]` and pipeline, with the weights it reads
        (`weights`, else the store the flow was made with)."""
        flow = self
        if weights is not None:
            flow = self._with()
            flow.weights = weight_shapes(weights)  # param shapes are checked against them as the graph is built
        elif isinstance(self.weights, WeightStore):
            weights = self.weights
        else:
            raise FlowError("build() needs the model's weights: this flow was made without a WeightStore",
                            hint="pass build(checkpoint.weights), or make the flow with GemmaFlow(config, "
                                 "checkpoint.weights)")
        source = weight_source(weights)  # checked before any work
        profile = self.chosen_profile
        hir, report = run_pipeline(profile.apply(flow).build_hir(), self.spec.mode, profile, config=self.config)
        return BuiltModel(hir, GraphWeights.of(hir, source), report)


# ---- the one-call builders and their options ----

@dataclass(frozen=True)
class GemmaPrefillOpts:
    """A prefill graph's options, by the crate's field names (`with_lm_head=False`: hidden state)."""

    batch: int
    seq: int
    dynamic_seq: bool = False
    prefill_hidden: bool = False
    media_attn_bias: bool = False
    with_lm_head: bool = False
    with_kv_outputs: bool = False
    last_logits_only: bool = False  # implies the LM head
    profile: Profile | None = None

    @classmethod
    def static_prefill(cls, batch: int, seq: int) -> GemmaPrefillOpts:
        return cls(batch, seq)

    def flow(self, config: GemmaConfig) -> GemmaFlow:
        """The builder these options stand for (the crate's `from_prefill_opts`)."""
        f = GemmaFlow(config).prefill(self.seq).batch(self.batch).hidden_only()
        return _switched(f, self, _PREFILL_SWITCHES)


@dataclass(frozen=True)
class GemmaDecodeOpts:
    """A decode step's options, by the crate's field names (logits and K/V always)."""

    batch: int
    past_seq: int
    dynamic_past: bool = False
    use_custom_mask: bool = False
    profile: Profile | None = None

    def flow(self, config: GemmaConfig) -> GemmaFlow:
        """The builder these options stand for (the crate's `from_decode_opts`)."""
        return _switched(GemmaFlow.for_decode(config, self.batch, self.past_seq), self, _DECODE_SWITCHES)


Switches = tuple[tuple[str, Callable[[GemmaFlow], GemmaFlow]], ...]
# option field -> the builder call it makes when true, in the crate's order
_PREFILL_SWITCHES: Switches = (
    ("dynamic_seq", GemmaFlow.dynamic_seq),
    ("prefill_hidden", GemmaFlow.prefill_from_hidden),
    ("media_attn_bias", GemmaFlow.media_attn_bias),
    ("with_lm_head", GemmaFlow.lm_head),
    ("with_kv_outputs", GemmaFlow.export_kv),
    ("last_logits_only", GemmaFlow.last_token_logits),
)
_DECODE_SWITCHES: Switches = (
    ("dynamic_past", GemmaFlow.dynamic_past),
    ("use_custom_mask", GemmaFlow.custom_mask),
)


def _switched(flow: GemmaFlow, opts: GemmaPrefillOpts | GemmaDecodeOpts, switches: Switches) -> GemmaFlow:
    for name, call in switches:
        if getattr(opts, name):
            flow = call(flow)
    return flow if opts.profile is None else flow.profile(opts.profile)


def build_gemma_prefill_built(config: GemmaConfig, weights: Weights, opts: GemmaPrefillOpts) -> BuiltModel:
    return opts.flow(config).build(weights)


def build_gemma_prefill_flow(config: GemmaConfig, weights: Weights,
                             opts: GemmaPrefillOpts) -> tuple[HIR, dict[str, np.ndarray]]:
    """(graph, {name: array}): `build_gemma_prefill_built(...).into_parts()`."""
    return build_gemma_prefill_built(config, weights, opts).into_parts()


def build_gemma_decode_built(config: GemmaConfig, weights: Weights, opts: GemmaDecodeOpts) -> BuiltModel:
    return opts.flow(config).build(weights)


def build_gemma_decode_flow(config: GemmaConfig, weights: Weights,
                            opts: GemmaDecodeOpts) -> tuple[HIR, dict[str, np.ndarray]]:
    """(graph, {name: array}): `build_gemma_decode_built(...).into_parts()`."""
    return build_gemma_decode_built(config, weights, opts).into_parts()


def build_gemma_decode_graph(config: GemmaConfig, weights: Weights, opts: GemmaDecodeOpts,
                             device: str = "cpu") -> tuple[Lowered, dict[str, np.ndarray]]:
    """The decode step lowered one level below the HIR (the crate's `Graph`): a Relax IRModule with
    one function, `decode`, and its calling convention (`rlx.targets.lower.Lowered`), plus the
    weights by name. TVM is imported only here."""
    from rlx.targets.lower import lower_hir

    hir, arrays = build_gemma_decode_flow(config, weights, opts)
    return lower_hir(hir, "decode", device), arrays


__all__ = [
    "GEMMA_PROFILE_FILE", "IDENTITY", "STOCK", "AttentionSpec", "BuiltModel", "Checkpoint", "CompileProfile",
    "FlowStage", "GemmaConfig", "GemmaDecodeOpts", "GemmaFlow", "GemmaPrefillOpts", "GraphWeights", "LayerContext",
    "LayerOverrides", "PRESETS", "Profile", "Stage", "WeightStore", "build_gemma_decode_built",
    "build_gemma_decode_flow", "build_gemma_decode_graph", "build_gemma_prefill_built", "build_gemma_prefill_flow",
    "gemma_profile_near_weights", "identity_stage", "open_checkpoint", "rms_norm", "scale", "softcap", "stock",
]
