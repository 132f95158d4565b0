"""Target presets: every preset resolves to a TVM target, JSON dicts work, bad names say what exists."""

from __future__ import annotations

import pytest

from rlx.errors import RlxError
from rlx.targets.presets import PRESETS, resolve_target, split_targets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves(name: str) -> None:
    t = resolve_target(name)
    assert t.name == name and t.device == PRESETS[name].device
    assert t.local == (name == "cpu")


def test_preset_details() -> None:
    cpu = resolve_target("cpu").target
    assert cpu.kind.name == "llvm" and cpu.attrs["mcpu"] and int(cpu.attrs["num-cores"]) >= 1
    assert resolve_target("cpu-aarch64").target.attrs["mtriple"] == "aarch64-linux-gnu"
    assert resolve_target("cuda").target.attrs["arch"] == "sm_80"
    assert resolve_target("cuda-sm90").target.attrs["arch"] == "sm_90"
    metal = resolve_target("metal").target
    assert metal.kind.name == "metal" and metal.host.attrs["mtriple"] == "arm64-apple-macos"


def test_json_target_dict() -> None:
    t = resolve_target('{"kind": "llvm", "mcpu": "znver4", "num-cores": 2}')
    assert (t.device, t.local, t.target.attrs["mcpu"]) == ("cpu", True, "znver4")
    cross = resolve_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}')
    assert not cross.local
    gpu = resolve_target('{"kind": "cuda", "arch": "sm_89", "host": {"kind": "llvm"}}')
    assert gpu.device == "cuda" and gpu.target.host.kind.name == "llvm"


@pytest.mark.parametrize(("spec", "message"), [
    ("tpu", "unknown target 'tpu'"),
    ("{not json", "is not valid JSON"),
    ('{"mcpu": "znver4"}', 'must be an object with a "kind"'),
    ('{"kind": "vulkan"}', "target kind 'vulkan' is not supported"),
    ('{"kind": "llvm", "no-such-flag": 1}', "TVM rejects target"),
])
def test_bad_targets(spec: str, message: str) -> None:
    with pytest.raises(RlxError) as info:
        resolve_target(spec)
    assert message in info.value.message


def test_unknown_target_lists_presets() -> None:
    with pytest.raises(RlxError) as info:
        resolve_target("gpu")
    assert all(name in str(info.value.hint) for name in PRESETS)


def test_profile_backend_sections_cover_every_preset() -> None:
    """`[backend.<target>]` names are checked without importing TVM, so the list is kept by hand."""
    from rlx.targets.presets import PRESETS
    from rlx.targets.presets import PRESETS as TARGETS

    assert set(TARGETS) == set(PRESETS)


def test_target_lists_keep_a_json_target_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rlx compile --target` and `rlx.compile(target=...)` read one string the same way: presets
    split on commas, a JSON target dict (commas inside) is one target (the API once split it)."""
    import rlx.compiler.compile
    from rlx.api import compile as api_compile

    haswell = '{"kind": "llvm", "mcpu": "haswell"}'
    assert split_targets(" cpu, cuda ,") == ["cpu", "cuda"]
    assert split_targets(haswell) == [haswell]
    seen: list[list[str]] = []
    monkeypatch.setattr(rlx.compiler.compile, "compile_checkpoint", lambda ckpt, targets, *a, **k: seen.append(targets))
    api_compile("model", haswell)
    api_compile("model", "cpu,cuda")
    assert seen == [[haswell], ["cpu", "cuda"]]
