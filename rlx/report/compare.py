"""`rlx compare`: compile one checkpoint for several targets and collect their numbers side by side.

Every number is read back from the artifacts `compile_checkpoint` wrote (manifest.json,
report.json, the library / weights files, hir/*.hir), or measured here by running the artifacts
this machine can execute. Nothing is estimated unless the report's `methods` says how.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import struct
import tarfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rlx.errors import RlxError
from rlx.frontends.safetensors_file import tensor_bytes
from rlx.hir.conventions import cache_capacities
from rlx.hir.shapes import dim_symbols
from rlx.hir.tensor_type import TensorType
from rlx.runtime.buckets import longest_call
from rlx.runtime.generate import check_prompt_ids

REPORT_FORMAT = "rlx-compare"
REPORT_VERSION = 2
DECODE_STEPS = 16
DEFAULT_PROMPT = "The capital of France is"

# why an artifact of this device compiles here but cannot run (`can_run` says whether it can)
NOT_EXECUTED = {
    "cuda": "compiled, not executed: no GPU",
    "metal": "compiled, not executed: needs an Apple GPU",
    "cpu": "compiled, not executed: needs a CPU of that architecture",
}

METHODS = {
    "kv_cache_bytes": "sum of the decode entry's cache_* buffers (manifest entry signature) at "
                      "KV_CAP = max_seq, a sliding-window ring (CPU) at min(max_seq, window + the "
                      "longest prefill call - 1) rows (chunks of 512: window + 511); equals sum over "
                      "non-shared-KV layers of "
                      "2 * kv_heads * head_dim * rows * itemsize",
    "activation_bytes": "the largest single intermediate of hir/prefill.after.hir (every node but "
                        "input / param / const) with its HIR type evaluated at SEQ = the longest prefill "
                        "call (a chunk of 512, or the bucket it pads to; at most max_seq) and PAST_SEQ = 0; "
                        "a lower bound on peak activation memory, not a liveness-based plan",
    "weight_bytes": "sum of the tensor byte ranges in weights.safetensors' header",
    "code_bytes": "cuda: bytes of kernels.cu; metal: the MSL sources serialised in lib.tar's devc.o "
                  "(each a u64 length followed by '#include <metal_stdlib>...'); cpu: library size",
    "op_mix": "a kernel's PrimFunc name without 'fused_', split on '_' and matched greedily "
              "(longest first, numeric suffixes dropped) against the HIR op names, the TE kernel "
              "names of rlx.targets.kernels and the Relax operators our lowering emits",
    "numerics": f"reference interpreter greedy path: prompt prefill + {DECODE_STEPS} decode steps; "
                "each executed target is fed the reference's tokens, so both walk the same path; "
                "max |logit difference|, that over the reference's max |logit| (rel), and top-1 "
                "(argmax) agreement over those rows",
    "vs_unquantized": "the same rows against the reference interpreter with nothing quantized "
                      "(--quantize none: [quantize] and [[layers]] quantize cleared, any quantize "
                      "pass dropped from --passes), fed the same tokens; for the scheme's reference "
                      "itself too, which is the quantization error alone. Without quantized weights "
                      "it is the reference, and the numbers repeat the ones above",
    "weights": "per weight param of the artifact (report.json `weights`): its format (a quantized "
               "block format of rlx.hir.quant, or its float dtype) and its bytes in "
               "weights.safetensors; by format: count and bytes",
    "bytes_per_token": "sum over the decode entry's weight params of the bytes one decode step reads: "
                       "the whole tensor, except a table read only by `embed` (one row); a tied "
                       "embedding / LM head is one tensor, counted once, whole",
    "speed": "the same walk, one timed run after one untimed prefill: prompt tokens / prefill "
             f"seconds, {DECODE_STEPS} / decode seconds",
}

# Relax operators the lowering and legalization emit (their PrimFuncs carry these names)
_RELAX_OPS = ("take", "transpose", "permute_dims", "reshape", "concatenate", "strided_slice", "repeat",
              "softmax", "rms_norm", "gelu_tanh", "topk", "split", "multiply", "add", "subtract", "divide",
              "tanh", "exp", "sum", "max", "astype", "cast", "matmul", "expand_dims", "squeeze", "power",
              "sqrt", "full", "zeros", "where", "mean", "maximum", "minimum", "argsort", "gather")


def op_vocabulary() -> frozenset[str]:
    from rlx.hir.ops import Op
    from rlx.targets import kernels

    te_names = [name for name, fn in inspect.getmembers(kernels, inspect.isfunction)
                if fn.__module__ == kernels.__name__ and not name.startswith("_")]
    return frozenset([*_RELAX_OPS, *te_names, *(op.value for op in Op)])


def op_mix(kernel: str, vocabulary: frozenset[str]) -> list[str]:
    """`fused_rms_norm3_add1` -> [rms_norm, add]: see METHODS["op_mix"]."""
    tokens = kernel.removeprefix("fused_").split("_")
    ops: list[str] = []
    i = 0
    while i < len(tokens):
        for j in range(len(tokens), i, -1):
            candidate = re.sub(r"\d+$", "", "_".join(tokens[i:j]))
            if candidate in vocabulary or j == i + 1:
                if candidate and candidate not in ops:
                    ops.append(candidate)
                i = j
                break
    return ops


def msl_bytes(lib_tar: Path) -> int:
    """Bytes of the MSL sources inside a Metal lib.tar's devc.o (see METHODS["code_bytes"])."""
    with tarfile.open(lib_tar) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("devc.o"))
        blob = tar.extractfile(member).read()  # type: ignore[union-attr]  # devc.o is a regular file
    total, marker = 0, b"#include <metal_stdlib>"
    for m in re.finditer(re.escape(marker), blob):
        (n,) = struct.unpack("<Q", blob[m.start() - 8:m.start()])
        total += n if m.start() + n <= len(blob) else 0
    return total


