"""Compile profiles (`gemma.rlx.toml`): fusion, passes, precision, backend overrides,
specialization and per-layer patches, parsed into frozen dataclasses.

Strict on purpose: a profile that silently ignored a misspelt key would compile a different model
than the one asked for, so every unknown section or key, wrong type and bad value is a
`ProfileError` naming the file, the line and the key. tomllib reports no positions, so `_Locator`
finds the line by scanning the text for the table header and the key.

A profile touches a build in two places: `Profile.apply(flow)` maps `[[layers]]` onto the
`GemmaFlow` builder (the same calls a Python user would make), and `Profile.pipeline(mode)` is
the pass pipeline text `PassManager` runs on the built HIR, ending with the `precision` pass
when `[precision]` or a `[[layers]] dtype` asks for anything but f32 (`Profile.precision_pass`).
The engines read the rest: `[specialize] SEQ` buckets (`rlx/runtime/prefill_buckets.py`) and
`[backend.<target>]` opt_level (the build's PassContext) and threads (TVM's thread pool).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import rlx.passes  # noqa: F401  (registers the passes a pipeline can name)
from rlx.compiler.dtypes import DType
from rlx.compiler.graph import HIR
from rlx.compiler.passes import REGISTRY, PassError, parse_pipeline
from rlx.compiler.pipeline import PassManager, PassReport
from rlx.compiler.shapes import SEQ
from rlx.errors import ProfileError
from rlx.frontends.config import LAYER_TYPES, GemmaConfig
from rlx.frontends.flow import NAMED_STAGES, GemmaFlow, LayerOverrides, Mode, Stage
from rlx.passes.precision import Precision
from rlx.passes.specialize import SYMBOLS

PROFILE_FILE = "gemma.rlx.toml"
TARGETS = ("cpu", "cpu-aarch64", "cuda", "cuda-sm90", "metal")  # = targets.presets.PRESETS (tested)
FLOAT_DTYPES = tuple(d.value for d in DType if d.is_float)
BUCKETED = (SEQ,)  # specialize_buckets pads at the end, which only SEQ allows; other dims bind to one size

Policy = Literal["direct", "fusable"]
# "direct": the fusions that replace a whole block by one kernel; "fusable" adds the generic
# epilogue fusion (elementwise tails folded into their producer), which pays off in memory-bound
# decode. Table order is pipeline order (rlx.passes.DEFAULT_PIPELINE's: shared-input matmuls
# before GeGLU, attention and add-norm before the epilogue); a pass joins a derived pipeline only
# once it is registered.
_DIRECT = ("fuse-qkv", "fuse-gate-up", "fuse-geglu", "fuse-attention", "fuse-add-norm", "fuse-lm-head-softcap")
FUSION_PASSES: dict[str, tuple[str, ...]] = {"direct": _DIRECT, "fusable": (*_DIRECT, "fuse-epilogue")}
MODE_POLICY: dict[str, Policy] = {"prefill": "direct", "decode": "fusable"}  # when [fusion] policy is unset
# [passes] flag -> pass, before fusion; dce runs last (it also sweeps what fusion replaced).
# Constant folding includes the RoPE tables (a no-op on graphs without a position bound).
CLEANUP = (("constant_folding", "fold-constants"), ("constant_folding", "fold-rope"), ("cse", "cse"))


# ---- value checks: each takes the TOML value and returns the stored one, or raises _Bad ----

class _Bad(Exception):
    """A value is wrong; the parser adds the file, line and key."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


Check = Callable[[Any], Any]
_KINDS = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}


