"""The compiled flash attention kernels (`rlx/targets/flash_attention.py`) and the paged cache's
page write against the reference interpreter.

Tolerance: float32 on both sides; what differs is the summation order (lane partial sums, the
per-tile rescaling of the online softmax, split merging) and the polynomial exp / tanh against
numpy's (relative error ~1e-7): rtol 1e-5 with an absolute floor of 1e-5 (outputs are O(1)
averages of unit-normal values); measured max |diff| ~1e-6. A wrong key range, page, head or
tile boundary moves outputs by O(0.1). f16: the reference rounds the normalised probabilities
to f16 before the value product, the kernel keeps them f32: 2e-3.
"""

from __future__ import annotations

import re
import shutil
import tarfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from rlx.compiler.graphs import reference_graphs
from rlx.frontends.checkpoint import open_checkpoint
from rlx.hir.dtypes import DType
from rlx.hir.graph import HIR
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.hir.shapes import SEQ, sym
from rlx.hir.tensor_type import TensorType
from rlx.passes import DEFAULT_PIPELINE
from rlx.targets.build import build, build_isolated
from rlx.targets.flash_attention import fast_exp, fast_tanh
from rlx.targets.lower import lower
from tests.hir.paged import PagedStep, paged_graph, paged_step

Feeds = dict[str, np.ndarray]
TILE = 16  # keys per tile of the kernel (16 whatever the lanes: FlashSpec's kt)


@cache
def _compiled(hir_key: tuple[str, tuple[tuple[str, object], ...]]) -> tuple[Callable[[Feeds], Feeds], dict[str, str]]:
    kind, attrs = hir_key
    hir = (paged_graph if kind == "paged" else _contiguous_graph)(**dict(attrs))  # type: ignore[operator]
    low = lower({"main": hir})
    built = build(low.mod, "cpu")
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    sig = low.signatures["main"]

    def run(feeds: Feeds) -> Feeds:
        args = {name: tvm.runtime.tensor(feeds[name]) for name, _ in sig.inputs}
        res = vm["main"](*args.values())
        out = {name: res[i].numpy() for i, name in enumerate(sig.outputs)}
        out.update({f"{name}_arg": a.numpy() for name, a in args.items()})  # the buffers passed in, after
        return out

    return run, built.schedules


def _both(kind: str, feeds: Feeds, **attrs: object) -> tuple[Feeds, Feeds, dict[str, str]]:
    run, schedules = _compiled((kind, tuple(sorted(attrs.items()))))
    hir = (paged_graph if kind == "paged" else _contiguous_graph)(**attrs)  # type: ignore[operator]
    return run(feeds), Interpreter(hir).run(feeds), schedules


def _contiguous_graph(*, hq: int = 4, hk: int = 2, d: int = 16, keys: int = 1, dtype: DType = DType.F32,
                      scale: float = 1.0, softcap: float = 0.0, window: int = 0) -> HIR:
    """The fused `attention` over a plain K/V of `keys` rows (a prefill's own K/V when the queries
    sit at the last positions): the contiguous flash kernel with length = keys."""
    s = sym(SEQ)
    h = HIR("contiguous")
    q = h.input("q", TensorType(dtype, (1, hq, s, d)))
    k = h.input("k", TensorType(dtype, (1, hk, keys, d)))
    v = h.input("v", TensorType(dtype, (1, hk, keys, d)))
    pos = h.input("positions", TensorType(DType.I64, (1, s)))
    h.set_output("out", h.add(Op.ATTENTION, [q, k, v, pos], {"scale": scale, "softcap": softcap, "window": window}))
    return h


def _contiguous_feeds(queries: int, keys: int, *, hq: int = 4, hk: int = 2, d: int = 16,
                      dtype: type = np.float32, seed: int = 0) -> Feeds:
    rng = np.random.default_rng(seed)
    return {"q": rng.standard_normal((1, hq, queries, d)).astype(dtype),
            "k": rng.standard_normal((1, hk, keys, d)).astype(dtype),
            "v": rng.standard_normal((1, hk, keys, d)).astype(dtype),
            "positions": np.arange(keys - queries, keys, dtype=np.int64)[None]}