_CODE: dict[str, tuple[str, Callable[[Path, dict[str, Any]], int]]] = {
    "cuda": ("CUDA source", lambda art, man: (art / "kernels.cu").stat().st_size),
    "metal": ("MSL", lambda art, man: msl_bytes(art / man["library"])),
    "cpu": ("library", lambda art, man: (art / man["library"]).stat().st_size),
}


def _tensor_bytes(text: str | TensorType, env: dict[str, int]) -> tuple[int, tuple[int, ...]]:
    from rlx.hir.shapes import eval_shape

    t = TensorType.parse(text) if isinstance(text, str) else text
    shape = eval_shape(t.shape, env)
    return int(np.prod(shape, dtype=np.int64)) * t.dtype.itemsize, shape


def kv_cache_bytes(manifest: dict[str, Any]) -> int:
    caches = [TensorType.parse(t) for _, t in manifest["entries"]["decode"]["caches"]]
    symbols = {s for t in caches for s in dim_symbols(t.shape)}
    env = {"BATCH": 1, **cache_capacities(symbols, int(manifest["max_seq"]), longest_prefill(manifest))}
    return sum(_tensor_bytes(t, env)[0] for t in caches)


def longest_prefill(manifest: dict[str, Any]) -> int:
    """The most tokens one prefill call of this artifact runs (`buckets.longest_call`, as the
    engine sizes its rings by)."""
    return longest_call(manifest.get("prefill_buckets") or (), int(manifest["max_seq"]))


def largest_activation(hir_text: str, max_seq: int) -> dict[str, Any]:
    """See METHODS["activation_bytes"]."""
    from rlx.hir.text import parse_hir

    env = {"SEQ": max_seq, "BATCH": 1, "PAST_SEQ": 0}
    best: dict[str, Any] = {"bytes": 0}
    for node in parse_hir(hir_text):
        if node.op.value in ("input", "param", "const"):
            continue
        size, shape = _tensor_bytes(node.type, env)
        if size > best["bytes"]:
            best = {"bytes": size, "node": node.id, "op": node.op.value, "shape": list(shape)}
    return best


def _fusion(records: list[dict[str, Any]], kind: str) -> dict[str, int]:
    prefix = f"{kind}."
    out: Counter[str] = Counter()
    for r in records:
        out.update({k.removeprefix(prefix): v for k, v in r["stats"].items() if k.startswith(prefix)})
    return dict(out)


def _passes(report: dict[str, Any]) -> dict[str, Any]:
    return {mode: {"pipeline": [r["spec"] for r in rep["passes"]], "hits": _fusion(rep["passes"], "hits"),
                   "misses": _fusion(rep["passes"], "misses")}
            for mode, rep in report["passes"].items()}


