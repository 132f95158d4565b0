"""The bad-input corpus: hostile or careless input to the CLI, and what rlx must do with it.

Every case builds its inputs in a fresh directory (the "user's tree"; the compile cache and the
working directory live there too), runs `rlx ...` and asserts: the exit code (2 for bad input),
exactly one `rlx: error:` line naming the thing that is wrong, a `fix:` line, no traceback, and
that the tree is exactly as before (hashes of every path and file: nothing written, deleted,
renamed or half-written). Classes: config.json, safetensors, GGUF, TOML profiles, CLI flags,
artifacts, output paths (signals are in test_signals.py: they need a child process).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import pytest

from rlx.cli import main
from rlx.runtime.artifact import file_record
from tests.fixtures.edit import (
    copy_tree,
    edit_json,
    edit_safetensors_header,
    flip_byte,
    rewrite_gguf,
    tree_digest,
    truncate,
)

Make = Callable[["World", Path], list[str]]
T = gguf.GGUFValueType


@dataclass(frozen=True)
class World:
    """Valid inputs every case starts from (never edited: cases edit copies)."""

    hf: Path        # tiny Gemma 3 HF checkpoint (config.json + model.safetensors)
    gguf: Path      # the same model as a GGUF
    artifact: Path  # the same model compiled for this CPU (--max-seq 64)
    moe: Path       # tiny Gemma 4 MoE HF checkpoint


@dataclass(frozen=True)
class Case:
    id: str
    make: Make
    expect: str            # a regex the error output must match (it names what is wrong)
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tiny_ckpt: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> World:
    from rlx.compiler.compile import compile_checkpoint
    from tests.fixtures.gguf_writer import write_gguf_from_hf

    root = tmp_path_factory.mktemp("world")
    hf = tiny_ckpt("gemma3")
    gguf_path = write_gguf_from_hf(hf, root / "tiny.gguf", arch="gemma3")
    [artifact] = compile_checkpoint(hf, ["cpu"], root / "artifact", max_seq=64, use_cache=False)
    return World(hf, gguf_path, artifact, tiny_ckpt("gemma4-moe"))


# ---- building blocks ----

def hf_copy(w: World, tmp: Path) -> Path:
    return copy_tree(w.hf, tmp / "model")


def config(change: Callable[[dict], object]) -> Make:
    """`rlx inspect` of a copy of the checkpoint whose config.json `change` edits."""
    def make(w: World, tmp: Path) -> list[str]:
        d = hf_copy(w, tmp)
        edit_json(d / "config.json", change)
        return ["inspect", str(d)]
    return make


def config_text(text: bytes) -> Make:
    def make(w: World, tmp: Path) -> list[str]:
        d = hf_copy(w, tmp)
        (d / "config.json").write_bytes(text)
        return ["inspect", str(d)]
    return make


def setkey(key: str, value: object) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        d[key] = value
    return change


def delkey(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


def rope(layer_type: str, key: str, value: object) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        d["rope_parameters"][layer_type][key] = value
    return change


def weights(change: Callable[[dict], object], size: int | None = None) -> Make:
    """`rlx inspect` of a copy whose safetensors header `change` edits."""
    def make(w: World, tmp: Path) -> list[str]:
        d = hf_copy(w, tmp)
        edit_safetensors_header(d / "model.safetensors", change, size=size)
        return ["inspect", str(d)]
    return make


def weights_bytes(damage: Callable[[Path], object], command: str = "inspect") -> Make:
    def make(w: World, tmp: Path) -> list[str]:
        d = hf_copy(w, tmp)
        damage(d / "model.safetensors")
        return [command, str(d)] if command == "inspect" else ["run", str(d), "--prompt-ids", "2,5"]
    return make


def tensor(name: str, key: str, value: object) -> Callable[[dict], None]:
    def change(h: dict) -> None:
        h[name][key] = value
    return change


EMBED = "model.embed_tokens.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"


def gguf_edit(**kwargs: object) -> Make:
    def make(w: World, tmp: Path) -> list[str]:
        out = rewrite_gguf(w.gguf, tmp / "model.gguf", **kwargs)  # type: ignore[arg-type]
        return ["inspect", str(out)]
    return make


def gguf_damage(damage: Callable[[Path], object]) -> Make:
    def make(w: World, tmp: Path) -> list[str]:
        path = copy_tree(w.gguf, tmp / "model.gguf")
        damage(path)
        return ["inspect", str(path)]
    return make


def profile(text: str | bytes, command: str = "inspect") -> Make:
    """A gemma.rlx.toml with `text`, given with --profile."""
    def make(w: World, tmp: Path) -> list[str]:
        p = tmp / "gemma.rlx.toml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        if command == "compile":
            return ["compile", str(w.hf), "--profile", str(p), "--out", str(tmp / "art")]
        return ["inspect", str(w.hf), "--profile", str(p)]
    return make


def argv(*args: str, model: str = "hf") -> Make:
    """A command line; `{model}`, `{tmp}` and `{art}` are replaced."""
    def make(w: World, tmp: Path) -> list[str]:
        paths = {"{model}": {"hf": w.hf, "gguf": w.gguf, "art": w.artifact, "moe": w.moe}[model],
                 "{tmp}": tmp, "{art}": w.artifact}
        out = []
        for a in args:
            for token, path in paths.items():
                a = a.replace(token, str(path))
            out.append(a)
        return out
    return make


def artifact(change: Callable[[Path], object], *extra: str) -> Make:
    """`rlx run` of a copy of the artifact that `change` damages."""
    def make(w: World, tmp: Path) -> list[str]:
        art = copy_tree(w.artifact, tmp / "art")
        change(art)
        return ["run", str(art), "--prompt-ids", "2,5,7", "--max-new-tokens", "2", *extra]
    return make


def manifest(change: Callable[[dict], object]) -> Callable[[Path], object]:
    return lambda art: edit_json(art / "manifest.json", change)


def drop_path(*keys: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        d = m
        for k in keys[:-1]:
            d = d[k]
        d.pop(keys[-1])
    return change


def set_path(value: object, *keys: str) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return change


def art_weights(change: Callable[[dict], object]) -> Callable[[Path], object]:
    return lambda art: edit_safetensors_header(art / "weights.safetensors", change)


def first_param(art: Path) -> str:
    return sorted(json.loads((art / "manifest.json").read_text())["entries"]["decode"]["params"])[0][0]


def consistent(change: Callable[[Path], object]) -> Callable[[Path], object]:
    """A damage the manifest agrees with (its file records updated): an artifact whose files are
    intact as recorded but whose weights do not fit its code, so the header checks must catch it."""
    def apply(art: Path) -> None:
        change(art)
        edit_json(art / "manifest.json", lambda m: m["files"].update(
            {"weights.safetensors": file_record(art / "weights.safetensors")}))
    return apply


def rename_first_param(art: Path) -> None:
    key = first_param(art)
    edit_safetensors_header(art / "weights.safetensors", lambda h: h.update({key + ".x": h.pop(key)}))


def reshape_first_param(art: Path) -> None:
    key = first_param(art)
    edit_safetensors_header(art / "weights.safetensors", lambda h: h[key].update(shape=[1, *h[key]["shape"]]))


def retype_first_param(art: Path) -> None:
    key = first_param(art)
    edit_safetensors_header(art / "weights.safetensors", lambda h: h[key].update(dtype="I32"))


def out_file(w: World, tmp: Path) -> list[str]:
    (tmp / "notes.txt").write_text("my notes")
    return ["compile", str(w.hf), "--out", str(tmp / "notes.txt")]


def out_user_dir(w: World, tmp: Path) -> list[str]:
    (tmp / "work").mkdir()
    (tmp / "work" / "thesis.tex").write_text("years of work")
    return ["compile", str(w.hf), "--out", str(tmp / "work")]


def out_checkpoint(w: World, tmp: Path) -> list[str]:
    d = hf_copy(w, tmp)
    return ["compile", str(d), "--out", str(d)]


def out_checkpoint_parent(w: World, tmp: Path) -> list[str]:
    d = hf_copy(w, tmp)
    return ["compile", str(d), "--out", str(tmp)]


def out_gguf_file(w: World, tmp: Path) -> list[str]:
    g = copy_tree(w.gguf, tmp / "m.gguf")
    return ["compile", str(g), "--out", str(g)]


def out_under_file(w: World, tmp: Path) -> list[str]:
    (tmp / "plain").write_text("x")
    return ["compile", str(w.hf), "--out", str(tmp / "plain" / "art")]


def out_symlink_to_user_dir(w: World, tmp: Path) -> list[str]:
    (tmp / "docs").mkdir()
    (tmp / "docs" / "a.txt").write_text("keep")
    (tmp / "link").symlink_to(tmp / "docs")
    return ["compile", str(w.hf), "--out", str(tmp / "link")]


def out_multi_file(w: World, tmp: Path) -> list[str]:
    (tmp / "f").write_text("x")
    return ["compile", str(w.hf), "--target", "cpu,cuda", "--out", str(tmp / "f")]


def out_multi_user_subdir(w: World, tmp: Path) -> list[str]:
    (tmp / "outs" / "cpu").mkdir(parents=True)
    (tmp / "outs" / "cpu" / "mine.txt").write_text("mine")
    return ["compile", str(w.hf), "--target", "cpu,cuda", "--out", str(tmp / "outs")]


def compare_out_user_dir(w: World, tmp: Path) -> list[str]:
    (tmp / "rep").mkdir()
    (tmp / "rep" / "draft.md").write_text("draft")
    return ["compare", str(w.hf), "--targets", "cpu", "--prompt-ids", "2,5", "--out", str(tmp / "rep")]


def logits_into_dir(w: World, tmp: Path) -> list[str]:
    (tmp / "d").mkdir()
    return ["run", str(w.artifact), "--prompt-ids", "2,5", "--logits-out", str(tmp / "d")]


def logits_under_file(w: World, tmp: Path) -> list[str]:
    (tmp / "f").write_text("x")
    return ["run", str(w.artifact), "--prompt-ids", "2,5", "--logits-out", str(tmp / "f" / "x.npy")]


def cache_under_file(w: World, tmp: Path) -> list[str]:
    (tmp / "cachefile").write_text("x")
    return ["compile", str(w.hf), "--out", str(tmp / "art")]


def bench_file(content: bytes) -> Make:
    """`rlx compare --bench` of a file holding `content`."""
    def make(w: World, tmp: Path) -> list[str]:
        (tmp / "garbage.json").write_bytes(content)
        return ["compare", str(w.hf), "--targets", "cpu", "--prompt-ids", "2,5", "--bench", str(tmp / "garbage.json"),
                "--out", str(tmp / "r")]
    return make


def two_ggufs(w: World, tmp: Path) -> list[str]:
    copy_tree(w.gguf, tmp / "m" / "a.gguf")
    copy_tree(w.gguf, tmp / "m" / "b.gguf")
    return ["inspect", str(tmp / "m")]


def long_prompt(w: World, tmp: Path) -> list[str]:
    return ["run", str(w.artifact), "--prompt-ids", ",".join(["5"] * 70)]


def missing_shard(w: World, tmp: Path) -> list[str]:
    d = hf_copy(w, tmp)
    (d / "model.safetensors").rename(d / "part-1.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {EMBED: "part-1.safetensors", Q0: "part-2.safetensors"}}))
    return ["inspect", str(d)]


def bad_index(w: World, tmp: Path) -> list[str]:
    d = hf_copy(w, tmp)
    (d / "model.safetensors").rename(d / "part-1.safetensors")
    (d / "model.safetensors.index.json").write_text("{not json")
    return ["inspect", str(d)]


def no_weights(w: World, tmp: Path) -> list[str]:
    d = hf_copy(w, tmp)
    (d / "model.safetensors").unlink()
    return ["inspect", str(d)]


def not_a_checkpoint(w: World, tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return ["inspect", str(tmp / "empty")]


def txt_file(w: World, tmp: Path) -> list[str]:
    (tmp / "model.bin").write_bytes(b"\0" * 64)
    return ["inspect", str(tmp / "model.bin")]


def lone_safetensors(w: World, tmp: Path) -> list[str]:
    copy_tree(w.hf / "model.safetensors", tmp / "x" / "model.safetensors")
    return ["inspect", str(tmp / "x" / "model.safetensors")]


def rm(name: str) -> Callable[[Path], object]:
    return lambda art: (art / name).unlink()


def garbage(name: str) -> Callable[[Path], object]:
    return lambda art: (art / name).write_bytes(b"\x7fELF not really a library" * 10)


# ---- the corpus ----

CONFIG_CASES = [
    Case("config-rope-theta-string", config(rope("full_attention", "rope_theta", "big")), r"rope_theta"),
    Case("config-rope-theta-inf", config_text(b'{"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": '
                                              b'128, "num_hidden_layers": 4, "num_attention_heads": 4, "rope_theta": '
                                              b'1e999}'), r"rope_theta"),
    Case("config-rope-theta-nan", config(rope("sliding_attention", "rope_theta", float("nan"))), r"rope_theta"),
    Case("config-rope-theta-negative", config(rope("full_attention", "rope_theta", -1.0)), r"theta"),
    Case("config-rope-factor-string", config(lambda d: d["rope_parameters"]["full_attention"].update(
        rope_type="linear", factor="x")), r"factor"),
    Case("config-rope-type-yarn", config(rope("full_attention", "rope_type", "yarn")), r"rope_type 'yarn'"),
    Case("config-rope-parameters-list", config(setkey("rope_parameters", [1, 2])), r"rope_parameters"),
    Case("config-rope-entry-list", config(lambda d: d["rope_parameters"].update(full_attention=[1])), r"rope"),
    Case("config-hidden-size-string", config(setkey("hidden_size", "64")), r"hidden_size"),
    Case("config-hidden-size-float", config(setkey("hidden_size", 64.5)), r"hidden_size"),
    Case("config-hidden-size-bool", config(setkey("hidden_size", True)), r"hidden_size"),
    Case("config-hidden-size-zero", config(setkey("hidden_size", 0)), r"hidden_size"),
    Case("config-layers-negative", config(setkey("num_hidden_layers", -4)), r"num_hidden_layers|num_layers|layer"),
    Case("config-heads-null", config(setkey("num_attention_heads", None)), r"num_attention_heads"),
    Case("config-missing-hidden-size", config(delkey("hidden_size")), r"hidden_size"),
    Case("config-missing-intermediate", config(delkey("intermediate_size")), r"intermediate_size"),
    Case("config-missing-layers", config(delkey("num_hidden_layers")), r"num_hidden_layers"),
    Case("config-missing-heads", config(delkey("num_attention_heads")), r"num_attention_heads"),
    Case("config-missing-model-type", config(delkey("model_type")), r"model_type"),
    Case("config-unknown-model-type", config(setkey("model_type", "llama")), r"llama"),
    Case("config-heads-not-multiple", config(setkey("num_key_value_heads", 3)), r"num_kv_heads|num_key_value_heads"),
    Case("config-layer-types-length", config(setkey("layer_types", ["full_attention"])), r"layer_types"),
    Case("config-layer-types-unknown", config(setkey("layer_types", ["global"] * 4)), r"layer type|layer_types"),
    Case("config-layer-types-ints", config(setkey("layer_types", [1, 2, 3, 4])), r"layer_types"),
    Case("config-eos-string", config(setkey("eos_token_id", "eos")), r"eos_token_id"),
    Case("config-eps-string", config(setkey("rms_norm_eps", "tiny")), r"rms_norm_eps"),
    Case("config-sliding-window-missing", config(setkey("sliding_window", None)), r"sliding_window"),
    Case("config-vocab-mismatch", config(setkey("vocab_size", 300)), r"embed_tokens"),
    Case("config-hidden-mismatch", config(setkey("head_dim", 8)), r"q_proj|shape"),
    Case("config-bidirectional", config(setkey("use_bidirectional_attention", True)), r"bidirectional"),
    Case("config-not-json", config_text(b"{ this is not json"), r"not valid JSON"),
    Case("config-array", config_text(b"[1, 2, 3]"), r"JSON object"),
    Case("config-not-utf8", config_text(b'{"model_type": "gemma3_text\xff\xfe"}'), r"config\.json"),
    Case("config-empty", config_text(b""), r"config\.json"),
    Case("config-text-config-string", config(lambda d: {"model_type": "gemma3", "text_config": "x"}), r"text_config"),
]

SAFETENSORS_CASES = [
    Case("st-truncated", weights_bytes(lambda p: truncate(p, 0.5)), r"truncated"),
    Case("st-truncated-run", weights_bytes(lambda p: truncate(p, 0.9), "run"), r"truncated"),
    Case("st-header-only", weights_bytes(lambda p: truncate(p, 8)), r"model\.safetensors"),
    Case("st-empty-file", weights_bytes(lambda p: truncate(p, 0)), r"model\.safetensors"),
    Case("st-garbage", weights_bytes(lambda p: p.write_bytes(b"garbage" * 100)), r"model\.safetensors"),
    Case("st-header-length-huge", weights(lambda h: None, size=1 << 40), r"model\.safetensors"),
    Case("st-header-not-object", weights(lambda h: [1, 2]), r"model\.safetensors"),
    Case("st-entry-without-dtype", weights(lambda h: h[EMBED].pop("dtype")), r"embed_tokens|dtype"),
    Case("st-offsets-strings", weights(tensor(EMBED, "data_offsets", ["a", "b"])), r"embed_tokens|offsets"),
    Case("st-offsets-reversed", weights(lambda h: h[EMBED].update(data_offsets=h[EMBED]["data_offsets"][::-1])),
         r"embed_tokens|offsets"),
    Case("st-offsets-past-end", weights(tensor(EMBED, "data_offsets", [0, 1 << 40])), r"truncated|embed_tokens"),
    Case("st-unknown-dtype", weights(tensor(EMBED, "dtype", "Q9")), r"embed_tokens|Q9"),
    Case("st-shape-string", weights(tensor(EMBED, "shape", "256x64")), r"embed_tokens|shape"),
    Case("st-shape-mismatch-bytes", weights(tensor(EMBED, "shape", [256, 63])), r"embed_tokens"),
    Case("st-missing-tensor", weights(lambda h: h.__delitem__(Q0)), r"q_proj"),
    Case("st-misshaped-tensor", weights(lambda h: h[Q0].update(shape=[32, 128])), r"q_proj"),
    Case("st-no-weights", no_weights, r"safetensors"),
    Case("st-index-missing-shard", missing_shard, r"part-2"),
    Case("st-index-bad-json", bad_index, r"index"),
]

GGUF_CASES = [
    Case("gguf-truncated", gguf_damage(lambda p: truncate(p, 0.6)), r"truncated"),
    Case("gguf-header-cut", gguf_damage(lambda p: truncate(p, 40)), r"truncated|corrupt|GGUF"),
    Case("gguf-bad-magic", gguf_damage(lambda p: flip_byte(p, 0)), r"not a GGUF"),
    Case("gguf-bad-version", gguf_damage(lambda p: flip_byte(p, 4)), r"version|corrupt"),
    Case("gguf-empty", gguf_damage(lambda p: truncate(p, 0)), r"GGUF"),
    Case("gguf-not-gemma", gguf_edit(arch="llama"), r"not a Gemma GGUF"),
    Case("gguf-no-token-embd", gguf_edit(drop_tensors=("token_embd.weight",)), r"token_embd"),
    Case("gguf-no-block-count", gguf_edit(drop=("gemma3.block_count",)), r"block_count"),
    Case("gguf-block-count-string", gguf_edit(values={"gemma3.block_count": ("four", T.STRING)}), r"block_count"),
    Case("gguf-block-count-zero", gguf_edit(values={"gemma3.block_count": (0, T.UINT32)}), r"block_count|num_layers"),
    Case("gguf-freq-base-string", gguf_edit(values={"gemma3.rope.freq_base": ("big", T.STRING)}), r"freq_base"),
    Case("gguf-no-embedding-length", gguf_edit(drop=("gemma3.embedding_length",)), r"embedding_length"),
    Case("gguf-no-eps", gguf_edit(drop=("gemma3.attention.layer_norm_rms_epsilon",)), r"layer_norm_rms_epsilon"),
    Case("gguf-head-count-zero", gguf_edit(values={"gemma3.attention.head_count": (0, T.UINT32)}), r"head"),
    Case("gguf-missing-layer-tensor", gguf_edit(drop_tensors=("blk.0.attn_q.weight",)), r"q_proj|attn_q"),
    Case("gguf-tokens-not-strings", gguf_edit(values={"tokenizer.ggml.tokens": ([1, 2], T.ARRAY, T.INT32)}),
         r"tokenizer\.ggml\.tokens|tokens"),
    Case("gguf-two-in-dir", two_ggufs, r"2 \.gguf files"),
]

PROFILE_CASES = [
    Case("toml-invalid", profile("[fusion\npolicy = 1"), r"invalid TOML"),
    Case("toml-unknown-section", profile("[fuse]\nskip = true"), r"unknown section \[fuse\]"),
    Case("toml-unknown-key", profile("[fusion]\nskp = true"), r"'skp'"),
    Case("toml-policy-bad", profile('[fusion]\npolicy = "max"'), r"'policy'"),
    Case("toml-policy-int", profile("[fusion]\npolicy = 3"), r"'policy'"),
    Case("toml-skip-string", profile('[fusion]\nskip = "yes"'), r"'skip'"),
    Case("toml-passes-cse-int", profile("[passes]\ncse = 1"), r"'cse'"),
    Case("toml-pipeline-unknown-pass", profile('[passes]\npipeline = "cse,fastest"'), r"fastest"),
    Case("toml-pipeline-syntax", profile('[passes]\npipeline = "cse,,{"'), r"pipeline"),
    Case("toml-pipeline-bad-option", profile('[passes]\npipeline = "fold-rope{max_elements=big}"'), r"max_elements"),
    Case("toml-precision-f64", profile('[precision]\ncompute = "f64"'), r"'compute'"),
    Case("toml-mixed-bad", profile('[precision]\nmixed = "on"'), r"'mixed'"),
    Case("toml-backend-unknown", profile("[backend.tpu]\nopt_level = 1"), r"unknown target"),
    Case("toml-opt-level-range", profile("[backend.cpu]\nopt_level = 9"), r"'opt_level'"),
    Case("toml-threads-negative", profile("[backend.cpu]\nthreads = -1"), r"'threads'"),
    Case("toml-specialize-dim", profile("[specialize]\nLEN = 4"), r"unknown dim"),
    Case("toml-specialize-unsorted", profile("[specialize]\nSEQ = [8, 4]"), r"sorted"),
    Case("toml-specialize-zero", profile("[specialize]\nSEQ = 0"), r"positive"),
    Case("toml-specialize-batch-buckets", profile("[specialize]\nBATCH = [1, 2]"), r"buckets"),
    Case("toml-layers-two-selectors", profile("[[layers]]\nindex = 0\ntype = \"full_attention\"\nwindow = 2"),
         r"exactly one of index, range, type"),
    Case("toml-layers-no-change", profile("[[layers]]\nindex = 0"), r"changes nothing"),
    Case("toml-layers-range-bad", profile("[[layers]]\nrange = [3, 1]\ndrop = true"), r"'range'"),
    Case("toml-layers-index-out", profile("[[layers]]\nindex = 40\ndrop = true"), r"out of range"),
    Case("toml-layers-keep-first-out", profile("[[layers]]\nkeep_first = 9"), r"out of range"),
    Case("toml-layers-not-array", profile("layers = 3"), r"array of tables"),
    Case("toml-layers-type-bad", profile('[[layers]]\ntype = "local"\ndrop = true'), r"'type'"),
    Case("toml-layers-window-negative", profile("[[layers]]\nindex = 0\nwindow = -2"), r"'window'"),
    Case("toml-layers-replace-unknown", profile('[[layers]]\nindex = 0\nreplace = "mlp_only"'), r"'replace'"),
    Case("toml-layers-softcap-nan", profile("[[layers]]\nindex = 0\nsoftcap = nan"), r"'softcap'"),
    Case("toml-not-utf8", profile(b"[fusion]\nskip = \xff"), r"gemma\.rlx\.toml"),
    Case("toml-missing-file", argv("inspect", "{model}", "--profile", "{tmp}/none.toml"), r"not found"),
    Case("toml-compile-bad-key", profile("[passes]\ndce = 0", "compile"), r"'dce'"),
]

FLAG_CASES = [
    Case("run-no-prompt", argv("run", "{model}"), r"exactly one of --prompt"),
    Case("run-both-prompts", argv("run", "{model}", "--prompt", "hi", "--prompt-ids", "2"), r"exactly one"),
    Case("run-prompt-ids-text", argv("run", "{model}", "--prompt-ids", "2,x,3"), r"--prompt-ids"),
    Case("run-prompt-ids-no-file", argv("run", "{model}", "--prompt-ids", "@{tmp}/none.txt"),
         r"--prompt-ids @FILE: cannot read \{tmp\}/none\.txt"),
    Case("run-prompt-file-missing", argv("run", "{model}", "--prompt-file", "{tmp}/none.txt"),
         r"--prompt-file: cannot read \{tmp\}/none\.txt"),
    Case("run-prompt-and-file", argv("run", "{model}", "--prompt", "a", "--prompt-file", "{tmp}/p.txt"),
         r"exactly one of --prompt TEXT, --prompt-file"),
    Case("run-prompt-ids-empty", argv("run", "{model}", "--prompt-ids", ""), r"empty prompt"),
    Case("run-prompt-ids-float", argv("run", "{model}", "--prompt-ids", "2.5"), r"--prompt-ids"),
    Case("run-id-past-vocab-reference", argv("run", "{model}", "--prompt-ids", "2,1000000000"), r"1000000000"),
    Case("run-id-past-vocab-artifact", argv("run", "{art}", "--prompt-ids", "2,1000000000"), r"outside the vocab"),
    Case("run-id-vocab-edge", argv("run", "{art}", "--prompt-ids", "2,256"), r"outside the vocab"),
    Case("run-id-negative", argv("run", "{art}", "--prompt-ids", "2,-5"), r"outside the vocab"),
    Case("run-id-negative-reference", argv("run", "{model}", "--prompt-ids", "-1"), r"outside the vocab"),
    Case("run-max-new-zero", argv("run", "{art}", "--prompt-ids", "2", "--max-new-tokens", "0"), r"max-new-tokens"),
    Case("run-max-new-negative", argv("run", "{art}", "--prompt-ids", "2", "--max-new-tokens", "-3"),
         r"max-new-tokens"),
    Case("run-max-new-text", argv("run", "{art}", "--prompt-ids", "2", "--max-new-tokens", "many"), r"max-new-tokens"),
    Case("run-too-long-for-context", argv("run", "{art}", "--prompt-ids", "2", "--max-new-tokens", "500"),
         r"positions|max-seq"),
    Case("run-prompt-too-long", long_prompt, r"supports 64|max-seq"),
    Case("run-temperature-nan", argv("run", "{art}", "--prompt-ids", "2", "--temperature", "nan"), r"temperature"),
    Case("run-temperature-negative", argv("run", "{art}", "--prompt-ids", "2", "--temperature", "-1"),
         r"temperature"),
    Case("run-temperature-inf", argv("run", "{art}", "--prompt-ids", "2", "--temperature", "inf"), r"temperature"),
    Case("run-top-p-zero", argv("run", "{art}", "--prompt-ids", "2", "--top-p", "0"), r"top-p"),
    Case("run-top-p-big", argv("run", "{art}", "--prompt-ids", "2", "--top-p", "1.5"), r"top-p"),
    Case("run-top-p-nan", argv("run", "{art}", "--prompt-ids", "2", "--top-p", "nan"), r"top-p"),
    Case("run-top-k-negative", argv("run", "{art}", "--prompt-ids", "2", "--top-k", "-1"), r"top-k"),
    Case("run-seed-negative", argv("run", "{art}", "--prompt-ids", "2", "--seed", "-1"), r"seed"),
    Case("run-seed-huge", argv("run", "{art}", "--prompt-ids", "2", "--seed", str(2**70)), r"seed"),
    Case("run-unknown-target", argv("run", "{model}", "--prompt-ids", "2", "--target", "tpu"), r"unknown target"),
    Case("run-artifact-other-target", argv("run", "{art}", "--prompt-ids", "2", "--target", "cuda"), r"compiled for"),
    Case("run-artifact-with-profile", argv("run", "{art}", "--prompt-ids", "2", "--profile", "gemma_decode"),
         r"--profile"),
    Case("run-artifact-with-passes", argv("run", "{art}", "--prompt-ids", "2", "--passes", "cse"), r"--passes"),
    Case("run-verify-checkpoint", argv("run", "{model}", "--prompt-ids", "2", "--verify"), r"--verify"),
    Case("run-no-tokenizer-prompt", argv("run", "{model}", "--prompt", "hello"), r"tokenizer"),
    Case("run-missing-model", argv("run", "{tmp}/nothing", "--prompt-ids", "2"), r"not found"),
    Case("run-passes-unknown", argv("run", "{model}", "--prompt-ids", "2", "--passes", "cse,turbo"), r"turbo"),
    Case("run-passes-syntax", argv("run", "{model}", "--prompt-ids", "2", "--passes", "cse{"), r"pipeline|cse"),
    Case("run-passes-option", argv("run", "{model}", "--prompt-ids", "2", "--passes", "fuse-epilogue{max_steps=x}"),
         r"max_steps"),
    Case("run-passes-unknown-option", argv("run", "{model}", "--prompt-ids", "2", "--passes", "dce{fast=true}"),
         r"no option 'fast'"),
    Case("run-unknown-flag", argv("run", "{model}", "--prompt-ids", "2", "--fast"), r"unrecognized"),
    Case("compile-unknown-target", argv("compile", "{model}", "--target", "tpu", "--out", "{tmp}/a"),
         r"unknown target 'tpu'"),
    Case("compile-empty-target", argv("compile", "{model}", "--target", "", "--out", "{tmp}/a"), r"no target"),
    Case("compile-comma-target", argv("compile", "{model}", "--target", ",", "--out", "{tmp}/a"), r"no target"),
    Case("compile-duplicate-target", argv("compile", "{model}", "--target", "cpu,cpu", "--out", "{tmp}/a"), r"twice"),
    Case("compile-json-target-bad", argv("compile", "{model}", "--target", '{"kind": ', "--out", "{tmp}/a"),
         r"not valid JSON"),
    Case("compile-json-target-kind", argv("compile", "{model}", "--target", '{"kind": "vulkan"}', "--out", "{tmp}/a"),
         r"vulkan"),
    Case("compile-json-target-no-kind", argv("compile", "{model}", "--target", '{"mcpu": "x"}', "--out", "{tmp}/a"),
         r"kind"),
    Case("compile-max-seq-zero", argv("compile", "{model}", "--max-seq", "0", "--out", "{tmp}/a"), r"--max-seq 0"),
    Case("compile-max-seq-negative", argv("compile", "{model}", "--max-seq", "-8", "--out", "{tmp}/a"), r"--max-seq"),
    Case("compile-max-seq-too-long", argv("compile", "{model}", "--max-seq", "100000", "--out", "{tmp}/a"),
         r"--max-seq 100000"),
    Case("compile-max-seq-text", argv("compile", "{model}", "--max-seq", "long", "--out", "{tmp}/a"), r"--max-seq"),
    Case("compile-specialize-past", argv("compile", "{model}", "--passes", "specialize{PAST_SEQ=5}", "--out",
                                         "{tmp}/a"), r"binds PAST_SEQ \(specialize\{PAST_SEQ=5\}\)"),
    Case("run-specialize-past", argv("run", "{model}", "--prompt-ids", "2", "--target", "cpu", "--passes",
                                     "specialize{PAST_SEQ=5}"), r"binds PAST_SEQ"),
    Case("compile-missing-checkpoint", argv("compile", "{tmp}/nope", "--out", "{tmp}/a"), r"not found"),
    Case("inspect-seq-zero", argv("inspect", "{model}", "--seq", "0"), r"--seq"),
    Case("inspect-seq-text", argv("inspect", "{model}", "--seq", "long"), r"--seq"),
    Case("inspect-batch-zero", argv("inspect", "{model}", "--batch", "0"), r"batch"),
    Case("inspect-dynamic-seq-batch", argv("inspect", "{model}", "--batch", "2"), r"dynamic_seq"),
    Case("inspect-mode-bad", argv("inspect", "{model}", "--mode", "train"), r"--mode"),
    Case("inspect-format-bad", argv("inspect", "{model}", "--format", "xml"), r"--format"),
    Case("inspect-dir-no-checkpoint", not_a_checkpoint, r"not a checkpoint directory"),
    Case("inspect-not-a-checkpoint-file", txt_file, r"not a checkpoint file"),
    Case("inspect-lone-safetensors", lone_safetensors, r"config\.json"),
    Case("no-command", argv(), r"command"),
    Case("unknown-command", argv("serve"), r"serve"),
    Case("compare-empty-targets", argv("compare", "{model}", "--targets", "", "--out", "{tmp}/r"), r"--targets"),
    Case("compare-unknown-target", argv("compare", "{model}", "--targets", "cpu,tpu", "--out", "{tmp}/r"), r"tpu"),
    Case("compare-both-prompts", argv("compare", "{model}", "--prompt", "a", "--prompt-ids", "2", "--out", "{tmp}/r"),
         r"at most one"),
    Case("compare-bench-missing", argv("compare", "{model}", "--bench", "{tmp}/b.json", "--out", "{tmp}/r"),
         r"--bench"),
    Case("compare-no-tokenizer", argv("compare", "{model}", "--targets", "cpu", "--out", "{tmp}/r"), r"tokenize"),
    Case("compare-id-past-vocab", argv("compare", "{model}", "--targets", "cpu", "--prompt-ids", "2,999", "--out",
                                       "{tmp}/r"), r"prompt id 999 is outside the vocabulary"),
    Case("compare-id-negative", argv("compare", "{model}", "--targets", "cpu", "--prompt-ids", "2,-7", "--out",
                                     "{tmp}/r"), r"prompt id -7 is outside the vocabulary"),
    Case("compare-bench-garbage", bench_file(b"\x00garbage{"), r"--bench \{tmp\}/garbage\.json is not JSON"),
    Case("compare-bench-no-numbers", bench_file(b'{"engines": [{"name": "x"}]}'), r"holds no benchmark numbers"),
    Case("compare-bench-directory", argv("compare", "{model}", "--targets", "cpu", "--prompt-ids", "2", "--bench",
                                         "{tmp}", "--out", "{tmp}/r"), r"--bench \{tmp\}: cannot read it"),
]

ARTIFACT_CASES = [
    Case("art-no-manifest", artifact(rm("manifest.json")), r"manifest|checkpoint"),
    Case("art-manifest-not-json", artifact(lambda a: (a / "manifest.json").write_text("{oops")), r"damaged"),
    Case("art-manifest-array", artifact(lambda a: (a / "manifest.json").write_text("[]")), r"damaged|format"),
    Case("art-manifest-not-utf8", artifact(lambda a: (a / "manifest.json").write_bytes(b"\xff\xfe")), r"damaged"),
    Case("art-format-version", artifact(manifest(set_path(1, "format_version"))), r"format"),
    Case("art-format-name", artifact(manifest(set_path("other", "format"))), r"format"),
    Case("art-tvm-version", artifact(manifest(set_path("0.1", "versions", "tvm"))), r"compiled with tvm 0\.1"),
    Case("art-rlx-version", artifact(manifest(set_path("9.9.9", "versions", "rlx"))), r"compiled with rlx 9\.9\.9"),
    Case("art-no-entries", artifact(manifest(drop_path("entries"))), r"entries"),
    Case("art-no-config", artifact(manifest(drop_path("config"))), r"config"),
    Case("art-no-target", artifact(manifest(drop_path("target"))), r"target"),
    Case("art-no-library-key", artifact(manifest(drop_path("library"))), r"library"),
    Case("art-no-files", artifact(manifest(drop_path("files"))), r"files"),
    Case("art-no-max-seq", artifact(manifest(drop_path("max_seq"))), r"max_seq"),
    Case("art-max-seq-string", artifact(manifest(set_path("64", "max_seq"))), r"max_seq"),
    Case("art-threads-string", artifact(manifest(set_path("two", "backend", "threads"))), r"threads"),
    Case("art-entries-list", artifact(manifest(set_path([], "entries"))), r"entries"),
    Case("art-param-type-bad", artifact(manifest(lambda m: m["entries"]["decode"]["params"][0].__setitem__(
        1, "f99[2]"))), r"params\[0\]"),
    Case("art-inputs-not-pairs", artifact(manifest(lambda m: m["entries"]["decode"].update(inputs=[["x"]]))),
         r"inputs\[0\]"),
    Case("art-config-bad", artifact(manifest(set_path(-3, "config", "hidden_size"))), r"hidden_size"),
    Case("art-target-cuda", artifact(manifest(lambda m: m["target"].update(name="cuda", device="cuda"))),
         r"cannot run here"),
    Case("art-target-cross", artifact(manifest(set_path(False, "target", "local"))), r"cannot run here"),
    Case("art-no-library", artifact(rm("lib.so")), r"lib\.so is missing"),
    Case("art-garbage-library", artifact(garbage("lib.so")), r"lib\.so"),
    Case("art-no-weights", artifact(rm("weights.safetensors")), r"weights\.safetensors is missing"),
    Case("art-weights-truncated", artifact(lambda a: truncate(a / "weights.safetensors", 0.7)), r"truncated"),
    Case("art-weights-sha-verify", artifact(manifest(lambda m: m["files"]["weights.safetensors"].update(
        sha256="0" * 64)), "--verify"), r"does not match the hash"),
    Case("art-library-sha-verify", artifact(manifest(lambda m: m["files"]["lib.so"].update(sha256="0" * 64)),
                                            "--verify"), r"lib\.so does not match the hash"),
    Case("art-weights-flipped-edge", artifact(lambda a: flip_byte(a / "weights.safetensors", -10)),
         r"does not match the hash"),
    Case("art-weights-flipped-header", artifact(lambda a: flip_byte(a / "weights.safetensors", 20)),
         r"does not match the hash|weights\.safetensors"),
    Case("art-weights-missing-tensor", artifact(consistent(rename_first_param)), r"lacks 1 tensor"),
    Case("art-weights-misshaped", artifact(consistent(reshape_first_param)), r"the code takes"),
    Case("art-weights-retyped", artifact(consistent(retype_first_param)), r"the code takes"),
    Case("art-weights-tampered-recorded", artifact(consistent(lambda a: truncate(a / "weights.safetensors", 0.7))),
         r"truncated"),
    Case("art-weights-header-garbage", artifact(lambda a: (a / "weights.safetensors").write_bytes(b"\xff" * 64)),
         r"weights\.safetensors"),
    Case("art-max-seq-raised", artifact(manifest(set_path(4096, "max_seq")), "--max-new-tokens", "200"),
         r"key max_seq differs from what the artifact was compiled with"),
    Case("art-bounds-raised", artifact(manifest(set_path(4096, "bounds", "SEQ"))), r"key bounds differs"),
    Case("art-buckets-added", artifact(manifest(set_path([8], "prefill_buckets"))), r"key prefill_buckets differs"),
    Case("art-weights-no-contract", artifact(consistent(art_weights(lambda h: h.__delitem__("__metadata__")))),
         r"weights\.safetensors records no manifest digest"),
    Case("art-files-size-lie", artifact(manifest(lambda m: m["files"]["lib.so"].update(bytes=1))), r"lib\.so has"),
]

OUTPUT_CASES = [
    Case("out-is-a-file", out_file, r"notes\.txt is a file"),
    Case("out-user-directory", out_user_dir, r"files rlx did not write"),
    Case("out-is-the-checkpoint", out_checkpoint, r"is the checkpoint"),
    Case("out-holds-the-checkpoint", out_checkpoint_parent, r"holding the checkpoint"),
    Case("out-is-the-gguf", out_gguf_file, r"is the checkpoint"),
    Case("out-under-a-file", out_under_file, r"is a file"),
    Case("out-symlink-to-user-dir", out_symlink_to_user_dir, r"files rlx did not write"),
    Case("out-unwritable", argv("compile", "{model}", "--out", "/proc/rlx-art"), r"cannot write"),
    Case("out-multi-target-file", out_multi_file, r"is a file"),
    Case("out-multi-target-user-subdir", out_multi_user_subdir, r"files rlx did not write"),
    Case("out-cache-unwritable", cache_under_file, r"compile cache", env={"RLX_CACHE_DIR": "{tmp}/cachefile/c"}),
    Case("compare-out-user-dir", compare_out_user_dir, r"files rlx did not write"),
    Case("logits-out-directory", logits_into_dir, r"is a directory"),
    Case("logits-out-under-file", logits_under_file, r"is a file"),
    Case("logits-out-unwritable", argv("run", "{art}", "--prompt-ids", "2", "--logits-out", "/proc/x.npy"),
         r"cannot write"),
]

CASES = CONFIG_CASES + SAFETENSORS_CASES + GGUF_CASES + PROFILE_CASES + FLAG_CASES + ARTIFACT_CASES + OUTPUT_CASES


def test_the_corpus_is_large_and_unique() -> None:
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES)


def error_message(err: str, paths: dict[str, Path]) -> str:
    """The `rlx: error:` message alone (not its `fix:` line, not the progress lines), with every
    path of the test's own (`paths`: placeholder -> path) written as its placeholder: the temp
    directories are named after the test case, so a pattern matched against them could pass
    because of the case's own name, not because the message names what is wrong."""
    message = err[err.index("rlx: error: "):].split("\n  fix: ")[0]
    for placeholder, path in sorted(paths.items(), key=lambda kv: -len(str(kv[1]))):
        for spelling in {str(path.resolve()), str(path)}:
            message = message.replace(spelling, placeholder)
    return message


