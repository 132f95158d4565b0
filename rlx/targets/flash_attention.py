"""Flash-style attention kernels (CPU), and the paged KV cache's page write.

`flash_attention(FlashSpec)` generates one TIR kernel for both caches; the only difference is
where key position j of a query's sequence lives (`FlashSpec.paged`):
- contiguous (`attention` over the single-sequence cache, or a prefill's own K/V): row j % CAP
  of the batch's buffer [B, Hk, CAP, D], valid for j < length (the modulo: a sliding-window
  layer's cache may be a ring of CAP < length rows, `kv_cache.py`; otherwise it is the identity);
- paged (`paged_attention`): slot j % PAGE of page `page_table[token_seq[t], j // PAGE]`.

The kernel never materialises scores. A query tile is `qt` consecutive query tokens times the
`group` query heads of one KV head (rows sharing every key row loaded; prefill 8 rows, decode
and paged 1 token); a work item is up to BLOCK_ROWS rows of such tiles, so a key tile loaded
from memory serves all of them while it is in cache. A work item walks the union of its rows'
key ranges [lo, hi] (lo = p - window + 1 on a sliding layer, so a long prompt costs O(S x W)
there) in tiles of KEY_TILE keys, and each query tile that meets the key tile:
  1. scores of its rows x the tile's keys, register-blocked: `lanes`-wide partial sums over D,
     `jb` keys at a time;
  2. online softmax per row: scale, softcap (rational tanh), mask outside [lo, hi], running max
     m and sum l, the accumulator rescaled by exp(m_old - m_new) (a polynomial exp, vectorised);
  3. acc[rows, Dv] += p @ V, the rows' lane vectors held in registers over the tile's keys.
State is (m, l, acc) per query row, O(S x Dv) in all; no [S, T] buffer exists.

Decode has one query token: to use every core, the key range of a work item is split into
chunks (2 per core when there are fewer work items than cores) that run in parallel; a second
parallel loop merges each row's chunks (flash-decoding) and writes the output (with one chunk:
acc / l).

Against the reference (`interpreter._attention`, materialised): summation order differs (lane
partial sums, per-tile rescaling), exp / tanh are polynomial approximations (relative error
~1e-7), and f16 / bf16 probabilities stay f32 through the value product (the reference rounds
the normalised ones to v's dtype): rtol 1e-5 in f32, f16's own rounding in f16. A query with no
visible key (a padding row past the cache) gets zeros, where the reference averages every key.

The kernel is CPU TIR, already scheduled (parallel, vectorised, unrolled loops): the lowering
emits it with default lanes and the `flash-attention` schedule rule regenerates it for the
target's vector width (`schedules.FlashAttention`). GPU targets keep the materialised lowering.

`paged_kv_write` is TVMScript (TE cannot write into an input): the pool is the engine's buffer,
written in place with `call_tir_inplace`, as `kernels.kv_write` does for the contiguous cache.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from tvm import te, tirx

from rlx.targets.kernels import _product

PAGED_KV_WRITE = "rlx_paged_kv_write"
PAGED_SCORES = "rlx_paged_scores"
PAGED_VALUES = "rlx_paged_values"


def paged_kv_write(dtype: str, page: int, d: int) -> tirx.PrimFunc:
    """`pages[page_table[token_seq[t], p // PAGE], h, p % PAGE, :] = new[0, h, t, :]` with
    p = positions[0, t], in place. One function per (dtype, page size, head size)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, check_well_formed=False)
    def write(var_pages: T.handle, var_new: T.handle, var_table: T.handle, var_seq: T.handle,
              var_pos: T.handle) -> None:
        T.func_attr({"tir.noalias": True})
        n_pages, heads, tokens, seqs, cols = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        pages = T.match_buffer(var_pages, (n_pages, heads, page, d), dtype)
        new = T.match_buffer(var_new, (1, heads, tokens, d), dtype)
        table = T.match_buffer(var_table, (seqs, cols), "int32")
        seq = T.match_buffer(var_seq, (tokens,), "int32")
        pos = T.match_buffer(var_pos, (1, tokens), "int32")
        with T.sblock("root"):
            for t, h, m in T.grid(tokens, heads, d):
                with T.sblock(PAGED_KV_WRITE):
                    vt, vh, vm = T.axis.remap("SSS", [t, h, m])
                    p = T.Cast("int64", pos[0, vt])
                    slot = T.Cast("int64", table[T.Cast("int64", seq[vt]), p // page])
                    T.reads(new[0, vh, vt, vm], pos[0, vt], seq[vt], table[0:seqs, 0:cols])
                    T.writes(pages[0:n_pages, vh, 0:page, vm])
                    pages[slot, vh, p % page, vm] = new[0, vh, vt, vm]

    return write


def _key_row(pages: te.Tensor, table: te.Tensor, seq: te.Tensor, t: tirx.PrimExpr, j: tirx.PrimExpr,
             ) -> tuple[tirx.PrimExpr, tirx.PrimExpr]:
    """(page, slot) of key position j of token t's sequence; the page id is clamped into the pool
    so that a masked key past the sequence's last page (whose table entry is ignored) reads
    memory of the pool, not past it."""
    size = pages.shape[2]
    page = table[seq[t].astype("int64"), j // size].astype("int64")
    page = tirx.max(tirx.min(page, pages.shape[0] - 1), tirx.const(0, "int64"))
    return page, j % size


def paged_scores(q: te.Tensor, k_pages: te.Tensor, table: te.Tensor, seq: te.Tensor) -> te.Tensor:
    """`q @ k^T` of each token against key positions 0..MAX_PAGES * PAGE - 1 of its sequence
    (materialised: the first, plain lowering; masked afterwards)."""
    group = int(q.shape[1]) // int(k_pages.shape[1])
    d = te.reduce_axis((0, q.shape[-1]), name="d")
    keys = table.shape[1] * k_pages.shape[2]

    def body(b: tirx.PrimExpr, h: tirx.PrimExpr, t: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
        page, slot = _key_row(k_pages, table, seq, t, j)
        return te.sum(_product(q[b, h, t, d], k_pages[page, h // group, slot, d]), axis=d)

    return te.compute((q.shape[0], q.shape[1], q.shape[2], keys), body, name=PAGED_SCORES)


def paged_values(p: te.Tensor, v_pages: te.Tensor, table: te.Tensor, seq: te.Tensor) -> te.Tensor:
    """`probs @ v` over the same key positions as `paged_scores`."""
    group = int(p.shape[1]) // int(v_pages.shape[1])
    j = te.reduce_axis((0, p.shape[-1]), name="j")

    def body(b: tirx.PrimExpr, h: tirx.PrimExpr, t: tirx.PrimExpr, e: tirx.PrimExpr) -> tirx.PrimExpr:
        page, slot = _key_row(v_pages, table, seq, t, j)
        return te.sum(_product(p[b, h, t, j], v_pages[page, h // group, slot, e]), axis=j)

    return te.compute((p.shape[0], p.shape[1], p.shape[2], v_pages.shape[3]), body, name=PAGED_VALUES)


FLASH_ATTR = "rlx.flash"  # the FlashSpec (JSON) a flash kernel was generated from
OPAQUE = 8  # relax's OpPatternKind.kOpaque
F32 = "float32"
NEG = -3.0e38  # a masked score: finite, so that m_old - m_new never makes inf - inf


def fast_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """exp(x) for float32 as Cephes' expf (TVM's `topi.fast_exp` polynomial, with the range
    reduction x = n ln2 + f in two parts so that f keeps its precision at large |x|): max relative
    error ~2e-7, one vectorisable expression (LLVM's exp is a scalar libm call per element)."""
    def c(v: float) -> tirx.PrimExpr:
        return tirx.const(v, F32)

    x = tirx.max(tirx.min(x, c(88.3762626647950)), c(-88.3762626647949))
    n = tirx.floor(x * c(1.44269504088896341) + c(0.5))
    f = x - n * c(0.693359375) - n * c(-2.12194440e-4)
    y = c(1.9875691500e-4)
    for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        y = y * f + c(k)
    y = y * f * f + f + c(1.0)
    two_n = tirx.reinterpret(F32, tirx.shift_left((n + c(127.0)).astype("int32"), tirx.const(23, "int32")))
    return two_n * y


def fast_tanh(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """tanh(x) for float32 as TVM's `topi.fast_tanh` (a 13/6 rational function on [-9, 9]; max
    abs error 3.8e-7), as one vectorisable expression."""
    def c(v: float) -> tirx.PrimExpr:
        return tirx.const(v, F32)

    x = tirx.max(tirx.min(x, c(9.0)), c(-9.0))
    x2 = x * x
    p = c(-2.76076847742355e-16)
    for k in (2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08, 1.48572235717979e-05,
              6.37261928875436e-04, 4.89352455891786e-03):
        p = p * x2 + c(k)
    q = c(1.19825839466702e-06)
    for k in (1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03):
        q = q * x2 + c(k)
    return x * p / q


@dataclass(frozen=True)
class FlashSpec:
    """Everything a flash kernel is generated from (static); `lanes`, `regs` and `cores` are
    the target's (`schedules.FlashAttention` fills them)."""

    paged: bool
    heads: int           # query heads
    kv_heads: int
    d: int               # q / k head size
    dv: int              # v head size
    dtype: str           # q's
    kv_dtype: str
    out_dtype: str
    pos_dtype: str
    scale: float = 1.0
    softcap: float = 0.0
    window: int = 0
    page: int = 0        # positions per page (paged)
    lanes: int = 16      # f32 lanes of one vector register
    regs: int = 32       # vector registers
    cores: int = 1       # threads the kernel can use (decode splits its keys over them)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> FlashSpec:
        return FlashSpec(**json.loads(text))

    def for_target(self, lanes: int, regs: int, cores: int) -> FlashSpec:
        return replace(self, lanes=lanes, regs=regs, cores=cores)


def _divisor_lanes(n: int, most: int) -> int:
    """The widest power of two <= most dividing n (a head size's vector chunks)."""
    lanes = most
    while lanes > 1 and n % lanes:
        lanes //= 2
    return lanes


@functools.lru_cache(maxsize=256)
def flash_attention(spec: FlashSpec) -> tirx.PrimFunc:
    """The kernel for `spec` (see the module docstring). Parameters: q, k, v, positions, then
    (paged) page_table, token_seq or (contiguous) the valid key count `length`, then the output.
    Cached per spec (PrimFuncs are immutable): parsing the TVMScript takes ~1 s, and every layer
    of a model (and the schedule rule, per target) asks for the same few specs."""
    from tvm.script import tirx as T

    if spec.paged:
        @T.prim_func(private=True, check_well_formed=False)
        def paged(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle, var_table: T.handle,
                  var_seq: T.handle, var_out: T.handle) -> None:
            T.func_attr({"tir.noalias": True})
            tokens, n_pages, seqs, cols = T.int64(), T.int64(), T.int64(), T.int64()
            q = T.match_buffer(var_q, (1, spec.heads, tokens, spec.d), spec.dtype)
            k = T.match_buffer(var_k, (n_pages, spec.kv_heads, spec.page, spec.d), spec.kv_dtype)
            v = T.match_buffer(var_v, (n_pages, spec.kv_heads, spec.page, spec.dv), spec.kv_dtype)
            pos = T.match_buffer(var_pos, (1, tokens), spec.pos_dtype)
            table = T.match_buffer(var_table, (seqs, cols), "int32")
            seq = T.match_buffer(var_seq, (tokens,), "int32")
            out = T.match_buffer(var_out, (1, spec.heads, tokens, spec.dv), spec.out_dtype)
            _flash_body(spec, 1)(q, k, v, pos, table, seq, out, None, T.int64(1), tokens)

        return _opaque(paged, spec)

    @T.prim_func(private=True, check_well_formed=False)
    def contiguous(var_q: T.handle, var_k: T.handle, var_v: T.handle, var_pos: T.handle, length: T.int64,
                   var_out: T.handle) -> None:
        T.func_attr({"tir.noalias": True})
        batch, tokens, cap = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (batch, spec.heads, tokens, spec.d), spec.dtype)
        k = T.match_buffer(var_k, (batch, spec.kv_heads, cap, spec.d), spec.kv_dtype)
        v = T.match_buffer(var_v, (batch, spec.kv_heads, cap, spec.dv), spec.kv_dtype)
        pos = T.match_buffer(var_pos, (batch, tokens), spec.pos_dtype)
        out = T.match_buffer(var_out, (batch, spec.heads, tokens, spec.dv), spec.out_dtype)
        if tokens == 1:  # decode: one query token per tile (the prefill tile would be half padding)
            _flash_body(spec, 1)(q, k, v, pos, None, None, out, length, batch, tokens)
        else:
            _flash_body(spec, max(1, PREFILL_ROWS // spec.group))(q, k, v, pos, None, None, out, length, batch,
                                                                   tokens)

    return _opaque(contiguous, spec)


PREFILL_ROWS = 8  # query rows (tokens x heads of a KV group) sharing each key row a tile loads
BLOCK_ROWS = 64   # query rows of one work item: they share every key tile while it is in cache
KEY_TILE = 16


def _flash_body(spec: FlashSpec, qt: int) -> Callable[..., None]:  # noqa: C901 (one kernel, its stages in order)
    """The kernel's body for tiles of `qt` query tokens (a TVMScript macro; every Python value it
    reads is a constant of the generated code)."""
    from tvm.script import tirx as T

    g, hk, d, dv = spec.group, spec.kv_heads, spec.d, spec.dv
    rows = qt * g
    ld, lv = _divisor_lanes(d, spec.lanes), _divisor_lanes(dv, spec.lanes)
    kt = KEY_TILE
    # score accumulators: at most half the vector registers, and under 1 KiB (TVM puts a larger
    # buffer on the heap, where LLVM cannot keep it in registers)
    jb = max(1, min(kt, spec.regs // 2, 1020 // (4 * ld)) // rows)
    while kt % jb:
        jb -= 1
    most_tiles = max(1, BLOCK_ROWS // rows)
    page, window, softcap, scale = spec.page, spec.window, spec.softcap, spec.scale
    max_splits = 2 * spec.cores if spec.cores > 1 else 1
    big = 1 << 62
    i64 = functools.partial(tirx.IntImm, "int64")

    def f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.Cast(F32, x)

    def lane_sum(buf: tirx.Buffer, base: tirx.PrimExpr, n: int) -> tirx.PrimExpr:
        """buf[base] + ... + buf[base + n - 1] as a tree (the lanes of one partial-sum vector)."""
        terms = [buf[base + i] for i in range(n)]
        while len(terms) > 1:
            terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
        return terms[0]

    # the work decomposition, as expressions of the buffer dims only (buffer sizes may not
    # depend on let-bound values)
    def tiles(tokens: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.indexdiv(tokens + qt - 1, qt)

    def per_block(tokens: tirx.PrimExpr) -> tirx.PrimExpr:
        """Query tiles per work item: up to BLOCK_ROWS rows, fewer when that leaves cores idle."""
        return tirx.max(i64(1), tirx.min(i64(most_tiles), tirx.indexdiv(tiles(tokens), i64(2 * spec.cores))))

    def blocks(tokens: tirx.PrimExpr) -> tirx.PrimExpr:
        return tirx.indexdiv(tiles(tokens) + per_block(tokens) - 1, per_block(tokens))

    def splits(batch: tirx.PrimExpr, tokens: tirx.PrimExpr) -> tirx.PrimExpr:
        """Key-range chunks per work item: 2 per core when the work items leave cores idle (decode)."""
        return tirx.if_then_else(batch * hk * blocks(tokens) < spec.cores, i64(max_splits), i64(1))

    def state_rows(batch: tirx.PrimExpr, tokens: tirx.PrimExpr) -> tirx.PrimExpr:
        return batch * hk * blocks(tokens) * splits(batch, tokens) * per_block(tokens) * rows

    @T.macro
    def body(q, k, v, pos, table, seq, out, length, batch, tokens) -> None:  # noqa: ANN001
        # per (task, tile, row): the running max, sum and output accumulator of the online softmax
        st_m = T.decl_buffer((state_rows(batch, tokens),), F32)
        st_l = T.decl_buffer((state_rows(batch, tokens),), F32)
        st_acc = T.decl_buffer((state_rows(batch, tokens) * dv,), F32)
        kf = T.decl_buffer((k.shape[0] * k.shape[1] * k.shape[2] * d,), spec.kv_dtype, data=k.data)
        vf = T.decl_buffer((v.shape[0] * v.shape[1] * v.shape[2] * dv,), spec.kv_dtype, data=v.data)
        for task in T.parallel(batch * hk * blocks(tokens) * splits(batch, tokens)):
            w = task // splits(batch, tokens)
            split = task % splits(batch, tokens)
            b = w // (hk * blocks(tokens))
            kvh = (w // blocks(tokens)) % hk
            first = (w % blocks(tokens)) * per_block(tokens)  # this work item's first query tile
            n_sub = T.min(per_block(tokens), tiles(tokens) - first)
            base = task * per_block(tokens) * rows  # its state rows
            lo = T.decl_buffer((BLOCK_ROWS + rows,), "int64")  # each row's visible keys [lo, hi]
            hi = T.decl_buffer((BLOCK_ROWS + rows,), "int64")
            sub_lo = T.decl_buffer((most_tiles,), "int64")     # each tile's union of them
            sub_hi = T.decl_buffer((most_tiles,), "int64")
            span = T.decl_buffer((2,), "int64")                # the work item's union
            krow = T.decl_buffer((kt,), "int64")
            kb = T.decl_buffer((jb,), "int64")
            s = T.decl_buffer((rows * kt,), F32)
            corr = T.decl_buffer((rows,), F32)
            part = T.decl_buffer((rows * jb * ld,), F32)
            o = T.decl_buffer((rows * lv,), F32)
            red = T.decl_buffer((1,), F32)
            span[0] = T.int64(big)
            span[1] = T.int64(-1)
            for sub in range(n_sub):
                sub_lo[sub] = T.int64(big)
                sub_hi[sub] = T.int64(-1)
                for r in range(rows):
                    x = sub * rows + r
                    t = (first + sub) * qt + r // g
                    if t < tokens:
                        p = T.Cast("int64", pos[b, t])
                        if spec.paged:
                            hi[x] = p
                        else:
                            hi[x] = T.min(p, length - 1)
                        if window > 0:
                            lo[x] = T.max(p - window + 1, T.int64(0))
                        else:
                            lo[x] = T.int64(0)
                    else:
                        lo[x] = T.int64(0)
                        hi[x] = T.int64(-1)
                    if lo[x] <= hi[x]:
                        sub_lo[sub] = T.min(sub_lo[sub], lo[x])
                        sub_hi[sub] = T.max(sub_hi[sub], hi[x])
                    st_m[base + x] = T.float32(NEG)
                    st_l[base + x] = T.float32(0)
                    for e in T.vectorized(dv):
                        st_acc[(base + x) * dv + e] = T.float32(0)
                span[0] = T.min(span[0], sub_lo[sub])
                span[1] = T.max(span[1], sub_hi[sub])
            n_tiles = T.max(T.ceildiv(span[1] - span[0] + 1, kt), T.int64(0))
            per_split = T.ceildiv(n_tiles, splits(batch, tokens))
            for it in range(T.max(T.min(per_split, n_tiles - split * per_split), T.int64(0))):
                j0 = span[0] + (split * per_split + it) * kt
                for sub in range(n_sub):
                    if j0 <= sub_hi[sub] and sub_lo[sub] < j0 + kt:  # the tile meets this query tile's keys
                        t0 = (first + sub) * qt
                        for jj in range(kt):  # where each key's row starts (k and v share the layout)
                            j = T.min(j0 + jj, sub_hi[sub])
                            if spec.paged:
                                krow[jj] = ((T.max(T.min(T.Cast("int64", table[T.Cast("int64", seq[t0]), j // page]),
                                                         k.shape[0] - 1), T.int64(0)) * hk + kvh) * page + j % page)
                            else:
                                krow[jj] = (b * hk + kvh) * k.shape[2] + T.floormod(j, k.shape[2])
                        # 1. scores, jb keys at a time: rows x jb lane vectors of partial sums
                        for blk in range(kt // jb):
                            for r in T.unroll(rows):
                                for jj in T.unroll(jb):
                                    for ln in T.vectorized(ld):
                                        part[(r * jb + jj) * ld + ln] = T.float32(0)
                            for jj in T.unroll(jb):
                                kb[jj] = krow[blk * jb + jj] * d
                            for c in range(d // ld):
                                for r in T.unroll(rows):
                                    for jj in T.unroll(jb):
                                        for ln in T.vectorized(ld):
                                            part[(r * jb + jj) * ld + ln] = part[(r * jb + jj) * ld + ln] + f32(q[
                                                b, kvh * g + r % g, T.min(t0 + r // g, tokens - 1), c * ld + ln
                                            ]) * f32(kf[kb[jj] + c * ld + ln])
                            for r in T.unroll(rows):
                                for jj in T.unroll(jb):
                                    s[r * kt + blk * jb + jj] = lane_sum(part, (r * jb + jj) * ld, ld)
                        # 2. online softmax: scale, softcap, mask; running max and sum
                        for r in range(rows):
                            x = base + sub * rows + r
                            for jj in T.vectorized(kt):
                                if softcap > 0:
                                    s[r * kt + jj] = T.if_then_else(
                                        lo[sub * rows + r] <= j0 + jj and j0 + jj <= hi[sub * rows + r],
                                        fast_tanh(s[r * kt + jj] * T.float32(scale / softcap)) * T.float32(softcap),
                                        T.float32(NEG))
                                else:
                                    s[r * kt + jj] = T.if_then_else(
                                        lo[sub * rows + r] <= j0 + jj and j0 + jj <= hi[sub * rows + r],
                                        s[r * kt + jj] * T.float32(scale), T.float32(NEG))
                            red[0] = st_m[x]
                            for jj in range(kt):
                                red[0] = T.max(red[0], s[r * kt + jj])
                            corr[r] = fast_exp(st_m[x] - red[0])
                            st_m[x] = red[0]
                            for jj in T.vectorized(kt):
                                s[r * kt + jj] = T.if_then_else(
                                    lo[sub * rows + r] <= j0 + jj and j0 + jj <= hi[sub * rows + r],
                                    fast_exp(s[r * kt + jj] - red[0]), T.float32(0))
                            red[0] = T.float32(0)
                            for jj in range(kt):
                                red[0] = red[0] + s[r * kt + jj]
                            st_l[x] = st_l[x] * corr[r] + red[0]
                        # 3. acc = acc * corr + p @ V, the rows' lane vectors in registers over the keys
                        for c in range(dv // lv):
                            for r in T.unroll(rows):
                                for ln in T.vectorized(lv):
                                    o[r * lv + ln] = st_acc[(base + sub * rows + r) * dv + c * lv + ln] * corr[r]
                            for jj in range(kt):
                                for r in T.unroll(rows):
                                    for ln in T.vectorized(lv):
                                        o[r * lv + ln] = o[r * lv + ln] + s[r * kt + jj] * f32(
                                            vf[krow[jj] * dv + c * lv + ln])
                            for r in T.unroll(rows):
                                for ln in T.vectorized(lv):
                                    st_acc[(base + sub * rows + r) * dv + c * lv + ln] = o[r * lv + ln]
        # merge each row's key-range chunks (flash-decoding); one chunk: acc / l
        for wx in T.parallel(batch * hk * blocks(tokens) * per_block(tokens) * rows):
            w = wx // (per_block(tokens) * rows)
            x = wx % (per_block(tokens) * rows)
            b = w // (hk * blocks(tokens))
            kvh = (w // blocks(tokens)) % hk
            t = ((w % blocks(tokens)) * per_block(tokens) + x // rows) * qt + (x % rows) // g
            if t < tokens:
                top = T.decl_buffer((1,), F32)
                total = T.decl_buffer((1,), F32)
                row = T.decl_buffer((dv,), F32)
                top[0] = T.float32(NEG)
                for sp in range(splits(batch, tokens)):
                    top[0] = T.max(top[0], st_m[((w * splits(batch, tokens) + sp) * per_block(tokens)) * rows + x])
                total[0] = T.float32(0)
                for e in T.vectorized(dv):
                    row[e] = T.float32(0)
                for sp in range(splits(batch, tokens)):
                    at = ((w * splits(batch, tokens) + sp) * per_block(tokens)) * rows + x
                    weight = fast_exp(st_m[at] - top[0])
                    total[0] = total[0] + st_l[at] * weight
                    for e in T.vectorized(dv):
                        row[e] = row[e] + st_acc[at * dv + e] * weight
                for e in T.vectorized(dv):
                    out[b, kvh * g + x % g, t, e] = T.Cast(
                        spec.out_dtype, T.if_then_else(total[0] > T.float32(0), row[e] / total[0], T.float32(0)))

    return body


def _opaque(func: tirx.PrimFunc, spec: FlashSpec) -> tirx.PrimFunc:
    """Tagged with its spec (the schedule rule regenerates it for the target) and opaque to
    FuseOps: nothing fuses into a hand-written kernel."""
    return func.with_attr(FLASH_ATTR, spec.to_json()).with_attr("op_pattern", OPAQUE)
