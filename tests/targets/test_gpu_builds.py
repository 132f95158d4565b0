"""GPU targets are compiled here (no GPU needed) and their sources inspected; nothing runs.

CUDA needs `nvcc` (TVM calls it during the build); Metal codegen needs nothing, and its build
runs in a child process (docs/kernels.md, TVM facts: a Metal build segfaulted the whole process once).
"""

from __future__ import annotations

import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from tvm import tirx

from rlx.compiler.graphs import reference_graphs
from rlx.compiler.profile_toml import resolve_profile
from rlx.errors import RlxError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.passes import DEFAULT_PIPELINE
from rlx.targets.build import BuildError, build, build_isolated
from rlx.targets.lower import lower

Ckpt = Callable[[str], Path]
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).exists()), None)


def _graphs(tiny_ckpt: Ckpt, family: str = "gemma3", quantize: str | None = None) -> dict[str, object]:
    path = tiny_ckpt(family)
    profile = resolve_profile(None, path, quantize) if quantize else None
    prefill, decode = reference_graphs(open_checkpoint(path), passes=DEFAULT_PIPELINE, profile=profile)
    return {"prefill": prefill, "decode": decode}


def _imported(module: object, kind: str) -> object:
    stack = [module]
    while stack:
        m = stack.pop()
        if m.kind == kind:  # type: ignore[attr-defined]
            return m
        stack.extend(m.imports)  # type: ignore[attr-defined]
    raise AssertionError(f"no {kind} module imported")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed (CUDA modules need it to compile)")
@pytest.mark.parametrize("quantize", [None, "q4", "q8"])
def test_cuda_module_has_a_kernel_for_every_function(tiny_ckpt: Ckpt, quantize: str | None) -> None:
    """Quantized too: the weights stay blocks (plain layout, uint8) and the linears decode them."""
    lowered = lower(_graphs(tiny_ckpt, quantize=quantize), "cuda")
    if quantize:
        blocks = [p for sig in lowered.signatures.values() for p in sig.params if p.physical.dtype.value == "u8"]
        assert blocks, "no weight was lowered as packed blocks"
    built = build(lowered.mod, "cuda")
    src = _imported(built.executable.mod, "cuda").inspect_source()  # type: ignore[attr-defined]
    kernels = set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', src))
    functions = [gv.name_hint for gv, f in built.scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert functions and all(re.fullmatch(r"\w+", f) for f in functions)
    missing = [f for f in functions if not any(re.fullmatch(rf"{f}_kernel(_\d+)?", k) for k in kernels)]
    assert not missing, f"no CUDA kernel for {missing}"
    assert "none" not in built.schedules.values()
    if quantize:  # decode GEMVs: a warp per row over the blocks (dlight's GEMV rule cannot take them)
        rules = {rule for name, rule in built.schedules.items() if name.startswith("contraction")}
        assert rules == {"gpu-quant-gemv", "dlight.gpu.Matmul"}, rules
        assert "__shfl_down_sync" in src
    assert any(k.startswith("attention_values") for k in kernels)


@pytest.mark.parametrize("quantize", [None, "q4"])
def test_metal_builds_in_a_child_process(tiny_ckpt: Ckpt, tmp_path: Path, quantize: str | None) -> None:
    out = build_isolated(_graphs(tiny_ckpt, quantize=quantize), "metal", tmp_path / "gemma3.metal.tar")
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == ["devc.o", "lib0.o"]  # MSL blob + arm64 macOS host objects
        msl = tar.extractfile("devc.o").read().decode("latin-1")  # type: ignore[union-attr]
    kernels = re.findall(r"kernel void (\w+)\(", msl)
    # quantized linears are weight_kernels' block-decoding contractions, the embedding a lookup
    for piece in ("attention_values", "rms_norm", "softmax", *(("contraction", "lookup") if quantize else ("linear",))):
        assert any(piece in k for k in kernels), piece


def test_child_build_failure_is_an_error(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    graphs = _graphs(tiny_ckpt, "gemma1-gqa")
    with pytest.raises(RlxError, match="unknown target"):  # refused before any child starts
        build_isolated(graphs, "tpu", tmp_path / "x.tar")
    with pytest.raises(BuildError, match=r"child process \(exit 1\): .*HIRError: function name '1bad'"):
        build_isolated({"1bad": graphs["prefill"]}, "metal", tmp_path / "x.tar")  # the child's own error
    assert not (tmp_path / "x.tar").exists()


def test_in_process_build_refuses_isolated_devices(tiny_ckpt: Ckpt) -> None:
    with pytest.raises(BuildError, match="build_isolated"):
        build(lower(_graphs(tiny_ckpt, "gemma1-gqa")).mod, "metal")
