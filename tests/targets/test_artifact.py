"""`rlx compile` artifacts: contents, atomicity, the compile cache, loading and refusing them.

Numerics: the artifact runs the same TVM module as the in-process CPU engine; against the
reference interpreter both are float32 with a different summation order, so logits agree to
~1e-6; we assert rtol 1e-4 with a floor of 1e-4 x max|logit| (as the other target tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import rlx
from rlx.cli import main
from rlx.compiler.graphs import DEFAULT_STEP_BUCKETS
from rlx.frontends.checkpoint import open_checkpoint
from rlx.hir.text import parse_hir
from rlx.hir.verify import verify
from rlx.targets.layouts import IL16, pack

Ckpt = Callable[[str], Path]
PROMPT = "2,17,99,5,42,200,7,63,128,11"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLX_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def gemma3_artifact(tiny_ckpt: Ckpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("art") / "gemma3"
    assert main(["compile", str(tiny_ckpt("gemma3")), "--target", "cpu", "--out", str(out), "--no-cache"]) == 0
    return out


def test_artifact_contents_match_the_checkpoint(gemma3_artifact: Path, tiny_ckpt: Ckpt) -> None:
    names = {p.name for p in gemma3_artifact.iterdir()}
    assert {"manifest.json", "lib.so", "weights.safetensors", "report.json", "hir"} <= names
    manifest = json.loads((gemma3_artifact / "manifest.json").read_text())
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    assert manifest["model_hash"] == ckpt.model_hash()
    assert manifest["config"] == ckpt.config.to_dict()
    assert manifest["target"]["name"] == "cpu" and manifest["versions"]["rlx"] == rlx.__version__
    # the single-sequence entries, and the batched engine's paged step (tests/targets/test_paged_cpu.py)
    steps = ["step", *(f"step_{b}" for b in DEFAULT_STEP_BUCKETS)]
    assert set(manifest["entries"]) == {"prefill", "decode", *steps}
    assert manifest["paged"]["entries"] == steps
    ctx = ckpt.config.max_position_embeddings
    assert manifest["bounds"] == {"SEQ": ctx, "PAST_SEQ": ctx - 1, "KV_CAP": ctx} and manifest["prefill_buckets"] == []
    decode = manifest["entries"]["decode"]
    assert decode["dims"] == ["PAST_SEQ"] and len(decode["caches"]) == 2 * ckpt.config.num_layers
    from safetensors.numpy import load_file  # our streaming writer must produce a standard file

    weights = load_file(gemma3_artifact / "weights.safetensors")
    params = {key: typ for e in manifest["entries"].values() for key, typ in e["params"]}
    assert set(weights) == set(params)
    # each weight is stored in the layout its kernels read (the manifest says which)
    assert set(manifest["layouts"]) == set(params)
    embed = weights["embed_tokens.weight"]
    assert manifest["layouts"]["embed_tokens.weight"] == IL16
    np.testing.assert_array_equal(embed, pack(ckpt.weights.get("embed_tokens.weight"), IL16))
    report = json.loads((gemma3_artifact / "report.json").read_text())
    assert report["kernels"] and all(k["schedule"] for k in report["kernels"])
    assert {"graphs", "lower", "build", "export", "weights"} <= set(report["phases"])
    hits = {k: v for r in report["passes"]["prefill"]["passes"] for k, v in r["stats"].items()}
    assert hits["hits.attention"] == ckpt.config.num_layers
    # the compiled context bounds the positions, so fold-rope built its cos|sin tables (q and k per layer)
    assert hits["rope-table"] == 2 * ckpt.config.num_layers and hits["tables"] == 2  # local + global theta
    for mode in ("prefill", "decode"):
        before = verify(parse_hir((gemma3_artifact / "hir" / f"{mode}.before.hir").read_text()))
        after = verify(parse_hir((gemma3_artifact / "hir" / f"{mode}.after.hir").read_text()))
        assert len(after) < len(before)


def test_artifact_runs_like_the_reference(gemma3_artifact: Path, tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    a, b = tmp_path / "artifact.npy", tmp_path / "reference.npy"
    assert main(["run", str(gemma3_artifact), "--prompt-ids", PROMPT, "--max-new-tokens", "9",
                 "--logits-out", str(a)]) == 0
    assert main(["run", str(tiny_ckpt("gemma3")), "--prompt-ids", PROMPT, "--max-new-tokens", "9",
                 "--logits-out", str(b)]) == 0
    ours, ref = np.load(a), np.load(b)
    assert ours.shape == ref.shape == (9, 256)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_running_an_artifact_loads_only_the_tvm_runtime(gemma3_artifact: Path) -> None:
    """`rlx run ARTIFACT` needs the VM, not TVM's 260 MB compiler library, nor torch (which
    tvm_ffi imports when installed): a fresh process checks what got loaded."""
    probe = ("import sys; from rlx.cli import main\n"
             f"assert main(['run', {str(gemma3_artifact)!r}, '--prompt-ids', {PROMPT!r}, '--max-new-tokens', '2']) == 0\n"
             "import tvm.base\n"
             "maps = open('/proc/self/maps').read()\n"
             "print(tvm.base._RUNTIME_ONLY, 'torch' in sys.modules, 'libtvm_compiler' in maps, 'libtvm_runtime' in maps)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-4:] == ["True", "False", "False", "True"]


def test_python_api_compile_and_load(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    [art] = rlx.compile(tiny_ckpt("gemma1-gqa"), "cpu", tmp_path / "g1")
    gen = rlx.load(art).generate([2, 17, 99, 5], 4)
    ref = rlx.load(tiny_ckpt("gemma1-gqa")).generate([2, 17, 99, 5], 4)
    assert gen.tokens == ref.tokens


def test_compile_cache_makes_a_repeat_instant(tiny_ckpt: Ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import rlx.compiler.compile as compile_module

    ck = str(tiny_ckpt("gemma1-mqa"))
    assert main(["compile", ck, "--out", str(tmp_path / "a")]) == 0
    assert "compile cache hit" not in capsys.readouterr().err
    assert main(["compile", ck, "--out", str(tmp_path / "b")]) == 0
    assert "compile cache hit" in capsys.readouterr().err
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
    assert (tmp_path / "b" / "lib.so").stat().st_size == (tmp_path / "a" / "lib.so").stat().st_size
    # an edited rlx (same version string) is another compiler: no artifact of the old one is served
    monkeypatch.setattr(compile_module, "source_digest", lambda: "edited")
    assert main(["compile", ck, "--out", str(tmp_path / "c")]) == 0
    assert "compile cache hit" not in capsys.readouterr().err


def test_unknown_target_fails_before_any_compile(tiny_ckpt: Ckpt, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x"
    assert main(["compile", str(tiny_ckpt("gemma1-mqa")), "--target", "cpu,tpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tpu" in err and "cpu-aarch64" in err and "metal" in err  # the presets are listed
    assert not out.exists() and "[rlx] cpu:" not in err


def test_interrupted_compile_leaves_nothing(tiny_ckpt: Ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import rlx.targets.lower as lower

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lower, "lower", interrupted)
    assert main(["compile", str(tiny_ckpt("gemma1-mqa")), "--out", str(tmp_path / "art")]) == 130  # 128 + SIGINT
    assert capsys.readouterr().err.strip().endswith("rlx: interrupted (SIGINT)")
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"] or not list(tmp_path.iterdir())
    assert not (tmp_path / "art").exists()


def _tampered(src: Path, dst: Path, **changes: object) -> Path:
    import shutil

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        manifest[section][field] = value
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_artifacts_from_another_version_or_target_are_refused(gemma3_artifact: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    old = _tampered(gemma3_artifact, tmp_path / "old", versions__tvm="0.19.0")
    assert main(["run", str(old), "--prompt-ids", "2,3"]) == 2
    assert "compiled with tvm 0.19.0" in capsys.readouterr().err
    gpu = _tampered(gemma3_artifact, tmp_path / "gpu", target__name="cuda", target__device="cuda")
    assert main(["run", str(gpu), "--prompt-ids", "2,3"]) == 2
    assert "compiled for target 'cuda', which cannot run here" in capsys.readouterr().err
    assert main(["run", str(gemma3_artifact), "--target", "cuda", "--prompt-ids", "2,3"]) == 2
    assert "is compiled for cpu, not cuda" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--prompt-ids", "2,3"]) == 2  # neither artifact nor checkpoint


def test_prompt_longer_than_the_compiled_max_seq(tiny_ckpt: Ckpt, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "short"
    assert main(["compile", str(tiny_ckpt("gemma1-mqa")), "--max-seq", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--prompt-ids", PROMPT, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "10 tokens" in err and "supports 8" in err
    assert main(["compile", str(tiny_ckpt("gemma1-mqa")), "--max-seq", "100000", "--out", str(tmp_path / "y")]) == 2


def test_one_call_compiles_cpu_cuda_and_metal(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """CUDA (nvcc, no GPU needed) and Metal (MSL + arm64 macOS objects) artifacts build here (the
    serve entries' GPU builds: `test_paged_builds.py`)."""
    import tarfile

    out = tmp_path / "all"
    assert main(["compile", str(tiny_ckpt("gemma3")), "--target", "cpu,cuda,metal", "--out", str(out),
                 "--no-serve"]) == 0
    for target, lib in (("cpu", "lib.so"), ("cuda", "lib.so"), ("metal", "lib.tar")):
        manifest = json.loads((out / target / "manifest.json").read_text())
        assert manifest["target"]["name"] == target and manifest["library"] == lib
        assert (out / target / lib).stat().st_size > 0
    kernels = {k["name"] for k in json.loads((out / "cuda" / "report.json").read_text())["kernels"]}
    cuda = (out / "cuda" / "kernels.cu").read_text()
    assert kernels and all(f"{k}_kernel" in cuda for k in kernels)  # every kernel has CUDA source
    with tarfile.open(out / "metal" / "lib.tar") as tar:
        msl = tar.extractfile("devc.o").read().decode("latin-1")  # type: ignore[union-attr]
    metal_kernels = {k["name"] for k in json.loads((out / "metal" / "report.json").read_text())["kernels"]}
    assert metal_kernels and all(f"kernel void {k}" in msl for k in metal_kernels)


def _threads_after_run(art: Path, logits: Path) -> int:
    """TVM's pool size after `rlx run ART` in a fresh process (TVM_NUM_THREADS unset)."""
    probe = ("import tvm; from rlx.cli import main\n"
             f"assert main(['run', {str(art)!r}, '--prompt-ids', {PROMPT!r}, '--max-new-tokens', '3', "
             f"'--logits-out', {str(logits)!r}]) == 0\n"
             "print(tvm.get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_backend_opt_level_and_threads_are_applied(gemma3_artifact: Path, tiny_ckpt: Ckpt, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`[backend.cpu] opt_level` is the PassContext of the build; `threads` sizes TVM's thread
    pool when the artifact runs; without it, every usable core (TVM alone would take half)."""
    import tvm

    from rlx.targets import build as build_module

    seen: list[int] = []
    schedule_module = build_module.schedule_module
    monkeypatch.setattr(build_module, "schedule_module", lambda mod, target: seen.append(
        tvm.transform.PassContext.current().opt_level) or schedule_module(mod, target))
    profile = tmp_path / "gemma.rlx.toml"
    profile.write_text("[backend.cpu]\nopt_level = 1\nthreads = 1\n")
    [art] = rlx.compile(tiny_ckpt("gemma3"), "cpu", tmp_path / "art", profile=str(profile), serve=False)
    assert seen == [1]
    assert json.loads((art / "manifest.json").read_text())["backend"] == {"opt_level": 1, "threads": 1}
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert _threads_after_run(art, a) == 1
    assert _threads_after_run(gemma3_artifact, tmp_path / "c.npy") == len(os.sched_getaffinity(0))
    assert main(["run", str(tiny_ckpt("gemma3")), "--prompt-ids", PROMPT, "--max-new-tokens", "3",
                 "--logits-out", str(b)]) == 0
    ref = np.load(b)
    np.testing.assert_allclose(np.load(a), ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
