"""Which schedule rule every kernel gets, pinned per tiny family, quantization scheme and CPU target,
and the target-derived kernel parameters (`rlx/targets/machine.py`, docs/kernels.md).

The rule of a kernel follows from the block it is built around (its anchor): a decode linear
(`rlx_gemv`) must get `gemv`, a prefill linear (`rlx_gemm`) `gemm`, any other contraction (MoE
experts, materialised attention) `contraction`, a flash attention kernel `flash-attention`;
nothing may be left unscheduled. A broken GEMV rule used to fall through to the catch-all
elementwise rule with every numerical test green and decode many times slower; now a failure
inside one of rlx's rules is a compile error (`test_a_broken_rule_fails_the_compile`).

Only legalize + fuse + schedule runs here (`schedule_module`, ~1 s a target), no codegen: the
aarch64 target is scheduled like the others, its objects are built in test_quantized_cpu.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import tvm
from tvm import te
from tvm.target import Target

from rlx.compiler.graphs import target_graphs
from rlx.compiler.profile_toml import resolve_profile
from rlx.frontends.checkpoint import open_checkpoint
from rlx.hir.quant import quant_format
from rlx.targets import build, flash_attention, machine, weight_schedules
from rlx.targets.block_planes import planes_of
from rlx.targets.build import schedule_module
from rlx.targets.kernels import CONTRACTIONS
from rlx.targets.layouts import IL16
from rlx.targets.lower import lower_for
from rlx.targets.presets import resolve_target
from rlx.targets.schedules import EXTERN, ScheduleError, gpu_rules, schedule_report, schedule_skipped
from rlx.targets.weight_kernels import GEMM, GEMV, GEMV_ROWS, ROW_TILE_ATTR, contraction
from tests.targets.walks import FAMILIES

Ckpt = Callable[[str], Path]
HASWELL = '{"kind": "llvm", "mcpu": "haswell"}'
TARGETS = {"native": "cpu", "avx2": HASWELL, "aarch64": "cpu-aarch64"}
SCHEMES = ["none", "q8", "q4", "q4a", "gguf"]
FLASH_ATTR = getattr(flash_attention, "FLASH_ATTR", None)  # the flash kernels' marker (attention)
# anchor block -> the rule that must schedule a kernel built around it
RULE_OF_ANCHOR = {GEMV: "gemv", GEMM: "gemm", **{name: "contraction" for name in CONTRACTIONS}}
_BLOCK = re.compile(r'T\.sblock\("([^"]+)"')


def expected_rule(func: tvm.tirx.PrimFunc) -> str | None:
    """The rule a kernel must get, from its anchor block (None: any of ours)."""
    if FLASH_ATTR is not None and func.attrs is not None and FLASH_ATTR in func.attrs:
        return "flash-attention"
    anchors = {RULE_OF_ANCHOR[b] for b in _BLOCK.findall(func.script()) if b in RULE_OF_ANCHOR}
    assert len(anchors) <= 1, f"a kernel with several anchors: {anchors}"
    return anchors.pop() if anchors else None


def _scheduled(path: Path, scheme: str, target: str) -> tvm.IRModule:
    return _schedule_all(path, scheme, [target])[target]


def _schedule_all(path: Path, scheme: str, targets: list[str]) -> dict[str, tvm.IRModule]:
    """Each target's scheduled module; targets with the same kernel parameters share one lowering
    (`lower` depends on the device and those only)."""
    resolved = {t: resolve_target(t) for t in targets}
    graphs = target_graphs(open_checkpoint(path), target=resolved[targets[0]].name,
                           profile=resolve_profile(None, path, scheme))
    lowered: dict[tuple[str, machine.KernelParams], tvm.IRModule] = {}
    out = {}
    for t, r in resolved.items():
        key = (r.device, machine.kernel_params(r.target))
        if key not in lowered:
            lowered[key] = lower_for(graphs.entries, r).mod
        out[t] = schedule_module(lowered[key], r)
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_kernel_gets_its_rule_on_every_cpu_target(family: str, scheme: str, tiny_ckpt: Ckpt) -> None:
    modules = _schedule_all(tiny_ckpt(family), scheme, list(TARGETS.values()))
    for label, target in TARGETS.items():
        mod = modules[target]
        rules = schedule_report(mod)
        params = machine.kernel_params(resolve_target(target).target)
        seen: dict[str, int] = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            name, rule = gv.name_hint, rules[gv.name_hint]
            want = expected_rule(func)
            assert rule == (want or rule), f"{label}: {name} got {rule}, its anchor wants {want}"
            assert rule != "none", f"{label}: {name} was left unscheduled"
            assert rule == EXTERN or rule in {"gemv", "gemm", "contraction", "flash-attention", "row-reduction",
                                              "parallel-outer"}, f"{label}: {name} got {rule}"
            seen[rule] = seen.get(rule, 0) + 1
            if rule == "gemm":  # the row padding the lowering chose is the target's tile
                tiles = re.findall(rf'"{re.escape(ROW_TILE_ATTR)}": (\d+)', func.script())
                assert tiles and {int(t) for t in tiles} == {params.gemm_rows}, f"{label}: {name} rows {tiles}"
        # every family has linears in prefill (GEMM) and decode (GEMV)
        assert seen.get("gemv", 0) >= 4 and seen.get("gemm", 0) >= 4, f"{label}: {seen}"


def test_a_broken_rule_fails_the_compile(tiny_ckpt: Ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GEMV rule that raises is an error naming the rule and the kernels, not a fall-through."""
    def broken(self: object, func: object, target: object, tunable: bool) -> None:
        raise RuntimeError("deliberately broken")

    monkeypatch.setattr(weight_schedules.Gemv, "apply", broken)
    with pytest.raises(ScheduleError, match=r"kernel\(s\) failed their rlx schedule rule: .*rule gemv: "
                                            r"RuntimeError: deliberately broken") as e:
        _scheduled(tiny_ckpt("gemma3"), "q8", "cpu")
    assert e.value.hint is not None and "schedules" in e.value.hint