def collect_artifact(art: Path, vocabulary: frozenset[str]) -> dict[str, Any]:
    """Everything the report says about one compiled artifact, read from its files."""
    manifest = json.loads((art / "manifest.json").read_text())
    report = json.loads((art / "report.json").read_text())
    device = manifest["target"]["device"]
    kind, code_size = _CODE[device]
    kernels = [{**k, "ops": op_mix(k["name"], vocabulary)} for k in report["kernels"]]
    return {
        "device": device,
        "compile": {"phases": report["phases"], "total_s": round(sum(report["phases"].values()), 3)},
        "kernels": {"count": len(kernels), "list": kernels,
                    "by_op": dict(sorted(Counter(op for k in kernels for op in k["ops"]).items()))},
        "code": {"kind": kind, "bytes": code_size(art, manifest)},
        "library_bytes": (art / manifest["library"]).stat().st_size,
        "passes": _passes(report),
        "weights": {k: report["weights"][k] for k in ("quantize", "by_format", "total_bytes", "bytes_per_token",
                                                      "tensors")},
        "memory": {"weight_bytes": tensor_bytes(art / manifest["weights"]),
                   "kv_cache_bytes": kv_cache_bytes(manifest),
                   "activation": largest_activation((art / "hir" / "prefill.after.hir").read_text(),
                                                    longest_prefill(manifest))},
        "max_seq": int(manifest["max_seq"]),
    }


