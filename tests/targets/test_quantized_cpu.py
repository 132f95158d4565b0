"""Quantized weights on the compiled CPU engine (`--quantize q8 / q4`) against the reference
interpreter on the same quantized graph and weights, and how far they move the tiny models from f32.

For each tiny family (gemma1-gqa, gemma2, gemma3, gemma4, gemma4-moe) and scheme (q8: q8_0, q4:
q4_0, both at the default group of 32), the compiled engine and the reference interpreter are built
from the SAME resolved profile (`resolve_profile(None, ckpt, scheme)`), so both run the same HIR
(the `quantize` pass first, then the default fusion pipeline) on the same blocks: the interpreter
quantizes float32 weights with `rlx.hir.quant`, the compiled engine uploads those packed bytes and
decodes them in its kernels (bit-exact to the numpy decode: tests/targets/test_quant_decode.py).
We prefill PROMPT and run N_DECODE steps fed the reference's greedy tokens.

Tolerances:
- **compiled vs reference, same quantized weights**: rtol 1e-5 with an absolute floor of
  1e-5 x max|logit| (as tests/targets/test_cpu.py). The weights each side multiplies are the same
  float32 values (an f16 scale times a small integer is exact in f32), so only the float32
  summation order and LLVM's vs libm's exp/tanh/cos differ. Measured max |diff| / max |logit| over
  the 10 (family, scheme) pairs, prefill + 8 steps: 3.7e-7 .. 1.8e-6 (the worst: gemma2 q4), a
  5x margin. A decoding bug (a lost scale, swapped nibbles, a wrong block offset) changes the
  logits by O(10%) (q8) to O(100%) (q4), far outside it.
- **quantized vs f32 (the unquantized reference)**, the quantized compiled engine fed the f32
  reference's greedy tokens (teacher-forced, so one early flip does not derail the rest):
  * top-1 agreement: the fraction of the 1 + N_DECODE rows whose argmax equals f32's. Measured q8:
    1.0 for all five families; q4: 1.0 (gemma1-gqa, gemma3), 0.889 (gemma2, gemma4-moe), 0.667
    (gemma4). Floors: q8 >= 0.8, q4 >= 0.5. Tiny random models are sensitive: vocab 256 with
    logits of O(1..10) often have runner-ups within a few percent of the top, and q4_0's ~7%
    relative weight error per matrix (tests/passes/test_quantize.py) compounds over 2-4 layers, so
    q4's floor is deliberately loose; it still catches a decode that returns noise (expected
    agreement ~1/256).
  * relative Frobenius error ||q - f32|| / ||f32|| of the logits: measured q8 0.015 .. 0.067,
    q4 0.20 .. 0.48. Bounds: q8 in (1e-3, 0.15], q4 in (1e-2, 0.75]. The lower bounds prove the
    weights really were quantized (an unquantized run differs from f32 by ~1e-6); uncorrelated
    logits (a broken decode) sit near sqrt(2) ~ 1.4.

Rows that are not a multiple of the group: none in these five families (K is 64 or 128
everywhere; the MoE experts are 3-D and stay float, as does the router, which another op reads
too). gemma4-ple has a per-layer projection with rows of 8 values, which no group size (32..256)
divides: the `quantize` pass refuses it, naming the tensor and the `[quantize] keep` glob that
fixes it, rather than silently keeping it float (test_rows_no_group_divides_are_refused_naming_the_tensor).
With that glob (and, under q4, a `[quantize.tensors]` override giving the per-layer input gates
q8) gemma4-ple compiles, and equals the reference on the same blocks at the same tolerance
(rtol 1e-5, floor 1e-5 x max|logit|): a kept weight is an ordinary f32 linear, the others the
same kernels as above, so nothing but summation order differs. Measured max |diff| / max|logit|:
q8 9.7e-7, q4 2.0e-6 (a 5x margin at worst). q8 runs in-process (CompiledEngine); q4 goes through `rlx compile` so that
the artifact's report.json, manifest and `rlx compare`'s weights table are checked too.
"""

from __future__ import annotations

import fnmatch
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import rlx
from rlx.api import compile as rlx_compile
from rlx.compiler.compiled_engine import CompiledEngine
from rlx.compiler.engines import reference_engine
from rlx.compiler.profile_toml import parse_profile, resolve_profile
from rlx.frontends.checkpoint import open_checkpoint
from rlx.hir.pass_infra import PassError
from rlx.report import render
from rlx.targets.lower import param_keys
from tests.targets.walks import FAMILIES, N_DECODE, assert_close, walk

Ckpt = Callable[[str], Path]
SCHEMES = ["q8", "q4"]
FORMAT = {"q8": "q8_0", "q4": "q4_0"}
TOP1_FLOOR = {"q8": 0.8, "q4": 0.5}                # module docstring
FROB_RANGE = {"q8": (1e-3, 0.15), "q4": (1e-2, 0.75)}  # module docstring


