"""The compiled CPU `PagedModel` (step entries built in-process) against the compiled single-sequence
engine of the same checkpoint, on the walk of `tests/runtime/paged_walk.py`: sequences at
different positions in one step (one prefilling a chunk while others decode, one joining late),
sliding-window layers past their window (window 4, pages of 4, positions up to 15), Gemma 2
softcaps, Gemma 4 MoE and KV sharing; steps run both in the dynamic `step` entry and padded into
static buckets (pads go to the scratch page).

Tolerance: rtol 1e-5 with a floor of 1e-5 x max|logit|, as compiled vs reference elsewhere. Both
sides are float32 kernels over the same weights; what differs is summation order (a step's
linears are GEMMs over all its tokens, or GEMVs in the small buckets, where the single engine's
decode is a GEMV and its prefill a GEMM over one prompt; paged attention sums keys per page).
Measured max |diff| / max |logit| <= 1e-6. Greedy tokens must be equal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import rlx
from rlx.compiler.compiled_engine import CompiledEngine, compiled_paged_engine
from rlx.compiler.graphs import DEFAULT_STEP_BUCKETS
from rlx.errors import RlxError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.passes import DEFAULT_PIPELINE
from rlx.runtime.paged_vm import PagedVMEngine
from tests.runtime.paged_walk import PROMPTS, batched_rows, single_sequence_rows, walk
from tests.targets.walks import assert_close

Ckpt = Callable[[str], Path]
PAGE, NUM_PAGES = 4, 16
SHUFFLED = [11, 3, 14, 0, 7, 9, 2, 13, 5, 1, 15, 8]
# every bucket on one family; one bucket elsewhere (each entry costs a compile of its own)
BUCKETS = {"gemma3": (1, 2, 4), "gemma2": (4,), "gemma4-moe": (4,), "gemma4-kvshare": (4,)}


@pytest.fixture(scope="module")
def compiled(tiny_ckpt: Ckpt) -> Callable[[str], tuple[CompiledEngine, Callable[[], PagedVMEngine]]]:
    """`compiled(family)`: the single-sequence engine, and a maker of fresh paged engines (fresh
    pools) over one compiled step module sharing its weights."""
    made: dict[str, tuple[CompiledEngine, Callable[[], PagedVMEngine]]] = {}

    def get(family: str) -> tuple[CompiledEngine, Callable[[], PagedVMEngine]]:
        if family not in made:
            ckpt = open_checkpoint(tiny_ckpt(family))
            single = CompiledEngine(ckpt, passes=DEFAULT_PIPELINE)
            first = compiled_paged_engine(ckpt, num_pages=NUM_PAGES, page_size=PAGE, passes=DEFAULT_PIPELINE,
                                          buckets=BUCKETS[family], shared=single)
            made[family] = single, lambda p=first: p.with_pool(NUM_PAGES)
        return made[family]

    return get


@pytest.mark.parametrize("family", sorted(BUCKETS))
def test_batched_logits_equal_single_sequence(family: str, compiled: Callable) -> None:
    single, make = compiled(family)
    model = make()
    streams = walk(model, SHUFFLED)
    for s in streams:
        want = single_sequence_rows(single, s)
        assert_close(batched_rows(s), want)
        last = len(s.prompt) - 1
        greedy = [int(np.argmax(r)) for (p, _), r in zip(s.rows, want, strict=True) if p >= last]
        assert s.generated == greedy[:len(s.generated)]
    assert model.buckets == BUCKETS[family]


def test_weights_are_shared_with_the_single_engine(compiled: Callable) -> None:
    single, make = compiled("gemma3")
    model = make()
    shared = [k for k, w in model._weights.items() if single._weights.get(k) is w]
    assert len(shared) == len(model._weights) > 0


def test_chunked_prefill_equals_one_prefill(compiled: Callable) -> None:
    single, make = compiled("gemma3")
    (stream,) = walk(make(), range(NUM_PAGES), prompts=[PROMPTS[0]],
                     schedule=[[(0, 3)], [(0, 3)], [(0, 4)], [(0, 1)], [(0, 1)]])
    assert_close(batched_rows(stream), single_sequence_rows(single, stream))
    assert_close(stream.rows[2][1], single.prefill(PROMPTS[0]))


def test_shuffled_pages_and_buckets_give_the_same_logits(compiled: Callable) -> None:
    """Contiguous vs shuffled page ids, and the same steps in the dynamic entry (no buckets) vs
    padded into the static ones: the same logits, and the pools hold each position's K in its
    page and slot, with pads only in the scratch page."""
    _, make = compiled("gemma3")
    contiguous, shuffled, dynamic = make(), make(), make()
    dynamic.buckets = ()
    runs = [walk(m, order) for m, order in ((contiguous, range(12)), (shuffled, SHUFFLED), (dynamic, SHUFFLED))]
    for a, b, c in zip(*runs, strict=True):
        assert a.tokens == b.tokens == c.tokens
        np.testing.assert_allclose(batched_rows(a), batched_rows(b), rtol=1e-6, atol=1e-6)
        assert_close(batched_rows(c), batched_rows(b))
    pool = shuffled.pool(0, "k")
    for s in runs[1]:
        for p in range(len(s.tokens)):
            assert np.abs(pool[s.pages[p // PAGE], :, p % PAGE]).sum() > 0
    untouched = sorted(set(range(NUM_PAGES)) - set(SHUFFLED))
    assert not np.abs(pool[untouched]).any()
    assert np.abs(pool[NUM_PAGES]).any()  # the scratch page took the pads


@pytest.fixture(scope="module")
def artifact(tiny_ckpt: Ckpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gemma3 artifact (context 64: positions up to 63, page table of 4 pages of 16), through a
    private compile cache (a shared one could hand back an artifact built by older code)."""
    root = tmp_path_factory.mktemp("paged")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLX_CACHE_DIR", str(root / "cache"))
        (path,) = rlx.compile(tiny_ckpt("gemma3"), "cpu", root / "gemma3", max_seq=64)
    return path


