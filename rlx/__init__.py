"""rlx: a compiler for Google's Gemma language models built on Apache TVM.

Public surface: `rlx.compile(...)`, `rlx.load(...)` and the `rlx` CLI; everything else is internal. Imports are
lazy so that `import rlx` (and the CLI's start-up) does not pull in numpy-heavy modules or TVM.
"""

from __future__ import annotations

from typing import Any

from rlx.errors import RlxError
from rlx.version import __version__

__all__ = ["RlxError", "__version__", "compile", "load"]


def compile(checkpoint: Any, target: Any = "cpu", out: Any = None, **options: Any) -> Any:  # noqa: A001
    """Compile a checkpoint into artifact directories, one per target (`rlx.api.compile`)."""
    from rlx.api import compile as _compile

    return _compile(checkpoint, target, out, **options)


def load(path: Any, target: str = "reference", **options: Any) -> Any:
    """Open a checkpoint (HF directory or GGUF file) or a compiled artifact for generation on
    `target`; `options` are `rlx.api.load`'s (profile=..., passes=...)."""
    from rlx.api import load as _load

    return _load(path, target, **options)
