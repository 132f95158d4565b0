"""Every weight format the CPU kernels read, compiled and checked against the reference interpreter
on the same blocks: rlx's group formats (q8 / q4 / q4a: `q8_0`, `q4_0`, `q4_1`) at groups 32,
64, 128 and 256, and GGUF's Q4_K, Q5_0, Q6_K and Q8_0 blocks as a GGUF file stores them.

The tiny families have rows of 64 or 128 values, shorter than the larger groups and than a
K-quant's 256-value super-block, so this module builds its own tiny Gemma 3 (WIDE: hidden 256,
MLP 512, head_dim 128, three layers), whose every quantized row is a multiple of 256. One compile
covers three formats: layer 0 is q8, layer 1 q4, layer 2 q4a (`[[layers]] quantize`), the
embedding table (the tied LM head) q4a, all at one group; the GGUF case gives each projection one
of the four block types (`GGUF_TYPES`) filled with random blocks (finite scales sized so the
weights are O(0.1): `SCALES`), which no float weight produced, so the compiled decode is checked
on blocks no quantizer of ours wrote.

Each case: prefill PROMPT, then 2 decode steps on the reference's greedy tokens, both sides from
the same resolved profile. Tolerance as tests/targets/test_quantized_cpu.py: rtol 1e-5 with an
absolute floor of 1e-5 x max|logit| (float32 summation order and LLVM's vs libm's exp / tanh
differ; a decoding bug moves the logits by O(10%)).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from rlx.compiler.compiled_engine import CompiledEngine
from rlx.compiler.engines import reference_engine
from rlx.compiler.profile import LayerPatch, Profile, QuantizeOptions
from rlx.frontends.checkpoint import open_checkpoint
from rlx.runtime.engine import Engine
from rlx.targets.lower import param_keys
from tests.fixtures.gguf_writer import write_gguf_from_hf
from tests.targets.walks import PROMPT

GT = gguf.GGMLQuantizationType
GROUPS = [32, 64, 128, 256]
LAYER_SCHEMES = ("q8", "q4", "q4a")
FAMILY_OF = {"q8": "q8_0", "q4": "q4_0", "q4a": "q4_1"}
DECODE_STEPS = 2
WIDE = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1,
            head_dim=128, num_hidden_layers=3, max_position_embeddings=64, initializer_range=0.05,
            rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})
# per projection of every layer: each block type reaches attention and MLP, GEMV and GEMM alike
GGUF_TYPES = {"self_attn.q_proj": GT.Q4_K, "self_attn.k_proj": GT.Q5_0, "self_attn.v_proj": GT.Q6_K,
              "self_attn.o_proj": GT.Q8_0, "mlp.gate_proj": GT.Q6_K, "mlp.up_proj": GT.Q4_K,
              "mlp.down_proj": GT.Q5_0}
# block type -> (byte offset of each f16 scale field, its magnitude): w = O(0.1) at the largest
# integer each type stores (Q8_0 127 d; Q5_0 16 d; Q4_K 63 * 15 d - 63 dmin; Q6_K 127 * 32 d)
SCALES = {GT.Q8_0: ((0, 1e-3),), GT.Q5_0: ((0, 6e-3),), GT.Q4_K: ((0, 1e-4), (2, 1e-4)), GT.Q6_K: ((208, 2.5e-5),)}
FORMAT_NAMES = {GT.Q4_K: "q4_k", GT.Q5_0: "q5_0", GT.Q6_K: "q6_k", GT.Q8_0: "q8_0"}


def _random_blocks(data: np.ndarray, qtype: GT, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of `qtype` for a weight shaped like `data`, their f16 scales finite and small."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, k = data.shape
    blocks = rng.integers(0, 256, (rows * k // block, size), dtype=np.uint8)
    for at, scale in SCALES[qtype]:
        blocks[:, at:at + 2] = (rng.standard_normal((len(blocks), 1)) * scale).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, k // block * size)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**WIDE), dtype=torch.float32)
    out = tmp_path_factory.mktemp("wide")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def wide_gguf(wide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WIDE as a GGUF whose projections hold random blocks of GGUF_TYPES (float norms, Q8_0 table)."""
    rng = np.random.default_rng(0)
    quantize = {f"layers.{i}.{proj}.weight": qtype for i in range(WIDE["num_hidden_layers"])  # type: ignore[call-overload]
                for proj, qtype in GGUF_TYPES.items()}
    quantize["embed_tokens.weight"] = GT.Q8_0
    with pytest.MonkeyPatch.context() as patch:  # gguf-py cannot quantize to K-quants: random blocks instead
        patch.setattr(gguf.quants, "quantize", lambda data, qtype: _random_blocks(data, qtype, rng))
        return write_gguf_from_hf(wide, tmp_path_factory.mktemp("wide-gguf") / "wide.gguf", quantize=quantize)


def _mixed(group: int) -> Profile:
    """Layers 0 / 1 / 2 in q8 / q4 / q4a and the embedding table in q4a, all at `group`."""
    return Profile(quantize=QuantizeOptions(scheme="q8", group=group, embed="q4a"),
                   layers=tuple(LayerPatch(index=i, quantize=s) for i, s in enumerate(LAYER_SCHEMES)))


def _walk(engine: Engine, tokens: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
    rows = [engine.prefill(PROMPT)]
    fed: list[int] = []
    for i in range(DECODE_STEPS):
        fed.append(tokens[i] if tokens else int(np.argmax(rows[-1])))
        rows.append(engine.step(fed[-1]))
    return np.stack(rows), fed


def _compiled_equals_reference(path: Path, profile: Profile) -> set[str]:
    """Compile, walk against the reference on the same blocks; the quantized formats compiled."""
    engine = CompiledEngine(open_checkpoint(path), profile=profile)
    ref, tokens = _walk(reference_engine(open_checkpoint(path), profile=profile))
    ours, _ = _walk(engine, tokens)
    assert ours.shape == ref.shape == (1 + DECODE_STEPS, WIDE["vocab_size"])
    assert np.isfinite(ref).all() and float(np.abs(ref).max()) > 1e-3
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    specs = param_keys(list(engine.signatures.values()))
    return {spec.type.quant for spec in specs.values() if spec.type.is_quantized}  # type: ignore[misc]


@pytest.mark.parametrize("group", GROUPS)
def test_group_formats_compiled_equal_the_reference(group: int, wide: Path) -> None:
    formats = _compiled_equals_reference(wide, _mixed(group))
    suffix = "" if group == 32 else f"g{group}"
    assert formats == {FAMILY_OF[s] + suffix for s in LAYER_SCHEMES}


def test_gguf_block_types_compiled_equal_the_reference(wide_gguf: Path) -> None:
    formats = _compiled_equals_reference(wide_gguf, Profile(quantize=QuantizeOptions(scheme="gguf")))
    assert formats == set(FORMAT_NAMES.values())


def test_random_blocks_have_the_scales_asked_for() -> None:
    """The fixture's blocks: finite, and their weights O(0.1) (GGUF's own dequantizer decodes them)."""
    rng = np.random.default_rng(1)
    for qtype in SCALES:
        blocks = _random_blocks(np.zeros((16, 256), np.float32), qtype, rng)
        w = gguf.quants.dequantize(blocks, qtype)
        assert w.shape == (16, 256) and np.isfinite(w).all()
        assert 0.01 < float(np.abs(w).max()) < 1.0, (FORMAT_NAMES[qtype], float(np.abs(w).max()))
