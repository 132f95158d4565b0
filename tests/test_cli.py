"""The CLI as a user meets it: inspect output, run flags, and bad input -> clear error, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rlx.cli import main
from rlx.hir.serialize import hir_from_dict
from rlx.hir.text import parse_hir
from rlx.hir.verify import verify
from tests.fixtures.tiny import hf_reference

Ckpt = Callable[[str], Path]


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err  # may also hold the fixture builder's progress bars
    assert "rlx: error: " in err and "Traceback" not in err
    return err[err.index("rlx: error: "):]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_inspect_text_parses_back_and_summarizes(tiny_ckpt: Ckpt, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_ckpt("gemma3"))]) == 0
    out = capsys.readouterr().out
    hir = verify(parse_hir(out))
    assert "logits" in hir.outputs
    assert "# nodes per op:" in out and "rms_norm=" in out
    assert "# layer  0: sliding_attention" in out and "window 4" in out


def test_inspect_json_and_dot(tiny_ckpt: Ckpt, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_ckpt("gemma2")), "--format", "json", "--mode", "decode"]) == 0
    doc = json.loads(capsys.readouterr().out)
    hir = verify(hir_from_dict(doc["hir"]))
    assert "past_k.0" in hir.inputs and doc["summary"]["nodes"] == len(hir)
    assert doc["summary"]["layers"][0]["window"] == 4 and doc["summary"]["layers"][1]["window"] is None
    assert main(["inspect", str(tiny_ckpt("gemma2")), "--format", "dot"]) == 0
    assert "digraph" in capsys.readouterr().out


def test_run_prompt_ids_and_logits_out(tiny_ckpt: Ckpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tiny_ckpt("gemma2")
    prompt = [2, 17, 99, 5, 42, 200]
    ref = hf_reference(d, prompt, 4)
    out = tmp_path / "sub" / "logits.npy"
    assert main(["run", str(d), "--target", "reference", "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", "5", "--logits-out", str(out)]) == 0
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (5, ref.logits.shape[1])
    np.testing.assert_allclose(logits, ref.logits, rtol=1e-4, atol=1e-4 * np.abs(ref.logits).max())
    err = capsys.readouterr().err
    assert "tok/s" in err and ",".join(map(str, ref.tokens)) in err


def test_long_prompts_from_files(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    """`--prompt-ids @FILE` (ids split by commas, spaces or newlines) and `--prompt-file PATH` run
    the same prompt as the inline flags (a long prompt does not fit a 128 KiB argument)."""
    from tests.serve.conftest import write_char_tokenizer

    d = tmp_path / "model"
    shutil.copytree(tiny_ckpt("gemma3"), d)
    write_char_tokenizer(d)
    prompt, text = [2, 17, 99, 5, 42, 200], "Hello, long\ndocument"
    (tmp_path / "ids.txt").write_text("2, 17 99\n5,42\n200\n")
    (tmp_path / "prompt.txt").write_text(text)
    runs = {"ids": ["--prompt-ids", ",".join(map(str, prompt))], "ids-file": ["--prompt-ids", f"@{tmp_path}/ids.txt"],
            "text": ["--prompt", text], "text-file": ["--prompt-file", str(tmp_path / "prompt.txt")]}
    logits = {}
    for name, flags in runs.items():
        out = tmp_path / f"{name}.npy"
        assert main(["run", str(d), *flags, "--max-new-tokens", "2", "--logits-out", str(out)]) == 0
        logits[name] = np.load(out)
    np.testing.assert_array_equal(logits["ids-file"], logits["ids"])
    np.testing.assert_array_equal(logits["text-file"], logits["text"])
    assert not np.array_equal(logits["text"], logits["ids"])


def test_exit_code_is_nonzero_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rlx", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "rlx: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_model_type(tiny_ckpt: Ckpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _copy(tiny_ckpt("gemma1-mqa"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    err = _err(capsys, ["inspect", str(d)])
    assert "llama" in err and "gemma3_text" in err


def test_missing_config_field(tiny_ckpt: Ckpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _copy(tiny_ckpt("gemma2"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    err = _err(capsys, ["inspect", str(d)])
    assert "hidden_size" in err and "config.json" in err


def test_truncated_safetensors(tiny_ckpt: Ckpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _copy(tiny_ckpt("gemma3"), tmp_path / "m")
    st = next(d.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    err = _err(capsys, ["run", str(d), "--prompt-ids", "2,3", "--max-new-tokens", "1"])
    assert st.name in err


def test_missing_tensor(tiny_ckpt: Ckpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.numpy import load_file, save_file

    d = _copy(tiny_ckpt("gemma3"), tmp_path / "m")
    st = next(d.glob("*.safetensors"))
    tensors = load_file(st)
    victim = next(k for k in tensors if "layers.1.mlp.up_proj" in k)
    del tensors[victim]
    save_file(tensors, st, metadata={"format": "pt"})
    err = _err(capsys, ["inspect", str(d)])
    assert "layers.1.mlp.up_proj.weight" in err and "missing" in err


def test_wrong_shape_tensor(tiny_ckpt: Ckpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.numpy import load_file, save_file

    d = _copy(tiny_ckpt("gemma3"), tmp_path / "m")
    st = next(d.glob("*.safetensors"))
    tensors = load_file(st)
    victim = next(k for k in tensors if "layers.0.self_attn.o_proj" in k)
    tensors[victim] = np.zeros((64, 32), np.float32)
    save_file(tensors, st, metadata={"format": "pt"})
    err = _err(capsys, ["inspect", str(d)])
    assert "layers.0.self_attn.o_proj.weight" in err and "[64, 32]" in err and "[64, 64]" in err


def test_dynamic_seq_with_batch(tiny_ckpt: Ckpt, capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["inspect", str(tiny_ckpt("gemma1-mqa")), "--batch", "2"])
    assert "dynamic_seq needs batch 1" in err
    assert main(["inspect", str(tiny_ckpt("gemma1-mqa")), "--batch", "2", "--seq", "8"]) == 0


def test_prompt_longer_than_context(tiny_ckpt: Ckpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = ",".join(["5"] * 300)  # tiny configs have max_position_embeddings 256
    out = tmp_path / "logits.npy"
    err = _err(capsys, ["run", str(tiny_ckpt("gemma1-mqa")), "--prompt-ids", ids, "--logits-out", str(out)])
    assert "300 tokens" in err and "256" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_prompt_ids_and_unknown_target(tiny_ckpt: Ckpt, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tiny_ckpt("gemma1-mqa"))
    assert "comma-separated" in _err(capsys, ["run", d, "--prompt-ids", "2,x"])
    assert "unknown target 'tpu'" in _err(capsys, ["run", d, "--target", "tpu", "--prompt-ids", "2"])
    assert "exactly one of" in _err(capsys, ["run", d])


# ---------------------------------------------------------------------------------------------
# Profiles and pass pipelines: --profile FILE|PRESET, --passes SPEC, inspect --report.
# (kept together at the end of the file; imports are local so this block stands alone)
# ---------------------------------------------------------------------------------------------

PROFILE_PROMPT = [2, 17, 99, 5, 42, 200, 7, 63, 128, 11]


def _report_rows(out: str) -> list[str]:
    """The pass names of `inspect --report` rows (`# <spec> <ms> <changed> ...`)."""
    rows = out[out.index("# pass "):].splitlines()[1:]
    return [r[2:].split()[0] for r in rows if r.startswith("# ") and not r.startswith("# pass")]


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_inspect_report_lists_each_pass(mode: str, tiny_ckpt: Ckpt, capsys: pytest.CaptureFixture[str]) -> None:
    from rlx.compiler.profile import DEFAULT_PROFILE

    assert main(["inspect", str(tiny_ckpt("gemma3")), "--mode", mode, "--report"]) == 0
    out = capsys.readouterr().out
    verify(parse_hir(out))  # the report is comment lines: the text still parses back
    expected = DEFAULT_PROFILE.pipeline_text(mode).split(",")
    assert _report_rows(out) == expected and "fuse-attention" in expected
    assert f"# passes for {mode}: {','.join(expected)}" in out and "hits.attention=4" in out
    assert "softmax" not in out.split("# graph")[0]  # the printed HIR is the fused one


def test_inspect_json_report_and_passes_override(tiny_ckpt: Ckpt, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tiny_ckpt("gemma2"))
    assert main(["inspect", d, "--format", "json", "--report", "--passes", "cse,dce"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in doc["passes"]] == ["cse", "dce"]
    assert all({"seconds", "changed", "nodes_before", "nodes_after", "stats"} <= set(p) for p in doc["passes"])
    assert main(["inspect", d, "--report", "--passes", ""]) == 0
    out = capsys.readouterr().out
    assert "# passes for prefill: (no passes)" in out and "softmax(" in out  # unfused


def test_profile_next_to_the_weights_and_flag_precedence(tiny_ckpt: Ckpt, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    d = _copy(tiny_ckpt("gemma3"), tmp_path / "m")
    (d / "gemma.rlx.toml").write_text('[passes]\npipeline = "cse,dce"\n\n[[layers]]\nkeep_first = 1\n')
    assert main(["inspect", str(d), "--report"]) == 0
    out = capsys.readouterr().out
    assert _report_rows(out) == ["cse", "dce"] and f"# profile: {d / 'gemma.rlx.toml'}" in out
    assert "%l0.attn" in out and "%l1." not in out  # keep_first = 1
    assert main(["inspect", str(d), "--report", "--profile", "gemma_decode"]) == 0  # --profile wins
    out = capsys.readouterr().out
    assert "fuse-epilogue" in _report_rows(out) and "%l1." in out
    assert main(["inspect", str(d), "--report", "--passes", "dce"]) == 0  # --passes wins over the file
    assert _report_rows(capsys.readouterr().out) == ["dce"]


@pytest.mark.parametrize("k", [1, 2])
def test_run_profile_keep_first_matches_truncated_transformers(k: int, tiny_ckpt: Ckpt, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tests.fixtures.tiny import reference_for_layers

    d = tiny_ckpt("gemma3")
    ref = reference_for_layers(d, PROFILE_PROMPT, k)[-1]
    profile = tmp_path / "p.toml"
    profile.write_text(f"[passes]\nverbose = true\n\n[[layers]]\nkeep_first = {k}\n")
    out = tmp_path / "logits.npy"
    assert main(["run", str(d), "--prompt-ids", ",".join(map(str, PROFILE_PROMPT)), "--max-new-tokens", "1",
                 "--profile", str(profile), "--logits-out", str(out)]) == 0
    np.testing.assert_allclose(np.load(out)[0], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    err = capsys.readouterr().err
    assert f"[rlx] profile: {profile}" in err and "[rlx] passes for decode: " in err  # verbose = true


BAD_PROFILES = [
    # (profile text, line, key, message): one per kind of mistake, the last one caught at build time
    ("[fusion]\npolicy = \"direct\"\n\n[fusoin]\nskip = true\n", 4, "fusoin", "unknown section"),
    ("[passes]\ncse = true\nfolding = true\n", 3, "folding", "unknown key"),
    ("[fusion]\nskip = \"yes\"\n", 2, "skip", "expected a boolean"),
    ("[backend.cuda]\nopt_level = 7\n", 2, "opt_level", "must be in 0..3"),
    ("[[layers]]\nindex = 0\nwindow = 2\n\n[[layers]]\nindex = 9\ndrop = true\n", 6, "index", "out of range"),
]


@pytest.mark.parametrize("text, line, key, message", BAD_PROFILES, ids=[b[2] for b in BAD_PROFILES])
def test_bad_profile_exits_2_and_writes_nothing(text: str, line: int, key: str, message: str, tiny_ckpt: Ckpt,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "gemma.rlx.toml"
    profile.write_text(text)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    logits = out_dir / "logits.npy"
    d = str(tiny_ckpt("gemma3"))
    for argv in (["run", d, "--prompt-ids", "2,3", "--profile", str(profile), "--logits-out", str(logits)],
                 ["inspect", d, "--profile", str(profile)]):
        err = _err(capsys, argv)
        assert f"{profile}:{line}: " in err and repr(key) in err and message in err, err
    assert not list(out_dir.iterdir())


def test_bad_passes_spec_exits_2(tiny_ckpt: Ckpt, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tiny_ckpt("gemma3"))
    out = tmp_path / "logits.npy"
    err = _err(capsys, ["run", d, "--prompt-ids", "2,3", "--passes", "dce,nosuch", "--logits-out", str(out)])
    assert "unknown pass 'nosuch'" in err and not out.exists()
    assert "not found" in _err(capsys, ["inspect", d, "--profile", str(tmp_path / "missing.toml")])