@pytest.fixture(scope="module")
def compiled(tiny_ckpt: Ckpt) -> Callable[[str, str], CompiledEngine]:
    """`compiled(family, scheme)`: one compiled engine per pair for this module."""
    engines: dict[tuple[str, str], CompiledEngine] = {}

    def get(family: str, scheme: str) -> CompiledEngine:
        if (family, scheme) not in engines:
            path = tiny_ckpt(family)
            engines[family, scheme] = CompiledEngine(open_checkpoint(path), profile=resolve_profile(None, path, scheme))
        return engines[family, scheme]

    return get


@pytest.fixture(scope="module")
def f32_reference(tiny_ckpt: Ckpt) -> Callable[[str], tuple[np.ndarray, list[int]]]:
    """`f32_reference(family)`: the unquantized interpreter's logits and greedy tokens (cached)."""
    walks: dict[str, tuple[np.ndarray, list[int]]] = {}

    def get(family: str) -> tuple[np.ndarray, list[int]]:
        if family not in walks:
            path = tiny_ckpt(family)
            walks[family] = walk(reference_engine(open_checkpoint(path), profile=resolve_profile(None, path)))
        return walks[family]

    return get


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_compiled_equals_reference_and_stays_near_f32(
        family: str, scheme: str, tiny_ckpt: Ckpt, compiled: Callable[[str, str], CompiledEngine],
        f32_reference: Callable[[str], tuple[np.ndarray, list[int]]]) -> None:
    path = tiny_ckpt(family)
    engine = compiled(family, scheme)
    # the weights really are packed blocks of the scheme's format, in the module and on the device
    specs = param_keys(list(engine.signatures.values()))
    quantized = {key for key, spec in specs.items() if spec.type.is_quantized}
    assert {specs[key].type.quant for key in quantized} == {FORMAT[scheme]}
    assert len(quantized) >= 5 and {str(engine._weights[key].dtype) for key in quantized} == {"uint8"}

    # 1. the same quantized graph and weights: equal up to float32 summation order
    ref_engine = reference_engine(open_checkpoint(path), profile=resolve_profile(None, path, scheme))
    ref, tokens = walk(ref_engine)
    ours, _ = walk(engine, tokens)
    assert ours.shape == ref.shape == (1 + N_DECODE, 256)
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))  # module docstring

    # 2. against the unquantized model, teacher-forced on f32's greedy tokens
    f32, f32_tokens = f32_reference(family)
    forced, _ = walk(engine, f32_tokens)
    top1 = float(np.mean(forced.argmax(-1) == f32.argmax(-1)))
    frob = float(np.linalg.norm(forced - f32) / np.linalg.norm(f32))
    print(f"\n{family} {scheme}: max rel vs quantized reference {rel:.2e}, top-1 agreement vs f32 {top1:.3f} "
          f"({int(round(top1 * len(f32)))}/{len(f32)}), relative error vs f32 {frob:.3f}")
    lo, hi = FROB_RANGE[scheme]
    assert lo < frob <= hi, f"{family} {scheme}: relative error vs f32 {frob:.3g}"
    assert top1 >= TOP1_FLOOR[scheme], f"{family} {scheme}: top-1 agreement vs f32 {top1:.3f}"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rows_no_group_divides_are_refused_naming_the_tensor(scheme: str, tiny_ckpt: Ckpt) -> None:
    """gemma4-ple's per-layer projection has rows of 8 values: no group size divides them, and the
    pass says so (naming the tensor and the way out) before anything compiles."""
    path = tiny_ckpt("gemma4-ple")
    with pytest.raises(PassError, match=rf"tensor layers\.0\.per_layer_projection\.weight has rows of 8 values, "
                                        rf"not a multiple of {scheme}'s group of 32 \(as do "
                                        rf"layers\.1\.per_layer_projection\.weight, ") as e:
        CompiledEngine(open_checkpoint(path), profile=resolve_profile(None, path, scheme))
    assert e.value.hint is not None
    assert e.value.hint.startswith('no group size (32, 64, 128, 256) divides 8: keep them float: '
                                   f'[quantize] keep = ["{PLE_KEEP}"]')


PLE_KEEP = "layers.*.per_layer_projection.weight"  # rows of 8: no group divides them
PLE_GATE = "layers.*.per_layer_input_gate.weight"  # rows of 64: under q4, given q8 by a [quantize.tensors] glob


def _ple_profile(scheme: str) -> str:
    override = f'\n[quantize.tensors]\n"{PLE_GATE}" = "q8"\n' if scheme == "q4" else ""
    return f'[quantize]\nscheme = "{scheme}"\nkeep = ["{PLE_KEEP}"]\n{override}'


def _ple_formats(specs: dict[str, Any], scheme: str) -> None:
    """The weights are the scheme's blocks, but the kept projections (f32) and, under q4, the gates (q8)."""
    want = {key: "f32" if fnmatch.fnmatchcase(key, PLE_KEEP) else "q8_0" if fnmatch.fnmatchcase(key, PLE_GATE)
            and scheme == "q4" else FORMAT[scheme] for key in specs if "per_layer" in key and "norm" not in key}
    assert {key: specs[key] for key in want} == want
    assert sum(fmt == "f32" for fmt in want.values()) == 4  # layers 0..3


