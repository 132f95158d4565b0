"""The compiled CPU engine against the reference interpreter (and transformers) on tiny checkpoints.

Tolerance: both sides are float32. What differs is summation order (16-lane partial sums in
the compiled contractions vs numpy's BLAS) and LLVM's exp/tanh/cos vs libm's: over all 11 tiny
families, prefill plus 8 decode steps, the measured max |diff| / max |logit| was <= 2.5e-6. We
assert rtol 1e-5 with an absolute floor of 1e-5 x max|logit|; a real lowering bug (a wrong mask,
a missing scale, a dropped layer) moves logits by > 1e-2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tvm

import rlx.progress as progress
from rlx.cli import main
from rlx.compiler.compiled_engine import CompiledEngine
from rlx.compiler.engines import reference_engine
from rlx.errors import RunError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.passes import DEFAULT_PIPELINE
from rlx.runtime.engine import Engine
from rlx.targets.kernels import CONTRACTIONS
from tests.fixtures.tiny import hf_reference
from tests.targets.test_schedule_rules import expected_rule
from tests.targets.walks import FAMILIES, N_DECODE, PROMPT, assert_close, walk

Ckpt = Callable[[str], Path]
VARIANTS = {"unfused": "", "fused": DEFAULT_PIPELINE}  # pass pipeline text ("" runs none)


@pytest.fixture(scope="module")
def compiled(tiny_ckpt: Ckpt) -> Callable[[str, str], CompiledEngine]:
    """`compiled(family, variant)`: one compiled engine per pair for this module."""
    engines: dict[tuple[str, str], CompiledEngine] = {}

    def get(family: str, variant: str) -> CompiledEngine:
        if (family, variant) not in engines:
            engines[family, variant] = CompiledEngine(open_checkpoint(tiny_ckpt(family)), passes=VARIANTS[variant])
        return engines[family, variant]

    return get


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_match_reference(family: str, variant: str, tiny_ckpt: Ckpt,
                                            compiled: Callable[[str, str], CompiledEngine]) -> None:
    ref, tokens = walk(reference_engine(open_checkpoint(tiny_ckpt(family)), passes=VARIANTS[variant]))
    ours, _ = walk(compiled(family, variant), tokens)
    assert ours.shape == ref.shape == (1 + N_DECODE, 256)
    assert_close(ours, ref)


def test_matches_transformers(tiny_ckpt: Ckpt, compiled: Callable[[str, str], CompiledEngine]) -> None:
    """Ground truth that is not ours: transformers' own prefill + KV-cache decode (same tolerance
    as the reference interpreter's own test against it)."""
    for family in ("gemma3", "gemma4-moe"):
        ref = hf_reference(tiny_ckpt(family), PROMPT, N_DECODE)
        ours, _ = walk(compiled(family, "fused"), ref.tokens)
        assert_close(ours, ref.logits, rtol=1e-4)
        assert [int(t) for t in ours[:-1].argmax(-1)] == ref.tokens


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_kernel_is_scheduled(variant: str, compiled: Callable[[str, str], CompiledEngine]) -> None:
    """No PrimFunc is left unscheduled (TVM's CPU default runs loops serially, untiled), and every
    contraction gets its rule: linears and the LM head `gemv` / `gemm`, attention and MoE experts
    theirs (`test_schedule_rules.expected_rule`, which pins every family, scheme and CPU target)."""
    engine = compiled("gemma4-moe", variant)
    report = engine.built.schedules
    assert "none" not in report.values()
    assert "extern" not in report.values() and {report["topk"], report["topk1"]} == {"row-reduction"}
    assert {"gemv", "gemm"} <= set(report.values())
    for name, func in engine.built.scheduled.functions_items():
        script = func.script() if isinstance(func, tvm.tirx.PrimFunc) else ""
        if isinstance(func, tvm.tirx.PrimFunc) and (want := expected_rule(func)) is not None:
            assert report[name.name_hint] == want, name.name_hint
            # "nt" kernels: every reduction length here is a multiple of 16, so the 16 partial sums
            # are a vector (a loop mix-up once vectorized a 1-trip loop instead: LM head 5x slower).
            # ("nn" ones vectorize the output axis only when it is static: not q @ k^T over SEQ.)
            if any(f'"{c}"' in script for c, layout in CONTRACTIONS.items() if layout == "nt"):
                assert "T.vectorized(T.int64(16))" in script, name.name_hint


def _ref_cache(ref: Engine, buffer: str) -> np.ndarray:
    """The reference engine's cache for a compiled engine's buffer (`cache_k.3`: layer 3's K)."""
    kind, layer = buffer.removeprefix("cache_").split(".")
    return ref._kv[int(layer), kind]  # type: ignore[attr-defined]


