"""In-kernel decoding of quantized weights against gguf's numpy dequantizers, bit for bit.

Two readers: `quant_decode` (GGUF blocks as stored: GPU targets and the plain layout) and
`block_planes` (CPU il16 weights: blocks split into S / O / q planes at load time). The kernels
read quantized weights only through these, so exactness here (the same f16 / f32 scale times the
same small integer, plus the same offset, in float32) is what lets compiled contractions be
compared with the interpreter at float32 accumulation tolerance.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tvm
from tvm import te

from rlx.hir.quant import GGUF_FORMATS, QuantFormat, quant_format
from rlx.targets import block_planes
from rlx.targets.block_planes import PlaneReader, planes_of
from rlx.targets.quant_decode import Rows, value

ROWS, COLS = 32, 512
FORMATS = [*GGUF_FORMATS, "q4_0g64", "q8_0g128", "q4_1g256"]


def random_blocks(name: str, rng: np.random.Generator, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """Blocks of `name`: quantized from floats where rlx can, else random bytes with finite values
    (K-quant super-blocks: every field, scales and packed 6-bit sub-scales included, exercised)."""
    fmt = quant_format(name)
    if fmt.quantize_blocks is not None:
        return fmt.quantize(rng.standard_normal((rows, cols)).astype(np.float32))
    blocks = rng.integers(0, 256, (rows * cols // fmt.block, fmt.block_bytes), dtype=np.uint8)
    for _ in range(100):
        with np.errstate(all="ignore"):
            bad = ~np.isfinite(fmt.dequantize_blocks(blocks)).all(axis=1)
        if not bad.any():
            break
        blocks[bad] = rng.integers(0, 256, (int(bad.sum()), fmt.block_bytes), dtype=np.uint8)
    return blocks.reshape(rows, fmt.row_bytes(cols))


def _plain(fmt: QuantFormat, buf: te.Tensor) -> Callable:
    rows = Rows(buf)
    return lambda n, k: value(fmt, rows, n, k)


def _planes(fmt: QuantFormat, buf: te.Tensor) -> Callable:
    return PlaneReader(buf, planes_of(fmt), COLS).value


def _factored(fmt: QuantFormat, buf: te.Tensor) -> Callable:
    """What a GEMV computes per element: S * q + (O - zero * S), the block terms hoisted."""
    reader = PlaneReader(buf, planes_of(fmt), COLS)
    bs = reader.planes.block

    def compute(n, k):
        w = reader.scale(n, k // bs) * reader.quant(n, k).astype("float32")
        o = reader.block_offset(n, k // bs)
        return w if o is None else w + o
    return compute


READERS = {"plain": (_plain, lambda fmt, b: b), "planes": (_planes, block_planes.pack),
           "factored": (_factored, block_planes.pack)}


@pytest.fixture(scope="module")
def decoded() -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(format, reader) -> (gguf reference, the kernel expression's values), all in one module."""
    rng = np.random.default_rng(0)
    funcs, inputs = {}, {}
    for name in FORMATS:
        fmt = quant_format(name)
        blocks = random_blocks(name, rng)
        for reader, (expr, packer) in READERS.items():
            arr = packer(fmt, blocks)
            buf = te.placeholder(arr.shape, "uint8", name="buf")
            out = te.compute((ROWS, COLS), expr(fmt, buf), name="w")
            key = f"{name}_{reader}"
            funcs[key] = te.create_prim_func([buf, out]).with_attr("global_symbol", key)
            inputs[key] = (name, reader, fmt.dequantize(blocks), arr)
    lib = tvm.compile(tvm.IRModule(funcs), target="llvm")
    result = {}
    for key, (name, reader, ref, arr) in inputs.items():
        out = tvm.runtime.empty((ROWS, COLS), "float32")
        lib[key](tvm.runtime.tensor(arr), out)
        result[name, reader] = (ref, out.numpy())
    return result


@pytest.mark.parametrize("reader", ["plain", "planes"])
@pytest.mark.parametrize("name", FORMATS)
def test_decode_is_exact(decoded, name: str, reader: str) -> None:
    ref, got = decoded[name, reader]
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", FORMATS)
def test_factored_form_is_the_value_up_to_one_rounding(decoded, name: str) -> None:
    """A GEMV hoists a block's scale and offset out of the dot product: S * q + (O - zero S)
    equals the value up to the rounding of that one add (a few ulp of the block's largest term)."""
    ref, got = decoded[name, "factored"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(ref).max())


@pytest.mark.parametrize("name", FORMATS)
def test_split_planes_give_the_reference_values(name: str) -> None:
    """The numpy side of the planes (what the runtime uploads): S * (q - zero) + O, in float32,
    is gguf's dequantized weight exactly, and q fits its encoding."""
    fmt = quant_format(name)
    blocks = random_blocks(name, np.random.default_rng(1))
    q, s, o = block_planes.split(fmt, blocks)
    p = planes_of(fmt)
    scale = np.repeat(s.astype(np.float32), p.block, axis=1)
    w = scale * (q.astype(np.int32) - p.zero).astype(np.float32)
    if o is not None:
        w = w + np.repeat(o.astype(np.float32), p.block, axis=1)
    np.testing.assert_array_equal(w, fmt.dequantize(blocks))
    assert (q.min(), q.max()) >= ((0, 0) if p.quant == "u4" else (-128, -128))
    assert q.max() <= (15 if p.quant == "u4" else 127)


def test_a_k_quant_row_must_be_whole_super_blocks() -> None:
    """Factored planes hold `d` per 256 values: a row of 640 (gemma-3-270m's hidden size, which
    GGUF files store as Q5_0 / Q8_0 for this reason) is refused, not read past its plane."""
    for name in ("q4_k", "q5_k", "q6_k"):
        with pytest.raises(ValueError, match="640 values is not whole super-blocks of 256"):
            planes_of(quant_format(name)).columns(640)
    assert planes_of(quant_format("q5_0")).columns(640) == 640 + 640 // 32 * 2


def test_plane_sizes() -> None:
    """Q8_0 keeps its 34 bytes per 32 values; Q5_0 widens to 8.5 bits; K-quants keep their
    factored scales: Q4_K 4.625 bits a value (the file's 4.5, its 6-bit sc / m widened to bytes;
    float32 S / O planes took 6), Q6_K 8.5625 (values widened to bytes; 10 with float32 S); the
    array holds every group's lines."""
    sizes = {"q8_0": 8.5, "q5_0": 8.5, "q4_0": 4.5, "q4_k": 4.625, "q5_k": 8.625, "q6_k": 8.5625}
    for name, bits in sizes.items():
        p = planes_of(quant_format(name))
        assert p.columns(512) * 8 / 512 == bits
        assert p.lines(64, 512) == 4 * p.columns(512)
        assert block_planes.pack(quant_format(name), random_blocks(name, np.random.default_rng(0), 64)).shape == \
            (p.lines(64, 512), 16)


def test_il16_interleaves_rows() -> None:
    from rlx.targets.layouts import IL16, pack

    w = np.arange(32 * 3).reshape(32, 3)
    p = pack(w, IL16)
    assert p.shape == (2, 3, 16)
    assert p[1, 2, 5] == w[16 + 5, 2]
