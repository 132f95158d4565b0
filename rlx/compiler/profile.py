"""Compile profiles: what a `gemma.rlx.toml` says (fusion, passes, precision, backend overrides,
specialization, per-layer patches), as frozen dataclasses. `profile_toml` reads the file.

Each TOML key is a dataclass field whose metadata holds its value check, so the schema, the
defaults and the validation are one declaration.

A profile touches a build in two places: `Profile.apply(flow)` maps `[[layers]]` onto the
`GemmaFlow` builder (the same calls a Python user would make), and `Profile.pipeline_text(mode)`
is the pass pipeline `PassManager` runs on the built HIR, ending with the `precision` pass when
`[precision]` or a `[[layers]] dtype` asks for anything but f32 (`Profile.precision_pass`).
`rlx.compiler.graphs` reads the rest: `[specialize] SEQ` buckets and `[backend.<target>]`
opt_level (the build's PassContext) and threads (TVM's thread pool).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rlx.errors import ProfileError
from rlx.frontends.config import LAYER_TYPES, GemmaConfig
from rlx.frontends.flow import NAMED_STAGES, GemmaFlow, LayerOverrides, Mode, Stage
from rlx.hir.dtypes import DType
from rlx.hir.pass_infra import PassError, parse_pipeline
from rlx.hir.quant import GROUP_SIZES
from rlx.hir.shapes import SEQ
from rlx.passes import FUSION_POLICIES, derive_pipeline
from rlx.passes.precision import Precision
from rlx.passes.quantize import GLOB_HINT, SCHEMES, Quantize, glob_problem

FLOAT_DTYPES = tuple(d.value for d in DType if d.is_float)
BUCKETED = (SEQ,)  # specialize_buckets pads at the end, which only SEQ allows; other dims bind to one size
MODE_POLICY: dict[str, str] = {"prefill": "direct", "decode": "fusable"}  # when [fusion] policy is unset


# ---- value checks: each takes the TOML value and returns the stored one, or raises BadValue ----

class BadValue(Exception):
    """A value is wrong; the parser adds the file, line and key."""

    def __init__(self, message: str, hint: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint
        self.key = key  # a key inside the checked value (a table's): errors point at its line


Check = Callable[[Any], Any]
_KINDS = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}


def _expect(value: Any, types: tuple[type, ...], what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise BadValue(f"expected {what}, got {_KINDS.get(type(value), type(value).__name__)} {value!r}")


def boolean(value: Any) -> bool:
    _expect(value, (bool,), "a boolean")
    return value


def integer(lo: int = 0, hi: int | None = None) -> Check:
    def check(value: Any) -> int:
        _expect(value, (int,), "an integer")
        if value < lo or (hi is not None and value > hi):
            raise BadValue(f"must be {f'in {lo}..{hi}' if hi is not None else f'>= {lo}'}, got {value}")
        return value
    return check


def number(*, zero_ok: bool) -> Check:
    def check(value: Any) -> float:
        _expect(value, (int, float), "a number")
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise BadValue(f"must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value}")
        return float(value)
    return check


def choice(*options: str | int) -> Check:
    """One of `options`, all strings or all integers (the value must be of their type)."""
    kind = type(options[0])
    what = "a string" if kind is str else "an integer"

    def check(value: Any) -> Any:
        _expect(value, (kind,), what)
        if value not in options:
            raise BadValue(f"must be one of {', '.join(map(repr, options))}, got {value!r}")
        return value
    return check


def pipeline_text(value: Any) -> str:
    _expect(value, (str,), "a string")
    try:
        parse_pipeline(value)
    except PassError as e:
        raise BadValue(e.message, e.hint) from None
    return value


def layer_range(value: Any) -> tuple[int, int]:
    _expect(value, (list,), "an array [start, stop]")
    if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise BadValue(f"expected two integers [start, stop], got {value!r}")
    start, stop = value
    if not 0 <= start < stop:
        raise BadValue(f"needs 0 <= start < stop (stop is excluded), got [{start}, {stop}]")
    return start, stop


def dim_buckets(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    for v in items:
        _expect(v, (int,), "a positive integer or an array of them")
        if v < 1:
            raise BadValue(f"must be positive, got {v}")
    if not items or items != sorted(set(items)):
        raise BadValue(f"buckets must be a non-empty, sorted list without repeats, got {value!r}")
    return tuple(items)


def globs(value: Any) -> tuple[str, ...]:
    """An array of tensor-name globs (`[quantize] keep`)."""
    _expect(value, (list,), "an array of glob strings")
    for v in value:
        _expect(v, (str,), "a glob string")
        problem = glob_problem(v)
        if problem:
            raise BadValue(problem, GLOB_HINT)
    return tuple(value)


def tensor_schemes(value: Any) -> tuple[tuple[str, str], ...]:
    """A table of "glob" = "scheme" (`[quantize.tensors]`), in file order (the first match wins)."""
    _expect(value, (dict,), 'a table of "glob" = "scheme"')
    scheme = choice(*SCHEMES)
    for glob, v in value.items():
        problem = glob_problem(glob)
        try:
            if problem:
                raise BadValue(problem, GLOB_HINT)
            scheme(v)
        except BadValue as e:
            raise BadValue(e.message, e.hint or f"use one of {', '.join(SCHEMES)}", key=glob) from None
    return tuple(value.items())


def _key(check: Check, default: Any = None) -> Any:
    """A dataclass field that is also a TOML key, validated by `check`."""
    return field(default=default, metadata={"check": check})


def toml_keys(cls: type) -> dict[str, Check]:
    """The TOML keys of a section dataclass and their value checks."""
    return {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}


# ---- sections ----

@dataclass(frozen=True)
class FusionOptions:
    """[fusion]: which fusion passes run, and whether a pattern that stops half-way is an error."""

    policy: str | None = _key(choice(*FUSION_POLICIES))  # None: MODE_POLICY of the graph's mode
    assert_clean: bool = _key(boolean, False)
    skip: bool = _key(boolean, False)  # run no fusion pass at all


@dataclass(frozen=True)
class PassOptions:
    """[passes]: the cleanup passes of the derived pipeline; `pipeline` replaces it outright."""

    dce: bool = _key(boolean, True)
    constant_folding: bool = _key(boolean, True)
    cse: bool = _key(boolean, True)
    verbose: bool = _key(boolean, False)  # print the pass report (stderr) whenever passes run
    pipeline: str | None = _key(pipeline_text)


@dataclass(frozen=True)
class PrecisionOptions:
    """[precision]: the dtype matmul-class work runs in (`passes/precision.py`); "auto" keeps norms,
    softmax, softcaps, RoPE, masks and the logits in f32, "off" casts those too."""

    compute: str = _key(choice(*FLOAT_DTYPES), "f32")
    mixed: str = _key(choice("auto", "off"), "auto")


@dataclass(frozen=True)
class QuantizeOptions:
    """[quantize]: which weights are stored in blocks (`passes/quantize.py`): `scheme` for all,
    `embed` for the embedding table (and a tied LM head), `head` for an untied LM head;
    `[[layers]] quantize` per layer; per tensor, by stored-name glob, `keep` (left float, before
    anything else) and `[quantize.tensors]` (a scheme; the first matching glob wins, over the rest)."""

    scheme: str = _key(choice(*SCHEMES), "none")
    group: int = _key(choice(*GROUP_SIZES), 32)
    embed: str | None = _key(choice(*SCHEMES))
    head: str | None = _key(choice(*SCHEMES))
    keep: tuple[str, ...] = _key(globs, ())
    tensors: tuple[tuple[str, str], ...] = _key(tensor_schemes, ())


@dataclass(frozen=True)
class BackendOptions:
    """[backend.<target>]: per-target overrides; `passes` replaces the pipeline for that target."""

    opt_level: int | None = _key(integer(0, 3))
    threads: int | None = _key(integer(0))  # 0: every usable core (the engines' default)
    passes: str | None = _key(pipeline_text)


SELECTORS = ("index", "range", "type")
PER_LAYER = ("dtype", "quantize")  # [[layers]] keys that pick a value per layer for a pass
# [[layers]] key -> LayerOverrides field
OVERRIDES = {"window": "window", "score_scale": "score_scale", "softcap": "attn_softcap", "rope_theta": "rope_theta"}
_SELECT: dict[str, Callable[[LayerPatch, int, str], bool]] = {
    "index": lambda p, i, t: i == p.index,
    "range": lambda p, i, t: p.range is not None and p.range[0] <= i < p.range[1],
    "type": lambda p, i, t: t == p.type,
}
_IN_BOUNDS: dict[str, Callable[[LayerPatch, int], bool]] = {  # checked against the model's layer count
    "index": lambda p, n: p.index is not None and p.index < n,
    "range": lambda p, n: p.range is not None and p.range[1] <= n,
    "keep_first": lambda p, n: p.keep_first is not None and p.keep_first <= n,
}


@dataclass(frozen=True)
class LayerPatch:
    """One [[layers]] entry: a selector (exactly one of index, range, type) and what to change.

    `keep_first = K` is the exception: it acts on the whole stack (layers K.. become identity
    stages), so it stands alone in its patch with no selector and no other action.
    """

    index: int | None = _key(integer(0))
    range: tuple[int, int] | None = _key(layer_range)   # half-open [start, stop)
    type: str | None = _key(choice(*LAYER_TYPES))
    keep_first: int | None = _key(integer(0))
    drop: bool = _key(boolean, False)                   # same as replace = "identity"
    replace: str | None = _key(choice(*NAMED_STAGES))
    window: int | None = _key(integer(0))               # 0: full attention
    score_scale: float | None = _key(number(zero_ok=False))
    softcap: float | None = _key(number(zero_ok=True))  # 0: no attention softcap
    rope_theta: float | None = _key(number(zero_ok=False))
    dtype: str | None = _key(choice(*FLOAT_DTYPES))     # this layer's compute dtype (layer_dtypes)
    quantize: str | None = _key(choice(*SCHEMES))       # this layer's weight scheme (per_layer)
    where: str = field(default="[[layers]] (python)", compare=False)  # "file:line: [[layers]] #k"

    def __post_init__(self) -> None:
        problem = self.problem(dataclasses.asdict(self))
        if problem:
            raise ProfileError(f"{self.where} key {problem[0]!r}: {problem[1]}",
                               hint="see the [[layers]] keys in the README's Profiles section")

    @staticmethod
    def problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """The first rule the keys break, as (key, message): selectors and actions that conflict."""
        chosen = [k for k in SELECTORS if values.get(k) is not None]
        overrides = [k for k in (*OVERRIDES, *PER_LAYER) if values.get(k) is not None]
        stages = [k for k in ("drop", "replace") if values.get(k) not in (None, False)]
        if values.get("keep_first") is not None:
            other = chosen + stages + overrides
            return (other[0], "keep_first acts on the whole stack: give it a [[layers]] of its own, "
                              "without index/range/type or other changes") if other else None
        if len(chosen) != 1:
            key = chosen[1] if chosen else next(iter(stages + overrides), "index")
            return key, "a [[layers]] patch needs exactly one of index, range, type (or keep_first alone)"
        if not stages + overrides:
            return chosen[0], ("selects layers but changes nothing: add drop, replace, window, score_scale, "
                               "softcap, rope_theta, dtype or quantize")
        if len(stages) > 1 or (stages and overrides):
            return (stages + overrides)[1], f"{stages[0]} replaces the whole layer, so this has no effect"
        return None

    @property
    def checked_key(self) -> str:
        """The selector, or keep_first: the key whose value must fit the model (errors point at it)."""
        return next(k for k in ("keep_first", *SELECTORS) if getattr(self, k) is not None)

    def selects(self, index: int, layer_type: str) -> bool:
        return self.keep_first is None and _SELECT[self.checked_key](self, index, layer_type)

    def check_bounds(self, num_layers: int) -> None:
        key = self.checked_key
        if key in _IN_BOUNDS and not _IN_BOUNDS[key](self, num_layers):
            value = getattr(self, key)
            shown = list(value) if isinstance(value, tuple) else value  # as written in TOML
            raise ProfileError(f"{self.where} key {key!r}: {shown} is out of range for a model "
                               f"with {num_layers} layers (0..{num_layers - 1})",
                               hint="profiles are per model: check the layer count in config.json")

    def stage(self) -> Stage | None:
        return NAMED_STAGES["identity"] if self.drop else NAMED_STAGES.get(self.replace or "")

    def overrides(self) -> LayerOverrides:
        return LayerOverrides(**{dst: getattr(self, src) for src, dst in OVERRIDES.items()})

    def apply(self, flow: GemmaFlow) -> GemmaFlow:
        """The GemmaFlow call this patch stands for: keep_layers, layer(fn) or override_layers."""
        self.check_bounds(flow.config.num_layers)
        if self.keep_first is not None:
            return flow.keep_layers(self.keep_first)
        stage = self.stage()
        if stage is not None:
            return flow.layer(lambda ctx: stage if self.selects(ctx.index, ctx.layer_type) else None)
        overrides = self.overrides()
        return flow if overrides == LayerOverrides() else flow.override_layers(self.selects, overrides)


@dataclass(frozen=True)
class Profile:
    """A whole `gemma.rlx.toml` (or a preset). Mappings are sorted tuples so profiles hash."""

    fusion: FusionOptions = FusionOptions()
    passes: PassOptions = PassOptions()
    precision: PrecisionOptions = PrecisionOptions()
    quantize: QuantizeOptions = QuantizeOptions()
    backend: tuple[tuple[str, BackendOptions], ...] = ()
    specialize: tuple[tuple[str, tuple[int, ...]], ...] = ()  # dim -> buckets (one bucket: a binding)
    layers: tuple[LayerPatch, ...] = ()
    source: str = field(default="default", compare=False)   # file path or preset name, for messages

    def backend_for(self, target: str) -> BackendOptions:
        return dict(self.backend).get(target, BackendOptions())

    def buckets(self, dim: str) -> tuple[int, ...]:
        """The sizes `[specialize]` asks for on dim (empty: keep it symbolic)."""
        return dict(self.specialize).get(dim, ())

    def policy(self, mode: Mode) -> str:
        return self.fusion.policy or MODE_POLICY[mode]

    def pipeline_text(self, mode: Mode = "prefill", target: str | None = None,
                      config: GemmaConfig | None = None) -> str:
        """Pipeline text: [backend.<target>] passes, else [passes] pipeline, else derived from
        [passes] flags and the [fusion] policy (`rlx.passes.PASS_ORDER`); then the `precision`
        pass [precision] / [[layers]] dtype ask for (`with_precision`)."""
        explicit = self.backend_for(target).passes if target else None
        if explicit is None:
            explicit = self.passes.pipeline
        if explicit is None:
            flags = {f.name: getattr(self.passes, f.name) for f in dataclasses.fields(PassOptions)
                     if isinstance(getattr(self.passes, f.name), bool)}
            explicit = derive_pipeline(flags, None if self.fusion.skip else self.policy(mode))
        return self.with_precision(explicit, config)

    def precision_pass(self, config: GemmaConfig | None = None) -> str:
        """The `precision` pass text for [precision] and [[layers]] dtype; "" when everything is
        f32 (the graphs stay as built). Per-layer dtypes need the model's config: a `type`
        selector reads its layer types, and the pass takes one dtype per layer."""
        compute = self.precision.compute
        layers = self._per_layer_values("dtype", compute, config)
        if compute == "f32" and all(d == "f32" for d in layers):
            return ""
        per_layer = layers if any(d != compute for d in layers) else ()
        return str(Precision(compute=compute, mixed=self.precision.mixed, layers=per_layer))

    def quantize_pass(self, config: GemmaConfig | None = None) -> str:
        """The `quantize` pass text for [quantize] and [[layers]] quantize; "" when no weight is
        quantized."""
        q = self.quantize
        layers = self._per_layer_values("quantize", q.scheme, config)
        if all(s == "none" for s in (q.scheme, *layers, q.embed or "none", q.head or "none",
                                     *(s for _, s in q.tensors))):
            return ""
        per_layer = layers if any(s != q.scheme for s in layers) else ()
        return str(Quantize(scheme=q.scheme, group=q.group, layers=per_layer, embed=q.embed or "",
                            head=q.head or "", keep=q.keep, tensors=tuple(f"{g}:{s}" for g, s in q.tensors)))

    def _per_layer_values(self, key: str, default: str, config: GemmaConfig | None) -> tuple[str, ...]:
        """One value per layer (a [[layers]] `dtype` / `quantize`), () when no patch sets `key`."""
        if config is not None:
            values = self.per_layer(key, default, config)
            return values if any(getattr(p, key) is not None for p in self.layers) else ()
        if any(getattr(p, key) is not None for p in self.layers):
            raise ProfileError(f"{self.source}: [[layers]] {key} needs the model's config to resolve",
                               hint="pass config= (the checkpoint's GemmaConfig) where the pipeline is built")
        return ()

    def with_precision(self, pipeline: str, config: GemmaConfig | None = None) -> str:
        """`pipeline` with the passes that are part of the model the profile asks for, not a pass
        choice: `quantize_pass` first (fusion must see the weights' formats, to fuse only weights of
        one format) and `precision_pass` last (the casts it inserts would hide the patterns the
        fusion passes look for, and it knows the fused ops). A pipeline that names either pass
        itself keeps its own."""
        named = {p.name for p in parse_pipeline(pipeline)}
        first = self.quantize_pass(config) if Quantize.name not in named else ""
        last = self.precision_pass(config) if Precision.name not in named else ""
        return ",".join(filter(None, (first, pipeline, last)))

    def with_quantize(self, scheme: str) -> Profile:
        """This profile with [quantize] scheme replaced (`--quantize SCHEME`)."""
        if scheme not in SCHEMES:
            raise ProfileError(f"--quantize {scheme!r} is not a scheme", hint=f"use one of {', '.join(SCHEMES)}")
        return dataclasses.replace(self, quantize=dataclasses.replace(self.quantize, scheme=scheme))

    def apply(self, flow: GemmaFlow) -> GemmaFlow:
        """Map [[layers]] onto the builder, in file order (later patches win, as in Python)."""
        for patch in self.layers:
            flow = patch.apply(flow)
        return flow

    def layer_dtypes(self, config: GemmaConfig) -> tuple[str, ...]:
        """Compute dtype per layer: [precision] compute, overridden by [[layers]] dtype patches."""
        return self.per_layer("dtype", self.precision.compute, config)

    def per_layer(self, key: str, default: str, config: GemmaConfig) -> tuple[str, ...]:
        """`key` (dtype, quantize) per layer: `default`, overridden by the [[layers]] that set it."""
        out = [default] * config.num_layers
        for patch in (p for p in self.layers if getattr(p, key) is not None):
            patch.check_bounds(config.num_layers)
            for i in range(config.num_layers):
                if patch.selects(i, config.layer_type(i)):
                    out[i] = getattr(patch, key)
        return tuple(out)


PRESETS: dict[str, Profile] = {
    "gemma_prefill": Profile(FusionOptions(policy="direct"), source="gemma_prefill"),
    "gemma_decode": Profile(FusionOptions(policy="fusable"), source="gemma_decode"),
}
# What a checkpoint without gemma.rlx.toml gets: each graph's pipeline is its mode's preset's.
DEFAULT_PROFILE = Profile(source="default (gemma_prefill / gemma_decode by mode)")