def _expect(value: Any, types: tuple[type, ...], what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise _Bad(f"expected {what}, got {_KINDS.get(type(value), type(value).__name__)} {value!r}")


def boolean(value: Any) -> bool:
    _expect(value, (bool,), "a boolean")
    return value


def integer(lo: int = 0, hi: int | None = None) -> Check:
    def check(value: Any) -> int:
        _expect(value, (int,), "an integer")
        if value < lo or (hi is not None and value > hi):
            raise _Bad(f"must be {f'in {lo}..{hi}' if hi is not None else f'>= {lo}'}, got {value}")
        return value
    return check


def number(*, zero_ok: bool) -> Check:
    def check(value: Any) -> float:
        _expect(value, (int, float), "a number")
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise _Bad(f"must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value}")
        return float(value)
    return check


def choice(*options: str) -> Check:
    def check(value: Any) -> str:
        _expect(value, (str,), "a string")
        if value not in options:
            raise _Bad(f"must be one of {', '.join(map(repr, options))}, got {value!r}")
        return value
    return check


def pipeline_text(value: Any) -> str:
    _expect(value, (str,), "a string")
    try:
        parse_pipeline(value)
    except PassError as e:
        raise _Bad(e.message, e.hint) from None
    return value


def layer_range(value: Any) -> tuple[int, int]:
    _expect(value, (list,), "an array [start, stop]")
    if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise _Bad(f"expected two integers [start, stop], got {value!r}")
    start, stop = value
    if not 0 <= start < stop:
        raise _Bad(f"needs 0 <= start < stop (stop is excluded), got [{start}, {stop}]")
    return start, stop


def dim_buckets(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    for v in items:
        _expect(v, (int,), "a positive integer or an array of them")
        if v < 1:
            raise _Bad(f"must be positive, got {v}")
    if not items or items != sorted(set(items)):
        raise _Bad(f"buckets must be a non-empty, sorted list without repeats, got {value!r}")
    return tuple(items)


def _key(check: Check, default: Any = None) -> Any:
    """A dataclass field that is also a TOML key, validated by `check`."""
    return field(default=default, metadata={"check": check})


def _keys(cls: type) -> dict[str, Check]:
    return {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}


# ---- sections ----

@dataclass(frozen=True)
class FusionOptions:
    """[fusion]: which fusion passes run, and whether a pattern that stops half-way is an error."""

    policy: Policy | None = _key(choice(*FUSION_PASSES))  # None: MODE_POLICY of the graph's mode
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
class BackendOptions:
    """[backend.<target>]: per-target overrides; `passes` replaces the pipeline for that target."""

    opt_level: int | None = _key(integer(0, 3))
    threads: int | None = _key(integer(0))  # 0: every usable core (the engines' default)
    passes: str | None = _key(pipeline_text)


SELECTORS = ("index", "range", "type")
# [[layers]] key -> LayerOverrides field
OVERRIDES = {"window": "window", "score_scale": "score_scale", "softcap": "attn_softcap", "rope_theta": "rope_theta"}
_SELECT: dict[str, Callable[[LayerPatch, int, str], bool]] = {
    "index": lambda p, i, t: i == p.index,
    "range": lambda p, i, t: p.range[0] <= i < p.range[1],
    "type": lambda p, i, t: t == p.type,
}
_IN_BOUNDS: dict[str, Callable[[LayerPatch, int], bool]] = {  # checked against the model's layer count
    "index": lambda p, n: p.index < n,
    "range": lambda p, n: p.range[1] <= n,
    "keep_first": lambda p, n: p.keep_first <= n,
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
    where: str = field(default="[[layers]] (python)", compare=False)  # "file:line: [[layers]] #k"

    def __post_init__(self) -> None:
        problem = self.problem(dataclasses.asdict(self))
        if problem:
            raise ProfileError(f"{self.where} key {problem[0]!r}: {problem[1]}")

    @staticmethod
    def problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
        """The first rule the keys break, as (key, message): selectors and actions that conflict."""
        chosen = [k for k in SELECTORS if values.get(k) is not None]
        overrides = [k for k in (*OVERRIDES, "dtype") if values.get(k) is not None]
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
                               "softcap, rope_theta or dtype")
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
    backend: tuple[tuple[str, BackendOptions], ...] = ()
    specialize: tuple[tuple[str, tuple[int, ...]], ...] = ()  # dim -> buckets (one bucket: a binding)
    layers: tuple[LayerPatch, ...] = ()
    source: str = field(default="default", compare=False)   # file path or preset name, for messages

    def backend_for(self, target: str) -> BackendOptions:
        return dict(self.backend).get(target, BackendOptions())

    def buckets(self, dim: str) -> tuple[int, ...]:
        """The sizes `[specialize]` asks for on dim (empty: keep it symbolic)."""
        return dict(self.specialize).get(dim, ())

    def policy(self, mode: Mode) -> Policy:
        return self.fusion.policy or MODE_POLICY[mode]

    def pipeline(self, mode: Mode = "prefill", target: str | None = None, config: GemmaConfig | None = None) -> str:
        """Pipeline text: [backend.<target>] passes, else [passes] pipeline, else derived from
        [passes] flags and the [fusion] policy (fusion passes only once they are registered);
        then the `precision` pass [precision] / [[layers]] dtype ask for (`with_precision`)."""
        explicit = self.backend_for(target).passes if target else None
        if explicit is None:
            explicit = self.passes.pipeline
        if explicit is None:
            cleanup = [name for flag, name in CLEANUP if getattr(self.passes, flag)]
            fusion = [] if self.fusion.skip else [p for p in FUSION_PASSES[self.policy(mode)] if p in REGISTRY]
            explicit = ",".join([*cleanup, *fusion, *(["dce"] if self.passes.dce else [])])
        return self.with_precision(explicit, config)

    def precision_pass(self, config: GemmaConfig | None = None) -> str:
        """The `precision` pass text for [precision] and [[layers]] dtype; "" when everything is
        f32 (the graphs stay as built). Per-layer dtypes need the model's config: a `type`
        selector reads its layer types, and the pass takes one dtype per layer."""
        compute = self.precision.compute
        if config is not None:
            layers = self.layer_dtypes(config)
        elif any(p.dtype is not None for p in self.layers):
            raise ProfileError(f"{self.source}: [[layers]] dtype needs the model's config to resolve",
                               hint="pass config= (the checkpoint's GemmaConfig) where the pipeline is built")
        else:
            layers = ()
        if compute == "f32" and all(d == "f32" for d in layers):
            return ""
        per_layer = layers if any(d != compute for d in layers) else ()
        return str(Precision(compute=compute, mixed=self.precision.mixed, layers=per_layer))

    def with_precision(self, pipeline: str, config: GemmaConfig | None = None) -> str:
        """`pipeline` with `precision_pass` appended, last: the casts it inserts would hide the
        patterns the fusion passes look for, and it knows the fused ops. A pipeline that names a
        `precision` pass itself is left as it is."""
        extra = self.precision_pass(config)
        if not extra or any(p.name == Precision.name for p in parse_pipeline(pipeline)):
            return pipeline
        return ",".join(filter(None, (pipeline, extra)))

    def apply(self, flow: GemmaFlow) -> GemmaFlow:
        """Map [[layers]] onto the builder, in file order (later patches win, as in Python)."""
        for patch in self.layers:
            flow = patch.apply(flow)
        return flow

    def layer_dtypes(self, config: GemmaConfig) -> tuple[str, ...]:
        """Compute dtype per layer: [precision] compute, overridden by [[layers]] dtype patches."""
        out = [self.precision.compute] * config.num_layers
        for patch in (p for p in self.layers if p.dtype is not None):
            patch.check_bounds(config.num_layers)
            for i in range(config.num_layers):
                if patch.selects(i, config.layer_type(i)):
                    out[i] = patch.dtype
        return tuple(out)


PRESETS: dict[str, Profile] = {
    "gemma_prefill": Profile(FusionOptions(policy="direct"), source="gemma_prefill"),
    "gemma_decode": Profile(FusionOptions(policy="fusable"), source="gemma_decode"),
}
# What a checkpoint without gemma.rlx.toml gets: each graph's pipeline is its mode's preset's.
DEFAULT_PROFILE = Profile(source="default (gemma_prefill / gemma_decode by mode)")


def optimize(hir: HIR, mode: Mode, profile: Profile | None = None, passes: str | None = None,
             config: GemmaConfig | None = None) -> tuple[HIR, PassReport]:
    """Run `passes` (default: the profile's pipeline for mode; no profile: nothing) through
    PassManager. With [fusion] assert_clean, a fusion pattern that matched half-way is an error.

    The profile's precision is part of the model it asks for, not a pass choice: explicit
    `passes` get its `precision` pass appended too, except the empty pipeline, which asks for
    the graph as built (`rlx inspect --passes ""`, compile's `before.hir`). `config` resolves
    `[[layers]] dtype` patches (required when the profile has any)."""
    if passes is None:
        text = profile.pipeline(mode, config=config) if profile else ""
    else:
        text = profile.with_precision(passes, config) if profile and passes.strip() else passes
    clean = profile is not None and profile.fusion.assert_clean
    return PassManager(parse_pipeline(text), assert_clean=clean).run(hir)


# ---- locating keys in the source text ----

_BARE_OR_QUOTED = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = re.compile(rf"\s*{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*\s*")
_PART = re.compile(rf"\s*({_BARE_OR_QUOTED})\s*(?:\.|$)")
_HEADER = re.compile(r"^\s*(\[\[?)([^\[\]]+)\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(rf"^(\s*{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*\s*)=")

KeyPath = tuple[str | int, ...]  # ("fusion", "policy"), ("layers", 2, "window"): ints index [[arrays]]


def _dotted(text: str) -> tuple[str, ...] | None:
    if not _DOTTED.fullmatch(text):
        return None
    return tuple(p.strip("\"'") for p in _PART.findall(text))


class _Locator:
    """First line of each table header and key, by key path (a TOML-aware scan, not a parser)."""

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        counts: dict[tuple[str, ...], int] = {}
        table: KeyPath = ()
        closing: str | None = None  # inside a multi-line string ending with this
        for n, line in enumerate(text.splitlines(), start=1):
            if closing is not None:
                closing = None if closing in line else closing
                continue
            header, assign = _HEADER.match(line), _ASSIGN.match(line)
            name = _dotted(header[2]) if header else None
            if name is not None:
                if header[1] == "[[":
                    counts[name] = counts.get(name, -1) + 1
                table = (*name, counts[name]) if header[1] == "[[" else name
                self._mark(table, n)
            elif assign and (key := _dotted(assign[1])) is not None:
                self._mark((*table, *key), n)
                rest = line[assign.end():]
                closing = next((q for q in ('"""', "'''") if rest.count(q) % 2), None)

    def _mark(self, path: KeyPath, line: int) -> None:
        for depth in range(1, len(path) + 1):
            self.lines.setdefault(path[:depth], line)

    def line(self, path: KeyPath) -> int:
        """The key's line, else its nearest enclosing table's (inline tables, dotted keys), else 1."""
        return next((self.lines[path[:d]] for d in range(len(path), 0, -1) if path[:d] in self.lines), 1)


def _label(table: KeyPath) -> str:
    if not table:
        return "top level"
    if isinstance(table[-1], int):
        return f"[[{'.'.join(map(str, table[:-1]))}]] #{table[-1] + 1}"
    return f"[{'.'.join(map(str, table))}]"


# ---- parsing ----

class _Parser:
    def __init__(self, text: str, path: str) -> None:
        self.path, self.locator = path, _Locator(text)

    def error(self, key_path: KeyPath, message: str, hint: str | None = None) -> ProfileError:
        line = self.locator.line(key_path)
        key = key_path[-1] if key_path and isinstance(key_path[-1], str) else None
        where = f"{_label(key_path[:-1])} key {key!r}" if key is not None else _label(key_path)
        return ProfileError(f"{self.path}:{line}: {where}: {message}", hint=hint)

    def table(self, value: Any, path: KeyPath) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"must be a table, got {value!r}")
        return value

    def check(self, check: Check, value: Any, path: KeyPath) -> Any:
        try:
            return check(value)
        except _Bad as e:
            raise self.error(path, e.message, e.hint) from None

    def keys(self, cls: type, value: Any, path: KeyPath) -> dict[str, Any]:
        known = _keys(cls)
        out: dict[str, Any] = {}
        for key, v in self.table(value, path).items():
            if key not in known:
                raise self.error((*path, key), "unknown key", hint=f"{_label(path)} keys: {', '.join(known)}")
            out[key] = self.check(known[key], v, (*path, key))
        return out

    def options(self, cls: type, value: Any, path: KeyPath) -> Any:
        return cls(**self.keys(cls, value, path))

    def backend(self, value: Any, path: KeyPath) -> tuple[tuple[str, BackendOptions], ...]:
        out = {}
        for target, opts in self.table(value, path).items():
            if target not in TARGETS:
                raise self.error((*path, target), "unknown target", hint=f"targets: {', '.join(TARGETS)}")
            out[target] = self.options(BackendOptions, opts, (*path, target))
        return tuple(sorted(out.items()))

    def specialize(self, value: Any, path: KeyPath) -> tuple[tuple[str, tuple[int, ...]], ...]:
        out = {}
        for dim, v in self.table(value, path).items():
            if dim not in SYMBOLS:
                raise self.error((*path, dim), "unknown dim", hint=f"dims: {', '.join(SYMBOLS)}")
            out[dim] = self.check(dim_buckets, v, (*path, dim))
            if len(out[dim]) > 1 and dim not in BUCKETED:
                raise self.error((*path, dim), f"only {', '.join(BUCKETED)} can have buckets",
                                 hint=f"bind {dim} to one size, e.g. {dim} = {out[dim][-1]}")
        return tuple(sorted(out.items()))

    def layers(self, value: Any, path: KeyPath) -> tuple[LayerPatch, ...]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(path, "must be an array of tables: write each patch under its own [[layers]]")
        return tuple(self.layer_patch(v, (*path, k)) for k, v in enumerate(value))

    def layer_patch(self, value: dict[str, Any], path: KeyPath) -> LayerPatch:
        values = self.keys(LayerPatch, value, path)
        problem = LayerPatch.problem(values)
        if problem:
            raise self.error((*path, problem[0]), problem[1])
        patch = LayerPatch(**values)
        line = self.locator.line((*path, patch.checked_key))
        return dataclasses.replace(patch, where=f"{self.path}:{line}: {_label(path)}")

    def profile(self, data: dict[str, Any]) -> Profile:
        kwargs = {}
        for name, value in data.items():
            if name not in _SECTIONS:
                raise self.error((name,), f"unknown section [{name}]", hint=f"sections: {', '.join(_SECTIONS)}")
            kwargs[name] = _SECTIONS[name](self, value, (name,))
        return Profile(**kwargs, source=self.path)


_SECTIONS: dict[str, Callable[[_Parser, Any, KeyPath], Any]] = {  # section name == Profile field
    "fusion": lambda p, v, path: p.options(FusionOptions, v, path),
    "passes": lambda p, v, path: p.options(PassOptions, v, path),
    "precision": lambda p, v, path: p.options(PrecisionOptions, v, path),
    "backend": _Parser.backend,
    "specialize": _Parser.specialize,
    "layers": _Parser.layers,
}


def parse_profile(text: str, path: str | Path = "<string>") -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML: {e}", hint="see https://toml.io for the syntax") from None
    return _Parser(text, str(path)).profile(data)


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"profile {path} not found", hint=f"give a {PROFILE_FILE} file or a preset name "
                                                             f"({', '.join(PRESETS)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from None
    return parse_profile(text, path)


def profile_path_near(weights: str | Path) -> Path:
    """`gemma.rlx.toml` inside an HF directory, or next to a GGUF (or any weight) file."""
    weights = Path(weights)
    return (weights if weights.is_dir() else weights.parent) / PROFILE_FILE


def profile_near(weights: str | Path) -> Profile:
    """The profile next to the weights if there is one, else DEFAULT_PROFILE."""
    candidate = profile_path_near(weights)
    return load_profile(candidate) if candidate.is_file() else DEFAULT_PROFILE


def resolve_profile(choice: str | Path | Profile | None, weights: str | Path) -> Profile:
    """What `--profile` means: a Profile, a preset name or a file; None: `profile_near(weights)`."""
    if isinstance(choice, Profile):
        return choice
    if choice is None:
        return profile_near(weights)
    return PRESETS[str(choice)] if str(choice) in PRESETS else load_profile(choice)
