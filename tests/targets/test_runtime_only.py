"""Artifacts are self-contained: every kernel resolves in TVM's runtime-only library.

`rlx run ARTIFACT` loads libtvm_runtime.so, not the compiler library (rlx/runtime/tvm_runtime.py),
so a kernel that calls a packed function only the full library registers (Relax's `topk` ->
`tvm.contrib.sort.topk`) compiles and runs in-process but fails in the artifact. The runs here
are child processes through the CLI, as a user runs them. Tolerance as in test_cpu.py.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import te, tirx

import rlx
from rlx.cli import main
from rlx.targets import kernels
from rlx.targets.build import build, build_isolated
from rlx.targets.lower import lower
from rlx.targets.schedules import SCHEDULE_ATTR, apply_schedules, cpu_rules
from tests.fixtures.tiny import FAMILIES
from tests.targets.test_cpu import assert_close
from tests.targets.test_gpu_builds import NVCC, _graphs, _imported

Ckpt = Callable[[str], Path]
Artifacts = Callable[[str], Path]
SHORT = "2,5,7"
PROMPT = "2,17,99,5,42,200,7,63,128,11"  # longer than the sliding window (4)


@pytest.fixture(scope="module")
def artifacts(tiny_ckpt: Ckpt, tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """`artifacts(family)`: its CPU artifact, compiled once for this module, through a private
    compile cache (a shared one could hand back an artifact built by older code), without the
    serve entries (`rlx run` never calls them; `tests/serve` runs them from an artifact)."""
    root = tmp_path_factory.mktemp("runtime-only")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("RLX_CACHE_DIR", str(root / "cache"))
                [built[family]] = rlx.compile(tiny_ckpt(family), "cpu", root / family, serve=False)
        return built[family]

    return get


def _cli_run(model: Path, prompt: str, new_tokens: int, logits: Path) -> np.ndarray:
    """`python -m rlx run MODEL ...` (greedy) in a child process; its logits."""
    cmd = [sys.executable, "-m", "rlx", "run", str(model), "--prompt-ids", prompt,
           "--max-new-tokens", str(new_tokens), "--logits-out", str(logits)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return np.load(logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_artifact_runs_on_the_runtime_library(family: str, artifacts: Artifacts,
                                                           tmp_path: Path) -> None:
    logits = _cli_run(artifacts(family), SHORT, 3, tmp_path / "logits.npy")
    assert logits.shape[1:] == (256,) and 1 <= len(logits) <= 3 and np.isfinite(logits).all()  # EOS may stop it


def test_a_no_serve_artifact_runs_but_has_no_batched_engine(artifacts: Artifacts) -> None:
    """`rlx compile --no-serve` (here `serve=False`): prefill, decode and nothing else; asking it
    for the batched engine names the flag to drop."""
    import json

    from rlx.runtime.artifact import ArtifactError

    art = artifacts("gemma3")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["paged"] is None and set(manifest["entries"]) == {"prefill", "decode"}
    assert not (art / "hir" / "step.after.hir").exists()
    with pytest.raises(ArtifactError, match="no paged step entries") as err:
        rlx.load(art).paged_model(num_pages=4)
    assert "without --no-serve" in str(err.value.hint)


def test_the_cli_runs_artifacts_on_the_runtime_library_only(artifacts: Artifacts) -> None:
    """What makes the test above mean anything: the child's TVM is libtvm_runtime alone (with the
    compiler library loaded, `tvm.contrib.sort.topk` would resolve and hide the bug)."""
    probe = ("from rlx.cli import main\n"
             f"assert main(['run', {str(artifacts('gemma4-moe'))!r}, '--prompt-ids', {SHORT!r}, "
             "'--max-new-tokens', '2']) == 0\n"
             "import tvm.base\n"
             "maps = open('/proc/self/maps').read()\n"
             "print(tvm.base._RUNTIME_ONLY, 'libtvm_compiler' in maps, 'libtvm_runtime' in maps)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["True", "False", "True"]


def test_moe_artifact_matches_the_reference(artifacts: Artifacts, tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """Prefill + 5 greedy decode steps: the compiled top-k must route every token to the
    interpreter's experts (a different expert moves the logits by far more than the tolerance)."""
    ours = _cli_run(artifacts("gemma4-moe"), PROMPT, 6, tmp_path / "artifact.npy")
    assert main(["run", str(tiny_ckpt("gemma4-moe")), "--target", "reference", "--prompt-ids", PROMPT,
                 "--max-new-tokens", "6", "--logits-out", str(tmp_path / "reference.npy")]) == 0
    ref = np.load(tmp_path / "reference.npy")
    assert ours.shape == ref.shape == (6, 256)
    assert_close(ours, ref)


