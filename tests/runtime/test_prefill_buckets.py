"""`[specialize] SEQ = [...]`: both engines prefill in the smallest bucket that holds the prompt
(padded at the end, last real token selected) and in the dynamic prefill beyond the largest; the
logits and the following decode steps equal the unbucketed engine's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rlx.compiler.compiled_engine import CompiledEngine
from rlx.compiler.engines import reference_engine
from rlx.compiler.graphs import profile_buckets
from rlx.compiler.profile_toml import parse_profile
from rlx.frontends.checkpoint import open_checkpoint
from rlx.passes import DEFAULT_PIPELINE
from rlx.runtime.buckets import choose, padded_feeds
from rlx.runtime.engine import Engine

Ckpt = Callable[[str], Path]
PROFILE = parse_profile("[specialize]\nSEQ = [4, 16]\n")
PROMPTS = [[2, 17, 99], [2, 17, 99, 5], [2, 17, 99, 5, 42, 200, 7, 63, 128, 11], list(range(2, 22))]  # 3, 4, 10, 20


def _walk(engine: Engine, prompt: list[int], steps: int = 3) -> np.ndarray:
    rows = [engine.prefill(prompt)]
    for _ in range(steps):
        rows.append(engine.step(int(np.argmax(rows[-1]))))
    return np.stack(rows)


def test_choose_and_pad() -> None:
    assert [choose(n, (4, 16)) for n in (1, 4, 5, 16, 17)] == [4, 4, 16, 16, None]
    assert profile_buckets(PROFILE, max_seq=8) == (4,)  # a bucket past the context could never run
    feeds = padded_feeds({"input_ids": np.array([[5, 6, 7]]), "positions": np.array([[3, 4, 5]])}, 4)
    assert feeds["input_ids"].tolist() == [[5, 6, 7, 0]] and feeds["positions"].tolist() == [[3, 4, 5, 6]]
    assert feeds["last_token_select"].tolist() == [[[0.0, 0.0, 1.0, 0.0]]]


def test_bucketed_prefill_equals_the_dynamic_one(tiny_ckpt: Ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))  # sliding window 4 < the longer prompts
    plain = reference_engine(ckpt, passes=DEFAULT_PIPELINE)
    bucketed_ref = reference_engine(ckpt, passes=DEFAULT_PIPELINE, profile=PROFILE)
    compiled = CompiledEngine(ckpt, passes=DEFAULT_PIPELINE, profile=PROFILE)
    assert compiled.buckets == (4, 16) and {"prefill", "prefill_4", "prefill_16"} <= set(compiled.signatures)
    called: list[str] = []
    call = compiled._call
    monkeypatch.setattr(compiled, "_call", lambda sig, feeds: called.append(sig.function) or call(sig, feeds))
    for prompt in PROMPTS:
        want = _walk(plain, prompt)
        # f32 throughout; pads add exact zeros (masked weights), so only op order differs: 1e-5
        np.testing.assert_allclose(_walk(bucketed_ref, prompt), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        np.testing.assert_allclose(_walk(compiled, prompt), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert [f for f in called if f != "decode"] == ["prefill_4", "prefill_4", "prefill_16", "prefill"]
    # a long prompt in chunks: each chunk in its own bucket, its pad rows overwritten by the next
    # chunk (and wrapped around the sliding-window rings of 4 + 4 - 1 rows: the longest call is a
    # chunk of 3 padded to the bucket of 4)
    called.clear()
    compiled.prefill_chunk = 3
    want = _walk(plain, PROMPTS[-1])
    np.testing.assert_allclose(_walk(compiled, PROMPTS[-1]), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert [f for f in called if f != "decode"] == ["prefill_4"] * 7
    rows = sorted({b.shape[2] for b in compiled._caches.values()})
    assert rows[0] == 7 and rows[-1] >= len(PROMPTS[-1]) + 3  # the rings; the full layers' every position


def test_artifact_keeps_its_buckets(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    import rlx
    from rlx.runtime.artifact_engine import ArtifactEngine

    profile = tmp_path / "gemma.rlx.toml"
    profile.write_text("[specialize]\nSEQ = [4, 16]\n")
    [artifact] = rlx.compile(tiny_ckpt("gemma3"), "cpu", tmp_path / "art", profile=str(profile))
    engine = ArtifactEngine(artifact)
    assert engine.buckets == (4, 16) and {"prefill_4", "prefill_16"} <= set(engine.manifest["entries"])
    plain = reference_engine(open_checkpoint(tiny_ckpt("gemma3")), profile=parse_profile(""))
    for prompt in PROMPTS[1:3]:
        want = _walk(plain, prompt)
        np.testing.assert_allclose(_walk(engine, prompt), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