def test_artifact_paged_model_equals_its_single_sequence_engine(artifact: Path) -> None:
    """`rlx compile` builds the step entries; `rlx.load(artifact).paged_model(n)` runs them over
    the weights the single-sequence engine loaded (TVM's runtime only, like `rlx run`)."""
    model = rlx.load(artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["paged"]["page_size"] == 16 and manifest["paged"]["buckets"] == list(DEFAULT_STEP_BUCKETS)
    assert manifest["paged"]["entries"] == ["step", *(f"step_{b}" for b in DEFAULT_STEP_BUCKETS)]
    assert set(manifest["paged"]["entries"]) <= set(manifest["entries"])
    keys = {name: {k for k, _ in e["params"]} for name, e in manifest["entries"].items()}
    assert keys["step"] <= keys["prefill"] | keys["decode"]  # no weight stored twice for the step entries
    paged = model.paged_model(num_pages=8)
    assert (paged.page_size, paged.num_pages, paged.max_seq) == (16, 8, 64)
    assert all(paged._weights[k] is model.engine._weights[k] for k in paged._weights)  # type: ignore[attr-defined]
    streams = walk(paged, [5, 2, 7, 0, 3, 6])
    for s in streams:
        assert_close(batched_rows(s), single_sequence_rows(model.engine, s))
    other = model.paged_model(num_pages=4)  # the same module, pools of its own
    assert other.num_pages == 4 and not np.abs(other.pool(0, "k")).any()
    with pytest.raises(RlxError, match="hold 16 positions, not 8"):
        model.paged_model(num_pages=8, page_size=8)


def test_load_paged_model_reference_and_cpu(tiny_ckpt: Ckpt) -> None:
    """`rlx.load(checkpoint, target).paged_model(...)`: each call gets fresh pools over one built
    step (and, compiled, the weights the single engine uploaded); both targets agree."""
    rows = {}
    for target in ("reference", "cpu"):
        model = rlx.load(tiny_ckpt("gemma2"), target)
        first = model.paged_model(num_pages=16, page_size=PAGE)
        (stream,) = walk(first, range(16), prompts=[PROMPTS[0]], schedule=[[(0, 10)], [(0, 1)], [(0, 1)]])
        again = model.paged_model(num_pages=16, page_size=PAGE)
        (repeat,) = walk(again, range(16), prompts=[PROMPTS[0]], schedule=[[(0, 10)], [(0, 1)], [(0, 1)]])
        np.testing.assert_array_equal(batched_rows(stream), batched_rows(repeat))
        assert_close(batched_rows(stream), single_sequence_rows(model.engine, stream))
        rows[target] = batched_rows(stream)
    assert_close(rows["cpu"], rows["reference"])


CHILD = """
import sys
from rlx.runtime.tvm_runtime import import_runtime_only
assert import_runtime_only()
import numpy as np
import rlx
from tests.runtime.paged_walk import batched_rows, single_sequence_rows, walk
model = rlx.load(sys.argv[1])
streams = walk(model.paged_model(num_pages=8), [5, 2, 7, 0, 3, 6])
worst = max(float(np.abs(batched_rows(s) - single_sequence_rows(model.engine, s)).max()
                  / np.abs(single_sequence_rows(model.engine, s)).max()) for s in streams)
maps = open("/proc/self/maps").read()
print(worst, "libtvm.so" in maps, "libtvm_runtime.so" in maps)
"""


def test_artifact_paged_model_runs_on_the_runtime_library_alone(artifact: Path) -> None:
    """Every kernel of the step entries resolves in TVM's runtime-only library (what `rlx run` and
    the server load for an artifact), in a child process that never maps the compiler."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(artifact)], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2], timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    worst, compiler, runtime = out.stdout.split()
    assert float(worst) <= 1e-5 and (compiler, runtime) == ("False", "True")