def world_paths(w: World, tree: Path) -> dict[str, Path]:
    return {"{tmp}": tree, "{model}": w.hf, "{gguf}": w.gguf, "{art}": w.artifact, "{moe}": w.moe}


def check_case(case: Case, world: World, tree: Path, capsys: pytest.CaptureFixture[str],
               monkeypatch: pytest.MonkeyPatch) -> None:
    """Run one case in `tree` (the user's tree) and assert everything the module docstring lists."""
    monkeypatch.chdir(tree)  # default outputs (artifacts/, reports/) would land in the tree
    monkeypatch.setenv("RLX_CACHE_DIR", str(tree / "cache"))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.format(tmp=tree))
    args = case.make(world, tree)
    before = tree_digest(tree)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == case.code, err
    errors = [ln for ln in err.splitlines() if ln.startswith("rlx: error: ")]
    assert len(errors) == 1, err
    assert "\n  fix: " in err[err.index("rlx: error: "):], err
    assert "Traceback" not in err
    message = error_message(err, world_paths(world, tree))
    assert re.search(case.expect, message), f"{case.expect!r} not in the error message:\n{message}"
    assert tree_digest(tree) == before, "the user's files changed"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "user"
    tree.mkdir()
    check_case(case, world, tree, capsys, monkeypatch)


def test_a_pattern_naming_the_wrong_thing_fails(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: a pattern found only in the case's own paths (its temp directory, the
    checkpoint's), or only in the fix line, or naming another key, fails the case."""
    [case] = [c for c in CASES if c.id == "config-hidden-size-zero"]  # the error names hidden_size
    tree = tmp_path / "intermediate_size-rope_theta" / "user"
    tree.mkdir(parents=True)
    check_case(case, world, tree, capsys, monkeypatch)  # the real pattern passes
    for wrong in (r"intermediate_size", r"rope_theta", r"fix:", r"pytest|tiny-gemma3", r"num_attention_heads"):
        shutil.rmtree(tree)  # each run starts from an empty tree
        tree.mkdir()
        with pytest.raises(AssertionError, match="not in the error message"):
            check_case(Case(case.id, case.make, wrong), world, tree, capsys, monkeypatch)
