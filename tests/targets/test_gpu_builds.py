"""GPU targets are compiled here (no GPU needed) and their sources inspected; nothing runs.

CUDA needs `nvcc` (TVM calls it during the build); Metal codegen needs nothing, and its build
runs in a child process (TVM.md: a Metal build segfaulted the whole process once).
"""

from __future__ import annotations

import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from tvm import tirx

from rlx.driver.graphs import reference_graphs
from rlx.errors import RlxError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.passes import DEFAULT_PIPELINE
from rlx.targets.build import BuildError, build, build_isolated
from rlx.targets.lower import lower

Ckpt = Callable[[str], Path]
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).exists()), None)


def _graphs(tiny_ckpt: Ckpt, family: str = "gemma3") -> dict[str, object]:
    prefill, decode = reference_graphs(open_checkpoint(tiny_ckpt(family)), passes=DEFAULT_PIPELINE)
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
def test_cuda_module_has_a_kernel_for_every_function(tiny_ckpt: Ckpt) -> None:
    built = build(lower(_graphs(tiny_ckpt)).mod, "cuda")
    src = _imported(built.executable.mod, "cuda").inspect_source()  # type: ignore[attr-defined]
    kernels = set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', src))
    functions = [gv.name_hint for gv, f in built.scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert functions and all(re.fullmatch(r"\w+", f) for f in functions)
    missing = [f for f in functions if not any(re.fullmatch(rf"{f}_kernel(_\d+)?", k) for k in kernels)]
    assert not missing, f"no CUDA kernel for {missing}"
    assert "none" not in built.schedules.values()
    assert any(k.startswith("attention_values") for k in kernels)


def test_metal_builds_in_a_child_process(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    out = build_isolated(_graphs(tiny_ckpt), "metal", tmp_path / "gemma3.metal.tar")
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == ["devc.o", "lib0.o"]  # MSL blob + arm64 macOS host objects
        msl = tar.extractfile("devc.o").read().decode("latin-1")  # type: ignore[union-attr]
    kernels = re.findall(r"kernel void (\w+)\(", msl)
    for piece in ("attention_values", "linear", "rms_norm", "softmax"):
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