def pipeline_differences(targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per mode: whether the compiled targets ran one pipeline, and the passes only some ran."""
    compiled = {name: t["passes"] for name, t in targets.items() if "passes" in t}
    out: dict[str, Any] = {}
    for mode in sorted({m for p in compiled.values() for m in p}):
        pipes = {name: p[mode]["pipeline"] for name, p in compiled.items() if mode in p}
        common = set.intersection(*(set(p) for p in pipes.values())) if pipes else set()
        only = {name: [s for s in pipe if s not in common] for name, pipe in pipes.items()}
        out[mode] = {"same": len({tuple(p) for p in pipes.values()}) <= 1,
                     "only_some": {name: specs for name, specs in only.items() if specs}}
    return out


# --- running the artifacts -------------------------------------------------------------------

def _walk(engine: Any, ids: list[int], choose: Callable[[int, np.ndarray], int]) -> dict[str, Any]:
    """Prefill, then DECODE_STEPS steps feeding `choose(step, logits)`; logits rows and timings."""
    t0 = time.perf_counter()
    rows = [np.asarray(engine.prefill(ids), dtype=np.float32)]
    t1 = time.perf_counter()
    tokens = []
    for i in range(DECODE_STEPS):
        tokens.append(choose(i, rows[-1]))
        rows.append(np.asarray(engine.step(tokens[-1]), dtype=np.float32))
    t2 = time.perf_counter()
    return {"logits": np.stack(rows), "tokens": tokens,
            "speed": {"prefill_tok_s": round(len(ids) / (t1 - t0), 2),
                      "decode_tok_s": round(DECODE_STEPS / (t2 - t1), 2)}}


def logit_numerics(logits: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """max |diff|, it over the reference's max |logit|, top-1 agreement: rows of `logits` vs `ref`."""
    diff = float(np.abs(logits - ref).max())
    scale = float(np.abs(ref).max())
    agree = logits.argmax(-1) == ref.argmax(-1)
    return {"max_abs_diff": diff, "max_abs_logit": scale, "rel_diff": diff / scale if scale else float("nan"),
            "top1_agreement": float(agree.mean()), "rows": int(agree.size)}


def _run_target(art: Path, ids: list[int], ref: dict[str, Any], unquantized: dict[str, Any]) -> dict[str, Any]:
    from rlx.runtime.artifact_engine import ArtifactEngine

    engine = ArtifactEngine(art)
    engine.prefill(ids)  # warm-up: first calls pay for lazy initialisation
    ours = _walk(engine, ids, lambda i, _: ref["tokens"][i])
    return {"numerics": {**logit_numerics(ours["logits"], ref["logits"]),
                         "vs_unquantized": logit_numerics(ours["logits"], unquantized["logits"])},
            "speed": ours["speed"]}


def reference_walk(checkpoint: Any, profile: Any, passes: str | None, ids: list[int],
                   tokens: list[int] | None = None) -> dict[str, Any]:
    """The reference interpreter's walk: greedy, or fed `tokens`."""
    from rlx.compiler.engines import reference_engine

    choose = (lambda i, logits: int(np.argmax(logits))) if tokens is None else (lambda i, _: tokens[i])
    return _walk(reference_engine(checkpoint, passes=passes, profile=profile), ids, choose)


def unquantized(profile: Any, passes: str | None) -> tuple[Any, str | None]:
    """`profile` and `passes` with nothing quantized: [quantize] back to none, [[layers]] quantize
    dropped (a patch that did nothing else goes), and any quantize pass left out of `passes`."""
    from rlx.compiler.profile import ProfileError, QuantizeOptions
    from rlx.hir.pass_infra import parse_pipeline

    layers = []
    for patch in profile.layers:
        try:
            layers.append(dataclasses.replace(patch, quantize=None) if patch.quantize is not None else patch)
        except ProfileError:  # its only action was quantize
            continue
    prof = dataclasses.replace(profile, quantize=QuantizeOptions(group=profile.quantize.group), layers=tuple(layers))
    if passes is not None and any(p.name == "quantize" for p in parse_pipeline(passes)):
        passes = ",".join(str(p) for p in parse_pipeline(passes) if p.name != "quantize")
    return prof, passes


# --- the peer benchmark file --------------------------------------------------------------------

def _numbers(data: Any, path: str = "") -> list[tuple[str, float]]:
    """Every numeric leaf whose key path mentions tok_s, as (path, value)."""
    if isinstance(data, dict):
        return [x for k, v in data.items() for x in _numbers(v, f"{path}.{k}" if path else str(k))]
    if isinstance(data, list):
        label = lambda i, v: v.get("name", i) if isinstance(v, dict) else i  # noqa: E731
        return [x for i, v in enumerate(data) for x in _numbers(v, f"{path}[{label(i, v)}]")]
    ok = isinstance(data, int | float) and not isinstance(data, bool) and "tok_s" in path
    return [(path, float(data))] if ok else []


def read_bench(path: Path) -> dict[str, Any]:
    """`bench/bench_cpu.py --json` output: engines[] {name, prefill_tok_s, decode_tok_s}. Another
    JSON layout yields whatever tok/s numbers it holds, with a note saying so; a file that is not
    JSON, or holds no tok/s number at all, is refused (a report silently without the peer the user
    asked for would look like a finished comparison)."""
    fix = "pass the file bench/bench_cpu.py --json FILE wrote, or drop --bench"
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise RlxError(f"--bench {path}: no such file", hint="write one with bench/bench_cpu.py --json FILE") from None
    except OSError as e:
        raise RlxError(f"--bench {path}: cannot read it ({e.strerror})", hint=fix) from None
    except (ValueError, RecursionError) as e:
        raise RlxError(f"--bench {path} is not JSON ({str(e).splitlines()[0][:120]})", hint=fix) from None
    engines = data.get("engines") if isinstance(data, dict) else None
    rows = [{"name": str(e.get("name", f"engine {i}")),
             **{k: float(e[k]) for k in ("prefill_tok_s", "decode_tok_s") if isinstance(e.get(k), int | float)}}
            for i, e in enumerate(engines if isinstance(engines, list) else []) if isinstance(e, dict)]
    rows = [r for r in rows if len(r) > 1]
    if rows:
        return {"file": str(path), "engines": rows, "found": [], "note": None}
    found = _numbers(data)
    if not found:
        raise RlxError(f"--bench {path} holds no benchmark numbers (no engines[] rows, no *tok_s* values)", hint=fix)
    return {"file": str(path), "engines": [], "found": [{"key": k, "value": v} for k, v in found],
            "note": "expected engines[] with name / prefill_tok_s / decode_tok_s; not found, so these are "
                    "the tok/s numbers the file holds"}


# --- the whole comparison -----------------------------------------------------------------------

def _prompt_ids(checkpoint: Any, prompt: str | None, prompt_ids: list[int] | None) -> list[int]:
    from rlx.runtime.tokenizer import Tokenizer

    if prompt_ids is not None:
        return prompt_ids
    try:
        return Tokenizer.from_checkpoint(checkpoint).encode(prompt or DEFAULT_PROMPT)
    except RlxError as e:
        raise RlxError(f"cannot tokenize the prompt: {e.message}", hint="pass --prompt-ids 2,818,...") from None


def _compile_one(checkpoint_path: Path, target: str, dest: Path, profile: Any, passes: str | None) -> dict[str, Any]:
    """Compile one target; a failure becomes {"status": "failed", "error": ...} so the others go on."""
    from rlx.compiler.compile import compile_checkpoint

    try:
        [art] = compile_checkpoint(checkpoint_path, [target], dest, profile=profile, passes=passes)
    except Exception as e:  # noqa: BLE001 (any compile failure is one target's result, not the report's)
        message = str(e) if isinstance(e, RlxError) else "".join(traceback.format_exception_only(e)).strip()
        return {"status": "failed", "error": message}
    return {"status": "compiled", "artifact": art}


def compare(checkpoint_path: str | Path, targets: list[str], out: str | Path | None = None, *,
            profile: str | None = None, passes: str | None = None, prompt: str | None = None,
            prompt_ids: list[int] | None = None, bench: str | Path | None = None,
            quantize: str | None = None) -> Path:
    """Compile every target (through the compile cache), run the runnable ones, write the report
    directory atomically; returns it. Bad input (unknown target, bad profile, missing bench file,
    prompt too long) fails before anything compiles."""
    from rlx.compiler.profile_toml import resolve_profile
    from rlx.frontends.checkpoint import open_checkpoint
    from rlx.outputs import replace_dir_atomic
    from rlx.report.render import write_reports
    from rlx.runtime.artifact_engine import can_run
    from rlx.targets.presets import resolve_target

    if not targets:
        raise RlxError("--targets is empty", hint="e.g. --targets cpu,cuda,metal")
    resolved = {t: resolve_target(t) for t in targets}
    prof = resolve_profile(profile, checkpoint_path, quantize)
    peer = read_bench(Path(bench)) if bench is not None else None
    checkpoint = open_checkpoint(checkpoint_path)
    ids = _prompt_ids(checkpoint, prompt, prompt_ids)
    if not ids or len(ids) + DECODE_STEPS > checkpoint.config.max_position_embeddings:
        raise RlxError(f"the prompt has {len(ids)} tokens; the walk needs 1..."
                       f"{checkpoint.config.max_position_embeddings - DECODE_STEPS}", hint="shorten the prompt")
    check_prompt_ids(ids, checkpoint.config.vocab_size)
    dest = Path(out) if out is not None else Path("reports") / Path(checkpoint_path).stem
    plain_prof, plain_passes = unquantized(prof, passes)

    def fill(tmp: Path) -> None:
        vocabulary = op_vocabulary()
        results: dict[str, dict[str, Any]] = {}
        for name, r in resolved.items():
            result = _compile_one(Path(checkpoint_path), name, tmp / "artifacts" / name, prof, passes)
            if result["status"] == "compiled":
                art = result.pop("artifact")
                result.update(collect_artifact(art, vocabulary), artifact=str(art.relative_to(tmp)))
                result["status"] = "executed" if can_run(r.device, r.local) else NOT_EXECUTED[r.device]
            results[name] = result
        executed = [n for n, t in results.items() if t["status"] == "executed"]
        reference = reference_walk(checkpoint, prof, passes, ids) if executed else None
        plain = None
        if reference is not None:
            plain = (reference if (prof, passes) == (plain_prof, plain_passes)
                     else reference_walk(checkpoint, plain_prof, plain_passes, ids, reference["tokens"]))
            reference["vs_unquantized"] = logit_numerics(reference["logits"], plain["logits"])
            for name in executed:
                results[name].update(_run_target(tmp / results[name]["artifact"], ids, reference, plain))
        data = {
            "format": REPORT_FORMAT, "version": REPORT_VERSION,
            "checkpoint": str(checkpoint_path), "model": Path(checkpoint_path).stem,
            "model_hash": checkpoint.model_hash(), "profile": prof.source if prof is not None else None,
            "passes": passes, "prompt_ids": ids, "decode_steps": DECODE_STEPS,
            "quantize": {"profile": dataclasses.asdict(prof.quantize),
                         "unquantized_reference": {"profile": plain_prof.source, "passes": plain_passes,
                                                   "same_as_reference": (prof, passes) == (plain_prof, plain_passes)}},
            "reference": ({"tokens": reference["tokens"], "speed": reference["speed"],
                           "vs_unquantized": reference["vs_unquantized"]} if reference else None),
            "targets": results,
            "pipeline_differences": pipeline_differences(results),
            "bench": peer,
            "methods": METHODS,
        }
        write_reports(tmp, data)

    return replace_dir_atomic(dest, fill, owned=is_report_dir, what="--out", protect=[checkpoint_path])


def is_report_dir(path: Path) -> bool:
    """Whether `path` holds an `rlx compare` report (which a new report may replace)."""
    try:
        return json.loads((Path(path) / "report.json").read_text()).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
