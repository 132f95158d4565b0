"""Import TVM for running artifacts only: its runtime library, not its compiler, and no torch.

A plain `import tvm` (the PyPI wheel, apache-tvm 0.27) maps the whole compiler library, and
`tvm_ffi` imports torch whenever it is installed (it is, as a test reference): hundreds of MB
resident before a single weight is loaded, for a process that only needs the VM.
`TVM_USE_RUNTIME_LIB=1` (read by `tvm.base` at import) loads libtvm_runtime.so instead, and
hiding torch while tvm_ffi initialises keeps torch out of the process (the README's memory
numbers show the difference).
This only works before anything imported tvm; after that it is a no-op (the full library stays).
"""

from __future__ import annotations

import os
import sys


def import_runtime_only() -> bool:
    """Import TVM runtime-only if it is not imported yet; True when that happened."""
    if "tvm" in sys.modules:
        return False
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        import tvm  # noqa: F401
        import tvm.runtime.vm  # noqa: F401
    finally:
        if hidden:
            del sys.modules["torch"]
        del os.environ["TVM_USE_RUNTIME_LIB"]
    return True
