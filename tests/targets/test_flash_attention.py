"""The compiled paged-cache kernels against the reference interpreter.

Tolerance: float32 on both sides; what differs is the summation order of the two products and
of the softmax sum, and LLVM's exp / tanh against numpy's: rtol 1e-5 with an absolute floor of
1e-5 (outputs are O(1) averages of unit-normal values). A wrong key range, page or head moves
outputs by O(0.1).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
import tvm
from tvm import relax

from rlx.hir.dtypes import DType
from rlx.hir.interpreter import Interpreter
from rlx.targets.build import build
from rlx.targets.lower import lower
from tests.hir.paged import PagedStep, paged_graph, paged_step

Run = Callable[[PagedStep], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


@cache
def _compiled(**attrs: object) -> tuple[Callable[[PagedStep], dict[str, np.ndarray]], dict[str, str]]:
    hir = paged_graph(**attrs)  # type: ignore[arg-type]
    low = lower({"main": hir})
    built = build(low.mod, "cpu")
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    sig = low.signatures["main"]

    def run(step: PagedStep) -> dict[str, np.ndarray]:
        feeds = step.feeds()
        args = {name: tvm.runtime.tensor(feeds[name]) for name, _ in sig.inputs}
        res = vm["main"](*args.values())
        out = {name: res[i].numpy() for i, name in enumerate(sig.outputs)}
        out["k_pool_arg"] = args["k_pool"].numpy()  # the pool passed in, after the call
        return out

    return run, built.schedules


def _both(step: PagedStep, **attrs: object) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    run, _ = _compiled(**attrs)
    return run(step), Interpreter(paged_graph(**attrs)).run(step.feeds())  # type: ignore[arg-type]


def test_paged_kv_write_writes_the_pool_in_place() -> None:
    step = paged_step([3, 0], [2, 5])
    got, ref = _both(step)
    np.testing.assert_array_equal(got["k_pool"], ref["k_pool"])
    np.testing.assert_array_equal(got["v_pool"], ref["v_pool"])
    np.testing.assert_array_equal(got["k_pool_arg"], ref["k_pool"])  # the engine's buffer itself


@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (3, 0.0), (0, 5.0)])
def test_paged_attention_matches_the_interpreter(window: int, softcap: float) -> None:
    step = paged_step([0, 5, 9], [6, 3, 1], seed=window)
    got, ref = _both(step, scale=0.3, softcap=softcap, window=window)
    np.testing.assert_allclose(got["out"], ref["out"], rtol=1e-5, atol=1e-5)


def test_paged_attention_f16() -> None:
    step = paged_step([2, 7], [5, 1], dtype=np.float16)
    got, ref = _both(step, dtype=DType.F16, scale=0.25, window=4)
    assert got["out"].dtype == np.float16
    np.testing.assert_allclose(got["out"].astype(np.float32), ref["out"].astype(np.float32), rtol=2e-3, atol=2e-3)
