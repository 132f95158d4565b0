"""`rlx` command line: inspect a checkpoint's HIR, compile it, run a model, compare targets.

Errors caused by the input (`RlxError`) print one message with its fix and exit 2; nothing
half-written is left behind (outputs are written to a temp file and renamed).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

import rlx.progress as progress
from rlx.errors import RlxError
from rlx.interrupts import Interrupted, handle_interrupts, received
from rlx.outputs import guard_file_output

if TYPE_CHECKING:
    from collections.abc import Mapping

    from rlx.api import Model
    from rlx.frontends.checkpoint import Checkpoint
    from rlx.frontends.flow import GemmaFlow
    from rlx.hir.pass_manager import PassReport


def _flow(ckpt: Checkpoint, args: argparse.Namespace) -> GemmaFlow:
    from rlx.frontends.flow import GemmaFlow

    flow = GemmaFlow(ckpt.config, ckpt.weights).batch(args.batch).last_token_logits().export_kv()
    if args.mode == "decode":
        return flow.decode().dynamic_past()
    return flow.prefill().dynamic_seq() if args.seq == "dynamic" else flow.prefill(_positive(args.seq, "--seq"))


def _positive(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise RlxError(f"{flag} {text!r} must be a positive integer or 'dynamic'",
                       hint="e.g. --seq 128, or --seq dynamic")
    return int(text)


def _report_lines(source: str, reports: Mapping[str, PassReport]) -> list[str]:
    """The pass report of each graph, headed by the profile that chose its pipeline."""
    out = [f"profile: {source}"]
    for graph, report in reports.items():
        pipeline = ",".join(r.spec for r in report.records) or "(no passes)"
        out += [f"passes for {graph}: {pipeline}", *report.lines()]
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    from rlx.compiler.graphs import run_pipeline
    from rlx.compiler.profile_toml import resolve_profile
    from rlx.compiler.summary import summarize, summary_lines
    from rlx.frontends.checkpoint import open_checkpoint
    from rlx.hir.dot import to_dot
    from rlx.hir.serialize import hir_to_dict
    from rlx.hir.text import print_hir

    profile = resolve_profile(args.profile, args.checkpoint, args.quantize)
    ckpt = open_checkpoint(args.checkpoint)
    hir, report = run_pipeline(profile.apply(_flow(ckpt, args)).build(), args.mode, profile, args.passes, ckpt.config)
    summary = summarize(hir, ckpt.config)
    passes = _report_lines(profile.source, {args.mode: report})
    if profile.passes.verbose:
        for line in passes:
            _progress(line)
    notes = summary_lines(summary) + (passes if args.report else [])
    extra = {"passes": report.to_dict()["passes"]} if args.report else {}
    render: dict[str, Callable[[], str]] = {
        "text": lambda: print_hir(hir) + "".join(f"# {ln}\n" for ln in notes),
        "json": lambda: json.dumps({"summary": summary, "hir": hir_to_dict(hir), **extra}, indent=1) + "\n",
        "dot": lambda: "".join(f"// {ln}\n" for ln in notes) + to_dot(hir),
    }
    sys.stdout.write(render[args.format]())
    return 0


def _read_prompt_file(path: str, flag: str) -> str:
    """A long prompt from a file (a command line holds at most 128 KiB per argument on Linux)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RlxError(f"{flag}: cannot read {path}: {getattr(e, 'strerror', None) or e}",
                       hint=f"give a readable UTF-8 text file to {flag}") from None


