"""Pipeline text, the registry, PassManager (verify, dumps, timing, failure naming), patterns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import rlx.passes  # noqa: F401  (registers the passes)
from rlx.hir.graph import HIR, Node
from rlx.hir.ops import Op
from rlx.hir.pass_infra import REGISTRY, Pass, PassError, PassResult, format_pipeline, parse_pipeline, register
from rlx.hir.pass_manager import PassManager
from rlx.hir.patterns import Opt, Pat, Var, match
from rlx.passes.dce import DeadCodeElimination
from rlx.passes.fold_constants import FoldConstants

from .harness import hir

GRAPH = """
hir m {
  %x = input() {"name": "x"} : f32[BATCH, 4]
  %a = gelu_tanh(%x) : f32[BATCH, 4]
  %b = gelu_tanh(%x) : f32[BATCH, 4]
  %dead = scale(%b) {"value": 3.0} : f32[BATCH, 4]
  %s = add(%a, %b) : f32[BATCH, 4]
  return s=%s
}
"""


def test_parse_pipeline_with_options_round_trips() -> None:
    passes = parse_pipeline("dce, cse,fold-constants{weights=false}")
    assert [type(p) for p in passes] == [DeadCodeElimination, REGISTRY["cse"], FoldConstants]
    assert passes[2] == FoldConstants(weights=False)
    assert format_pipeline(passes) == "dce,cse,fold-constants{weights=false}"
    assert parse_pipeline(format_pipeline(passes)) == passes
    assert parse_pipeline("") == []


@pytest.mark.parametrize("text, message", [
    ("dce,nosuch", "unknown pass 'nosuch'"),
    ("fold-constants{speed=3}", "has no option 'speed'"),
    ("fold-constants{weights=maybe}", "is not a bool"),
    ("fold-constants{weights}", "needs key=value"),
    ("dce;;", "bad pipeline"),
])
def test_bad_pipelines(text: str, message: str) -> None:
    with pytest.raises(PassError, match=message):
        parse_pipeline(text)


def test_manager_reports_and_dumps(tmp_path: Path) -> None:
    out, report = PassManager(parse_pipeline("cse,dce"), dump_dir=tmp_path).run(hir(GRAPH))
    assert [r.name for r in report.records] == ["cse", "dce"]
    assert report.records[0].stats == {"merged": 1} and report.records[0].nodes_before == 5
    assert report.records[1].nodes_before == 4 and report.records[1].nodes_after == 3
    assert all(r.seconds >= 0 for r in report.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.hir", "01-cse.hir", "02-dce.hir"]
    assert "%dead" not in (tmp_path / "02-dce.hir").read_text()
    assert "cse" in "\n".join(report.lines())
    assert report.to_dict()["passes"][1]["nodes_after"] == 3


@dataclass(frozen=True)
class _Breaks(Pass):
    name = "test-breaks-types"

    def run(self, h: HIR) -> PassResult:
        out = h.copy()
        x = out.inputs["x"].id
        out.insert_raw(Node("bad", Op.GELU_TANH, (x,), out.node(x).type.with_shape((7,))))
        out.raw_set_output("bad", "bad")
        return PassResult(out, True)


def test_manager_names_failing_pass_and_predecessors() -> None:
    if _Breaks.name not in REGISTRY:
        register(_Breaks)
    with pytest.raises(PassError) as info:
        PassManager([DeadCodeElimination(), REGISTRY["cse"](), _Breaks()]).run(hir(GRAPH))
    text = str(info.value)
    assert "pass test-breaks-types failed" in text and "types" in text
    assert "passes that ran before it: dce, cse" in text


def test_pattern_matcher_optional_commutative_and_single_use() -> None:
    h = hir(GRAPH)
    pat = Pat(Op.ADD, Pat(Op.GELU_TANH, Var("x"), name="g"), Var("other"), commutative=True)
    m = match(h, pat, "s")
    assert m is not None and m["g"] == "a" and m["x"] == "x" and m["other"] == "b"
    # b has two users (s and dead): as an interior node it must not match
    pat_b = Pat(Op.ADD, Var("l"), Pat(Op.GELU_TANH, Var("x")))
    assert match(h, pat_b, "s") is None
    assert match(h, Opt(Op.SCALE, Pat(Op.GELU_TANH, Var("x")), name="scale"), "dead") is None  # b: 2 users
    m2 = match(h, Opt(Op.SCALE, Var("v"), name="scale"), "dead")
    assert m2 is not None and m2["scale"] == "dead" and m2["v"] == "b"
    m3 = match(h, Opt(Op.SCALE, Pat(Op.GELU_TANH, Var("x")), name="scale"), "a")
    assert m3 is not None and m3.get("scale") is None


def test_importing_rlx_passes_registers_every_pass() -> None:
    """`import rlx.passes` alone registers every pass module's passes (quantize included), in a
    fresh interpreter, where no other import has registered them by the way."""
    import subprocess
    import sys

    script = (
        "import pkgutil, importlib, rlx.passes\n"
        "from rlx.hir.pass_infra import REGISTRY, parse_pipeline\n"
        "before = set(REGISTRY)\n"
        "print(parse_pipeline('quantize{scheme=q8,layers=q4|none}')[0])\n"
        "for m in pkgutil.iter_modules(rlx.passes.__path__):\n"
        "    importlib.import_module(f'rlx.passes.{m.name}')\n"
        "print(sorted(set(REGISTRY) - before))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["quantize{scheme=q8,layers=q4|none}", "[]"]


def test_a_failing_pass_keeps_its_own_fix_once() -> None:
    """PassManager names the failing pass and the ones before it, and keeps the pass's own fix
    (once): it used to replace it by the list of passes."""
    from rlx.passes.quantize import Quantize

    h = hir("""
hir m {
  %x = input() {"name": "x"} : f32[2, 64]
  %w = param() {"name": "layers.0.q_proj.weight", "scale": 1.0, "shift": 0.0} : f32[8, 64] meta {"layer": 0}
  %y = linear(%x, %w) : f32[2, 8] meta {"layer": 0, "role": "q"}
  return y=%y
}
""")
    with pytest.raises(PassError) as info:
        PassManager([DeadCodeElimination(), Quantize(scheme="q4", group=128)]).run(h)
    err = info.value
    assert err.message.startswith("pass quantize{group=128} failed: quantize: tensor layers.0.q_proj.weight has rows")
    own = "use a group size dividing 64 ([quantize] group = 32 or 64)"
    assert err.hint is not None and err.hint.count(own) == 1 and "passes that ran before it: dce" in err.hint
    assert str(err).count("fix:") == 1
