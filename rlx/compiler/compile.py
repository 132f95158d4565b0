"""`rlx compile`: checkpoint -> artifact directory, per target, in named phases.

Phases (`PHASES`; each timed, shown as progress, recorded in report.json): graphs (HIR + passes),
lower, build, export (library), weights (materialised in the kernels' layout), hash. report.json
also holds each pass's report, the kernels and their schedules, and the weights: each one's
format (q8_0, q4_k, f32...) and bytes, and the bytes one decode step reads
(`rlx.compiler.summary.weight_report`). The whole artifact is written by `write_artifact` (through
`rlx.outputs.replace_dir_atomic`): a failed or interrupted compile leaves nothing at the
destination.

A compile cache (`$RLX_CACHE_DIR`, default `~/.cache/rlx/artifacts`) is keyed by model hash,
profile, pass pipeline, target, max-seq, tool versions and report.json's version: a repeated
compile copies the cached artifact instead of building again. A miss builds into the cache and
copies out like a hit, so the cache only ever holds its own key's build; many processes may hit,
fill and write one `--out` at once (`rlx.outputs` locks the swaps, readers copy under a shared lock).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import rlx.progress as progress
from rlx.digests import source_digest
from rlx.errors import RlxError
from rlx.outputs import OutputError, check_writable, dir_lock, guard_dir_output, replace_dir_atomic
from rlx.runtime.artifact import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ArtifactError,
    contract_metadata,
    file_record,
    is_artifact_dir,
    read_manifest,
    tool_versions,
    verify_files,
)

LIBRARY = {"cpu": "lib.so", "cuda": "lib.so", "metal": "lib.tar"}
CROSS_LIBRARY = "lib.tar"  # a CPU module for another machine: its objects, linked on that machine
WEIGHTS = "weights.safetensors"
# report.json's contents (not read back by the runtime): in the cache key, so a cached artifact
# whose report predates a field (2: `weights`) is compiled again rather than copied
REPORT_VERSION = 2


def cache_root() -> Path:
    return Path(os.environ.get("RLX_CACHE_DIR", Path.home() / ".cache" / "rlx")) / "artifacts"


# the phases of one target's compile, in order (a Metal build has no export: its library is
# written by the build, in a child process); report.json's `phases` holds their timings
PHASES = ("graphs", "lower", "build", "export", "weights", "hash")


@dataclass
class Phases:
    """Phase timings, shown as progress (`rlx.progress`) as they start and finish."""

    target: str
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"compile phase {name!r} is not in PHASES {PHASES}")
        progress.say(f"{self.target}: {name} ...")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        progress.say(f"{self.target}: {name} done in {self.seconds[name]:.2f} s")


def _signature_dict(sig: Any) -> dict[str, Any]:
    return {"function": sig.function, "inputs": [[n, str(t)] for n, t in sig.inputs],
            "caches": [[n, str(t)] for n, t in sig.caches], "dims": list(sig.dims),
            "params": [[p.key, str(p.physical)] for p in sig.params], "outputs": list(sig.outputs)}


def write_artifact(dest: Path, populate: Callable[[Path], dict[str, Any]], protect: Sequence[str | Path] = ()) -> Path:
    """`populate(tmp)` fills a temp dir and returns the manifest; then it becomes `dest` (which
    may be new, empty or an earlier artifact, never anything else: `rlx.outputs`)."""
    def fill(tmp: Path) -> None:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **populate(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))

    return replace_dir_atomic(dest, fill, owned=is_artifact_dir, what="--out", protect=protect)


def _cache_key(model_hash: str, profile: Any, passes: str | None, target: dict[str, Any], max_seq: int,
               serve: bool = True) -> str:
    blob = json.dumps({"model": model_hash, "profile": repr(profile), "passes": passes, "target": target,
                       "max_seq": max_seq, "versions": tool_versions(), "format": FORMAT_VERSION,
                       "report": REPORT_VERSION, "paged": _paged_entries() if serve else None,
                       "source": source_digest()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _kernels(scheduled: Any) -> list[dict[str, str]]:
    from tvm import tirx

    from rlx.targets.schedules import schedule_report, schedule_skipped

    rules, skipped = schedule_report(scheduled), schedule_skipped(scheduled)
    return [{"name": gv.name_hint, "schedule": rules.get(gv.name_hint, "none"),
             **({"skipped": skipped[gv.name_hint]} if gv.name_hint in skipped else {})}
            for gv, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]


def _populate(tmp: Path, checkpoint: Any, resolved: Any, profile: Any, passes: str | None, max_seq: int,
              phases: Phases, serve: bool = True) -> dict[str, Any]:
    """The artifact's files in `tmp`, and its manifest. `serve`: with the paged step entries
    `rlx serve` runs (about 40% of a compile's time and of the library)."""
    from rlx.compiler.graphs import context_bounds, paged_graphs, target_graphs
    from rlx.compiler.summary import weight_report
    from rlx.frontends.weights import WeightCache
    from rlx.hir.text import print_hir
    from rlx.runtime.paged_engine import STEP
    from rlx.targets.build import build, build_isolated, schedule_module
    from rlx.targets.lower import lower_for, param_keys, weight_readers

    with phases("graphs"):
        bounds = context_bounds(max_seq)
        graphs = target_graphs(checkpoint, target=resolved.name, profile=profile, passes=passes, bounds=bounds,
                               max_seq=max_seq)
        paged = paged_graphs(checkpoint, target=resolved.name, profile=profile, passes=passes,
                             max_seq=max_seq) if serve else None
        stages = {m: (graphs.built[m], h) for m, h in graphs.graphs.items()}
        if paged is not None:
            stages[STEP] = (paged.built, paged.graph)
        (tmp / "hir").mkdir()
        for mode, (before, after) in stages.items():
            (tmp / "hir" / f"{mode}.before.hir").write_text(print_hir(before))
            (tmp / "hir" / f"{mode}.after.hir").write_text(print_hir(after))
    entries = {**graphs.entries, **(paged.entries if paged is not None else {})}
    backend = graphs.backend
    with phases("lower"):
        lowered = lower_for(entries, resolved)
    library = LIBRARY[resolved.device] if resolved.local or resolved.device != "cpu" else CROSS_LIBRARY
    with phases("build"):
        if resolved.device == "metal":
            build_isolated(entries, resolved.name, tmp / library, opt_level=backend.opt_level)
            scheduled = schedule_module(lowered.mod, resolved)
        else:
            built = build(lowered.mod, resolved, opt_level=backend.opt_level)
            scheduled = built.scheduled
    if resolved.device != "metal":
        with phases("export"):
            built.executable.export_library(str(tmp / library))
            if resolved.device == "cuda":
                (tmp / "kernels.cu").write_text(_cuda_source(built.executable.mod))
    specs = param_keys(list(lowered.signatures.values()))
    manifest = {
        "versions": tool_versions(),
        "model_hash": checkpoint.model_hash(),
        "checkpoint": str(checkpoint.path),
        "config": checkpoint.config.to_dict(),
        "profile": repr(profile) if profile is not None else None,
        "passes": graphs.passes,
        "quantize": {**dataclasses.asdict(profile.quantize),
                     "tensors": {key: spec.type.quant for key, spec in sorted(specs.items())
                                 if spec.type.is_quantized}},
        "target": {"name": resolved.name, "device": resolved.device, "local": resolved.local,
                   "json": str(resolved.target.export())},
        "entries": {name: _signature_dict(sig) for name, sig in lowered.signatures.items()},
        "layouts": {key: spec.layout for key, spec in sorted(specs.items())},
        "bounds": {**bounds, "KV_CAP": max_seq},
        "prefill_buckets": list(graphs.buckets),
        "paged": paged_manifest(paged) if paged is not None else None,
        "backend": {"opt_level": backend.opt_level, "threads": backend.threads},
        "max_seq": max_seq,
        "library": library,
        "weights": WEIGHTS,
    }
    with phases("weights"):
        save_weights_streaming(tmp / WEIGHTS, specs, WeightCache(checkpoint.weights), contract_metadata(manifest))
    report = {
        "target": resolved.name,
        "passes": {mode: rep.to_dict() for mode, rep in graphs.reports.items()},
        "kernels": _kernels(scheduled),
        "phases": phases.seconds,
        "weights": weight_report(specs, {p.key for p in lowered.signatures["decode"].params},
                                 weight_readers(graphs.graphs["decode"]), dataclasses.asdict(profile.quantize)),
    }
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    _save_tokenizer(checkpoint, tmp)
    with phases("hash"):
        files = {name: file_record(tmp / name) for name in (library, WEIGHTS)}
    return {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "files": files, **manifest}


def _paged_entries() -> dict[str, Any]:
    """The paged step entries artifacts hold (manifest "paged"), for the cache key: a cached
    artifact built with other ones is compiled again."""
    from rlx.compiler.graphs import DEFAULT_STEP_BUCKETS
    from rlx.frontends.paged import DEFAULT_PAGE_SIZE

    return {"page_size": DEFAULT_PAGE_SIZE, "buckets": DEFAULT_STEP_BUCKETS}


def paged_manifest(paged: Any) -> dict[str, Any]:
    """What `ArtifactEngine.paged_model` needs of the step entries: the page size, the page table's
    width (positions up to page_size * max_pages), the entries (`step`, `step_<b>` per static
    bucket) and the pools."""
    from rlx.runtime.paged_engine import paged_layout_of

    layout = paged_layout_of(paged.graph)
    return {"page_size": layout.page_size, "max_pages": layout.max_pages, "buckets": sorted(paged.variants),
            "entries": list(paged.entries), "pools": [p.to_json() for p in layout.pools]}


def save_weights_streaming(path: Path, specs: dict[str, Any], cache: Any, metadata: dict[str, str]) -> None:
    """The artifact's weights file, one param at a time; every stored tensor leaves the cache
    after its last use, so compile never holds the weights twice. `metadata`: the header's
    `__metadata__` (the manifest contract, `rlx.runtime.artifact.contract_metadata`)."""
    from rlx.frontends.safetensors_file import write_streaming

    keys = sorted(specs)
    uses: dict[str, int] = {}
    for key in keys:
        for name in specs[key].stored:
            uses[name] = uses.get(name, 0) + 1

    def produce(key: str) -> Any:
        value = specs[key].materialize(cache)
        for name in specs[key].stored:
            uses[name] -= 1
            if not uses[name]:
                cache.release(name)
        return value

    entries = [(k, str(specs[k].physical.dtype.numpy), [int(d) for d in specs[k].physical.shape]) for k in keys]
    try:
        write_streaming(path, entries, produce, metadata)
    except ValueError as e:
        raise RlxError(f"weights file {path.name}: {e}", hint="this is a bug in rlx: please report it") from None


def _save_tokenizer(checkpoint: Any, out: Path) -> None:
    """The artifact carries the tokenizer (a GGUF's is rebuilt into tokenizer.json), so it runs alone."""
    from rlx.runtime.tokenizer import Tokenizer

    try:
        Tokenizer.from_checkpoint(checkpoint).save(out)
    except RlxError:
        progress.say("no tokenizer in the checkpoint: the artifact runs with --prompt-ids")


def _cuda_source(module: Any) -> str:
    stack = [module]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            return m.inspect_source()
        stack.extend(m.imports)
    raise RlxError("the CUDA build holds no CUDA module", hint="check that nvcc is installed and on PATH")


def compile_checkpoint(checkpoint_path: str | Path, targets: list[str], out: str | Path | None = None, *,
                       profile: str | None = None, passes: str | None = None, max_seq: int | None = None,
                       use_cache: bool = True, quantize: str | None = None, serve: bool = True) -> list[Path]:
    """Compile for each target; returns the artifact directories (out/<target> when several);
    `serve=False` leaves out the paged step entries only `rlx serve` runs (`--no-serve`).
    Everything that can be checked before the work starts is: the targets, the profile, the
    checkpoint, --max-seq, and every output path (safe to replace, writable), the cache too."""
    from rlx.compiler.profile_toml import resolve_profile
    from rlx.frontends.checkpoint import open_checkpoint
    from rlx.targets.presets import resolve_target

    if not targets:
        raise RlxError("no target given", hint="e.g. --target cpu (presets: cpu, cpu-aarch64, cuda, cuda-sm90, metal)")
    resolved = [resolve_target(t) for t in targets]  # unknown targets fail before any work
    names = [r.name for r in resolved]
    if len(set(names)) != len(names):
        raise RlxError(f"--target lists {', '.join(sorted({n for n in names if names.count(n) > 1}))} twice",
                       hint="name each target once")
    prof = resolve_profile(profile, checkpoint_path, quantize)  # so does a bad profile
    checkpoint = open_checkpoint(checkpoint_path)
    limit = checkpoint.config.max_position_embeddings
    seq = limit if max_seq is None else max_seq
    if not 1 <= seq <= limit:
        raise RlxError(f"--max-seq {seq} must be in 1..{limit} (the model's context)",
                       hint=f"give a positive length up to {limit}, or leave --max-seq out for the full context")
    base = Path(out) if out is not None else Path("artifacts") / Path(checkpoint_path).stem
    dests = [base / r.name if len(resolved) > 1 else base for r in resolved]
    if len(resolved) > 1 and base.exists() and not base.is_dir():
        raise OutputError(f"--out {base} is a file: several targets are written into a directory there",
                          hint="choose another --out path")
    for dest in dests:
        guard_dir_output(dest, owned=is_artifact_dir, what="--out", protect=[checkpoint_path])
    if use_cache:
        check_writable(cache_root(), f"the compile cache {cache_root()}",
                       hint="set RLX_CACHE_DIR to a directory you can write, or pass --no-cache")
    written = []
    for r, dest in zip(resolved, dests, strict=True):
        key = _cache_key(checkpoint.model_hash(), prof, passes, r.target.export(), seq, serve)
        cached = cache_root() / key
        phases = Phases(r.name)
        populate: Callable[[Path], dict[str, Any]] = partial(
            _populate, checkpoint=checkpoint, resolved=r, profile=prof, passes=passes, max_seq=seq, phases=phases,
            serve=serve)
        if not use_cache:
            written.append(write_artifact(dest, populate, [checkpoint_path]))
        elif (hit := from_cache(cached, dest, [checkpoint_path])) is not None:
            progress.say(f"{r.name}: compile cache hit ({cached})")
            written.append(hit)
        else:  # built into the cache, then copied out like a hit: the cache never holds another
            # process's build of this --out (one that may have compiled something else there)
            write_artifact(cached, populate)
            if (copied := from_cache(cached, dest, [checkpoint_path])) is None:
                raise RlxError(f"the compile cache entry {cached} vanished while it was copied to {dest}",
                               hint="compile again, or pass --no-cache")
            written.append(copied)
        progress.say(f"{r.name}: artifact {dest}")
    return written


def from_cache(cached: Path, dest: Path, protect: Sequence[str | Path]) -> Path | None:
    """`dest` as a copy of the cache entry `cached`; None if there is no intact entry (a damaged
    one is compiled again and replaced). Safe while other processes read and replace the entry."""
    try:
        return write_artifact(dest, lambda tmp: _copy_artifact(cached, tmp), protect)
    except (ArtifactError, FileNotFoundError):
        return None


def _link_or_copy(src: str, dst: str) -> None:
    """Artifacts are never modified in place, so copies (cache, reports) can share the file:
    a hard link where the filesystem allows, a real copy elsewhere."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_artifact(src: Path, tmp: Path) -> dict[str, Any]:
    """Copy an intact artifact (an `ArtifactError` if it is not) into a temp dir; returns its
    manifest (less the format keys `write_artifact` adds), which `write_artifact` writes anew.
    The manifest is not linked: writing it in the copy would rewrite the source's in place."""
    if not src.parent.is_dir():
        raise FileNotFoundError(src)
    with dir_lock(src.parent, shared=True):  # the entry is not swapped while it is read
        manifest = read_manifest(src)
        verify_files(src, manifest)
        shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(MANIFEST))
    return {k: v for k, v in manifest.items() if k not in ("format", "format_version")}