def _parse_ids(text: str) -> list[int]:
    """Comma-separated ids, or `@FILE`: the ids in that file (commas or whitespace between them)."""
    source = _read_prompt_file(text[1:], "--prompt-ids @FILE") if text.startswith("@") else text
    try:
        return [int(t) for t in re.split(r"[,\s]+", source) if t]
    except ValueError:
        shown = text if len(text) < 80 else text[:77] + "..."
        raise RlxError(f"--prompt-ids {shown!r} is not a comma-separated list of integers",
                       hint="e.g. --prompt-ids 2,818,5279, or --prompt-ids @ids.txt") from None


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_run(args: argparse.Namespace) -> int:
    import rlx
    import rlx.api
    from rlx.runtime.detokenizer import FILE as DETOKENIZER_FILE
    from rlx.runtime.detokenizer import Detokenizer
    from rlx.runtime.sampler import Sampler

    if sum(x is not None for x in (args.prompt, args.prompt_file, args.prompt_ids)) != 1:
        raise RlxError("give exactly one of --prompt TEXT, --prompt-file PATH or --prompt-ids 2,818,...",
                       hint="e.g. --prompt 'The capital of France is'")
    if args.prompt_file is not None:
        args.prompt = _read_prompt_file(args.prompt_file, "--prompt-file")
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    artifact = rlx.api.is_artifact(args.model)
    if artifact:  # before the tokenizer loads: the flags are wrong whatever else is
        rlx.api.refuse_compile_options(args.model, {"--profile": args.profile, "--passes": args.passes})
    if args.verify and not artifact:
        raise RlxError(f"--verify checks an artifact's files; {args.model} is a checkpoint", hint="drop --verify")
    if args.logits_out:
        guard_file_output(Path(args.logits_out), "--logits-out")
    tokenizer = None if args.prompt_ids is not None else rlx.api.tokenizer_for(args.model)
    ids = _parse_ids(args.prompt_ids) if tokenizer is None else tokenizer.encode(args.prompt)
    decoder = None
    if artifact and (Path(args.model) / DETOKENIZER_FILE).is_file():
        # encoded first, so the tokenizer (~300 MB for Gemma 3's, ~360 MB while it parses) is gone,
        # and the small detokenizer parsed, with their heap handed back to the OS, before TVM and
        # the weights load: nothing of either transient sits on top of the weights
        tokenizer = None
        decoder = Detokenizer.load(Path(args.model))
        gc.collect()
        _return_freed_heap()
    if _cpu_artifact(Path(args.model)):  # TVM's runtime is all it needs
        from rlx.runtime.tvm_runtime import import_runtime_only

        import_runtime_only()
    _progress(f"loading {args.model}")
    model = rlx.load(args.model, target=args.target, profile=args.profile, passes=args.passes,
                     quantize=args.quantize, verify=args.verify)
    if tokenizer is not None:  # no small detokenizer to print with: keep the one already built
        model.adopt_tokenizer(tokenizer)
    if decoder is not None:
        model.adopt_decoder(decoder)
    _progress(f"running on {model.engine.name}")
    if model.profile is not None and model.profile.passes.verbose:
        for line in _report_lines(model.profile.source, model.engine.reports):
            _progress(line)
    detok = _detokenizer(model)

    def on_token(token: int) -> None:
        if args.stream:
            sys.stdout.write(detok([token]))
            sys.stdout.flush()

    gen = model.generate(ids, args.max_new_tokens, sampler=sampler, on_token=on_token,
                         keep_logits=bool(args.logits_out))
    if args.logits_out:
        _save_npy_atomic(Path(args.logits_out), gen.logits_array())
    sys.stdout.write("\n" if args.stream else detok(gen.tokens) + "\n")
    _progress(f"prompt {len(ids)} tokens, generated {len(gen.tokens)}"
              f"{' (stopped at EOS)' if gen.stopped_at_eos else ''}: "
              f"prefill {gen.prefill_tok_s:.1f} tok/s, decode {gen.decode_tok_s:.2f} tok/s")
    _progress("token ids: " + ",".join(map(str, gen.tokens)))
    return 0