def _close(got: np.ndarray, want: np.ndarray, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol)


def _elementwise(poly: Callable[[tvm.tirx.PrimExpr], tvm.tirx.PrimExpr], x: tvm.te.Tensor) -> Callable[..., object]:
    return lambda i: poly(x[i])


def test_polynomial_exp_and_tanh() -> None:
    x = np.linspace(-80, 80, 4001, dtype=np.float32)
    for poly, ref, rtol, atol in ((fast_exp, np.exp, 3e-7, 0.0), (fast_tanh, np.tanh, 0.0, 5e-7)):
        ex = tvm.te.placeholder((x.size,), "float32")
        out = tvm.te.compute(ex.shape, _elementwise(poly, ex))
        f = tvm.compile(tvm.te.create_prim_func([ex, out]), target="llvm")
        got = tvm.runtime.tensor(np.zeros_like(x))
        f(tvm.runtime.tensor(x), got)
        np.testing.assert_allclose(got.numpy(), ref(x.astype(np.float64)), rtol=rtol, atol=atol)


# ---- contiguous (`rlx run`'s fused attention) ----
@pytest.mark.parametrize("keys", [1, TILE - 1, TILE, TILE + 1, 3 * TILE + 5])
def test_flash_prefill_at_tile_boundaries(keys: int) -> None:
    got, ref, schedules = _both("contiguous", _contiguous_feeds(keys, keys), keys=keys, scale=0.25)
    _close(got["out"], ref["out"])
    assert "flash-attention" in schedules.values()


@pytest.mark.parametrize(("queries", "keys", "window", "softcap", "hq", "hk"), [
    (1, 40, 0, 0.0, 4, 2),        # decode: the key range is split over the cores, then merged
    (1, 40, 9, 0.0, 4, 1),        # decode past the window (GQA 4:1)
    (5, 61, 17, 0.0, 2, 2),       # a chunk after a cache, window across tile boundaries
    (33, 33, 0, 3.0, 8, 1),       # softcap, 8 query heads on one KV head
    (20, 20, 4, 2.0, 4, 4),       # window + softcap, no GQA
])
def test_flash_matches_the_interpreter(queries: int, keys: int, window: int, softcap: float, hq: int, hk: int) -> None:
    feeds = _contiguous_feeds(queries, keys, hq=hq, hk=hk, seed=keys)
    got, ref, _ = _both("contiguous", feeds, hq=hq, hk=hk, keys=keys, window=window, softcap=softcap, scale=0.3)
    _close(got["out"], ref["out"])


def test_flash_f16() -> None:
    feeds = _contiguous_feeds(19, 19, dtype=np.float16)
    got, ref, _ = _both("contiguous", feeds, keys=19, dtype=DType.F16, window=6, scale=0.25)
    assert got["out"].dtype == np.float16
    _close(got["out"], ref["out"], 2e-3)


# ---- paged ----
def test_paged_kv_write_writes_the_pool_in_place() -> None:
    step = paged_step([3, 0], [2, 5])
    got, ref, _ = _both("paged", step.feeds())
    np.testing.assert_array_equal(got["k_pool"], ref["k_pool"])
    np.testing.assert_array_equal(got["v_pool"], ref["v_pool"])
    np.testing.assert_array_equal(got["k_pool_arg"], ref["k_pool"])  # the engine's buffer itself