@functools.cache
def _topk_kernel(k: int) -> tuple[tvm.runtime.Module, str]:
    """`kernels.topk` over a symbolic [N, E], scheduled by our CPU rules and built for the host;
    also the rule that scheduled it."""
    x = te.placeholder((tirx.Var("n", "int64"), tirx.Var("e", "int64")), "float32", name="x")
    mod = tvm.IRModule({"main": te.create_prim_func([x, *kernels.topk(x, k)])})
    with tvm.target.Target("llvm"):
        scheduled = apply_schedules(cpu_rules())(mod)
    return tvm.compile(scheduled, target="llvm"), str(scheduled["main"].attrs[SCHEDULE_ATTR])


def _inputs(rng: np.random.Generator, rows: int, experts: int) -> dict[str, np.ndarray]:
    """Router-like probabilities, and tie-heavy rows: few distinct values, signed zeros, -inf,
    constant rows (only the lower-index-first rule orders those)."""
    probs = rng.random((rows, experts), dtype=np.float32)
    ties = rng.choice(np.array([0.0, -0.0, 0.25, 0.5, -np.inf], np.float32), size=(rows, experts))
    ties[: rows // 4] = 0.5
    return {"random": probs / probs.sum(-1, keepdims=True), "ties": ties}


@pytest.mark.parametrize(("experts", "k"), [(4, 1), (4, 4), (8, 2), (32, 8), (128, 8)])
def test_topk_kernel_matches_a_stable_argsort(experts: int, k: int) -> None:
    lib, rule = _topk_kernel(k)
    assert rule == "row-reduction"  # one parallel loop over the rows, all k passes under it
    rng = np.random.default_rng(experts * 100 + k)
    for name, x in _inputs(rng, 37, experts).items():
        want = np.argsort(-x, axis=-1, kind="stable")[:, :k]
        values = tvm.runtime.empty((x.shape[0], k), "float32")
        indices = tvm.runtime.empty((x.shape[0], k), "int64")
        lib["main"](tvm.runtime.tensor(x), values, indices)
        np.testing.assert_array_equal(indices.numpy(), want, err_msg=name)
        np.testing.assert_array_equal(values.numpy(), np.take_along_axis(x, want, axis=-1), err_msg=name)


def test_topk_kernel_refuses_more_picks_than_values() -> None:
    with pytest.raises(ValueError, match="top-5 of 4"):
        kernels.topk(te.placeholder((3, 4), "float32"), 5)


def test_moe_top_k_builds_for_gpu_targets(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """dlight schedules the top-k kernels (its fallback rule: a thread per row) and CUDA and
    Metal kernels are generated for them (tests/targets/test_gpu_builds.py builds no MoE model)."""
    graphs = _graphs(tiny_ckpt, "gemma4-moe")
    if NVCC is not None:
        built = build(lower(graphs).mod, "cuda")  # type: ignore[arg-type]
        topk = {name: rule for name, rule in built.schedules.items() if name.startswith("topk")}
        assert topk and set(topk.values()) == {"dlight.gpu.Fallback"}
        src = _imported(built.executable.mod, "cuda").inspect_source()  # type: ignore[attr-defined]
        assert all(re.search(rf"void (?:__launch_bounds__\(\d+\) )?{name}_kernel\(", src) for name in topk)
    out = build_isolated(graphs, "metal", tmp_path / "moe.tar")  # type: ignore[arg-type]
    with tarfile.open(out) as tar:
        msl = tar.extractfile("devc.o").read().decode("latin-1")  # type: ignore[union-attr]
    assert {"topk_kernel", "topk1_kernel"} <= set(re.findall(r"kernel void (topk\w*)\(", msl))
