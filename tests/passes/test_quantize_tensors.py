"""Per-tensor formats: `quantize{keep=...,tensors=...}` and the `[quantize] keep` / `[quantize.tensors]`
profile keys that make it: which weights stay float or take another scheme, the error (and its
`keep` fix) for rows no group divides, and the bad inputs (unknown schemes, globs that cannot be
written or that match nothing), each an RlxError naming the thing with a fix.

The graph is a Gemma 4 PLE model's shape in small: an embedding, two layers each with a q projection
(rows of 64) and a per-layer projection (rows of 8, shorter than any group), and an untied head.
The compiled engines on the tiny gemma4-ple checkpoint are in tests/targets/test_quantized_cpu.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rlx.cli import main
from rlx.compiler.profile_toml import parse_profile
from rlx.errors import ProfileError
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.hir.pass_infra import PassError, parse_pipeline
from rlx.hir.quant import quant_format
from rlx.hir.verify import verify
from rlx.passes.quantize import Quantize

from .harness import hir, random_feeds, random_weights

PLE = """
hir m {
  %ids = input() {"name": "input_ids"} : i64[1, SEQ]
  %table = param() {"name": "embed_tokens.weight", "scale": 1.0, "shift": 0.0} : f32[16, 64]
  %wq0 = param() {"name": "layers.0.q_proj.weight", "scale": 1.0, "shift": 0.0} : f32[8, 64] meta {"layer": 0}
  %wp0 = param() {"name": "layers.0.per_layer_projection.weight", "scale": 1.0, "shift": 0.0} : f32[64, 8] meta {"layer": 0}
  %wq1 = param() {"name": "layers.1.q_proj.weight", "scale": 1.0, "shift": 0.0} : f32[8, 64] meta {"layer": 1}
  %wp1 = param() {"name": "layers.1.per_layer_projection.weight", "scale": 1.0, "shift": 0.0} : f32[64, 8] meta {"layer": 1}
  %head = param() {"name": "lm_head.weight", "scale": 1.0, "shift": 0.0} : f32[16, 64]
  %e = embed(%table, %ids) : f32[1, SEQ, 64]
  %q0 = linear(%e, %wq0) : f32[1, SEQ, 8] meta {"layer": 0, "role": "q"}
  %p0 = linear(%q0, %wp0) : f32[1, SEQ, 64] meta {"layer": 0}
  %h0 = add(%e, %p0) : f32[1, SEQ, 64] meta {"layer": 0}
  %q1 = linear(%h0, %wq1) : f32[1, SEQ, 8] meta {"layer": 1, "role": "q"}
  %p1 = linear(%q1, %wp1) : f32[1, SEQ, 64] meta {"layer": 1}
  %h1 = add(%h0, %p1) : f32[1, SEQ, 64] meta {"layer": 1}
  %logits = linear(%h1, %head) : f32[1, SEQ, 16] meta {"role": "head"}
  return logits=%logits
}
"""
PROJ = "layers.*.per_layer_projection.weight"
WEIGHTS = ("embed_tokens.weight", "layers.0.q_proj.weight", "layers.0.per_layer_projection.weight",
           "layers.1.q_proj.weight", "layers.1.per_layer_projection.weight", "lm_head.weight")


def _formats(h: HIR) -> dict[str, str]:
    """Each weight's format by stored name (its dtype when float)."""
    return {n.attr("name"): n.type.quant or n.type.dtype.value for n in verify(h).nodes_of(Op.PARAM)}


def _expect(default: str, **by_name: str) -> dict[str, str]:
    return {name: by_name.get(name, default) for name in WEIGHTS}


# ---- what keep and tensors do ----