def test_a_schedule_that_does_not_lower_fails_the_compile(tiny_ckpt: Ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule of ours whose schedule TIR's first lowering steps reject is an error too."""
    monkeypatch.setattr("rlx.targets.schedules._lowering_error",
                        lambda func: "ValueError: rejected" if func.attrs["rlx.schedule"] == "gemm" else None)
    with pytest.raises(ScheduleError, match=r"rule gemm: ValueError: rejected"):
        _scheduled(tiny_ckpt("gemma3"), "none", "cpu")


def test_a_failing_generic_rule_falls_through_with_its_reason(tiny_ckpt: Ckpt,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """dlight's generic rules may fail on a function (they try every one): the next rule takes it
    and the reason is recorded on the kernel."""
    rules = gpu_rules()
    matmul = dict(rules)["dlight.gpu.Matmul"]

    def broken(func: object, target: object, tunable: bool) -> None:
        raise AssertionError("not a matmul I know")

    monkeypatch.setattr(matmul, "apply", broken)
    monkeypatch.setitem(build.BACKENDS, "cuda", build.Backend(lambda: rules, build.BACKENDS["cuda"].tvm_backend))
    mod = _scheduled(tiny_ckpt("gemma3"), "none", "cuda")
    skipped = schedule_skipped(mod)
    assert skipped and all("dlight.gpu.Matmul: AssertionError: not a matmul I know" in why
                           for why in skipped.values())
    assert all(rule != "none" for rule in schedule_report(mod).values())


@pytest.mark.parametrize(("spec", "isa", "tile", "gemv_rows"), [
    ({"kind": "llvm", "mcpu": "haswell"}, "avx2", (6, 16), 2),
    ({"kind": "llvm", "mcpu": "x86-64-v3"}, "avx2", (6, 16), 2),
    ({"kind": "llvm", "mcpu": "znver4"}, "avx512", (4, 64), 8),
    ({"kind": "llvm", "mcpu": "sapphirerapids"}, "avx512", (4, 64), 8),
    ({"kind": "llvm", "mcpu": "sapphirerapids", "mattr": ["-avx512f"]}, "avx2", (6, 16), 2),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}, "neon", (6, 16), 2),
    ({"kind": "llvm", "mtriple": "arm64-apple-macos"}, "neon", (6, 16), 2),
    ({"kind": "llvm"}, "sse", (2, 16), 1),
])
def test_the_vector_unit_and_tile_follow_the_target(spec: dict, isa: str, tile: tuple[int, int],
                                                     gemv_rows: int) -> None:
    params = machine.kernel_params(Target(spec))
    assert params.isa.name == isa
    assert (params.gemm_rows, params.gemm_cols) == tile
    unit = params.isa
    vectors = params.gemm_cols // unit.lanes  # registers of one tile row
    # accumulators + one row of weight vectors + the x broadcast fit in the register file: no spills
    assert params.gemm_rows * vectors + vectors + 1 <= unit.registers
    assert params.gemm_cols % machine.LANES == 0  # whole il16 groups
    assert params.gemv_groups * unit.per_vector <= unit.registers // 2
    # a quantized GEMV tile: a block sum and an accumulator per row, within half the registers
    assert params.gemv_rows == gemv_rows and 2 * gemv_rows * unit.per_vector <= unit.registers // 2
    assert set(params.reasons()) == {"isa", "gemm_rows", "gemm_cols", "gemv_groups", "gemv_chains", "gemv_rows",
                                     "parallel_min"}