def test_kv_cache_buffers_are_written_in_place(compiled: Callable[[str, str], CompiledEngine],
                                               tiny_ckpt: Ckpt) -> None:
    """With room reserved, every step writes into the same buffers (no reallocation, no copy);
    their valid rows are exactly the reference's concatenated present_k/v. Without room, the
    buffers grow by doubling (test_prefill_and_decode_match_reference runs that path: prefill
    reserves only the prompt) and keep their rows."""
    engine = compiled("gemma3", "fused")
    ref = reference_engine(open_checkpoint(tiny_ckpt("gemma3")), passes=DEFAULT_PIPELINE)
    total = len(PROMPT) + N_DECODE
    engine.prefill(PROMPT, capacity=total)
    ref.prefill(PROMPT)
    buffers = dict(engine._caches)
    assert {b.shape[2] for b in buffers.values()} == {total}
    for token in range(3, 3 + N_DECODE):
        engine.step(token)
        ref.step(token)
    assert all(engine._caches[name] is buf for name, buf in buffers.items())
    for name, buf in buffers.items():
        assert_close(buf.numpy(), _ref_cache(ref, name))
    engine.prefill(PROMPT)  # capacity = the prompt: the first step doubles it
    engine.step(3)
    assert {b.shape[2] for b in engine._caches.values()} == {2 * len(PROMPT)}
    ref.prefill(PROMPT)
    ref.step(3)
    for name, buf in engine._caches.items():
        assert_close(buf.numpy()[:, :, :len(PROMPT) + 1], _ref_cache(ref, name))


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gemma4"])
def test_chunked_prefill_over_window_rings(family: str, tiny_ckpt: Ckpt, compiled: Callable[[str, str], CompiledEngine],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The prompt in chunks of 3 tokens appended to the cache; the sliding-window layers' caches
    are rings of window + 3 - 1 = 6 rows (window 4), which the walk's 18 positions wrap around
    three times. The logits still equal the reference's one-shot prefill and steps (same
    tolerance), and the ring's rows are the reference's last 6 positions, position p in row p % 6.
    The full layers (and the KV-shared layers' producers of either kind) keep every position."""
    engine = compiled(family, "fused")
    ref_engine = reference_engine(open_checkpoint(tiny_ckpt(family)), passes=DEFAULT_PIPELINE)
    ref, tokens = walk(ref_engine)
    engine.prefill_chunk = 3
    calls: list[int] = []
    run = engine._run
    engine._run = lambda function, ids, bucket=None: calls.append(len(ids)) or run(function, ids, bucket)  # type: ignore[method-assign]
    try:
        with progress.reporting():  # as `rlx run` has it: a prompt in several chunks shows them
            ours, _ = walk(engine, tokens)
    finally:
        del engine._run, engine.prefill_chunk  # back to the class's
    assert calls == [3, 3, 3, 1] + [1] * N_DECODE
    assert "prefill 10 tokens" in capsys.readouterr().err
    assert_close(ours, ref)
    cfg, total = engine.config, len(PROMPT) + N_DECODE
    sliding = {f"cache_{kind}.{i}" for i in range(cfg.num_layers) for kind in ("k", "v")
               if cfg.window(i) and not cfg.is_kv_shared(i)}
    rings = {name for name, buf in engine._caches.items() if buf.shape[2] == 6}
    assert sliding and rings == sliding and len(engine._caches) > len(rings)
    for name in rings:
        want = _ref_cache(ref_engine, name)
        assert_close(engine._caches[name].numpy()[:, :, [p % 6 for p in range(total - 6, total)]],
                     want[:, :, total - 6:total])


def test_engine_state_errors(compiled: Callable[[str, str], CompiledEngine], tiny_ckpt: Ckpt) -> None:
    engine = compiled("gemma3", "fused")
    with pytest.raises(RunError):
        engine.prefill([])
    ckpt = open_checkpoint(tiny_ckpt("gemma3"))
    with pytest.raises(RunError, match="cross target"):
        CompiledEngine(ckpt, target="cpu-aarch64")
    if not tvm.cuda(0).exist:
        with pytest.raises(RunError, match="needs a cuda device"):
            CompiledEngine(ckpt, target="cuda")


def test_cli_run_target_cpu_equals_reference(tiny_ckpt: Ckpt, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`rlx run --target cpu` through the CLI (default profile: each mode's fusion pipeline)."""
    d = tiny_ckpt("gemma2")
    logits = {}
    for target in ("reference", "cpu"):
        out = tmp_path / f"{target}.npy"
        assert main(["run", str(d), "--target", target, "--prompt-ids", ",".join(map(str, PROMPT)),
                     "--max-new-tokens", "6", "--logits-out", str(out)]) == 0
        logits[target] = np.load(out)
        assert "token ids:" in capsys.readouterr().err
    assert logits["cpu"].shape == logits["reference"].shape == (6, 256)
    assert_close(logits["cpu"], logits["reference"])
