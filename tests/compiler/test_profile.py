"""gemma.rlx.toml profiles: schema, errors that name file / line / key, the derived pass pipeline,
and [[layers]] patches that mean exactly what the equivalent GemmaFlow calls mean.

Ground truth for the numbers is transformers (a model with only its first K layers); tolerance as
in tests/frontends/test_flow_vs_transformers.py: rtol 1e-4, atol 1e-4 x max|ref|.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import rlx.compiler.profile_toml as profile_toml
from rlx.compiler.engines import reference_engine
from rlx.compiler.graphs import run_pipeline as optimize
from rlx.compiler.profile import (
    DEFAULT_PROFILE,
    PRESETS,
    BackendOptions,
    FusionOptions,
    LayerPatch,
    PassOptions,
    PrecisionOptions,
    Profile,
)
from rlx.compiler.profile_toml import load_profile, parse_profile, profile_near, resolve_profile
from rlx.errors import ProfileError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.flow import GemmaFlow, LayerOverrides, identity_stage
from rlx.frontends.weights import WeightCache
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.passes import DEFAULT_PIPELINE
from tests.fixtures.tiny import reference_for_layers

Ckpt = Callable[[str], Path]
PROMPT = [2, 17, 99, 5, 42, 200, 7, 63, 128, 11]  # longer than the tiny sliding window (4)

FULL = """\
# every section
[fusion]
policy = "fusable"
assert_clean = true
skip = false

[passes]
dce = false
constant_folding = false
cse = true
verbose = true
pipeline = "cse,dce"

[precision]
compute = "bf16"
mixed = "off"

[backend.cuda]
opt_level = 3
threads = 0

[backend.cpu-aarch64]
passes = "dce"

[specialize]
SEQ = [1, 32, 128, 512]
BATCH = 1

[[layers]]
index = 1
window = 2

[[layers]]
range = [0, 2]
softcap = 30            # an int where a float is wanted is fine
score_scale = 0.25

[[layers]]
type = "full_attention"
rope_theta = 50000.0
dtype = "f32"

[[layers]]
index = 3
drop = true

[[layers]]
index = 2
replace = "identity"

