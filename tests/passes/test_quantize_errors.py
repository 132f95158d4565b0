"""Bad `--quantize` input through the CLI, as a user meets it: exit code 2, exactly one
`rlx: error:` line naming the tensor / scheme at fault, one `fix:` line, no traceback, and no
artifact written.

- a GGUF holding a block type rlx does not compute with, under `--quantize gguf` (MXFP4: gguf-py
  can write it, rlx reads it as floats but has no kernel for its blocks); the pass-level cases
  (Q2_K, IQ2_XXS, Q8_1, TQ1_0) are in test_quantize.py;
- a `[quantize] group` that does not divide a tensor's rows, and one that is no group size at all;
- an artifact compiled with `--quantize q8` run with `--quantize q4` (its manifest records q8).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest

from rlx.cli import main
from tests.fixtures.gguf_writer import write_gguf_from_hf

Ckpt = Callable[[str], Path]


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run `rlx argv`: it must fail as bad input, naming every needle, with one fix."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert sum(line.startswith("rlx: error:") for line in err.splitlines()) == 1, err  # after progress lines
    assert err.count("fix:") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def mxfp4_gguf(tiny_ckpt: Ckpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma 3 as a GGUF: layer 1's q projection MXFP4, layer 0's up projection Q8_0, the rest F32."""
    return write_gguf_from_hf(tiny_ckpt("gemma3"), tmp_path_factory.mktemp("mxfp4") / "m.gguf", arch="gemma3",
                              quantize={"layers.1.self_attn.q_proj.weight": gguf.GGMLQuantizationType.MXFP4,
                                        "layers.0.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q8_0})


def test_gguf_scheme_refuses_a_block_type_rlx_does_not_compute_with(mxfp4_gguf: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    needles = ("tensor layers.1.self_attn.q_proj.weight is stored as MXFP4", "Q8_0, Q4_0, Q4_1",
               "use --quantize q8 or q4")
    _cli_error(["inspect", str(mxfp4_gguf), "--quantize", "gguf"], capsys, *needles)
    out = tmp_path / "art"
    _cli_error(["compile", str(mxfp4_gguf), "--target", "cpu", "--out", str(out), "--no-cache",
                "--quantize", "gguf"], capsys, *needles)
    assert not out.exists()
    # the ways out the fix names work: q8 quantizes again from the (dequantized) floats
    assert main(["inspect", str(mxfp4_gguf), "--quantize", "q8"]) == 0
    assert "q8_0[64, 64]" in capsys.readouterr().out


def test_a_group_that_does_not_divide_the_rows_names_the_tensor(tiny_ckpt: Ckpt, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Every tiny Gemma 3 weight has rows of 64 or 128: group 128 does not divide the 64s."""
    profile = tmp_path / "wide.rlx.toml"
    profile.write_text("[quantize]\ngroup = 128\n")
    d = str(tiny_ckpt("gemma3"))
    err = _cli_error(["inspect", d, "--profile", str(profile), "--quantize", "q4"], capsys,
                     "has rows of 64 values, not a multiple of q4's group of 128",
                     "[quantize] group = 32 or 64")
    assert "tensor embed_tokens.weight" in err  # the first weight the pass meets
    out = tmp_path / "art"
    _cli_error(["compile", d, "--target", "cpu", "--out", str(out), "--no-cache", "--profile", str(profile),
                "--quantize", "q4"], capsys, "tensor embed_tokens.weight has rows of 64 values")
    assert not out.exists()
    # not a group size at all: the profile's own error, naming the file, line and key
    profile.write_text("[quantize]\nscheme = \"q4\"\ngroup = 48\n")
    _cli_error(["inspect", d, "--profile", str(profile)], capsys,
               f"{profile}:3: [quantize] key 'group': must be one of 32, 64, 128, 256, got 48")
    # and the group that fits is fine
    profile.write_text("[quantize]\ngroup = 64\n")
    assert main(["inspect", d, "--profile", str(profile), "--quantize", "q4"]) == 0
    assert "q4_0g64[256, 64]" in capsys.readouterr().out


def test_an_artifact_runs_only_with_the_scheme_it_was_compiled_with(tiny_ckpt: Ckpt, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RLX_CACHE_DIR", str(tmp_path / "cache"))
    art = tmp_path / "art"
    assert main(["compile", str(tiny_ckpt("gemma1-gqa")), "--target", "cpu", "--out", str(art), "--max-seq", "32",
                 "--no-cache", "--quantize", "q8"]) == 0
    capsys.readouterr()
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quantize"]["scheme"] == "q8" and manifest["quantize"]["group"] == 32
    tensors = manifest["quantize"]["tensors"]
    assert len(tensors) >= 5 and set(tensors.values()) == {"q8_0"}
    _cli_error(["run", str(art), "--quantize", "q4", "--prompt-ids", "2,3"], capsys,
               f"{art} was compiled with --quantize q8, not q4", "drop --quantize",
               "rlx compile CHECKPOINT --quantize q4")
    _cli_error(["run", str(art), "--quantize", "none", "--prompt-ids", "2,3"], capsys,
               "compiled with --quantize q8, not none")
    for confirm in (["--quantize", "q8"], []):  # naming its own scheme, or none, runs it
        assert main(["run", str(art), *confirm, "--prompt-ids", "2,3", "--max-new-tokens", "2"]) == 0
        assert "token ids:" in capsys.readouterr().err
