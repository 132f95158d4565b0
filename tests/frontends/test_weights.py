"""WeightStore and open_checkpoint over every file layout, against the tensors transformers saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from rlx.errors import RlxError, WeightError
from rlx.frontends.checkpoint import open_checkpoint
from rlx.frontends.gguf_config import gguf_config
from rlx.frontends.gguf_file import GGUFFile
from rlx.frontends.weights import WeightStore, canonical_hf_name
from tests.fixtures.gguf_writer import write_gguf_from_hf

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tiny_gemma3(tie: bool = True) -> torch.nn.Module:
    cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        tie_word_embeddings=tie, sliding_window=8)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # norms start at 0: make them distinguishable
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return model.eval()


def _expected(model: torch.nn.Module) -> dict[str, np.ndarray]:
    out = {}
    for name, t in model.state_dict().items():
        canonical = canonical_hf_name(name)
        if canonical is not None:
            out[canonical] = t.float().numpy()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """Tiny Gemma 3 saved as f32 / bf16 / f16 / sharded bf16 / untied, with the values transformers holds."""
    out = {}
    base = _tiny_gemma3()
    for variant, (dtype, shard) in {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
                                    "float16": ("float16", None), "sharded": ("bfloat16", "40KB")}.items():
        model = _tiny_gemma3().to(_DTYPES[dtype])
        model.load_state_dict(base.state_dict())
        d = tmp_path_factory.mktemp(variant)
        model.save_pretrained(d, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
        out[variant] = (d, _expected(model))
    untied = _tiny_gemma3(tie=False)
    d = tmp_path_factory.mktemp("untied")
    untied.save_pretrained(d, safe_serialization=True)
    out["untied"] = (d, _expected(untied))
    return out


@pytest.mark.parametrize("variant", ["float32", "bfloat16", "float16", "sharded", "untied"])
def test_safetensors_values_match_transformers(saved: dict, variant: str) -> None:
    d, expected = saved[variant]
    ckpt = open_checkpoint(d)
    store = ckpt.weights
    if variant == "sharded":
        assert (d / "model.safetensors.index.json").is_file() and len(store.files) > 1
    stored = {n for n in expected if n != "lm_head.weight" or not ckpt.config.tie_word_embeddings}
    assert set(store.names()) == stored
    for name in stored:
        got = store.get(name)
        assert got.dtype == np.float32 and got.shape == expected[name].shape == store.shape(name)
        np.testing.assert_array_equal(got, expected[name], err_msg=name)
    dtype = {"sharded": "bfloat16", "untied": "float32"}.get(variant, variant)
    assert store.dtype("layers.0.self_attn.q_proj.weight") == dtype
    assert store.nbytes_f32() == sum(4 * a.size for n, a in expected.items() if n in stored)


def test_tied_lm_head_is_the_embedding(saved: dict) -> None:
    store = open_checkpoint(saved["float32"][0]).weights
    assert "lm_head.weight" in store and "lm_head.weight" not in store.names()
    np.testing.assert_array_equal(store.get("lm_head.weight"), store.get("embed_tokens.weight"))
    assert store.shape("lm_head.weight") == (128, 64)
    untied = open_checkpoint(saved["untied"][0]).weights
    assert not np.array_equal(untied.get("lm_head.weight"), untied.get("embed_tokens.weight"))


def test_get_returns_fresh_arrays(saved: dict) -> None:
    store = open_checkpoint(saved["float32"][0]).weights
    a = store.get("norm.weight")
    a[:] = 123.0
    assert not np.any(store.get("norm.weight") == 123.0)


def test_require_names_tensor_and_shapes(saved: dict) -> None:
    store = open_checkpoint(saved["float32"][0]).weights
    store.require("layers.1.mlp.down_proj.weight", (64, 128))
    with pytest.raises(WeightError) as info:
        store.require("layers.1.mlp.down_proj.weight", (128, 64))
    msg = str(info.value)
    assert "layers.1.mlp.down_proj.weight" in msg and "(64, 128)" in msg and "(128, 64)" in msg
    with pytest.raises(WeightError) as info:
        store.require("layers.7.mlp.down_proj.weight", (64, 128))
    assert "missing tensor layers.7.mlp.down_proj.weight" in str(info.value)
    assert "file has" in str(info.value) and str(store.source) in str(info.value)


def test_multimodal_prefixes_and_vision_tensors(tiny_ckpt, tmp_path: Path) -> None:
    """Old (`language_model.model.`, what transformers 5.24 saves) and new (`model.language_model.`)
    Gemma 3 wrapper layouts give the same canonical names; vision tensors are ignored."""
    from safetensors.numpy import load_file, save_file

    mm = tiny_ckpt("gemma3-mm")
    old = open_checkpoint(mm)
    raw = load_file(mm / "model.safetensors")
    assert any(k.startswith("vision_tower.") for k in raw) and any(k.startswith("language_model.model.") for k in raw)
    assert all(n.split(".")[0] in ("embed_tokens", "norm", "layers") for n in old.weights.names())
    renamed = {k.replace("language_model.model.", "model.language_model.").replace("vision_tower.",
                                                                                    "model.vision_tower."): v
               for k, v in raw.items()}
    save_file(renamed, str(tmp_path / "model.safetensors"))
    shutil.copy(mm / "config.json", tmp_path / "config.json")
    new = open_checkpoint(tmp_path)
    assert new.weights.names() == old.weights.names()
    np.testing.assert_array_equal(old.weights.get("layers.1.self_attn.k_norm.weight"),
                                  new.weights.get("layers.1.self_attn.k_norm.weight"))


# ---- GGUF ------------------------------------------------------------------------------------

_FAMILY_ARCH = {"gemma1-mqa": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3-mm": "gemma3",
                "gemma4": "gemma4", "gemma4-moe": "gemma4", "gemma4-kvshare": "gemma4"}


@pytest.mark.parametrize("family", sorted(_FAMILY_ARCH))
def test_gguf_round_trip_is_exact(family: str, tiny_ckpt, tmp_path: Path) -> None:
    hf = open_checkpoint(tiny_ckpt(family))
    path = write_gguf_from_hf(hf.path, tmp_path / f"{family}.gguf", arch=_FAMILY_ARCH[family])
    gg = open_checkpoint(path)
    assert gg.kind == "gguf" and hf.kind == "hf"
    ours, theirs = gg.config.to_dict(), hf.config.to_dict()
    ours.pop("model_type"), theirs.pop("model_type")
    assert ours == theirs
    assert gg.weights.names() == hf.weights.names()
    one = np.float32(1.0)
    for name in hf.weights.names():
        want = hf.weights.get(name)
        if hf.config.norm_shift and name.endswith("norm.weight"):
            want = (want + one) - one  # the file holds fl32(w + 1); undoing it is exact from there
        assert gg.weights.shape(name) == want.shape, name
        np.testing.assert_array_equal(gg.weights.get(name), want, err_msg=name)
    assert gg.weights.dtype("norm.weight") == "F32"


def test_gguf_q8_0_within_quantization_error(tiny_ckpt, tmp_path: Path) -> None:
    hf = open_checkpoint(tiny_ckpt("gemma3"))
    name = "layers.0.mlp.gate_proj.weight"
    path = write_gguf_from_hf(hf.path, tmp_path / "q8.gguf", quantize={name: gguf.GGMLQuantizationType.Q8_0})
    store = open_checkpoint(path).weights
    assert store.dtype(name) == "Q8_0"
    want, got = hf.weights.get(name), store.get(name)
    assert got.shape == want.shape and got.dtype == np.float32
    # Q8_0: blocks of 32 share a float16 scale max|x|/127: error <= half a step (+ the scale's rounding)
    step = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(got - want).reshape(-1, 32) <= step * 0.6)
    assert not np.array_equal(got, want)


def test_gguf_reader_and_fast_reader_agree(tiny_ckpt, tmp_path: Path) -> None:
    path = write_gguf_from_hf(tiny_ckpt("gemma4-moe"), tmp_path / "g4.gguf", arch="gemma4")
    assert gguf_config(GGUFFile.from_reader(gguf.GGUFReader(path)), source=str(path)) == open_checkpoint(path).config


def test_real_gguf_tensors(real_gguf_path: Path) -> None:
    from transformers.integrations.gguf.dequant import dequantize  # an independent (torch) dequantizer

    from rlx.frontends.gguf_file import GGUFFile

    store = open_checkpoint(real_gguf_path).weights
    assert store.shape("layers.0.self_attn.q_proj.weight") == (1024, 640)
    assert store.shape("lm_head.weight") == (262144, 640) and "lm_head.weight" in store
    q_norm = store.get("layers.0.self_attn.q_norm.weight")  # stored as 1 + w
    assert q_norm.shape == (256,) and abs(float(q_norm.mean())) < 1.0
    gf = GGUFFile.open(real_gguf_path)
    for gguf_name, name, qtype in [("blk.0.attn_output.weight", "layers.0.self_attn.o_proj.weight", "Q4_K"),
                                   ("blk.0.ffn_down.weight", "layers.0.mlp.down_proj.weight", "Q6_K"),
                                   ("blk.0.attn_v.weight", "layers.0.self_attn.v_proj.weight", "Q8_0")]:
        info = gf.tensors[gguf_name]
        ref = dequantize(torch.from_numpy(gf.raw(gguf_name).copy()), int(info.ggml_type)).numpy()
        assert store.dtype(name) == qtype
        np.testing.assert_array_equal(store.get(name), ref.reshape(info.shape), err_msg=name)


# ---- broken files ----------------------------------------------------------------------------


def test_truncated_safetensors(saved: dict, tmp_path: Path) -> None:
    src, _ = saved["float32"]
    shutil.copy(src / "config.json", tmp_path / "config.json")
    target = tmp_path / "model.safetensors"
    data = (src / "model.safetensors").read_bytes()
    for cut in (len(data) // 2, 4):
        target.write_bytes(data[:cut])
        with pytest.raises(WeightError) as info:
            open_checkpoint(tmp_path)
        assert str(target) in str(info.value) and "re-download" in str(info.value)


def test_truncated_gguf(tiny_ckpt, tmp_path: Path) -> None:
    path = write_gguf_from_hf(tiny_ckpt("gemma3"), tmp_path / "cut.gguf", truncate=True)
    with pytest.raises(WeightError) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value) and "re-download or re-convert" in str(info.value)
    path.write_bytes(path.read_bytes()[:100])  # cut inside the metadata
    with pytest.raises(WeightError, match="truncated"):
        WeightStore.open(path, open_checkpoint(tiny_ckpt("gemma3")).config)


def test_missing_shard_and_no_weights(saved: dict, tmp_path: Path) -> None:
    src, _ = saved["sharded"]
    shutil.copytree(src, tmp_path / "s")
    next((tmp_path / "s").glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(WeightError, match="missing"):
        open_checkpoint(tmp_path / "s")
    (tmp_path / "e").mkdir()
    shutil.copy(src / "config.json", tmp_path / "e" / "config.json")
    with pytest.raises(WeightError, match="no \\*.safetensors"):
        open_checkpoint(tmp_path / "e")


# ---- open_checkpoint -------------------------------------------------------------------------


def test_open_checkpoint_path_forms(saved: dict, tiny_ckpt, tmp_path: Path) -> None:
    d, _ = saved["float32"]
    for form in (d, d / "config.json", d / "model.safetensors", str(d)):
        assert open_checkpoint(form).weights.names() == open_checkpoint(d).weights.names()
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    path = write_gguf_from_hf(tiny_ckpt("gemma3"), gguf_dir / "m.gguf")
    assert open_checkpoint(gguf_dir).path == path
    with pytest.raises(RlxError, match="not found") as info:
        open_checkpoint(tmp_path / "nope")
    assert info.value.hint and ".gguf" in info.value.hint
    with pytest.raises(RlxError, match="no config.json and no .gguf"):
        open_checkpoint(tmp_path)


def test_model_hash(saved: dict, tmp_path: Path) -> None:
    src, _ = saved["float32"]
    shutil.copytree(src, tmp_path / "a")
    first = open_checkpoint(tmp_path / "a").model_hash()
    assert first == open_checkpoint(src).model_hash() and len(first) == 64  # content-based, not path/mtime
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    assert open_checkpoint(tmp_path / "a").model_hash() != first
    assert open_checkpoint(saved["bfloat16"][0]).model_hash() != open_checkpoint(src).model_hash()
