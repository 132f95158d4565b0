"""Decode linears of M = 1..16 rows (a step of M sequences) compiled on the CPU against the
interpreter's decode of the same blocks: the GEMV runs x's rows in register tiles inside the
block loop (`KernelParams.gemv_rows`, a divisor of M), so every M exercises another tiling:
tails, one tile, several. Each format: rlx's q8 / q4 / q4a (`q8_0` / `q4_0` / `q4_1`, and a
group of 128), GGUF's Q4_K, Q5_K, Q6_K, Q5_0, Q5_1 blocks, and float32 weights; on the host
and on an AVX2-only build (haswell: another register file, another tile).

The reference is `QuantFormat.dequantize` (what the reference interpreter decodes with) times x
in float64. Tolerance: rtol 1e-5 with an absolute floor of 1e-5 x max|y| (float32 summation
order; a wrong tile or a row reading another row's x moves y by O(1)).
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from rlx.hir.quant import quant_format
from rlx.targets import machine
from rlx.targets.layouts import IL16, pack
from rlx.targets.presets import resolve_target
from rlx.targets.weight_kernels import GEMV, GEMV_ROWS, contraction, is_gemv
from rlx.targets.weight_schedules import Gemv
from tests.targets.test_quant_decode import random_blocks

N, K = 32, 512  # two il16 groups; two K-quant super-blocks a row
FORMATS = ["f32", "q8_0", "q4_0", "q4_1", "q8_0g128", "q4_k", "q5_k", "q6_k", "q5_0", "q5_1"]
TARGETS = {"native": "cpu", "avx2": '{"kind": "llvm", "mcpu": "haswell"}'}
# every M on the host; on AVX2 (tiles of 2 rows) one odd, one even and the largest, for the
# formats of each encoding (i8 / u4 with an offset / super-blocks) and float
ROWS = {"native": tuple(range(1, GEMV_ROWS + 1)), "avx2": (1, 3, 8, GEMV_ROWS)}
CASES = [(name, "native") for name in FORMATS] + [(name, "avx2") for name in ("f32", "q8_0", "q4_1", "q4_k")]


def _weight(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(the kernel's il16 array, the interpreter's float weight [N, K])."""
    if name == "f32":
        w = rng.standard_normal((N, K)).astype(np.float32)
        return pack(w, IL16), w
    fmt = quant_format(name)
    blocks = random_blocks(name, rng, N, K)
    return pack(blocks, IL16, name), fmt.dequantize(blocks)


def _built(name: str, target: str, packed: np.ndarray) -> tvm.runtime.Module:
    """One module holding the scheduled GEMV of every M in ROWS (one compile per format)."""
    resolved = resolve_target(TARGETS[target])
    params = machine.kernel_params(resolved.target)
    funcs = {}
    for m in ROWS[target]:
        x = te.placeholder((1, m, K), name="x")
        w = te.placeholder(packed.shape, str(packed.dtype), name="w")
        assert is_gemv(x, IL16)
        y = contraction(x, w, IL16, "" if name == "f32" else name, row_tile=params.gemm_rows,
                        chains=params.gemv_chains)
        with resolved.target:
            sch = Gemv().apply(te.create_prim_func([x, w, y]), resolved.target, False)
        assert sch is not None, f"{name} M={m}: the GEMV rule refused"
        funcs[f"m{m}"] = sch.mod["main"].with_attr("global_symbol", f"m{m}")
    return tvm.compile(tvm.IRModule(funcs), target=resolved.target)


@pytest.mark.parametrize(("name", "target"), CASES)
def test_small_m_gemv_equals_the_interpreter(name: str, target: str) -> None:
    rng = np.random.default_rng(FORMATS.index(name))
    packed, dense = _weight(name, rng)
    lib = _built(name, target, packed)
    w = tvm.runtime.tensor(packed)
    for m in ROWS[target]:
        x = rng.standard_normal((1, m, K)).astype(np.float32)
        y = tvm.runtime.empty((1, m, N), "float32")
        lib[f"m{m}"](tvm.runtime.tensor(x), w, y)
        ref = x.astype(np.float64) @ dense.astype(np.float64).T
        assert float(np.abs(ref).max()) > 1e-2
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()),
                                   err_msg=f"{name} {target} M={m}")


def test_gemv_rows_is_the_largest_m_a_gemv_takes() -> None:
    assert not is_gemv(te.placeholder((1, GEMV_ROWS + 1, K)), IL16)
    assert GEMV == "rlx_gemv"
