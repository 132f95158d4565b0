"""Shared checks for pass tests: golden text, numeric equivalence under the interpreter."""

from __future__ import annotations

import textwrap

import numpy as np

from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.hir.pass_infra import Pass
from rlx.hir.shapes import eval_shape
from rlx.hir.text import parse_hir, print_hir
from rlx.hir.verify import verify


def hir(text: str) -> HIR:
    return verify(parse_hir(textwrap.dedent(text)))


def assert_golden(p: Pass, before: str, after: str) -> None:
    """The pass turns `before` into exactly `after` (both hand-written text forms)."""
    result = p.run(hir(before))
    verify(result.hir)
    assert print_hir(result.hir) == print_hir(hir(after)), print_hir(result.hir)


def random_feeds(h: HIR, env: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for name, node in h.inputs.items():
        shape = eval_shape(node.type.shape, env)
        feeds[name] = (rng.integers(0, 8, shape) if node.type.dtype.is_int
                       else rng.standard_normal(shape).astype(np.float32))
    return feeds


def random_weights(h: HIR, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {n.attr("name"): rng.standard_normal([int(d) for d in n.type.shape]).astype(np.float32)  # type: ignore[arg-type]
            for n in h.nodes_of(Op.PARAM)}


def assert_same_numbers(before: HIR, after: HIR, *, env: dict[str, int] | None = None, seed: int = 0,
                        rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Interpreter outputs before and after a pass agree on random inputs and weights."""
    rng = np.random.default_rng(seed)
    env = env or {"BATCH": 2, "SEQ": 5, "PAST_SEQ": 3}
    feeds, weights = random_feeds(before, env, rng), random_weights(before, rng)
    a = Interpreter(before, weights).run(feeds)
    b = Interpreter(after, weights).run(feeds)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=atol, err_msg=k)