def test_ple_under_q8_with_the_projections_kept_equals_the_reference(tiny_ckpt: Ckpt) -> None:
    path = tiny_ckpt("gemma4-ple")
    profile = parse_profile(_ple_profile("q8"))
    engine = CompiledEngine(open_checkpoint(path), profile=profile)
    specs = param_keys(list(engine.signatures.values()))
    _ple_formats({key: spec.type.quant or spec.type.dtype.value for key, spec in specs.items()}, "q8")
    ref, tokens = walk(reference_engine(open_checkpoint(path), profile=profile))
    ours, _ = walk(engine, tokens)
    print(f"\ngemma4-ple q8 (kept projections): max rel vs reference {np.abs(ours - ref).max() / np.abs(ref).max():.2e}")
    assert_close(ours, ref)  # module docstring


def test_ple_artifact_under_q4_keeps_reports_and_equals_the_reference(tiny_ckpt: Ckpt, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLX_CACHE_DIR", str(tmp_path / "cache"))
    path = tiny_ckpt("gemma4-ple")
    toml = tmp_path / "ple.rlx.toml"
    toml.write_text(_ple_profile("q4"))
    (art,) = rlx_compile(path, "cpu", tmp_path / "art", profile=str(toml))
    manifest = json.loads((art / "manifest.json").read_text())
    weights = json.loads((art / "report.json").read_text())["weights"]
    _ple_formats({key: t["format"] for key, t in weights["tensors"].items()}, "q4")
    assert set(manifest["quantize"]["tensors"].values()) == {"q4_0", "q8_0"}
    assert not any(fnmatch.fnmatchcase(key, PLE_KEEP) for key in manifest["quantize"]["tensors"])
    # report.json says why the projections are float, and only for them (the norms are float anyway)
    assert {key for key, t in weights["tensors"].items() if "reason" in t} == \
        {f"layers.{i}.per_layer_projection.weight" for i in range(4)}
    assert {t["reason"] for t in weights["tensors"].values() if "reason" in t} == {"kept"}
    # rlx compare's weights section, rendered from the same report
    section = render.weights({"quantize": {"profile": weights["quantize"]},
                              "targets": {"cpu": {"status": "ok", "weights": weights}}})
    assert f"keep {PLE_KEEP}" in str(section.blocks[0]) and f"{PLE_GATE} q8" in str(section.blocks[0])
    rows = {(r[0], r[1]): r[2] for r in section.blocks[-1].rows}  # type: ignore[union-attr]
    assert rows[PLE_KEEP, "f32 (kept)"] == "4" and rows[PLE_GATE, "q8_0"] == "4"
    # the artifact computes what the interpreter does on the same blocks
    profile = parse_profile(toml.read_text())
    ref, tokens = walk(reference_engine(open_checkpoint(path), profile=profile))
    ours, _ = walk(rlx.load(art).engine, tokens)
    print(f"\ngemma4-ple q4 (kept, q8 gates): max rel vs reference {np.abs(ours - ref).max() / np.abs(ref).max():.2e}")
    assert_close(ours, ref)  # module docstring


def _llvm_module(module: Any) -> Any:
    stack = [module]
    while stack:
        m = stack.pop()
        if m.kind == "llvm":
            return m
        stack.extend(m.imports)
    raise AssertionError("no llvm module imported")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_kernels_built_for_avx2_only_machines_compute_the_same(scheme: str, tiny_ckpt: Ckpt) -> None:
    """The schedules assume no AVX-512: built for Haswell (AVX2, FMA; a 16-lane vector is two
    8-lane registers), the module runs here (AVX-512 machines execute AVX2 code) and equals the
    reference as closely as the native build does (same tolerance, module docstring)."""
    path = tiny_ckpt("gemma3")
    profile = resolve_profile(None, path, scheme)
    engine = CompiledEngine(open_checkpoint(path), profile=profile, target='{"kind": "llvm", "mcpu": "haswell"}')
    asm = _llvm_module(engine.built.executable.mod).inspect_source("asm")
    assert "ymm" in asm and "zmm" not in asm  # AVX2 registers only
    ref, tokens = walk(reference_engine(open_checkpoint(path), profile=profile))
    ours, _ = walk(engine, tokens)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_quantized_kernels_cross_compile_for_aarch64(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """The same schedules build for 64-bit Arm (NEON: a 16-lane vector is four 4-lane registers)."""
    (art,) = rlx_compile(tiny_ckpt("gemma3"), "cpu-aarch64", tmp_path / "arm", quantize="q4")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quantize"]["scheme"] == "q4" and manifest["target"]["name"] == "cpu-aarch64"
    assert manifest["library"] == "lib.tar"  # objects for the Arm machine to link: no host linker involved
    rules = {k["name"]: k["schedule"] for k in json.loads((art / "report.json").read_text())["kernels"]}
    assert rules and "none" not in rules.values() and {"gemv", "gemm"} <= set(rules.values())  # report.json's rules
    with tarfile.open(art / "lib.tar") as tar:
        objects = [m for m in tar.getmembers() if m.name.endswith(".o")]
        assert objects and all(tar.extractfile(m).read(20)[18] == 0xB7 for m in objects)  # ELF e_machine AArch64