def _return_freed_heap() -> None:
    """glibc keeps freed heap pages mapped (they count in RSS) until told otherwise; elsewhere a no-op."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cpu_artifact(path: Path) -> bool:
    """A CPU artifact (the runtime-only TVM import has no GPU backends: those keep the full one)."""
    try:
        return json.loads((path / "manifest.json").read_text())["target"]["device"] == "cpu"
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not an artifact, or a broken one: rlx.load reports it


def _detokenizer(model: Model) -> Callable[[list[int]], str]:
    """Token text, or the ids themselves when the model has no tokenizer (--prompt-ids runs)."""
    try:
        decoder = model.decoder
    except RlxError:
        return lambda ids: "".join(f" [{i}]" for i in ids)
    return lambda ids: decoder.decode(ids)


def _progress(message: str) -> None:
    progress.say(message)  # on unless --quiet (main)


def cmd_compile(args: argparse.Namespace) -> int:
    from rlx.compiler.compile import compile_checkpoint
    from rlx.targets.presets import split_targets

    for path in compile_checkpoint(args.checkpoint, split_targets(args.target), args.out, profile=args.profile,
                                   passes=args.passes, max_seq=args.max_seq, use_cache=not args.no_cache,
                                   quantize=args.quantize, serve=not args.no_serve):
        print(path)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rlx.report import compare
    from rlx.targets.presets import split_targets

    if args.prompt is not None and args.prompt_ids is not None:
        raise RlxError("give at most one of --prompt TEXT or --prompt-ids 2,818,...",
                       hint="e.g. --prompt 'The capital of France is'")
    ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    out = compare(args.checkpoint, split_targets(args.targets), args.out, profile=args.profile, passes=args.passes,
                  prompt=args.prompt, prompt_ids=ids, bench=args.bench, quantize=args.quantize)
    _progress(f"report: {out / 'report.html'} (also report.md, report.json)")
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlx", description="Compile and run Gemma models with TVM.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr (errors still)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="print a checkpoint's HIR and a summary")
    p.add_argument("checkpoint", help="HF directory (config.json + safetensors) or .gguf file")
    p.add_argument("--mode", choices=("prefill", "decode"), default="prefill")
    p.add_argument("--format", choices=("text", "json", "dot"), default="text")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", default="dynamic", help="prefill length, or 'dynamic' (needs --batch 1)")
    p.add_argument("--report", action="store_true", help="append the pass report (time, nodes, fusion hits)")
    _compile_flags(p)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("compile", help="compile a checkpoint into an artifact directory per target")
    p.add_argument("checkpoint", help="HF directory (config.json + safetensors) or .gguf file")
    p.add_argument("--target", default="cpu", help="preset(s), comma-separated (cpu, cpu-aarch64, cuda, "
                                                   "cuda-sm90, metal), or a TVM target JSON dict")
    p.add_argument("--out", help="artifact directory (several targets: one subdirectory each); "
                                 "default artifacts/<checkpoint name>")
    p.add_argument("--max-seq", type=int, help="longest sequence (prompt + generated) the artifact serves")
    p.add_argument("--no-cache", action="store_true", help="build even if the compile cache has this artifact")
    p.add_argument("--no-serve", action="store_true", help="leave out the batched step entries only `rlx serve` "
                                                           "runs: a faster compile and a smaller library")
    _compile_flags(p)
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("run", help="generate text")
    p.add_argument("model", help="checkpoint (HF directory or .gguf) or an artifact from rlx compile")
    p.add_argument("--target", default="reference", help="reference (numpy interpreter) or cpu (compiled with "
                                                         "TVM in-process); an artifact runs on its own target")
    p.add_argument("--prompt", help="prompt text (tokenized with the checkpoint's tokenizer)")
    p.add_argument("--prompt-file", help="read the prompt text from this file (long prompts, documents)")
    p.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 2,818,5279, or @FILE holding them")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--logits-out", help="write float32 [1 + decode steps, vocab] logits to this .npy")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--verify", action="store_true", help="hash an artifact's files in full before running it "
                                                         "(default: sizes, quick digests, the weights header)")
    _compile_flags(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("compare", help="compile for several targets and write a side-by-side report")
    p.add_argument("checkpoint", help="HF directory (config.json + safetensors) or .gguf file")
    p.add_argument("--targets", default="cpu,cuda,metal", help="presets, comma-separated (default cpu,cuda,metal)")
    p.add_argument("--out", help="report directory; default reports/<checkpoint name>")
    p.add_argument("--prompt", help="prompt text for the numerics / speed walk (default: "
                                    "'The capital of France is')")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--bench", help="bench/bench_cpu.py --json output, to plot the cpu speed against")
    _compile_flags(p)
    p.set_defaults(fn=cmd_compare)

    from rlx.serve.commands import add_commands  # `rlx serve`, `rlx chat` (light: handlers import lazily)

    add_commands(sub)
    return parser


def _compile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="gemma.rlx.toml or a preset (gemma_prefill, gemma_decode); default: "
                                     "the gemma.rlx.toml next to the weights, else each mode's preset")
    p.add_argument("--passes", metavar="SPEC", help="pass pipeline, e.g. 'fold-constants,cse,dce' "
                                                    "(replaces the profile's; '' runs none)")
    p.add_argument("--quantize", metavar="SCHEME", help="weights in blocks: gguf (a GGUF's own, as stored), q8, "
                                                        "q4, q4a (rlx's groups), none; replaces [quantize] scheme")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input prints `rlx: error: ...` with its fix and exits 2; Ctrl-C / SIGTERM
    print `rlx: interrupted` and exit 130 / 143; anything else is a bug and keeps its traceback."""
    try:
        with handle_interrupts():
            args = build_parser().parse_args(argv)
            with progress.reporting(not args.quiet):
                return args.fn(args)
    except RlxError as e:
        if (signum := received()) is not None:  # a library turned the interrupt into its own error
            return _interrupted(signum)
        print(f"rlx: error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        return _interrupted(e.signum)
    except KeyboardInterrupt:
        return _interrupted(signal.SIGINT)


def _interrupted(signum: int) -> int:
    print(f"rlx: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
    return Interrupted(signum).exit_code


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in rlx's format (`rlx: error:` and a `fix:` line)."""

    def error(self, message: str) -> NoReturn:
        raise RlxError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`")


if __name__ == "__main__":
    sys.exit(main())