@pytest.mark.parametrize(("past", "new", "window", "softcap"), [
    ([0, 5, 9], [6, 3, 1], 0, 0.0),          # a prefill chunk, a chunk after a past, a decode
    ([TILE - 1, TILE, 0], [1, 1, TILE + 1], 0, 0.0),  # key counts at tile boundaries
    ([30, 2], [1, 4], 7, 0.0),               # past the window
    ([12, 0], [2, 9], 0, 5.0),               # softcap
])
def test_paged_attention_matches_the_interpreter(past: list[int], new: list[int], window: int, softcap: float) -> None:
    step = paged_step(past, new, seed=sum(past))
    got, ref, schedules = _both("paged", step.feeds(), scale=0.3, softcap=softcap, window=window)
    _close(got["out"], ref["out"])
    assert "flash-attention" in schedules.values()


def test_paged_attention_f16() -> None:
    step: PagedStep = paged_step([2, 7], [5, 1], dtype=np.float16)
    got, ref, _ = _both("paged", step.feeds(), dtype=DType.F16, scale=0.25, window=4)
    assert got["out"].dtype == np.float16
    _close(got["out"], ref["out"], 2e-3)


# ---- no materialised scores in a compiled model ----
def test_compiled_prefill_and_decode_hold_no_score_matrix(tiny_ckpt: Callable[[str], Path]) -> None:
    """Every attention of the gemma3 tiny model (sliding and global layers) is the flash kernel,
    and no value of the compiled functions has a [.., queries, keys] shape: a regression to
    materialised scores (a [1, H, SEQ, SEQ] or [1, H, 1, PAST_SEQ + 1] tensor) fails here (the
    same check finds them in the GPU lowering, which keeps that form)."""
    prefill, decode = reference_graphs(open_checkpoint(tiny_ckpt("gemma3")), passes=DEFAULT_PIPELINE)
    built = build(lower({"prefill": prefill, "decode": decode}).mod, "cpu")
    rules = built.schedules
    assert [r for name, r in rules.items() if name.startswith("flash")] and \
        all(r == "flash-attention" for name, r in rules.items() if name.startswith("flash"))
    assert not [name for name in rules if "softmax" in name or "attention_scores" in name]
    assert not _score_shaped(built.scheduled)
    assert _score_shaped(lower({"prefill": prefill, "decode": decode}, "cuda").mod)  # the check can fail


def _score_shaped(mod: tvm.IRModule) -> list[list[str]]:
    """Tensors of the module's Relax functions shaped [.., queries, keys]."""
    return [shape for _, func in mod.functions_items() if isinstance(func, relax.Function)
            for shape in _tensor_shapes(func)
            if len(shape) == 4 and (shape[-1] == "SEQ" or "PAST_SEQ" in shape[-1]) and shape[-2] in ("SEQ", "1")]


def _tensor_shapes(func: relax.Function) -> list[list[str]]:
    """The shape of every tensor variable bound in a Relax function."""
    shapes: list[list[str]] = []

    def visit(e: relax.Expr) -> None:
        ty = getattr(e, "ty", None)
        if isinstance(e, relax.Var) and isinstance(ty, relax.TensorType) and ty.shape is not None:
            shapes.append([str(d.value) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in ty.shape.values])

    relax.analysis.post_order_visit(func, visit)
    return shapes


# ---- GPU builds (compiled here, nothing runs): the paged ops take the materialised form ----
@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc not installed (CUDA modules need it to compile)")
def test_paged_ops_compile_for_cuda() -> None:
    built = build(lower({"main": paged_graph(window=4, softcap=3.0)}, "cuda").mod, "cuda")
    assert "none" not in built.schedules.values()
    assert any(name.startswith("paged_kv_write") for name in built.schedules)


def test_paged_ops_compile_for_metal(tmp_path: Path) -> None:
    out = build_isolated({"main": paged_graph(window=4, softcap=3.0)}, "metal", tmp_path / "paged.metal.tar")
    with tarfile.open(out) as tar:
        msl = tar.extractfile("devc.o").read().decode("latin-1")  # type: ignore[union-attr]
    kernels = re.findall(r"kernel void (\w+)\(", msl)
    assert any(k.startswith("paged_kv_write") for k in kernels) and any("paged_values" in k for k in kernels)