@pytest.mark.parametrize("scheme", ["q8", "q4", "q4a"])
def test_keep_leaves_the_matched_weights_float_and_quantizes_the_rest(scheme: str) -> None:
    fmt = {"q8": "q8_0", "q4": "q4_0", "q4a": "q4_1"}[scheme]
    result = Quantize(scheme=scheme, keep=(PROJ,)).run(hir(PLE))
    proj = {f"layers.{i}.per_layer_projection.weight": "f32" for i in (0, 1)}
    assert _formats(result.hir) == _expect(fmt, **proj)
    assert result.stats == {f"format.{fmt}": 4, "kept": 2}
    # the interpreter computes with the kept weights as they are and the others' blocks: the float
    # graph on those weights, up to summation order (rtol 1e-5, as test_quantize.py), and not the
    # float graph on the original weights
    rng = np.random.default_rng(0)
    feeds, weights = random_feeds(hir(PLE), {"SEQ": 3}, rng), random_weights(hir(PLE), rng)
    seen = dict(weights)
    for p in result.hir.nodes_of(Op.PARAM):
        if p.type.quant is not None:
            fmt = quant_format(p.type.quant)
            seen[p.attr("name")] = fmt.dequantize(fmt.quantize(weights[p.attr("name")]))
    ours = Interpreter(result.hir, weights).run(feeds)["logits"]
    np.testing.assert_allclose(ours, Interpreter(hir(PLE), seen).run(feeds)["logits"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours, Interpreter(hir(PLE), weights).run(feeds)["logits"], rtol=1e-3)


def test_tensors_give_the_matched_weights_another_scheme_first_match_winning() -> None:
    out = Quantize(scheme="q4", keep=(PROJ,), tensors=("layers.1.*:q8", "layers.*:q4a", "lm_head.weight:none"),
                   embed="q8", layers=("none", "none")).run(hir(PLE)).hir
    # layer 1's q: its first glob (q8) beats the second and the layers= scheme; layer 0's q: the
    # second glob beats layers=none; keep beats both for the projections; the head's own glob
    # keeps it float; the embedding, which no glob matches, keeps its embed= override
    assert _formats(out) == _expect("f32", **{"embed_tokens.weight": "q8_0", "layers.0.q_proj.weight": "q4_1",
                                              "layers.1.q_proj.weight": "q8_0"})


def test_the_text_form_round_trips() -> None:
    q = Quantize(scheme="q4", keep=(PROJ, "lm_head.weight"), tensors=("layers.0.*:q8", "embed_*:gguf"))
    text = str(q)
    assert text == ("quantize{keep=layers.*.per_layer_projection.weight|lm_head.weight,"
                    "tensors=layers.0.*:q8|embed_*:gguf}")
    (back,) = parse_pipeline(text)
    assert back == q and back.overrides == (("layers.0.*", "q8"), ("embed_*", "gguf"))


# ---- rows no group divides: the error names the tensor and the keep glob that fixes it ----

def test_ungroupable_rows_name_the_tensor_and_the_keep_glob() -> None:
    with pytest.raises(PassError) as e:
        Quantize(scheme="q8").run(hir(PLE))
    assert e.value.message == ("quantize: tensor layers.0.per_layer_projection.weight has rows of 8 values, not a "
                               "multiple of q8's group of 32 (as do layers.1.per_layer_projection.weight)")
    assert e.value.hint == ('no group size (32, 64, 128, 256) divides 8: keep them float: '
                            '[quantize] keep = ["layers.*.per_layer_projection.weight"]')
    # the glob the fix names works, and so does the exact name per layer
    assert _formats(Quantize(scheme="q8", keep=(PROJ,)).run(hir(PLE)).hir)["layers.1.q_proj.weight"] == "q8_0"
    Quantize(scheme="q8", keep=(f"layers.{0}.per_layer_projection.weight",
                                "layers.1.per_layer_projection.weight")).run(hir(PLE))


def test_the_fix_names_a_tensor_whose_kind_also_has_groupable_rows() -> None:
    """Layer 1's projection has rows of 64 (a double-wide layer): the wildcard would keep it float
    too, so the fix names layer 0's tensor; with group 128 the 64-row weights fail as well, and a
    group that divides every failing row length comes first."""
    text = PLE.replace('"layers.1.per_layer_projection.weight", "scale": 1.0, "shift": 0.0} : f32[64, 8]',
                       '"layers.1.per_layer_projection.weight", "scale": 1.0, "shift": 0.0} : f32[64, 64]')
    text = text.replace("%p1 = linear(%q1, %wp1)", "%p1 = linear(%h0, %wp1)")
    with pytest.raises(PassError) as e:
        Quantize(scheme="q4").run(hir(text))
    assert e.value.hint is not None
    assert e.value.hint.endswith('keep it float: [quantize] keep = ["layers.0.per_layer_projection.weight"]')
    with pytest.raises(PassError, match="tensor embed_tokens.weight has rows of 64 values, not a multiple of "
                                        "q4's group of 128") as e:
        Quantize(scheme="q4", group=128, keep=("layers.0.per_layer_projection.weight",)).run(hir(text))
    assert e.value.hint is not None and e.value.hint.startswith(
        "use a group size dividing 64 ([quantize] group = 32 or 64), or keep them float: [quantize] keep = "
        '["embed_tokens.weight", "layers.*.q_proj.weight", "layers.1.per_layer_projection.weight", '
        '"lm_head.weight"]')


# ---- bad input: each a PassError / ProfileError naming the thing, with a fix ----

@pytest.mark.parametrize(("options", "message", "hint"), [
    ({"tensors": ("layers.*:q3",)}, "tensors[layers.*]='q3' is not a scheme", "use one of none, gguf, q8"),
    ({"tensors": "layers.*"}, "tensors item 'layers.*' is not GLOB:SCHEME", "tensors=GLOB:SCHEME"),
    ({"keep": "a|"}, "keep: a glob must not be empty", "without , { } | :"),
    ({"keep": ("a,b",)}, "the glob 'a,b' holds ','", "without , { } | :"),
    ({"tensors": ("a{b}:q8",)}, "the glob 'a{b}' holds '{' '}'", "without , { } | :"),
])
def test_bad_options_are_refused(options: dict[str, object], message: str, hint: str) -> None:
    with pytest.raises(PassError) as e:
        Quantize(**options)  # type: ignore[arg-type]  # the text form's strings, as a pipeline gives them
    assert message in e.value.message and e.value.hint is not None and hint in e.value.hint


@pytest.mark.parametrize(("options", "glob"), [
    ({"keep": (PROJ, "layers.*.per_layer_proj.weight")}, "keep glob 'layers.*.per_layer_proj.weight'"),
    ({"tensors": ("*.v_proj.weight:q8",)}, "tensors glob '*.v_proj.weight'"),
])
def test_a_glob_that_matches_no_weight_is_an_error_naming_it(options: dict[str, object], glob: str) -> None:
    """Not a warning: profiles are per model, and a glob that matches nothing is a typo that would
    compile the model the user meant to avoid (quantized where they asked for float)."""
    with pytest.raises(PassError) as e:
        Quantize(scheme="q8", **options).run(hir(PLE))  # type: ignore[arg-type]
    assert glob in e.value.message and "matches no weight that a linear or an embedding reads" in e.value.message
    assert e.value.hint == ("match their stored names (`*` matches dots too): embed_tokens.weight, "
                            "layers.*.per_layer_projection.weight, layers.*.q_proj.weight, lm_head.weight")


# ---- the profile keys ----

PROFILE = """[quantize]
scheme = "q4"
keep = ["layers.*.per_layer_projection.weight"]

[quantize.tensors]
"layers.1.*" = "q8"
"lm_head.weight" = "none"
"""


def test_profile_keys_make_the_pass() -> None:
    p = parse_profile(PROFILE)
    assert p.quantize.keep == (PROJ,) and p.quantize.tensors == (("layers.1.*", "q8"), ("lm_head.weight", "none"))
    assert p.quantize_pass() == ("quantize{keep=layers.*.per_layer_projection.weight,"
                                 "tensors=layers.1.*:q8|lm_head.weight:none}")
    hash(p)
    # --quantize none clears the scheme, not the per-tensor ones: the override still quantizes
    assert p.with_quantize("none").quantize_pass().startswith("quantize{scheme=none,")
    assert parse_profile('[quantize]\nkeep = ["x"]\n').quantize_pass() == ""  # nothing quantized: no pass


@pytest.mark.parametrize(("text", "line", "where", "message"), [
    ('[quantize]\nkeep = "layers.*"\n', 2, "[quantize] key 'keep'", "expected an array of glob strings"),
    ('[quantize]\nkeep = ["a", 3]\n', 2, "[quantize] key 'keep'", "expected a glob string, got an integer 3"),
    ('[quantize]\nkeep = ["a|b"]\n', 2, "[quantize] key 'keep'", "the glob 'a|b' holds '|'"),
    ('[quantize]\ntensors = ["a"]\n', 2, "[quantize] key 'tensors'", 'expected a table of "glob" = "scheme"'),
    ('[quantize]\nscheme = "q4"\n\n[quantize.tensors]\n"a" = "q8"\n"layers.*" = "int4"\n', 6,
     "[quantize.tensors] key 'layers.*'", "must be one of 'none', 'gguf', 'q8', 'q4', 'q4a', got 'int4'"),
    ('[quantize.tensors]\n"a:b" = "q8"\n', 2, "[quantize.tensors] key 'a:b'", "the glob 'a:b' holds ':'"),
    ('[quantize]\ntensors = { "x" = 8 }\n', 2, "[quantize.tensors] key 'x'", "expected a string, got an integer"),
])
def test_bad_profile_values_name_file_line_and_key(text: str, line: int, where: str, message: str) -> None:
    with pytest.raises(ProfileError) as e:
        parse_profile(text, "p.toml")
    assert e.value.message.startswith(f"p.toml:{line}: {where}: "), e.value.message
    assert message in e.value.message and e.value.hint


def test_the_readme_quantization_example_parses() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Quantization"):]
    start = section.index("```toml\n") + 8
    p = parse_profile(section[start:section.index("```\n", start)], "README.md")
    assert p.quantize.keep and p.quantize.tensors and p.quantize.scheme == "q4"


def test_cli_names_a_glob_that_matches_nothing(tiny_ckpt: Callable[[str], Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('[quantize]\nscheme = "q8"\nkeep = ["layers.*.per_layer_projection"]\n')
    code = main(["inspect", str(tiny_ckpt("gemma4-ple")), "--profile", str(profile)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    [line] = [x for x in err.splitlines() if x.startswith("rlx: error:")]
    assert "keep glob 'layers.*.per_layer_projection' matches no weight" in line
    assert "fix: match their stored names" in err and "layers.*.per_layer_projection.weight" in err
