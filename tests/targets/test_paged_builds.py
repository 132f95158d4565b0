"""The paged step entries (`step` and its static buckets) compile for CUDA and Metal, as the
single-sequence entries do (`test_gpu_builds.py`: nothing runs here, no GPU)."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from tvm import tirx

from rlx.compiler.graphs import paged_graphs
from rlx.frontends.checkpoint import open_checkpoint
from rlx.passes import DEFAULT_PIPELINE
from rlx.targets.build import build, build_isolated
from rlx.targets.lower import lower
from tests.targets.test_gpu_builds import NVCC, _imported

Ckpt = Callable[[str], Path]


def _entries(tiny_ckpt: Ckpt, family: str = "gemma3") -> dict[str, object]:
    return paged_graphs(open_checkpoint(tiny_ckpt(family)), passes=DEFAULT_PIPELINE, page_size=4, max_seq=64,
                        buckets=(1,)).entries


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed (CUDA modules need it to compile)")
def test_cuda_step_entries_have_a_kernel_for_every_function(tiny_ckpt: Ckpt) -> None:
    built = build(lower(_entries(tiny_ckpt, "gemma4-kvshare"), "cuda").mod, "cuda")
    src = _imported(built.executable.mod, "cuda").inspect_source()  # type: ignore[attr-defined]
    kernels = set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', src))
    functions = [gv.name_hint for gv, f in built.scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    missing = [f for f in functions if not any(re.fullmatch(rf"{f}_kernel(_\d+)?", k) for k in kernels)]
    assert functions and not missing, f"no CUDA kernel for {missing}"
    assert "none" not in built.schedules.values()
    assert any(k.startswith("paged_kv_write") for k in kernels)
    assert {"step", "step_1"} <= {gv.name_hint for gv, _ in built.scheduled.functions_items()}


def test_metal_step_entries_build_in_a_child_process(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    out = build_isolated(_entries(tiny_ckpt), "metal", tmp_path / "step.metal.tar")
    with tarfile.open(out) as tar:
        msl = tar.extractfile("devc.o").read().decode("latin-1")  # type: ignore[union-attr]
    kernels = re.findall(r"kernel void (\w+)\(", msl)
    assert any("paged_kv_write" in k for k in kernels), kernels
