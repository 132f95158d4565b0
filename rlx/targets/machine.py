"""The machine facts the CPU kernels are shaped by, read from the TVM target, and the kernel
parameters derived from them (`kernel_params`), each with its reason. docs/kernels.md explains
the layout, the tilings and the measurements behind these numbers.

`LANES` is the il16 layout's row interleave (`layouts.py`, `block_planes.py`): a fact of the
weights as stored, the same on every target (a 16-lane vector is one AVX-512, two AVX2 or four
NEON registers). Everything else here depends on the target's vector unit (`VectorISA`), which
LLVM's own CPU tables give (`target_has_features` on `mcpu` / `mattr` / `mtriple`), so
`{"kind": "llvm", "mcpu": "haswell"}` is AVX2 and `znver4` or the host's `rocketlake` AVX-512.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm.target import Target, codegen

LANES = 16  # il16: rows interleaved per weight group, and the kernels' vector width in float32


@dataclass(frozen=True)
class VectorISA:
    """A CPU vector unit as the register tiles see it."""

    name: str
    lanes: int      # float32 lanes per vector register
    registers: int  # architectural vector registers

    @property
    def per_vector(self) -> int:
        """Registers one il16 vector (LANES float32) takes."""
        return max(LANES // self.lanes, 1)


ISAS: dict[str, VectorISA] = {isa.name: isa for isa in (
    VectorISA("avx512", 16, 32),
    VectorISA("avx2", 8, 16),
    VectorISA("neon", 4, 32),
    VectorISA("sse", 4, 16),  # the x86-64 baseline, and what any target we cannot read gets
)}
# LLVM feature -> ISA, the widest first (an AVX-512 CPU also has AVX2)
_FEATURES = (("avx512f", "avx512"), ("avx2", "avx2"), ("neon", "neon"))
CONSERVATIVE = ISAS["sse"]


def vector_isa(target: Target | None) -> VectorISA:
    """The widest vector unit the target has (LLVM's feature tables); `CONSERVATIVE` for a
    non-LLVM or unreadable target."""
    if target is None or target.kind.name != "llvm":
        return CONSERVATIVE
    for feature, name in _FEATURES:
        if codegen.target_has_features(feature, target):
            return ISAS[name]
    return CONSERVATIVE


@dataclass(frozen=True)
class KernelParams:
    """Tiles, unrolls and parallel grain of the CPU kernels for one vector unit.

    - `gemm_rows` x `gemm_cols` (MR x NR): the prefill GEMM's register tile; the lowering pads
      the rows to a multiple of MR (`weight_kernels._gemm`), the schedule tiles by both.
    - `gemv_groups`: il16 groups (of LANES rows) per decode GEMV task.
    - `gemv_chains`: independent accumulation chains per scale block in a one-row quantized GEMV.
    - `gemv_rows`: rows of x per GEMV register tile: each weight vector (a quantized block's
      lane, decoded once) is applied to this many rows before the next is read.
    - `parallel_min`: elementwise work below this many elements runs on one thread.
    """

    isa: VectorISA
    gemm_rows: int
    gemm_cols: int
    gemv_groups: int
    gemv_chains: int
    parallel_min: int
    gemv_rows: int = 1

    def reasons(self) -> dict[str, str]:
        """One line per number: why it is what it is on this vector unit."""
        isa, acc = self.isa, self.gemm_rows * self.gemm_cols // self.isa.lanes
        return {
            "isa": f"{isa.name}: {isa.lanes} float32 lanes x {isa.registers} vector registers "
                   f"(an il16 vector is {isa.per_vector} register(s))",
            "gemm_rows": f"{self.gemm_rows} rows of x broadcast per weight vector load, the most that keep "
                         + (f"{self.gemm_rows} x {LANES} accumulators within half of the {isa.registers} registers"
                            if self.gemm_cols > LANES else
                            f"{self.gemm_rows} x {LANES} accumulators, one row of weight vectors and the x broadcast "
                            f"within the {isa.registers} registers (a one-group tile: half the file would leave too "
                            f"few FMA chains)"),
            "gemm_cols": (f"{self.gemm_cols} columns: the widest multiple of {LANES} whose {self.gemm_rows} x "
                          f"{self.gemm_cols} accumulators ({acc} registers) fit in half the register file; the "
                          f"other half holds the weight vectors, the x broadcast and loads in flight")
                         if self.gemm_cols > LANES else
                         f"{LANES} columns, one il16 group ({acc} accumulator registers): two groups of "
                         f"{GEMM_ROWS_MAX} rows would not fit half the register file",
            "gemv_groups": f"{self.gemv_groups} il16 groups ({self.gemv_groups * LANES} rows) per task: independent "
                           f"FMA chains over {self.gemv_groups * isa.per_vector} registers; decode is bound by "
                           f"weight bytes, so more chains buy nothing",
            "gemv_chains": f"{self.gemv_chains} chains per scale block: two FMA streams per lane hide the "
                           f"FMA latency in a block's short sum",
            "gemv_rows": f"{self.gemv_rows} rows of x per GEMV tile: a quantized tile keeps a block sum and an "
                         f"output accumulator per row ({2 * self.gemv_rows * isa.per_vector} registers), within "
                         f"half of the {isa.registers}; each weight vector is read and decoded once for them all",
            "parallel_min": f"{self.parallel_min} elements: below this, waking the thread pool costs more than "
                            f"the elementwise pass it splits",
        }


ACCUMULATOR_SHARE = 2  # the GEMM tile's accumulators take at most 1 / ACCUMULATOR_SHARE of the registers
GEMM_ROWS_MAX = 4      # x rows per tile (more pads short prompts further and measured no faster)
NARROW_ROWS_MAX = 6    # x rows of a tile one il16 group wide, which may fill the register file
GEMV_GROUPS_MAX = 4


def _narrow_rows(isa: VectorISA) -> int:
    """Rows of a one-group-wide tile: every register but one row of weight vectors and the x
    broadcast (AVX2: 6 x 2 + 2 + 1 = 15 of 16). Half the file would leave AVX2 8 accumulators,
    too few independent FMA chains to cover two FMA ports' latency while weight blocks are
    loaded and decoded: 6x16 measured 8-10% faster than 4x16 on gemma-3-270m's gate|up, down and
    qkv GEMMs, q4_k and q6_k, 128 rows (`bench/gemm_tiles.py`, docs/kernels.md)."""
    return max(min(NARROW_ROWS_MAX, (isa.registers - isa.per_vector - 1) // isa.per_vector), 1)


def derive(isa: VectorISA) -> KernelParams:
    """The parameters for `isa` (the rules `KernelParams.reasons` states)."""
    budget = isa.registers // ACCUMULATOR_SHARE  # accumulator registers
    rows = max(min(GEMM_ROWS_MAX, budget // isa.per_vector), 1)
    groups = max(budget // (rows * isa.per_vector), 1)
    if groups == 1:  # one il16 group wide: the rows may take the rest of the file
        rows = max(rows, _narrow_rows(isa))
    return KernelParams(isa, gemm_rows=rows, gemm_cols=groups * LANES,
                        gemv_groups=max(min(GEMV_GROUPS_MAX, budget // isa.per_vector), 1),
                        gemv_chains=2, parallel_min=1 << 14,
                        gemv_rows=max(budget // (2 * isa.per_vector), 1))


@functools.lru_cache(maxsize=64)
def _params_of(isa: VectorISA) -> KernelParams:
    return derive(isa)


def kernel_params(target: Target | None) -> KernelParams:
    """The CPU kernel parameters for `target` (None: the conservative machine)."""
    return _params_of(vector_isa(target))


CONSERVATIVE_PARAMS = derive(CONSERVATIVE)