# the machine code of a GEMM's register tile: its vector FMAs, and what a register loop never
# does: touch the stack, or store a vector (an accumulator kept in memory)
FMA_OP = {"x86_64": re.compile(r"\bvfmadd\d+ps\b"), "aarch64": re.compile(r"\bfmla\b")}
MEMORY_TILE = {"x86_64": re.compile(r"\(%rsp\)|^\s*v?mov\w*\s+%[xyz]mm\d+,\s*\S*\("),
               "aarch64": re.compile(r"\[sp\b|^\s*st(r|p|1)\w*\s+q")}


def _loop_bodies(asm: str) -> list[list[str]]:
    """The instructions of every innermost loop in `asm`: from a label to the last branch back
    to it, with no other basic block label inside (LLVM names them .LBB)."""
    lines = asm.splitlines()
    bodies = []
    for i, line in enumerate(lines):
        head = re.match(r"^(\.LBB\w+):", line)
        if head is None:
            continue
        back = [j for j in range(i + 1, len(lines))
                if (words := lines[j].split()) and words[-1] == head.group(1)
                and words[0].startswith(("j", "b", "cb", "tb"))]
        body = lines[i + 1:back[-1] + 1] if back else []
        if body and not any(re.match(r"^\.LBB\w+:", b) for b in body):
            bodies.append(body)
    return bodies


