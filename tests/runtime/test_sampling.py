"""Sampler and generation loop: greedy, temperature / top-k / top-p with seeds, EOS, streaming."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rlx.cli import main
from rlx.compiler.engines import reference_engine
from rlx.errors import RunError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.runtime.generate import generate
from rlx.runtime.sampler import Sampler

LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05]))


def test_greedy_is_argmax() -> None:
    assert Sampler()(np.array([0.1, 3.0, -1.0])) == 1


def test_temperature_sampling_follows_softmax() -> None:
    s = Sampler(temperature=1.0, seed=0)
    draws = np.bincount([s(LOGITS) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.15, 0.05], atol=0.03)  # ~4 sigma at n=4000


def test_top_k_and_top_p_cut_the_tail() -> None:
    k2 = Sampler(temperature=1.0, top_k=2, seed=1)
    assert {k2(LOGITS) for _ in range(300)} == {0, 1}
    p = Sampler(temperature=1.0, top_p=0.7, seed=2)  # 0.5 + 0.3 reaches 0.7: tokens 0 and 1 only
    assert {p(LOGITS) for _ in range(300)} == {0, 1}
    assert {Sampler(temperature=1.0, top_p=0.4, seed=3)(LOGITS) for _ in range(50)} == {0}


def test_seed_makes_runs_repeatable() -> None:
    s1, s2 = Sampler(temperature=0.8, seed=7), Sampler(temperature=0.8, seed=7)
    assert [s1(LOGITS) for _ in range(50)] == [s2(LOGITS) for _ in range(50)]


@pytest.mark.parametrize("kwargs, message", [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top-k"),
                                             ({"top_p": 0.0}, "top-p")])
def test_bad_sampling_flags(kwargs: dict, message: str) -> None:
    with pytest.raises(RunError, match=message):
        Sampler(**kwargs)


def test_generation_stops_at_eos(tiny_ckpt: Callable[[str], Path]) -> None:
    engine = reference_engine(open_checkpoint(tiny_ckpt("gemma2")))
    free = generate(engine, [2, 17, 99], 6)
    eos = free.tokens[2]
    stopped = generate(engine, [2, 17, 99], 6, eos_ids=(eos,))
    assert stopped.stopped_at_eos and stopped.tokens == free.tokens[: free.tokens.index(eos) + 1]
    assert stopped.logits_array().shape[0] == len(stopped.tokens)


def test_cli_sampling_is_seeded_and_stream_prints_tokens(tiny_ckpt: Callable[[str], Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tiny_ckpt("gemma3"))
    argv = ["run", d, "--prompt-ids", "2,17,99", "--max-new-tokens", "8", "--temperature", "1.5", "--seed", "4"]
    runs = []
    for _ in range(2):
        assert main(argv) == 0
        runs.append(capsys.readouterr().err.split("token ids:")[1].strip())
    assert runs[0] == runs[1]
    assert main([*argv[:-1], "5"]) == 0
    assert capsys.readouterr().err.split("token ids:")[1].strip() != runs[0]  # another seed, another draw


def test_stream_prints_each_token(tiny_ckpt: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", str(tiny_ckpt("gemma3")), "--prompt-ids", "2,17,99", "--max-new-tokens", "5"]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert main([*argv, "--stream"]) == 0
    streamed = capsys.readouterr()
    ids = plain.err.split("token ids:")[1].strip().split(",")
    assert streamed.out == plain.out == "".join(f" [{i}]" for i in ids) + "\n"  # no tokenizer: ids shown


class _Scripted:
    """An engine whose logits are given in advance (prefill first, then one row per step)."""

    name, max_seq, vocab_size, reports = "scripted", 64, 4, {}

    def __init__(self, rows: list[np.ndarray]) -> None:
        self.rows = list(rows)

    def prefill(self, ids: list[int], capacity: int | None = None) -> np.ndarray:
        return self.rows.pop(0)

    def step(self, token: int) -> np.ndarray:
        return self.rows.pop(0)


@pytest.mark.parametrize("at, bad, where", [(0, np.inf, "the prefill"), (2, np.nan, "decode step 2")])
def test_non_finite_logits_stop_generation_naming_the_step(at: int, bad: float, where: str) -> None:
    """NaN / inf logits are an error naming where they appeared, never a token (argmax of NaNs is 0)."""
    rows = [LOGITS.copy() for _ in range(4)]
    rows[at][1] = bad
    with pytest.raises(RunError, match=rf"logits of {where} hold NaN or inf") as e:
        generate(_Scripted(rows), [2], 4)
    assert e.value.hint


def test_logits_are_kept_only_when_asked() -> None:
    """A long generation must not hold a vocabulary row per token unless --logits-out wants them."""
    kept = generate(_Scripted([LOGITS.copy() for _ in range(3)]), [2], 3)
    dropped = generate(_Scripted([LOGITS.copy() for _ in range(3)]), [2], 3, keep_logits=False)
    assert dropped.tokens == kept.tokens and len(kept.logits) == 3 and dropped.logits == []
    assert dropped.decode_s > 0 and dropped.decode_tok_s > 0


def test_cli_run_with_nan_weights_is_an_error_not_token_0(tiny_ckpt: Callable[[str], Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.numpy import load_file, save_file

    from tests.fixtures.edit import copy_tree

    ckpt = copy_tree(tiny_ckpt("gemma3"), tmp_path / "nan")
    weights = load_file(ckpt / "model.safetensors")
    weights["model.norm.weight"][:] = np.nan
    save_file(weights, ckpt / "model.safetensors")
    assert main(["run", str(ckpt), "--prompt-ids", "2,17,99", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "rlx: error:" in err and "the prefill hold NaN or inf" in err and "fix:" in err
    assert "Traceback" not in err
