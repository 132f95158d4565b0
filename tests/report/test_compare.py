"""`rlx compare`: every number in the report is the artifacts' own, read back here independently.

One compare run (tiny gemma3, cpu,cuda,metal) is shared by the module; the failure and
bad-input tests run their own, small ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from rlx.cli import main
from rlx.frontends.config import GemmaConfig
from rlx.report.compare import op_mix, op_vocabulary, read_bench
from rlx.targets.build import BuildError

Ckpt = Callable[[str], Path]
TARGETS = ("cpu", "cuda", "metal")
PROMPT = "2,17,99,5,42,200,7,63"


@pytest.fixture(scope="module")
def report_dir(tiny_ckpt: Ckpt, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLX_CACHE_DIR", str(root / "cache"))
        out = root / "report"
        assert main(["compare", str(tiny_ckpt("gemma3")), "--targets", ",".join(TARGETS),
                     "--prompt-ids", PROMPT, "--out", str(out)]) == 0
        yield out


@pytest.fixture(scope="module")
def data(report_dir: Path) -> dict[str, Any]:
    return json.loads((report_dir / "report.json").read_text())


def _artifact(report_dir: Path, target: str) -> tuple[dict[str, Any], dict[str, Any], Path]:
    art = report_dir / "artifacts" / target
    return json.loads((art / "manifest.json").read_text()), json.loads((art / "report.json").read_text()), art


def test_report_files_and_columns(report_dir: Path, data: dict[str, Any]) -> None:
    assert {p.name for p in report_dir.iterdir()} == {"report.json", "report.md", "report.html", "artifacts"}
    assert list(data["targets"]) == list(TARGETS)
    assert not [p for p in report_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


@pytest.mark.parametrize("target", TARGETS)
def test_compile_kernels_code_and_passes_match_the_artifact(report_dir: Path, data: dict[str, Any],
                                                            target: str) -> None:
    manifest, report, art = _artifact(report_dir, target)
    t = data["targets"][target]
    assert t["compile"]["phases"] == report["phases"]
    assert t["kernels"]["count"] == len(report["kernels"])
    assert [(k["name"], k["schedule"]) for k in t["kernels"]["list"]] == [
        (k["name"], k["schedule"]) for k in report["kernels"]]
    assert t["library_bytes"] == (art / manifest["library"]).stat().st_size
    for mode, rep in report["passes"].items():
        assert t["passes"][mode]["pipeline"] == [r["spec"] for r in rep["passes"]]
        stats = {k: v for r in rep["passes"] for k, v in r["stats"].items()}
        assert t["passes"][mode]["hits"] == {k[5:]: v for k, v in stats.items() if k.startswith("hits.")}
        assert t["passes"][mode]["misses"] == {k[7:]: v for k, v in stats.items() if k.startswith("misses.")}
    md = (report_dir / "report.md").read_text()
    assert f"{t['code']['bytes']:,} B ({t['code']['kind']})" in md
    assert str(t["kernels"]["count"]) in md and str(report["phases"]["build"]) in md


def test_code_sizes(report_dir: Path, data: dict[str, Any]) -> None:
    code = {name: t["code"] for name, t in data["targets"].items()}
    assert code["cuda"] == {"kind": "CUDA source", "bytes": (report_dir / "artifacts/cuda/kernels.cu").stat().st_size}
    assert code["cpu"] == {"kind": "library", "bytes": (report_dir / "artifacts/cpu/lib.so").stat().st_size}
    import tarfile

    with tarfile.open(report_dir / "artifacts/metal/lib.tar") as tar:
        devc = tar.extractfile("devc.o").read()  # type: ignore[union-attr]
    kernels = devc.count(b"#include <metal_stdlib>")
    assert code["metal"]["kind"] == "MSL" and kernels > 0
    assert kernels * len(b"#include <metal_stdlib>") < code["metal"]["bytes"] < len(devc)


@pytest.mark.parametrize("target", TARGETS)
def test_memory_plan(report_dir: Path, data: dict[str, Any], target: str) -> None:
    manifest, _, art = _artifact(report_dir, target)
    mem = data["targets"][target]["memory"]
    assert mem["weight_bytes"] == sum(a.nbytes for a in load_file(str(art / "weights.safetensors")).values())
    cfg = GemmaConfig.from_dict(manifest["config"])
    seq = manifest["max_seq"]
    assert mem["kv_cache_bytes"] == sum(2 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * seq * 4
                                        for i in range(cfg.num_layers) if not cfg.is_kv_shared(i))
    act = mem["activation"]
    assert seq in act["shape"] and act["bytes"] == int(np.prod(act["shape"])) * 4
    assert f"%{act['node']} = " in (art / "hir" / "prefill.after.hir").read_text()


def test_numerics_and_status(report_dir: Path, data: dict[str, Any]) -> None:
    cpu = data["targets"]["cpu"]
    assert cpu["status"] == "executed"
    assert cpu["numerics"]["max_abs_diff"] < 1e-4 and cpu["numerics"]["top1_agreement"] == 1.0
    assert cpu["numerics"]["rows"] == 17 and cpu["speed"]["prefill_tok_s"] > 0 and cpu["speed"]["decode_tok_s"] > 0
    # nothing quantized: the unquantized reference is the reference, and the numbers repeat
    assert data["quantize"]["unquantized_reference"]["same_as_reference"]
    assert cpu["numerics"]["vs_unquantized"] == {k: v for k, v in cpu["numerics"].items() if k != "vs_unquantized"}
    assert data["reference"]["vs_unquantized"]["max_abs_diff"] == 0.0
    expected = {"cuda": "compiled, not executed: no GPU", "metal": "compiled, not executed: needs an Apple GPU"}
    md, page = (report_dir / "report.md").read_text(), (report_dir / "report.html").read_text()
    for target, status in expected.items():
        assert data["targets"][target]["status"] == status and "numerics" not in data["targets"][target]
        assert status in md and status in page


def test_html_is_self_contained(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text()
    assert page.count("<svg") >= 2  # compile time per phase, kernels by op kind
    assert not re.search(r"https?://|src=|<link|@import", page)


def test_op_mix_splits_fused_names() -> None:
    vocab = op_vocabulary()
    assert op_mix("fused_rms_norm3_add1", vocab) == ["rms_norm", "add"]
    assert op_mix("fused_attention_scores1_multiply1_causal_mask2", vocab) == [
        "attention_scores", "multiply", "causal_mask"]
    assert op_mix("linear7", vocab) == ["linear"]


def test_bench_file_read_defensively(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"engines": [{"name": "llama.cpp", "prefill_tok_s": 900.0, "decode_tok_s": 40}]}))
    assert read_bench(good)["engines"] == [{"name": "llama.cpp", "prefill_tok_s": 900.0, "decode_tok_s": 40.0}]
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"results": {"torch": {"decode_tok_s": 12.5}}}))
    got = read_bench(odd)
    assert got["engines"] == [] and got["found"] == [{"key": "results.torch.decode_tok_s", "value": 12.5}]
    assert "not found" in got["note"]


def test_unknown_target_exits_2_with_no_output(tiny_ckpt: Ckpt, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    assert main(["compare", str(tiny_ckpt("gemma3")), "--targets", "cpu,tpu", "--out", str(out),
                 "--prompt-ids", PROMPT]) == 2
    err = capsys.readouterr().err
    assert "tpu" in err and "[rlx] cpu:" not in err and not out.exists()


def test_a_failed_target_is_reported_and_the_others_complete(tiny_ckpt: Ckpt, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import rlx.targets.build as build

    def broken(*args: object, **kwargs: object) -> None:
        raise BuildError("metal build failed in its child process (test)")

    monkeypatch.setenv("RLX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "build_isolated", broken)
    out = tmp_path / "rep"
    assert main(["compare", str(tiny_ckpt("gemma3")), "--targets", "cpu,metal", "--out", str(out),
                 "--prompt-ids", PROMPT]) == 0
    data = json.loads((out / "report.json").read_text())
    metal, cpu = data["targets"]["metal"], data["targets"]["cpu"]
    assert metal == {"status": "failed", "error": "metal build failed in its child process (test)"}
    assert cpu["status"] == "executed" and cpu["numerics"]["top1_agreement"] == 1.0
    assert "compile failed: metal build failed" in (out / "report.md").read_text()
    assert not (out / "artifacts" / "metal").exists()


def test_per_target_pipelines_are_shown_as_differences(tiny_ckpt: Ckpt, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLX_CACHE_DIR", str(tmp_path / "cache"))
    profile = tmp_path / "p.rlx.toml"
    profile.write_text('[backend.cuda]\npasses = "fold-constants,dce"\n')
    out = tmp_path / "rep"
    assert main(["compare", str(tiny_ckpt("gemma3")), "--targets", "cpu,cuda", "--profile", str(profile),
                 "--out", str(out), "--prompt-ids", PROMPT]) == 0
    data = json.loads((out / "report.json").read_text())
    for mode in ("prefill", "decode"):
        diff = data["pipeline_differences"][mode]
        assert data["targets"]["cuda"]["passes"][mode]["pipeline"] == ["fold-constants", "dce"]
        assert not diff["same"] and "fuse-attention" in diff["only_some"]["cpu"] and "cuda" not in diff["only_some"]
    assert "pipelines differ; passes not run by every target: cpu: " in (out / "report.md").read_text()
    assert data["targets"]["cpu"]["numerics"]["top1_agreement"] == 1.0


# --- quantized weights: formats, bytes per token, numerics vs the unquantized model ----------------------

_STORED = re.compile(r"[\w.]+\.weight")  # the stored tensors a weight key reads ("concat{...}(a.weight,b.weight)")


@pytest.fixture(scope="module")
def q8_report(tiny_ckpt: Ckpt, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("compare-q8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLX_CACHE_DIR", str(root / "cache"))
        out = root / "report"
        assert main(["compare", str(tiny_ckpt("gemma3")), "--targets", "cpu", "--quantize", "q8",
                     "--prompt-ids", PROMPT, "--out", str(out)]) == 0
        yield out


def test_q8_formats_per_tensor_match_the_quantize_pass(q8_report: Path) -> None:
    data = json.loads((q8_report / "report.json").read_text())
    manifest, report, art = _artifact(q8_report, "cpu")
    weights = data["targets"]["cpu"]["weights"]
    assert weights == {k: report["weights"][k] for k in weights}  # the artifact's own report.json says the same
    assert data["quantize"]["profile"]["scheme"] == weights["quantize"]["scheme"] == "q8"
    tensors = weights["tensors"]
    assert set(tensors) == set(load_file(str(art / "weights.safetensors")))
    for key, t in tensors.items():
        # projections and the (tied) embedding are q8_0; norms stay float
        assert t["format"] == ("q8_0" if key.endswith("_proj.weight") or key.startswith(("concat", "embed"))
                               else "f32"), key
        assert t["format"] == manifest["quantize"]["tensors"].get(key, "f32")
    # every stored tensor the quantize pass retyped is in exactly one q8_0 param (fusion concatenates some)
    for mode in ("prefill", "decode"):
        [stats] = [r["stats"] for r in report["passes"][mode]["passes"] if r["spec"].startswith("quantize")]
        stored = [n for k, t in tensors.items() if t["format"] == "q8_0" for n in _STORED.findall(k)]
        assert len(stored) == len(set(stored)) == stats["format.q8_0"] == 4 * 7 + 1
    by_format = {f: {"tensors": sum(t["format"] == f for t in tensors.values()),
                     "bytes": sum(t["bytes"] for t in tensors.values() if t["format"] == f),
                     "per_token_bytes": sum(t["per_token_bytes"] for t in tensors.values() if t["format"] == f)}
                 for f in ("f32", "q8_0")}
    assert weights["by_format"] == by_format
    md = (q8_report / "report.md").read_text()
    assert "quantize q8 (group 32)" in md and "## Weights and quantization" in md
    assert f"| q8_0 | {by_format['q8_0']['tensors']} tensors, {by_format['q8_0']['bytes']:,} B |" in md


def test_q8_bytes_per_token_from_the_weights_file(q8_report: Path) -> None:
    data = json.loads((q8_report / "report.json").read_text())
    _, _, art = _artifact(q8_report, "cpu")
    arrays = load_file(str(art / "weights.safetensors"))
    weights = data["targets"]["cpu"]["weights"]
    for key, t in weights["tensors"].items():
        assert t["bytes"] == arrays[key].nbytes, key
        if t["format"] == "q8_0":  # Q8_0: 32 values per block, an f16 scale + 32 int8 = 34 bytes
            n, k = t["shape"]
            assert t["bytes"] == n * (k // 32) * 34 and arrays[key].dtype == np.uint8
        else:
            assert t["bytes"] == 4 * int(np.prod(t["shape"]))
    # tiny gemma3 ties the LM head to the embedding: a decode step reads every weight, the table once
    total = sum(a.nbytes for a in arrays.values())
    assert weights["total_bytes"] == weights["bytes_per_token"] == total == data["targets"]["cpu"]["memory"]["weight_bytes"]
    assert weights["tensors"]["embed_tokens.weight"]["per_token_bytes"] == 256 * 2 * 34
    assert "lm_head.weight" not in weights["tensors"]
    assert f"| weights read per decode token | {total:,} B |" in (q8_report / "report.md").read_text()


def test_q8_numerics_vs_the_unquantized_reference(tiny_ckpt: Ckpt, q8_report: Path) -> None:
    from rlx.compiler.engines import reference_engine
    from rlx.compiler.profile_toml import resolve_profile
    from rlx.frontends.checkpoint import open_checkpoint

    data = json.loads((q8_report / "report.json").read_text())
    ids, tokens = [int(i) for i in PROMPT.split(",")], data["reference"]["tokens"]
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    rows = {}
    for scheme in ("q8", "none"):  # both fed the q8 reference's greedy tokens, as the report's walks are
        engine = reference_engine(ckpt, profile=resolve_profile(None, ckpt.path, scheme))
        rows[scheme] = np.stack([engine.prefill(ids), *(engine.step(t) for t in tokens)]).astype(np.float32)
    diff = float(np.abs(rows["q8"] - rows["none"]).max())
    scale = float(np.abs(rows["none"]).max())
    ref = data["reference"]["vs_unquantized"]
    assert ref["max_abs_diff"] == pytest.approx(diff, rel=1e-4) and ref["max_abs_logit"] == pytest.approx(scale)
    assert ref["top1_agreement"] == float(np.mean(rows["q8"].argmax(-1) == rows["none"].argmax(-1)))
    assert not data["quantize"]["unquantized_reference"]["same_as_reference"]
    num = data["targets"]["cpu"]["numerics"]
    assert num["max_abs_diff"] < 1e-4 and num["top1_agreement"] == 1.0  # vs the q8 reference: the same model
    vs = num["vs_unquantized"]
    assert vs["rows"] == num["rows"] == 17
    assert 0 < vs["rel_diff"] < 0.05 and vs["rel_diff"] == pytest.approx(vs["max_abs_diff"] / scale)
    assert vs["max_abs_diff"] == pytest.approx(diff, abs=1e-4)  # the quantization error, not the target's
    assert vs["top1_agreement"] >= 0.8
    md = (q8_report / "report.md").read_text()
    assert f"| vs unquantized: max abs diff / max logit | {vs['max_abs_diff']:.3g} / {scale:.3g}" in md


def test_an_embedding_lookup_reads_one_row_per_token(tiny_ckpt: Ckpt, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLX_CACHE_DIR", str(tmp_path / "cache"))
    art = tmp_path / "art"
    assert main(["compile", str(tiny_ckpt("gemma4-ple")), "--target", "cpu", "--out", str(art)]) == 0
    weights = json.loads((art / "report.json").read_text())["weights"]
    arrays = load_file(str(art / "weights.safetensors"))
    [ple] = [k for k in weights["tensors"] if k.startswith("embed_tokens_per_layer.")]
    n, k = weights["tensors"][ple]["shape"]
    # the per-layer-input table is only looked up: one row of it per token; everything else is read whole
    assert weights["tensors"][ple]["per_token_bytes"] == 4 * k and n * k * 4 == arrays[ple].nbytes
    assert weights["bytes_per_token"] == sum(a.nbytes for a in arrays.values()) - (n - 1) * k * 4
    assert weights["by_format"] == {"f32": {"tensors": len(arrays), "bytes": sum(a.nbytes for a in arrays.values()),
                                            "per_token_bytes": weights["bytes_per_token"]}}


def test_memory_plan_of_a_long_context_counts_rings_and_chunks() -> None:
    """At a context past the window and the chunk (the tiny models' 256 is below both): a
    sliding-window ring holds window + 511 rows, a full layer's buffer max_seq, and the largest
    activation is sized by the longest prefill call (a 512-token chunk, or the bucket it pads to)."""
    from rlx.report.compare import kv_cache_bytes, longest_prefill

    caches = [["cache_k.0", "f32[1,1,KV_WINDOW_512,256]"], ["cache_v.0", "f32[1,1,KV_WINDOW_512,256]"],
              ["cache_k.1", "f32[1,1,KV_CAP,256]"]]
    manifest: dict[str, Any] = {"max_seq": 8192, "prefill_buckets": [], "entries": {"decode": {"caches": caches}}}
    assert kv_cache_bytes(manifest) == (2 * (512 + 511) + 8192) * 256 * 4
    assert longest_prefill(manifest) == 512
    assert longest_prefill({**manifest, "prefill_buckets": [128, 1024]}) == 1024
    assert longest_prefill({**manifest, "max_seq": 300}) == 300
    assert kv_cache_bytes({**manifest, "max_seq": 300}) == 3 * 300 * 256 * 4
