"""rlx.hir.quant: the block formats.

At group 32 rlx's group formats must be llama.cpp's Q8_0 / Q4_0 / Q4_1 byte for byte (a GGUF's
blocks and ours are read by the same kernels), so they are checked against `gguf.quants`, the
independent reference. Other group sizes have no reference: they are checked against the
documented layout (hand-built blocks, a decoder written from the module docstring, itself
checked against gguf at group 32) and by the round-trip error each format's step allows. The
GGUF-only formats (q5_0, q5_1, K-quants) are dequantize-only: they must decode as gguf does.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rlx.hir.dtypes import DType
from rlx.hir.quant import (
    FORMATS,
    GGUF_FORMATS,
    GROUP_SIZES,
    GROUPS,
    QuantizedArray,
    dequantized,
    gguf_format_of,
    quant_format,
)
from rlx.hir.tensor_type import TensorType

FAMILIES = ("q8_0", "q4_0", "q4_1")
TWIN = {"q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1}
DEQUANT_ONLY = {"q5_0": GT.Q5_0, "q5_1": GT.Q5_1, "q4_k": GT.Q4_K, "q5_k": GT.Q5_K, "q6_k": GT.Q6_K}
# byte offsets of each block's f16 scale fields (llama.cpp's block structs): random bytes there
# could be an f16 NaN / inf; everything else in a block is integer data
SCALE_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2),
                "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
TINY = 1e-30  # below this block maximum 1 / scale overflows float32 (see _without_tiny_blocks)


def _name(family: str, group: int) -> str:
    return family if group == 32 else f"{family}g{group}"


def _random_blocks(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random blocks of format `name` whose f16 scales are finite."""
    fmt = quant_format(name)
    blocks = rng.integers(0, 256, (n, fmt.block_bytes), dtype=np.uint8)
    family = name.split("g")[0]
    for at in SCALE_FIELDS[family]:
        blocks[:, at:at + 2] = rng.standard_normal((n, 1)).astype(np.float16).view(np.uint8)
    return blocks


def _reference_dequantize(family: str, blocks: np.ndarray) -> np.ndarray:
    """The module docstring's layout, decoded by hand: an f16 scale (q4_1: then an f16 minimum),
    then int8 values (q8_0) or nibbles, value j of the first half in the low nibble of byte j and
    value j of the second half in its high nibble; q4_0 values are offset by 8."""
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    if family == "q8_0":
        return scale * blocks[:, 2:].view(np.int8).astype(np.float32)
    packed = blocks[:, 4:] if family == "q4_1" else blocks[:, 2:]
    nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
    if family == "q4_0":
        return scale * (nibbles - 8)
    return scale * nibbles + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)