[[layers]]
keep_first = 3
"""


def _write(tmp_path: Path, text: str, name: str = "gemma.rlx.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _flow(d: Path) -> GemmaFlow:
    ckpt = open_checkpoint(d)
    return GemmaFlow(ckpt.config, ckpt.weights.shape).prefill().dynamic_seq()


def _prefill(d: Path, hir: HIR) -> np.ndarray:
    feeds = {"input_ids": np.asarray([PROMPT]), "positions": np.arange(len(PROMPT))[None]}
    return Interpreter(hir, WeightCache(open_checkpoint(d).weights)).run(feeds)["logits"][0]


def assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


# ---- schema ----

def test_every_section_parses(tmp_path: Path) -> None:
    p = load_profile(_write(tmp_path, FULL))
    assert p.fusion == FusionOptions(policy="fusable", assert_clean=True, skip=False)
    assert p.passes == PassOptions(dce=False, constant_folding=False, cse=True, verbose=True, pipeline="cse,dce")
    assert p.precision == PrecisionOptions(compute="bf16", mixed="off")
    assert p.backend_for("cuda") == BackendOptions(opt_level=3, threads=0)
    assert p.backend_for("cpu-aarch64").passes == "dce" and p.backend_for("metal") == BackendOptions()
    assert p.buckets("SEQ") == (1, 32, 128, 512) and p.buckets("BATCH") == (1,) and p.buckets("PAST_SEQ") == ()
    assert p.layers == (
        LayerPatch(index=1, window=2),
        LayerPatch(range=(0, 2), softcap=30.0, score_scale=0.25),
        LayerPatch(type="full_attention", rope_theta=50000.0, dtype="f32"),
        LayerPatch(index=3, drop=True),
        LayerPatch(index=2, replace="identity"),
        LayerPatch(keep_first=3),
    )
    assert p.layers[1].where == f"{tmp_path / 'gemma.rlx.toml'}:34: [[layers]] #2"  # the `range` line
    assert p.source == str(tmp_path / "gemma.rlx.toml")
    hash(p)  # frozen all the way down
    assert parse_profile("") == DEFAULT_PROFILE


def test_presets_and_default() -> None:
    assert set(PRESETS) == {"gemma_prefill", "gemma_decode"}
    assert PRESETS["gemma_prefill"].fusion.policy == "direct"
    assert PRESETS["gemma_decode"].fusion.policy == "fusable"
    # with every fusion pass registered, the decode preset is the fusion engineer's default pipeline
    assert PRESETS["gemma_decode"].pipeline_text("decode") == DEFAULT_PIPELINE
    assert PRESETS["gemma_prefill"].pipeline_text("prefill") == DEFAULT_PIPELINE.replace(",fuse-epilogue", "")
    for mode, preset in (("prefill", "gemma_prefill"), ("decode", "gemma_decode")):
        assert DEFAULT_PROFILE.pipeline_text(mode) == PRESETS[preset].pipeline_text(mode)
    assert resolve_profile("gemma_decode", "/nowhere") is PRESETS["gemma_decode"]


def test_derived_pipeline_follows_the_flags() -> None:
    assert parse_profile("[fusion]\nskip = true").pipeline_text() == "fold-constants,fold-rope,cse,dce"
    off = parse_profile("[passes]\ndce = false\ncse = false\nconstant_folding = false\n[fusion]\nskip = true")
    assert off.pipeline_text() == ""
    p = parse_profile('[passes]\npipeline = "cse"\n[backend.cuda]\npasses = "dce"')
    assert (p.pipeline_text("prefill"), p.pipeline_text("decode", "cuda"), p.pipeline_text("decode", "cpu")) == ("cse", "dce", "cse")


def test_preset_names_resolve(tiny_ckpt: Ckpt) -> None:
    assert resolve_profile("gemma_decode", tiny_ckpt("gemma3")) is PRESETS["gemma_decode"]
    with pytest.raises(ProfileError, match="profile fast not found") as info:
        resolve_profile("fast", tiny_ckpt("gemma3"))
    assert "gemma_prefill" in str(info.value)  # the fix names the presets


def test_profile_near_finds_the_file(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    assert profile_near(hf) is DEFAULT_PROFILE
    _write(hf, "[fusion]\nskip = true")
    assert profile_near(hf).fusion.skip  # HF: inside the directory
    gguf = tmp_path / "model.gguf"     # GGUF: next to the file (the file itself is never opened)
    assert profile_near(gguf).fusion.skip is False
    _write(tmp_path, "[passes]\ncse = false")
    assert profile_near(gguf).passes.cse is False


# ---- errors: file, line and key ----

BAD = [
    # (toml, line, key, what the message says)
    ("[fusion]\npolicy = 'direct'\n\n[fusoin]\nskip = true\n", 4, "fusoin", "unknown section"),
    ("[passes]\ndce = true\nfolding = true\n", 3, "folding", "unknown key"),
    ("[fusion]\n\n\nassert_clean = 1\n", 4, "assert_clean", "expected a boolean, got an integer 1"),
    ("[fusion]\npolicy = \"eager\"\n", 2, "policy", "must be one of 'direct', 'fusable'"),
    ("[precision]\ncompute = \"f64\"\n", 2, "compute", "must be one of 'f32', 'f16', 'bf16'"),
    ("[precision]\nmixed = true\n", 2, "mixed", "expected a string"),
    ("[backend.cuda]\nopt_level = 4\n", 2, "opt_level", "must be in 0..3"),
    ("[backend.cpu]\nthreads = -1\n", 2, "threads", "must be >= 0"),
    ("[backend.cpu]\nthreads = 2.0\n", 2, "threads", "expected an integer, got a float"),
    ("[backend.cpu]\nfast = true\n", 2, "fast", "unknown key"),
    ("[backend.tpu]\nopt_level = 1\n", 1, "tpu", "unknown target"),
    ("[backend.metal]\npasses = \"dce,nosuch\"\n", 2, "passes", "unknown pass 'nosuch'"),
    ("[passes]\npipeline = 3\n", 2, "pipeline", "expected a string"),
    ("[specialize]\nSEQ = [128, 32]\n", 2, "SEQ", "sorted"),
    ("[specialize]\nSEQ = [32, 32]\n", 2, "SEQ", "without repeats"),
    ("[specialize]\nSEQ = 0\n", 2, "SEQ", "must be positive"),
    ("[specialize]\nPAST_SEQ = [1, 2]\n", 2, "PAST_SEQ", "only SEQ can have buckets"),
    ("[specialize]\nTOKENS = 4\n", 2, "TOKENS", "unknown dim"),
    ("[[layers]]\nindex = 0\nwindow = 2\n\n[[layers]]\nindex = 1\nwindow = \"wide\"\n", 7, "window",
     "expected an integer"),
    ("[[layers]]\nindex = 1\ntype = \"full_attention\"\nwindow = 2\n", 3, "type", "exactly one of index, range, type"),
    ("[[layers]]\nwindow = 2\n", 2, "window", "exactly one of index, range, type"),
    ("[[layers]]\nindex = 1\n", 2, "index", "changes nothing"),
    ("[[layers]]\nrange = [4, 2]\ndrop = true\n", 2, "range", "0 <= start < stop"),
    ("[[layers]]\nrange = [1]\ndrop = true\n", 2, "range", "two integers"),
    ("[[layers]]\ntype = \"local\"\ndrop = true\n", 2, "type", "'sliding_attention', 'full_attention'"),
    ("[[layers]]\nindex = 1\ndrop = true\nwindow = 3\n", 4, "window", "drop replaces the whole layer"),
    ("[[layers]]\nindex = 1\nreplace = \"mlp_only\"\n", 3, "replace", "must be one of 'identity'"),
    ("[[layers]]\nkeep_first = 2\nindex = 1\n", 3, "index", "keep_first acts on the whole stack"),
    ("[[layers]]\nindex = 1\nscore_scale = 0\n", 3, "score_scale", "> 0"),
    ("[[layers]]\nindex = 1\nsoftcap = -1.0\n", 3, "softcap", ">= 0"),
    ("[[layers]]\nindex = -1\ndrop = true\n", 2, "index", "must be >= 0"),
    ("[layers]\nindex = 1\n", 1, "layers", "array of tables"),
    ("fusion = { policy = \"eager\" }\n", 1, "policy", "must be one of"),    # inline table: its line
    ("[backend]\ncuda.opt_level = 9\n", 2, "opt_level", "must be in 0..3"),  # dotted key
    ("[fusion]\n\"skip\" = \"yes\"\n", 2, "skip", "expected a boolean"),      # quoted key
]


@pytest.mark.parametrize("text, line, key, message", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_profiles_name_file_line_and_key(text: str, line: int, key: str, message: str, tmp_path: Path) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    err = str(info.value)
    assert err.startswith(f"{path}:{line}: "), err
    assert repr(key) in err or f"[{key}]" in err, err
    assert message in err, err


def test_locator_skips_multi_line_strings() -> None:
    text = '[passes]\npipeline = """\ncse = 1\n[fusion]\n"""\ncse = 1\n[fusion]\nskip = 1\n'
    where = profile_toml._Locator(text)
    assert (where.line(("passes", "cse")), where.line(("fusion", "skip")), where.line(("fusion",))) == (6, 8, 7)


def test_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[fusion]\npolicy = \n")
    with pytest.raises(ProfileError, match=r"gemma\.rlx\.toml: invalid TOML: Invalid value \(at line 2"):
        load_profile(path)
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "nope.toml")


@pytest.mark.parametrize("patch, key, line", [
    ("[[layers]]\nindex = 0\nwindow = 1\n\n[[layers]]\nwindow = 1\nindex = 4\n", "index", 7),
    ("[[layers]]\nrange = [2, 5]\ndrop = true\n", "range", 2),
    ("\n[[layers]]\nkeep_first = 5\n", "keep_first", 3),
])
def test_layer_out_of_range_when_applied(patch: str, key: str, line: int, tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    path = _write(tmp_path, patch)
    p = load_profile(path)  # the layer count is only known once a model is at hand
    flow = _flow(tiny_ckpt("gemma3"))  # 4 layers
    for build in (lambda: p.apply(flow), lambda: p.apply(flow).build()):
        with pytest.raises(ProfileError, match="out of range for a model with 4 layers") as info:
            build()
        assert str(info.value).startswith(f"{path}:{line}: [[layers]]") and repr(key) in str(info.value)
    with pytest.raises(ProfileError, match="out of range"):
        parse_profile('[[layers]]\nindex = 9\ndtype = "f16"\n').layer_dtypes(flow.config)


def test_python_patches_are_checked_too() -> None:
    with pytest.raises(ProfileError, match="exactly one of index, range, type"):
        LayerPatch(index=1, range=(0, 2), drop=True)


# ---- [[layers]] == the GemmaFlow calls they stand for ----

def _set_window(layer: int, window: int) -> Callable[[HIR], None]:
    def patch(hir: HIR) -> None:
        node = hir.node(f"l{layer}.attn.mask")
        hir.replace_node(dataclasses.replace(node, attrs=tuple(
            (k, window if k == "window" else v) for k, v in node.attrs)))
    return patch


EQUIVALENT: dict[str, tuple[str, Callable[[GemmaFlow], GemmaFlow]]] = {
    "index-window": ("index = 1\nwindow = 2",
                     lambda f: f.override_layers(lambda i, t: i == 1, LayerOverrides(window=2))),
    "index-window-patch-flow": ("index = 2\nwindow = 2", lambda f: f.patch_graph(_set_window(2, 2))),
    "range-softcap-scale": ("range = [0, 2]\nsoftcap = 30\nscore_scale = 0.5",
                            lambda f: f.override_layers(lambda i, t: 0 <= i < 2,
                                                        LayerOverrides(attn_softcap=30.0, score_scale=0.5))),
    "type-rope": ('type = "full_attention"\nrope_theta = 5e4',
                  lambda f: f.override_layers(lambda i, t: t == "full_attention", LayerOverrides(rope_theta=5e4))),
    "type-drop": ('type = "sliding_attention"\ndrop = true',
                  lambda f: f.layer(lambda ctx: identity_stage if ctx.layer_type == "sliding_attention" else None)),
    "index-replace": ('index = 2\nreplace = "identity"',
                      lambda f: f.layer(lambda ctx: identity_stage if ctx.index == 2 else None)),
    "keep-first": ("keep_first = 2", lambda f: f.keep_layers(2)),
}


@pytest.mark.parametrize("case", sorted(EQUIVALENT))
def test_toml_patch_builds_the_same_hir_as_python(case: str, tiny_ckpt: Ckpt) -> None:
    toml, python = EQUIVALENT[case]
    p = parse_profile(f"[[layers]]\n{toml}\n")
    flow = _flow(tiny_ckpt("gemma3"))
    expected = python(flow).build()
    assert expected != flow.build()  # the patch really changes the graph
    assert p.apply(flow).build() == expected


def test_later_patches_win_as_in_python(tiny_ckpt: Ckpt) -> None:
    p = parse_profile("[[layers]]\ntype = \"sliding_attention\"\nwindow = 3\n\n[[layers]]\nindex = 0\nwindow = 1\n")
    flow = _flow(tiny_ckpt("gemma3"))
    python = (flow.override_layers(lambda i, t: t == "sliding_attention", LayerOverrides(window=3))
              .override_layers(lambda i, t: i == 0, LayerOverrides(window=1)))
    assert p.apply(flow).build() == python.build()


def test_layer_dtypes(tiny_ckpt: Ckpt) -> None:
    cfg = open_checkpoint(tiny_ckpt("gemma3")).config  # sliding, full, sliding, full
    p = parse_profile('[precision]\ncompute = "bf16"\n[[layers]]\ntype = "full_attention"\ndtype = "f32"\n')
    assert p.layer_dtypes(cfg) == ("bf16", "f32", "bf16", "f32")
    assert Profile().layer_dtypes(cfg) == ("f32",) * 4


# ---- numbers ----

@pytest.mark.parametrize("k", [1, 3])
def test_keep_first_k_matches_truncated_transformers(k: int, tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    d = tiny_ckpt("gemma3")
    ref = reference_for_layers(d, PROMPT, k)
    p = load_profile(_write(tmp_path, f"[[layers]]\nkeep_first = {k}\n"))
    assert_logits_close(_prefill(d, p.apply(_flow(d)).build()), ref)
    # and through the reference engine, with the profile's whole pass pipeline on top
    engine = reference_engine(open_checkpoint(d), profile=p)
    assert [r.name for r in engine.reports["prefill"].records] == p.pipeline_text("prefill").split(",")
    assert_logits_close(engine.prefill(PROMPT), ref[-1])


def test_window_override_changes_exactly_the_selected_layers(tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt("gemma3")
    flow = _flow(d)
    cfg = flow.config
    p = parse_profile('[[layers]]\ntype = "sliding_attention"\nwindow = 2\n')

    def windows(hir: HIR) -> dict[int, int]:
        return {int(n.id.split(".")[0][1:]): n.attr("window") for n in hir.nodes_of(Op.CAUSAL_MASK)}

    stock, patched = flow.build(), p.apply(flow).build()
    changed = {i for i, w in windows(stock).items() if windows(patched)[i] != w}
    assert changed == {i for i in range(cfg.num_layers) if cfg.is_sliding(i)} and changed
    assert all(windows(patched)[i] == 2 for i in changed)
    assert not np.allclose(_prefill(d, patched), _prefill(d, stock), atol=1e-3)


def test_optimize_runs_the_profile_pipeline(tiny_ckpt: Ckpt) -> None:
    hir = _flow(tiny_ckpt("gemma3")).build()
    out, report = optimize(hir, "prefill", PRESETS["gemma_prefill"])
    assert [r.spec for r in report.records] == PRESETS["gemma_prefill"].pipeline_text("prefill").split(",")
    assert len(out) < len(hir)
    out, report = optimize(hir, "prefill", PRESETS["gemma_prefill"], passes="cse")
    assert [r.name for r in report.records] == ["cse"]
    assert optimize(hir, "prefill")[0] == hir  # no profile, no passes: the graph as built


def test_readme_example_profile_parses() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Profiles"):]
    example = section[section.index("```toml\n") + 8:section.index("```\n", section.index("```toml\n") + 8)]
    p = parse_profile(example, "README.md")
    assert p.fusion.policy == "fusable" and p.buckets("SEQ") == (1, 32, 128, 512) and len(p.layers) == 3


# ---- [precision] and [[layers]] dtype: the precision pass ends the pipeline ----

def test_precision_pass_ends_every_pipeline(tiny_ckpt: Ckpt) -> None:
    cfg = open_checkpoint(tiny_ckpt("gemma3")).config  # sliding, full, sliding, full
    assert DEFAULT_PROFILE.precision_pass(cfg) == "" and "precision" not in DEFAULT_PROFILE.pipeline_text(config=cfg)
    f16 = parse_profile('[precision]\ncompute = "f16"\n')
    assert f16.precision_pass() == "precision{compute=f16}"
    assert f16.pipeline_text("decode") == DEFAULT_PIPELINE + ",precision{compute=f16}"
    text = '[precision]\ncompute = "bf16"\nmixed = "off"\n[[layers]]\ntype = "full_attention"\ndtype = "f32"\n'
    mixed = parse_profile(text)
    assert mixed.pipeline_text("prefill", config=cfg).endswith(",precision{compute=bf16,mixed=off,layers=bf16|f32|bf16|f32}")
    with pytest.raises(ProfileError, match="needs the model's config"):  # a `type` selector needs the layer types
        mixed.pipeline_text("prefill")
    assert parse_profile('[[layers]]\nindex = 2\ndtype = "f16"\n').precision_pass(cfg) == \
        "precision{layers=f32|f32|f16|f32}"
    named = parse_profile('[precision]\ncompute = "f16"\n[passes]\npipeline = "cse,precision{compute=bf16}"\n')
    assert named.pipeline_text() == "cse,precision{compute=bf16}"  # a pipeline that names one is left as it is
    assert parse_profile('[precision]\ncompute = "f16"\n[passes]\ndce = false\ncse = false\n'
                         'constant_folding = false\n[fusion]\nskip = true').pipeline_text() == "precision{compute=f16}"


def test_optimize_appends_precision_to_explicit_passes_but_not_to_none(tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt("gemma3")
    hir, cfg = _flow(d).build(), open_checkpoint(d).config
    f16 = parse_profile('[precision]\ncompute = "f16"\n')
    _, report = optimize(hir, "prefill", f16, passes="cse", config=cfg)
    assert [r.spec for r in report.records] == ["cse", "precision{compute=f16}"]
    out, report = optimize(hir, "prefill", f16, passes="", config=cfg)  # "": the graph as built
    assert out == hir and not report.records


def test_precision_profile_file_gives_f16_linears(tiny_ckpt: Ckpt, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A gemma.rlx.toml with `[precision] compute = "f16"`: the graphs the reference engine runs
    (and the compiled engine and `rlx compile`, which build theirs with reference_pipelines) and
    `rlx inspect` shows have f16 linears, f32 norms and f32 logits."""
    from rlx.cli import main
    from rlx.compiler.graphs import reference_graphs
    from rlx.hir.dtypes import DType
    from rlx.hir.text import parse_hir

    d = tiny_ckpt("gemma3")
    path = _write(tmp_path, '[precision]\ncompute = "f16"\n')
    profile = resolve_profile(path, d)
    for hir in reference_graphs(open_checkpoint(d), profile=profile):
        assert {n.type.dtype for n in hir.nodes() if n.op in (Op.LINEAR, Op.LINEAR_EPILOGUE)} == {DType.F16}
        assert {n.type.dtype for n in hir.nodes() if n.op in (Op.RMSNORM, Op.ADD_RMSNORM)} == {DType.F32}
        assert hir.node(hir.outputs["logits"]).type.dtype is DType.F32
    engine = reference_engine(open_checkpoint(d), profile=profile)
    assert engine.reports["decode"].records[-1].spec == "precision{compute=f16}"
    ref = reference_engine(open_checkpoint(d)).prefill(PROMPT)
    ours = engine.prefill(PROMPT)
    assert 0 < np.abs(ours - ref).max() <= 4 * 2.0 ** -11 * 6 * np.abs(ref).max()  # test_precision.py's bound
    assert main(["inspect", str(d), "--profile", str(path)]) == 0
    shown = parse_hir(capsys.readouterr().out)
    assert {n.type.dtype for n in shown.nodes_of(Op.LINEAR)} == {DType.F16}
