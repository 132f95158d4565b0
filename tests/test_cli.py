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
from rlx.compiler.serialize import hir_from_dict
from rlx.compiler.text import parse_hir
from rlx.compiler.verify import verify
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