def _without_tiny_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x with every block whose largest magnitude is below TINY set to zero. There 1 / scale is
    inf in float32 and gguf's own bytes are undefined (it casts inf / NaN to uint8); both
    implementations store a zero f16 scale, see test_tiny_blocks_decode_as_gguf_does."""
    b = x.reshape(-1, block).copy()
    b[np.abs(b).max(axis=1) < TINY] = 0
    return b.reshape(x.shape)


# ---- the format table ----

# name: (values per block, bytes per block, bits per value), from llama.cpp's block structs and
# for group g: 2 (q4_1: 4) scale bytes + g values of 8 or 4 bits
SIZES = {
    "q8_0": (32, 34, 8.5), "q8_0g64": (64, 66, 8.25), "q8_0g128": (128, 130, 8.125),
    "q8_0g256": (256, 258, 8.0625),
    "q4_0": (32, 18, 4.5), "q4_0g64": (64, 34, 4.25), "q4_0g128": (128, 66, 4.125),
    "q4_0g256": (256, 130, 4.0625),
    "q4_1": (32, 20, 5.0), "q4_1g64": (64, 36, 4.5), "q4_1g128": (128, 68, 4.25),
    "q4_1g256": (256, 132, 4.125),
    "q5_0": (32, 22, 5.5), "q5_1": (32, 24, 6.0),
    "q4_k": (256, 144, 4.5), "q5_k": (256, 176, 5.5), "q6_k": (256, 210, 6.5625),
}


def test_format_table_lists_every_format_once() -> None:
    assert set(FORMATS) == set(SIZES)
    assert GGUF_FORMATS == ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
    assert set(GROUPS) == set(FAMILIES) and GROUP_SIZES == (32, 64, 128, 256)
    assert all(FORMATS[n].name == n and quant_format(n) is FORMATS[n] for n in FORMATS)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes(name: str) -> None:
    """Block geometry decides every buffer size the compiled module allocates."""
    fmt = quant_format(name)
    block, nbytes, bits = SIZES[name]
    assert (fmt.block, fmt.block_bytes, fmt.bits) == (block, nbytes, bits)
    assert fmt.row_bytes(3 * block) == 3 * nbytes
    assert fmt.fits(block) and fmt.fits(4 * block)
    assert not fmt.fits(block + 16) and not fmt.fits(block // 2)


def test_gguf_twins_have_gguf_block_sizes() -> None:
    """A format that claims a GGUF type has that type's geometry (gguf's own table); the other
    group sizes claim none, so a GGUF tensor is never taken for one of them."""
    for name, fmt in FORMATS.items():
        if name in GGUF_FORMATS:
            assert fmt.gguf_type == name.upper()
            assert (fmt.block, fmt.block_bytes) == gguf.GGML_QUANT_SIZES[GT[name.upper()]]
        else:
            assert fmt.gguf_type is None, name


@pytest.mark.parametrize("bad", ["q3_0", "q4_0g48", "q4_0g32", "q8_0g512", "f32", ""])
def test_unknown_format_names_list_the_known_ones(bad: str) -> None:
    with pytest.raises(ValueError, match=r"unknown quantized format .*known: q8_0, .*q4_0g64"):
        quant_format(bad)


def test_gguf_format_of_keeps_only_block_types_rlx_computes_with() -> None:
    assert gguf_format_of("Q8_0") is FORMATS["q8_0"]
    assert gguf_format_of("Q4_1") is FORMATS["q4_1"]
    assert gguf_format_of("q6_k") is FORMATS["q6_k"]
    for other in ("F32", "F16", "BF16", "IQ2_XXS", "Q8_1", "Q2_K", "Q4_0G64", "q4_0g64"):
        assert gguf_format_of(other) is None, other


# ---- group 32: byte-identical to gguf ----

@pytest.mark.parametrize("family", FAMILIES)
def test_group32_quantize_is_byte_identical_to_gguf(family: str) -> None:
    """Random weights over nine decades of scale, with leading dims (a [layers, N, K] stack)."""
    rng = np.random.default_rng(1)
    fmt = quant_format(family)
    for scale in (1e-4, 1e-2, 1.0, 1e2, 1e4):
        x = (rng.standard_normal((3, 7, 256)) * scale).astype(np.float32)
        ours = fmt.quantize(x)
        assert ours.dtype == np.uint8 and ours.shape == (3, 7, 8 * SIZES[family][1])
        np.testing.assert_array_equal(ours, gguf.quants.quantize(x, TWIN[family]), err_msg=f"scale {scale}")


def _edge_blocks() -> np.ndarray:
    """Blocks where rounding and tie-breaking decide the bytes."""
    ramp = np.linspace(-0.5, 0.5, 30)
    below = np.nextafter(np.float32(0.5), np.float32(0))
    rows = [
        np.zeros(32), np.full(32, 3.3), np.full(32, -0.7),
        np.r_[1.0, -1.0, ramp], np.r_[-1.0, 1.0, ramp],          # +max and -max: the first one is the max
        np.r_[np.zeros(31), 5.0], np.r_[-5.0, np.zeros(31)],
        np.r_[127.0, below, [k + 0.5 for k in range(30)]],       # q8 scale 1: exact halves round away
        np.r_[127.0, below, [np.nextafter(np.float32(k + 0.5), np.float32(0)) for k in range(30)]],
        np.r_[2.902939, 1.7029052, np.zeros(30)],  # q8: x / d is 74.49999, x * (1 / d) 74.5 (ggml's): 75
        np.r_[-8.0, [k + 0.5 for k in range(-8, 7)], np.arange(-8, 8)],  # q4_0 scale 1: halves
        np.r_[0.0, 15.0, np.arange(15) + 0.5, np.arange(15)],   # q4_1 scale 1, minimum 0: halves
        np.linspace(-6e4, 6e4, 32), np.linspace(1000.0, 1000.01, 32),
    ]
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_group32_edge_blocks_match_gguf(family: str) -> None:
    x = _edge_blocks()
    np.testing.assert_array_equal(quant_format(family).quantize(x), gguf.quants.quantize(x, TWIN[family]))


@st.composite
def weights(draw: st.DrawFn, block: int) -> np.ndarray:
    """[rows, K] float32: hypothesis' arrays (repeated values, ties, zeros, extremes), optionally
    plus dense gaussian noise, at a scale between 1e-4 and 10 (largest value 1e4)."""
    rows, nblocks = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    base = draw(arrays(np.float32, (rows, nblocks * block),
                       elements=st.floats(-1000, 1000, width=32, allow_subnormal=False)))
    if draw(st.booleans()):
        noise = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(base.shape)
        base = base + (noise * draw(st.sampled_from([1e-3, 1.0, 100.0]))).astype(np.float32)
    scale = np.float32(10.0 ** draw(st.integers(-4, 1)))
    return (base * scale).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(FAMILIES), weights(32))
def test_property_group32_matches_gguf(family: str, x: np.ndarray) -> None:
    x = _without_tiny_blocks(x, 32)
    ours = quant_format(family).quantize(x)
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, TWIN[family]))
    np.testing.assert_array_equal(quant_format(family).dequantize(ours), gguf.quants.dequantize(ours, TWIN[family]))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_blocks_decode_as_gguf_does(family: str) -> None:
    """Blocks of subnormal-sized values: 1 / scale overflows, so the nibbles differ from gguf's
    (undefined there), but the f16 scale is 0 in both, and so is every value they decode to."""
    x = np.r_[np.linspace(-1e-40, 1e-40, 32), np.r_[1e-45, np.zeros(31)]].astype(np.float32)[None]
    with np.errstate(all="ignore"):
        ours, ref = quant_format(family).quantize(x), gguf.quants.quantize(x, TWIN[family])
    decoded = quant_format(family).dequantize(ours)
    np.testing.assert_array_equal(decoded, gguf.quants.dequantize(ref, TWIN[family]))
    assert not np.any(decoded)


@pytest.mark.parametrize("family", FAMILIES)
def test_group32_dequantize_matches_gguf_on_random_bytes(family: str) -> None:
    """Every byte pattern, not only the ones our quantizer writes (a GGUF's blocks come from
    llama.cpp); the hand decoder agrees too, which is what lets it check the other groups."""
    blocks = _random_blocks(family, 4 * 6, np.random.default_rng(2)).reshape(4, -1)
    ours = quant_format(family).dequantize(blocks)
    ref = gguf.quants.dequantize(blocks, TWIN[family])
    assert ours.dtype == np.float32 and ours.shape == (4, 6 * 32) and np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(_reference_dequantize(family, blocks.reshape(-1, SIZES[family][1])),
                                  ref.reshape(-1, 32))


# ---- every group size: the documented layout ----

@pytest.mark.parametrize("group", GROUP_SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_dequantize_follows_the_documented_layout(family: str, group: int) -> None:
    name = _name(family, group)
    blocks = _random_blocks(name, 5, np.random.default_rng(group))
    ours = quant_format(name).dequantize(blocks.reshape(1, -1))
    assert ours.shape == (1, 5 * group)
    np.testing.assert_array_equal(ours.reshape(5, group), _reference_dequantize(family, blocks))


def _grid_block(family: str, group: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Values on the format's grid, so quantizing is exact, and the block's bytes built by hand
    (f16 scale 2^-4 is bytes 00 2C, 2^-3 is 00 30, -1.0 is 00 BC)."""
    if family == "q8_0":  # scale = max|x| / 127 = 2^-4: x = k / 16, k in [-127, 127], one |k| = 127
        k = rng.integers(-126, 127, group)
        k[rng.integers(group)] = rng.choice([-127, 127])
        return (k / 16).astype(np.float32), [0x00, 0x2C, *(int(v) & 0xFF for v in k)]
    if family == "q4_0":  # scale = m / -8 for m the value of largest magnitude = -1.0: 2^-3
        q = rng.integers(1, 16, group)  # stored nibble q, value (q - 8) / 8: magnitudes below 1
        q[rng.integers(group)] = 0  # the one -1.0
        x, head = (q - 8) / 8, [0x00, 0x30]
    else:  # q4_1: minimum -1.0, scale (max - min) / 15 = 2^-3, value -1 + q / 8
        q = rng.integers(0, 16, group)
        q[:2] = [0, 15]
        x, head = -1 + q / 8, [0x00, 0x30, 0x00, 0xBC]
    half = group // 2
    return x.astype(np.float32), head + [int(q[j]) | int(q[j + half]) << 4 for j in range(half)]


