"""An artifact compiled with `--passes 'specialize{SEQ=4}'` has a prefill of exactly 4 tokens and
no last-token select: a shorter prompt runs through decode one token at a time (the logits equal
the reference interpreter's), a longer one is refused naming the compiled length; neither is a
TVM `match_cast` traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rlx.cli import main

Ckpt = Callable[[str], Path]


@pytest.fixture(scope="module")
def seq4(tiny_ckpt: Ckpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seq4") / "art"
    assert main(["compile", str(tiny_ckpt("gemma3")), "--passes", "specialize{SEQ=4}", "--max-seq", "32",
                 "--out", str(out), "--no-cache"]) == 0
    return out


@pytest.mark.parametrize("prompt", [[2], [2, 17, 99], [2, 17, 99, 5]])
def test_a_prompt_up_to_the_compiled_length_runs_exactly(prompt: list[int], seq4: Path, tiny_ckpt: Ckpt,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import rlx
    from rlx.runtime.generate import generate

    logits = tmp_path / "l.npy"
    code = main(["run", str(seq4), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "3",
                 "--logits-out", str(logits)])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    want = generate(rlx.load(tiny_ckpt("gemma3")).engine, prompt, 3).logits_array()
    got = np.load(logits)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_longer_prompt_is_refused_naming_the_compiled_length(seq4: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(seq4), "--prompt-ids", "2,17,99,5,42", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "rlx: error: cpu: the prefill was compiled for prompts of exactly 4 tokens" in err
    assert "this prompt has 5" in err and "\n  fix: " in err and "Traceback" not in err