@pytest.mark.parametrize("target", list(TARGETS.values()), ids=list(TARGETS))
@pytest.mark.parametrize("fmt", ["", "q4_k"])
def test_the_gemm_register_tile_has_no_spills_in_the_machine_code(target: str, fmt: str) -> None:
    """The tile arithmetic above, checked in what LLVM emits for each vector unit: the GEMM's
    innermost loop (the one with the most FMAs) issues the tile's `MR * NR / lanes` FMAs per k
    (times LLVM's unroll), never touches the stack and stores no vector: accumulators, a row of weight vectors and
    the x broadcast all stay in registers (the old 4 x 64 tile kept its accumulators in memory on
    AVX2 and NEON, a loop this test rejects)."""
    resolved = resolve_target(target)
    params = machine.kernel_params(resolved.target)
    arch = "aarch64" if params.isa.name == "neon" else "x86_64"  # the vector unit names the instruction set
    n, k = 4 * params.gemm_cols, 256
    x = te.placeholder((1, params.gemm_rows * (GEMV_ROWS // params.gemm_rows + 2), k), name="x")  # a GEMM
    w = te.placeholder((planes_of(quant_format(fmt)).columns(k) * n // machine.LANES, machine.LANES) if fmt
                       else (n // machine.LANES, k, machine.LANES), "uint8" if fmt else "float32", name="w")
    func = te.create_prim_func([x, w, contraction(x, w, IL16, fmt, row_tile=params.gemm_rows)])
    with resolved.target:
        sch = weight_schedules.Gemm().apply(func, resolved.target, False)
    assert sch is not None
    asm = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=resolved.target).mod.inspect_source("asm")
    fmas, tile = max(((sum(bool(FMA_OP[arch].search(i)) for i in body), body) for body in _loop_bodies(asm)),
                     default=(0, []))
    per_k = params.gemm_rows * params.gemm_cols // params.isa.lanes
    assert fmas and fmas % per_k == 0, "\n".join(tile) or "no FMA loop"  # LLVM may unroll k: whole tiles
    assert not [i for i in tile if MEMORY_TILE[arch].search(i)], "\n".join(tile)


@pytest.mark.parametrize("target", [TARGETS["native"], HASWELL])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_k", ""])
def test_a_small_static_m_linear_is_a_gemv_with_its_rows_inside_the_block_loop(target: str, fmt: str) -> None:
    """A decode step of M <= GEMV_ROWS sequences is a GEMV (never the GEMM, whose panel decode
    dominates at a few rows): the rows run in register tiles of the largest divisor of M up to
    the target's `gemv_rows`, unrolled inside the reduction, so each weight block is read once
    per tile. One more row than GEMV_ROWS is a GEMM."""
    resolved = resolve_target(target)
    params = machine.kernel_params(resolved.target)
    n, k = 64, 256
    lines = planes_of(quant_format(fmt)).columns(k) * n // machine.LANES if fmt else 0
    w = te.placeholder((lines, machine.LANES) if fmt else (n // machine.LANES, k, machine.LANES),
                       "uint8" if fmt else "float32", name="w")
    tile_most = params.gemv_rows if fmt else max(2 * params.gemv_rows // params.gemv_groups, 1)
    for m in (1, 2, 3, 4, 8, 12, GEMV_ROWS):
        x = te.placeholder((1, m, k), name="x")
        y = contraction(x, w, IL16, fmt)
        assert y.op.name == GEMV
        func = te.create_prim_func([x, w, y])
        with resolved.target:
            sch = weight_schedules.Gemv().apply(func, resolved.target, False)
        assert sch is not None
        loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(GEMV))]
        tile = max(d for d in range(1, min(m, tile_most) + 1) if m % d == 0)
        # [task, group, tiles, blocks, rows, lanes] (quantized) / [task, tiles, k, rows, groups, lanes]
        red = next(i for i, loop in enumerate(loops) if loop.loop_var.name in ("b", "k"))
        rows = loops[red + 1]
        assert (int(rows.extent), rows.kind) == (tile, tvm.tirx.ForKind.UNROLLED), f"{target} {fmt} M={m}: {loops}"
        assert int(loops[red - 1].extent) == m // tile
    gemm = contraction(te.placeholder((1, GEMV_ROWS + 1, k), name="x"), w, IL16, fmt)
    assert GEMM in {t.op.name for t in [gemm, *gemm.op.input_tensors]}


def test_a_non_cpu_target_gets_the_conservative_machine() -> None:
    assert machine.vector_isa(Target({"kind": "cuda", "arch": "sm_80"})) is machine.CONSERVATIVE
    assert machine.kernel_params(None) == machine.CONSERVATIVE_PARAMS
