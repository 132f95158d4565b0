"""`rlx.gemma`, the rlx-gemma crate's builder API: one test per crate item of the README's
"Porting from rlx-gemma" table, on a tiny Gemma 3 and a tiny Gemma 4.

The references are transformers (logits, and the hidden states its hooks see) and today's path
(`rlx.frontends.flow.GemmaFlow` run by the interpreter, the reference engine, `rlx inspect`),
never the code under test's own output.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from rlx import gemma
from rlx.cli import main as cli_main
from rlx.compiler.engines import reference_engine
from rlx.compiler.graphs import run_pipeline
from rlx.compiler.profile import PRESETS
from rlx.errors import FlowError, ProfileError, WeightError
from rlx.frontends.flow import GemmaFlow as PlainFlow
from rlx.frontends.weights import WeightCache
from rlx.hir.interpreter import Interpreter
from rlx.hir.ops import Op
from rlx.hir.shapes import BATCH, sym
from rlx.hir.text import print_hir
from tests.fixtures.tiny import HFReference, decoder_of, hf_reference, load_hf

Ckpt = Callable[[str], Path]
FAMILIES = ["gemma3", "gemma4"]
PROMPT = [2, 17, 99, 5, 42, 200, 7, 63, 128, 11]  # longer than the tiny sliding window (4)
N = len(PROMPT)
FEEDS = {"input_ids": np.asarray([PROMPT]), "positions": np.arange(N)[None]}
# a profile whose [[layers]] patch and pipeline both change the graph
PROFILE_TOML = '[fusion]\npolicy = "fusable"\n\n[passes]\ncse = false\n\n[[layers]]\nindex = 0\nwindow = 2\n'


def close(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-4) -> None:
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


@cache
def hf(d: Path) -> HFReference:
    return hf_reference(d, PROMPT, 1)


def today_prefill(ckpt: gemma.Checkpoint, make: Callable[[PlainFlow], PlainFlow] = lambda f: f,
                  ids: list[int] = PROMPT) -> dict:
    """Today's path: the frontends' flow, built and run by the interpreter on the store."""
    hir = make(PlainFlow(ckpt.config, ckpt.weights).prefill(N)).build()
    return Interpreter(hir, WeightCache(ckpt.weights)).run({"input_ids": np.asarray([ids]),
                                                            "positions": np.arange(N)[None]})


def decode_feeds(prefill_out: dict, token: int) -> dict:
    """The next step's feeds: the prefill's `present_*` K/V as `past_*`."""
    past = {k.replace("present_", "past_"): v for k, v in prefill_out.items() if k.startswith("present_")}
    return {"input_ids": np.asarray([[token]]), "positions": np.asarray([[N]]), **past}


def hf_with_hooks(d: Path, before: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  after: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """transformers' prefill logits [S, V] with `before` applied to layer 0's input and `after` to
    the final norm's input, and that input as the norm saw it (the final hidden state)."""
    model = load_hf(d)
    dec = decoder_of(model)
    seen: list[torch.Tensor] = []

    def rewrite(fn: Callable[[torch.Tensor], torch.Tensor] | None, record: bool) -> Callable:
        def hook(_module: torch.nn.Module, args: tuple) -> tuple:
            h = fn(args[0]) if fn is not None else args[0]
            if record:
                seen.append(h.detach())
            return (h, *args[1:])
        return hook

    dec.layers[0].register_forward_pre_hook(rewrite(before, False))
    dec.norm.register_forward_pre_hook(rewrite(after, True))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT]), use_cache=False).logits[0]
    return logits.float().numpy(), seen[0][0].float().numpy()