@pytest.mark.parametrize("group", GROUP_SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_grid_values_pack_as_documented(family: str, group: int) -> None:
    rng = np.random.default_rng(group)
    rows = [_grid_block(family, group, rng) for _ in range(3)]
    x = np.concatenate([r[0] for r in rows])[None]  # one row of three blocks
    fmt = quant_format(_name(family, group))
    packed = fmt.quantize(x)
    assert packed.tolist() == [[b for r in rows for b in r[1]]]
    np.testing.assert_array_equal(fmt.dequantize(packed), x)  # grid values come back exactly


@pytest.mark.parametrize("group", GROUP_SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_blocks(family: str, group: int) -> None:
    """A zero block has scale 0 (q4_0: -0.0, since its scale is max / -8, as in gguf: bytes
    00 80) and decodes to zeros, next to a nonzero block of the same row."""
    fmt = quant_format(_name(family, group))
    zero_bytes = {"q8_0": [0, 0] + [0] * group, "q4_0": [0x00, 0x80] + [0x88] * (group // 2),
                  "q4_1": [0, 0, 0, 0] + [0] * (group // 2)}[family]
    x = np.zeros((2, 2 * group), np.float32)
    x[1, :group] = np.linspace(-1, 2, group)
    packed = fmt.quantize(x)
    assert packed[0].tolist() == zero_bytes * 2 and packed[1, fmt.block_bytes:].tolist() == zero_bytes
    back = fmt.dequantize(packed)
    assert not np.any(back[0]) and not np.any(back[1, group:]) and np.any(back[1, :group])


def _error_bound(family: str, x: np.ndarray) -> np.ndarray:
    """The largest |dequantize(quantize(x)) - x| each value of blocks x [n, g] may have.

    In float64, with amax = max|x| over the block and f16(s) the stored scale (relative error at
    most 2^-11 for a normal f16, absolute at most 2^-25 for a subnormal one):
    - q8_0: d = amax / 127, q = round(x / d) in [-127, 127]: |x - d q| <= d / 2, and the stored
      scale adds |q| |d - f16(d)| <= 127 |d - f16(d)| (about 0.06 d).
    - q4_0: d = m / -8 for m the value of largest magnitude, t = x / d in [-8, 8], stored as
      q = clip(round-half-up(t), -8, 7). m itself is t = -8, exact; only values of the other
      sign reach t >= 7.5 and clip to 7, off by |t - 7| <= 1 step. So |x - d q| <= |d| / 2 where
      t < 7.5, else <= |d|; the scale adds |q| |d - f16(d)| <= 8 |d - f16(d)|.
    - q4_1: d = (max - min) / 15, t = (x - min) / d in [0, 15], q = round-half-up(t), no
      clipping: |x - min - d q| <= d / 2, the f16 scale adds 15 |d - f16(d)| and the f16
      minimum |min - f16(min)|.
    Plus float32 arithmetic (the codes compute x / d, x - min and d q + min in float32): a
    computed t is off by a relative 2^-22 at most (1e-4 steps is ample, t <= 127), and the
    result's own rounding is below 2^-20 amax.
    """
    x = x.astype(np.float64)
    amax = np.abs(x).max(axis=1, keepdims=True)

    def f16_err(v: np.ndarray) -> np.ndarray:
        return np.abs(v) * 2.0 ** -11 + 2.0 ** -25

    if family == "q8_0":
        d = amax / 127
        bound = d / 2 + 127 * f16_err(d)
    elif family == "q4_0":
        m = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
        d = np.abs(m) / 8
        with np.errstate(divide="ignore", invalid="ignore"):
            clipped = x / (m / -8) >= 7.5
        bound = np.where(clipped, d, d / 2) + 8 * f16_err(d)
    else:
        lo = x.min(axis=1, keepdims=True)
        d = (x.max(axis=1, keepdims=True) - lo) / 15
        bound = d / 2 + 15 * f16_err(d) + f16_err(lo)
    return bound + 1e-4 * d + 2.0 ** -20 * amax


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(FAMILIES), st.sampled_from(GROUP_SIZES), st.data())
def test_property_round_trip_error_is_within_the_step(family: str, group: int, data: st.DataObject) -> None:
    x = _without_tiny_blocks(data.draw(weights(group)), group)
    fmt = quant_format(_name(family, group))
    packed = fmt.quantize(x)
    assert packed.shape == (x.shape[0], fmt.row_bytes(x.shape[1]))
    back = fmt.dequantize(packed)
    assert back.shape == x.shape and back.dtype == np.float32
    err = np.abs(back.astype(np.float64) - x).reshape(-1, group)
    bound = _error_bound(family, x.reshape(-1, group))
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"{fmt.name}: |err| {err[worst]:.6g} > {bound[worst]:.6g} at block {worst[0]}"


def test_error_bound_is_tight_enough_to_catch_truncation() -> None:
    """The bound is no formality: rounding toward zero (a plausible bug) breaks it."""
    x = np.linspace(-1, 1, 32, dtype=np.float32)[None]
    d = 1 / 127
    truncated = np.trunc(x / d) * np.float32(np.float16(d))
    assert (np.abs(truncated - x) > _error_bound("q8_0", x)).any()


# ---- GGUF-only formats: read as stored ----

@pytest.mark.parametrize("name", sorted(DEQUANT_ONLY))
def test_dequantize_only_formats_refuse_floats(name: str) -> None:
    fmt = quant_format(name)
    assert fmt.quantize_blocks is None
    with pytest.raises(ValueError, match=f"{name} cannot be computed from floats"):
        fmt.quantize(np.zeros((2, fmt.block), np.float32))


@pytest.mark.parametrize("name", sorted(DEQUANT_ONLY))
def test_dequantize_only_formats_decode_as_gguf(name: str) -> None:
    fmt = quant_format(name)
    blocks = _random_blocks(name, 3 * 2, np.random.default_rng(3)).reshape(3, 2 * fmt.block_bytes)
    ours = fmt.dequantize(blocks)
    assert ours.dtype == np.float32 and ours.shape == (3, 2 * fmt.block) and np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(blocks, DEQUANT_ONLY[name]))


# ---- QuantizedArray, and quantized types in the text form ----

def test_quantized_array_rows_and_cached_dense() -> None:
    """An embedding reads only the rows it needs; the dense copy is computed once."""
    fmt = quant_format("q4_0g64")
    blocks = _random_blocks("q4_0g64", 4 * 2, np.random.default_rng(4)).reshape(4, 2 * fmt.block_bytes)
    q = QuantizedArray(fmt, blocks)
    assert q.shape == (4, 128)
    full = _reference_dequantize("q4_0", blocks.reshape(-1, fmt.block_bytes)).reshape(4, 128)
    rows = q.rows(np.array([3, 0, 3]))
    assert rows.shape == (3, 128)
    np.testing.assert_array_equal(rows.dequantize(), full[[3, 0, 3]])
    dense = dequantized(q)
    np.testing.assert_array_equal(dense, full)
    assert dequantized(q) is dense and not rows.dense


@pytest.mark.parametrize("text", ["q4_0[6, 32]", "q4_0g64[6, 64]", "q6_k[2, 256]", "q8_0[SEQ, 32]"])
def test_quantized_types_round_trip_as_text(text: str) -> None:
    t = TensorType.parse(text)
    assert t.is_quantized and t.dtype is DType.F32 and t.quant == text.split("[")[0]
    assert str(t) == text
    assert str(t.with_quant(None)) == "f32" + text[text.index("["):]


@pytest.mark.parametrize("name", ["q4_0g48", "q3_k", "q4", "q8_0g16"])
def test_an_unknown_format_is_not_a_type_and_the_error_lists_the_formats(name: str) -> None:
    with pytest.raises(ValueError, match=rf"bad type '{name}\[6, 48\]': unknown quantized format '{name}' "
                                         r"\(known: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k; q8_0g64, .*q4_1g256\)"):
        TensorType.parse(f"{name}[6, 48]")


def test_an_unknown_element_type_lists_dtypes_and_formats() -> None:
    with pytest.raises(ValueError, match=r"unknown element type 'f33' \(dtypes: f32, f16, .*; quantized formats: "
                                         r"q8_0, .*q4_0g64"):
        TensorType.parse("f33[6, 48]")


def test_with_dtype_refuses_a_quantized_type() -> None:
    """A quantized type's dtype is the float32 its blocks are read as: changing it would have
    silently dropped the format (a dense tensor of another dtype); callers dequantize on purpose."""
    q = TensorType.parse("q4_0[6, 64]")
    with pytest.raises(ValueError, match=r"q4_0\[6, 64\] is quantized"):
        q.with_dtype(DType.F16)
    assert str(q.with_quant(None).with_dtype(DType.F16)) == "f16[6, 64]"
    assert str(TensorType.parse("f32[6, 64]").with_dtype(DType.BF16)) == "bf16[6, 64]"


def test_a_cast_of_a_quantized_value_fails_verify_as_an_hir_error() -> None:
    """The op's type rule says so (verify's HIRError), instead of with_dtype's ValueError escaping."""
    from rlx.errors import HIRError
    from rlx.hir.graph import HIR, Node
    from rlx.hir.ops import Op
    from rlx.hir.verify import verify

    h = HIR("cast")
    w = h.param("w", TensorType(DType.F32, (8, 64), "q8_0"))
    h.insert_raw(Node("c", Op.CAST, (w,), TensorType(DType.F16, (8, 64)), (("dtype", "f16"),)))
    h.raw_set_output("c", "c")
    with pytest.raises(HIRError, match=r"types: %c \(cast\): cannot cast quantized q8_0\[8, 64\]"):
        verify(h)


def test_quantized_array_equality_is_one_bool_and_it_is_unhashable() -> None:
    """Same format and same blocks (shape and bytes): equal; anything else: not equal, never
    numpy's elementwise `==` (whose truth value raises). Unhashable, as its ndarray is."""
    fmt = quant_format("q8_0")
    blocks = fmt.quantize(np.random.default_rng(8).standard_normal((4, 64)).astype(np.float32))
    q = QuantizedArray(fmt, blocks)
    assert q == QuantizedArray(quant_format("q8_0"), blocks.copy())
    dequantized(q)  # the cached dense copy does not take part
    assert q == QuantizedArray(fmt, blocks.copy()) and not q != QuantizedArray(fmt, blocks.copy())
    other = blocks.copy()
    other[0, 5] ^= 1
    assert q != QuantizedArray(fmt, other)
    assert q != QuantizedArray(fmt, blocks[:2])                      # other shape
    assert q != QuantizedArray(quant_format("q4_1g64"), blocks[:, :48])  # other format (same byte count per row)
    assert q != blocks and q != q.dequantize() and q != "q8_0"
    assert (blocks == q) is False and (q.dequantize() != q) is True  # an ndarray on the left defers to q
    assert q in [QuantizedArray(fmt, blocks.copy())]
    with pytest.raises(TypeError, match="unhashable"):
        hash(q)