def torch_rms(eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ---- the module ----

CRATE_ITEMS = ["GemmaFlow", "GemmaConfig", "open_checkpoint", "GemmaPrefillOpts", "GemmaDecodeOpts",
               "build_gemma_prefill_flow", "build_gemma_prefill_built", "build_gemma_decode_flow",
               "build_gemma_decode_graph", "build_gemma_decode_built", "BuiltModel", "LayerContext", "FlowStage",
               "CompileProfile", "gemma_profile_near_weights", "GEMMA_PROFILE_FILE"]


def test_rlx_gemma_exports_every_crate_item() -> None:
    missing = [name for name in CRATE_ITEMS if not hasattr(gemma, name)]
    assert not missing
    assert set(CRATE_ITEMS) <= set(gemma.__all__)
    assert gemma.CompileProfile is gemma.Profile and gemma.GEMMA_PROFILE_FILE == "gemma.rlx.toml"
    assert issubclass(gemma.GemmaFlow, PlainFlow)


def test_open_checkpoint_gives_config_and_weights(tiny_ckpt: Ckpt) -> None:
    ckpt = gemma.open_checkpoint(tiny_ckpt("gemma3"))
    assert isinstance(ckpt.config, gemma.GemmaConfig) and ckpt.config.num_layers == 4
    assert ckpt.weights.shape("embed_tokens.weight") == (256, 64)


# ---- GemmaFlow.for_prefill / for_decode / build ----

@pytest.mark.parametrize("family", FAMILIES)
def test_for_prefill_build_runs_like_today_and_transformers(family: str, tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt(family)
    ckpt = gemma.open_checkpoint(d)
    built = gemma.GemmaFlow.for_prefill(ckpt.config, 1, N).build(ckpt.weights)
    assert isinstance(built, gemma.BuiltModel) and built.report is not None and built.report.records
    assert built.hir != PlainFlow(ckpt.config, ckpt.weights).prefill(N).build()  # the preset's passes ran
    logits = built.run(FEEDS)["logits"][0]
    close(logits, today_prefill(ckpt)["logits"][0], 1e-5)
    close(logits, hf(d).prefill_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_for_decode_exports_kv_and_steps_like_today_and_transformers(family: str, tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt(family)
    ckpt = gemma.open_checkpoint(d)
    ref = hf(d)
    prefill = gemma.GemmaFlow.for_prefill(ckpt.config, 1, N).export_kv().build(ckpt.weights).run(FEEDS)
    step = gemma.GemmaFlow.for_decode(ckpt.config, 1, N).build(ckpt.weights)
    layers = range(ckpt.config.num_layers)
    assert {f"present_{kv}.{i}" for kv in "kv" for i in layers} <= set(step.hir.outputs)  # K/V by default
    logits = step.run(decode_feeds(prefill, ref.tokens[0]))["logits"][0, -1]
    engine = reference_engine(ckpt)
    engine.prefill(PROMPT)
    close(logits, engine.step(ref.tokens[0]), 1e-5)
    close(logits, ref.logits[1])


def test_decode_exports_kv_by_default_and_prefill_does_not(tiny_ckpt: Ckpt) -> None:
    ckpt = gemma.open_checkpoint(tiny_ckpt("gemma3"))
    flow = PlainFlow(ckpt.config, ckpt.weights)
    assert "present_k.0" in flow.decode().build().outputs
    assert "present_k.0" not in flow.decode().export_kv(False).build().outputs
    assert "present_k.0" not in flow.prefill().build().outputs
    assert "present_k.0" in flow.prefill().export_kv().build().outputs


# ---- BuiltModel ----

def test_built_model_weights_parts_and_extra_outputs(tiny_ckpt: Ckpt) -> None:
    ckpt = gemma.open_checkpoint(tiny_ckpt("gemma3"))
    reads: list[str] = []

    def loader(name: str) -> np.ndarray:
        reads.append(name)
        return ckpt.weights.get(name)

    built = gemma.GemmaFlow.for_prefill(ckpt.config, 1, N).build(loader)
    params = {n.attr("name") for n in built.hir.nodes_of(Op.PARAM)}
    assert set(built.weights) == params and not reads  # a lazy view: nothing read yet
    hir, arrays = built.into_parts()
    assert hir is built.hir and set(arrays) == params and sorted(reads) == sorted(params)
    np.testing.assert_array_equal(arrays["norm.weight"], ckpt.weights.get("norm.weight"))
    embed = next(n.id for n in built.hir.nodes_of(Op.EMBED))
    more = built.with_extra_outputs({"embedded": embed})
    assert "embedded" not in built.hir.outputs  # a copy: the original keeps its outputs
    out = more.run(FEEDS)
    np.testing.assert_array_equal(out["embedded"][0], ckpt.weights.get("embed_tokens.weight")[PROMPT])
    close(out["logits"], built.run(FEEDS)["logits"], 1e-6)


def test_build_needs_weights(tiny_ckpt: Ckpt) -> None:
    ckpt = gemma.open_checkpoint(tiny_ckpt("gemma3"))
    with pytest.raises(FlowError, match="build\\(\\) needs the model's weights"):
        gemma.GemmaFlow.for_prefill(ckpt.config, 1, N).build()
    with pytest.raises(WeightError, match="got Checkpoint"):
        gemma.GemmaFlow.for_prefill(ckpt.config, 1, N).build(ckpt)  # type: ignore[arg-type]
    built = gemma.GemmaFlow(ckpt.config, ckpt.weights).prefill(N).build()  # the store the flow was made with
    assert built.hir.outputs.keys() == {"logits"}


# ---- the one-call builders and their options ----

@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_opts_builders(family: str, tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt(family)
    ckpt = gemma.open_checkpoint(d)
    ref = hf(d)
    opts = gemma.GemmaPrefillOpts.static_prefill(1, N)
    assert opts == gemma.GemmaPrefillOpts(batch=1, seq=N, dynamic_seq=False, prefill_hidden=False,
                                          media_attn_bias=False, with_lm_head=False, with_kv_outputs=False,
                                          last_logits_only=False, profile=None)
    hidden = gemma.build_gemma_prefill_built(ckpt.config, ckpt.weights, opts)  # the crate's default: no LM head
    assert set(hidden.hir.outputs) == {"hidden"}
    close(hidden.run(FEEDS)["hidden"][0], ref.hidden_last)
    last = replace(opts, last_logits_only=True, with_kv_outputs=True)
    hir, arrays = gemma.build_gemma_prefill_flow(ckpt.config, ckpt.weights, last)
    out = Interpreter(hir, arrays).run(FEEDS)
    assert out["logits"].shape == (1, 1, ckpt.config.vocab_size) and "present_k.0" in out
    close(out["logits"][0, -1], ref.logits[0])
    dynamic = gemma.build_gemma_prefill_built(ckpt.config, ckpt.weights, replace(opts, dynamic_seq=True,
                                                                                   with_lm_head=True))
    close(dynamic.run(FEEDS)["logits"][0], ref.prefill_logits)


def test_prefill_hidden_and_media_bias_opts(tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt("gemma3")
    ckpt = gemma.open_checkpoint(d)
    opts = gemma.GemmaPrefillOpts(1, N, with_lm_head=True, prefill_hidden=True)
    embeds = ckpt.weights.get("embed_tokens.weight")[PROMPT] * np.float32(ckpt.config.hidden_size ** 0.5)
    built = gemma.build_gemma_prefill_built(ckpt.config, ckpt.weights, opts)
    assert set(built.hir.inputs) == {"inputs_embeds", "positions"}
    close(built.run({"inputs_embeds": embeds[None], "positions": FEEDS["positions"]})["logits"][0],
          hf(d).prefill_logits)
    media = gemma.build_gemma_prefill_built(ckpt.config, ckpt.weights, replace(opts, media_attn_bias=True))
    assert media.hir.inputs["media_attn_bias"].type.shape == (1, 1, N, N)
    crate_name = gemma.GemmaFlow(ckpt.config, ckpt.weights).prefill(N).prefill_media_attn_bias()
    assert crate_name.build_hir() == gemma.GemmaFlow(ckpt.config, ckpt.weights).prefill(N).media_attn_bias().build_hir()


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_opts_builders(family: str, tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt(family)
    ckpt = gemma.open_checkpoint(d)
    ref = hf(d)
    prefill = today_prefill(ckpt, lambda f: f.export_kv())
    feeds = decode_feeds(prefill, ref.tokens[0])
    opts = gemma.GemmaDecodeOpts(batch=1, past_seq=N, dynamic_past=False, use_custom_mask=False, profile=None)
    built = gemma.build_gemma_decode_built(ckpt.config, ckpt.weights, opts)
    close(built.run(feeds)["logits"][0, -1], ref.logits[1])
    hir, arrays = gemma.build_gemma_decode_flow(ckpt.config, ckpt.weights, replace(opts, dynamic_past=True))
    assert "PAST_SEQ" in str(hir.inputs["past_k.0"].type)
    close(Interpreter(hir, arrays).run(feeds)["logits"][0, -1], ref.logits[1])
    masked = gemma.build_gemma_decode_built(ckpt.config, ckpt.weights, replace(opts, use_custom_mask=True))
    assert "attn_mask" in masked.hir.inputs


def test_build_gemma_decode_graph_lowers_the_step(tiny_ckpt: Ckpt) -> None:
    ckpt = gemma.open_checkpoint(tiny_ckpt("gemma3"))
    opts = gemma.GemmaDecodeOpts(1, N, dynamic_past=True)
    lowered, arrays = gemma.build_gemma_decode_graph(ckpt.config, ckpt.weights, opts)
    hir, expected = gemma.build_gemma_decode_flow(ckpt.config, ckpt.weights, opts)
    sig = lowered.signatures["decode"]
    assert "decode" in [gv.name_hint for gv in lowered.mod.functions]
    assert set(sig.outputs) == set(hir.outputs) and {"input_ids", "positions"} <= {n for n, _ in sig.inputs}
    assert set(arrays) == set(expected)


# ---- profiles on the builder ----

@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_profile_on_the_builder_equals_the_cli(mode: str, tiny_ckpt: Ckpt, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`.profile(p)` changes the built graph exactly as `rlx inspect --profile FILE` does."""
    d = tiny_ckpt("gemma3")
    path = tmp_path / gemma.GEMMA_PROFILE_FILE
    path.write_text(PROFILE_TOML)
    assert cli_main(["inspect", str(d), "--mode", mode, "--profile", str(path)]) == 0
    cli_text = "".join(ln for ln in capsys.readouterr().out.splitlines(keepends=True) if not ln.startswith("#"))
    ckpt = gemma.open_checkpoint(d)
    flow = gemma.GemmaFlow(ckpt.config, ckpt.weights).last_token_logits().export_kv()
    flow = flow.prefill().dynamic_seq() if mode == "prefill" else flow.decode().dynamic_past()
    profile = gemma.gemma_profile_near_weights(path, mode == "decode")
    assert profile.source == str(path)
    assert print_hir(flow.profile(profile).build().hir) == cli_text
    assert print_hir(flow.profile_near(tmp_path / "model.gguf").build().hir) == cli_text  # the file beside it
    assert print_hir(flow.build().hir) != cli_text  # the profile did change the graph


def test_profile_presets_and_lookup(tiny_ckpt: Ckpt, tmp_path: Path) -> None:
    ckpt = gemma.open_checkpoint(tiny_ckpt("gemma3"))
    weights = tmp_path / "model.safetensors"
    assert gemma.gemma_profile_near_weights(weights, decode=True).source == "gemma_decode"
    assert gemma.gemma_profile_near_weights(tmp_path, decode=False).source == "gemma_prefill"
    flow = gemma.GemmaFlow(ckpt.config, ckpt.weights).prefill(N)
    assert flow.chosen_profile.source == "gemma_prefill"  # no profile: the mode's preset, as in the crate
    assert flow.decode().profile_near(weights).chosen_profile.source == "gemma_decode"
    raw = flow.build_hir()
    for preset, chosen in (("gemma_prefill", flow.profile_prefill()), ("gemma_decode", flow.profile_decode())):
        assert chosen.chosen_profile.source == preset
        expected, _ = run_pipeline(raw, "prefill", PRESETS[preset], config=ckpt.config)
        assert chosen.build().hir == expected
    (tmp_path / gemma.GEMMA_PROFILE_FILE).write_text("[fusion]\npolcy = 'direct'\n")
    with pytest.raises(ProfileError, match="unknown key"):  # rlx is strict where the crate falls back
        flow.profile_near(weights)


# ---- stages ----

@pytest.mark.parametrize("family", FAMILIES)
def test_before_layers_runs_stages_in_order(family: str, tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt(family)
    ckpt = gemma.open_checkpoint(d)
    eps = ckpt.config.rms_norm_eps
    flow = gemma.GemmaFlow(ckpt.config, ckpt.weights).prefill(N)
    ours = flow.before_layers([gemma.rms_norm(), gemma.scale(3.0)]).build().run(FEEDS)["logits"][0]
    ref, _ = hf_with_hooks(d, before=lambda h: 3.0 * torch_rms(eps)(h))
    close(ours, ref)
    swapped = flow.before_layers([gemma.scale(3.0), gemma.rms_norm()]).build().run(FEEDS)["logits"][0]
    assert not np.allclose(swapped, ours, atol=1e-2)
    chained = flow.before_layers(gemma.rms_norm()).before_layers(gemma.stock("scale", 3.0))  # one at a time
    close(chained.build().run(FEEDS)["logits"][0], ours, 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_after_layers_and_patch_flow_see_the_final_hidden_state(family: str, tiny_ckpt: Ckpt) -> None:
    """`after_layers` stages act on the stack's output before the final norm; `patch_flow` runs after
    them and sees what the final norm reads (transformers' norm input, here after the same stages)."""
    d = tiny_ckpt(family)
    ckpt = gemma.open_checkpoint(d)
    seen: list[str] = []

    def expose(ctx: gemma.LayerContext, h: str) -> None:
        seen.append(h)
        ctx.hir.set_output("final_hidden", h)  # adds an output, keeps h

    def halve(ctx: gemma.LayerContext, h: str) -> str:
        return ctx.builder.op(Op.SCALE, h, name="halve", value=0.5)

    flow = gemma.GemmaFlow(ckpt.config, ckpt.weights).prefill(N)
    out = flow.patch_flow(expose).after_layers([gemma.softcap(20.0), halve]).build().run(FEEDS)
    ref_logits, ref_hidden = hf_with_hooks(d, after=lambda h: 20.0 * torch.tanh(h / 20.0) * 0.5)
    close(out["final_hidden"][0], ref_hidden)
    close(out["logits"][0], ref_logits)
    assert len(seen) == 1
    plain = flow.patch_flow(expose).build().run(FEEDS)
    close(plain["logits"][0], hf(d).prefill_logits)
    _, stack_out = hf_with_hooks(d)
    close(plain["final_hidden"][0], stack_out)
    zeroed = flow.patch_flow(lambda ctx, h: ctx.builder.op(Op.SCALE, h, name="zero", value=0.0)).build()
    logits = zeroed.run(FEEDS)["logits"][0]  # the patch's value reaches the head: every row the same
    close(logits, np.broadcast_to(logits[:1], logits.shape), 1e-6)


def test_patch_graph_keeps_the_whole_graph_hook(tiny_ckpt: Ckpt) -> None:
    ckpt = gemma.open_checkpoint(tiny_ckpt("gemma3"))
    flow = PlainFlow(ckpt.config, ckpt.weights).prefill(N)
    hir = flow.patch_graph(lambda g: g.set_output("embedded", "embed")).build()
    assert set(hir.outputs) == {"logits", "embedded"}


def test_stage_values(tiny_ckpt: Ckpt) -> None:
    ckpt = gemma.open_checkpoint(tiny_ckpt("gemma3"))
    flow = gemma.GemmaFlow(ckpt.config, ckpt.weights).prefill(N)

    def double(ctx: gemma.LayerContext, h: str) -> str:
        return ctx.builder.op(Op.SCALE, h, name="double", value=2.0)

    custom = gemma.FlowStage.custom(double)
    assert custom.name == "double" and custom.named("x2").name == "x2"
    assert gemma.stock("scale", 2.0).name == "scale(2.0)" and gemma.stock("identity") is gemma.IDENTITY
    assert set(gemma.STOCK) == {"identity", "scale", "rms_norm", "softcap"}
    assert flow.before_layers([gemma.IDENTITY]).build_hir() == flow.build_hir()
    mixed = flow.before_layers([custom, gemma.stock("scale", 0.5)]).build_hir()  # values and functions mix
    assert {n.attr("value") for n in mixed.nodes_of(Op.SCALE) if n.id.startswith(("double", "stage"))} == {2.0, 0.5}
    with pytest.raises(FlowError, match="no stock stage named 'scal'"):
        gemma.stock("scal")
    with pytest.raises(FlowError, match="'identity' is not callable"):
        flow.before_layers("identity")  # type: ignore[arg-type]
    with pytest.raises(FlowError, match="is not callable"):
        flow.after_layers([gemma.IDENTITY, 3])  # type: ignore[list-item]


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_context_tells_a_stage_its_attention_and_eps(family: str, tiny_ckpt: Ckpt) -> None:
    ckpt = gemma.open_checkpoint(tiny_ckpt(family))
    cfg = ckpt.config
    seen: dict[int, tuple[gemma.AttentionSpec, float]] = {}

    def record(ctx: gemma.LayerContext) -> None:
        seen[ctx.index] = ctx.attention, ctx.eps

    overrides = gemma.LayerOverrides(window=2, rope_theta=5e4)
    gemma.GemmaFlow(cfg, ckpt.weights).override_layers(lambda i, t: i == 0, overrides).layer(record).build_hir()
    assert sorted(seen) == list(range(cfg.num_layers))
    for i, (att, eps) in seen.items():
        assert eps == cfg.rms_norm_eps == 1e-6
        assert (att.heads, att.kv_heads, att.head_dim) == (4, cfg.layer_kv_heads(i), cfg.layer_head_dim(i))
        assert att.window == (2 if i == 0 else cfg.window(i) or 0)
        assert att.rope.theta == (5e4 if i == 0 else {0: 1e4, 1: 1e6}[i % 2])
    assert [seen[i][0].window for i in (1, 2, 3)] == [0, 4, 0]  # full, sliding, full
    with pytest.raises(FlowError, match="outside the layer stack"):
        gemma.GemmaFlow(cfg, ckpt.weights).before_layers(lambda ctx, h: (ctx.attention, h)[1]).build_hir()
    if family == "gemma4":  # full layers: their own head dim, one kv head, proportional RoPE, no score scale
        assert (seen[1][0].head_dim, seen[1][0].kv_heads, seen[1][0].rope.kind) == (32, 1, "proportional")
        assert seen[1][0].score_scale == 1.0
    else:
        assert seen[1][0].score_scale == pytest.approx(24 ** -0.5)


def test_dynamic_batch_runs_any_batch(tiny_ckpt: Ckpt) -> None:
    d = tiny_ckpt("gemma3")
    ckpt = gemma.open_checkpoint(d)
    built = gemma.GemmaFlow.for_prefill(ckpt.config, 1, N).dynamic_batch().build(ckpt.weights)
    assert built.hir.inputs["input_ids"].type.shape[0] == sym(BATCH)
    other = list(reversed(PROMPT))
    out = built.run({"input_ids": np.asarray([PROMPT, other]), "positions": np.tile(np.arange(N), (2, 1))})
    assert out["logits"].shape == (2, N, ckpt.config.vocab_size)
    close(out["logits"][0], hf(d).prefill_logits)
    close(out["logits"][1], today_prefill(ckpt, ids=other)["logits"][0], 1e-5)


# ---- the README's porting table ----

README = Path(__file__).resolve().parents[1] / "README.md"


def porting_examples() -> list[str]:
    """The example column of the README's "Porting from rlx-gemma" table."""
    text = README.read_text().split("## Porting from rlx-gemma", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    return [re.split(r"(?<!\\)\|", row)[3].strip().strip("`") for row in rows]


def test_readme_porting_examples_run(tiny_ckpt: Ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = porting_examples()
    assert len(examples) >= 20
    d = tiny_ckpt("gemma3")
    monkeypatch.chdir(tmp_path)  # relative weight paths in the examples have no profile beside them
    ckpt = gemma.open_checkpoint(d)
    cfg, store = ckpt.config, ckpt.weights
    flow = gemma.GemmaFlow(cfg, store).prefill(N)
    scope = {"gemma": gemma, "GemmaFlow": gemma.GemmaFlow, "replace": replace, "cfg": cfg, "store": store,
             "flow": flow, "built": flow.build(), "ids": FEEDS["input_ids"], "pos": FEEDS["positions"],
             "opts": gemma.GemmaPrefillOpts.static_prefill(1, N), "dopts": gemma.GemmaDecodeOpts(1, N)}
    for example in examples:
        code = example.replace('"gemma-3-270m/"', repr(str(d)))
        try:
            result = eval(compile(code, "README", "eval"), scope)  # an expression
        except SyntaxError:
            exec(code, scope)  # an assignment
            continue
        if isinstance(result, gemma.GemmaFlow):
            result.build_hir()  # a flow example must also build
